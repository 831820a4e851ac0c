"""localization.refit: phi's localizations refitted in each posterior sample (analyze's
in_samples "refit"), against the truth of rendered images and against detection's joint fit."""

import numpy as np
import pytest

from smlm_tfdiff.localization.batched import _model_images, fit_groups
from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.localization.refit import localization_uncertainty_refit, refit_positions
from smlm_tfdiff.simulation.config import SimulationConfig

CONFIG = SimulationConfig.preset("wholefield", frame_height=12, frame_width=12)
DETECTION = DetectionConfig(threshold=0.15)


def render(xy_hr, amp, shape=(48, 48)):
    """KDE images [N, H, W] of emitters xy_hr [N, P, 2] (HR px) with amplitudes [N, P]."""
    valid = np.ones(amp.shape, bool)
    return _model_images(xy_hr, amp, valid, shape, CONFIG.kde_sigma, CONFIG.kde_norm)


def test_refit_recovers_rendered_emitters_including_a_pair():
    """Noise-free images of an isolated emitter and a pair 8 HR px apart (2.7 kernel widths:
    their blobs overlap), each started 1.5 HR px off: the sweeps land on the truth."""
    rng = np.random.default_rng(0)
    truth = np.array([[[10.3, 11.7], [30.2, 28.9], [38.2, 29.4]]] * 4)
    truth = truth + rng.uniform(-0.5, 0.5, truth.shape)
    amp = rng.uniform(0.7, 1.5, truth.shape[:2])
    images = render(truth, amp)
    start = truth + rng.choice([-1.5, 1.5], truth.shape)
    xy, fitted = refit_positions(images, start, np.ones(amp.shape, bool), CONFIG, DETECTION,
                                 iterations=12)
    np.testing.assert_allclose(xy, truth, atol=0.02)
    np.testing.assert_allclose(fitted, amp, rtol=0.02)


def test_refit_agrees_with_the_joint_least_squares_fit_on_noisy_images():
    """On noisy images of a crowded group (6 emitters >= 8 HR px apart, their blobs
    overlapping), the sweeps reach the fit detection's Levenberg-Marquardt solves jointly
    (fit_groups), from the same starts."""
    rng = np.random.default_rng(1)
    n, p = 24, 6
    truth = np.zeros((n, p, 2))
    for i in range(n):  # Rejection sampling of a group with pairwise distances >= 8 HR px.
        pts = []
        while len(pts) < p:
            cand = rng.uniform(12, 36, 2)
            if all(np.hypot(*(cand - q)) >= 8 for q in pts):
                pts.append(cand)
        truth[i] = pts
    images = render(truth, np.ones((n, p))) + rng.normal(0, 0.02, (n, 48, 48))
    start = truth + rng.normal(0, 0.5, truth.shape)
    valid = np.ones((n, p), bool)
    xy, _ = refit_positions(images, start, valid, CONFIG, DETECTION, iterations=6)
    joint, _ = fit_groups(images, np.arange(n), start, np.ones((n, p)), valid, CONFIG.kde_sigma,
                          CONFIG.kde_norm, DETECTION.refine_radius)
    err = np.hypot(*(xy - joint).transpose(2, 0, 1))
    assert np.median(err) < 0.01 and np.quantile(err, 0.95) < 0.05


