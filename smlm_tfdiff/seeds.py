"""Stateless seeds: every random draw takes an explicit [2] int32 seed, split per use."""

import numpy as np
import tensorflow as tf


def as_seed(seed) -> tf.Tensor:
    """An int, a [2] sequence or a [2] tensor -> a [2] int32 seed tensor."""
    if isinstance(seed, (int, np.integer)):
        seed = int(seed)
        if not 0 <= seed < 2 ** 62:
            raise ValueError(f"seed must be a non-negative integer below 2**62 (got {seed})")
        return tf.constant([seed >> 31, seed & 0x7FFFFFFF], tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank != 1 or (seed.shape[0] is not None and seed.shape[0] != 2):
        raise ValueError(f"seed must be an int or a [2] int32 tensor (got shape {seed.shape})")
    return tf.cast(seed, tf.int32)


def split(seed, num: int = 2):
    """[2] seed -> `num` independent [2] seeds (unpacked)."""
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num))


def fold_in(seed, data) -> tf.Tensor:
    """A seed for item `data` (e.g. a batch index) of a stream seeded with `seed`."""
    return tf.random.experimental.stateless_fold_in(as_seed(seed), tf.cast(data, tf.int64))
