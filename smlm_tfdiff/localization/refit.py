"""Known localizations refitted in a stack of KDE images, without detecting in them.

analyze's per-localization uncertainty needs each localization's position in every posterior
sample. Detecting afresh in every sample (localization.batched: LoG peaks, Levenberg-Marquardt
fits, deblending and residual rounds, then a one-to-one matching) costs about as much as psi
itself. But a sample is a draw of the same scene phi saw, and the question is where each of phi's
localizations lies in it. So every localization starts at phi's position and is moved, with its
amplitude, to fit the sample: the model and the fitting window of detection's gaussian refinement
(the KDE kernel integrated over HR pixels, a (2 refine_radius + 1)^2 window around the start),
solved for all localizations of all images at once by Gauss-Seidel sweeps. The localizations of
each image are coloured so that no two of one colour are coupled (closer than refine_radius + 3
kernel widths); in a sweep each colour in turn takes one damped Gauss-Newton step of its own
(x, y, amplitude) against the image minus the current model of all the others. Three sweeps
reach the joint least-squares fit of detection's gaussian refinement (fit_groups) closely on
psi's samples of crowded 64x64 frames: the per-localization spread over 16 samples has the joint
fit's median (ratio 1.000) and r 0.96-0.997 with it. Emitters closer than ~1.5 camera px (one
blob) converge more slowly along the line joining them: the spread of such pairs is
underestimated, which the calibration scale fitted with this method (its neighbour term) takes
up on average.

A localization counts in a sample when its fitted amplitude keeps detection's `keep_amplitude`
(half an emitter) and it ended within the association tolerance of phi's position: the
`fraction` column, as detection's share of samples in which it was found.

Units as in localization.detection: images [N, H, W] on the HR grid (KDE units); positions (x, y)
in HR pixels inside the fit (HR pixel J has centre J + 1/2), LR pixels at the interface.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from smlm_tfdiff.localization.batched import _integrals, _stack, several_frames
from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.localization.detection import DEBLEND_DEFAULTS
from smlm_tfdiff.simulation.config import check_config
from smlm_tfdiff.validation import as_numpy, as_positions

ITERATIONS = 3  # Gauss-Seidel sweeps (module docstring).
_DAMPING = 1e-3  # Levenberg-Marquardt damping of each 3x3 system, relative to its diagonal.
# Localizations closer than refine_radius + this many kernel widths (Chebyshev, HR px) are
# coupled: their windows see each other's kernel.
COUPLING_SIGMAS = 3.0


def _kernel(coord, pixels, sigma):
    """Integral of N(coord, sigma^2) over the pixels [j, j + 1): coord [..., 1], pixels [P]
    (HR px) -> [..., P] (batched._integrals without the derivative)."""
    z = (pixels - coord) / (np.sqrt(2.0) * sigma)
    return 0.5 * (erf(z + 1.0 / (np.sqrt(2.0) * sigma)) - erf(z))


def _colours(xy, valid, link):
    """Greedy colouring [N, M] int of the localizations of each image: no two of one colour
    within `link` HR px (Chebyshev), so a colour's steps do not interact (Gauss-Seidel)."""
    n, m = valid.shape
    near = (np.abs(xy[:, :, None, :] - xy[:, None, :, :]).max(-1) <= link) & valid[:, :, None] \
        & valid[:, None, :]
    colour = np.full((n, m), -1, np.int64)
    for j in range(m):
        taken = np.where(near[:, j, :j], colour[:, :j], -1)  # Colours of earlier neighbours.
        used = np.zeros((n, m + 1), bool)
        rows = np.repeat(np.arange(n)[:, None], j, 1)
        used[rows[taken >= 0], taken[taken >= 0]] = True
        colour[:, j] = np.argmin(used, axis=1)
    return np.where(valid, colour, 0)


