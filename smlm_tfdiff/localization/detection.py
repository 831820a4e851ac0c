"""Localizations from KDEs: LoG detection and sub-pixel refinement (scoring: localization.metrics).

Units (docs/CONVENTIONS.md): every position given or returned here is (x, y) in low-resolution (LR) pixels.
KDEs are [H, W] arrays on the HR grid (u = ``config.upsample`` times finer), indexed [row, col] =
[y, x]; HR pixel (I, J) covers LR x in [J/u, (J+1)/u); its centre is LR ((J + .5)/u, (I + .5)/u).

    detect(kde, config)                  -> [M, 2] positions (or a list of them for a batch)

Detection: maxima of the scale-normalised Laplacian of Gaussian (``skimage.feature.blob_log``,
scales min_sigma..max_sigma HR px of a DetectionConfig) above its ``threshold``: HR pixels.
The KDE kernel has one known width, so the defaults use one LoG scale, 2 HR px: it separates close
emitters better than scales >= kde_sigma, and a scale search lets the coarse scales of merged pairs
suppress the fine ones (oracle recall 0.82 at 2 HR px vs 0.72 at 2..4 before deblending). An
isolated emitter of the fixed-scale KDE (peak ~1) gives a response of ~0.43 at 2 HR px (~0.5 at
3 HR px); the default threshold 0.2 is about half an emitter.
Refinement (HR coordinates; HR pixel J has centre J + 1/2; divided by upsample at the end):
  "gaussian"  joint least-squares (Levenberg-Marquardt) fit of pixel-integrated Gaussians of width
              ``config.kde_sigma`` and the KDE scale 2 pi sigma^2 (free centre and amplitude each)
              to the union of the (2 * refine_radius + 1)^2 windows around the detections;
              detections whose windows can interact are fitted together, so resolved neighbours do
              not bias each other (groups of more than BLOCK_PEAKS, which crowded whole fields
              link into, by block sweeps that end near that joint fit: _fit_blocks). The exact
              model of the true KDE: unbiased for an isolated emitter at any sub-pixel position,
              also at the image border. The amplitude counts emitters
              (1 for an isolated emitter), so with deblend=True a peak of amplitude >= 1.25 is tried
              as two (see _deblend) and kept split when the fit says so: this resolves most merged
              pairs (oracle recall 0.99 instead of 0.82 on the paper preset). Then emitters with no
              LoG maximum of their own (a cluster smeared into a plateau by phi) are found as bumps
              of the fit residual (_add_from_residual; phi's recall 0.942 -> 0.969 on validation
              frames), and fits below half an emitter are dropped.
  "centroid"  intensity-weighted centroid in a (2 * refine_radius + 1)^2 box with fractional-pixel
              edges, re-centred on its own result until it stops moving (at most 1 HR px from the
              LoG pixel): unbiased (< 1e-3 LR px) for an isolated symmetric peak; neighbours within
              ~refine_radius + 2 kde_sigma pull it.
  "none"      the centre of the LoG maximum pixel (error up to half an HR pixel per axis).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from scipy import spatial
from scipy.sparse.csgraph import connected_components
from skimage.feature import blob_log

from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.simulation.physics.psf import pixel_integrals_numpy
from smlm_tfdiff.simulation.config import check_config
from smlm_tfdiff.validation import as_numpy

REFINE_MODES = ("gaussian", "centroid", "none")
_SQRT2 = math.sqrt(2.0)
# Multi-emitter handling of the "gaussian" refinement, amplitudes in emitters (the KDE scale is fixed):
# peaks with a fitted amplitude >= trigger are tried as two (_deblend, at most max_splits tries per
# fitted peak of a group: a budget that grows with the group, so a crowded whole field, linked into
# one group, does not run out of tries a paper frame's group never used up); residual bumps the LoG
# missed are tried as new emitters (_add_from_residual, max_adds tries per image); fits below
# keep_amplitude are dropped at the end. Tuned on validation seed 777 (never the evaluation seeds):
# docs/method.md, "Localization results of phi"; max_splits per peak since (32 per group before).
# DetectionConfig.split_trigger sets the trigger per model (wholefield_fast: 1.3).
# A split try refits the peaks whose windows can share pixels with the split parts' (split_link),
# the others' model subtracted: the cost of a try stays local instead of growing with the group.
# Groups of more than BLOCK_PEAKS peaks (a crowded whole field links into components of hundreds)
# are fitted by block sweeps (_fit_blocks) instead of one joint fit, whose normal equations grow
# with the square of the group and its pixels with the group: a 64x64 frame at 1 emitter per
# 15 px^2 spent 85% of its detection in such fits. 32 keeps every paper frame's and every
# moderately crowded window's groups fitted jointly, as before.
BLOCK_PEAKS = 32
BLOCK_SWEEPS = 3
# The peak fits (_lm) stop once a step moves no parameter by LM_STEP_TOL (HR px for positions, 1e-2
# is 0.3 nm at the seeds' pixel; emitters for amplitudes) and lowers the residual sum of squares by
# at most LM_GAIN_TOL of it. Tighter (1e-5, 1e-10) gave the same localizations on validation
# movies in 1.5x the time: fits of unresolvable split tries crawl along a flat valley until their
# iteration cap.
LM_STEP_TOL = 1e-2
LM_GAIN_TOL = 1e-4
DEBLEND_DEFAULTS = dict(trigger=1.25, min_amplitude=0.5, rss_ratio=0.5, max_splits=8,
                        max_adds=16, add_min_amplitude=0.6, keep_amplitude=0.5)
# Not a deblend option: DetectionConfig.split_offset, the split parts' start (KDE sigmas).
SPLIT_OFFSET = "offset"


# ------------------------------------------------------------------------------------ input
def _kde_batch(kde) -> Tuple[np.ndarray, bool]:
    """[H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] -> ([B, H, W] float64, batched)."""
    arr = as_numpy(kde, "kde")
    shape = arr.shape
    if arr.ndim == 2:
        arr, batched = arr[None], False
    elif arr.ndim == 3 and shape[-1] == 1:
        arr, batched = arr[None, ..., 0], False
    elif arr.ndim == 3:
        batched = True
    elif arr.ndim == 4 and shape[-1] == 1:
        arr, batched = arr[..., 0], True
    else:
        raise ValueError("kde must be [H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] "
                         f"(got shape {shape})")
    if arr.shape[1] < 3 or arr.shape[2] < 3:
        raise ValueError(f"kde images must be at least 3x3 HR pixels (got shape {shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError("kde contains NaN or Inf")
    return arr, batched


# -------------------------------------------------------------------------------- detection
def log_peaks(image, threshold, min_sigma, max_sigma, num_sigma, overlap=0.5) -> np.ndarray:
    """Integer LoG scale-space maxima of one [H, W] image: [M, 2] int (row, col) HR pixels."""
    blobs = blob_log(image, min_sigma=min_sigma, max_sigma=max_sigma, num_sigma=int(num_sigma),
                     threshold=threshold, overlap=overlap, exclude_border=False)
    if len(blobs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    peaks = np.round(blobs[:, :2]).astype(np.int64)
    # A peak found at several scales (or a plateau) is reported once.
    return np.unique(peaks, axis=0)


def _pixel_integrals(coord, num, sigma):
    """dE [M, num] and d(dE)/d(coord) [M, num] of N(coord, sigma^2) over unit pixels [j, j+1)."""
    return pixel_integrals_numpy(coord, num, sigma, with_derivative=True)


def _refine_none(image, peaks):
    xy = peaks[:, ::-1].astype(np.float64) + 0.5
    return xy, image[peaks[:, 0], peaks[:, 1]].astype(np.float64)


def _box_weights(center, radius, num):
    """Fractional overlap of pixels [j, j+1) with the box [c - r - 1/2, c + r + 1/2] and the centre
    of each overlapped part. center: [M] -> ([M, num], [M, num])."""
    lo = np.asarray(center)[:, None] - radius - 0.5
    hi = np.asarray(center)[:, None] + radius + 0.5
    j = np.arange(num, dtype=np.float64)[None, :]
    left, right = np.maximum(j, lo), np.minimum(j + 1.0, hi)
    frac = np.clip(right - left, 0.0, 1.0)
    return frac, 0.5 * (left + right)


def _refine_centroid(image, peaks, radius, max_iter=50, tol=1e-7, max_shift=1.0):
    """Iterated box centroid; the box centre stays within max_shift HR px (per axis) of the LoG
    pixel centre, where an isolated emitter always is (within 1/2 px): neighbours cannot drag it."""
    h, w = image.shape
    weights = np.maximum(image, 0.0)
    xy = peaks[:, ::-1].astype(np.float64) + 0.5
    lo, hi = xy - max_shift, xy + max_shift
    active = np.ones(len(xy), dtype=bool)
    for _ in range(max_iter):
        fx, cx = _box_weights(xy[:, 0], radius, w)
        fy, cy = _box_weights(xy[:, 1], radius, h)
        # sum_ij fy_i fx_j y_ij (cx_j, cy_i) / sum_ij fy_i fx_j y_ij
        wy = np.einsum("mi,ij->mj", fy, weights)  # [M, W]
        mass = np.einsum("mj,mj->m", wy, fx)
        sx = np.einsum("mj,mj->m", wy, fx * cx)
        sy = np.einsum("mi,ij,mj->m", fy * cy, weights, fx)
        ok = mass > 0
        new = xy.copy()
        new[ok, 0] = sx[ok] / mass[ok]
        new[ok, 1] = sy[ok] / mass[ok]
        new = np.clip(new, lo, hi)
        step = np.abs(new - xy).max(axis=1)
        xy = np.where(active[:, None], new, xy)
        active &= step > tol
        if not active.any():
            break
    return xy, image[peaks[:, 0], peaks[:, 1]].astype(np.float64)


def _lm(fun, jac, p0, lower, upper, max_iter=100):
    """Levenberg-Marquardt with box bounds (steps clipped); fun(p) -> residual [N], jac(p) -> the
    transposed Jacobian [P, N]. Returns (p, residual sum of squares). The small products use einsum,
    not BLAS: BLAS thread pools make them 10-100x slower on a busy machine."""
    p = np.clip(p0, lower, upper)
    r = fun(p)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        jt = jac(p)
        g = np.einsum("pn,n->p", jt, r)
        hess = np.einsum("pn,qn->pq", jt, jt)
        diag = np.diag(hess).copy()
        diag = np.maximum(diag, 1e-12 * max(diag.max(), 1e-300))
        while True:
            try:
                step = np.linalg.solve(hess + lam * np.diag(diag), -g)
            except np.linalg.LinAlgError:
                step = np.zeros_like(p)
            new = np.clip(p + step, lower, upper)
            r_new = fun(new)
            cost_new = float(r_new @ r_new)
            if cost_new <= cost:
                break
            lam *= 10.0
            if lam > 1e10:
                return p, cost
        moved = np.abs(new - p).max()
        gain = cost - cost_new
        p, r, cost = new, r_new, cost_new
        lam = max(lam / 10.0, 1e-12)
        if moved < 1e-9 or cost < 1e-26 or (moved < LM_STEP_TOL and gain <= LM_GAIN_TOL * cost):
            break
    return p, cost


def _fit_group(image, xy0, amp0, sigma, norm, radius):
    """Joint least-squares fit of sum_m A_m * norm * dEy_m dEx_m (HR pixel-integrated Gaussians of
    width sigma) to the union of the (2 radius + 1)^2 windows around xy0 [M, 2] (x, y) HR coords.
    Centres stay within radius + 1/2 of xy0 (in x and y); amplitudes >= 0.
    Returns (xy [M, 2], amplitudes [M])."""
    h, w = image.shape
    m = len(xy0)
    pix = np.clip(np.floor(xy0).astype(np.int64), 0, [w - 1, h - 1])
    mask = np.zeros(image.shape, dtype=bool)
    for c, r in pix:
        mask[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1] = True
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    sub = mask[r0:r1, c0:c1]
    data = image[r0:r1, c0:c1][sub]
    slack = radius + 0.5
    lower = np.concatenate([xy0[:, 0] - slack, xy0[:, 1] - slack, np.zeros(m)])
    upper = np.concatenate([xy0[:, 0] + slack, xy0[:, 1] + slack, np.full(m, np.inf)])

    def fun(p):
        ex, _ = _pixel_integrals(p[:m] - c0, c1 - c0, sigma)  # [M, w']
        ey, _ = _pixel_integrals(p[m:2 * m] - r0, r1 - r0, sigma)  # [M, h']
        return norm * np.einsum("m,mi,mj->ij", p[2 * m:], ey, ex)[sub] - data

    def jac(p):
        a = p[2 * m:]
        ex, dex = _pixel_integrals(p[:m] - c0, c1 - c0, sigma)
        ey, dey = _pixel_integrals(p[m:2 * m] - r0, r1 - r0, sigma)
        basis = norm * (ey[:, :, None] * ex[:, None, :])[:, sub]  # [M, N]
        jx = norm * a[:, None] * (ey[:, :, None] * dex[:, None, :])[:, sub]
        jy = norm * a[:, None] * (dey[:, :, None] * ex[:, None, :])[:, sub]
        return np.concatenate([jx, jy, basis])

    p0 = np.concatenate([xy0[:, 0], xy0[:, 1], amp0])
    p, _ = _lm(fun, jac, p0, lower, upper)
    return np.stack([p[:m], p[m:2 * m]], axis=1), p[2 * m:]


def group_link(radius, sigma):
    """Chebyshev distance (HR px) under which two peaks are fitted together: their windows
    ((2 radius + 1)^2) lie within 4 kernel widths of each other, so farther groups cannot bias
    each other."""
    return 2 * radius + 1 + math.ceil(4.0 * sigma)


def split_link(radius, sigma, offset):
    """Chebyshev distance (HR px) under which a peak is refitted after a split try: its window
    ((2 radius + 1)^2) can share pixels with those of the split parts, which start `offset` KDE
    sigmas from the split peak."""
    return 2 * radius + 1 + math.ceil(offset * sigma)


def block_tiles(xy0, link):
    """Block sweeps' partition of a big group: the tile [..., 2] int (x, y) of side 2 link HR px
    of each start position xy0 [..., 2] (HR px), and its colour [...] in 0..3 (the tile's parity
    in x and y). Tiles of one colour are >= 2 link apart, so their fits do not see each other."""
    tile = np.floor(np.asarray(xy0) / (2 * link)).astype(np.int64)
    return tile, tile[..., 0] % 2 + 2 * (tile[..., 1] % 2)


def tile_box(tile, link):
    """[low, high) HR px (x, y) of the peaks whose model reaches a tile's fit: the tile [..., 2]
    grown by link on every side."""
    low = tile * (2 * link) - link
    return low, low + 4 * link


def _fit_blocks(image, xy0, amp0, sigma, norm, radius, link):
    """The fit of a group of more than BLOCK_PEAKS peaks as BLOCK_SWEEPS block Gauss-Seidel
    sweeps: the peaks are partitioned into tiles (block_tiles); in each sweep the tiles of each
    colour in turn are fitted jointly (_fit_group), each against the image minus the model of
    the group's other peaks inside its tile_box, all from the state at the colour's start. Every
    centre stays within radius + 1/2 of its start, as in the joint fit. A tile fits its own
    windows only, not its kernels' tails in the neighbours' windows, so the sweeps end near the
    joint fit, not on it: ~0.02 HR px apart (median) on a crowded test field, as close to the
    truth (tests/test_batched_detection.py). Returns (xy [M, 2], amplitudes [M])."""
    xy, amp = xy0.astype(np.float64).copy(), amp0.astype(np.float64).copy()
    tile, colour = block_tiles(xy0, link)
    slack = radius + 0.5
    for _ in range(BLOCK_SWEEPS):
        for c in range(4):
            xs, az = xy.copy(), amp.copy()
            for t in np.unique(tile[colour == c], axis=0):
                idx = np.nonzero(np.all(tile == t, axis=1))[0]
                low, high = tile_box(t, link)
                near = np.all((xs >= low) & (xs < high), axis=1)
                near[idx] = False
                rest = image - _model_image(image.shape, xs[near], az[near], sigma, norm)
                fxy, famp = _fit_group(rest, xs[idx], az[idx], sigma, norm, radius)
                xy[idx] = np.clip(fxy, xy0[idx] - slack, xy0[idx] + slack)
                amp[idx] = famp
    return xy, amp


def _groups(points, link):
    """Connected components of points closer than `link` (Chebyshev distance)."""
    if len(points) == 0:
        return []
    pairs = spatial.cKDTree(points).query_pairs(link, p=np.inf, output_type="ndarray")
    adj = np.zeros((len(points), len(points)), dtype=bool)
    adj[pairs[:, 0], pairs[:, 1]] = True
    _, labels = connected_components(adj, directed=False)
    return [np.nonzero(labels == k)[0] for k in range(labels.max() + 1)]


def _model_image(shape, xy, amp, sigma, norm):
    """sum_m amp_m * norm * dEy_m dEx_m on an [H, W] grid; xy [M, 2] (x, y) HR coordinates."""
    ex, _ = _pixel_integrals(xy[:, 0], shape[1], sigma)
    ey, _ = _pixel_integrals(xy[:, 1], shape[0], sigma)
    return norm * np.einsum("m,mi,mj->ij", amp, ey, ex)


def _window(shape, xy, radius):
    c, r = np.clip(np.floor(xy).astype(np.int64), 0, [shape[1] - 1, shape[0] - 1])
    return (slice(max(r - radius, 0), min(r + radius + 1, shape[0])),
            slice(max(c - radius, 0), min(c + radius + 1, shape[1])))


def _split_direction(image, xy, amp, k, sigma, norm, radius):
    """Unit vector of the major axis of peak k's window, the other fitted peaks subtracted."""
    others = np.arange(len(xy)) != k
    win = _window(image.shape, xy[k], radius)
    patch = (image - _model_image(image.shape, xy[others], amp[others], sigma, norm))[win]
    wgt = np.maximum(patch, 0.0)
    yy, xx = np.mgrid[win] + 0.5
    dx, dy = xx - xy[k, 0], yy - xy[k, 1]
    cov = np.array([[np.sum(wgt * dx * dx), np.sum(wgt * dx * dy)],
                    [np.sum(wgt * dx * dy), np.sum(wgt * dy * dy)]])
    return np.linalg.eigh(cov)[1][:, 1]


