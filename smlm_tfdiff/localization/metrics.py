"""Scoring localizations against the truth: matching and the SMLM-challenge metrics.

Positions are (x, y) in LR pixels (docs/CONVENTIONS.md); tolerances in HR pixels or nm.

    match(pred, truth, tolerance)        -> (pred_idx, truth_idx), one-to-one (Hungarian)
    localization_metrics(pred, truth, config)   -> SMLM-challenge metrics (Jaccard, RMSE, ...)
    oracle_metrics(positions, mask, config)     -> detection on the TRUE KDE: the ceiling
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import tensorflow as tf
from scipy import optimize, spatial

from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.simulation.physics.kde import render_kde_batch
from smlm_tfdiff.simulation.config import check_config
from smlm_tfdiff.validation import as_numpy, as_positions

# --------------------------------------------------------------------------------- matching
def match(pred, truth, tolerance) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of pred [M, 2] to truth [K, 2] (same units) by the Hungarian algorithm
    on Euclidean distances; pairs farther apart than ``tolerance`` are never matched (the number of
    matches is maximised first, then the total distance minimised).

    Returns (pred_idx, truth_idx): int64 arrays of the matched pairs, sorted by truth index.
    """
    pred, truth = as_positions(pred, "pred", count="M"), as_positions(truth, "truth", count="M")
    tolerance = float(tolerance)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (got {tolerance!r})")
    empty = np.zeros(0, dtype=np.int64)
    if len(pred) == 0 or len(truth) == 0:
        return empty, empty
    dist = spatial.distance.cdist(pred, truth)
    valid = dist <= tolerance
    if not valid.any():
        return empty, empty
    # Any valid assignment costs < big, so a solution with more valid pairs always wins.
    big = (min(dist.shape) + 1) * (tolerance + 1.0)
    rows, cols = optimize.linear_sum_assignment(np.where(valid, dist, big))
    keep = valid[rows, cols]
    rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
    order = np.argsort(cols)
    return rows[order], cols[order]


