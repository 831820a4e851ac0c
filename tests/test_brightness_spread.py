"""The spread of the emitters' photons about N0: simulated per frame, measured on a movie
(io.brightness), and told to a phi (PhiConfig.spread_input) in training, analyze and exports."""

import dataclasses
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
from smlm_tfdiff.simulation.config import typical_spread
from smlm_tfdiff.simulation.simulate import simulate


def test_typical_spread_is_the_log_sd_of_the_draw():
    """typical_spread: 0 for one N0, the frame spread where set, and the log-sd of a per-emitter
    uniform or log-uniform draw (against 200,000 draws: the sd of a sample sd is ~sd / sqrt(2n))."""
    rng = np.random.default_rng(0)
    n = 200_000
    assert typical_spread(SimulationConfig.preset("paper")) == 0.0
    assert typical_spread(SimulationConfig.preset("wholefield_dye")) == 0.4
    uniform = SimulationConfig.preset("paper", photons_range=(1000.0, 5000.0))
    log_uniform = uniform.replace(photons_distribution="log_uniform")
    for config, draws in ((uniform, rng.uniform(1000, 5000, n)),
                          (log_uniform, np.exp(rng.uniform(np.log(1000), np.log(5000), n)))):
        sd = np.std(np.log(draws))
        assert abs(typical_spread(config) - sd) < 5 * sd / np.sqrt(2 * n)


def test_frames_draw_their_spread_from_the_range():
    """photons_frame_spread_range: each frame's spread uniform in the range (simulate's
    frame_spread), and its emitters' log-photons about the frame's N0 have that sd: the pooled
    z = log(N / N0) / spread is standard normal. Without a range frame_spread is the scene's."""
    config = SimulationConfig.preset("wholefield", photons_frame_spread_range=(0.1, 0.6),
                                     frame_height=16, frame_width=16,
                                     density_range=(0.05, 0.05))
    data = simulate(config, 400, seed=11)
    spread = data["frame_spread"]
    assert spread.shape == (400,) and spread.min() >= 0.1 and spread.max() <= 0.6
    assert stats.kstest((spread - 0.1) / 0.5, "uniform").pvalue > 1e-3
    mask = data["mask"]
    z = (np.log(data["photons"][mask] / np.repeat(data["frame_photons"], mask.sum(1)))
         / np.repeat(spread, mask.sum(1)))
    assert len(z) > 2000 and stats.kstest(z, "norm").pvalue > 1e-3
    fixed = simulate(SimulationConfig.preset("wholefield_dye", frame_height=8, frame_width=8),
                     4, seed=1)
    np.testing.assert_array_equal(fixed["frame_spread"], np.full(4, 0.4, np.float32))
    np.testing.assert_array_equal(simulate(SimulationConfig.preset("paper"), 2, 1)["frame_spread"],
                                  np.zeros(2, np.float32))


def test_a_fraction_of_frames_has_spread_zero():
    """photons_frame_spread_zero_fraction: that fraction of frames (binomial, 4 sds) has spread 0,
    their emitters all at the frame's N0; the others' spreads stay uniform in the range. Unset,
    the frames are the same bytes as before the setting existed (no extra draw)."""
    base = SimulationConfig.preset("wholefield", photons_frame_spread_range=(0.1, 0.6),
                                   frame_height=16, frame_width=16, density_range=(0.05, 0.05))
    n, fraction = 600, 0.3
    data = simulate(base.replace(photons_frame_spread_zero_fraction=fraction), n, seed=11)
    spread, mask = data["frame_spread"], data["mask"]
    zero = spread == 0
    assert abs(zero.sum() - n * fraction) < 4 * np.sqrt(n * fraction * (1 - fraction))
    alike = data["photons"][zero] / data["frame_photons"][zero][:, None]
    np.testing.assert_allclose(alike[mask[zero]], 1.0, rtol=1e-6)
    assert stats.kstest((spread[~zero] - 0.1) / 0.5, "uniform").pvalue > 1e-3
    for key in ("frames", "photons", "frame_spread"):
        np.testing.assert_array_equal(
            simulate(base, 3, seed=2)[key],
            simulate(base.replace(photons_frame_spread_zero_fraction=0.0), 3, seed=2)[key])


