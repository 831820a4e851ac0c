"""Batched twin of ``detect`` (refine="gaussian") for stacks of KDE images, and the association of
detections with reference localizations for the per-localization uncertainty.

Units as in localization.detection: images are [N, H, W] on the HR grid (KDE units); positions
returned are (x, y) in LR pixels; internal fit coordinates are HR pixels (HR pixel J has centre
J + 1/2).

    detect_batch(images, config, detection)        -> list of N [M, 2] positions
    associate(found, reference, tolerance)         -> (sample, found_idx, reference_idx)
    localization_uncertainty_batched(samples, reference, config, detection)
                                                   -> per_localization's dict (per frame)

detect_batch runs the same steps as ``detect`` with the same acceptance rules, vectorized over the
stack: LoG maxima of all images at once (skimage's blob_log / peak_local_max / _prune_blobs
rules), Levenberg-Marquardt fits of all connected peak groups of all images at once (each group
keeps its own damping and stopping state, so every group follows detect's iterations), deblending
as rounds in which every group with a candidate tries one split, residual adds as rounds in which
every image tries one candidate, then the drop of weak fits and the merge of close ones. Groups are
fitted in buckets of similar size (padding to the largest group of the stack would multiply the
work), so the Python loops run over buckets, rounds and iterations, never over images or groups;
groups of more than BLOCK_PEAKS peaks (crowded whole fields) are fitted by detect's block sweeps,
all tiles of one colour of all such groups in one call. Results equal detect's up to
floating-point rounding (sums in another order); a rounding-level difference can flip a threshold
decision in rare borderline cases.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import erf
from skimage.feature.blob import _prune_blobs

from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.localization.detection import (BLOCK_PEAKS, BLOCK_SWEEPS, LM_GAIN_TOL,
                                                LM_STEP_TOL, SPLIT_OFFSET, add_separation,
                                                block_tiles, deblend_options, detect, group_link,
                                                split_link, tile_box)
from smlm_tfdiff.localization.metrics import match
from smlm_tfdiff.simulation.config import check_config
from smlm_tfdiff.validation import as_numpy, as_positions

_SQRT2 = math.sqrt(2.0)
_LM_MAX_ITER = 100
# An HR coordinate far outside any image: Gaussian kernels there are exactly 0.
_FAR = 1e9


# ------------------------------------------------------------------------------------ input
def _stack(images) -> np.ndarray:
    """[N, H, W] or [N, H, W, 1] -> [N, H, W] float64 (ValueError naming the problem)."""
    arr = as_numpy(images, "images")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"images must be a stack [N, H, W] or [N, H, W, 1] "
                         f"(got shape {arr.shape})")
    if arr.shape[1] < 3 or arr.shape[2] < 3:
        raise ValueError(f"images must be at least 3x3 HR pixels (got shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError("images contain NaN or Inf")
    return arr


def _ranks(labels, minlength=0):
    """Counts [L] of sorted int labels [K] and each entry's rank among its label's entries [K]:
    the slots that pack the entries into a padded [L, max count] array."""
    counts = np.bincount(labels, minlength=minlength)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return counts, np.arange(len(labels)) - start[labels]


def _overlap_equal(dist, sigma):
    """blob_log's area-overlap fraction of two blobs of the same sigma, `dist` apart (HR px)."""
    d = np.asarray(dist, np.float64) / (sigma * _SQRT2)
    out = np.zeros(d.shape)
    inside = d <= 0
    lens = (d > 0) & (d <= 2)
    dl = d[lens]
    ratio = np.clip(dl / 2.0, -1, 1)
    area = 2 * np.arccos(ratio) - 0.5 * np.sqrt(np.abs((-dl + 2) * dl * dl * (dl + 2)))
    out[lens] = area / math.pi
    out[inside] = 1.0
    return out


