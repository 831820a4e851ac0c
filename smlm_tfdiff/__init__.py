"""smlm_tfdiff: uncertainty-aware super-resolution microscopy in TensorFlow / Keras 3.

Conventions: positions (x, y) in LR pixels, frames indexed [row, col] = [y, x], pixel (i, j) covers
x in [j, j+1), y in [i, i+1); KDE grid `upsample` times finer, HR = upsample * LR.

The public names are imported on first use (PEP 562), so that the Keras-only modules (config,
models, diffusion, simulation_jax) import without TensorFlow, e.g. under the JAX backend on a
machine that has no TensorFlow (trainers/train_psi_jax.py).
"""

import importlib
import sys
import types

_EXPORTS = {
    "PRESETS": "config",
    "SimulationConfig": "config",
    "load_dataset": "dataset_file",
    "save_dataset": "dataset_file",
    "detect": "localization",
    "localization_metrics": "localization",
    "match": "localization",
    "oracle_metrics": "localization",
    "true_kde": "localization",
    "mc_dropout_posterior": "mc_dropout",
    "MCMCConvergenceWarning": "mcmc",
    "MCMCResult": "mcmc",
    "kde_posterior": "mcmc",
    "mcmc_posterior": "mcmc",
    "mcmc_posterior_batch": "mcmc",
    "crlb": "physics.fisher",
    "fisher_information": "physics.fisher",
    "Pretrained": "pretrained",
    "load_models": "pretrained",
    "load_phi": "pretrained",
    "pretrained": "pretrained",
    "PosteriorSampler": "sampler",
    "sample_posterior": "sampler",
    "expected_counts": "simulate",
    "make_dataset": "simulate",
    "render_kde": "simulate",
    "simulate": "simulate",
    "localization_uncertainty": "uncertainty",
}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smlm_tfdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"smlm_tfdiff.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps the functions `simulate` and `pretrained` public when their modules of the same name
    are imported (the import system sets a submodule as an attribute of its package)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
