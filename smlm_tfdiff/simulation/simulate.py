"""The simulator: random scenes -> camera frames and KDE targets, batched and stateless.

Elements: frames [B, H, W, 1] float32 ADU, kde [B, 4H, 4W, 1] float32, positions [B, K, 2]
float32 LR pixels (x, y) padded with zeros, mask [B, K] bool, photons [B, K] float32 (0 where padded),
frame_background [B] float32, the per-frame background (config.background_range) on top of
config.background, photons per pixel (0 without a range), and frame_photons [B] float32, the
frame's typical N0 (config.photons_frame_spread: the frame's draw; a fixed N0: that; N0 drawn per
emitter: the middle of the range, geometric for log-uniform draws), and frame_spread [B] float32,
the log-sd of the frame's emitters' N0 about it (config.photons_frame_spread_range: the frame's
draw; otherwise config.typical_spread).
"""

import math

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.simulation.physics.camera import sample_frames
from smlm_tfdiff.simulation.physics.kde import render_kde_batch
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch
from smlm_tfdiff.simulation.config import check_config, typical_photons, typical_spread
from smlm_tfdiff.validation import as_positions

ELEMENT_KEYS = ("frames", "kde", "positions", "mask", "photons")  # Those a dataset file holds.
_OUTPUT_KEYS = ELEMENT_KEYS + ("frame_background", "frame_photons", "frame_spread")
_CHUNK = 1024  # frames per call in simulate(); fixed so the output does not depend on memory.
_RENDER_ELEMENTS = 2 ** 28  # Frames x emitters x HR pixels per fused rendering (1 GiB float32).


def sample_scene(config, batch_size, seed):
    """Random emitters: positions [B, K, 2], photons [B, K], mask [B, K] bool, the frames'
    typical N0 [B] and the log-sd of their emitters' N0 about it [B]."""
    k = config.padded_emitters
    count_seed, r_seed, a_seed, n_seed = seeds_lib.split(seed, 4)
    if config.emitter_count == "fixed":
        counts = tf.fill([batch_size], config.num_emitters)
    else:
        if config.density_range is None:
            mean = tf.constant(float(config.num_emitters))
        else:  # Density log-uniform per frame; its own stream, so fixed-mean draws are unchanged.
            lo, hi = (math.log(d) for d in config.density_range)
            log_density = tf.random.stateless_uniform(
                [batch_size], seeds_lib.fold_in(count_seed, 1), lo, hi)
            mean = tf.exp(log_density) * config.region_area
        if config.cluster_fraction:
            cluster, cluster_mean = _sample_clusters(config, batch_size,
                                                     seeds_lib.fold_in(count_seed, 2))
            mean = tf.where(cluster["is_cluster"], cluster_mean, mean)
        counts = tf.random.stateless_poisson([batch_size], count_seed, mean, tf.int32)
        counts = tf.minimum(counts, k)  # Truncated at max_emitters.
    mask = tf.range(k)[None, :] < counts[:, None]
    u = tf.random.stateless_uniform([batch_size, k], r_seed)
    v = tf.random.stateless_uniform([batch_size, k], a_seed)
    if config.region == "disc":
        xy = _on_disc(*config.center, config.disc_radius, u, v)
    else:
        m = config.margin
        xy = tf.stack([m + (config.frame_width - 2 * m) * u,
                       m + (config.frame_height - 2 * m) * v], axis=-1)
        if config.cluster_fraction:  # The same u, v: uniform on the frame's disc instead.
            disc = _on_disc(cluster["cx"][:, None], cluster["cy"][:, None],
                            cluster["radius"][:, None], u, v)
            xy = tf.where(cluster["is_cluster"][:, None, None], disc, xy)
    frame_photons = typical_photons(config) * tf.ones([batch_size], tf.float32)
    frame_spread = typical_spread(config) * tf.ones([batch_size], tf.float32)
    if config.photons_range is None:
        photons = tf.fill([batch_size, k], tf.constant(config.photons, tf.float32))
    elif (config.photons_frame_spread is not None
          or config.photons_frame_spread_range is not None):
        frame_photons = _draw_photons(config, [batch_size], n_seed)
        z = tf.random.stateless_normal([batch_size, k], seeds_lib.fold_in(n_seed, 1))
        if config.photons_frame_spread_range is not None:  # Its own stream.
            frame_spread = tf.random.stateless_uniform(
                [batch_size], seeds_lib.fold_in(n_seed, 2), *config.photons_frame_spread_range)
            if config.photons_frame_spread_zero_fraction:
                zero = tf.random.stateless_uniform([batch_size], seeds_lib.fold_in(n_seed, 3))
                frame_spread = tf.where(zero < config.photons_frame_spread_zero_fraction,
                                        0.0, frame_spread)
        photons = frame_photons[:, None] * tf.exp(frame_spread[:, None] * z)
    else:
        photons = _draw_photons(config, [batch_size, k], n_seed)
    maskf = tf.cast(mask, tf.float32)
    return xy * maskf[..., None], photons * maskf, mask, frame_photons, frame_spread