def log_peaks_batch(images, threshold, sigma, overlap=0.5):
    """Integer one-scale LoG maxima of every image of a stack, as ``detection.log_peaks`` finds
    them (blob_log with min_sigma = max_sigma = sigma, num_sigma = 1, exclude_border=False).

    images: [N, H, W] float64; threshold: scale-normalised LoG response; sigma: HR px.
    Returns (peaks [N, P, 2] int64 (row, col) HR pixels sorted row-major per image, valid [N, P]).
    """
    n, h, w = images.shape
    cube = -ndimage.gaussian_laplace(images, sigma, axes=(1, 2)) * float(sigma) ** 2
    top = ndimage.maximum_filter(cube, size=(1, 3, 3), mode="nearest")
    is_max = cube == top
    trivial = is_max.reshape(n, -1).all(axis=1)
    is_max &= (cube > threshold) & ~trivial[:, None, None]
    img, row, col = np.nonzero(is_max)
    if len(img) == 0:
        return np.zeros((n, 0, 2), np.int64), np.zeros((n, 0), bool)
    value = cube[img, row, col]
    # peak_local_max's order: highest first (stable over row-major), per image.
    order = np.lexsort((-value, img))
    img, row, col = img[order], row[order], col[order]
    counts, rank = _ranks(img, n)
    pmax = counts.max()
    rc = np.zeros((n, pmax, 2), np.int64)
    valid = np.zeros((n, pmax), bool)
    rc[img, rank] = np.stack([row, col], 1)
    valid[img, rank] = True

    # _prune_blobs: of a pair overlapping by more than `overlap`, the first (higher) one is dropped.
    radius = 2 * sigma * _SQRT2
    diff = rc[:, :, None, :] - rc[:, None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    pair = (valid[:, :, None] & valid[:, None, :] & (dist <= radius)
            & np.triu(np.ones((pmax, pmax), bool), 1)[None])
    pair &= _overlap_equal(np.where(pair, dist, 0.0), sigma) > overlap
    degree = pair.sum(1) + pair.sum(2)
    # Chains of overlapping pairs depend on the order of skimage's pair set: its own rule there.
    chained = (degree > 1).any(axis=1)
    alive = valid & ~pair.any(axis=2)
    for i in np.nonzero(chained)[0]:
        blobs = np.concatenate([rc[i, valid[i]].astype(np.float64),
                                np.full((valid[i].sum(), 1), float(sigma))], axis=1)
        kept = np.round(_prune_blobs(blobs, overlap)[:, :2]).astype(np.int64)
        alive[i] = False
        hit = (rc[i, :, None, :] == kept[None]).all(-1).any(1) & valid[i]
        alive[i] = hit
    # Row-major order, as np.unique in log_peaks.
    key = np.where(alive, rc[..., 0] * w + rc[..., 1], h * w)
    order = np.argsort(key, axis=1, kind="stable")
    rc = np.take_along_axis(rc, order[..., None], 1)
    alive = np.take_along_axis(alive, order, 1)
    keep = alive.sum(1).max() if alive.any() else 0
    return rc[:, :keep], alive[:, :keep]


# ------------------------------------------------------------------------------ model pieces
def _integrals(coord, pixel, sigma):
    """Integral of N(coord, sigma^2) over pixel [j, j+1) and its derivative in coord.
    coord, pixel: broadcastable arrays (HR px) -> (value, derivative)."""
    lo = pixel - coord
    hi = lo + 1.0
    s = _SQRT2 * sigma
    val = 0.5 * (erf(hi / s) - erf(lo / s))
    c = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    der = c * (np.exp(-0.5 * (lo / sigma) ** 2) - np.exp(-0.5 * (hi / sigma) ** 2))
    return val, der


def _box_model(xy, amp, valid, r0, c0, hb, wb, sigma, norm):
    """Model [B, hb, wb] of peaks xy [B, P, 2] (x, y) HR px, amplitudes [B, P], on the box of HR
    pixels rows r0 .. r0 + hb - 1, cols c0 .. c0 + wb - 1 (r0, c0 [B] or scalars). Separable:
    one erf per box edge and peak, then one BLAS product per image ([hb, P] @ [P, wb])."""
    s = _SQRT2 * sigma
    col_edges = (np.reshape(c0, (-1, 1)) + np.arange(wb + 1))[:, None, :] - xy[:, :, None, 0]
    row_edges = (np.reshape(r0, (-1, 1)) + np.arange(hb + 1))[:, None, :] - xy[:, :, None, 1]
    cx, cy = 0.5 * erf(col_edges / s), 0.5 * erf(row_edges / s)
    ex, ey = cx[..., 1:] - cx[..., :-1], cy[..., 1:] - cy[..., :-1]  # [B, P, wb], [B, P, hb]
    a = np.where(valid, amp, 0.0)
    return norm * np.matmul(np.ascontiguousarray((ey * a[:, :, None]).transpose(0, 2, 1)), ex)


def _model_at(xy, amp, valid, rows, cols, sigma, norm):
    """sum_p amp_p norm dEy_p dEx_p at pixels (rows, cols) [B, K] of peaks xy [B, P, 2]: [B, K]
    (the model on the pixels' bounding box, then the pixels gathered)."""
    r0, c0 = rows.min(1), cols.min(1)
    hb, wb = int((rows - r0[:, None]).max()) + 1, int((cols - c0[:, None]).max()) + 1
    box = _box_model(xy, amp, valid, r0, c0, hb, wb, sigma, norm)
    return box[np.arange(len(rows))[:, None], rows - r0[:, None], cols - c0[:, None]]


def _model_images(xy, amp, valid, shape, sigma, norm):
    """Model images [B, H, W] of peaks xy [B, P, 2] (x, y) HR px, amplitudes [B, P]."""
    return _box_model(xy, amp, valid, 0, 0, shape[0], shape[1], sigma, norm)


def _window_pixels(xy, shape, radius):
    """The (2 radius + 1)^2 window around each point xy [B, 2] (HR px), clipped to the image:
    (rows [B, K], cols [B, K], inside [B, K])."""
    h, w = shape
    c = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, w - 1)
    r = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, h - 1)
    d = np.arange(-radius, radius + 1)
    shape_k = (len(xy), len(d), len(d))
    rows = np.broadcast_to(r[:, None, None] + d[None, :, None], shape_k).reshape(len(xy), -1)
    cols = np.broadcast_to(c[:, None, None] + d[None, None, :], shape_k).reshape(len(xy), -1)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), inside


# -------------------------------------------------------------------------------- batched LM
def _fit_pixels(xy0, valid, shape, radius):
    """Union of the windows around the valid peaks of each group: sorted linear pixel indices
    [G, K] (H * W where unused)."""
    h, w = shape
    g, p = valid.shape
    c = np.clip(np.floor(xy0[..., 0]).astype(np.int64), 0, w - 1)
    r = np.clip(np.floor(xy0[..., 1]).astype(np.int64), 0, h - 1)
    d = np.arange(-radius, radius + 1)
    rows = r[:, :, None, None] + d[None, None, :, None]
    cols = c[:, :, None, None] + d[None, None, None, :]
    ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w) & valid[:, :, None, None]
    lin = np.where(ok, rows * w + cols, h * w).reshape(g, -1)
    lin.sort(axis=1)
    dup = np.zeros_like(lin, dtype=bool)
    dup[:, 1:] = lin[:, 1:] == lin[:, :-1]
    lin[dup] = h * w
    lin.sort(axis=1)
    k = int((lin < h * w).sum(1).max())
    return lin[:, :k]