def test_spread_range_settings_are_checked():
    with pytest.raises(ValueError, match="photons_frame_spread_range: draws one N0 per frame"):
        SimulationConfig.preset("paper", photons_frame_spread_range=(0.0, 0.5))
    with pytest.raises(ValueError, match="replaces photons_frame_spread"):
        SimulationConfig.preset("wholefield_dye", photons_frame_spread_range=(0.0, 0.5))
    with pytest.raises(ValueError, match="0 <= low <= high"):
        SimulationConfig.preset("wholefield", photons_frame_spread_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="zero_fraction: sets spread 0 .* set the range too"):
        SimulationConfig.preset("wholefield", photons_frame_spread_zero_fraction=0.5)
    with pytest.raises(ValueError, match=r"fraction of frames in \[0, 1\]"):
        SimulationConfig.preset("wholefield", photons_frame_spread_range=(0.0, 0.5),
                                photons_frame_spread_zero_fraction=1.5)


@pytest.mark.parametrize("spread", [0.0, 0.4])
def test_spread_is_measured_on_isolated_spots(spread):
    """estimate_emitter_spread on sparse frames (N0 1000, 5 photons per pixel of background) at
    the true positions recovers the spread: the photometry's own variance is taken out (at N0
    1000 it is a log-sd of ~0.05, at spread 0 all there is). Tolerance: 4 sds of a MAD-based sd
    of that many spots (sd ~ 1.67 s / sqrt(2 n), s the total log-sd), plus 0.03 for the
    photometry variance's approximations."""
    config = SimulationConfig.preset(
        "wholefield", frame_height=32, frame_width=32, density_range=(4 / 1024, 4 / 1024),
        photons_range=(1000.0, 1000.0), photons_frame_spread=spread,
        background_range=(5.0, 5.0))
    data = simulate(config, 150, seed=21)
    photons = (data["frames"][..., 0] - config.offset) / config.gain
    truth = [p[m] for p, m in zip(data["positions"], data["mask"])]
    measured, spots = brightness.estimate_emitter_spread(
        photons, truth, config.psf_sigma, config.readout_var / config.gain ** 2)
    assert spots > 250
    total = np.sqrt(spread ** 2 + 0.05 ** 2)
    assert abs(measured - spread) < 4 * 1.67 * total / np.sqrt(2 * spots) + 0.03
    # Too few spots: no estimate.
    assert np.isnan(brightness.estimate_spread(np.ones(3), np.zeros(3)))


def test_photometry_variance_matches_repeated_fits():
    """photometry_variance against the spread of io.photometry's intensity over repeated noisy
    frames of one spot (2,000 frames: the sd of a variance is ~var sqrt(2 / n))."""
    from smlm_tfdiff.io.photometry import photometry
    from smlm_tfdiff.simulation.physics.psf import pixel_integrals_numpy

    rng = np.random.default_rng(3)
    xy, n0, bg, sigma = np.array([[7.3, 6.8]]), 800.0, 10.0, 0.92
    ex = pixel_integrals_numpy(np.array([7.3]), 15, sigma)[0]
    ey = pixel_integrals_numpy(np.array([6.8]), 15, sigma)[0]
    rate = n0 * np.outer(ey, ex) + bg
    fits = [photometry(rng.poisson(rate).astype(np.float64), xy, sigma)["intensity"][0]
            for _ in range(2000)]
    predicted = brightness.photometry_variance(xy, np.array([n0]), np.array([bg]), sigma)[0]
    observed = np.var(fits)
    assert abs(observed / predicted - 1) < 4 * np.sqrt(2 / 2000)


