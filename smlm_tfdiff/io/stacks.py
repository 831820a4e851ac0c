"""Files microscopists use: TIFF stacks in (streamed), localization tables and image stacks out.

Every writer writes into a staging folder; `OutputSet.commit()` puts it in place of the result
folder at once, and an error before that leaves no output file behind (no half-written results).
"""

import csv
import json
import os
import shutil
import tempfile
from typing import Iterator, Tuple

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")

THUNDERSTORM_COLUMNS = ("id", "frame", "x [nm]", "y [nm]", "sigma [nm]", "intensity [photon]",
                        "offset [photon]", "bkgstd [photon]", "uncertainty_xy [nm]")
# Extra columns after ThunderSTORM's (ThunderSTORM and most readers keep unknown columns).
# uncertainty_is_crlb: 1 where uncertainty_* hold the CRLB (an analysis without psi,
# num_samples 0), 0 where they hold psi's posterior std. uncertainty_raw_xy: psi's own spread (or the
# CRLB) before the model's calibration scale (uncertainty.scale); equal to uncertainty_xy without one.
EXTRA_COLUMNS = ("uncertainty_x [nm]", "uncertainty_y [nm]", "detection_fraction", "crlb_xy [nm]",
                 "uncertainty_is_crlb", "uncertainty_raw_xy [nm]")

# Picasso's columns, then `flags` (bits, PICASSO_FLAGS). Picasso's load_locs drops, without a word,
# rows with NaN anywhere, negative x, y, lpx, lpy, photons, sx, sy, and x >= Width, y >= Height
# (picasso.lib.ensure_sanity): no row written here is dropped, the flags say what was filled in.
PICASSO_DTYPE = np.dtype([("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"),
                          ("sx", "f4"), ("sy", "f4"), ("bg", "f4"), ("lpx", "f4"), ("lpy", "f4"),
                          ("flags", "u1")])
PICASSO_FLAGS = {
    1: "lpx/lpy are the CRLB (crlb_xy): no posterior sample of psi held this localization, or the "
       "analysis ran without psi (num_samples 0)",
    2: "lpx/lpy are the PSF width (sx): no posterior sample held it and no CRLB could be "
       "computed (photometry failed or the position lies outside its tile)",
    4: "photons and bg are 0: the photometry failed (too few pixels around the localization)",
    8: "photons is 0: the photometry fit gave a negative intensity",
    16: "x or y moved to 0: the localization lies within half a pixel of the top / left edge "
        "(Picasso's pixel centres are at integers)",
}


class StackError(ValueError):
    """An input stack that cannot be analyzed (the message names the problem and the fix)."""


class _TifffileErrors:
    """Collects what tifffile logs at ERROR level (a broken page chain, metadata that does not fit
    the data: signs of a truncated or damaged file) instead of letting it reach stderr
    unexplained."""

    def __enter__(self):
        import logging

        self.messages = []
        self._logger = logging.getLogger("tifffile")
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.messages.append(record.getMessage())

        self._handler = _Handler(logging.ERROR)
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate


class _Segment:
    """Frames [n, H, W] of one series: read page by page, from a contiguous block of the file
    (memory-mapped), or decoded whole once (into a temporary memory-mapped file)."""

    def __init__(self, path, num_frames, height, width, pages=None, block=None, series=None):
        self.path, self.num_frames = path, int(num_frames)
        self.height, self.width = height, width
        self._pages, self._block, self._series, self._data = pages, block, series, None

    def read(self, lo, hi):
        if self._pages is not None:
            out = []
            for i in range(lo, hi):
                try:
                    out.append(self._pages[i].asarray())
                except Exception as err:  # noqa: BLE001 - any decoder error: a damaged page.
                    raise StackError(_unreadable(self.path, i, err)) from None
            return np.stack(out)
        if self._data is None:
            if self._block is not None:
                offset, dtype = self._block
                self._data = np.memmap(self.path, dtype=dtype, mode="r", offset=offset,
                                       shape=(self.num_frames, self.height, self.width))
            else:
                try:
                    self._data = self._series.asarray(out="memmap").reshape(
                        (self.num_frames, self.height, self.width))
                except Exception as err:  # noqa: BLE001
                    raise StackError(_unreadable(self.path, None, err)) from None
        return self._data[lo:hi]

    def close(self):
        self._data = None