def _fit_bucket(images, img, xy0, amp0, valid, sigma, norm, radius, background=None):
    """Joint LM fits (detection._fit_group / _lm, one per row) of groups of one bucket.
    images [N, H, W]; img [G] image of each group; xy0 [G, P, 2] (x, y) HR px; amp0, valid [G, P];
    background: None or fixed peaks (xy [G, B, 2], amp [G, B], valid [G, B]) whose model is
    subtracted from each group's data. Returns (xy [G, P, 2], amp [G, P])."""
    n_img, h, w = images.shape
    g, p = valid.shape
    lin = _fit_pixels(xy0, valid, (h, w), radius)
    used = lin < h * w
    lin_c = np.where(used, lin, lin[:, :1])
    rows, cols = lin_c // w, lin_c % w
    # Kernels are evaluated on each group's bounding box and gathered at its pixels: one erf per
    # box edge and peak instead of several per pixel and peak. Box cell wb + 1 (hb + 1) lies far
    # outside, where every kernel is exactly 0: padding pixels point there, so model, residual
    # and Jacobian vanish on them without masks.
    r0, c0 = rows.min(1), cols.min(1)
    ri, ci = rows - r0[:, None], cols - c0[:, None]
    hb, wb = int(ri.max()) + 1, int(ci.max()) + 1
    ri, ci = np.where(used, ri, hb + 1), np.where(used, ci, wb + 1)
    col_edges = (c0[:, None] + np.concatenate([np.arange(wb + 1), [_FAR, _FAR + 1]])[None])
    row_edges = (r0[:, None] + np.concatenate([np.arange(hb + 1), [_FAR, _FAR + 1]])[None])
    col_edges, row_edges = col_edges.astype(np.float64), row_edges.astype(np.float64)
    data = images.reshape(n_img, -1)[img[:, None], lin_c]
    if background is not None:
        data = data - _model_at(*background, rows, cols, sigma, norm)
    data = np.where(used, data, 0.0)
    slack = radius + 0.5
    # Parameters [G, 3P]: x of every peak, then y, then amplitude (detect's order).
    x0 = np.where(valid, xy0[..., 0], 0.0)
    y0 = np.where(valid, xy0[..., 1], 0.0)
    a0 = np.where(valid, amp0, 0.0)
    lower = np.concatenate([x0 - slack, y0 - slack, np.zeros((g, p))], 1)
    upper = np.concatenate([x0 + slack, y0 + slack, np.full((g, p), np.inf)], 1)
    free = np.concatenate([valid, valid, valid], 1)
    lower = np.where(free, lower, np.concatenate([x0, y0, a0], 1))
    upper = np.where(free, upper, np.concatenate([x0, y0, a0], 1))

    def kernels(coord, edges, idx, derivative):
        """[G', P] coordinates -> pixel integrals (and derivatives) [G', K, P] at the pixels
        whose box column (row) is idx [G', K]."""
        z = edges[:, :, None] - coord[:, None, :]  # [G', box + 1, P]
        rows_sel = np.arange(len(z))[:, None]
        cdf = 0.5 * erf(z / (_SQRT2 * sigma))
        val = (cdf[:, 1:] - cdf[:, :-1])[rows_sel, idx]
        if not derivative:
            return val, None
        pdf = np.exp(-0.5 * (z / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)
        return val, (pdf[:, :-1] - pdf[:, 1:])[rows_sel, idx]

    def pieces(par, sel, derivative=True):
        # Padding peaks sit far away: their kernels are exactly 0.
        v = valid[sel]
        ex, dex = kernels(np.where(v, par[:, :p], -_FAR), col_edges[sel], ci[sel], derivative)
        ey, dey = kernels(np.where(v, par[:, p:2 * p], -_FAR), row_edges[sel], ri[sel],
                          derivative)
        a = np.where(v, par[:, 2 * p:], 0.0)
        return a, ex, dex, ey, dey

    def residual(par, sel):
        """Residual [G', K] at par and the kernels, from which the Jacobian there follows."""
        a, ex, dex, ey, dey = pieces(par, sel)
        model = norm * np.matmul(ey * ex, a[:, :, None])[..., 0]
        return model - data[sel], (a, ex, dex, ey, dey, sel)

    def normal(r, kern, pick):
        """LM gradient and (scaled) normal matrix from the kernels of the rows `pick` of a
        residual call: stored in grad, hess, dscale."""
        a, ex, dex, ey, dey, sel = kern
        if pick is not None:
            a, ex, dex, ey, dey, sel, r = a[pick], ex[pick], dex[pick], ey[pick], dey[pick], \
                sel[pick], r[pick]
        eyn = norm * ey
        jac = np.empty(ey.shape[:2] + (3 * p,))  # [G', K, 3P]
        np.multiply(eyn * a[:, None, :], dex, out=jac[:, :, :p])
        np.multiply(dey * (norm * a)[:, None, :], ex, out=jac[:, :, p:2 * p])
        np.multiply(eyn, ex, out=jac[:, :, 2 * p:])
        grad[sel] = np.einsum("gkp,gk->gp", jac, r)
        # A contiguous transpose keeps matmul on one BLAS gemm per group; a strided view makes
        # it 10-100x slower.
        he = np.matmul(np.ascontiguousarray(jac.transpose(0, 2, 1)), jac)
        hess[sel] = he
        diag = np.diagonal(he, axis1=1, axis2=2).copy()
        top = np.where(free[sel], diag, -np.inf).max(1)
        diag = np.maximum(diag, 1e-12 * np.maximum(top, 1e-300)[:, None])
        dscale[sel] = np.where(free[sel], diag, 1.0)

    grad = np.zeros((g, 3 * p))
    hess = np.zeros((g, 3 * p, 3 * p))
    dscale = np.ones((g, 3 * p))
    eye = np.eye(3 * p)
    par = np.clip(np.concatenate([x0, y0, a0], 1), lower, upper)
    r, kern = residual(par, np.arange(g))
    normal(r, kern, None)
    cost = np.einsum("gk,gk->g", r, r)
    lam = np.full(g, 1e-3)
    its = np.zeros(g, np.int64)
    done = np.zeros(g, bool)
    while not done.all():
        act = np.nonzero(~done)[0]
        fr = free[act]
        mat = (hess[act] * (fr[:, :, None] & fr[:, None, :])
               + (lam[act, None] * dscale[act])[:, :, None] * eye + (~fr)[:, :, None] * eye)
        rhs = -np.where(fr, grad[act], 0.0)
        step = _solve(mat, rhs)
        new = np.clip(par[act] + step, lower[act], upper[act])
        r_new, kern = residual(new, act)
        cost_new = np.einsum("gk,gk->g", r_new, r_new)
        ok = cost_new <= cost[act]
        acc, rej = act[ok], act[~ok]
        moved = np.abs(new[ok] - par[acc]).max(1) if len(acc) else np.zeros(0)
        gain = cost[acc] - cost_new[ok]
        par[acc], r[acc], cost[acc] = new[ok], r_new[ok], cost_new[ok]
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-12)
        its[acc] += 1
        stop = ((moved < 1e-9) | (cost[acc] < 1e-26)
                | ((moved < LM_STEP_TOL) & (gain <= LM_GAIN_TOL * cost[acc]))
                | (its[acc] >= _LM_MAX_ITER))
        done[acc] = stop
        go_on = np.nonzero(ok)[0][~stop]
        if len(go_on):
            normal(r_new, kern, None if len(go_on) == len(act) else go_on)
        lam[rej] *= 10.0
        done[rej] = lam[rej] > 1e10
    xy = np.stack([par[:, :p], par[:, p:2 * p]], -1)
    return xy, par[:, 2 * p:]


