"""Per-localization uncertainty from posterior KDE samples.

The localizations are phi's (detected on y_hat). In every posterior sample the same detection runs,
and its detections are associated one-to-one with phi's (Hungarian matching within a tolerance).
Each localization then has a cloud of sampled positions: its posterior std in x and y, and the
fraction of samples in which it appears (a detection-confidence score).
"""

import numpy as np

from smlm_tfdiff.localization.batched import uncertainty_from_detections
from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.localization.metrics import match


def localization_uncertainty(samples, y_hat, config, tolerance_hr=4.0, reference=None,
                             **detect_kwargs):
    """samples [S, H, W(, 1)] KDE samples of one frame, y_hat [H, W(, 1)] phi's KDE (KDE units,
    HR grid of `config`); or batched: samples [B, S, H, W(, 1)], y_hat [B, H, W(, 1)].

    tolerance_hr: association radius in HR pixels. detect_kwargs go to `detect`.
    reference: the localizations to score, [M, 2] (x, y) LR pixels (a list of them when batched),
      instead of the detections on y_hat (y_hat is then unused and may be None).
    Returns (a list of, when batched) dicts with, for M localizations:
      xy [M, 2]        phi's positions (x, y) in LR pixels
      mean_xy [M, 2]   mean of the associated sample positions (LR px; NaN where none)
      std_nm [M, 2]    their std in x and y (nm, ddof 1; NaN with fewer than 2)
      uncertainty_nm [M]  sqrt((std_x^2 + std_y^2) / 2), one number per localization (nm)
      fraction [M]     fraction of samples in which the localization appears
    """
    samples = np.asarray(samples)
    if reference is not None:
        if samples.ndim in (3, 4) and not isinstance(reference, (list, tuple)):
            return _one(samples, None, config, tolerance_hr, detect_kwargs, reference)
        if samples.ndim in (4, 5) and len(reference) == len(samples):
            return [_one(s, None, config, tolerance_hr, detect_kwargs, r)
                    for s, r in zip(samples, reference)]
        raise ValueError(f"with reference, samples must be [S, H, W(, 1)] and reference [M, 2], "
                         f"or batched [B, S, H, W(, 1)] with a list of B references (got samples "
                         f"{samples.shape})")
    y_hat = np.asarray(y_hat)
    if samples.ndim == y_hat.ndim + 1 and y_hat.ndim in (2, 3) and (
            y_hat.ndim == 2 or y_hat.shape[-1] == 1):
        return _one(samples, y_hat, config, tolerance_hr, detect_kwargs)
    if samples.ndim == y_hat.ndim + 1 and len(samples) == len(y_hat):
        return [_one(s, y, config, tolerance_hr, detect_kwargs) for s, y in zip(samples, y_hat)]
    raise ValueError(f"samples must be [S, H, W(, 1)] with y_hat [H, W(, 1)], or batched "
                     f"[B, S, H, W(, 1)] with y_hat [B, H, W(, 1)] (got {samples.shape} and "
                     f"{y_hat.shape})")


def _one(samples, y_hat, config, tolerance_hr, detect_kwargs, reference=None):
    ref = detect(y_hat, config, **detect_kwargs) if reference is None else reference
    return uncertainty_from_detections(detect(samples, config, **detect_kwargs), ref, config,
                                       tolerance_hr)


def localization_errors(locs, truth, config, tolerance):
    """Errors of scored localizations against the truth, for z = error / reported std.

    locs: per frame, a dict of `localization_uncertainty`; truth: per frame, [K, 2] true (x, y) LR
    px; tolerance: matching radius, LR px (one-to-one, `match`).
    Returns (err_xy, err_mean, std_nm), each [M, 2] nm over all matched localizations: phi's
    position minus the truth, the samples' mean position minus the truth, the reported std.
    """
    err_xy, err_mean, std_nm = [], [], []
    for loc, t in zip(locs, truth):
        p, q = match(loc["xy"], t, tolerance)
        err_xy.append((loc["xy"][p] - t[q]) * config.pixel_size_nm)
        err_mean.append((loc["mean_xy"][p] - t[q]) * config.pixel_size_nm)
        std_nm.append(loc["std_nm"][p])
    return tuple(np.concatenate(v).reshape(-1, 2) for v in (err_xy, err_mean, std_nm))