def _refine_gaussian(image, peaks, sigma, norm, radius, merge_distance, split, find_peaks):
    xy0 = peaks[:, ::-1].astype(np.float64) + 0.5
    amp0 = np.maximum(image[peaks[:, 0], peaks[:, 1]], 1e-3)
    out_xy, out_amp = [], []
    link = group_link(radius, sigma)
    for idx in _groups(peaks, link):
        if len(idx) > BLOCK_PEAKS:
            xy, amp = _fit_blocks(image, xy0[idx], amp0[idx], sigma, norm, radius, link)
        else:
            xy, amp = _fit_group(image, xy0[idx], amp0[idx], sigma, norm, radius)
        if split is not None:
            xy, amp = _deblend(image, xy, amp, sigma, norm, radius, split)
        out_xy.append(xy)
        out_amp.append(amp)
    xy, amp = np.concatenate(out_xy), np.concatenate(out_amp)
    keep = amp > 0
    xy, amp = xy[keep], amp[keep]
    if split is not None:
        xy, amp = _add_from_residual(image, xy, amp, sigma, norm, radius, split, find_peaks, link)
        keep = amp >= split["keep_amplitude"]
        xy, amp = xy[keep], amp[keep]
    return _merge_close(xy, amp, merge_distance)


def add_separation(link, radius, sigma):
    """HR px (Chebyshev) between residual candidates tried in the same round of
    _add_from_residual: their refitted peak sets (within ``link``) and acceptance windows
    (``radius``) lie > 4 sigma apart, so the tries cannot change each other's outcome."""
    return 2 * (link + radius) + math.ceil(4.0 * sigma)


