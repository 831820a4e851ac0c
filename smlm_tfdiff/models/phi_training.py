"""Training pieces for phi: data, loss, validation hook. Used by trainers/train_phi.py."""

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.models.phi import BRIGHTNESS_JITTER, SPREAD_JITTER, phi_input
from smlm_tfdiff.simulation.simulate import make_dataset, simulate


def phi_dataset(sim_config, batch_size, seed, start_step, phi_config=None):
    """Infinite (frames, kde) batches; a run resumed at start_step draws fresh data. For a
    brightness-normalised phi (phi_config.brightness_reference) the frames are scaled by
    reference / N0, N0 the frame's typical photons times exp(BRIGHTNESS_JITTER z); a phi told the
    spread (phi_config.spread_input) reads the frame's spread + SPREAD_JITTER z' (at least 0)
    beside them (phi_input)."""
    ds = make_dataset(sim_config, batch_size, seeds_lib.fold_in(seed, start_step), prefetch=0)
    reference = phi_config.brightness_reference if phi_config is not None else None
    if reference is None:
        return ds.map(lambda b: {"frames": b["frames"], "kde": b["kde"]}).prefetch(
            tf.data.AUTOTUNE)
    jitter_seed = seeds_lib.fold_in(seeds_lib.fold_in(seed, start_step), 7)

    def normalize(i, b):
        z = tf.random.stateless_normal(tf.shape(b["frame_photons"]),
                                       seeds_lib.fold_in(jitter_seed, i))
        n0 = b["frame_photons"] * tf.exp(BRIGHTNESS_JITTER * z)
        z2 = tf.random.stateless_normal(tf.shape(b["frame_spread"]),
                                        seeds_lib.fold_in(seeds_lib.fold_in(jitter_seed, i), 1))
        spread = tf.maximum(b["frame_spread"] + SPREAD_JITTER * z2, 0.0)
        return {"frames": phi_input(b["frames"], float(sim_config.offset), phi_config, n0,
                                    spread),
                "kde": b["kde"]}

    return ds.enumerate().map(normalize).prefetch(tf.data.AUTOTUNE)


def phi_loss(model, batch, training):
    """Seeds' L_phi: per-example mean squared error against the KDE -> [B]."""
    pred = model(batch["frames"], training=training)
    return tf.reduce_mean(tf.square(pred - batch["kde"]), axis=[1, 2, 3])


def inference_fn(model, chunk=32, jit_compile=True):
    """A compiled phi forward pass [N, H, W, 1] -> [N, 4H, 4W, 1] that runs the batch as chunks
    of `chunk` frames inside one graph: with XLA on a CPU a 256 batch runs ~10% faster as eight
    chunks of 32, whose activations stay in cache (benchmarks/phi.py)."""

    def forward(x):
        n = x.shape[0]
        if n is None or n <= chunk:
            return model(x, training=False)
        return tf.concat([model(x[i:i + chunk], training=False) for i in range(0, n, chunk)], 0)

    return tf.function(forward, jit_compile=jit_compile)


def predict(model, frames, batch_size=256, jit_compile=True, chunk=32):
    """phi over a NumPy stack [N, H, W, 1] -> [N, 4H, 4W, 1] NumPy, in batches.

    XLA makes CPU inference ~1.5x faster (benchmarks/phi.py); a stack traces at most twice (the
    full batch and the remainder)."""
    fn = inference_fn(model, chunk, jit_compile)
    out = [fn(tf.constant(frames[i:i + batch_size])).numpy()
           for i in range(0, len(frames), batch_size)]
    return np.concatenate(out)


class PhiValidation:
    """A fixed, seeded validation set and the hook the trainer calls."""

    def __init__(self, sim_config, num_frames, seed, num_images=4, phi_config=None):
        self.config = sim_config
        self.data = simulate(sim_config, num_frames, seed)
        self.num_images = num_images
        reference = phi_config.brightness_reference if phi_config is not None else None
        if reference is not None:  # The frames' true N0 and spread (training adds jitter).
            self.data["frames"] = phi_input(
                self.data["frames"], float(sim_config.offset), phi_config,
                self.data["frame_photons"], self.data["frame_spread"]).astype(np.float32)

    def __call__(self, trainer, step):
        pred = predict(trainer.model, self.data["frames"])
        metrics = {"loss": float(np.mean((pred - self.data["kde"]) ** 2))}
        metrics.update(self.localization(pred))
        with trainer.val_writer.as_default(step=step):
            n = self.num_images
            frames = self.data["frames"][:n, ..., :1]  # The camera channel.
            lo = frames.min(axis=(1, 2, 3), keepdims=True)
            hi = frames.max(axis=(1, 2, 3), keepdims=True)
            tf.summary.image("frame", (frames - lo) / np.maximum(hi - lo, 1e-6), step, n)
            top = max(float(self.data["kde"][:n].max()), 1e-6)
            tf.summary.image("kde_target", np.clip(self.data["kde"][:n] / top, 0, 1), step, n)
            tf.summary.image("kde_prediction", np.clip(pred[:n] / top, 0, 1), step, n)
        return metrics

    def localization(self, pred):
        try:
            from smlm_tfdiff.localization.detection import detect
            from smlm_tfdiff.localization.metrics import localization_metrics
        except ImportError:  # Localization is optional for the trainer itself.
            return {}
        found = detect(pred, self.config)
        truth = [p[m] for p, m in zip(self.data["positions"], self.data["mask"])]
        m = localization_metrics(found, truth, self.config)
        return {k: float(m[k]) for k in ("precision", "recall", "jaccard",
                                          "rmse_lateral_nm", "efficiency_lateral") if k in m}
