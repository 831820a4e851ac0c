"""The validation frames and MCMC reference shared by the sampler benchmarks (sampler_options.py,
calibration_recipes.py): never the evaluation seeds of trainers/evaluate_uncertainty.py."""

import numpy as np

from smlm_tfdiff.uncertainty.mcmc import kde_posterior, mcmc_posterior_batch
from smlm_tfdiff.simulation.simulate import simulate

ISO_SEED, DENSE_SEED = 778, 777


def validation_frames(models, iso_frames, dense_frames):
    """(iso config, isolated frames, paper config, dense frames) with the models' camera."""
    icfg, dcfg = models.scene_config("isolated"), models.scene_config("paper")
    iso = simulate(icfg, iso_frames, ISO_SEED)
    return icfg, iso, dcfg, simulate(dcfg, dense_frames, DENSE_SEED)


def mcmc_reference(iso, icfg):
    """HMC (beta = 1, 4 chains x 5000 draws after 1000 burn-in) of each isolated frame -> (its
    MCMCResults, KDE std maps [B, H, W] of every 5th draw)."""
    res = mcmc_posterior_batch(iso["frames"][..., 0], icfg, 5000, 1000, seed=5, kernel="hmc",
                               num_chains=4, warn=False)
    return res, np.array([kde_posterior(r.chains[::5, :, :2].reshape(-1, 2), icfg)[1]
                          for r in res])