def _spread_phi_folder(tmp_path, with_psi=False):
    """The whole-field phi under a phi_config told the spread, its weights extended by
    add_spread_weights (the same function as the bundled phi's, whatever the spread)."""
    from smlm_tfdiff.models.phi import PhiConfig, add_spread_weights, build_phi
    from smlm_tfdiff.pretrained import WEIGHTS_DIR, pretrained

    source = pretrained("wholefield")
    folder = tmp_path / "phi_spread"
    folder.mkdir()
    names = ["sim_config.json", "detection.json"]
    if with_psi:
        names += ["psi.weights.h5", "psi_config.json", "diffusion.json"]
    for name in names:
        shutil.copy(os.path.join(WEIGHTS_DIR, "wholefield", name), folder / name)
    config = dataclasses.replace(source.phi_config, spread_input=True)
    phi = build_phi(source.config, config)
    phi.set_weights(add_spread_weights(source.phi))
    phi.save_weights(str(folder / "phi.weights.h5"))
    (folder / "phi_config.json").write_text(config.to_json())
    return str(folder), source


def test_a_phi_told_the_spread_starts_as_the_phi_it_extends(tmp_path):
    """add_spread_weights: the spread's input weights 0, so the extended phi is the same function
    at any spread; phi_input builds the same input from NumPy and tensors; a phi told the spread
    needs brightness_reference."""
    import tensorflow as tf

    from smlm_tfdiff.models.phi import PhiConfig, phi_input

    folder, source = _spread_phi_folder(tmp_path)
    told = load_backend(folder, need_psi=False, jit_compile=False)
    plain = load_backend("wholefield", need_psi=False, jit_compile=False)
    assert told.spread_input and not plain.spread_input
    frames = simulate(source.config.replace(frame_height=24, frame_width=24), 2, 5)["frames"]
    for spread in (0.0, 0.5):
        np.testing.assert_allclose(told.estimate(frames, 900.0, spread),
                                   plain.estimate(frames, 900.0), atol=1e-5)
    with pytest.raises(ValueError, match="--photon_spread"):
        told.estimate(frames, 900.0)
    config = PhiConfig(brightness_reference=700.0, spread_input=True)
    a = phi_input(frames, 100.0, config, np.array([500.0, 900.0]), np.array([0.1, 0.3]))
    b = phi_input(tf.constant(frames), 100.0, config, tf.constant([500.0, 900.0]),
                  tf.constant([0.1, 0.3]))
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-6)
    assert a.shape == frames.shape[:3] + (2,)
    np.testing.assert_allclose(a[1, ..., 1], np.full(frames.shape[1:3], 0.3), rtol=1e-6)
    with pytest.raises(ValueError, match="set brightness_reference too"):
        PhiConfig(spread_input=True)


