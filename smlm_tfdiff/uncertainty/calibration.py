"""Calibration statistics of posterior samples (pure NumPy): is the reported uncertainty honest?

Three questions, each answered against a reference whose right answer is known:

  std-map agreement   psi's per-pixel std map against a reference posterior's (MCMC on isolated
                      emitters): Pearson r (pooled over all pixels, and per frame) and the ratio of
                      the means. A calibrated sampler has r ~ 1 and ratio ~ 1.
  interval coverage   the truth against central credible intervals of the samples: the fraction of
                      (selected) pixels whose true value lies inside the central `level` interval.
                      Calibrated: coverage = level. Two estimators:
                        "quantile": the interval between the np.quantile (linear interpolation)
                          (1 - level)/2 and (1 + level)/2 sample quantiles. With S exchangeable
                          samples its expected coverage is level * (S - 1) / (S + 1) (slightly
                          low: 1.8 points at 90% for S = 100; see `expected_quantile_coverage`).
                        "rank": from the randomised PIT (below); exactly `level` in expectation
                          for any S when truth and samples are exchangeable.
  z-scores            error / reported std per localization and axis. Calibrated (and Gaussian):
                      z ~ N(0, 1), std(z) = 1. std(z) > 1: the reported std is too small
                      (over-confident); < 1: too large. If the errors are r times the reported std,
                      std(z) = r.

PIT (probability integral transform): the rank of the truth among the S samples, randomised over
ties and within the rank: pit = (#{s < truth} + U * (#{s == truth} + 1)) / (S + 1), U ~ U(0, 1).
Uniform on (0, 1) exactly when the truth is exchangeable with the samples.

Every function takes NumPy arrays (anything np.asarray accepts) and returns NumPy values or plain
floats; nothing here depends on TensorFlow.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

DEFAULT_LEVELS = tuple(np.round(np.arange(1, 10) / 10.0, 2))  # 0.1 .. 0.9 (reliability diagram)
COVERAGE_METHODS = ("quantile", "rank")


# --------------------------------------------------------------------------------- validation
def _as_float(x, name):
    arr = np.asarray(x, dtype=np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _check_levels(levels):
    lv = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    if lv.ndim != 1 or lv.size == 0 or np.any(~np.isfinite(lv)) or np.any(lv <= 0) \
            or np.any(lv >= 1):
        raise ValueError(f"levels must be numbers in (0, 1) (got {levels!r})")
    return lv


def _samples_truth(samples, truth, axis):
    """samples with one sample axis, truth without it -> (samples [S, N], truth [N])."""
    s = _as_float(samples, "samples")
    t = _as_float(truth, "truth")
    if s.ndim < 1:
        raise ValueError("samples must have a sample axis")
    s = np.moveaxis(s, axis, 0)
    if s.shape[1:] != t.shape:
        raise ValueError(f"samples without the sample axis {axis} must have the truth's shape "
                         f"(got samples {np.shape(samples)}, truth {t.shape})")
    if s.shape[0] < 1:
        raise ValueError("samples is empty along the sample axis")
    return s.reshape(s.shape[0], -1), t.reshape(-1)


def _mask(mask, shape, name="mask"):
    if mask is None:
        return np.ones(int(np.prod(shape)), dtype=bool)
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (got {m.shape})")
    return m.astype(bool).reshape(-1)


# ---------------------------------------------------------------------------- std-map agreement
def pearson_r(a, b) -> float:
    """Pearson correlation of two equally shaped arrays (flattened); NaN if either is constant."""
    a, b = _as_float(a, "a").ravel(), _as_float(b, "b").ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same number of values (got {a.size}, {b.size})")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    return float(np.dot(da, db) / den) if den > 0 else float("nan")


def std_map_agreement(std, ref_std, mask=None) -> dict:
    """Agreement of per-pixel std maps std and ref_std, both [B, ...] (B frames; or one [H, W]).

    mask: optional bool array like std selecting the pixels used (all by default).
    Returns pearson_r (pooled over the selected pixels of all frames), pearson_r_median and
    pearson_r_per_frame (one per frame), mean_ratio = mean(std) / mean(ref_std) over the
    selected pixels, mean_ratio_median / mean_ratio_per_frame, mean_std, mean_ref_std, num_pixels.
    """
    std, ref = _as_float(std, "std"), _as_float(ref_std, "ref_std")
    if std.shape != ref.shape:
        raise ValueError(f"std and ref_std must have the same shape (got {std.shape}, {ref.shape})")
    if std.ndim == 2:
        std, ref = std[None], ref[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if std.ndim < 2 or std.shape[0] < 1:
        raise ValueError(f"std maps must be [B, ...] or [H, W] (got shape {std.shape})")
    m = _mask(mask, std.shape).reshape(std.shape[0], -1)
    a, b = std.reshape(std.shape[0], -1), ref.reshape(ref.shape[0], -1)
    per_r = np.array([pearson_r(x[k], y[k]) for x, y, k in zip(a, b, m)])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_ratio = np.array([x[k].mean() / y[k].mean() if k.any() else np.nan
                              for x, y, k in zip(a, b, m)])
    mean_std, mean_ref = float(a[m].mean()), float(b[m].mean())
    return {"pearson_r": pearson_r(a[m], b[m]),
            "pearson_r_median": _nanmedian(per_r),
            "pearson_r_per_frame": per_r.tolist(),
            "mean_ratio": mean_std / mean_ref if mean_ref > 0 else float("nan"),
            "mean_ratio_median": _nanmedian(per_ratio),
            "mean_ratio_per_frame": per_ratio.tolist(),
            "mean_std": mean_std, "mean_ref_std": mean_ref, "num_pixels": int(m.sum())}


def _nanmedian(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


# ------------------------------------------------------------------------------ PIT, coverage
def pit(samples, truth, axis=0, seed=0) -> np.ndarray:
    """Randomised probability integral transform of truth under the samples (module docstring).

    samples: the truth's shape plus one sample axis `axis`; truth: any shape. Returns floats in
    (0, 1) with the truth's shape (flattened to [N] if truth is a scalar array of shape ()).
    Ties (e.g. exact zeros in both) are spread uniformly over their ranks.
    """
    s, t = _samples_truth(samples, truth, axis)
    below = np.sum(s < t[None], axis=0)
    equal = np.sum(s == t[None], axis=0)
    u = np.random.default_rng(seed).random(t.shape)
    out = (below + u * (equal + 1)) / (s.shape[0] + 1)
    return out.reshape(np.shape(truth))


def central_interval(samples, level, axis=0):
    """The central `level` credible interval of the samples along `axis` (np.quantile, linear
    interpolation): (lower, upper) with the samples' shape less that axis."""
    lv = _check_levels(level)
    if lv.size != 1:
        raise ValueError("central_interval takes one level")
    s = _as_float(samples, "samples")
    lo, hi = np.quantile(s, [(1 - lv[0]) / 2, (1 + lv[0]) / 2], axis=axis)
    return lo, hi