def _solve(mat, rhs):
    """Batched solve; a singular system gives a zero step (as detection._lm)."""
    try:
        return np.linalg.solve(mat, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.zeros_like(rhs)
        for i in range(len(mat)):  # Only after a singular system: find which ones.
            try:
                out[i] = np.linalg.solve(mat[i], rhs[i])
            except np.linalg.LinAlgError:
                pass
        return out


def fit_groups(images, img, xy0, amp0, valid, sigma, norm, radius, background=None):
    """Joint least-squares fits of many peak groups (each one as detection._fit_group).

    images [N, H, W] KDE; img [G] int image of each group; xy0 [G, P, 2] start (x, y) HR px;
    amp0 [G, P] start amplitudes (emitters); valid [G, P] bool (padding False); background: None
    or fixed peaks (xy [G, B, 2], amp [G, B], valid [G, B]) subtracted from each group's image.
    Returns (xy [G, P, 2], amp [G, P]); padded entries keep their start values.
    """
    xy, amp = xy0.astype(np.float64).copy(), amp0.astype(np.float64).copy()
    count = valid.sum(1)
    # Buckets of groups with 2^(k-1) < count <= 2^k peaks: padding stays below 2x.
    bucket = np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64)
    for b in np.unique(bucket[count > 0]):
        sel = np.nonzero((bucket == b) & (count > 0))[0]
        pb = int(count[sel].max())
        # Valid peaks first, so a bucket's rows need only pb columns.
        order = np.argsort(~valid[sel], axis=1, kind="stable")[:, :pb]
        v = np.take_along_axis(valid[sel], order, 1)
        bg = None if background is None else tuple(a[sel] for a in background)
        fxy, famp = _fit_bucket(images, img[sel], np.take_along_axis(xy0[sel], order[..., None], 1),
                                np.take_along_axis(amp0[sel], order, 1), v, sigma, norm, radius,
                                bg)
        rows = np.repeat(sel[:, None], pb, 1)
        xy[rows[v], order[v]] = fxy[v]
        amp[rows[v], order[v]] = famp[v]
    return xy, amp


def _fit_blocks_batch(images, img, xy0, amp0, valid, sigma, norm, radius, link):
    """detection._fit_blocks for groups [G, P] at once: per sweep and colour, one fit_groups call
    over the tiles of that colour of every group, each tile against its tile_box's other peaks."""
    xy, amp = xy0.astype(np.float64).copy(), amp0.astype(np.float64).copy()
    tile, colour = block_tiles(xy0, link)
    slack = radius + 0.5
    for _ in range(BLOCK_SWEEPS):
        for c in range(4):
            gi, pi = np.nonzero(valid & (colour == c))  # Row-major: a tile's peaks in order.
            if len(gi) == 0:
                continue
            key = np.stack([gi, tile[gi, pi, 0], tile[gi, pi, 1]], 1)
            uniq, sub = np.unique(key, axis=0, return_inverse=True)
            sub = sub.reshape(-1)
            order = np.argsort(sub, kind="stable")
            gi, pi, sub = gi[order], pi[order], sub[order]
            counts, slot = _ranks(sub)
            members = np.zeros((len(uniq), int(counts.max())), np.int64)
            mvalid = np.zeros(members.shape, bool)
            members[sub, slot], mvalid[sub, slot] = pi, True
            sg = uniq[:, 0]
            # Each tile's background: the other peaks of its group inside its tile_box.
            low, high = tile_box(uniq[:, 1:], link)
            near = (valid[sg] & np.all((xy[sg] >= low[:, None]) & (xy[sg] < high[:, None]), -1))
            near[sub, pi] = False
            bo = np.argsort(~near, axis=1, kind="stable")[:, :max(int(near.sum(1).max()), 1)]
            background = (np.take_along_axis(xy[sg], bo[..., None], 1),
                          np.take_along_axis(amp[sg], bo, 1), np.take_along_axis(near, bo, 1))
            rows = sg[:, None]
            fxy, famp = fit_groups(images, img[sg], xy[rows, members], amp[rows, members], mvalid,
                                   sigma, norm, radius, background)
            g_, p_ = sg[sub], pi
            xy[g_, p_] = np.clip(fxy[sub, slot], xy0[g_, p_] - slack, xy0[g_, p_] + slack)
            amp[g_, p_] = famp[sub, slot]
    return xy, amp


def fit_peak_groups(images, img, xy0, amp0, valid, sigma, norm, radius):
    """The groups' fits of detection's gaussian refinement: fit_groups (jointly) for groups of
    up to BLOCK_PEAKS peaks, block sweeps (_fit_blocks_batch) for bigger ones. Arguments and
    returns as fit_groups (without a background)."""
    is_big = valid.sum(1) > BLOCK_PEAKS
    if not is_big.any():
        return fit_groups(images, img, xy0, amp0, valid, sigma, norm, radius)
    xy, amp = xy0.astype(np.float64).copy(), amp0.astype(np.float64).copy()
    small, big = np.nonzero(~is_big)[0], np.nonzero(is_big)[0]
    if len(small):
        xy[small], amp[small] = fit_groups(images, img[small], xy0[small], amp0[small],
                                           valid[small], sigma, norm, radius)
    xy[big], amp[big] = _fit_blocks_batch(images, img[big], xy0[big], amp0[big], valid[big],
                                          sigma, norm, radius, group_link(radius, sigma))
    return xy, amp


