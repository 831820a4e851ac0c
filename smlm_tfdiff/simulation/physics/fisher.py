"""Fisher information and the Cramer-Rao lower bound for one emitter (seeds eq. 3 / A.5).

I_ij = sum_k (1 / omega'_k) d omega'_k / d theta_i  d omega'_k / d theta_j under the Poisson
approximation; derivatives by automatic differentiation of the same PSF model the simulator uses.
"""

import functools

import numpy as np
import tensorflow as tf

from smlm_tfdiff.simulation.config import SimulationConfig
from smlm_tfdiff.simulation.physics.likelihood import readout_term
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch


def fisher_information(positions, config, photons=None, estimate_photons=False,
                       dtype=tf.float64, background=None):
    """positions: [B, 2] LR pixels; photons: [B] or None (config.photons); background: [B]
    photons per pixel, one per emitter, or None (config.background, scalar or [H, W] map).

    Returns [B, P, P] with P = 2 (x, y) or 3 (x, y, N0) when estimate_photons.
    """
    positions = tf.convert_to_tensor(positions, dtype)
    batch = tf.shape(positions)[0]
    if photons is None:
        photons = tf.fill([batch], tf.constant(_default_photons(config), dtype))
    photons = tf.broadcast_to(tf.cast(photons, dtype), [batch])
    theta = tf.concat([positions, photons[:, None]], axis=-1)  # [B, 3]
    columns = []
    # Forward mode, one pass per parameter (P <= 3): d omega / d theta_p for every pixel.
    for p in range(3 if estimate_photons else 2):
        tangent = tf.one_hot(tf.fill([batch], p), 3, dtype=dtype)
        with tf.autodiff.ForwardAccumulator(theta, tangent) as acc:
            omega = expected_counts_batch(theta[:, None, :2], theta[:, None, 2], config,
                                          include_background=background is None, dtype=dtype)
            if background is not None:
                omega = omega + tf.reshape(tf.cast(background, dtype), [-1, 1, 1])
            flat = tf.reshape(omega, [batch, -1])
        columns.append(acc.jvp(flat))
    jac = tf.stack(columns, axis=-1)  # [B, HW, P]
    omega_prime = flat + tf.reshape(
        tf.broadcast_to(readout_term(config, dtype), config.lr_shape), [1, -1])
    return tf.einsum("bki,bkj->bij", jac / omega_prime[..., None], jac)


def crlb(position, config, photons=None, estimate_photons=False, background=None):
    """sqrt of the CRLB diagonal for (x, y) [and N0], in LR pixels (photons for N0).

    position: [2] or [B, 2] (x, y) in LR pixels; photons: scalar or [B] (None: config.photons);
    background: scalar or [B] photons per pixel (None: config.background). With estimate_photons
    the x, y bounds account for N0 being unknown too. Returns a NumPy array [P] or [B, P].
    """
    pos = np.asarray(position, dtype=np.float64)
    if pos.shape[-1:] != (2,) or pos.ndim not in (1, 2):
        raise ValueError(f"position must be [2] or [B, 2] (x, y) in LR pixels (got {pos.shape})")
    if not np.all(np.isfinite(pos)):
        raise ValueError("position contains NaN or Inf")
    single = pos.ndim == 1
    pos = np.atleast_2d(pos)
    if photons is not None:
        photons = np.broadcast_to(np.asarray(photons, np.float64), pos.shape[:1])
        if np.any(~np.isfinite(photons)) or np.any(photons <= 0):
            raise ValueError("photons must be finite and > 0")
    if background is not None:
        background = np.broadcast_to(np.asarray(background, np.float64), pos.shape[:1])
        if np.any(~np.isfinite(background)) or np.any(background < 0):
            raise ValueError("background must be finite and >= 0 photons per pixel")
    if photons is None:
        photons = np.full(pos.shape[:1], float(_default_photons(config)))
    fisher = _compiled_fisher(config.to_json(), bool(estimate_photons), background is not None)
    info = fisher(pos, photons, np.zeros(len(pos)) if background is None else background).numpy()
    bound = np.sqrt(np.diagonal(np.linalg.inv(info), axis1=-2, axis2=-1))
    return bound[0] if single else bound


@functools.lru_cache(maxsize=16)
def _compiled_fisher(config_json, estimate_photons, with_background):
    """fisher_information compiled once per config and option (float64, any batch size): eager,
    its forward-mode passes cost most of a crlb call (analyze's crlb_xy column)."""
    config = SimulationConfig.from_json(config_json)
    spec = tf.TensorSpec([None], tf.float64)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float64), spec, spec])
    def fisher(positions, photons, background):
        return fisher_information(positions, config, photons, estimate_photons, tf.float64,
                                  background if with_background else None)

    return fisher


def _default_photons(config):
    if config.photons_range is not None:
        lo, hi = config.photons_range
        return 0.5 * (lo + hi)
    return config.photons