def refit_positions(images, xy0, valid, config, detection=None, iterations=ITERATIONS):
    """Localizations refitted in each image of a stack.

    images: [N, H, W] or [N, H, W, 1] KDE (KDE units, the HR grid of `config`).
    xy0: [N, M, 2] start positions (x, y), HR px; valid: [N, M] bool (padding False).
    detection: a DetectionConfig (its refine_radius sets the window); iterations: sweeps.
    Returns (xy [N, M, 2] HR px, amplitude [N, M] in emitters); padding keeps its start and 0,
    as does a localization whose window holds no pixel of the image (one beyond its edge: there
    is nothing to fit, so no sample holds it). Positions stay within refine_radius + 1/2 HR px
    of their start (detection's bound).
    """
    check_config(config)
    ims = _stack(images)
    xy0 = np.asarray(xy0, np.float64)
    valid = np.asarray(valid, bool)
    n, h, w = ims.shape
    if xy0.shape[:1] != (n,) or xy0.ndim != 3 or xy0.shape[2] != 2 or valid.shape != xy0.shape[:2]:
        raise ValueError(f"xy0 must be [N, M, 2] and valid [N, M] for {n} images (got "
                         f"{xy0.shape} and {valid.shape})")
    if not np.all(np.isfinite(xy0[valid])):
        raise ValueError("xy0 contains NaN or Inf at valid entries")
    if detection is None:
        detection = DetectionConfig()
    sigma, norm = float(config.kde_sigma), float(config.kde_norm)
    radius = int(detection.refine_radius)
    m = xy0.shape[1]
    if m == 0 or not valid.any():
        return xy0.copy(), np.zeros((n, m))
    d = np.arange(-radius, radius + 1)
    cols = np.floor(xy0[..., 0]).astype(np.int64)[..., None] + d  # [N, M, K]
    rows = np.floor(xy0[..., 1]).astype(np.int64)[..., None] + d
    # Window pixels outside the image (or of padding) get zero kernels: the model is separable
    # in rows and columns, so are these masks, and zero Jacobian rows drop those pixels.
    col_in = ((cols >= 0) & (cols < w) & valid[..., None]).astype(np.float64)
    row_in = ((rows >= 0) & (rows < h) & valid[..., None]).astype(np.float64)
    valid = valid & col_in.any(-1) & row_in.any(-1)
    cols, rows = np.clip(cols, 0, w - 1), np.clip(rows, 0, h - 1)
    image_of = np.arange(n)[:, None, None, None]
    pixel_rows, pixel_cols = rows[..., :, None], cols[..., None, :]
    data = ims[image_of, pixel_rows, pixel_cols]  # [N, M, K, K]
    fcols, frows = cols.astype(np.float64), rows.astype(np.float64)
    grid_cols, grid_rows = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    # Start amplitude: the image at the start over a centred unit kernel's peak pixel.
    peak = norm * _integrals(0.0, -0.5, sigma)[0] ** 2
    centre = data[..., radius, radius]
    amp = np.where(valid, np.maximum(centre / peak, 1e-3), 0.0)
    xy = np.where(valid[..., None], xy0, 0.0)
    slack = radius + 0.5
    eye = np.eye(3)
    colour = _colours(xy0, valid, radius + COUPLING_SIGMAS * sigma)
    for _ in range(int(iterations)):
        for c in range(int(colour.max()) + 1):
            # The model of every localization on the image grid, one product per image.
            ex_all = _kernel(xy[..., 0:1], grid_cols, sigma)  # [N, M, W]
            ey_all = _kernel(xy[..., 1:2], grid_rows, sigma) * amp[..., None]
            model = norm * np.matmul(ey_all.transpose(0, 2, 1), ex_all)  # [N, H, W]
            resid = data - model[image_of, pixel_rows, pixel_cols]  # [N, M, K, K]
            ex, dex = _integrals(xy[..., 0:1], fcols, sigma)  # [N, M, K]
            ey, dey = _integrals(xy[..., 1:2], frows, sigma)
            ex, dex, ey, dey = ex * col_in, dex * col_in, ey * row_in, dey * row_in
            # J = norm [a ey (x) dex, a dey (x) ex, ey (x) ex]: J^T J and J^T r by rows and
            # columns separately.
            r_ex = np.einsum("nmrc,nmc->nmr", resid, ex)
            r_dex = np.einsum("nmrc,nmc->nmr", resid, dex)
            s = {k: v.sum(-1) for k, v in (("ey2", ey * ey), ("dey2", dey * dey),
                                           ("eydey", ey * dey), ("ex2", ex * ex),
                                           ("dex2", dex * dex), ("exdex", ex * dex))}
            a = amp
            normal = norm ** 2 * np.stack([
                np.stack([a * a * s["ey2"] * s["dex2"], a * a * s["eydey"] * s["exdex"],
                          a * s["ey2"] * s["exdex"]], -1),
                np.stack([a * a * s["eydey"] * s["exdex"], a * a * s["dey2"] * s["ex2"],
                          a * s["eydey"] * s["ex2"]], -1),
                np.stack([a * s["ey2"] * s["exdex"], a * s["eydey"] * s["ex2"],
                          s["ey2"] * s["ex2"]], -1)], -2)  # [N, M, 3, 3]
            grad = norm * np.stack([a * (ey * r_dex).sum(-1), a * (dey * r_ex).sum(-1),
                                    (ey * r_ex).sum(-1)], -1)
            normal = normal + _DAMPING * eye * (
                np.diagonal(normal, axis1=-2, axis2=-1)[..., None, :] + 1e-12)
            step = np.linalg.solve(normal, grad[..., None])[..., 0]
            step = np.where((valid & (colour == c))[..., None], step, 0.0)
            xy = np.clip(xy + step[..., :2], xy0 - slack, xy0 + slack)
            amp = np.where(valid, np.maximum(amp + step[..., 2], 0.0), 0.0)
    return np.where(valid[..., None], xy, xy0), amp


