"""Options that were measured and did not pay off, and are in no bundled model; kept working for
the runs that use them and for reproducing the measurements in docs/.

  schedules.py         the "paper_extended" noise schedule (the seeds' 100 steps, then to noise)
  prediction.py        psi outputs v or v_residual instead of eps (PsiConfig.prediction)
  frame_condition.py   psi sees the camera frame beside phi's KDE (PsiConfig.frame_condition)

The core reaches them only through these names, resolved when a model or run asks for them:
NoiseSchedule.named / from_config look up SCHEDULES in schedules.py, psi and its losses look up
PREDICTIONS in prediction.py, and build_psi imports frame_condition.py for a PsiConfig with
frame_condition (the sampler, the export and analyze then hand psi its "frame" input). This
package imports nothing, so the core can read these tables without loading the experiments.

The learned reverse variance (psi_var) was removed after its measurement (docs/sampler.md).
"""

SCHEDULES = ("paper_extended",)  # NoiseSchedule names beyond the core's (schedules.py).
PREDICTIONS = ("v", "v_residual")  # PsiConfig.prediction values beyond "eps" (prediction.py).
