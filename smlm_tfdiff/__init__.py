"""smlm_tfdiff: uncertainty-aware super-resolution microscopy in TensorFlow / Keras 3.

Conventions: positions (x, y) in LR pixels, frames indexed [row, col] = [y, x], pixel (i, j) covers
x in [j, j+1), y in [i, i+1); KDE grid `upsample` times finer, HR = upsample * LR.

The public names are imported on first use (PEP 562), so that the Keras-only modules (simulation.config,
models.phi/psi, diffusion.schedule, simulation.simulate_jax) import without TensorFlow, e.g. under the JAX backend on a
machine that has no TensorFlow (trainers/train_psi_jax.py).
"""

import importlib
import sys
import types

_EXPORTS = {
    "DetectionConfig": "localization.config",
    "PRESETS": "simulation.config",
    "SimulationConfig": "simulation.config",
    "load_dataset": "simulation.dataset_file",
    "save_dataset": "simulation.dataset_file",
    "detect": "localization.detection",
    "localization_metrics": "localization.metrics",
    "match": "localization.metrics",
    "oracle_metrics": "localization.metrics",
    "true_kde": "localization.metrics",
    "mc_dropout_posterior": "uncertainty.mc_dropout",
    "MCMCConvergenceWarning": "uncertainty.mcmc",
    "MCMCResult": "uncertainty.mcmc",
    "kde_posterior": "uncertainty.mcmc",
    "mcmc_posterior": "uncertainty.mcmc",
    "mcmc_posterior_batch": "uncertainty.mcmc",
    "crlb": "simulation.physics.fisher",
    "fisher_information": "simulation.physics.fisher",
    "Pretrained": "pretrained",
    "load_models": "pretrained",
    "load_phi": "pretrained",
    "pretrained": "pretrained",
    "PosteriorSampler": "diffusion.sampler",
    "Recipe": "diffusion.recipe",
    "sample_posterior": "diffusion.sampler",
    "expected_counts": "simulation.simulate",
    "make_dataset": "simulation.simulate",
    "render_kde": "simulation.simulate",
    "simulate": "simulation.simulate",
    "localization_uncertainty": "uncertainty.per_localization",
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
    """Keeps the function `pretrained` public when its module of the same name is imported (the
    import system sets a submodule as an attribute of its package)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
