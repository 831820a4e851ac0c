"""psi predicting v or v_residual instead of eps (PsiConfig.prediction; Salimans & Ho 2022).

The network's own output is v = sqrt(gamma) eps - sqrt(1 - gamma) z_0 ("v") or the v of the
residual z_0 - mu about phi's estimate mu = 2 y_hat - 1 ("v_residual"); the model turns v into
eps = sqrt(gamma) v + sqrt(1 - gamma) u with u = y_t ("v") or u = y_t - sqrt(gamma) mu
("v_residual", the noisy residual), so every caller sees eps. With eps, the predicted z_0 = (y_t -
sqrt(1 - gamma) eps) / sqrt(gamma) amplifies the network's error by 1 / sqrt(gamma) (40x at the end
of a schedule that reaches noise); with v, z_0 = sqrt(gamma) y_t - sqrt(1 - gamma) v is as good as
the network at every level, which sampling from noise needs; with v_residual, a network output of 0
already predicts z_0 = mu near noise. Measured with the paper_extended schedule (schedules.py), it
did not widen psi's dense posterior (docs/calibration.md). Keras only (runs under JAX too).
"""

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class EpsFromV(layers.Layer):
    """[v, y_t, noise_level(, mu)] -> eps = sqrt(gamma) v + sqrt(1 - gamma) u, u = y_t, or with mu
    the noisy residual u = y_t - sqrt(gamma) mu; sqrt(gamma) is the noise level ([B] or [B, 1]),
    v, y_t, mu [B, H, W, 1] (diffusion space)."""

    def call(self, inputs):
        v, y_t, noise_level = inputs[:3]
        level = ops.reshape(ops.cast(noise_level, v.dtype), (-1, 1, 1, 1))
        u = y_t - level * inputs[3] if len(inputs) > 3 else y_t
        return level * v + ops.sqrt(ops.maximum(1.0 - level * level, 0.0)) * u

    def compute_output_shape(self, input_shape):
        return input_shape[0]


def eps_output(prediction, out, y_t, noise_level, cond):
    """psi's eps [B, H, W, 1] from the network's output `out` read as `prediction`'s v; y_t: the
    noisy target, noise_level: sqrt(gamma) [B], cond: 2 y_hat - 1 (all Keras tensors)."""
    if prediction == "v":
        return EpsFromV(name="eps_from_v")([out, y_t, noise_level])
    if prediction == "v_residual":
        return EpsFromV(name="eps_from_v")([out, y_t, noise_level, cond])
    raise ValueError(f"unknown experimental prediction {prediction!r}")


def loss_weights(weights, gamma):
    """The eps loss's per-example weights [B] for a v network: w(t) ||v - v_psi||^2 = w(t) / gamma
    ||eps - eps_psi||^2 (eps_psi = sqrt(gamma) v_psi + sqrt(1 - gamma) u), the eps loss at low
    noise, while near noise it scores the predicted z_0 instead of eps. gamma [B]."""
    return weights / gamma
