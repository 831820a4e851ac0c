"""MC dropout: the baseline uncertainty a reviewer asks for (Gal & Ghahramani 2016).

A phi trained with dropout (PhiConfig.dropout > 0, `trainers/train_phi.py --dropout`) is run with
its dropout layers kept on at inference; the spread of its outputs over repeated passes is the
reported uncertainty. Everything else (BatchNorm statistics, the output clip) stays in inference
mode. Same output dict as the diffusion sampler, so the same calibration code scores both.
"""

import keras
import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib


class AlwaysOnDropout(keras.layers.Layer):
    """Dropout that also drops at inference, with its own seeded generator."""

    def __init__(self, rate, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed_generator = keras.random.SeedGenerator(int(seed))

    def call(self, x, training=None):
        return keras.random.dropout(x, self.rate, seed=self.seed_generator)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def dropout_layers(model):
    """Names of the dropout layers of a Keras model (searched recursively)."""
    names = []

    def walk(layer):
        for sub in getattr(layer, "layers", []):
            if isinstance(sub, keras.layers.Dropout):
                names.append(sub.name)
            walk(sub)
    walk(model)
    return names


def mc_dropout_model(phi, seed=0):
    """A copy of phi (same weights) whose dropout layers stay on at inference.

    Raises ValueError for a phi without dropout layers: dropout switched on in weights never
    trained with it does not approximate a posterior."""
    if not dropout_layers(phi):
        raise ValueError("this phi has no dropout layers; MC dropout needs a phi trained with "
                         "dropout: `python trainers/train_phi.py --dropout 0.1 ...` or "
                         "pretrained('paper_mcdropout')")
    counter = [0]

    def clone(layer):
        if isinstance(layer, keras.layers.Dropout):
            counter[0] += 1
            return AlwaysOnDropout(layer.rate, seed=int(seed) * 1009 + counter[0],
                                   name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    mc = keras.models.clone_model(phi, clone_function=clone)
    mc.set_weights(phi.get_weights())
    return mc


def mc_dropout_posterior(phi, frames, num_samples=100, seed=0, return_samples=False,
                         max_images=1024):
    """Repeated dropout passes of phi over frames [B, H, W, 1] ADU -> dict of NumPy arrays in KDE
    units, as PosteriorSampler returns: y_hat (phi without dropout), mean, std (ddof 0)
    [B, 4H, 4W, 1], samples [B, S, 4H, 4W, 1] if return_samples. The same seed (and max_images,
    the images per call) gives the same samples."""
    from smlm_tfdiff.diffusion.sampler import _check_frames

    frames = _check_frames(frames)
    num_samples = int(num_samples)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a spread (got {num_samples})")
    hi, lo = (int(v) for v in np.asarray(seeds_lib.as_seed(seed)))
    seed = (hi << 31) | lo  # as_seed's inverse: an int seed stays itself.
    mc = mc_dropout_model(phi, seed)
    forward = tf.function(lambda x: mc(x, training=False), reduce_retracing=True)
    plain = tf.function(lambda x: phi(x, training=False), reduce_retracing=True)
    per_call = max(1, int(max_images) // num_samples)
    y_hats, means, stds, samples = [], [], [], []
    for lo in range(0, len(frames), per_call):
        chunk = frames[lo:lo + per_call]
        y_hats.append(plain(tf.constant(chunk)).numpy())
        out = forward(tf.constant(np.repeat(chunk, num_samples, axis=0))).numpy()
        y = out.reshape((len(chunk), num_samples) + out.shape[1:])
        means.append(y.mean(axis=1))
        stds.append(y.std(axis=1))
        if return_samples:
            samples.append(y)
    result = {"y_hat": np.concatenate(y_hats), "mean": np.concatenate(means),
              "std": np.concatenate(stds)}
    if return_samples:
        result["samples"] = np.concatenate(samples)
    return result