def _on_disc(cx, cy, radius, u, v):
    """Positions [..., 2] (x, y) uniform on the disc of `radius` about (cx, cy) (LR px), from
    uniform draws u (radial) and v (angular) of the same shape."""
    r = radius * tf.sqrt(u)  # Uniform density on the disc.
    angle = 2.0 * math.pi * v
    return tf.stack([cx + r * tf.cos(angle), cy + r * tf.sin(angle)], axis=-1)


def _sample_clusters(config, batch_size, seed):
    """Per frame: whether it holds a cluster, the cluster's centre (cx, cy) and radius (LR px),
    as a dict of [B] tensors, and the Poisson mean of its count [B] (density x disc area)."""
    s = seeds_lib.split(seed, 5)
    is_cluster = tf.random.stateless_uniform([batch_size], s[0]) < config.cluster_fraction
    r_lo, r_hi = config.cluster_radii
    radius = tf.random.stateless_uniform([batch_size], s[1], r_lo, r_hi)
    d_lo, d_hi = (math.log(d) for d in config.cluster_density_range)
    density = tf.exp(tf.random.stateless_uniform([batch_size], s[2], d_lo, d_hi))
    m = config.margin  # The whole disc inside the emitter region.
    cx = m + radius + (config.frame_width - 2 * m - 2 * radius) * tf.random.stateless_uniform(
        [batch_size], s[3])
    cy = m + radius + (config.frame_height - 2 * m - 2 * radius) * tf.random.stateless_uniform(
        [batch_size], s[4])
    cluster = {"is_cluster": is_cluster, "radius": radius, "cx": cx, "cy": cy}
    return cluster, density * math.pi * radius ** 2


def _draw_photons(config, shape, seed):
    """N0 ~ config.photons_distribution over config.photons_range, float32 of `shape`."""
    if config.photons_distribution == "log_uniform":
        lo, hi = (math.log(p) for p in config.photons_range)
        return tf.exp(tf.random.stateless_uniform(shape, seed, lo, hi))
    lo, hi = config.photons_range
    return tf.random.stateless_uniform(shape, seed, lo, hi)


_RENDERERS = {}


def _renderer(config):
    """The deterministic part (rate, KDE) of one config, fused by XLA. The random draws stay
    outside: XLA on the CPU has no Poisson sampler."""
    key = config.to_json()
    if key not in _RENDERERS:
        def render(positions, photons, mask):
            rate = expected_counts_batch(positions, photons, config, mask, fused=True)
            kde = render_kde_batch(positions, config, mask, fused=True)
            return rate, kde
        _RENDERERS[key] = tf.function(render, jit_compile=True, reduce_retracing=True)
    return _RENDERERS[key]


def sample_background(config, batch_size, seed):
    """Per-frame background [B] photons per pixel on top of config.background: Uniform over
    config.background_range, zeros without one."""
    if config.background_range is None:
        return tf.zeros([batch_size], tf.float32)
    lo, hi = config.background_range
    return tf.random.stateless_uniform([batch_size], seed, lo, hi)


