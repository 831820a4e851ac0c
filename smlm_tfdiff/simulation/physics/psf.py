"""Pixel-integrated isotropic Gaussian PSF (seeds eq. 2 / A.3) and expected photon counts.

The one pixel-integrated Gaussian of the package, in two array libraries: `pixel_integrals` (tf,
inside the simulator's and the likelihood's graphs) and `pixel_integrals_numpy` (the small eager
fits of detection and photometry, where a TensorFlow call per iteration would cost more than the
arithmetic). Both evaluate the same erf differences; tests check that they agree.
"""

import math

import numpy as np
import tensorflow as tf
from scipy.special import erf

_SQRT2 = math.sqrt(2.0)


def pixel_integrals(coord, num_pixels: int, sigma, dtype=tf.float32):
    """Fraction of a 1-D Gaussian N(coord, sigma^2) falling in each unit pixel [j, j+1).

    coord: [...] positions in pixel units; returns [..., num_pixels] (dE of seeds eq. 2).
    """
    coord = tf.cast(coord, dtype)
    edges = tf.range(num_pixels + 1, dtype=dtype)
    # tf.cast of a Python float goes through float32; build the constant in dtype directly.
    sigma = tf.constant(sigma, dtype) if isinstance(sigma, (int, float)) else tf.cast(sigma, dtype)
    cdf = 0.5 * tf.math.erf((edges - coord[..., None]) / (_SQRT2 * sigma))
    return cdf[..., 1:] - cdf[..., :-1]


def pixel_integrals_numpy(coord, num_pixels: int, sigma, with_derivative=False):
    """NumPy twin of `pixel_integrals` in float64: coord [M] pixel units -> dE [M, num_pixels].

    with_derivative=True also returns d(dE)/d(coord) [M, num_pixels] (for Gauss-Newton fits).
    """
    edges = np.arange(num_pixels + 1, dtype=np.float64)[None, :] - np.asarray(
        coord, np.float64).reshape(-1)[:, None]
    cdf = 0.5 * erf(edges / (_SQRT2 * sigma))
    integrals = cdf[:, 1:] - cdf[:, :-1]
    if not with_derivative:
        return integrals
    pdf = np.exp(-0.5 * (edges / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)
    return integrals, pdf[:, :-1] - pdf[:, 1:]


def psf_images(positions, shape, sigma, weights, dtype=tf.float32, fused=False):
    """sum_k weights_k * dEy(k, i) * dEx(k, j).

    positions: [B, K, 2] (x, y) in pixel units of the grid; weights: [B, K]; shape: (H, W).
    Returns [B, H, W]. fused=True writes the sum as a broadcast product, which is 2-4x faster
    than a batched matmul of tiny [H, K] x [K, W] matrices, but only when compiled with XLA.
    """
    positions = tf.cast(positions, dtype)
    dex = pixel_integrals(positions[..., 0], shape[1], sigma, dtype)  # [B, K, W]
    dey = pixel_integrals(positions[..., 1], shape[0], sigma, dtype)  # [B, K, H]
    dey = dey * tf.cast(weights, dtype)[..., None]
    if fused:
        return tf.reduce_sum(dey[..., :, None] * dex[..., None, :], axis=-3)
    return tf.einsum("bki,bkj->bij", dey, dex)


def expected_counts_batch(positions, photons, config, mask=None, include_background=True,
                          dtype=tf.float32, fused=False):
    """Expected photons per pixel, omega (+ background), for a batch of frames.

    positions: [B, K, 2] LR pixels (x, y); photons: [B, K]; mask: [B, K] bool (padding off).
    Returns [B, H, W] in photons.
    """
    weights = tf.cast(photons, dtype)
    if mask is not None:
        weights = weights * tf.cast(mask, dtype)
    omega = psf_images(positions, config.lr_shape, config.psf_sigma, weights, dtype, fused)
    if include_background:
        omega = omega + tf.constant(config.background, dtype)
    return omega