def test_phi_dataset_tells_phi_the_frames_spread():
    """Training frames of a phi told the spread: the second channel is the frame's spread +
    SPREAD_JITTER z (at least 0), constant over the frame; the first as without it."""
    from smlm_tfdiff import seeds
    from smlm_tfdiff.models.phi import PhiConfig, SPREAD_JITTER
    from smlm_tfdiff.models.phi_training import phi_dataset
    from smlm_tfdiff.simulation.simulate import make_dataset

    config = SimulationConfig.preset("wholefield", frame_height=12, frame_width=12,
                                     photons_frame_spread_range=(0.3, 0.3))
    told = PhiConfig(input_transform="anscombe", brightness_reference=700.0, spread_input=True)
    plain = dataclasses.replace(told, spread_input=False)
    raw = next(iter(make_dataset(config, 256, seeds.fold_in(5, 0))))
    a = next(iter(phi_dataset(config, 256, 5, 0, told)))["frames"].numpy()
    b = next(iter(phi_dataset(config, 256, 5, 0, plain)))["frames"].numpy()
    np.testing.assert_array_equal(a[..., :1], b)
    channel = a[..., 1]
    assert np.all(channel == channel[:, :1, :1])
    z = (channel[:, 0, 0] - raw["frame_spread"].numpy()) / SPREAD_JITTER
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_analyze_measures_or_takes_the_spread(tmp_path):
    """analyze with a phi told the spread measures it on the movie beside N0 (recorded in the
    summary), or takes it as given (--photon_spread); a negative one is refused."""
    folder, source = _spread_phi_folder(tmp_path)
    backend = load_backend(folder, need_psi=False)
    config = SimulationConfig.preset(
        "wholefield", frame_height=32, frame_width=32, density_range=(4 / 1024, 4 / 1024),
        photons_range=(1500.0, 1500.0), photons_frame_spread=0.0, background_range=(5.0, 5.0))
    data = simulate(config, 16, seed=4)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.round(data["frames"][..., 0]).astype(np.uint16), imagej=True)
    camera = Camera(offset_adu=float(config.offset), gain_adu_per_photon=float(config.gain))
    measured = StackAnalyzer(backend, camera, num_samples=0, progress=False).analyze(
        path, tmp_path / "out")["emitter_photons"]
    assert measured["source"] == "estimated" and measured["spread_source"] == "estimated"
    assert measured["spread_spots"] >= 30 and 0.0 <= measured["spread"] < 0.15
    given = StackAnalyzer(backend, camera, num_samples=0, progress=False, photons=1200.0,
                          photon_spread=0.25).analyze(path, tmp_path / "out2")
    assert given["emitter_photons"] == {"n0": 1200.0, "source": "given", "spread": 0.25,
                                        "spread_source": "given"}
    # N0 given, the spread measured at that N0.
    half = StackAnalyzer(backend, camera, num_samples=0, progress=False,
                         photons=1500.0).analyze(path, tmp_path / "out3")["emitter_photons"]
    assert half["n0"] == 1500.0 and half["source"] == "given"
    assert half["spread_source"] == "estimated"
    # Too few isolated spots (a 2-frame crop of 8x8 px): the fallback spread, said so.
    tiny = tmp_path / "tiny.tif"
    tifffile.imwrite(tiny, np.round(data["frames"][:2, 4:12, 4:12, 0]).astype(np.uint16),
                     imagej=True)
    with pytest.warns(UserWarning, match="spread of the emitters' photons was not measured"):
        fallback = StackAnalyzer(backend, camera, num_samples=0, progress=False,
                                 photons=1500.0).analyze(tiny, tmp_path / "out4")
    assert fallback["emitter_photons"]["spread"] == 0.4
    assert fallback["emitter_photons"]["spread_source"] == "fallback"
    with pytest.raises(ValueError, match="photon_spread .* must be >= 0"):
        StackAnalyzer(backend, camera, num_samples=0, progress=False, photon_spread=-0.1)


def test_export_fixes_the_spread(tmp_path):
    """A phi told the spread exports for one dye's spread: required, built into the graph (the
    export's phi equals analyze's), refused for other phis."""
    from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_models
    from smlm_tfdiff.serving import SamplerModule

    folder, source = _spread_phi_folder(tmp_path, with_psi=True)
    models = load_models(folder)
    with pytest.raises(ValueError, match="--photon_spread"):
        SamplerModule(models, photons=1500.0)
    module = SamplerModule(models, photons=1500.0, spread=0.2)
    frames = simulate(source.config.replace(frame_height=16, frame_width=16), 2, 6)["frames"]
    backend = load_backend(folder, jit_compile=False)
    np.testing.assert_allclose(module._phi(frames).numpy(),
                               backend.estimate(frames, 1500.0, 0.2), atol=1e-5)
    with pytest.raises(ValueError, match="spread_input\\) only"):
        SamplerModule(load_models(os.path.join(WEIGHTS_DIR, "wholefield")), photons=1500.0,
                      spread=0.2)


def test_a_model_told_the_spread_gives_other_scenes():
    """scene_config of a model trained on spreads drawn per frame: the preset's scene, its
    spread (none drawn, the preset's own) included."""
    from smlm_tfdiff.pretrained import pretrained

    models = pretrained("wholefield_fast")
    assert models.config.photons_frame_spread_range is not None
    paper = models.scene_config("paper")
    assert paper.photons_frame_spread_range is None and paper.photons_range is None
    assert typical_spread(paper) == 0.0
    assert models.scene_config("wholefield_dye").photons_frame_spread == 0.4
