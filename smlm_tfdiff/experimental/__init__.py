"""Options that were measured and did not pay off, and are in no bundled model; kept working for
the runs that use them and for reproducing the measurements in docs/.

  schedules.py         the "paper_extended" noise schedule (the seeds' 100 steps, then to noise)
  prediction.py        psi outputs v or v_residual instead of eps (PsiConfig.prediction)
  reverse_variance.py  psi_var, a learned per-pixel Var(z_0 | z_t) added to each reverse step
  frame_condition.py   psi sees the camera frame beside phi's KDE (PsiConfig.frame_condition)

The core reaches them only through these names, resolved when a model or run asks for them:
NoiseSchedule.named / from_config look up SCHEDULES in schedules.py, psi and its losses look up
PREDICTIONS in prediction.py, and the sampler takes an optional `x0_variance` callable (the
`x0_variance` field of pretrained.Pretrained; reverse_variance.LearnedX0Variance); build_psi
imports frame_condition.py for a PsiConfig with frame_condition, and the sampler, the export and
analyze hand psi its "frame" input whenever the config asks for it. This package
imports nothing, so the core can read these tables without loading the experiments.
"""

SCHEDULES = ("paper_extended",)  # NoiseSchedule names beyond the core's (schedules.py).
PREDICTIONS = ("v", "v_residual")  # PsiConfig.prediction values beyond "eps" (prediction.py).
