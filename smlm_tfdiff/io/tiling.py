"""Tiling of frames of any size into training-size tiles, and seamless stitching.

A frame [H, W] (LR pixels) is padded by `pad` pixels on every side (and up to at least one tile) with
the frame's median, i.e. background, never reflected signal, then cut into tiles of the training
size [h, w] that overlap by at least `overlap` pixels; the last tile in each direction is aligned
with the padded frame's edge. Padding and overlap matter because a model trained on emitters in a
central disc (the paper preset) only trusts the centre of its field: `coverage_tiling` picks both
so that every frame pixel lies within that trusted radius of some tile centre in x and in y.

Per-tile HR maps are stitched with separable sin^2 windows that peak at each tile's centre and fall
towards (never to) zero at its edges, so the blend is continuous (no seams) and each pixel is
dominated by the tiles that see it with the most context. Variances are stitched as a mixture:
var = sum w (v + m^2) / sum w - mean^2.
"""

import dataclasses
import functools
from typing import List, Tuple

import numpy as np


def _starts(size: int, tile: int, overlap: int) -> List[int]:
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _window(length: int) -> np.ndarray:
    """1-D sin^2 window over `length` pixel centres: peak 1 at the centre, > 0 everywhere."""
    return np.sin(np.pi * (np.arange(length) + 0.5) / length) ** 2