def spread_candidates(points, values, separation, limit):
    """Greedy choice, strongest first, of points [C, 2] at least ``separation`` apart (Chebyshev),
    at most ``limit``: indices into points, strongest first (ties in the given order)."""
    chosen = []
    for i in np.argsort(-np.asarray(values), kind="stable"):
        if len(chosen) == limit:
            break
        if all(np.max(np.abs(points[i] - points[j])) >= separation for j in chosen):
            chosen.append(i)
    return chosen


def _add_from_residual(image, xy, amp, sigma, norm, radius, split, find_peaks, link):
    """Add emitters the LoG missed: where phi smears a cluster into a plateau there is no LoG
    maximum, but the residual (image minus the fitted model) keeps an emitter-sized bump. LoG
    maxima of the residual are tried as new emitters, strongest first, each refitted jointly with
    the fitted peaks within ``link``, and kept when its amplitude is >= split["add_min_amplitude"],
    it lies >= 1 HR px from the others and the residual sum of squares in its window drops below
    split["rss_ratio"] times the one before; at most split["max_adds"] tries per image. Tries run
    in rounds: each round takes the strongest untried maxima that lie add_separation() apart,
    which cannot influence each other, so a crowded field needs few residual images."""
    rejected = set()
    separation = add_separation(link, radius, sigma)
    tries = 0
    while tries < split["max_adds"]:
        resid = image - _model_image(image.shape, xy, amp, sigma, norm)
        cand = [tuple(c) for c in find_peaks(resid) if tuple(c) not in rejected]
        if not cand:
            break
        chosen = spread_candidates(np.array(cand), [resid[c] for c in cand], separation,
                                   split["max_adds"] - tries)
        tries += len(chosen)
        for i in chosen:
            c = cand[i]
            c_xy = np.array([c[1] + 0.5, c[0] + 0.5])
            near = np.nonzero(np.max(np.abs(xy - c_xy), axis=1) < link)[0]
            win = _window(image.shape, c_xy, radius)
            fxy, famp = _fit_group(image, np.concatenate([xy[near], c_xy[None]]),
                                   np.concatenate([amp[near], [max(resid[c], 1e-3)]]),
                                   sigma, norm, radius)
            new_xy = np.concatenate([np.delete(xy, near, axis=0), fxy])
            new_amp = np.concatenate([np.delete(amp, near), famp])
            new_rss = np.sum((_model_image(image.shape, new_xy, new_amp, sigma, norm)
                              - image)[win] ** 2)
            apart = len(near) == 0 or np.hypot(*(fxy[:-1] - fxy[-1]).T).min() >= 1.0
            if (famp[-1] >= split["add_min_amplitude"] and apart
                    and new_rss <= split["rss_ratio"] * np.sum(resid[win] ** 2)):
                xy, amp = new_xy, new_amp
            else:
                rejected.add(c)
    return xy, amp


