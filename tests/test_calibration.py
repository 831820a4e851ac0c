"""smlm_tfdiff.uncertainty.calibration: synthetic cases whose right answer is known (pure NumPy, fast)."""

import math

import numpy as np
from scipy import stats
import pytest

from smlm_tfdiff.uncertainty import calibration as cal

S, N = 100, 20_000  # Samples per value, values (pixels).


def gaussian_case(width=1.0, seed=0, shape=(N,)):
    """truth ~ N(mu, 1); samples ~ N(mu, width^2): calibrated when width == 1."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 3.0, shape)
    truth = mu + rng.normal(size=shape)
    samples = mu[None] + width * rng.normal(size=(S,) + shape)
    return samples, truth


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("method", ["rank", "quantile"])
def test_calibrated_gaussian_coverage_is_nominal(method):
    samples, truth = gaussian_case()
    levels = np.array([0.1, 0.5, 0.9])
    cov = cal.coverage(samples, truth, levels, method=method)
    expected = levels if method == "rank" else cal.expected_quantile_coverage(levels, S)
    # 4 binomial standard errors (the values are independent here).
    np.testing.assert_array_less(np.abs(cov - expected), cal.binomial_tolerance(expected, N, 4.0))


def test_quantile_coverage_expectation_is_below_nominal():
    np.testing.assert_allclose(cal.expected_quantile_coverage([0.5, 0.9], 100),
                               [0.5 * 99 / 101, 0.9 * 99 / 101])
    # Many samples: the finite-sample deficit vanishes.
    assert cal.expected_quantile_coverage(0.9, 10_000)[0] == pytest.approx(0.9, abs=2e-4)


@pytest.mark.parametrize("width", [0.5, 2.0])
def test_wrong_width_gives_predicted_coverage(width):
    samples, truth = gaussian_case(width)
    cov = cal.coverage(samples, truth, [0.5, 0.9], method="rank")
    # Truth - mu ~ N(0, 1), interval mu +- width * z_{(1+l)/2}: coverage 2 Phi(width z) - 1.
    want = [2 * normal_cdf(width * stats.norm.ppf((1 + lv) / 2)) - 1 for lv in (0.5, 0.9)]
    np.testing.assert_allclose(cov, want, atol=0.02)
    if width < 1:
        assert np.all(cov < np.array([0.5, 0.9]) - 0.1)  # Too narrow: under-coverage.
    else:
        assert np.all(cov > np.array([0.5, 0.9]) + 0.05)  # Too wide: over-coverage.


def test_pit_uniform_when_calibrated_and_not_when_narrow():
    samples, truth = gaussian_case()
    u = cal.pit(samples, truth)
    assert u.shape == truth.shape and np.all((u > 0) & (u < 1))
    hist = cal.pit_histogram(u, bins=10)
    assert sum(hist["counts"]) == N and hist["dof"] == 9
    assert hist["chi2"] < 40  # chi2_9 has mean 9; 40 is far in the tail.
    narrow = cal.pit_histogram(cal.pit(*gaussian_case(0.5)), bins=10)
    assert narrow["chi2"] > 1000  # U-shaped.
    assert narrow["counts"][0] > 2 * narrow["counts"][5]


def test_pit_spreads_ties_uniformly():
    # Truth 0 and all samples exactly 0 (e.g. an empty KDE region): PIT uniform, not stuck at 0.
    u = cal.pit(np.zeros((10, 50_000)), np.zeros(50_000), seed=1)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - math.sqrt(1 / 12)) < 0.01
    cov = cal.coverage(np.zeros((10, 50_000)), np.zeros(50_000), [0.5, 0.9], method="rank")
    np.testing.assert_allclose(cov, [0.5, 0.9], atol=0.01)


def test_coverage_mask_sample_axis_and_shapes():
    samples, truth = gaussian_case(shape=(40, 50))  # [S, 40, 50]
    mask = np.zeros((40, 50), bool)
    mask[:, :25] = True
    truth_bad = truth.copy()
    truth_bad[:, 25:] = 1e6  # Outside every interval, but masked out.
    full = cal.coverage(samples[:, :, :25], truth[:, :25], [0.9])
    np.testing.assert_allclose(cal.coverage(samples, truth_bad, [0.9], mask=mask), full)
    # The sample axis may be elsewhere.
    moved = np.moveaxis(samples, 0, 1)  # [40, S, 50]
    np.testing.assert_allclose(cal.coverage(moved, truth, [0.5, 0.9], axis=1),
                               cal.coverage(samples, truth, [0.5, 0.9]))
    assert np.isnan(cal.coverage(samples, truth, [0.5], mask=np.zeros((40, 50), bool)))[0]
    with pytest.raises(ValueError, match="truth's shape"):
        cal.coverage(samples, truth[:, :10])
    with pytest.raises(ValueError, match="levels"):
        cal.coverage(samples, truth, [1.0])
    with pytest.raises(ValueError, match="method"):
        cal.coverage(samples, truth, method="bogus")
    with pytest.raises(ValueError, match="NaN"):
        cal.coverage(samples, np.full_like(truth, np.nan))


def test_central_interval_and_reliability():
    samples, truth = gaussian_case()
    lo, hi = cal.central_interval(samples, 0.9)
    assert lo.shape == truth.shape and np.all(lo < hi)
    # Sample quantiles of N(mu, 1): half-width ~1.645.
    assert np.median(hi - lo) / 2 == pytest.approx(1.645, rel=0.05)
    rel = cal.reliability(samples, truth)
    assert rel["levels"] == pytest.approx(list(np.arange(1, 10) / 10))
    assert rel["num_values"] == N
    assert np.all(np.diff(rel["coverage_rank"]) > 0)  # Monotone in the level.
    err = np.abs(np.array(rel["coverage_rank"]) - np.array(rel["levels"]))
    assert np.all(err < 2 * np.array(rel["binomial_2sigma"]))  # 4 sigma.
    err_q = np.abs(np.array(rel["coverage_quantile"]) - np.array(rel["expected_quantile"]))
    assert np.all(err_q < 2 * np.array(rel["binomial_2sigma"]))


def test_z_std_equals_error_to_reported_ratio():
    rng = np.random.default_rng(3)
    reported = rng.uniform(5.0, 30.0, size=(20_000, 2))  # nm, per localization and axis
    for ratio in (0.5, 1.0, 2.0):
        errors = ratio * reported * rng.normal(size=reported.shape)
        s = cal.z_summary(cal.z_scores(errors, reported))
        assert s["std"] == pytest.approx(ratio, rel=0.02)
        assert s["robust_std"] == pytest.approx(ratio, rel=0.04)
        assert s["n"] == reported.size
        assert s["std_ci95"][0] < s["std"] < s["std_ci95"][1]
    calibrated = cal.z_summary(rng.normal(size=50_000))
    assert calibrated["frac_abs_le_1"] == pytest.approx(0.6827, abs=0.01)
    assert calibrated["frac_abs_le_2"] == pytest.approx(0.9545, abs=0.005)
    assert abs(calibrated["mean"]) < 0.02


def test_z_scores_drop_invalid_stds_and_outlier_robustness():
    z = cal.z_scores([1.0, 2.0, 3.0, np.nan], [1.0, 0.0, np.nan, 1.0])
    assert z[0] == 1.0 and np.all(np.isnan(z[1:]))
    assert cal.z_summary(z)["n"] == 1 and math.isnan(cal.z_summary(z)["std"])
    rng = np.random.default_rng(4)
    z = rng.normal(size=5000)
    z[:25] = 50.0  # 0.5% gross outliers (mismatches): std blows up, robust std does not.
    s = cal.z_summary(z)
    assert s["std"] > 3 and s["robust_std"] == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("n", [2, 3, 50])
def test_chi2_interval_covers_the_truth_with_small_n(n):
    # 95% interval of std(z) from n normal values: contains 1 about 95% of the time (2000 draws:
    # binomial standard error 0.005), and is finite even for n = 2.
    rng = np.random.default_rng(5)
    intervals = np.array([cal.z_summary(rng.normal(size=n))["std_ci95"] for _ in range(2000)])
    assert np.all(np.isfinite(intervals))
    hits = (intervals[:, 0] <= 1.0) & (1.0 <= intervals[:, 1])
    assert np.mean(hits) == pytest.approx(0.95, abs=0.015)


def test_std_map_agreement_scale_and_correlation():
    rng = np.random.default_rng(6)
    ref = rng.gamma(2.0, 0.05, size=(4, 80, 80))
    out = cal.std_map_agreement(1.1 * ref, ref)
    assert out["pearson_r"] == pytest.approx(1.0)
    assert out["pearson_r_median"] == pytest.approx(1.0)
    assert out["mean_ratio"] == pytest.approx(1.1)
    assert out["mean_ratio_per_frame"] == pytest.approx([1.1] * 4)
    assert out["num_pixels"] == 4 * 80 * 80
    # Independent noise of equal variance on top: r = var(ref) / (var(ref) + var(noise)) = 0.5.
    noisy = ref + rng.normal(0, ref.std(), ref.shape)
    assert cal.std_map_agreement(noisy, ref)["pearson_r"] == pytest.approx(
        1 / math.sqrt(2), abs=0.01)
    # One [H, W] map and a mask.
    mask = np.zeros((80, 80), bool)
    mask[:40] = True
    one = ref[0].copy()
    other = one.copy()
    other[40:] = rng.permutation(other[40:].ravel()).reshape(40, 80)  # Unrelated outside mask.
    res = cal.std_map_agreement(other, one, mask=mask)
    assert res["pearson_r"] == pytest.approx(1.0) and res["num_pixels"] == 40 * 80
    assert math.isnan(cal.pearson_r(np.ones(10), np.arange(10)))
    with pytest.raises(ValueError, match="same shape"):
        cal.std_map_agreement(ref, ref[:2])


def test_target_helpers():
    assert cal.within(1.0, 0.8, 1.25) is True
    assert cal.within(1.3, 0.8, 1.25) is False
    assert cal.within(float("nan"), 0.8, 1.25) is None
    assert cal.coverage_within([0.52, 0.86], [0.5, 0.9]) is True
    assert cal.coverage_within([0.52, 0.84], [0.5, 0.9]) is False
    assert cal.coverage_within([np.nan, 0.9], [0.5, 0.9]) is None
    np.testing.assert_allclose(cal.binomial_tolerance(0.5, 10_000, 3.0), 0.015)


def test_sharpness_ranks_errors_by_reported_std():
    rng = np.random.default_rng(0)
    n = 4000
    s = rng.uniform(5, 50, n)
    honest = cal.sharpness(rng.normal(0, s), s)
    # |e| = s |N(0,1)|: Spearman's rho of s and s |N| for s ~ U(5, 50) is about 0.45; its null sd
    # is 1 / sqrt(n - 1) ~ 0.016.
    assert honest["spearman_abs_error_vs_std"] > 0.3 and honest["p_value"] < 1e-10
    assert honest["n"] == n and abs(honest["mean_std"] - s.mean()) < 1e-9
    blind = cal.sharpness(rng.normal(0, 20, n), s)  # Errors that do not depend on the std.
    assert abs(blind["spearman_abs_error_vs_std"]) < 4 / np.sqrt(n - 1)
    const = cal.sharpness(rng.normal(0, 20, n), np.full(n, 20.0))
    assert np.isnan(const["spearman_abs_error_vs_std"])
    # Pairs with a NaN or non-positive std are dropped, not counted.
    e = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    sd = np.array([1.0, 2.0, 3.0, 0.0, 5.0])
    assert cal.sharpness(e, sd)["n"] == 3