def _frames(value, name, mask=None) -> List[np.ndarray]:
    """A list of [M, 2], one [M, 2] array (one frame), a padded [N, K, 2] array (+ mask [N, K]),
    a (positions, mask) pair or a dict with 'positions' (and 'mask') -> list of [M, 2]."""
    if isinstance(value, dict):
        value, mask = value["positions"], value.get("mask", mask)
    elif (isinstance(value, tuple) and len(value) == 2 and mask is None
          and np.ndim(value[0]) == 3):
        value, mask = value
    if isinstance(value, (list, tuple)) and len(value) and all(np.ndim(v) == 1 for v in value):
        value = np.asarray(value, dtype=np.float64)  # One frame written as a list of (x, y).
    if isinstance(value, (list, tuple)):
        if mask is not None:
            raise ValueError(f"{name}: a mask goes with a padded [N, K, 2] array, not a list")
        return [as_positions(v, f"{name}[{i}]", count="M") for i, v in enumerate(value)]
    arr = as_numpy(value, name)
    if arr.ndim == 2:
        if mask is not None:
            arr = arr[np.asarray(mask, dtype=bool).reshape(-1)]
        return [as_positions(arr, name, count="M")]
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise ValueError(f"{name} must be a list of [M, 2] arrays or padded [N, K, 2] "
                         f"(got shape {arr.shape})")
    if mask is None:
        mask = np.ones(arr.shape[:2], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != arr.shape[:2]:
        raise ValueError(f"{name} mask shape {mask.shape} does not match positions {arr.shape}")
    return [as_positions(p[m], f"{name}[{i}]", count="M")
            for i, (p, m) in enumerate(zip(arr, mask))]


def _ratio(num, den, empty=1.0):
    return float(num) / float(den) if den > 0 else float(empty)


def localization_metrics(pred, truth, config, tolerance_hr=5.0, tolerance_nm=None, *,
                         truth_mask=None, with_errors=True) -> dict:
    """SMLM-challenge metrics of predicted against true positions (all in LR pixels).

    pred: list (per frame) of [M, 2] arrays (detect() of a batch), or one [M, 2] array (a frame).
    truth: the same forms, or padded [N, K, 2] with truth_mask [N, K] (or a (positions, mask) pair,
        or simulate()'s dict).
    tolerance_hr: matching radius in HR pixels (the seeds: 5 HR px); tolerance_nm, if given,
        overrides it in nm (SMLM challenge 2016: 250 nm) via config.pixel_size_nm.
    Returns a dict of plain floats / ints: TP, FP, FN, precision, recall, jaccard = TP/(TP+FP+FN),
    f1, rmse_lateral_nm (sqrt of the mean of dx^2 + dy^2 over matches), rmse_x_nm, rmse_y_nm,
    mean_shift_x_nm, mean_shift_y_nm, rmse_lateral_bias_corrected_nm (mean shift removed),
    efficiency_lateral = 100 - sqrt((100 (1 - jaccard))^2 + (1/nm * rmse_lateral_nm)^2),
    tolerance_nm, num_frames. precision / recall / jaccard / f1 are 1.0 when their denominator is 0;
    RMSEs, shifts and efficiency are NaN without matches.
    with_errors=True also adds NumPy arrays (drop them before json.dump): "errors" [TP, 2] = pred -
    truth (dx, dy) in LR pixels and "matches" [TP, 3] int = (frame, pred index, truth index).
    """
    check_config(config)
    pred_frames = _frames(pred, "pred")
    truth_frames = _frames(truth, "truth", truth_mask)
    if len(pred_frames) != len(truth_frames):
        raise ValueError(f"pred has {len(pred_frames)} frames but truth has {len(truth_frames)}")
    if tolerance_nm is not None:
        tol = float(tolerance_nm) / config.pixel_size_nm
    else:
        tol = float(tolerance_hr) / config.upsample
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (got {tolerance_hr!r} HR px, "
                         f"{tolerance_nm!r} nm)")
    errors, matches = [], []
    tp = fp = fn = 0
    for f, (p, t) in enumerate(zip(pred_frames, truth_frames)):
        pi, ti = match(p, t, tol)
        tp += len(pi)
        fp += len(p) - len(pi)
        fn += len(t) - len(ti)
        errors.append(p[pi] - t[ti])
        matches.append(np.stack([np.full(len(pi), f), pi, ti], axis=1))
    errors = np.concatenate(errors).reshape(-1, 2) if errors else np.zeros((0, 2))
    matches = (np.concatenate(matches).reshape(-1, 3) if matches
               else np.zeros((0, 3))).astype(np.int64)
    out = {"TP": int(tp), "FP": int(fp), "FN": int(fn),
           "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
           "jaccard": _ratio(tp, tp + fp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
           "tolerance_nm": float(tol * config.pixel_size_nm),
           "num_frames": len(pred_frames)}
    nm = config.pixel_size_nm
    if tp > 0:
        e = errors * nm
        shift = e.mean(axis=0)
        out.update(
            rmse_lateral_nm=float(np.sqrt(np.mean((e ** 2).sum(1)))),
            rmse_x_nm=float(np.sqrt(np.mean(e[:, 0] ** 2))),
            rmse_y_nm=float(np.sqrt(np.mean(e[:, 1] ** 2))),
            mean_shift_x_nm=float(shift[0]), mean_shift_y_nm=float(shift[1]),
            rmse_lateral_bias_corrected_nm=float(np.sqrt(np.mean(((e - shift) ** 2).sum(1)))))
    else:
        for key in ("rmse_lateral_nm", "rmse_x_nm", "rmse_y_nm", "mean_shift_x_nm",
                    "mean_shift_y_nm", "rmse_lateral_bias_corrected_nm"):
            out[key] = float("nan")
    out["efficiency_lateral"] = efficiency(out["jaccard"], out["rmse_lateral_nm"])
    if with_errors:
        out["errors"] = errors
        out["matches"] = matches
    return out


def edge_centre_recall(matches, positions, mask, lr_shape, edge_px=3.0) -> Tuple[float, float]:
    """Recall of the true emitters within edge_px LR pixels of the frame border, and of the rest.

    matches: localization_metrics' "matches" [TP, 3] (frame, pred index, truth index) for truth
        given as padded positions [N, K, 2] (x, y LR px) with mask [N, K]; lr_shape: (h, w) px.
    NaN for a side with no true emitters.
    """
    positions, mask = np.asarray(positions), np.asarray(mask, bool)
    truth = positions[mask]
    h, w = lr_shape
    edge = ((truth[:, 0] < edge_px) | (truth[:, 0] > w - edge_px) | (truth[:, 1] < edge_px)
            | (truth[:, 1] > h - edge_px))
    found = np.zeros(len(truth), bool)
    starts = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    matches = np.asarray(matches, np.int64).reshape(-1, 3)
    found[starts[matches[:, 0]] + matches[:, 2]] = True
    return (float(found[edge].mean()) if edge.any() else float("nan"),
            float(found[~edge].mean()) if (~edge).any() else float("nan"))


def efficiency(jaccard, rmse_nm, alpha=1.0) -> float:
    """SMLM-challenge efficiency 100 - sqrt((100 (1 - jaccard))^2 + (alpha * rmse_nm)^2); alpha in
    1/nm (1 for lateral, 0.5 for axial)."""
    return float(100.0 - math.sqrt((100.0 * (1.0 - jaccard)) ** 2 + (alpha * rmse_nm) ** 2))


def true_kde(positions, mask, config) -> np.ndarray:
    """The exact KDE [N, H_hr, W_hr] (float64) of padded positions [N, K, 2] LR px, mask [N, K]."""
    check_config(config)
    pos = as_numpy(positions, "positions")
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[-1] != 2:
        raise ValueError(f"positions must be [N, K, 2] (got shape {pos.shape})")
    mask = np.ones(pos.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    if mask.size != pos.shape[0] * pos.shape[1]:
        raise ValueError(f"mask shape {mask.shape} does not match positions {pos.shape}")
    mask = mask.reshape(pos.shape[:2])
    if not np.all(np.isfinite(pos[mask])):
        raise ValueError("positions contain NaN or Inf")
    return render_kde_batch(pos, config, mask, dtype=tf.float64).numpy()


def oracle_metrics(positions, mask, config, refine="gaussian", tolerance_hr=5.0, tolerance_nm=None,
                   with_errors=True, **detect_kwargs) -> dict:
    """Detection on the TRUE KDE of the ground truth, scored against it: the ceiling of any
    KDE-based method. positions: [N, K, 2] LR px, mask: [N, K] bool (None = all valid).
    detect_kwargs go to detect(). Returns localization_metrics()'s dict."""
    kde = true_kde(positions, mask, config)
    pred = detect(kde, config, refine=refine, **detect_kwargs)
    pos = as_numpy(positions, "positions").reshape(kde.shape[0], -1, 2)
    mask = np.ones(pos.shape[:2], bool) if mask is None else np.asarray(mask, bool).reshape(
        pos.shape[:2])
    return localization_metrics(pred, pos, config, tolerance_hr, tolerance_nm, truth_mask=mask,
                                with_errors=with_errors)