def expected_quantile_coverage(level, num_samples) -> np.ndarray:
    """Expected coverage of the "quantile" interval for a perfectly calibrated sampler with
    num_samples exchangeable samples: level * (S - 1) / (S + 1) (the truth's rank is uniform on
    the S + 1 gaps; the linearly interpolated quantiles span level * (S - 1) of them)."""
    lv = _check_levels(level)
    s = int(num_samples)
    if s < 2:
        raise ValueError(f"num_samples must be >= 2 (got {num_samples})")
    return lv * (s - 1) / (s + 1)


def coverage(samples, truth, levels=(0.5, 0.9), mask=None, axis=0, method="quantile",
             seed=0) -> np.ndarray:
    """Empirical coverage of central credible intervals: for each level, the fraction of selected
    truth values inside the central `level` interval of their samples.

    samples: truth's shape plus a sample axis `axis` ([S, ...] by default); truth: [...];
    mask: bool like truth (None: all values). method: "quantile" (sample quantiles, expected
    level * (S - 1) / (S + 1) when calibrated) or "rank" (randomised PIT, expected level).
    Returns float64 [len(levels)] (NaN where no value is selected).
    """
    lv = _check_levels(levels)
    if method not in COVERAGE_METHODS:
        raise ValueError(f"method must be one of {COVERAGE_METHODS} (got {method!r})")
    s, t = _samples_truth(samples, truth, axis)
    m = _mask(mask, np.shape(truth))
    s, t = s[:, m], t[m]
    if t.size == 0:
        return np.full(lv.shape, np.nan)
    if method == "rank":
        u = pit(s, t, axis=0, seed=seed)
        return np.array([np.mean(np.abs(u - 0.5) <= level / 2) for level in lv])
    out = []
    for level in lv:
        lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out.append(np.mean((t >= lo) & (t <= hi)))
    return np.array(out)


def reliability(samples, truth, levels=DEFAULT_LEVELS, mask=None, axis=0, seed=0) -> dict:
    """The reliability diagram's data: nominal levels, empirical coverage by both estimators, the
    calibrated expectation of the quantile estimator, the number of values and a binomial 2-sigma
    band (independent values assumed: neighbouring pixels are correlated, so it is a lower bound
    on the real scatter). Returns a dict of lists."""
    lv = _check_levels(levels)
    s, t = _samples_truth(samples, truth, axis)
    m = _mask(mask, np.shape(truth))
    n = int(m.sum())
    return {"levels": lv.tolist(),
            "coverage_quantile": coverage(s, t, lv, m, 0, "quantile").tolist(),
            "coverage_rank": coverage(s, t, lv, m, 0, "rank", seed).tolist(),
            "expected_quantile": expected_quantile_coverage(lv, s.shape[0]).tolist()
            if s.shape[0] >= 2 else [float("nan")] * lv.size,
            "binomial_2sigma": binomial_tolerance(lv, n, 2.0).tolist() if n else
            [float("nan")] * lv.size,
            "num_values": n}


