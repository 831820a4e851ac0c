"""trainers/evaluate_uncertainty.py end to end at a tiny size: every section, the MC-dropout
baseline, the figures, and metrics.json (the statistics themselves are tested in
test_calibration.py and test_mcmc.py)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_uncertainty_small(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, os.path.join(ROOT, "trainers", "evaluate_uncertainty.py"),
           "--model=paper", f"--out_dir={out}", "--iso_frames=2", "--num_samples=8",
           "--mcmc_results=200", "--mcmc_burnin=100", "--mcmc_chains=2", "--mcmc_kde_samples=200",
           "--dense_frames=2", "--loc_frames=2", "--loc_samples=8", "--iso_loc_samples=8",
           "--crlb_frames=5", "--recipe_t_starts=100", "--recipe_frames=1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "uncertainty calibration summary" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in ("psi_vs_mcmc", "recipes", "coverage", "localization_z", "baselines"):
        assert key in m
    assert set(m["psi_vs_mcmc"]["mcmc"]) == {"beta_1", "beta_0.2"}
    assert 0.0 <= m["coverage"]["coverage_50"] <= m["coverage"]["coverage_90"] <= 1.0
    mcd = m["baselines"]["mc_dropout"]
    assert mcd["available"] and mcd["dropout"] == 0.1 and len(mcd["phi_dropout_layers"]) == 9
    assert 0.0 <= mcd["coverage_50"] <= mcd["coverage_90"] <= 1.0
    assert mcd["z_dense"]["n"] > 0 and mcd["median_std_nm_dense"] > 0
    assert -1.0 <= mcd["vs_mcmc_beta_1"]["pearson_r"] <= 1.0
    for fig in ("std_maps.png", "reliability.png", "z_hist.png", "recipes.png"):
        assert (out / fig).stat().st_size > 1000
    assert not [p for p in os.listdir(out) if ".tmp" in p]
