"""Physics of the forward model: PSF, camera, KDE, likelihood, Fisher information."""

from smlm_tfdiff.simulation.physics.camera import frame_moments, sample_frames, to_photons
from smlm_tfdiff.simulation.physics.fisher import crlb, fisher_information
from smlm_tfdiff.simulation.physics.kde import render_kde_batch
from smlm_tfdiff.simulation.physics.likelihood import corrected_counts, poisson_nll
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch, pixel_integrals, psf_images
