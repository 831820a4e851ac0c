"""smlm_tfdiff: uncertainty-aware super-resolution microscopy in TensorFlow / Keras 3.

Conventions (DESIGN.md): positions (x, y) in LR pixels, frames indexed [row, col] = [y, x], pixel
(i, j) covers x in [j, j+1), y in [i, i+1); KDE grid `upsample` times finer, HR = upsample * LR.
"""

from smlm_tfdiff.config import PRESETS, SimulationConfig
from smlm_tfdiff.dataset_file import load_dataset, save_dataset
from smlm_tfdiff.localization import (detect, localization_metrics, match, oracle_metrics,
                                      true_kde)
from smlm_tfdiff.physics.fisher import crlb, fisher_information
from smlm_tfdiff.pretrained import Pretrained, load_phi, pretrained
from smlm_tfdiff.simulate import expected_counts, make_dataset, render_kde, simulate

__all__ = [
    "PRESETS",
    "Pretrained",
    "SimulationConfig",
    "crlb",
    "detect",
    "expected_counts",
    "fisher_information",
    "load_dataset",
    "load_phi",
    "localization_metrics",
    "make_dataset",
    "match",
    "oracle_metrics",
    "pretrained",
    "render_kde",
    "save_dataset",
    "simulate",
    "true_kde",
]

__version__ = "0.1.0"