def _unreadable(path, index, err):
    where = f"frame {index + 1} (1-based)" if index is not None else "the image data"
    return (f"{path}: {where} cannot be read ({type(err).__name__}: {err}); the file is damaged "
            "or truncated: copy or export it again (or pass --allow_partial to analyze the "
            "frames before the damage, when the damage is at the end of the file)")


class TiffStack:
    """A TIFF / OME-TIFF / ImageJ stack of 2-D frames, read in batches (never all at once).

    Singleton dimensions are dropped; what remains must be (frames, Y, X) or (Y, X).

    Every frame, or a clear error: the frame count is checked against every source the file offers
    (tifffile's series, its pages and where each page's data lie, ImageJ and tifffile shape
    metadata, and what tifffile logs about a broken page chain). A truncated or damaged file raises
    StackError naming the counts, unless allow_partial: then only the frames before the damage are
    read, num_frames is their number and `loss` describes what was left out.

    Several series (e.g. positions, or stacks appended to one file): series=None refuses them,
    "all" reads all one after the other as one movie (same frame size), an int reads that series.
    """

    def __init__(self, path, allow_partial=False, series=None):
        import tifffile

        self.path = str(path)
        self.allow_partial = bool(allow_partial)
        self.series_choice = series
        self.loss = None  # Set when allow_partial left frames out: dict for the summary.
        self.notes = []  # What the caller should tell the user (stderr, summary).
        self._segments = []
        if not os.path.exists(self.path):
            raise StackError(f"{self.path}: no such file; check the path")
        if os.path.isdir(self.path):
            raise StackError(f"{self.path} is a folder; pass TIFF files (or use a folder as input "
                             "only where a list of stacks is accepted)")
        with _TifffileErrors() as errors:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except (tifffile.TiffFileError, ValueError, OSError) as err:
                raise StackError(f"{self.path} is not a readable TIFF file ({err}); analyze takes "
                                 "TIFF / OME-TIFF stacks: convert the movie to TIFF first; if it "
                                 "is a TIFF, it is damaged: copy or export it again") from None
            try:
                self._inspect(tifffile, errors)
            except StackError:
                self.close()
                raise
            except Exception as err:  # noqa: BLE001 - tifffile on a damaged file: name the file.
                self.close()
                raise StackError(f"{self.path}: cannot be read as an image stack "
                                 f"({type(err).__name__}: {err}); the file is damaged or not a "
                                 "stack: copy or export it again") from None

    # ----------------------------------------------------------------------------- inspection
    def _frames_of(self, series, tifffile, index, count):
        """(frames, height, width) of one series, or StackError (colour, wrong dimensions)."""
        shape, axes = tuple(series.shape), series.axes
        label = f" (series {index})" if count > 1 else ""
        rgb = series.pages[0] is not None and series.pages[0].photometric in (
            tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.PALETTE)
        if "S" in axes and shape[axes.index("S")] > 1 and rgb:
            k = shape[axes.index("S")]
            hint = ""
            if k in (3, 4):
                move = ("" if axes.index("S") == 0 else
                        f"data = numpy.moveaxis(data, {axes.index('S')}, 0); ")
                hint = (f" If it is a {k}-frame grayscale stack that was saved as RGB (tifffile "
                        "and other writers tag stacks of 3 or 4 frames as RGB unless told "
                        "otherwise), save it again as grayscale: data = tifffile.imread(path); "
                        f"{move}tifffile.imwrite(path, data, photometric='minisblack').")
            raise StackError(f"{self.path}{label}: tifffile reads the frames as colour images "
                             f"with {k} colour samples (axes {axes}, shape {shape}).{hint} "
                             "analyze takes single-channel camera frames: if these are real "
                             "colour channels, export one channel as a grayscale stack")
        kept = [n for n in shape[:-2] if n != 1]
        if len(kept) > 1 or len(shape) < 2:
            raise StackError(f"{self.path}{label}: wrong dimensionality, axes {axes} shape "
                             f"{shape}; analyze takes a time series of 2-D frames (T, Y, X): "
                             "split channels / z-planes into separate stacks first")
        n, h, w = (int(kept[0]) if kept else 1), int(shape[-2]), int(shape[-1])
        if n == 0 or h == 0 or w == 0:
            raise StackError(f"{self.path}{label}: empty stack (shape {shape})")
        return n, h, w

    def _select(self, described):
        """Indices of the series to read (module doc of the class: series)."""
        count = len(described)
        if count == 1:
            return [0]
        listing = ", ".join(f"series {k}: {n} frames of {h}x{w}"
                            for k, (n, h, w) in enumerate(described))
        choice = self.series_choice
        if choice is None:
            raise StackError(f"{self.path} holds {count} image series ({listing}); analyze "
                             "reads one movie: pass --series all to analyze them one after the "
                             "other as one movie (frames numbered on across series), --series K "
                             "for series K only, or split the file")
        if choice == "all":
            sizes = {(h, w) for _, h, w in described}
            if len(sizes) > 1:
                raise StackError(f"{self.path}: --series all needs one frame size, but the "
                                 f"series differ ({listing}); pass --series K for one of them")
            return list(range(count))
        k = int(choice)
        if not 0 <= k < count:
            raise StackError(f"{self.path}: --series {k} does not exist ({listing})")
        return [k]

    def _inspect(self, tifffile, errors):
        """Sets num_frames, height, width, dtype and the segments to read, or raises StackError."""
        tif = self._tif
        all_series = list(tif.series)
        num_pages = len(tif.pages)  # Loads the whole page chain (errors are collected).
        if not all_series:
            raise StackError(f"{self.path}: the TIFF holds no images (empty stack)")
        if self.series_choice not in (None, "all") and len(all_series) == 1:
            if int(self.series_choice) != 0:
                raise StackError(f"{self.path} holds one series; --series "
                                 f"{self.series_choice} does not exist")
        described = [self._frames_of(s, tifffile, k, len(all_series))
                     for k, s in enumerate(all_series)]
        chosen = self._select(described)
        if len(chosen) > 1:
            self.notes.append(f"{len(chosen)} series analyzed one after the other as one movie "
                              f"(frames per series: {[described[k][0] for k in chosen]})")
        self.height, self.width = described[chosen[0]][1:]
        self.dtype = all_series[chosen[0]].dtype
        self.series_frames = [described[k][0] for k in chosen]
        size = os.path.getsize(self.path)

        # What each source says the file holds, and what can be read of it.
        declared = {"image series": sum(self.series_frames)}
        single = len(all_series) == 1
        if single and tif.is_imagej and (tif.imagej_metadata or {}).get("images"):
            declared["ImageJ metadata"] = int(tif.imagej_metadata["images"])
        shaped = tif.shaped_metadata or ()
        if shaped and (single or len(shaped) == len(all_series)):
            per = [int(np.prod(m["shape"])) // (self.height * self.width)
                   if "shape" in m else None for m in shaped]
            picked = per if single else [per[k] for k in chosen]
            if all(p is not None for p in picked):
                declared["tifffile shape metadata"] = sum(picked)
        if single:
            declared["pages (IFDs)"] = num_pages
        claimed = max(v for k, v in declared.items() if k != "pages (IFDs)")

        plans = [self._plan(all_series[k], described[k][0], size) for k in chosen]
        readable = 0
        for (n, _, _), plan in zip((described[k] for k in chosen), plans):
            readable += plan[0]
            if plan[0] < n:
                break  # Frames after damage are not read (frame numbers stay those of the file).
        if single and claimed > readable:
            # tifffile's series stops early (a broken page chain): the pages it did find, or the
            # contiguous block ImageJ / tifffile wrote, may hold more of the declared frames.
            best = max((self._fallback_page_plan(size), self._fallback_block_plan(claimed, size)),
                       key=lambda p: p[0])
            if best[0] > readable:
                plans, readable = [best], best[0]
        damaged = bool(errors.messages) or readable < claimed
        if single and "pages (IFDs)" in declared and not damaged:
            pages_ok = num_pages >= claimed or all_series[0].dataoffset is not None
            damaged = not pages_ok
        if damaged:
            counts = "; ".join(f"{k}: {v}" for k, v in declared.items())
            logged = ""
            if errors.messages:
                unique = list(dict.fromkeys(m.split("> ", 1)[-1] for m in errors.messages))
                logged = " tifffile reported: " + "; ".join(unique[:3]) + "."
            what = (f"it declares {claimed} frames but only {readable} can be read"
                    if readable < claimed else
                    f"{readable} frame(s) can be read, but the file structure is broken, so "
                    "frames after them may be missing")
            if not self.allow_partial:
                fix = (f"pass --allow_partial to analyze the {readable} readable frames (the "
                       "loss is recorded in the summary)" if readable else
                       "no frame can be read")
                raise StackError(f"{self.path}: truncated or damaged TIFF: {what} ({counts})."
                                 f"{logged} Copy or export the file again, or {fix}")
            if readable == 0:
                raise StackError(f"{self.path}: truncated or damaged TIFF: {what} ({counts})."
                                 f"{logged} No frame can be read: copy or export it again")
            self.loss = {"frames_declared": int(claimed), "frames_readable": int(readable),
                         # None: the file does not say how many frames it held.
                         "frames_lost": int(claimed - readable) if claimed > readable else None,
                         "sources": declared,
                         "tifffile_errors": list(dict.fromkeys(errors.messages))[:10]}
            lost = (f"{claimed - readable} lost" if claimed > readable else
                    "an unknown number lost")
            self.notes.append(f"truncated or damaged file: analyzing the {readable} readable of "
                              f"{claimed} declared frames ({lost}; {counts})." + logged)
        self._segments = [p[1] for p in plans if p[0] > 0]
        self._starts = np.cumsum([0] + [s.num_frames for s in self._segments])
        self.num_frames = int(self._starts[-1])

    @staticmethod
    def _inside(page, size):
        if page is None:
            return False
        offsets, counts = page.dataoffsets, page.databytecounts
        return bool(len(offsets)) and all(o > 0 and o + c <= size for o, c in zip(offsets, counts))

    def _plan(self, series, n, size):
        """(frames that can be read, _Segment) for one series."""
        h, w = self.height, self.width
        pages = series.pages
        if len(pages) == n and n > 1:
            ok = 0
            for page in pages:
                if not self._inside(page, size):
                    break
                ok += 1
            return ok, _Segment(self.path, ok, h, w, pages=pages)
        if series.dataoffset is not None:  # Contiguous, uncompressed: a memory-mappable block.
            itemsize = np.dtype(series.dtype).itemsize
            ok = int(min(n, max(0, size - series.dataoffset) // (h * w * itemsize)))
            return ok, _Segment(self.path, ok, h, w, block=(series.dataoffset,
                                                           self._file_dtype(series.dtype)))
        ok = n if all(self._inside(p, size) for p in pages) else 0
        return ok, _Segment(self.path, ok, h, w, series=series)

    def _file_dtype(self, dtype):
        return np.dtype(dtype).newbyteorder(self._tif.byteorder)

    def _fallback_page_plan(self, size):
        """The leading pages of the file that hold frames of this size with data in the file."""
        good = []
        for page in self._tif.pages:
            shape = getattr(page, "shape", None)
            if (page is None or tuple(s for s in (shape or ()) if s != 1) != (self.height,
                                                                              self.width)
                    or not self._inside(page, size)):
                break
            good.append(page)
        return len(good), _Segment(self.path, len(good), self.height, self.width, pages=good)

    def _fallback_block_plan(self, claimed, size):
        """ImageJ / tifffile write uncompressed stacks as one contiguous block after the first
        page's data offset: the whole frames of it that lie in the file."""
        page = self._tif.pages[0]
        none = (0, None)
        if page is None or page.compression != 1 or len(page.dataoffsets) == 0:
            return none
        itemsize = np.dtype(page.dtype).itemsize
        frame_bytes = self.height * self.width * itemsize
        offset = int(page.dataoffsets[0])
        if int(sum(page.databytecounts)) != frame_bytes or not page.is_contiguous:
            return none
        if not (self._tif.is_imagej or self._tif.is_shaped):
            return none  # Contiguity is only known for the writers that declare it.
        ok = int(min(claimed, max(0, size - offset) // frame_bytes))
        return ok, _Segment(self.path, ok, self.height, self.width,
                            block=(offset, self._file_dtype(page.dtype)))

    # -------------------------------------------------------------------------------- reading
    def batches(self, size, start=0) -> Iterator[Tuple[int, np.ndarray]]:
        """Yields (first frame index, frames [b, H, W] float32), from frame `start` on."""
        for lo in range(start, self.num_frames, size):
            hi = min(lo + size, self.num_frames)
            yield lo, self.read(lo, hi)

    def read(self, lo, hi) -> np.ndarray:
        parts = []
        for k, seg in enumerate(self._segments):
            a, b = max(lo, self._starts[k]), min(hi, self._starts[k + 1])
            if a < b:
                try:
                    parts.append(np.asarray(seg.read(a - self._starts[k], b - self._starts[k]),
                                            np.float32))
                except StackError:
                    raise
                except Exception as err:  # noqa: BLE001 - e.g. mmap of a file that shrank.
                    raise StackError(_unreadable(self.path, a, err)) from None
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return data.reshape((hi - lo, self.height, self.width))

    def close(self):
        for seg in self._segments:
            seg.close()
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


class OutputError(ValueError):
    """An output folder that cannot be written, or that holds results and would be overwritten."""


def output_folders(paths):
    """Input paths -> one output folder name each, never the same for two distinct files: the stack
    name (stack_name) where it is unique, else the stack name prefixed with as many parent folder
    names as make it unique (a/movie.tif, b/movie.tif -> a_movie, b_movie). The same file given
    twice (after resolving links) is kept once. Returns [(path, folder name)] in input order."""
    seen, unique = set(), []
    for path in paths:
        real = os.path.realpath(str(path))
        if real not in seen:
            seen.add(real)
            unique.append((str(path), real))
    names = {}
    for path, real in unique:
        names.setdefault(stack_name(path), []).append((path, real))
    out = {}
    for name, group in names.items():
        if len(group) == 1:
            out[group[0][0]] = name
            continue
        parts = [real.split(os.sep)[:-1] for _, real in group]
        depth = 1
        while True:
            labels = ["_".join(p[-depth:] + [name]) if depth <= len(p) else None for p in parts]
            if None not in labels and len(set(labels)) == len(labels):
                break
            if depth > max(len(p) for p in parts):  # Same folder, e.g. movie.tif + movie.tiff.
                labels = [os.path.basename(real).replace(".", "_") for _, real in group]
                break
            depth += 1
        for (path, _), label in zip(group, labels):
            out[path] = label
    return [(path, out[path]) for path, _ in unique]


def check_output_dir(out_dir, overwrite=False):
    """OutputError if out_dir is a file, or a folder with files in it and not overwrite."""
    out_dir = str(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"output folder {out_dir} exists and is a file; choose another --out")
    if os.path.isdir(out_dir):
        held = sorted(os.listdir(out_dir))
        if held and not overwrite:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise OutputError(f"output folder {out_dir} already holds results ({shown}); "
                              "refusing to overwrite them: pass --overwrite to replace the "
                              "folder whole, or choose another --out")


class OutputSet:
    """Files written to a staging folder beside `out_dir`, `.<name>.partial`; commit() puts it in
    place of out_dir (an earlier out_dir is replaced whole, with overwrite=True only: no mix of
    two runs). An error before commit leaves out_dir as it was and removes the staging folder.

    Resuming: with a resume_key (a string fixing the input and every setting), checkpoint() records
    after each finished batch where every tracked writer stands, with the caller's state and
    arrays. A run that was killed (or interrupted: abort(keep=True)) leaves the staging folder; a
    later OutputSet with the same key resumes from it (`resumed`: the caller's state, `arrays`),
    and the writers cut their files back to the checkpoint. A staging folder with another key is
    removed (`discarded` says so). A lock keeps two runs out of one staging folder."""

    STATE = "checkpoint.json"

    def __init__(self, out_dir, overwrite=False, resume_key=None):
        self.out_dir = os.path.abspath(str(out_dir))
        self.overwrite = overwrite
        self.resume_key = resume_key
        self.resumed, self.arrays, self.discarded = None, {}, False
        self._open, self._lock = [], None
        check_output_dir(self.out_dir, overwrite)
        parent, name = os.path.split(self.out_dir)
        self.staging = os.path.join(parent, f".{name}.partial")
        try:
            os.makedirs(parent, exist_ok=True)
            if os.path.isdir(self.staging):
                self._take_lock()
                state = self._read_state()
                if resume_key is not None and state is not None and state["key"] == resume_key:
                    self.resumed = state
                    with np.load(os.path.join(self.staging, state["arrays"])) as z:
                        self.arrays = {k: z[k] for k in z.files}
                else:
                    self._release_lock()
                    shutil.rmtree(self.staging)
                    self.discarded = True
            if not os.path.isdir(self.staging):
                os.makedirs(self.staging)
                self._take_lock()
        except OSError as err:
            raise OutputError(f"cannot write to the output folder {self.out_dir} "
                              f"({err.strerror or err}); choose a writable --out") from None

    def _take_lock(self):
        import fcntl

        self._lock = open(os.path.join(self.staging, ".lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise OutputError(f"another run is writing {self.out_dir} (its files are in "
                              f"{self.staging}); wait for it or choose another --out") from None

    def _release_lock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _read_state(self):
        try:
            with open(os.path.join(self.staging, self.STATE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def writer_state(self, index):
        """The checkpointed position of the index-th tracked writer (None when not resuming)."""
        return None if self.resumed is None else self.resumed["writers"][index]

    def path(self, name) -> str:
        return os.path.join(self.staging, name)

    def track(self, handle):
        self._open.append(handle)
        return handle

    def checkpoint(self, state, arrays):
        """Record that everything written so far is final: the writers' positions, `state`
        (JSON-able) and `arrays` (dict of NumPy arrays). Atomic: a kill leaves the previous or
        this checkpoint."""
        positions = [handle.position() for handle in self._open]
        tag = int(state.get("frames_done", 0))
        name = f"checkpoint-{tag}.npz"
        tmp = os.path.join(self.staging, f".{name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, os.path.join(self.staging, name))
        record = {"key": self.resume_key, "writers": positions, "arrays": name, **state}
        tmp = os.path.join(self.staging, f".{self.STATE}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(self.staging, self.STATE))
        for old in os.listdir(self.staging):
            if old.startswith("checkpoint-") and old.endswith(".npz") and old != name:
                os.remove(os.path.join(self.staging, old))

    def _release_all(self):
        for handle in self._open:
            try:
                getattr(handle, "release", handle.close)()
            except Exception:  # noqa: BLE001 - closing on the error path must not mask the error.
                pass
        self._open = []

    def commit(self):
        for handle in self._open:  # Errors here (e.g. a full disk) abort the set.
            handle.close()
        self._open = []
        for name in os.listdir(self.staging):  # The resume state is not a result.
            if name in (self.STATE, ".lock") or name.startswith(("checkpoint-", ".checkpoint")):
                os.remove(os.path.join(self.staging, name))
        check_output_dir(self.out_dir, self.overwrite)  # Another process may have written it.
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(self.staging, 0o777 & ~umask)
        parent, name = os.path.split(self.out_dir)
        old = None
        if os.path.isdir(self.out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(self.out_dir, os.path.join(old, name))
        os.replace(self.staging, self.out_dir)
        self._release_lock()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return [os.path.join(self.out_dir, n) for n in sorted(os.listdir(self.out_dir))]

    def abort(self, keep=False):
        """keep: leave the staging folder for a later resume (an interrupted run)."""
        self._release_all()
        if not keep:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            # Interrupted (Ctrl-C, SIGTERM): keep what the last checkpoint holds for a resume.
            self.abort(keep=issubclass(exc_type, KeyboardInterrupt)
                       and self._read_state() is not None)


class _AppendFile:
    """A binary file appended to, cut back to a checkpointed size on resume."""

    def __init__(self, path, resume_bytes=None):
        self.path = path
        if resume_bytes is None:
            self._file = open(path, "wb")
        else:
            os.truncate(path, int(resume_bytes))
            self._file = open(path, "ab")

    def write(self, data: bytes):
        self._file.write(data)

    def size(self):
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def close(self):
        self._file.close()


class TiffStackWriter:
    """Appends float32 [b, H, W] frames to a (Big)TIFF stack. The frames go to a raw file beside it
    first (cut back on resume: OutputSet), and into the TIFF on close()."""

    def __init__(self, path, resume=None):
        self.path = path
        self.frames = 0 if resume is None else int(resume["frames"])
        self.shape = None if resume is None or resume["shape"] is None else tuple(resume["shape"])
        nbytes = None if resume is None else self.frames * int(np.prod(self.shape or (0,))) * 4
        self._raw = _AppendFile(path + ".raw", nbytes)

    def write(self, frames):
        frames = np.ascontiguousarray(frames, dtype="<f4")
        self.shape = tuple(frames.shape[1:])
        self._raw.write(frames.tobytes())
        self.frames += len(frames)

    def position(self):
        self._raw.size()
        return {"frames": self.frames, "shape": None if self.shape is None else list(self.shape)}

    def release(self):
        self._raw.close()

    def close(self):
        import tifffile

        self._raw.close()
        raw = self.path + ".raw"
        data = (np.memmap(raw, dtype="<f4", mode="r", shape=(self.frames,) + self.shape)
                if self.frames else np.zeros((0,), np.float32))
        with tifffile.TiffWriter(self.path, bigtiff=True) as writer:
            for frame in data:
                writer.write(np.asarray(frame, np.float32), contiguous=True,
                             photometric="minisblack")
        del data
        os.remove(raw)


class ThunderstormWriter:
    """ThunderSTORM CSV: THUNDERSTORM_COLUMNS (+ EXTRA_COLUMNS), frames 1-based, nm and photons."""

    def __init__(self, path, resume=None):
        if resume is None:
            self._file = open(path, "w", newline="")
            self.rows = 0
        else:
            os.truncate(path, int(resume["bytes"]))
            self._file = open(path, "a", newline="")
            self.rows = int(resume["rows"])
        self._csv = csv.writer(self._file, quoting=csv.QUOTE_NONNUMERIC)
        if resume is None:
            self._csv.writerow(THUNDERSTORM_COLUMNS + EXTRA_COLUMNS)

    def write(self, table):
        """table: dict of equal-length arrays keyed by column name."""
        n = len(table["id"])
        columns = [np.asarray(table[c]) for c in THUNDERSTORM_COLUMNS + EXTRA_COLUMNS]
        for i in range(n):
            self._csv.writerow([int(col[i]) if k < 2 else float(col[i])
                                for k, col in enumerate(columns)])
        self.rows += n

    def position(self):
        self._file.flush()
        return {"bytes": os.fstat(self._file.fileno()).st_size, "rows": self.rows}

    def close(self):
        self._file.close()


class PicassoWriter:
    """Picasso HDF5 (`/locs`, pixel units with pixel centres at integer coordinates, frames
    0-based, PICASSO_DTYPE) and its YAML metadata (one YAML document, written with PyYAML, as
    Picasso's load_info reads it: any file name round-trips). The records go to a raw file first
    (cut back on resume: OutputSet); HDF5 and YAML are written on close().

    metadata: more entries for the YAML (camera and analysis settings); dtype: the input movie's
    ("Data Type", as Picasso's Localize records it)."""

    def __init__(self, path, height, width, pixel_size_nm, source, dtype="float32",
                 metadata=None, resume=None):
        self.path = path
        self.rows = 0 if resume is None else int(resume["rows"])
        self.frames = 0 if resume is None else int(resume["frames"])
        self._raw = _AppendFile(path + ".raw", None if resume is None
                                else self.rows * PICASSO_DTYPE.itemsize)
        self.meta = {"Byte Order": "<", "Data Type": str(np.dtype(dtype)), "Height": int(height),
                     "Width": int(width), "Pixelsize": float(pixel_size_nm),
                     "Generated by": "smlm_tfdiff analyze", "Source": os.path.basename(source),
                     "Flags": {int(k): v for k, v in PICASSO_FLAGS.items()}}
        self.meta.update(metadata or {})

    def write(self, locs):
        locs = np.asarray(locs, PICASSO_DTYPE)
        self._raw.write(locs.tobytes())
        self.rows += len(locs)

    def position(self):
        self._raw.size()
        return {"rows": self.rows, "frames": self.frames}

    def release(self):
        self._raw.close()

    def close(self):
        import h5py
        import yaml

        self._raw.close()
        raw = self.path + ".raw"
        locs = np.fromfile(raw, dtype=PICASSO_DTYPE, count=self.rows)
        with h5py.File(self.path, "w") as f:
            f.create_dataset("locs", data=locs, maxshape=(None,), chunks=(4096,))
        os.remove(raw)
        self.meta["Frames"] = int(self.frames)
        yaml_path = os.path.splitext(self.path)[0] + ".yaml"
        with open(yaml_path, "w", encoding="utf-8") as f:
            yaml.safe_dump_all([_plain(self.meta)], f, default_flow_style=False, sort_keys=False,
                               allow_unicode=True)


def _plain(value):
    """NumPy scalars and tuples -> plain Python values that yaml.safe_dump writes."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, int) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


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