# ---------------------------------------------------------------------------------- stages
def _groups(peaks, valid, link):
    """Connected components (Chebyshev distance <= link) of the peaks of every image.
    peaks [N, P, 2] (row, col); returns (img [G], members [G, Q] index into P, mvalid [G, Q])."""
    n, p = valid.shape
    diff = np.abs(peaks[:, :, None, :] - peaks[:, None, :, :]).max(-1)
    adj = valid[:, :, None] & valid[:, None, :] & (diff <= link)
    b, i, j = np.nonzero(adj)
    node = np.arange(n * p)
    graph = coo_matrix((np.ones(len(b)), (b * p + i, b * p + j)), shape=(n * p, n * p))
    _, labels = connected_components(graph, directed=False)
    keep = valid.reshape(-1)
    node, labels = node[keep], labels[keep]
    # Renumber in order of first node (detect's per-image component order).
    _, first, labels = np.unique(labels, return_index=True, return_inverse=True)
    rank_of = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    labels = rank_of[labels]
    order = np.lexsort((node, labels))
    node, labels = node[order], labels[order]
    counts, slot = _ranks(labels)
    g, q = len(counts), int(counts.max())
    members = np.zeros((g, q), np.int64)
    mvalid = np.zeros((g, q), bool)
    members[labels, slot] = node % p
    mvalid[labels, slot] = True
    img = np.zeros(g, np.int64)
    img[labels] = node // p
    return img, members, mvalid


def _grow(arrays, need):
    """Pad [G, P, ...] arrays along axis 1 to at least `need` columns."""
    p = arrays[0].shape[1]
    if need <= p:
        return arrays
    extra = max(need - p, p)
    return [np.concatenate([a, np.zeros((a.shape[0], extra) + a.shape[2:], a.dtype)], 1)
            for a in arrays]


def _refit_split_batch(images, img, xy, amp, valid, center, sigma, norm, radius, link):
    """detection._refit_split for groups [G, P] at once (center [G, 2]: the split peak's HR
    position before the split)."""
    local = valid & (np.abs(xy - center[:, None, :]).max(-1) < link)
    order = np.argsort(~local, axis=1, kind="stable")[:, :int(local.sum(1).max())]
    lval = np.take_along_axis(local, order, 1)
    rest = valid & ~local
    background = (xy, amp, rest) if rest.any() else None
    lxy, lamp = fit_groups(images, img, np.take_along_axis(xy, order[..., None], 1),
                           np.take_along_axis(amp, order, 1), lval, sigma, norm, radius,
                           background)
    fxy, famp = xy.copy(), amp.copy()
    rows = np.repeat(np.arange(len(xy))[:, None], order.shape[1], 1)
    fxy[rows[lval], order[lval]] = lxy[lval]
    famp[rows[lval], order[lval]] = lamp[lval]
    return fxy, famp


def _deblend_batch(images, img, xy, amp, valid, sigma, norm, radius, split):
    """detection._deblend for every group at once: per round, each group with a candidate tries
    one split (its largest untried amplitude >= trigger)."""
    g = len(img)
    tried = np.zeros(valid.shape, bool)
    tries = np.zeros(g, np.int64)
    budget = split["max_splits"] * valid.sum(1)
    link = split_link(radius, sigma, split[SPLIT_OFFSET])
    h, w = images.shape[1:]
    while True:
        cand = valid & ~tried & (amp >= split["trigger"])
        act = np.nonzero(cand.any(1) & (tries < budget))[0]
        if len(act) == 0:
            break
        count = valid.sum(1)
        xy, amp, valid, tried, cand = _grow([xy, amp, valid, tried, cand],
                                            int(count[act].max()) + 1)
        tries[act] += 1
        k = np.argmax(np.where(cand[act], amp[act], -np.inf), axis=1)
        tried[act, k] = True
        xa, aa, va, ia = xy[act], amp[act], valid[act], img[act]
        xk = xa[np.arange(len(act)), k]
        rows, cols, inside = _window_pixels(xk, (h, w), radius)
        patch_img = images[ia[:, None], rows, cols]
        model_all = _model_at(xa, aa, va, rows, cols, sigma, norm)
        rss = np.sum(np.where(inside, model_all - patch_img, 0.0) ** 2, 1)
        others = va.copy()
        others[np.arange(len(act)), k] = False
        patch = patch_img - _model_at(xa, aa, others, rows, cols, sigma, norm)
        wgt = np.where(inside, np.maximum(patch, 0.0), 0.0)
        dx, dy = cols + 0.5 - xk[:, 0:1], rows + 0.5 - xk[:, 1:2]
        sxy = np.sum(wgt * dx * dy, 1)
        cov = np.stack([np.stack([np.sum(wgt * dx * dx, 1), sxy], -1),
                        np.stack([sxy, np.sum(wgt * dy * dy, 1)], -1)], -2)
        u = np.linalg.eigh(cov)[1][:, :, 1]
        offset = split[SPLIT_OFFSET] * sigma * u
        new_slot = count[act]
        ar = np.arange(len(act))
        xt, at, vt = xa.copy(), aa.copy(), va.copy()
        xt[ar, new_slot] = xk - offset
        xt[ar, k] = xk + offset
        at[ar, new_slot] = aa[ar, k] / 2
        at[ar, k] = aa[ar, k] / 2
        vt[ar, new_slot] = True
        fxy, famp = _refit_split_batch(images, ia, xt, at, vt, xk, sigma, norm, radius, link)
        frss = np.sum(np.where(inside, _model_at(fxy, famp, vt, rows, cols, sigma, norm)
                               - patch_img, 0.0) ** 2, 1)
        ok = ((np.minimum(famp[ar, k], famp[ar, new_slot]) >= split["min_amplitude"])
              & (np.hypot(*(fxy[ar, k] - fxy[ar, new_slot]).T) >= 1.0)
              & (frss <= split["rss_ratio"] * rss))
        acc = act[ok]
        xy[acc], amp[acc], valid[acc] = fxy[ok], famp[ok], vt[ok]
        tried[acc, k[ok]] = False
        tried[acc, new_slot[ok]] = False
    return xy, amp, valid


