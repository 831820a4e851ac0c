"""Files microscopists use: TIFF stacks in (streamed), localization tables and image stacks out.

Every writer writes into a staging folder; `OutputSet.commit()` moves all files into place at once,
and an error before that leaves no output file behind (no half-written results).
"""

import csv
import os
import shutil
import tempfile
from typing import Iterator, Tuple

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")

THUNDERSTORM_COLUMNS = ("id", "frame", "x [nm]", "y [nm]", "sigma [nm]", "intensity [photon]",
                        "offset [photon]", "bkgstd [photon]", "uncertainty_xy [nm]")
# Extra columns after ThunderSTORM's (ThunderSTORM and most readers keep unknown columns).
EXTRA_COLUMNS = ("uncertainty_x [nm]", "uncertainty_y [nm]", "detection_fraction", "crlb_xy [nm]")

PICASSO_DTYPE = np.dtype([("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"),
                          ("sx", "f4"), ("sy", "f4"), ("bg", "f4"), ("lpx", "f4"), ("lpy", "f4")])


class StackError(ValueError):
    """An input stack that cannot be analyzed (the message names the problem and the fix)."""


class TiffStack:
    """A TIFF / OME-TIFF / ImageJ stack of 2-D frames, read in batches (never all at once).

    Singleton dimensions are dropped; what remains must be (frames, Y, X) or (Y, X).
    """

    def __init__(self, path):
        import tifffile

        self.path = str(path)
        if not os.path.exists(self.path):
            raise StackError(f"{self.path}: no such file; check the path")
        if os.path.isdir(self.path):
            raise StackError(f"{self.path} is a folder; pass TIFF files (or use a folder as input "
                             "only where a list of stacks is accepted)")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, OSError) as err:
            raise StackError(f"{self.path} is not a readable TIFF file ({err}); analyze takes "
                             "TIFF / OME-TIFF stacks: convert the movie to TIFF first") from None
        try:
            self._inspect(tifffile)
        except StackError:
            self.close()
            raise

    def _inspect(self, tifffile):
        """Sets num_frames, height, width and dtype, or raises StackError."""
        if not self._tif.series:
            raise StackError(f"{self.path}: the TIFF holds no images (empty stack)")
        series = self._tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        self.dtype = series.dtype
        rgb = series.pages[0].photometric in (tifffile.PHOTOMETRIC.RGB,
                                              tifffile.PHOTOMETRIC.PALETTE)
        if "S" in axes and shape[axes.index("S")] > 1 and rgb:
            raise StackError(f"{self.path}: frames have {shape[axes.index('S')]} colour samples "
                             f"(axes {axes}, shape {shape}); analyze takes single-channel camera "
                             "frames: export one channel as a grayscale stack")
        kept = [n for n in shape[:-2] if n != 1]
        if len(kept) > 1 or len(shape) < 2:
            raise StackError(f"{self.path}: wrong dimensionality, axes {axes} shape {shape}; "
                             "analyze takes a time series of 2-D frames (T, Y, X): split "
                             "channels / z-planes into separate stacks first")
        self.num_frames = int(kept[0]) if kept else 1
        self.height, self.width = int(shape[-2]), int(shape[-1])
        if self.num_frames == 0 or self.height == 0 or self.width == 0:
            raise StackError(f"{self.path}: empty stack (shape {shape})")
        self._pages = len(series.pages) == self.num_frames and self.num_frames > 1

    def batches(self, size) -> Iterator[Tuple[int, np.ndarray]]:
        """Yields (first frame index, frames [b, H, W] float32)."""
        for lo in range(0, self.num_frames, size):
            hi = min(lo + size, self.num_frames)
            yield lo, self.read(lo, hi)

    def read(self, lo, hi) -> np.ndarray:
        if self._pages:
            pages = self._tif.series[0].pages
            data = np.stack([pages[i].asarray() for i in range(lo, hi)])
        else:  # One page, or contiguous (ImageJ) data that tifffile maps as one block.
            data = self._block()[lo:hi]
        return np.asarray(data, np.float32).reshape((hi - lo, self.height, self.width))

    def _block(self):
        """The whole series as a [T, H, W] array backed by the file (memory-mapped) when it is
        stored uncompressed, else decoded once into a temporary memory-mapped file."""
        if getattr(self, "_data", None) is None:
            import tifffile

            try:
                data = tifffile.memmap(self.path, series=0, mode="r")
            except ValueError:  # Compressed or not contiguous.
                data = self._tif.series[0].asarray(out="memmap")
            self._data = data.reshape((self.num_frames, self.height, self.width))
        return self._data

    def close(self):
        self._data = None
        self._tif.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def find_stacks(inputs):
    """Paths and folders -> sorted list of TIFF files (a folder contributes its *.tif / *.tiff)."""
    found = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if n.lower().endswith(TIFF_SUFFIXES))
            if not names:
                raise StackError(f"folder {item} holds no .tif / .tiff files")
            found.extend(os.path.join(item, n) for n in names)
        elif not os.path.exists(item):
            raise StackError(f"{item}: no such file; check the path")
        else:
            found.append(item)
    if not found:
        raise StackError("no input stacks given: pass TIFF files or folders of them")
    return found