def binomial_tolerance(p, n, num_sigma=3.0) -> np.ndarray:
    """num_sigma standard errors of a proportion p estimated from n independent trials."""
    p = np.asarray(p, dtype=np.float64)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    return num_sigma * np.sqrt(p * (1 - p) / n)


def pit_histogram(u, bins=10) -> dict:
    """Counts of PIT values in `bins` equal bins of [0, 1] and the chi-square statistic against
    uniform (dof bins - 1). Returns a dict of lists / floats."""
    u = _as_float(u, "u").ravel()
    counts, edges = np.histogram(u, bins=int(bins), range=(0.0, 1.0))
    expected = u.size / int(bins)
    chi2 = float(np.sum((counts - expected) ** 2) / expected) if u.size else float("nan")
    return {"counts": counts.tolist(), "edges": edges.tolist(), "chi2": chi2, "dof": int(bins) - 1}


# ---------------------------------------------------------------------------------- z-scores
def z_scores(errors, stds) -> np.ndarray:
    """errors / stds element-wise (same shape, or broadcastable); entries with a non-finite or
    non-positive std, or a non-finite error, are NaN."""
    e = np.asarray(errors, dtype=np.float64)
    s = np.asarray(stds, dtype=np.float64)
    e, s = np.broadcast_arrays(e, s)
    ok = np.isfinite(e) & np.isfinite(s) & (s > 0)
    z = np.full(e.shape, np.nan)
    z[ok] = e[ok] / s[ok]
    return z


def z_summary(z) -> dict:
    """Summary of z-scores (NaNs dropped): std (ddof 1; the calibration number, 1 when
    calibrated), mean, rms, a robust std (1.4826 * MAD about the median: insensitive to a few
    mismatched outliers), the fractions with |z| <= 1 and <= 2 (0.683 and 0.954 for N(0, 1)),
    and n. A 95% interval of std assuming normal z: std * sqrt((n - 1) / chi2_{(n-1), 0.975 /
    0.025}), exact for any n >= 2."""
    z = np.asarray(z, dtype=np.float64).ravel()
    z = z[np.isfinite(z)]
    n = int(z.size)
    if n < 2:
        nan = float("nan")
        return {"std": nan, "mean": nan, "rms": nan, "robust_std": nan, "frac_abs_le_1": nan,
                "frac_abs_le_2": nan, "std_ci95": [nan, nan], "n": n}
    std = float(np.std(z, ddof=1))
    med = np.median(z)
    k = n - 1
    lo_q, hi_q = stats.chi2.ppf([0.025, 0.975], k)
    return {"std": std, "mean": float(np.mean(z)), "rms": float(np.sqrt(np.mean(z ** 2))),
            "robust_std": float(1.4826 * np.median(np.abs(z - med))),
            "frac_abs_le_1": float(np.mean(np.abs(z) <= 1)),
            "frac_abs_le_2": float(np.mean(np.abs(z) <= 2)),
            "std_ci95": [std * math.sqrt(k / hi_q), std * math.sqrt(k / lo_q)], "n": n}


def sharpness(errors, stds) -> dict:
    """Does the reported std rank the errors? Spearman's rank correlation of |error| with the
    reported std over the pairs where both are finite (positive when larger stds go with larger
    errors; a constant std gives NaN), its two-sided p-value, the mean reported std and n. A
    calibration check (std(z)) passes for an inflated or constant std too; this one does not.
    errors, stds: broadcastable arrays (e.g. [n, 2] x, y errors and stds, same units)."""
    e, s = np.broadcast_arrays(np.asarray(errors, np.float64), np.asarray(stds, np.float64))
    ok = np.isfinite(e) & np.isfinite(s) & (s > 0)
    e, s = np.abs(e[ok]), s[ok]
    n = int(e.size)
    if n < 3 or np.all(s == s[0]):
        rho = p = float("nan")
    else:
        result = stats.spearmanr(e, s)
        rho, p = float(result.statistic), float(result.pvalue)
    return {"spearman_abs_error_vs_std": rho, "p_value": p,
            "mean_std": float(np.mean(s)) if n else float("nan"), "n": n}


def within(value, low, high) -> Optional[bool]:
    """low <= value <= high as a plain bool (None when value is NaN): target checks for JSON."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return bool(low <= value <= high)


def coverage_within(cov, levels: Sequence[float], points=0.05) -> Optional[bool]:
    """Every coverage within +-points of its nominal level (None if any is NaN)."""
    cov = np.asarray(cov, dtype=np.float64)
    lv = _check_levels(levels)
    if cov.shape != lv.shape:
        raise ValueError(f"cov and levels must have the same length (got {cov.shape}, {lv.shape})")
    if not np.all(np.isfinite(cov)):
        return None
    return bool(np.all(np.abs(cov - lv) <= points))


__all__ = ["COVERAGE_METHODS", "DEFAULT_LEVELS", "binomial_tolerance", "central_interval",
           "coverage", "coverage_within", "expected_quantile_coverage", "pearson_r", "pit",
           "pit_histogram", "reliability", "sharpness", "std_map_agreement", "within", "z_scores",
           "z_summary"]
