"""Simulation throughput: frame+KDE pairs per second, tf.data pipeline vs per-frame NumPy.

    python benchmarks/simulate.py [--preset paper] [--seconds 10] [--batch_sizes 256,1024]

Prints a readable table and one JSON line.
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from scipy.special import erf
import tensorflow as tf

import smlm_tfdiff as st

flags.DEFINE_string("preset", "paper", "Simulation preset.")
flags.DEFINE_float("seconds", 10.0, "Measuring time per variant.")
flags.DEFINE_string("batch_sizes", "256,1024", "tf.data batch sizes to measure.")
FLAGS = flags.FLAGS


def numpy_pair(config, rng):
    """The straightforward per-frame implementation: one scene, frame and KDE at a time."""
    k = config.num_emitters
    r = config.disc_radius * np.sqrt(rng.uniform(size=k))
    a = rng.uniform(0, 2 * np.pi, size=k)
    cx, cy = config.center
    xy = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)

    def de(coord, n, sigma):
        c = 0.5 * erf((np.arange(n + 1)[None] - coord[:, None]) / (np.sqrt(2) * sigma))
        return c[:, 1:] - c[:, :-1]

    h, w = config.lr_shape
    omega = config.photons * de(xy[:, 1], h, config.psf_sigma).T @ de(xy[:, 0], w, config.psf_sigma)
    frame = (config.gain * rng.poisson(omega + config.background)
             + rng.normal(config.offset, np.sqrt(config.readout_var), (h, w)))
    hh, hw = config.hr_shape
    u = config.upsample * xy
    kde = config.kde_norm * de(u[:, 1], hh, config.kde_sigma).T @ de(u[:, 0], hw, config.kde_sigma)
    return frame.astype(np.float32), kde.astype(np.float32)


def rate(fn, seconds):
    fn()  # Warm-up (tracing, first batches).
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += fn()
    return n / (time.perf_counter() - start)


def main(argv):
    del argv
    config = st.SimulationConfig.preset(FLAGS.preset)
    results = {"preset": FLAGS.preset, "cpu_count": os.cpu_count(),
               "machine": platform.machine(), "tensorflow": tf.__version__}
    for bs in [int(b) for b in FLAGS.batch_sizes.split(",")]:
        it = iter(st.make_dataset(config, bs, seed=0))

        def step(it=it, bs=bs):
            next(it)
            return bs

        results[f"tfdata_b{bs}_pairs_per_s"] = rate(step, FLAGS.seconds)
    rng = np.random.default_rng(0)

    def np_step():
        for _ in range(100):
            numpy_pair(config, rng)
        return 100

    results["numpy_per_frame_pairs_per_s"] = rate(np_step, FLAGS.seconds)
    best = max(v for k, v in results.items() if k.startswith("tfdata"))
    results["speedup_vs_numpy"] = best / results["numpy_per_frame_pairs_per_s"]
    print(f"{'variant':34s} {'pairs/s':>12s}")
    for key, value in results.items():
        if key.endswith("_per_s"):
            print(f"{key:34s} {value:12.0f}")
    print(f"{'speedup (best tf.data / numpy)':34s} {results['speedup_vs_numpy']:12.1f}")
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in results.items()}))


if __name__ == "__main__":
    app.run(main)
