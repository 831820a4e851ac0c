"""KDE targets (seeds eq. 4) on the upsampled grid with the fixed scale of docs/CONVENTIONS.md.

y_k = 2 pi sigma_y^2 * sum_n dEx(k, n) dEy(k, n), dE in HR pixel units: an isolated emitter peaks
near 1 and sum(y) / (2 pi sigma_y^2) is the emitter count away from borders.
"""

import tensorflow as tf

from smlm_tfdiff.simulation.physics.psf import psf_images


def render_kde_batch(positions, config, mask=None, dtype=tf.float32, fused=False):
    """positions: [B, K, 2] in LR pixels, mask: [B, K] -> KDE [B, upsample*H, upsample*W]."""
    positions = tf.cast(positions, dtype) * config.upsample  # HR = upsample * LR coordinates.
    weights = tf.ones(tf.shape(positions)[:2], dtype)
    if mask is not None:
        weights = weights * tf.cast(mask, dtype)
    return config.kde_norm * psf_images(positions, config.hr_shape, config.kde_sigma, weights, dtype,
                                         fused)
