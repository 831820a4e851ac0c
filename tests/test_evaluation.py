"""smlm_tfdiff.uncertainty.evaluation: the targets and the scores on inputs whose answer is known
(the MCMC reference itself runs end to end in test_demo.py and test_evaluate_uncertainty.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from smlm_tfdiff.simulation.config import SimulationConfig
from smlm_tfdiff.uncertainty import evaluation as ev


def test_targets_and_their_text():
    assert ev.R_TEXT == ">= 0.9" and ev.RATIO_TEXT == "[0.8, 1.25]" == ev.Z_TEXT
    assert ev.coverage_text(0.5) == "0.45..0.55" and ev.coverage_text(0.9) == "0.85..0.95"
    assert ev.within(0.8, *ev.RATIO) is True and ev.within(1.25, *ev.RATIO) is True
    assert ev.within(1.26, *ev.RATIO) is False and ev.within(0.79, *ev.Z_RANGE) is False
    assert ev.within(None, 0, 1) is None and ev.within(float("nan"), 0, 1) is None
    t = ev.std_map_targets({"pearson_r": 0.95, "pearson_r_median": 0.85, "mean_ratio": 1.3})
    assert t == {"pearson_r>=0.9": True, "pearson_r_median>=0.9": False,
                 "ratio_in_[0.8,1.25]": False}


def test_pixel_coverage_counts_known_pixels():
    # 101 samples 0, 0.01, .., 1 at every pixel: the central 50% interval is [0.25, 0.75], the
    # 90% one [0.05, 0.95]. Truths 0.3 and 0.5 lie in both, 0.8 only in the 90% one, 0.97 in none.
    samples = np.broadcast_to(np.linspace(0, 1, 101)[None, :, None, None], (1, 101, 1, 4))
    truth = np.array([[[0.3, 0.5, 0.8, 0.97]]])
    out = ev.pixel_coverage(samples, truth, samples.mean(axis=1), threshold=0.05)
    assert out["num_frames"] == 1 and out["threshold"] == 0.05
    assert out["coverage_50"] == pytest.approx(0.5) and out["coverage_90"] == pytest.approx(0.75)
    np.testing.assert_allclose(out["expected_quantile_50_90"], [0.5 * 100 / 102, 0.9 * 100 / 102])
    assert out["target_within_5_points"] is False  # 0.75 is 15 points below 0.9.
    assert out["reliability"]["levels"][4] == pytest.approx(0.5)
    # Pixels where neither the truth nor the posterior mean exceeds the threshold are not scored.
    mask = ev.coverage_mask(truth, np.zeros_like(truth), threshold=0.6)
    np.testing.assert_array_equal(mask, [[[False, False, True, True]]])


def _locs(xy, std_nm):
    xy = np.asarray(xy, np.float64)
    return {"xy": xy, "mean_xy": xy.copy(), "std_nm": np.asarray(std_nm, np.float64)}


def test_localization_z_known_errors():
    cfg = SimulationConfig.preset("paper")
    nm = cfg.pixel_size_nm
    # Two localizations 0.1 px right of and 0.2 px above their emitter, reported std 0.2 and
    # 0.1 px in the erring axis and 5 nm in the other: z = (0.5, 0) and (0, -2).
    locs = [_locs([[3.1, 4.0], [10.0, 9.8]], [[0.2 * nm, 5.0], [5.0, 0.1 * nm]])]
    truth = [np.array([[10.0, 10.0], [3.0, 4.0]])]
    scores, arrays = ev.localization_z(locs, truth, cfg, tolerance=1.0)
    # In the order of the truth (match sorts by it).
    np.testing.assert_allclose(arrays["z"], [[0.0, -2.0], [0.5, 0.0]], atol=1e-9)
    np.testing.assert_allclose(arrays["errors"], [[0.0, -0.2 * nm], [0.1 * nm, 0.0]], atol=1e-9)
    z = scores["z_phi_xy"]
    assert z["n"] == 4 and z["std"] == pytest.approx(np.std([0.5, 0, 0, -2], ddof=1))
    assert z["frac_abs_le_1"] == pytest.approx(0.75)
    assert scores["median_std_nm"] == pytest.approx((5.0 + 0.1 * nm) / 2)
    # The mean positions equal phi's here.
    assert scores["z_posterior_mean"]["std"] == pytest.approx(z["std"])
    # Beyond the tolerance nothing is matched.
    _, far = ev.localization_z(locs, [np.array([[15.0, 15.0]])], cfg, tolerance=1.0)
    assert far["z"].shape == (0, 2)


def test_score_localization_table_known_answer():
    cfg = SimulationConfig.preset("paper")
    nm = cfg.pixel_size_nm
    positions = np.array([[[5.0, 5.0], [12.0, 14.0], [0.0, 0.0]]])
    mask = np.array([[True, True, False]])
    pred = [np.array([[12.0, 13.8], [5.1, 5.0]])]
    unc = [np.array([[0.05 * nm, 0.1 * nm], [0.1 * nm, 0.05 * nm]])]
    bound = [np.array([0.2 * nm, 0.05 * nm])]
    scores, arrays = ev.score_localization_table(pred, unc, bound, positions, mask, cfg,
                                                 num_samples=16)
    loc, u = scores["localization"], scores["uncertainty"]
    assert loc["analyze"]["TP"] == 2 and loc["analyze"]["FP"] == 0 and loc["analyze"]["FN"] == 0
    assert loc["localizations"] == 2 and u["num_matched"] == 2
    # z per axis: (0, -2) for the first localization, (1, 0) for the second, in match order.
    np.testing.assert_allclose(np.sort(arrays["z"].ravel()), [-2, 0, 0, 1], atol=1e-9)
    assert u["z"]["n"] == 4
    assert u["z_expected_calibrated"] == pytest.approx(math.sqrt(15 / 13))
    # uncertainty_xy = rms of the two stds = sqrt(0.00625) px for both; over sqrt(CRLB) 0.2, 0.05.
    uxy = math.sqrt((0.05 ** 2 + 0.1 ** 2) / 2)
    assert u["uncertainty_median_nm"] == pytest.approx(uxy * nm)
    assert u["uncertainty_over_crlb_median"] == pytest.approx(np.median([uxy / 0.2, uxy / 0.05]))
    assert u["rms_error_per_axis_nm"] == pytest.approx(nm * math.sqrt((0.1 ** 2 + 0.2 ** 2) / 4))
    # Sharpness over the four (|error|, std) pairs per axis: the larger stds hold the errors.
    rho = u["sharpness"]["spearman_abs_error_vs_std"]
    assert rho == pytest.approx(stats.spearmanr([0, 0.2, 0.1, 0], [0.05, 0.1, 0.1, 0.05])[0])
    assert rho > 0.8 and u["sharpness"]["n"] == 4
    assert u["sharpness"]["mean_std"] == pytest.approx(0.075 * nm)


def _result(std_xy, converged=True, rhat=1.01, ess=500.0, acceptance=0.8):
    return SimpleNamespace(std=np.array([*std_xy, 50.0]), converged=converged,
                           rhat=np.array([1.0, rhat]), ess=np.array([ess, 2 * ess]),
                           acceptance=acceptance, wall_time_s=1.0)


def test_mcmc_diagnostics_and_single_emitter_ratios():
    res = [_result([0.1, 0.2], rhat=1.2, ess=300.0), _result([0.1, 0.1], converged=False),
           _result([0.2, 0.2])]
    d = ev.mcmc_diagnostics(res)
    assert d == {"converged_fraction": pytest.approx(2 / 3), "rhat_max": pytest.approx(1.2),
                 "ess_min": 300.0}
    nm = 100.0
    locs = [_locs([[1.0, 1.0]], [[20.0, 10.0]]),                 # one emitter: ratios 2, 0.5
            _locs([[1.0, 1.0], [5.0, 5.0]], [[1.0, 1.0]] * 2),   # two: skipped
            _locs([[2.0, 2.0]], [[20.0, 20.0]])]                 # one: ratios 1, 1
    np.testing.assert_allclose(ev.single_emitter_std_ratios(locs, res, nm),
                               [[2.0, 0.5], [1.0, 1.0]])
    assert ev.single_emitter_std_ratios(locs[1:2], res[1:2], nm).shape == (0, 2)


def test_std_map_scores_and_recipe_agreement():
    rng = np.random.default_rng(0)
    ref_std = rng.uniform(0.1, 1.0, (2, 8, 8))
    ref = ev.ReferenceMaps([], rng.uniform(0, 1, (2, 8, 8)), ref_std)
    # Twice the reference's std: r = 1, ratio 2; [B, uH, uW, 1] maps are accepted.
    a = ev.std_map_scores(ref.mean[..., None], 2 * ref_std[..., None], ref)
    assert a["pearson_r"] == pytest.approx(1.0) and a["mean_ratio"] == pytest.approx(2.0)
    assert a["mean_map_r"] == pytest.approx(1.0)
    kde = np.zeros((2, 8, 8, 1))
    outs = {"a": {"nfe_per_frame": 10, "mean": kde + 0.1, "std": ref_std[..., None]},
            "b": {"nfe_per_frame": 5, "mean": kde, "std": 0.5 * ref_std[..., None]}}
    rows = ev.recipe_agreement(outs, kde, {"vs_a": "a"})
    assert rows["a"]["kde_mse_mean"] == pytest.approx(0.01) and rows["b"]["kde_mse_mean"] == 0
    assert rows["b"]["vs_a"]["mean_ratio"] == pytest.approx(0.5)
    assert rows["a"]["vs_a"]["pearson_r"] == pytest.approx(1.0)
    assert rows["b"]["std_mean"] == pytest.approx(0.5 * ref_std.mean())
