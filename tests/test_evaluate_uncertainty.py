"""trainers/evaluate_uncertainty.py end to end at a tiny size (run in this process): every section,
the MC-dropout baseline, the figures, and metrics.json (the statistics themselves are tested in
test_calibration.py and test_mcmc.py)."""

import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_evaluate_uncertainty_small(tmp_path, cli):
    out = tmp_path / "eval"
    res = cli(os.path.join(ROOT, "trainers", "evaluate_uncertainty.py"),
              "--model=paper", f"--out_dir={out}", "--iso_frames=2", "--num_samples=8",
              "--mcmc_results=200", "--mcmc_burnin=100", "--mcmc_chains=2",
              "--mcmc_kde_samples=200", "--dense_frames=2", "--loc_frames=2", "--loc_samples=8",
              "--iso_loc_samples=8", "--crlb_frames=5", "--recipe_t_starts=100",
              "--recipe_frames=1", "--nojit_compile")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "uncertainty calibration summary" in res.stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in ("psi_vs_mcmc", "recipes", "coverage", "localization_z", "baselines"):
        assert key in m
    assert set(m["psi_vs_mcmc"]["mcmc"]) == {"beta_1", "beta_0.2"}
    # Coverage of quantile intervals from S = 8 samples: expected l (S - 1) / (S + 1).
    assert m["coverage"]["expected_quantile_50_90"] == pytest.approx([0.5 * 7 / 9, 0.9 * 7 / 9])
    # As analyze's std maps ship them: psi's raw samples times the paper model's map scale
    # (the default recipe, which it was fitted for), scored the same way.
    shipped = m["coverage_shipped"]
    assert shipped["pixel_scale"]["per_neighbour"] > 0
    assert shipped["expected_quantile_50_90"] == m["coverage"]["expected_quantile_50_90"]
    assert 0 <= shipped["coverage_50"] <= shipped["coverage_90"] <= 1
    assert "analyze's maps" in res.stdout
    # The recipe sweep's default recipe (t* = 100, 10 steps) on the first isolated frame is the
    # main comparison's first frame: the same seeds give the same numbers.
    row = m["recipes"]["rows"]["t100_s10"]
    for beta in ("beta_1", "beta_0.2"):
        main = m["psi_vs_mcmc"]["mcmc"][beta]
        assert row[beta]["pearson_r"] == pytest.approx(main["pearson_r_per_frame"][0], rel=1e-6)
        assert row[beta]["mean_ratio"] == pytest.approx(main["mean_ratio_per_frame"][0], rel=1e-6)
    # Tempering at beta = 0.2 widens the MCMC posterior by ~sqrt(5) (test_mcmc.py: to ~1.5 %);
    # 4 standard errors of the ratio of two stds from their smallest effective sample sizes.
    hot, cold = m["psi_vs_mcmc"]["mcmc"]["beta_0.2"], m["psi_vs_mcmc"]["mcmc"]["beta_1"]
    ratio = hot["mcmc_xy_std_nm_mean"] / cold["mcmc_xy_std_nm_mean"]
    tol = 4 * math.sqrt(5) * math.sqrt(1 / (2 * hot["mcmc"]["ess_min"])
                                       + 1 / (2 * cold["mcmc"]["ess_min"]))
    assert abs(ratio - math.sqrt(5)) < tol < math.sqrt(5) - 1, (ratio, tol)
    # The CRLB baseline scores every isolated emitter: 5 frames x 1 emitter x (x, y).
    assert m["baselines"]["crlb"]["isolated"]["z"]["n"] == 10
    mcd = m["baselines"]["mc_dropout"]
    assert mcd["available"] and mcd["dropout"] == 0.1 and len(mcd["phi_dropout_layers"]) == 9
    for key in ("coverage_50", "coverage_90"):  # NaN where no pixel passes the threshold.
        assert math.isfinite(mcd[key]), key
    assert mcd["z_dense"]["n"] > 0 and mcd["median_std_nm_dense"] > 0
    assert math.isfinite(mcd["vs_mcmc_beta_1"]["pearson_r"])  # NaN for a constant std map.
    for fig in ("std_maps.png", "reliability.png", "z_hist.png", "recipes.png"):
        assert (out / fig).stat().st_size > 1000
    assert not [p for p in os.listdir(out) if ".tmp" in p]