def test_uncertainty_is_the_spread_of_the_refitted_positions():
    """Samples of one emitter shifted by known offsets: std_nm is the offsets' std (ddof 1),
    mean_xy their mean; a sample without the emitter and one where it moved beyond the
    tolerance do not count; a neighbour given as context is refitted, not reported."""
    u, nm = CONFIG.upsample, CONFIG.pixel_size_nm
    ref = np.array([[5.0, 6.0]])  # LR px
    neighbour = np.array([[7.0, 6.2]])
    rng = np.random.default_rng(2)
    shifts = rng.normal(0, 0.3, (10, 2))  # HR px
    xy = np.concatenate([ref * u + shifts[:, None], np.repeat(neighbour[None] * u, 10, 0)], 1)
    amp = np.ones((10, 2))
    amp[8, 0] = 0.0  # Sample 8 lacks the emitter.
    xy[9, 0] += [2.6, 2.6]  # Sample 9: 3.7 HR px off, inside the fit's bound, beyond 3 HR px.
    samples = render(xy, amp)
    out = localization_uncertainty_refit(samples, ref, CONFIG, DETECTION, tolerance_hr=3.0,
                                         context=neighbour, iterations=10)
    assert out["xy"].shape == (1, 2) and out["std_nm"].shape == (1, 2)
    np.testing.assert_allclose(out["fraction"], [0.8])
    np.testing.assert_allclose(out["std_nm"][0], shifts[:8].std(0, ddof=1) / u * nm, rtol=0.02)
    np.testing.assert_allclose(out["mean_xy"][0], ref[0] + shifts[:8].mean(0) / u, atol=2e-3)
    np.testing.assert_allclose(out["uncertainty_nm"], np.sqrt(np.mean(out["std_nm"] ** 2, 1)))
    # Batched over images: the same per image.
    two = localization_uncertainty_refit(np.stack([samples, samples]), [ref, ref], CONFIG,
                                         DETECTION, tolerance_hr=3.0,
                                         context=[neighbour, neighbour], iterations=10)
    for res in two:
        np.testing.assert_allclose(res["std_nm"], out["std_nm"])
    # Without the neighbour in the fit its blob pulls the reference towards it.
    alone = localization_uncertainty_refit(samples, ref, CONFIG, DETECTION, tolerance_hr=3.0,
                                           iterations=10)
    assert alone["mean_xy"][0, 0] - out["mean_xy"][0, 0] > 0.02


def test_refit_edges_and_empty_input():
    """An emitter at the image corner is fitted from the pixels that exist; no localizations
    give empty results; bad shapes are named."""
    truth = np.array([[[1.2, 0.8]]])
    images = render(truth, np.ones((1, 1)))
    xy, amp = refit_positions(images, truth + 0.6, np.ones((1, 1), bool), CONFIG, DETECTION,
                              iterations=12)
    np.testing.assert_allclose(xy, truth, atol=0.05)
    out = localization_uncertainty_refit(images[None].repeat(3, 1)[0], np.zeros((0, 2)), CONFIG)
    assert out["std_nm"].shape == (0, 2) and out["fraction"].shape == (0,)
    with pytest.raises(ValueError, match=r"xy0 must be \[N, M, 2\]"):
        refit_positions(images, np.zeros((2, 1, 2)), np.ones((2, 1), bool), CONFIG)
    with pytest.raises(ValueError, match="list of B references"):
        localization_uncertainty_refit(images[None], np.zeros((1, 2)), CONFIG)
    with pytest.raises(ValueError, match="one \\[C, 2\\] array per image"):
        localization_uncertainty_refit(images[None], [np.zeros((1, 2))], CONFIG,
                                       context=[np.zeros((0, 2))] * 2)


def test_detection_config_in_samples():
    assert DetectionConfig().in_samples == "detect"
    assert DetectionConfig.from_json('{"in_samples": "refit"}').in_samples == "refit"
    with pytest.raises(ValueError, match="in_samples: must be one of"):
        DetectionConfig(in_samples="fit")


def test_a_localization_beyond_the_edge_is_held_by_no_sample():
    """A reference whose refit window lies wholly outside the image (here 1.4 LR px beyond its
    left edge, next to an emitter at the edge) has nothing to fit: amplitude 0 and its start in
    every sample, so it counts in none (fraction 0, std NaN: analyze's NaN uncertainty), not as
    a spread of 0 (a certainty); the emitter beside it is refitted as alone."""
    u = CONFIG.upsample
    rng = np.random.default_rng(4)
    xy = np.array([[0.3, 6.0]]) * u + rng.normal(0, 0.3, (6, 1, 2))
    samples = render(xy, np.ones((6, 1)))
    ref = np.array([[0.3, 6.0], [-1.4, 6.0]])
    fxy, amp = refit_positions(samples, np.repeat(ref[None] * u, 6, 0), np.ones((6, 2), bool),
                               CONFIG, DETECTION)
    np.testing.assert_array_equal(amp[:, 1], 0.0)
    np.testing.assert_array_equal(fxy[:, 1], np.repeat(ref[1:] * u, 6, 0))
    out = localization_uncertainty_refit(samples, ref, CONFIG, DETECTION)
    alone = localization_uncertainty_refit(samples, ref[:1], CONFIG, DETECTION)
    np.testing.assert_array_equal(out["fraction"], [1.0, 0.0])
    assert np.all(out["std_nm"][0] > 0) and np.all(np.isnan(out["std_nm"][1]))
    np.testing.assert_allclose(out["std_nm"][0], alone["std_nm"][0])