def localization_uncertainty_refit(samples, reference, config, detection=None, tolerance_hr=4.0,
                                   context=None, iterations=ITERATIONS):
    """Per-localization uncertainty from posterior samples by refitting the localizations in each
    (the dict of ``batched.localization_uncertainty_batched``, which detects instead).

    samples: [S, H, W] or [S, H, W, 1] KDE samples of one image (KDE units, HR grid of
        ``config``) with reference [M, 2] (x, y) LR px, the localizations to score; or several
        images at once, [B, S, H, W(, 1)] with a list of B references.
    context: None, or per image (a list for B images) [C, 2] LR px positions of other
        localizations in the image (neighbours owned elsewhere): refitted with the reference,
        so that their blobs are not read as the reference's, and not reported.
    tolerance_hr: a refitted position further than this (HR px) from the reference does not
        count, nor one whose amplitude is under detection's keep_amplitude.
    Returns (a list of B) dicts: xy [M, 2], mean_xy [M, 2] (LR px; NaN where never counted),
    std_nm [M, 2] (nm, ddof 1; NaN with fewer than 2 counted samples), uncertainty_nm [M],
    fraction [M] (share of samples in which it counted).
    """
    check_config(config)
    arr = as_numpy(samples, "samples")
    many = several_frames(arr, reference)
    if not many:
        arr, reference = arr[None], [reference]
        context = None if context is None else [context]
    if arr.ndim == 5:
        arr = arr[..., 0]
    b, s = arr.shape[:2]
    refs = [as_positions(r, f"reference[{i}]", count="M") for i, r in enumerate(reference)]
    if context is None:
        context = [np.zeros((0, 2))] * b
    if len(context) != b:
        raise ValueError(f"context must hold one [C, 2] array per image ({b}; got {len(context)})")
    others = [as_positions(c, f"context[{i}]", count="C") for i, c in enumerate(context)]
    u = config.upsample
    width = max((len(r) + len(c) for r, c in zip(refs, others)), default=0)
    xy0 = np.zeros((b, width, 2))
    valid = np.zeros((b, width), bool)
    for i, (r, c) in enumerate(zip(refs, others)):
        xy0[i, :len(r) + len(c)] = np.concatenate([r, c]) * u
        valid[i, :len(r) + len(c)] = True
    xy, amp = refit_positions(arr.reshape((b * s,) + arr.shape[2:]), np.repeat(xy0, s, 0),
                              np.repeat(valid, s, 0), config, detection, iterations)
    xy, amp = xy.reshape(b, s, width, 2) / u, amp.reshape(b, s, width)
    keep = DEBLEND_DEFAULTS["keep_amplitude"]
    out = []
    for i, r in enumerate(refs):
        dev = xy[i, :, :len(r)] - r[None]  # [S, M, 2], LR px
        counted = (amp[i, :, :len(r)] >= keep) & (np.hypot(dev[..., 0], dev[..., 1])
                                                  <= float(tolerance_hr) / u)
        count = counted.sum(0).astype(np.float64)
        dev = np.where(counted[..., None], dev, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = dev.sum(0) / count[:, None]
            var = (((dev - mean[None]) ** 2 * counted[..., None]).sum(0)
                   / (count[:, None] - 1))
        var = np.where(count[:, None] >= 2, np.maximum(var, 0.0), np.nan)
        std_nm = np.sqrt(var) * config.pixel_size_nm
        out.append({"xy": r, "mean_xy": r + mean, "std_nm": std_nm,
                    "uncertainty_nm": np.sqrt(np.mean(std_nm ** 2, axis=1)),
                    "fraction": count / max(s, 1)})
    return out if many else out[0]