def coverage_tiling(config):
    """(pad, overlap) in LR pixels so that every pixel of any frame is within the trusted radius
    of a tile centre: the training disc's radius for region 'disc', else the field minus margin."""
    half = min(config.lr_shape) / 2.0
    trusted = config.disc_radius if config.region == "disc" else half - config.margin
    trusted = float(np.clip(trusted, 1.0, half))
    # Within `trusted` of a centre in x and in y (the square around the trained disc): full
    # Euclidean coverage of the disc would need stride trusted * sqrt(2), about 2.5x the tiles,
    # for little gain, since phi's receptive field spans the whole tile.
    pad = int(np.ceil(half - trusted - 1e-9))
    stride = max(1, int(np.floor(2.0 * trusted + 1e-9)))
    return pad, max(0, min(config.lr_shape) - stride)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tiles of size `tile` (h, w) covering a frame of size `frame` (H, W), LR pixels."""

    frame: Tuple[int, int]
    tile: Tuple[int, int]
    overlap: int = 4
    upsample: int = 4
    pad: int = 0

    def __post_init__(self):
        if min(self.tile) < 1 or min(self.frame) < 1:
            raise ValueError(f"frame and tile sizes must be positive (got {self.frame}, {self.tile})")
        if not 0 <= self.overlap < min(self.tile):
            raise ValueError(f"overlap must be in [0, {min(self.tile)}) LR pixels for {self.tile} "
                             f"tiles (got {self.overlap})")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 LR pixels (got {self.pad})")

    @property
    def padded(self) -> Tuple[int, int]:
        """Frame size after padding by `pad` on each side and up to at least one tile."""
        return (max(self.frame[0] + 2 * self.pad, self.tile[0]),
                max(self.frame[1] + 2 * self.pad, self.tile[1]))

    @functools.cached_property
    def origins(self) -> List[Tuple[int, int]]:
        """(row, col) of each tile's top-left corner in the padded frame, LR pixels (computed
        once per grid: a 256x256 frame has ~16,000 windows of 6 px, and to_tile reads one)."""
        rows = _starts(self.padded[0], self.tile[0], self.overlap)
        cols = _starts(self.padded[1], self.tile[1], self.overlap)
        return [(r, c) for r in rows for c in cols]

    def __len__(self):
        return len(self.origins)

    def _origins_of(self, tiles=None) -> List[Tuple[int, int]]:
        """The origins of the tiles with indices `tiles` (any int array), all with None."""
        if tiles is None:
            return self.origins
        return [self.origins[int(k)] for k in np.asarray(tiles).reshape(-1)]

    def cut(self, frames: np.ndarray, tiles=None) -> np.ndarray:
        """frames [B, H, W] -> tiles [B * n_tiles, h, w] (frame-major); tiles: indices of the
        tiles to cut (default all), [B * len(tiles), h, w] then."""
        frames = np.asarray(frames)
        b, h, w = frames.shape
        if (h, w) != tuple(self.frame):
            raise ValueError(f"frames are {h}x{w}, this grid is for {self.frame[0]}x{self.frame[1]}")
        ph, pw = self.padded
        if (ph, pw) != (h, w):
            fill = np.median(frames.reshape(b, -1), axis=1)[:, None, None]
            padded = np.broadcast_to(fill, (b, ph, pw)).astype(frames.dtype)
            p = self.pad
            padded[:, p:p + h, p:p + w] = frames
            frames = padded
        th, tw = self.tile
        origins = self._origins_of(tiles)
        if not origins:
            return np.zeros((0, th, tw), frames.dtype)
        cut = [frames[:, r:r + th, c:c + tw] for r, c in origins]
        return np.stack(cut, axis=1).reshape((-1, th, tw))

    def cut_hr(self, images: np.ndarray, fill: float = 0.0, tiles=None) -> np.ndarray:
        """HR maps of whole frames [B, u*H, u*W] -> their tiles [B * n_tiles, u*h, u*w]
        (frame-major), the padding filled with `fill` (0: an empty KDE). Windows of a whole-field
        model's estimate, which phi computed on the whole frame. tiles: indices of the tiles to
        cut (default all), [B * len(tiles), u*h, u*w] then."""
        images = np.asarray(images)
        u = self.upsample
        b, h, w = images.shape
        if (h, w) != (u * self.frame[0], u * self.frame[1]):
            raise ValueError(f"maps are {h}x{w}, this grid's frames are {u * self.frame[0]}x"
                             f"{u * self.frame[1]} HR pixels")
        ph, pw = u * self.padded[0], u * self.padded[1]
        if (ph, pw) != (h, w):
            padded = np.full((b, ph, pw), fill, images.dtype)
            p = u * self.pad
            padded[:, p:p + h, p:p + w] = images
            images = padded
        th, tw = u * self.tile[0], u * self.tile[1]
        origins = self._origins_of(tiles)
        if not origins:
            return np.zeros((0, th, tw), images.dtype)
        cut = [images[:, u * r:u * r + th, u * c:u * c + tw] for r, c in origins]
        return np.stack(cut, axis=1).reshape((-1, th, tw))

    def weights(self) -> np.ndarray:
        """Stitching weights [u*h, u*w] (HR), the same for every tile (module doc)."""
        u = self.upsample
        return _window(u * self.tile[0])[:, None] * _window(u * self.tile[1])[None, :]

    def stitch(self, tiles: np.ndarray, variance: np.ndarray = None, preferred=None):
        """tiles [B * n_tiles, u*h, u*w(, 1)] HR maps -> [B, u*H, u*W(, 1)] weighted blend.

        With `variance` (same shape, per-tile variances about `tiles`), returns (mean, variance)
        stitched as a mixture. preferred: optional bool [B * n_tiles]; a pixel that a preferred
        tile covers is blended from the preferred tiles alone (e.g. the windows psi sampled,
        whose neighbours hold no posterior, only phi's estimate), any other from all tiles."""
        tiles = np.asarray(tiles, np.float64)
        channel = tiles.ndim == 4
        if channel:
            tiles = tiles[..., 0]
            variance = None if variance is None else np.asarray(variance, np.float64)[..., 0]
        n = len(self)
        u = self.upsample
        th, tw = u * self.tile[0], u * self.tile[1]
        if tiles.shape[1:] != (th, tw) or tiles.shape[0] % n:
            raise ValueError(f"expected [B * {n}, {th}, {tw}] tiles (got {tiles.shape})")
        b = tiles.shape[0] // n
        tiles = tiles.reshape((b, n, th, tw))
        weights = self.weights()
        ph, pw = u * self.padded[0], u * self.padded[1]
        total = np.zeros((b, ph, pw))
        second = np.zeros((b, ph, pw)) if variance is not None else None
        norm = np.zeros((b, ph, pw))
        if variance is not None:
            variance = variance.reshape((b, n, th, tw))
        if preferred is not None:
            preferred = np.asarray(preferred, bool).reshape((b, n))
            covered = np.zeros((b, ph, pw), bool)
            for k, (r, c) in enumerate(self.origins):
                covered[:, u * r:u * r + th, u * c:u * c + tw] |= preferred[:, k, None, None]
        for k, (r, c) in enumerate(self.origins):
            sl = (slice(None), slice(u * r, u * r + th), slice(u * c, u * c + tw))
            w = np.broadcast_to(weights, (b, th, tw))
            if preferred is not None:  # Zero where a preferred tile covers, unless this is one.
                w = np.where(preferred[:, k, None, None] | ~covered[sl], w, 0.0)
            total[sl] += w * tiles[:, k]
            if variance is not None:
                second[sl] += w * (variance[:, k] + tiles[:, k] ** 2)
            norm[sl] += w
        crop = (slice(None), slice(u * self.pad, u * (self.pad + self.frame[0])),
                slice(u * self.pad, u * (self.pad + self.frame[1])))
        mean = (total / norm)[crop]
        if variance is not None:
            var = np.maximum((second / norm)[crop] - mean ** 2, 0.0)
            return (mean[..., None], var[..., None]) if channel else (mean, var)
        return mean[..., None] if channel else mean

    def stitch_over(self, base: np.ndarray, tiles, means: np.ndarray, variances: np.ndarray):
        """One frame's HR map base [u*H, u*W] with some of its tiles replaced: (mean, variance)
        [u*H, u*W] float64, where the tiles `tiles` [k] (indices) with their means and variances
        [k, u*h, u*w] cover, their blend (weights and mixture as `stitch`), elsewhere base with
        variance 0.

        The same as `stitch` of every tile, the unlisted ones cut from base with variance 0,
        with the listed ones preferred (a pixel they cover is blended from them alone): a pixel no
        listed tile covers is the blend of copies of base there. It costs what the listed tiles
        do, not what the grid does (a 256x256 frame has ~16,000 windows of 6 px)."""
        base = np.asarray(base, np.float64)
        u = self.upsample
        if base.shape != (u * self.frame[0], u * self.frame[1]):
            raise ValueError(f"base is {base.shape}, this grid's frames are "
                             f"{u * self.frame[0]}x{u * self.frame[1]} HR pixels")
        tiles = np.asarray(tiles, np.int64).reshape(-1)
        th, tw = u * self.tile[0], u * self.tile[1]
        means = np.asarray(means, np.float64).reshape((len(tiles), th, tw))
        variances = np.asarray(variances, np.float64).reshape((len(tiles), th, tw))
        ph, pw = u * self.padded[0], u * self.padded[1]
        total, second, norm = np.zeros((ph, pw)), np.zeros((ph, pw)), np.zeros((ph, pw))
        weights = self.weights()
        for (r, c), m, v in zip(self._origins_of(tiles), means, variances):
            sl = (slice(u * r, u * r + th), slice(u * c, u * c + tw))
            total[sl] += weights * m
            second[sl] += weights * (v + m * m)
            norm[sl] += weights
        crop = (slice(u * self.pad, u * (self.pad + self.frame[0])),
                slice(u * self.pad, u * (self.pad + self.frame[1])))
        total, second, norm = total[crop], second[crop], norm[crop]
        covered = norm > 0
        mean, var = base.copy(), np.zeros_like(base)
        mean[covered] = total[covered] / norm[covered]
        var[covered] = np.maximum(second[covered] / norm[covered] - mean[covered] ** 2, 0.0)
        return mean, var

    def owner(self, xy: np.ndarray) -> np.ndarray:
        """For positions (x, y) [M, 2] in frame LR pixels: index of the tile whose centre is
        nearest in x and, separately, in y (the tile that sees the most context around them)."""
        xy = np.asarray(xy, np.float64).reshape((-1, 2)) + self.pad
        rows = sorted({r for r, _ in self.origins})
        cols = sorted({c for _, c in self.origins})
        row = np.argmin(np.abs(xy[:, 1:2] - (np.array(rows) + self.tile[0] / 2)), axis=1)
        col = np.argmin(np.abs(xy[:, 0:1] - (np.array(cols) + self.tile[1] / 2)), axis=1)
        return row * len(cols) + col

    def to_tile(self, xy: np.ndarray, k: int) -> np.ndarray:
        """Frame LR positions -> LR positions in tile k."""
        r, c = self.origins[k]
        return np.asarray(xy, np.float64) + self.pad - np.array([c, r], np.float64)
