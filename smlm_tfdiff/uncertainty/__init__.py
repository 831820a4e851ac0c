"""Uncertainty: per-localization summaries, the MCMC reference posterior, calibration statistics."""