def _refit_split(image, xy, amp, center, sigma, norm, radius, link):
    """The refit after a split try: the peaks within `link` (split_link; Chebyshev, HR px) of
    `center`, the others fixed (their model subtracted from the image)."""
    local = np.max(np.abs(xy - center), axis=1) < link
    rest = image - _model_image(image.shape, xy[~local], amp[~local], sigma, norm)
    lxy, lamp = _fit_group(rest, xy[local], amp[local], sigma, norm, radius)
    fxy, famp = xy.copy(), amp.copy()
    fxy[local], famp[local] = lxy, lamp
    return fxy, famp


def _deblend(image, xy, amp, sigma, norm, radius, split):
    """Split fitted peaks whose amplitude says they hold several emitters (the KDE scale is fixed:
    one emitter has amplitude 1). A peak with amplitude >= split["trigger"] is replaced by two along
    its major axis and the peaks around it refitted (_refit_split); the split is kept when both
    parts have amplitude >= split["min_amplitude"], are >= 1 HR px apart and the residual sum of
    squares in the peak's window drops below split["rss_ratio"] times the unsplit one. Split parts are tried
    again (triplets); at most split["max_splits"] tries per peak the group came with."""
    link = split_link(radius, sigma, split[SPLIT_OFFSET])
    tried = np.zeros(len(xy), dtype=bool)
    for _ in range(split["max_splits"] * len(xy)):
        candidates = np.nonzero(~tried & (amp >= split["trigger"]))[0]
        if len(candidates) == 0:
            break
        k = candidates[np.argmax(amp[candidates])]
        tried[k] = True
        win = _window(image.shape, xy[k], radius)
        rss = np.sum((_model_image(image.shape, xy, amp, sigma, norm) - image)[win] ** 2)
        u = _split_direction(image, xy, amp, k, sigma, norm, radius)
        offset = split[SPLIT_OFFSET] * sigma * u
        xy_try = np.concatenate([xy, xy[k:k + 1] - offset])
        xy_try[k] += offset
        amp_try = np.concatenate([amp, amp[k:k + 1] / 2])
        amp_try[k] /= 2
        fxy, famp = _refit_split(image, xy_try, amp_try, xy[k], sigma, norm, radius, link)
        frss = np.sum((_model_image(image.shape, fxy, famp, sigma, norm) - image)[win] ** 2)
        if (min(famp[k], famp[-1]) >= split["min_amplitude"]
                and np.hypot(*(fxy[k] - fxy[-1])) >= 1.0
                and frss <= split["rss_ratio"] * rss):
            xy, amp = fxy, famp
            tried = np.concatenate([tried, [False]])
            tried[k] = False
    return xy, amp


