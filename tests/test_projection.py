"""Projection of KDE samples onto KDEs of emitter sets (smlm_tfdiff/diffusion/projection.py)."""


import numpy as np
import pytest

import smlm_tfdiff as st
from smlm_tfdiff.simulation.config import SimulationConfig
from smlm_tfdiff.localization.metrics import true_kde
from smlm_tfdiff.diffusion.projection import project_samples
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.pretrained import Pretrained

CONFIG = SimulationConfig()
POSITIONS = np.array([[5.3, 7.6], [12.2, 9.9]])  # (x, y) LR px, resolved (> 6 LR px apart).


def _kde(positions):
    return true_kde(np.asarray(positions)[None], None, CONFIG)[0].astype(np.float32)


def test_an_exact_kde_projects_to_itself():
    out = project_samples(_kde(POSITIONS)[None], CONFIG)
    assert out["samples"].shape == (1, 80, 80)
    np.testing.assert_allclose(out["positions"][0], POSITIONS, atol=1e-3)
    np.testing.assert_allclose(out["samples"][0], _kde(POSITIONS), atol=1e-3)


def test_amplitude_offset_and_noise_are_removed_and_positions_kept():
    # Samples as psi makes them: peak heights +-10 %, a constant offset, pixel noise, and the
    # emitters moved by known sub-pixel shifts. The projection keeps only the shifted emitters.
    rng = np.random.default_rng(0)
    shifts = rng.normal(0.0, 0.05, (8, 2, 2))
    samples, exact = [], []
    for k in range(8):
        kde = _kde(POSITIONS + shifts[k])
        exact.append(kde)
        samples.append(rng.uniform(0.9, 1.1) * kde + 0.003 + rng.normal(0, 0.002, kde.shape))
    samples = np.stack(samples)[..., None].astype(np.float32)
    out = project_samples(samples, CONFIG)
    assert out["samples"].shape == samples.shape
    for k in range(8):
        np.testing.assert_allclose(out["positions"][k], POSITIONS + shifts[k], atol=0.01)
    # The projected std is that of the positions alone: the exact KDEs' std, not the raw one.
    err = np.abs(out["samples"][..., 0].std(0) - np.std(exact, axis=0)).max()
    assert err < 0.01 < samples[..., 0].std(0).max()
    # Far from both emitters the projected samples are exactly the KDE tails, i.e. ~0.
    assert np.abs(out["samples"][:, :, 70:, 0]).max() < 1e-6


def test_empty_samples_project_to_zero_and_batches_keep_their_structure():
    batch = np.zeros((2, 3, 80, 80), np.float32)
    batch[1] = _kde(POSITIONS[:1])
    out = project_samples(batch, CONFIG)
    assert out["samples"].shape == (2, 3, 80, 80)
    assert len(out["positions"]) == 2 and all(len(p) == 3 for p in out["positions"])
    assert np.all(out["samples"][0] == 0) and all(len(p) == 0 for p in out["positions"][0])
    np.testing.assert_allclose(out["samples"][1], np.repeat(_kde(POSITIONS[:1])[None], 3, 0),
                               atol=1e-3)
    # Any size on the HR grid: a 40x60 KDE is a 10x15-pixel frame.
    small = np.zeros((1, 40, 60), np.float32)
    assert project_samples(small, CONFIG)["samples"].shape == (1, 40, 60)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((80, 80)), r"\[S, H, W"),
    (np.zeros((2, 81, 80)), "multiples of the config's upsample"),
    (np.full((2, 80, 80), np.nan), "NaN"),
    (np.array([["a"]]), "numeric"),
])
def test_bad_samples_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        project_samples(bad, CONFIG)


def test_sampler_projection_gives_kdes_of_the_sampled_emitters():
    models = st.pretrained("paper")
    iso = st.simulate(models.scene_config("isolated"), 1, 123)
    sampler = PosteriorSampler(models, jit_compile=False)
    out = sampler(iso["frames"], num_samples=4, num_steps=3, seed=1, method="ddpm",
                  return_samples=True, project=True)
    assert len(out["sample_positions"]) == 1 and len(out["sample_positions"][0]) == 4
    for sample, pos in zip(out["samples"][0, ..., 0], out["sample_positions"][0]):
        assert len(pos) >= 1
        np.testing.assert_allclose(sample, _kde(pos), atol=1e-5)
    np.testing.assert_allclose(out["mean"], out["samples"].mean(axis=1), atol=1e-6)
    toy = Pretrained(phi=models.phi, psi=models.psi, recipe=models.recipe)  # No config.
    with pytest.raises(ValueError, match="SimulationConfig"):
        PosteriorSampler(toy)(iso["frames"], num_samples=2, num_steps=2, project=True)