def _compact(xy, amp, valid):
    """Valid entries first along axis 1 (order kept); trims all-padding columns."""
    order = np.argsort(~valid, axis=1, kind="stable")
    q = int(valid.sum(1).max()) if valid.size else 0
    order = order[:, :q]
    return (np.take_along_axis(xy, order[..., None], 1), np.take_along_axis(amp, order, 1),
            np.take_along_axis(valid, order, 1))


def _spread_batch(peaks, values, separation, limit):
    """detection.spread_candidates for every row: peaks [A, C, 2], values [A, C] (-inf: no
    candidate), limit [A]. Returns chosen [A, C] bool, in the peaks' order."""
    a, c = values.shape
    order = np.argsort(-values, axis=1, kind="stable")
    pts = np.take_along_axis(peaks, order[..., None], 1)
    ok = np.isfinite(np.take_along_axis(values, order, 1))
    chosen = np.zeros((a, c), bool)
    count = np.zeros(a, np.int64)
    for i in range(c):  # Greedy over ranks; every row at once.
        far = np.abs(pts - pts[:, i:i + 1]).max(-1) >= separation
        take = ok[:, i] & (count < limit) & ~(chosen & ~far).any(1)
        chosen[:, i] = take
        count += take
    out = np.zeros((a, c), bool)
    np.put_along_axis(out, order, chosen, 1)
    return out


def _add_batch(images, xy, amp, valid, active, sigma, norm, radius, split, find, link):
    """detection._add_from_residual for every image at once: per round, each image still active
    tries its strongest residual LoG maxima not rejected before that lie add_separation() apart;
    all tries of all images are fitted together."""
    n, h, w = images.shape
    rejected = np.zeros(images.shape, bool)
    tries = np.zeros(n, np.int64)
    active = active.copy()
    separation = add_separation(link, radius, sigma)
    while True:
        act = np.nonzero(active & (tries < split["max_adds"]))[0]
        if len(act) == 0:
            break
        resid = images[act] - _model_images(xy[act], amp[act], valid[act], (h, w), sigma, norm)
        peaks, pvalid = find(resid)
        if peaks.shape[1]:
            pvalid &= ~rejected[act[:, None], peaks[..., 0], peaks[..., 1]]
        has = pvalid.any(1)
        active[act[~has]] = False
        act, resid, peaks, pvalid = act[has], resid[has], peaks[has], pvalid[has]
        if len(act) == 0:
            break
        ai = np.arange(len(act))
        val = np.where(pvalid, resid[ai[:, None], peaks[..., 0], peaks[..., 1]], -np.inf)
        chosen = _spread_batch(peaks, val, separation, split["max_adds"] - tries[act])
        tries[act] += chosen.sum(1)
        # One row per try, an image's tries strongest first.
        order = np.argsort(np.where(chosen, -val, np.inf), axis=1, kind="stable")
        ra, rp = np.nonzero(np.take_along_axis(chosen, order, 1))
        rp = order[ra, rp]
        rimg = act[ra]
        ar = np.arange(len(ra))
        c = peaks[ra, rp]  # (row, col)
        c_xy = c[:, ::-1] + 0.5
        count = valid.sum(1)
        xy, amp, valid = _grow([xy, amp, valid], int(count[act].max()) + int(chosen.sum(1).max()))
        xa, am, va = xy[rimg], amp[rimg], valid[rimg]
        near = va & (np.abs(xa - c_xy[:, None, :]).max(-1) < link)
        # Group: near peaks in their order, then the candidate.
        gorder = np.argsort(~near, axis=1, kind="stable")
        nn = near.sum(1)
        q = int(nn.max()) + 1
        gorder = gorder[:, :q]
        gxy = np.take_along_axis(xa, gorder[..., None], 1)
        gamp = np.take_along_axis(am, gorder, 1)
        gval = np.arange(q)[None] < nn[:, None]
        gxy[ar, nn] = c_xy
        gamp[ar, nn] = np.maximum(resid[ra, c[:, 0], c[:, 1]], 1e-3)
        gval[ar, nn] = True
        fxy, famp = fit_groups(images, rimg, gxy, gamp, gval, sigma, norm, radius)
        # Each try's peak list: the others (order kept), then its refitted group.
        rest = va & ~near
        ro = np.argsort(~rest, axis=1, kind="stable")
        nxy = np.take_along_axis(xa, ro[..., None], 1)
        namp = np.take_along_axis(am, ro, 1)
        nval = np.take_along_axis(rest, ro, 1)
        slots = rest.sum(1)[:, None] + np.arange(q)[None]
        ii = np.repeat(ar[:, None], q, 1)
        nxy[ii[gval], slots[gval]] = fxy[gval]
        namp[ii[gval], slots[gval]] = famp[gval]
        nval[ii[gval], slots[gval]] = True
        rows, cols, inside = _window_pixels(c_xy, (h, w), radius)
        patch_img = images[rimg[:, None], rows, cols]
        new_rss = np.sum(np.where(inside, _model_at(nxy, namp, nval, rows, cols, sigma, norm)
                                  - patch_img, 0.0) ** 2, 1)
        old_rss = np.sum(np.where(inside, resid[ra[:, None], rows, cols], 0.0) ** 2, 1)
        d = np.hypot(*(fxy - fxy[ar, nn][:, None, :]).transpose(2, 0, 1))
        d = np.where(np.arange(q)[None] < nn[:, None], d, np.inf)
        apart = (nn == 0) | (d.min(1) >= 1.0)
        ok = ((famp[ar, nn] >= split["add_min_amplitude"]) & apart
              & (new_rss <= split["rss_ratio"] * old_rss))
        rejected[rimg[~ok], c[~ok, 0], c[~ok, 1]] = True
        if not ok.any():
            continue
        # Accepted tries of an image touch disjoint peaks: drop their near peaks, then append
        # their groups in try order (as detect applies them one after the other).
        drop = np.zeros(valid.shape, bool)
        np.logical_or.at(drop, rimg[ok], near[ok])
        keep = valid & ~drop
        ko = np.argsort(~keep, axis=1, kind="stable")
        xy = np.take_along_axis(xy, ko[..., None], 1)
        amp = np.take_along_axis(amp, ko, 1)
        valid = np.take_along_axis(keep, ko, 1)
        fill = valid.sum(1)
        for j in np.nonzero(ok)[0]:  # Accepted tries only: a handful per round.
            b, m = rimg[j], int(gval[j].sum())
            xy[b, fill[b]:fill[b] + m] = fxy[j, gval[j]]
            amp[b, fill[b]:fill[b] + m] = famp[j, gval[j]]
            valid[b, fill[b]:fill[b] + m] = True
            fill[b] += m
    return xy, amp, valid


