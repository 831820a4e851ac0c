"""Input checks shared by the public functions: clear errors that name the problem.

Array checks only (no package imports); a config is checked by simulation.config.check_config."""

import numpy as np


def as_numpy(value, name):
    """NumPy float64 array from an array-like or a tf / Keras tensor."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array ({err})") from None


def as_positions(value, name="positions", count="K"):
    """[count, 2] (x, y) positions in LR pixels as float64; a single [2] becomes [1, 2], an empty
    input [0, 2]. Wrong shapes and NaN/Inf raise ValueError naming `name`."""
    pos = as_numpy(value, name)
    if pos.size == 0:
        return np.zeros((0, 2))
    if pos.shape == (2,):
        pos = pos[None]
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"{name} must be [{count}, 2] (x, y) in LR pixels "
                         f"(got shape {pos.shape})")
    if not np.all(np.isfinite(pos)):
        raise ValueError(f"{name} contains NaN or Inf")
    return pos