def deblend_options(deblend, detection):
    """The deblending settings of detect / detect_batch: None for deblend False (or None), else
    DEBLEND_DEFAULTS with a dict's entries over them, the split parts' start (SPLIT_OFFSET) and,
    unless the dict names a trigger, the trigger from the DetectionConfig."""
    if deblend is False or deblend is None:
        return None
    if deblend is True:
        split = dict(DEBLEND_DEFAULTS)
    elif isinstance(deblend, dict):
        unknown = set(deblend) - set(DEBLEND_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown deblend options {sorted(unknown)}; "
                             f"choose from {sorted(DEBLEND_DEFAULTS)}")
        split = {**DEBLEND_DEFAULTS, **deblend}
    else:
        raise ValueError(f"deblend must be True, False or a dict of options (got {deblend!r})")
    split[SPLIT_OFFSET] = float(detection.split_offset)
    if not (isinstance(deblend, dict) and "trigger" in deblend):
        split["trigger"] = float(detection.split_trigger)
    return split


def _merge_close(xy, amp, merge_distance):
    """Two refined peaks closer than merge_distance (HR px) are one: amplitude-weighted mean."""
    if len(xy) < 2 or merge_distance <= 0:
        return xy, amp
    order = np.argsort(-amp, kind="stable")
    xy, amp = xy[order], amp[order]
    alive = np.ones(len(xy), dtype=bool)
    for i in range(len(xy)):
        if not alive[i]:
            continue
        near = np.nonzero(alive & (np.hypot(*(xy - xy[i]).T) < merge_distance))[0]
        near = near[near != i]
        if len(near):
            total = amp[i] + amp[near].sum()
            xy[i] = (amp[i] * xy[i] + (amp[near, None] * xy[near]).sum(0)) / total
            amp[i] = total
            alive[near] = False
    return xy[alive], amp[alive]