def _merge_batch(xy, amp, valid, merge_distance):
    """detection._merge_close for every image: greedy in order of decreasing amplitude."""
    if xy.shape[1] < 2 or merge_distance <= 0:
        return xy, amp, valid
    d = np.hypot(*(xy[:, :, None, :] - xy[:, None, :, :]).transpose(3, 0, 1, 2))
    close = valid[:, :, None] & valid[:, None, :] & (d < merge_distance)
    close &= ~np.eye(xy.shape[1], dtype=bool)[None]
    todo = np.nonzero(close.any((1, 2)))[0]
    if len(todo) == 0:
        return xy, amp, valid
    xy, amp, valid = xy.copy(), amp.copy(), valid.copy()
    order = np.argsort(np.where(valid[todo], -amp[todo], np.inf), axis=1, kind="stable")
    sx = np.take_along_axis(xy[todo], order[..., None], 1)
    sa = np.take_along_axis(amp[todo], order, 1)
    alive = np.take_along_axis(valid[todo], order, 1)
    for i in range(sx.shape[1]):  # Greedy over ranks; every image at once.
        near = alive & (np.hypot(*(sx - sx[:, i:i + 1]).transpose(2, 0, 1)) < merge_distance)
        near[:, i] = False
        near &= alive[:, i:i + 1]
        go = near.any(1)
        if not go.any():
            continue
        amp_i = sa[:, i]
        total = amp_i + np.where(near, sa, 0.0).sum(1)
        new = (amp_i[:, None] * sx[:, i] + np.einsum("bp,bpc->bc", np.where(near, sa, 0.0), sx))
        sx[go, i] = new[go] / total[go, None]
        sa[go, i] = total[go]
        alive &= ~near
    xy[todo], amp[todo], valid[todo] = sx, sa, alive
    return xy, amp, valid


def detect_batch(images, config, detection=None, *, deblend=True, merge_distance=1.0,
                 return_amplitude=False):
    """``detect(image, config, detection=detection)`` (refine="gaussian") for every image of a
    stack, vectorized over the stack.

    images: [N, H, W] or [N, H, W, 1] KDE images (KDE units) on the HR grid of ``config``.
    detection: a DetectionConfig (None: defaults); with several LoG scales (num_sigma > 1)
        every image goes through ``detect`` (the batched peak finder is one-scale: min_sigma).
    deblend, merge_distance: as in ``detect``.
    Returns a list of N [M, 2] float64 (x, y) LR px, sorted by y then x; with
    return_amplitude=True a (positions, amplitudes) pair of lists (amplitudes [M] in emitters).
    """
    check_config(config)
    stack = _stack(images)
    if detection is None:
        detection = DetectionConfig()
    elif not isinstance(detection, DetectionConfig):
        raise TypeError(f"detection must be a DetectionConfig (got {type(detection).__name__})")
    split = deblend_options(deblend, detection)
    if detection.num_sigma > 1:
        return detect(stack, config, detection=detection, deblend=deblend if split else False,
                      merge_distance=merge_distance, return_amplitude=return_amplitude)
    n, h, w = stack.shape
    sigma, norm = float(config.kde_sigma), float(config.kde_norm)
    radius = int(detection.refine_radius)
    threshold, log_sigma = float(detection.threshold), float(detection.min_sigma)

    def find(ims):
        return log_peaks_batch(ims, threshold, log_sigma)

    peaks, pvalid = find(stack)
    link = group_link(radius, sigma)
    has_peaks = pvalid.any(1)
    if pvalid.any():
        gimg, members, mvalid = _groups(peaks, pvalid, link)
        prc = peaks[gimg[:, None], members]  # [G, Q, 2] (row, col)
        xy0 = prc[..., ::-1].astype(np.float64) + 0.5
        amp0 = np.maximum(stack[gimg[:, None], prc[..., 0], prc[..., 1]], 1e-3)
        gxy, gamp = fit_peak_groups(stack, gimg, xy0, amp0, mvalid, sigma, norm, radius)
        gval = mvalid
        if split is not None:
            gxy, gamp, gval = _deblend_batch(stack, gimg, gxy, gamp, gval, sigma, norm, radius,
                                             split)
        gval = gval & (gamp > 0)
        # Groups back to images, in group order.
        gi = np.repeat(gimg[:, None], gval.shape[1], 1)[gval]
        order = np.argsort(gi, kind="stable")
        gi, fxy, famp = gi[order], gxy[gval][order], gamp[gval][order]
        counts, slot = _ranks(gi, n)
        q = max(int(counts.max()), 1)
        xy = np.zeros((n, q, 2))
        amp = np.zeros((n, q))
        valid = np.zeros((n, q), bool)
        xy[gi, slot], amp[gi, slot], valid[gi, slot] = fxy, famp, True
        if split is not None:
            xy, amp, valid = _add_batch(stack, xy, amp, valid, has_peaks, sigma, norm, radius,
                                        split, find, link)
            valid &= amp >= split["keep_amplitude"]
        xy, amp, valid = _compact(xy, amp, valid)
        xy, amp, valid = _merge_batch(xy, amp, valid, merge_distance)
    else:
        xy, amp, valid = np.zeros((n, 0, 2)), np.zeros((n, 0)), np.zeros((n, 0), bool)
    positions, amplitudes = [], []
    for b in range(n):  # Splitting the padded result into per-image arrays.
        p, a = xy[b, valid[b]], amp[b, valid[b]]
        o = np.lexsort((p[:, 0], p[:, 1]))
        positions.append(p[o] / config.upsample)
        amplitudes.append(a[o])
    return (positions, amplitudes) if return_amplitude else positions


