"""Poisson-approximation likelihood (seeds eq. 1 and 10) on offset-corrected data.

x' = (x - offset) / gain + readout_var / gain^2 is treated as Poisson(omega'), with
omega' = omega + background + readout_var / gain^2 (Huang et al. 2013, sCMOS).
"""

import tensorflow as tf
import tensorflow_probability as tfp

from smlm_tfdiff.simulation.physics.camera import camera_constants


def readout_term(config, dtype=tf.float32):
    """readout_var / gain^2 in photons^2 ([H, W] or scalar)."""
    gain, _, readout_var = camera_constants(config, dtype)
    return readout_var / gain ** 2


def corrected_counts(frames, config, dtype=tf.float32):
    """x' = (x - offset) / gain + readout_var / gain^2, clipped at 0 (the Poisson support)."""
    gain, offset, _ = camera_constants(config, dtype)
    x = (tf.cast(frames, dtype) - offset) / gain + readout_term(config, dtype)
    return tf.maximum(x, 0.0)


def poisson_nll(frames, rate, config, include_constant=True, dtype=tf.float32):
    """Seeds eq. 10 per frame: sum_k log n_k! + omega'_k - n_k log omega'_k.

    frames: [..., H, W] ADU; rate: [..., H, W] expected photons (omega + background). Returns [...].
    """
    n = corrected_counts(frames, config, dtype)
    omega = tf.cast(rate, dtype) + readout_term(config, dtype)
    # Poisson.log_prob evaluates the continuous formula at non-integer n' (no support check).
    nll = -tfp.distributions.Poisson(rate=omega).log_prob(n)
    if not include_constant:
        nll = nll - tf.math.lgamma(n + 1.0)
    return tf.reduce_sum(nll, axis=[-2, -1])
