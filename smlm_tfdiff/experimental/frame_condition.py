"""psi conditioned on the camera frame too, not only on phi's KDE (PsiConfig.frame_condition).

phi's KDE is brightness-free by construction (every emitter one unit blob), so a psi that sees
y_hat alone cannot know how narrow a bright emitter's posterior is, nor what phi merged on a
dense frame; the frame carries that evidence. It enters psi as variance-stabilised photons
(FrameCondition) repeated onto the KDE grid, a third input channel beside y_t and y_hat; the
sampler, the export and analyze's windows pass each window's frame beside phi's estimate
whenever psi takes one. Measured after a GPU run (docs/calibration.md, "psi conditioned on the
frame too"): no gain in the dense calibration, and psi had not yet learned the brightness.
Keras only (runs under JAX too).
"""

import math

import keras
import numpy as np
from keras import layers, ops


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class FrameCondition(layers.Layer):
    """ADU frame [B, h, w, 1] -> [B, u*h, u*w, 1], each pixel repeated u x u onto the KDE grid:

        0.1 * (A(x) - A(empty)),  A(x) = 2 sqrt(max((x - offset) / gain + 3/8 + readout_var / gain^2, 0))

    A is the generalised Anscombe transform of a Poisson count plus Gaussian readout: its noise
    has unit variance at any brightness, so an emitter shows as its signal-to-noise ratio, which
    is what sets the width of its posterior. A(empty) is A at zero photons, so an empty, dark
    pixel is ~0; the factor 0.1 keeps the seeds' brightest emitters (5000 photons) near 6.
    """

    def __init__(self, offset=0.0, gain=1.0, readout_var=0.0, upsample=4, **kwargs):
        super().__init__(**kwargs)
        self.offset, self.gain = float(offset), float(gain)
        self.readout_var, self.upsample = float(readout_var), int(upsample)

    def call(self, x):
        shift = 0.375 + self.readout_var / self.gain ** 2
        photons = (ops.cast(x, self.compute_dtype) - self.offset) / self.gain
        a = 2.0 * ops.sqrt(ops.maximum(photons + shift, 0.0))
        a = 0.1 * (a - 2.0 * math.sqrt(shift))
        return ops.repeat(ops.repeat(a, self.upsample, axis=1), self.upsample, axis=2)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        u = self.upsample
        return (b, None if h is None else h * u, None if w is None else w * u, c)

    def get_config(self):
        return {**super().get_config(), "offset": self.offset, "gain": self.gain,
                "readout_var": self.readout_var, "upsample": self.upsample}


def frame_condition_fields(sim_config) -> dict:
    """PsiConfig fields of a frame-conditioned psi for frames of `sim_config`'s camera and KDE."""
    values = {}
    for field in ("offset", "gain", "readout_var"):
        value = np.asarray(getattr(sim_config, field), np.float64)
        if value.size != 1:
            raise ValueError(f"a frame-conditioned psi needs a scalar camera {field} (got a map "
                             f"of shape {value.shape}); convert sCMOS frames to photons first "
                             "and use a config with offset=0, gain=1")
        values[field] = float(value.reshape(()))
    return {"frame_condition": True, "frame_offset": values["offset"],
            "frame_gain": values["gain"], "frame_readout_var": values["readout_var"],
            "frame_upsample": int(sim_config.upsample)}
