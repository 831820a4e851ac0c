"""A movie's photons per emitter (io.brightness) and the brightness-normalised phi."""

import json
import os
import shutil

import numpy as np
import pytest
import tifffile
from scipy import stats

from smlm_tfdiff import SimulationConfig
from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend
from smlm_tfdiff.io import brightness
from smlm_tfdiff.simulation.simulate import simulate


def _sparse(n0, frames=40, seed=3):
    config = SimulationConfig.preset("wholefield", frame_height=32, frame_width=32,
                                     density_range=(4 / 1024, 4 / 1024), photons=n0,
                                     photons_range=None, background_range=(5.0, 5.0))
    return simulate(config, frames, seed), config


def test_estimate_recovers_the_photons_per_emitter():
    """On sparse frames of one N0 the estimate is the photometry median, within the spread of a
    median of that many spots (photometry sd ~ sqrt(N0 + background in the window))."""
    n0 = 1000.0
    data, config = _sparse(n0)
    photons = (data["frames"][..., 0] - config.offset) / config.gain
    truth = [p[m] for p, m in zip(data["positions"], data["mask"])]
    asked = []

    def localize(guess):
        asked.append(guess)
        return truth

    est, info = brightness.estimate_emitter_photons(photons, localize, config.psf_sigma, 700.0)
    assert info["source"] == "estimated"
    spots = info["steps"][-1]["spots"]
    assert spots >= 60
    sd = np.sqrt(n0 + 49 * 5.0 * 2)  # Shot noise and a 7x7 window's background, twice.
    assert abs(est - n0) < 5 * 1.2533 * sd / np.sqrt(spots)
    # The local maxima alone already land near N0 (the first guess), and phi is asked once more
    # after the estimate settles.
    assert abs(info["steps"][0]["n0"] / n0 - 1) < 0.1
    assert asked[0] == pytest.approx(info["steps"][0]["n0"])
    assert len(asked) <= brightness.MAX_ITERATIONS


def test_estimate_falls_back_without_spots():
    photons = np.random.default_rng(0).poisson(5.0, (4, 32, 32)).astype(np.float64)
    est, info = brightness.estimate_emitter_photons(photons, lambda n0: [np.zeros((0, 2))] * 4,
                                                    0.92, 700.0)
    assert est == 700.0 and info["source"] == "fallback"
    assert "isolated spots" in info["reason"]


def test_estimate_falls_back_with_too_few_spots_anywhere():
    """Local maxima with fewer than MIN_SPOTS isolated spots (2 here) and phi with none: the
    fallback, said so (the first step's median of 2 spots is recorded, not used)."""
    data, config = _sparse(1000.0, frames=1, seed=5)
    photons = (data["frames"][..., 0] - config.offset) / config.gain
    assert 1 <= len(brightness.isolated_intensities(
        photons, brightness.local_maxima(photons, config.psf_sigma), config.psf_sigma)) \
        < brightness.MIN_SPOTS
    est, info = brightness.estimate_emitter_photons(photons, lambda n0: [np.zeros((0, 2))],
                                                    config.psf_sigma, 700.0)
    assert est == 700.0 and info["source"] == "fallback"
    assert info["steps"][0]["spots"] >= 1


def test_phi_dataset_scales_frames_by_reference_over_n0():
    """Training frames of a brightness-normalised phi: photons x reference / (N0 e^(j z)), z
    standard normal, j = BRIGHTNESS_JITTER; the KDE untouched."""
    from smlm_tfdiff.models.phi import PhiConfig
    from smlm_tfdiff.models.phi_training import BRIGHTNESS_JITTER, phi_dataset
    from smlm_tfdiff.simulation.simulate import make_dataset
    from smlm_tfdiff import seeds

    config = SimulationConfig.preset("wholefield_dye", frame_height=12, frame_width=12)
    phi_config = PhiConfig(input_transform="anscombe", brightness_reference=700.0)
    raw = next(iter(make_dataset(config, 256, seeds.fold_in(5, 0))))
    plain = next(iter(phi_dataset(config, 256, 5, 0)))
    norm = next(iter(phi_dataset(config, 256, 5, 0, phi_config)))
    np.testing.assert_array_equal(plain["frames"], raw["frames"])
    np.testing.assert_array_equal(norm["kde"], raw["kde"])
    excess = (raw["frames"].numpy()[..., 0] - config.offset).sum(axis=(1, 2))
    scaled = (norm["frames"].numpy()[..., 0] - config.offset).sum(axis=(1, 2))
    ratio = scaled / excess
    z = np.log(ratio * raw["frame_photons"].numpy() / 700.0) / -BRIGHTNESS_JITTER
    assert stats.kstest(z, "norm").pvalue > 1e-3


def _normalised_phi_folder(tmp_path):
    """The whole-field phi's weights under a phi_config that asks for normalised frames."""
    from smlm_tfdiff.pretrained import WEIGHTS_DIR

    folder = tmp_path / "phi_bn"
    folder.mkdir()
    for name in ("phi.weights.h5", "sim_config.json", "detection.json"):
        shutil.copy(os.path.join(WEIGHTS_DIR, "wholefield", name), folder / name)
    with open(os.path.join(WEIGHTS_DIR, "wholefield", "phi_config.json")) as f:
        phi_config = json.load(f)
    phi_config["brightness_reference"] = 700.0
    (folder / "phi_config.json").write_text(json.dumps(phi_config))
    return str(folder)