def detect(kde, config, threshold=None, refine="gaussian", *, detection=None, min_sigma=None,
           max_sigma=None, num_sigma=None, refine_radius=None, deblend=True, overlap=0.5,
           merge_distance=1.0, return_amplitude=False):
    """Emitter positions from KDE image(s).

    kde: [H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] (NumPy or tf), HR grid of ``config`` (a
        SimulationConfig: upsample, kde_sigma).
    detection: a DetectionConfig (None: its defaults). threshold, min_sigma, max_sigma, num_sigma,
        refine_radius override its fields: scale-normalised LoG response, LoG scales (HR px) and
        refinement half-width (HR px).
    refine: "gaussian" (joint pixel-integrated Gaussian fit), "centroid" or "none" (module doc).
    deblend: "gaussian" only: True splits peaks whose fitted amplitude says they hold several
        emitters, adds emitters found in the fit residual and drops fits below half an emitter
        (DEBLEND_DEFAULTS, the trigger from detection.split_trigger); False does none of this; a
        dict overrides DEBLEND_DEFAULTS entries (and the trigger).
    overlap: blob_log's overlap pruning; merge_distance: HR px below which two refined gaussian
        positions are merged into one.
    Returns [M, 2] float64 (x, y) in LR pixels, sorted by y then x, for one image, a list of them
    for a batch; with return_amplitude=True a (positions, amplitudes [M]) pair (of lists for a
    batch): fitted amplitude in emitters for "gaussian", the KDE value at the LoG pixel otherwise.
    """
    check_config(config)
    images, batched = _kde_batch(kde)
    if refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES} (got {refine!r})")
    if detection is None:
        detection = DetectionConfig()
    elif not isinstance(detection, DetectionConfig):
        raise TypeError(f"detection must be a DetectionConfig (got {type(detection).__name__})")
    threshold = detection.threshold if threshold is None else float(threshold)
    min_sigma = detection.min_sigma if min_sigma is None else float(min_sigma)
    max_sigma = detection.max_sigma if max_sigma is None else float(max_sigma)
    num_sigma = detection.num_sigma if num_sigma is None else int(num_sigma)
    radius = detection.refine_radius if refine_radius is None else int(refine_radius)
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0 (got {threshold!r})")
    if not (0 < min_sigma <= max_sigma and np.isfinite(max_sigma)):
        raise ValueError(f"need 0 < min_sigma <= max_sigma (got {min_sigma!r}, {max_sigma!r})")
    if num_sigma < 1 or radius < 1:
        raise ValueError(f"num_sigma and refine_radius must be >= 1 (got {num_sigma}, {radius})")

    split = deblend_options(deblend, detection)

    positions, amplitudes = [], []
    for image in images:
        peaks = log_peaks(image, threshold, min_sigma, max_sigma, num_sigma, overlap)
        if len(peaks) == 0:
            xy, amp = np.zeros((0, 2)), np.zeros(0)
        elif refine == "none":
            xy, amp = _refine_none(image, peaks)
        elif refine == "centroid":
            xy, amp = _refine_centroid(image, peaks, radius)
        else:
            xy, amp = _refine_gaussian(
                image, peaks, config.kde_sigma, config.kde_norm, radius, merge_distance, split,
                lambda im: log_peaks(im, threshold, min_sigma, max_sigma, num_sigma, overlap))
        order = np.lexsort((xy[:, 0], xy[:, 1]))
        positions.append(xy[order] / config.upsample)  # HR -> LR coordinates.
        amplitudes.append(amp[order])
    if not batched:
        positions, amplitudes = positions[0], amplitudes[0]
    return (positions, amplitudes) if return_amplitude else positions
