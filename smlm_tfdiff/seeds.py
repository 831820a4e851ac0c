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


def stateless_normal(shape, seed, dtype=tf.float32):
    """N(0, 1) draws that are bit-identical with and without XLA (same shape and seed, same
    numbers): tf.random.stateless_normal draws other numbers under jit_compile, even with a named
    algorithm, while its raw Philox bits agree. The 24 top bits give u in (0, 1), then ndtri(u)."""
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32,
                                       alg="philox")
    # 23 bits, so that k + 0.5 is exact in float32 and u < 1 strictly.
    u = (tf.cast(tf.bitwise.right_shift(bits, 9), tf.float32) + 0.5) * (2.0 ** -23)
    return tf.cast(tf.math.ndtri(u), dtype)


def _philox_bits(shape, seed):
    return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int32,
                                       alg="philox")


def philox_split(seed, num: int = 2):
    """Like `split`, but the same with and without XLA (tf.random.experimental.stateless_split
    uses the auto-selected generator, which differs under jit_compile). Returns [num, 2] int32."""
    return _philox_bits([num, 2], seed)


def philox_fold_in(seed, data):
    """Like `fold_in` (a seed for item `data` of a stream), the same with and without XLA."""
    data = tf.cast(data, tf.int32)
    return _philox_bits([2], _philox_bits([2], seed) ^ tf.stack([data, tf.zeros_like(data)]))