def test_analyze_measures_or_takes_the_photons_per_emitter(tmp_path):
    """analyze with a brightness-normalised phi measures N0 on the movie (the same on a rerun),
    or takes it as given; phi without N0 is refused with the fix in the message."""
    backend = load_backend(_normalised_phi_folder(tmp_path), need_psi=False)
    assert backend.brightness_reference == 700.0
    data, config = _sparse(1500.0, frames=6, seed=4)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.round(data["frames"][..., 0]).astype(np.uint16), imagej=True)
    with pytest.raises(ValueError, match="photons per emitter"):
        backend.estimate(data["frames"][:1])
    camera = Camera(offset_adu=float(config.offset), gain_adu_per_photon=float(config.gain))
    runs = [StackAnalyzer(backend, camera, num_samples=0, progress=False).analyze(
        path, tmp_path / f"out{i}") for i in range(2)]
    measured = runs[0]["emitter_photons"]
    assert measured["source"] == "estimated" and measured["frames_used"] == 6
    again = dict(runs[1]["emitter_photons"])
    assert measured.pop("seconds") >= 0 and again.pop("seconds") >= 0
    assert measured == again
    assert 0.8 < measured["n0"] / 1500.0 < 1.25
    given = StackAnalyzer(backend, camera, num_samples=0, progress=False, photons=1200.0)
    assert given.analyze(path, tmp_path / "out2")["emitter_photons"] == {"n0": 1200.0,
                                                                          "source": "given"}
    with pytest.raises(ValueError, match="photons .* must be > 0"):
        StackAnalyzer(backend, camera, num_samples=0, progress=False, photons=-1.0)
    # Other phis ignore it and record nothing.
    plain = load_backend("paper", need_psi=False)
    summary = StackAnalyzer(plain, camera, num_samples=0, progress=False,
                            photons=1200.0).analyze(path, tmp_path / "out3")
    assert "emitter_photons" not in summary


def test_export_fixes_the_photons_per_emitter(tmp_path):
    """A brightness-normalised phi exports for one dye only: photons is required and its scaling
    is built into the graph (the export's phi equals analyze's at that N0); other phis refuse it.
    The sampler refuses frames without phi's estimate for such a phi."""
    from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_models
    from smlm_tfdiff.serving import SamplerModule

    folder = _normalised_phi_folder(tmp_path)
    for name in ("psi.weights.h5", "psi_config.json", "diffusion.json"):
        shutil.copy(os.path.join(WEIGHTS_DIR, "wholefield", name), os.path.join(folder, name))
    models = load_models(folder)
    with pytest.raises(ValueError, match="--photons"):
        SamplerModule(models)
    module = SamplerModule(models, photons=1500.0)
    frames = _sparse(1500.0, frames=2, seed=6)[0]["frames"]
    backend = load_backend(folder, jit_compile=False)
    np.testing.assert_allclose(module._phi(frames).numpy(), backend.estimate(frames, 1500.0),
                               atol=1e-5)
    # The in-package sampler cannot scale frames it is not told the N0 of.
    from smlm_tfdiff.diffusion.sampler import PosteriorSampler

    with pytest.raises(ValueError, match="pass y_hat"):
        PosteriorSampler(models, jit_compile=False)(frames, 2, 1)
    with pytest.raises(ValueError, match="brightness-normalised phi only"):
        SamplerModule(load_models(os.path.join(WEIGHTS_DIR, "paper")), photons=1500.0)


def test_psi_dataset_gives_phi_the_scaled_frames():
    """psi of a brightness-normalised phi: batches carry phi_frames, the frames scaled as phi's
    own training scales them (reference / N0 e^(j z)); psi's frames stay as they are."""
    from smlm_tfdiff import seeds
    from smlm_tfdiff.diffusion.schedule import NoiseSchedule
    from smlm_tfdiff.models.phi import BRIGHTNESS_JITTER
    from smlm_tfdiff.models.psi_training import psi_dataset
    from smlm_tfdiff.simulation.simulate import make_dataset

    config = SimulationConfig.preset("wholefield_dye", frame_height=16, frame_width=16)
    schedule = NoiseSchedule.named("paper", 100)
    batch = next(iter(psi_dataset(config, schedule, "snr", 256, 9, 0,
                                  brightness_reference=700.0)))
    raw = next(iter(make_dataset(config, 256, seeds.split(seeds.fold_in(9, 0))[0])))
    np.testing.assert_array_equal(batch["frames"], raw["frames"])
    assert "phi_frames" not in next(iter(psi_dataset(config, schedule, "snr", 4, 9, 0)))
    excess = (raw["frames"].numpy()[..., 0] - config.offset).sum(axis=(1, 2))
    scaled = (batch["phi_frames"].numpy()[..., 0] - config.offset).sum(axis=(1, 2))
    z = np.log(scaled / excess * raw["frame_photons"].numpy() / 700.0) / -BRIGHTNESS_JITTER
    assert stats.kstest(z, "norm").pvalue > 1e-3
