"""The simulator in JAX: scenes, the camera model and KDE targets, for training on a JAX device.

The same model as `smlm_tfdiff.simulation.simulate` and `smlm_tfdiff.simulation.physics` (pixel-integrated Gaussian PSF,
x = gain * Poisson(omega + background) + Normal(offset, readout_var) in ADU, the KDE of the seeds'
eq. 4 with the fixed 2 pi sigma_y^2 scale), written in jax.numpy so that a machine without
TensorFlow simulates its own training data inside one jitted training step
(trainers/train_psi_jax.py). The deterministic parts agree with `smlm_tfdiff.simulation.physics` to float32
precision and the frames have its moments (tests/test_simulation_jax.py); the random draws are
JAX's own (jax.random keys), so the numbers differ from the TensorFlow simulator's.

Shapes: positions [B, K, 2] (x, y) LR pixels, photons [B, K], mask [B, K] bool, frames [B, H, W, 1]
ADU, kde [B, upsample*H, upsample*W, 1].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from smlm_tfdiff.simulation.config import typical_photons, typical_spread

_SQRT2 = math.sqrt(2.0)


def pixel_integrals(coord, num_pixels, sigma):
    """Fraction of N(coord, sigma^2) in each unit pixel [j, j+1): [...] -> [..., num_pixels]."""
    edges = jnp.arange(num_pixels + 1, dtype=jnp.float32)
    cdf = 0.5 * jax.scipy.special.erf((edges - coord[..., None]) / (_SQRT2 * sigma))
    return cdf[..., 1:] - cdf[..., :-1]


def psf_images(positions, shape, sigma, weights):
    """sum_k weights_k dEy(k, i) dEx(k, j): positions [B, K, 2] in grid pixels -> [B, H, W]."""
    dex = pixel_integrals(positions[..., 0], shape[1], sigma)  # [B, K, W]
    dey = pixel_integrals(positions[..., 1], shape[0], sigma) * weights[..., None]  # [B, K, H]
    return jnp.einsum("bki,bkj->bij", dey, dex)


def _constant(value):
    return jnp.asarray(np.asarray(value, np.float32))


def expected_counts(positions, photons, mask, config):
    """omega + background, photons per pixel [B, H, W] (physics.expected_counts_batch)."""
    weights = photons * mask.astype(jnp.float32)
    omega = psf_images(positions, config.lr_shape, config.psf_sigma, weights)
    return omega + _constant(config.background)


def render_kde(positions, mask, config):
    """KDE [B, upsample*H, upsample*W] of the masked emitters (physics.render_kde_batch)."""
    return config.kde_norm * psf_images(positions * config.upsample, config.hr_shape,
                                        config.kde_sigma, mask.astype(jnp.float32))


def _draw_photons(key, config, shape):
    """N0 ~ config.photons_distribution over config.photons_range."""
    lo, hi = config.photons_range
    if config.photons_distribution == "log_uniform":
        return jnp.exp(jax.random.uniform(key, shape, minval=math.log(lo), maxval=math.log(hi)))
    return jax.random.uniform(key, shape, minval=lo, maxval=hi)


def _on_disc(cx, cy, radius, u, v):
    """Positions [..., 2] (x, y) uniform on the disc of `radius` about (cx, cy) (LR px), from
    uniform draws u (radial) and v (angular) of the same shape."""
    r = radius * jnp.sqrt(u)  # Uniform density on the disc.
    angle = 2.0 * math.pi * v
    return jnp.stack([cx + r * jnp.cos(angle), cy + r * jnp.sin(angle)], axis=-1)


def _sample_clusters(key, config, batch_size):
    """`simulate._sample_clusters` in jax.numpy: ({is_cluster, radius, cx, cy} [B], Poisson
    mean of the count [B])."""
    k = jax.random.split(key, 5)
    is_cluster = jax.random.uniform(k[0], [batch_size]) < config.cluster_fraction
    r_lo, r_hi = config.cluster_radii
    radius = jax.random.uniform(k[1], [batch_size], minval=r_lo, maxval=r_hi)
    d_lo, d_hi = (math.log(d) for d in config.cluster_density_range)
    density = jnp.exp(jax.random.uniform(k[2], [batch_size], minval=d_lo, maxval=d_hi))
    m = config.margin  # The whole disc inside the emitter region.
    cx = m + radius + (config.frame_width - 2 * m - 2 * radius) * jax.random.uniform(
        k[3], [batch_size])
    cy = m + radius + (config.frame_height - 2 * m - 2 * radius) * jax.random.uniform(
        k[4], [batch_size])
    cluster = {"is_cluster": is_cluster, "radius": radius, "cx": cx, "cy": cy}
    return cluster, density * math.pi * radius ** 2


def sample_scene(key, config, batch_size):
    """Random emitters as `simulate.sample_scene` draws them: (positions, photons, mask,
    frame_photons [B], the frames' typical N0, frame_spread [B], the log-sd about it)."""
    k = config.padded_emitters
    count_key, u_key, v_key, n_key = jax.random.split(key, 4)
    if config.emitter_count == "fixed":
        counts = jnp.full([batch_size], config.num_emitters, jnp.int32)
    else:
        if config.density_range is None:
            mean = float(config.num_emitters)
        else:  # Density log-uniform per frame (its own stream, as in the TF simulator).
            lo, hi = (math.log(d) for d in config.density_range)
            log_density = jax.random.uniform(jax.random.fold_in(count_key, 1), [batch_size],
                                             minval=lo, maxval=hi)
            mean = jnp.exp(log_density) * config.region_area
        if config.cluster_fraction:
            cluster, cluster_mean = _sample_clusters(jax.random.fold_in(count_key, 2), config,
                                                     batch_size)
            mean = jnp.where(cluster["is_cluster"], cluster_mean, mean)
        counts = jax.random.poisson(count_key, mean, [batch_size])
        counts = jnp.minimum(counts, k).astype(jnp.int32)  # Truncated at max_emitters.
    mask = jnp.arange(k)[None, :] < counts[:, None]
    u = jax.random.uniform(u_key, [batch_size, k])
    v = jax.random.uniform(v_key, [batch_size, k])
    if config.region == "disc":
        xy = _on_disc(*config.center, config.disc_radius, u, v)
    else:
        m = config.margin
        xy = jnp.stack([m + (config.frame_width - 2 * m) * u,
                        m + (config.frame_height - 2 * m) * v], axis=-1)
        if config.cluster_fraction:  # The same u, v: uniform on the frame's disc instead.
            disc = _on_disc(cluster["cx"][:, None], cluster["cy"][:, None],
                            cluster["radius"][:, None], u, v)
            xy = jnp.where(cluster["is_cluster"][:, None, None], disc, xy)
    frame_photons = jnp.full([batch_size], typical_photons(config), jnp.float32)
    frame_spread = jnp.full([batch_size], typical_spread(config), jnp.float32)
    if config.photons_range is None:
        photons = jnp.full([batch_size, k], config.photons, jnp.float32)
    elif (config.photons_frame_spread is not None
          or config.photons_frame_spread_range is not None):  # One N0 per frame, a spread.
        frame_photons = _draw_photons(n_key, config, [batch_size])
        z = jax.random.normal(jax.random.fold_in(n_key, 1), [batch_size, k])
        if config.photons_frame_spread_range is not None:  # Its own stream.
            lo, hi = config.photons_frame_spread_range
            frame_spread = jax.random.uniform(jax.random.fold_in(n_key, 2), [batch_size],
                                              minval=lo, maxval=hi)
            if config.photons_frame_spread_zero_fraction:
                zero = jax.random.uniform(jax.random.fold_in(n_key, 3), [batch_size])
                frame_spread = jnp.where(zero < config.photons_frame_spread_zero_fraction,
                                         0.0, frame_spread)
        photons = frame_photons[:, None] * jnp.exp(frame_spread[:, None] * z)
    else:
        photons = _draw_photons(n_key, config, [batch_size, k])
    maskf = mask.astype(jnp.float32)
    return xy * maskf[..., None], photons * maskf, mask, frame_photons, frame_spread


def sample_frames(key, rate, config):
    """rate [B, H, W] expected photons -> frames [B, H, W] ADU: gain Poisson + Normal readout."""
    poisson_key, read_key = jax.random.split(key)
    counts = jax.random.poisson(poisson_key, rate).astype(jnp.float32)
    readout = jnp.sqrt(_constant(config.readout_var)) * jax.random.normal(read_key, rate.shape)
    return _constant(config.gain) * counts + _constant(config.offset) + readout


def simulate_batch(key, config, batch_size):
    """One batch {frames [B, H, W, 1], kde [B, 4H, 4W, 1], positions, photons, mask,
    frame_background [B], frame_photons [B], frame_spread [B]} (see `simulate`)."""
    scene_key, camera_key = jax.random.split(key)
    positions, photons, mask, frame_photons, frame_spread = sample_scene(scene_key, config,
                                                                         batch_size)
    if config.background_range is None:
        background = jnp.zeros([batch_size], jnp.float32)
    else:
        lo, hi = config.background_range
        background = jax.random.uniform(jax.random.fold_in(scene_key, 2), [batch_size],
                                        minval=lo, maxval=hi)
    rate = expected_counts(positions, photons, mask, config) + background[:, None, None]
    frames = sample_frames(camera_key, rate, config)
    return {"frames": frames[..., None], "kde": render_kde(positions, mask, config)[..., None],
            "positions": positions, "photons": photons, "mask": mask,
            "frame_background": background, "frame_photons": frame_photons,
            "frame_spread": frame_spread}