def simulate_scene(positions, photons, mask, config, seed, frame_background=None,
                   frame_photons=None, frame_spread=None):
    """Frames and KDE for given emitters: a dict of element tensors ([B, ...]).

    frame_background: [B] photons per pixel added to config.background (None: none).
    frame_photons: [B] the frames' typical N0, photons, passed through (None: typical_photons).
    frame_spread: [B] the log-sd of their emitters' N0, passed through (None: typical_spread)."""
    positions = tf.cast(positions, tf.float32)
    photons, mask = tf.cast(photons, tf.float32), tf.cast(mask, tf.bool)
    render = _renderer(config)
    # The fused rendering holds [frames, K, 4H, 4W]: big frames are rendered a few at a time
    # (the same numbers: each frame's rendering is its own), so a long movie of big frames fits.
    n, k = positions.shape[0], positions.shape[1]
    per_call = max(1, _RENDER_ELEMENTS // max(1, (k or 1) * config.hr_shape[0]
                                               * config.hr_shape[1]))
    if n is None or n <= per_call:
        rate, kde = render(positions, photons, mask)
    else:
        parts = [render(positions[i:i + per_call], photons[i:i + per_call],
                        mask[i:i + per_call]) for i in range(0, n, per_call)]
        rate, kde = (tf.concat([part[j] for part in parts], 0) for j in (0, 1))
    if frame_background is None:
        frame_background = tf.zeros(tf.shape(rate)[:1], tf.float32)
    frame_background = tf.cast(frame_background, tf.float32)
    rate = rate + frame_background[:, None, None]
    frames = sample_frames(rate, config, seed)
    if frame_photons is None:
        frame_photons = typical_photons(config) * tf.ones(tf.shape(rate)[:1], tf.float32)
    if frame_spread is None:
        frame_spread = typical_spread(config) * tf.ones(tf.shape(rate)[:1], tf.float32)
    return {
        "frames": frames[..., None],
        "kde": kde[..., None],
        "positions": tf.cast(positions, tf.float32),
        "mask": tf.cast(mask, tf.bool),
        "photons": tf.cast(photons, tf.float32),
        "frame_background": frame_background,
        "frame_photons": tf.cast(frame_photons, tf.float32),
        "frame_spread": tf.cast(frame_spread, tf.float32),
    }


def simulate_batch(config, batch_size, seed):
    """One vectorised batch of simulated frames and targets (tensors)."""
    scene_seed, camera_seed = seeds_lib.split(seed)
    positions, photons, mask, frame_photons, frame_spread = sample_scene(config, batch_size,
                                                                         scene_seed)
    # Its own stream, so the scenes and frames of configs without a range are unchanged.
    background = sample_background(config, batch_size, seeds_lib.fold_in(scene_seed, 2))
    return simulate_scene(positions, photons, mask, config, camera_seed, background,
                          frame_photons, frame_spread)


def make_dataset(config, batch_size, seed, prefetch=tf.data.AUTOTUNE):
    """An infinite, seeded tf.data.Dataset of simulated batches.

    Batch i is simulated from fold_in(seed, i): the same seed gives the same stream.
    """
    check_config(config)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    batch_size = int(batch_size)
    seed = seeds_lib.as_seed(seed)

    def make(i):
        return simulate_batch(config, batch_size, seeds_lib.fold_in(seed, i))

    ds = tf.data.Dataset.counter().map(make, num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)
    return ds.prefetch(prefetch)


def simulate(config, num_frames, seed):
    """A finite simulated dataset as a dict of NumPy arrays with the element keys."""
    check_config(config)
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (got {num_frames})")
    seed = seeds_lib.as_seed(seed)
    step = tf.function(lambda s, n: simulate_batch(config, n, s), reduce_retracing=True)
    parts = []
    for chunk, start in enumerate(range(0, num_frames, _CHUNK)):
        n = min(_CHUNK, num_frames - start)
        parts.append({k: v.numpy() for k, v in step(seeds_lib.fold_in(seed, chunk), n).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in _OUTPUT_KEYS}


# ----------------------------------------------------------------- single-frame helpers
def expected_counts(positions, photons, config, include_background=True):
    """Expected photons per pixel [H, W] for one frame; positions [K, 2] (x, y) LR pixels."""
    check_config(config)
    pos = as_positions(positions)
    ph = np.broadcast_to(np.asarray(photons, dtype=np.float64), pos.shape[:1])
    if not np.all(np.isfinite(ph)) or np.any(ph < 0):
        raise ValueError("photons must be finite and >= 0 (got negative or non-finite values)")
    out = expected_counts_batch(pos[None], ph[None], config,
                                include_background=include_background, dtype=tf.float64)
    return out[0].numpy()


def render_kde(positions, config):
    """KDE [upsample*H, upsample*W] for emitters at positions [K, 2] (x, y) in LR pixels."""
    check_config(config)
    pos = as_positions(positions)
    return render_kde_batch(pos[None], config, dtype=tf.float64)[0].numpy()
