"""smlm_tfdiff: uncertainty-aware super-resolution microscopy in TensorFlow / Keras 3.

Conventions (DESIGN.md): positions (x, y) in LR pixels, frames indexed [row, col] = [y, x], pixel
(i, j) covers x in [j, j+1), y in [i, i+1); KDE grid `upsample` times finer, HR = upsample * LR.
"""

from smlm_tfdiff.config import PRESETS, SimulationConfig
from smlm_tfdiff.dataset_file import load_dataset, save_dataset
from smlm_tfdiff.localization import (detect, localization_metrics, match, oracle_metrics,
                                      true_kde)
from smlm_tfdiff.mc_dropout import mc_dropout_posterior
from smlm_tfdiff.mcmc import (MCMCConvergenceWarning, MCMCResult, kde_posterior, mcmc_posterior,
                              mcmc_posterior_batch)
from smlm_tfdiff.physics.fisher import crlb, fisher_information
from smlm_tfdiff.pretrained import Pretrained, load_models, load_phi, pretrained
from smlm_tfdiff.sampler import PosteriorSampler, sample_posterior
from smlm_tfdiff.simulate import expected_counts, make_dataset, render_kde, simulate
from smlm_tfdiff.uncertainty import localization_uncertainty

__all__ = [
    "MCMCConvergenceWarning",
    "MCMCResult",
    "PRESETS",
    "PosteriorSampler",
    "Pretrained",
    "SimulationConfig",
    "crlb",
    "detect",
    "expected_counts",
    "fisher_information",
    "kde_posterior",
    "load_dataset",
    "load_models",
    "load_phi",
    "localization_metrics",
    "localization_uncertainty",
    "make_dataset",
    "match",
    "mc_dropout_posterior",
    "mcmc_posterior",
    "mcmc_posterior_batch",
    "oracle_metrics",
    "pretrained",
    "render_kde",
    "sample_posterior",
    "save_dataset",
    "simulate",
    "true_kde",
]

__version__ = "0.1.0"
