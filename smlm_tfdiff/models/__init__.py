"""Keras 3 models (pure keras.layers / keras.ops: they also run under the JAX backend)."""

from smlm_tfdiff.models.phi import PhiConfig, build_phi
