"""Projection of KDE samples onto KDEs of emitter sets: detect in each sample, render it again.

The target y is the KDE of a set of emitters (seeds eq. 4): each emitter adds one kernel of fixed
scale at its position, and nothing else is ever in y. psi's samples are close to such images but
not on them: their peaks vary in height (8.7 % of an isolated emitter's mass from sample to
sample, docs/calibration.md) and empty pixels keep a little noise. The projection keeps what a
sample says about the emitters, namely how many and where, and renders exactly that:

    sample -> detect(sample) = {theta_k} -> KDE({theta_k})

It is the map the MCMC reference goes through (posterior draws of theta rendered by kde_posterior),
so projected std maps and MCMC std maps measure the same thing: spread of positions and of the
emitter count, none of amplitude.
"""

import numpy as np

from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.localization.metrics import true_kde
from smlm_tfdiff.validation import as_numpy


def project_samples(samples, config, **detect_kwargs):
    """samples [S, H, W(, 1)] KDE samples of one frame, or [B, S, H, W(, 1)] for B frames (KDE
    units; any size on the HR grid of `config`: H and W multiples of config.upsample) -> dict:
      samples    the projected samples, float32, same shape
      positions  the detected emitters, [M, 2] (x, y) LR px per sample: a list of S arrays (a list
                 of B such lists when batched)
    detect_kwargs go to `detect` (the config's detection by default).
    """
    arr = as_numpy(samples, "samples")
    channel = arr.ndim in (4, 5) and arr.shape[-1] == 1
    core = arr[..., 0] if channel else arr
    if core.ndim not in (3, 4):
        raise ValueError(f"samples must be [S, H, W(, 1)] or [B, S, H, W(, 1)] (got shape "
                         f"{arr.shape})")
    height, width = core.shape[-2:]
    up = int(config.upsample)
    if height % up or width % up:
        raise ValueError(f"sample sides must be multiples of the config's upsample factor {up} "
                         f"(got {height}x{width}): pass the SimulationConfig of the model")
    if (height // up, width // up) != (config.frame_height, config.frame_width):
        # Only the KDE grid and kernel matter here; the scene fields are reset so that they fit.
        config = config.replace(frame_height=height // up, frame_width=width // up,
                                region="frame", margin=0.0, background=0.0)
    if not np.all(np.isfinite(core)):
        raise ValueError("samples contain NaN or Inf values")
    batched = core.ndim == 4
    frames = core if batched else core[None]
    out = np.empty(frames.shape, np.float32)
    positions = []
    for b, frame_samples in enumerate(frames):
        found = detect(frame_samples, config, **detect_kwargs)
        most = max([1] + [len(f) for f in found])  # Emitters of the fullest sample.
        pos = np.zeros((len(found), most, 2))
        mask = np.zeros((len(found), most), bool)
        for k, f in enumerate(found):
            pos[k, :len(f)] = f
            mask[k, :len(f)] = True
        out[b] = true_kde(pos, mask, config)
        positions.append(found)
    if not batched:
        out, positions = out[0], positions[0]
    if channel:
        out = out[..., None]
    return {"samples": out, "positions": positions}
