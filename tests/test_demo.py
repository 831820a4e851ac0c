"""`make demo` end to end, small: python -m smlm_tfdiff.demo --quick writes the report, its figures
and a summary.json with finite headline numbers."""

import json
import math
import os
import re
import subprocess
import sys

from smlm_tfdiff import report

KEY_METRICS = ("precision", "recall", "jaccard", "rmse_lateral_nm", "efficiency_lateral",
               "oracle_recall", "std_z", "uncertainty_over_crlb_median", "std_map_pearson_r",
               "std_map_mean_ratio", "mcmc_xy_std_over_sqrt_crlb", "coverage_50", "coverage_90",
               "total_seconds")


def test_quick_demo_writes_report_figures_and_summary(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "smlm_tfdiff.demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.md" in proc.stdout and "Total time" in proc.stdout

    text = (out / "report.md").read_text()
    linked = set(re.findall(r"\(figures/(fig\d_[a-z_]+\.png)\)", text))
    assert linked == set(report.FIGURES), linked
    for name in report.FIGURES:
        path = out / "figures" / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # Every file the report links to exists (relative links, nothing absolute).
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not os.path.isabs(target), target
        assert (out / target).exists(), target
    assert "| result |" in text and ("pass" in text or "FAIL" in text)

    summary = json.loads((out / "summary.json").read_text())
    for key in KEY_METRICS:
        value = summary["headline"][key]
        assert isinstance(value, float) and math.isfinite(value), (key, value)
    assert 0 <= summary["headline"]["precision"] <= 1
    assert summary["settings"]["quick"] is True
    assert len(summary["targets"]) == len(report.targets(summary))
    # The simulated stack, its ground truth and analyze's outputs are on disk.
    for name in ("paper_stack.tif", "ground_truth.csv", "ground_truth.npz",
                 "analysis/paper_stack/paper_stack.csv",
                 "analysis/paper_stack/paper_stack_posterior_std.tif"):
        assert (out / name).exists(), name