def stack_name(path) -> str:
    """File name without .ome.tif / .tif / .tiff."""
    name = os.path.basename(str(path))
    for suffix in (".ome.tiff", ".ome.tif") + TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


class OutputSet:
    """Files written to a staging folder inside `out_dir`, moved into `out_dir` on commit()."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self._created = not os.path.exists(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.staging = tempfile.mkdtemp(prefix=".partial-", dir=self.out_dir)
        self._open = []

    def path(self, name) -> str:
        return os.path.join(self.staging, name)

    def track(self, handle):
        self._open.append(handle)
        return handle

    def _close_all(self):
        for handle in self._open:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - closing on the error path must not mask the error.
                pass
        self._open = []

    def commit(self):
        self._close_all()
        written = []
        for name in sorted(os.listdir(self.staging)):
            target = os.path.join(self.out_dir, name)
            os.replace(os.path.join(self.staging, name), target)
            written.append(target)
        shutil.rmtree(self.staging, ignore_errors=True)
        return written

    def abort(self):
        self._close_all()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class TiffStackWriter:
    """Appends float32 [b, H, W] frames to a (Big)TIFF stack."""

    def __init__(self, path):
        import tifffile

        self._writer = tifffile.TiffWriter(path, bigtiff=True)

    def write(self, frames):
        for frame in np.asarray(frames, np.float32):
            self._writer.write(frame, contiguous=True, photometric="minisblack")

    def close(self):
        self._writer.close()


class ThunderstormWriter:
    """ThunderSTORM CSV: THUNDERSTORM_COLUMNS (+ EXTRA_COLUMNS), frames 1-based, nm and photons."""

    def __init__(self, path):
        self._file = open(path, "w", newline="")
        self._csv = csv.writer(self._file, quoting=csv.QUOTE_NONNUMERIC)
        self._csv.writerow(THUNDERSTORM_COLUMNS + EXTRA_COLUMNS)
        self.rows = 0

    def write(self, table):
        """table: dict of equal-length arrays keyed by column name."""
        n = len(table["id"])
        columns = [np.asarray(table[c]) for c in THUNDERSTORM_COLUMNS + EXTRA_COLUMNS]
        for i in range(n):
            self._csv.writerow([int(col[i]) if k < 2 else float(col[i])
                                for k, col in enumerate(columns)])
        self.rows += n

    def close(self):
        self._file.close()


class PicassoWriter:
    """Picasso HDF5 (`/locs`, pixel units with pixel centres at integer coordinates, frames
    0-based) and its YAML metadata, written on close."""

    def __init__(self, path, height, width, pixel_size_nm, source):
        import h5py

        self.path = path
        self._h5 = h5py.File(path, "w")
        self._locs = self._h5.create_dataset("locs", shape=(0,), maxshape=(None,),
                                             dtype=PICASSO_DTYPE, chunks=(4096,))
        self.meta = {"Byte Order": "<", "Data Type": "float32", "Height": int(height),
                     "Width": int(width), "Pixelsize": float(pixel_size_nm),
                     "Generated by": "smlm_tfdiff analyze", "Source": os.path.basename(source)}
        self.frames = 0

    def write(self, locs):
        n = len(locs)
        if n:
            start = self._locs.shape[0]
            self._locs.resize((start + n,))
            self._locs[start:] = locs

    def close(self):
        if self._h5 is None:
            return
        self._h5.close()
        self._h5 = None
        self.meta["Frames"] = int(self.frames)
        yaml_path = os.path.splitext(self.path)[0] + ".yaml"
        with open(yaml_path, "w") as f:
            for key, value in self.meta.items():
                text = f"'{value}'" if isinstance(value, str) and ":" in value else value
                f.write(f"{key}: {text}\n")


def save_png(path, image, title, label, cmap="magma"):
    """A rendered HR image with a colour bar (robust 99.5th-percentile contrast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(image, np.float64)
    top = np.percentile(image, 99.5) if np.any(image > 0) else 1.0
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(image.shape[1], 1) + 0.5))
    shown = ax.imshow(image, cmap=cmap, vmin=0.0, vmax=max(top, 1e-12), interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)
    fig.savefig(path, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)
