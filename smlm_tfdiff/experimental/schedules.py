"""Experimental noise schedules, as betas for diffusion.schedule.NoiseSchedule (NumPy only).

"paper_extended": the seeds' schedule (linear 1e-4..1e-2 over paper_T steps), then extra_steps
(default 0.4 paper_T) more with beta rising linearly on to beta_end, so that y_T is noise (gamma_T
~ 5.8e-4 with the defaults, T = 140) while steps 1..paper_T keep the seeds' levels exactly.

Why: from gamma = 0.60 a sampler cannot decide whether an emitter is there (an emitter's KDE has
~110 units of energy in diffusion space against a noise variance of 0.67 per pixel), so the seeds'
schedule freezes the emitter count of its start. A psi trained on the seeds' schedule is
fine-tuned on this one (with PsiConfig.prediction "v_residual", prediction.py) and then samples
from noise; measured, that did not widen its dense posterior (docs/calibration.md).
"""

import numpy as np


def paper_extended(paper_T=100, extra_steps=None, beta_end=0.3):
    """-> (betas float64 [paper_T + extra_steps] for t = 1..T, params dict for get_config)."""
    if int(paper_T) != paper_T or paper_T < 1:
        raise ValueError(f"T must be a positive integer (got {paper_T})")
    paper_T = int(paper_T)
    extra_steps = int(round(0.4 * paper_T)) if extra_steps is None else int(extra_steps)
    if extra_steps < 1:
        raise ValueError(f"extra_steps must be >= 1 (got {extra_steps})")
    beta_paper_end = 1e-2
    if not beta_paper_end < beta_end < 1:
        raise ValueError(f"beta_end must lie in ({beta_paper_end}, 1) (got {beta_end})")
    step = (beta_paper_end - 1e-4) / max(paper_T - 1, 1)
    extra = np.linspace(beta_paper_end + step, beta_end, extra_steps)
    betas = np.concatenate([np.linspace(1e-4, beta_paper_end, paper_T), extra])
    params = {"paper_T": paper_T, "extra_steps": extra_steps, "beta_end": float(beta_end)}
    return betas, params


# name -> (betas of NoiseSchedule.named(name, T), betas of NoiseSchedule.from_config(params)).
NAMED = {"paper_extended": lambda T: paper_extended(T)}
FROM_CONFIG = {"paper_extended": paper_extended}
