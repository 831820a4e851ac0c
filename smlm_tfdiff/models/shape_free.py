"""tf.functions that run one graph for every input shape, so that a call's float32 results do not
depend on the calls before it.

A tf.function traces a graph per input shape and, with reduce_retracing, swaps in a graph with
unknown dimensions once it has seen a few shapes. The two graphs can round differently in the
last bit (TensorFlow picks kernels and folds constants by the shapes it knows), so the result of
a call would depend on the shapes called before it: a resumed analysis would not repeat an
uninterrupted one byte for byte. `shape_free` traces the graph with unknown dimensions at the
first call and runs that one from then on. Under XLA (jit_compile) every concrete shape is
compiled from its own trace whatever came before, so it needs no wrapper.
"""

import tensorflow as tf


def _spec(value):
    """The TensorSpec of value with every dimension but the last unknown (the last, channels or a
    vector's length, stays: layers are built for their channels)."""
    value = tf.convert_to_tensor(value)
    rank = value.shape.rank
    shape = [] if rank == 0 else [None] * (rank - 1) + [value.shape[-1]]
    return tf.TensorSpec(shape, value.dtype)


def shape_free(function):
    """function: a tf.function of tensor arguments (keyword arguments may be None: not given).

    Returns a callable with the same arguments that runs, per pattern of given arguments (their
    ranks, dtypes and last dimensions), one concrete graph traced with every other dimension
    unknown; tensors out as function's."""
    graphs = {}

    def call(*args, **kwargs):
        args = [tf.convert_to_tensor(a) for a in args]
        given = {k: tf.convert_to_tensor(v) for k, v in sorted(kwargs.items()) if v is not None}
        specs = [_spec(a) for a in args]
        keyword_specs = {k: _spec(v) for k, v in given.items()}
        key = (tuple(specs), tuple(keyword_specs.items()))
        if key not in graphs:
            graphs[key] = function.get_concrete_function(*specs, **keyword_specs)
        return graphs[key](*args, **given)

    return call