# ----------------------------------------------------------------------------- association
def associate(found, reference, tolerance):
    """One-to-one association of the detections of many samples with one set of reference
    localizations, as ``metrics.match`` per sample (the number of pairs within ``tolerance``
    maximised, then their total distance minimised).

    found: a list of S arrays [M_s, 2] (x, y); reference: [R, 2] (x, y), same units; tolerance:
    the largest distance of a pair, same units.
    Where every detection has at most one reference within tolerance and every reference at most
    one detection, the pairs are the only matching and need no assignment; the Hungarian
    algorithm runs only on samples where some point has several candidates.
    Returns (sample [T], found_idx [T], reference_idx [T]) int64, sorted by sample, then reference.
    """
    if not isinstance(found, (list, tuple)):
        raise TypeError(f"found must be a list of [M, 2] arrays, one per sample "
                        f"(got {type(found).__name__})")
    ref = as_positions(reference, "reference", count="R")
    found = [as_positions(f, f"found[{i}]", count="M") for i, f in enumerate(found)]
    tolerance = float(tolerance)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (got {tolerance!r})")
    empty = np.zeros(0, np.int64)
    s_count = len(found)
    counts = np.array([len(f) for f in found], np.int64)
    if s_count == 0 or len(ref) == 0 or counts.sum() == 0:
        return empty, empty, empty
    m = int(counts.max())
    pts = np.zeros((s_count, m, 2))
    fvalid = np.arange(m)[None] < counts[:, None]
    pts[fvalid] = np.concatenate(found)
    dist = np.hypot(*(pts[:, :, None, :] - ref[None, None]).transpose(3, 0, 1, 2))
    ok = (dist <= tolerance) & fvalid[:, :, None]
    ambiguous = (ok.sum(2) > 1).any(1) | (ok.sum(1) > 1).any(1)
    clear = ok & ~ambiguous[:, None, None]
    s, f, r = np.nonzero(clear)
    parts = [(s, f, r)]
    for i in np.nonzero(ambiguous)[0]:  # Only samples where the assignment is not unique.
        p, q = match(found[i], ref, tolerance)
        parts.append((np.full(len(p), i, np.int64), p, q))
    s, f, r = (np.concatenate(v).astype(np.int64) for v in zip(*parts))
    order = np.lexsort((r, s))
    return s[order], f[order], r[order]


def several_frames(samples, reference) -> bool:
    """Whether samples (an array) are [B, S, H, W(, 1)] with a list of B references (True) or
    [S, H, W(, 1)] with one reference [M, 2] (False); ValueError for any other pairing."""
    frames = samples.ndim == 5 or (samples.ndim == 4 and samples.shape[-1] != 1)
    listed = isinstance(reference, (list, tuple))
    if frames != listed or (frames and len(reference) != len(samples)):
        raise ValueError(f"samples must be [S, H, W(, 1)] with reference [M, 2], or "
                         f"[B, S, H, W(, 1)] with a list of B references (got samples "
                         f"{samples.shape} and {type(reference).__name__} reference)")
    return frames


def localization_uncertainty_batched(samples, reference, config, detection=None,
                                     tolerance_hr=4.0):
    """Per-localization uncertainty from posterior samples (as
    ``uncertainty.per_localization.localization_uncertainty`` with a reference), with the
    detections of all samples by one ``detect_batch`` call and their association by ``associate``.

    samples: [S, H, W] or [S, H, W, 1] KDE samples of one frame (KDE units, HR grid of
        ``config``), with reference [M, 2] (x, y) LR px, the localizations to score; or several
        frames at once, [B, S, H, W(, 1)] with a list of B references (one detect_batch over all
        B * S images: larger stacks vectorize better).
    detection: a DetectionConfig; tolerance_hr: association radius, HR px.
    Returns (a list of B, for several frames) dicts: xy [M, 2] (LR px), mean_xy [M, 2] (LR px;
    NaN where never associated), std_nm [M, 2] (nm, ddof 1; NaN with fewer than 2
    associations), uncertainty_nm [M] (sqrt((std_x^2 + std_y^2) / 2), nm), fraction [M] (share
    of samples with an association).
    """
    check_config(config)
    arr = as_numpy(samples, "samples")
    if not several_frames(arr, reference):
        return uncertainty_from_detections(detect_batch(arr, config, detection), reference,
                                           config, tolerance_hr)
    refs = [as_positions(r, f"reference[{i}]", count="M") for i, r in enumerate(reference)]
    s = arr.shape[1]
    found = detect_batch(arr.reshape((-1,) + arr.shape[2:]), config, detection)
    return [uncertainty_from_detections(found[i * s:(i + 1) * s], r, config, tolerance_hr)
            for i, r in enumerate(refs)]


def uncertainty_from_detections(found, reference, config, tolerance_hr):
    """The per-localization uncertainty dict (localization_uncertainty_batched's) of one frame
    from its samples' detections: found, a list of S [M_s, 2] (x, y) LR px; reference [M, 2]."""
    ref = as_positions(reference, "reference", count="M")
    tolerance = float(tolerance_hr) / config.upsample
    s, f, r = associate(found, ref, tolerance)
    flat = np.concatenate([np.zeros((0, 2))] + list(found))
    offset = np.concatenate([[0], np.cumsum([len(x) for x in found])[:-1]]).astype(np.int64)
    # Deviations from the reference position keep the variance sum well conditioned.
    d = flat[offset[s] + f] - ref[r] if len(s) else np.zeros((0, 2))
    sums = np.zeros((len(ref), 2))
    squares = np.zeros((len(ref), 2))
    counts = np.zeros(len(ref))
    np.add.at(sums, r, d)
    np.add.at(squares, r, d * d)
    np.add.at(counts, r, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_d = sums / counts[:, None]
        var = (squares - counts[:, None] * mean_d ** 2) / (counts[:, None] - 1)
    var = np.where(counts[:, None] >= 2, np.maximum(var, 0.0), np.nan)
    std_nm = np.sqrt(var) * config.pixel_size_nm
    return {"xy": ref, "mean_xy": ref + mean_d, "std_nm": std_nm,
            "uncertainty_nm": np.sqrt(np.mean(std_nm ** 2, axis=1)),
            "fraction": counts / max(len(found), 1)}
