"""The validation frames and MCMC reference shared by the sampler benchmarks (sampler_options.py,
calibration_recipes.py): never the evaluation seeds of trainers/evaluate_uncertainty.py."""

from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.uncertainty import evaluation

ISO_SEED, DENSE_SEED = 778, 777


def validation_frames(models, iso_frames, dense_frames):
    """(iso config, isolated frames, paper config, dense frames) with the models' camera."""
    icfg, dcfg = models.scene_config("isolated"), models.scene_config("paper")
    iso = simulate(icfg, iso_frames, ISO_SEED)
    return icfg, iso, dcfg, simulate(dcfg, dense_frames, DENSE_SEED)


def mcmc_reference(iso, icfg):
    """HMC (beta = 1, 4 chains x 5000 draws after 1000 burn-in, seed 5) of each isolated frame ->
    evaluation.ReferenceMaps (its MCMCResults, KDE mean and std maps [B, uH, uW] of every 5th
    draw)."""
    return evaluation.mcmc_reference(iso["frames"], icfg, 5000, 1000, seed=5, num_chains=4,
                                     kde_samples=4000)
