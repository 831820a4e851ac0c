"""detect_batch against detect (the per-image reference), associate against match, and the batched
per-localization uncertainty against per_localization's."""

import math

import numpy as np
import pytest
from scipy import ndimage

import smlm_tfdiff as st
from smlm_tfdiff.localization import batched, detection
from smlm_tfdiff.localization.batched import (associate, detect_batch,
                                              localization_uncertainty_batched, log_peaks_batch)
from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.localization.detection import BLOCK_PEAKS, log_peaks
from smlm_tfdiff.localization.metrics import match


def _assert_same(batch, reference, atol=1e-8):
    assert len(batch) == len(reference)
    for got, want in zip(batch, reference):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=atol)


def _noisy(kde, scale, seed):
    return kde + scale * np.random.default_rng(seed).standard_normal(kde.shape)


@pytest.fixture(scope="module")
def scenes():
    """[8, H, W] noisy KDEs: isolated emitters, a merged pair, a smeared cluster, border
    emitters, simulated frames, and empty images."""
    paper = st.SimulationConfig.preset("paper")
    pair = st.render_kde(np.array([[10.0, 10.0], [11.0, 10.3]]), paper)
    cluster = ndimage.gaussian_filter(st.render_kde(
        np.array([[8.5, 10.0], [10.5, 10.0], [12.5, 10.0], [10.5, 12.0]]), paper), 1.5)
    border = st.render_kde(np.array([[0.05, 3.0], [19.9, 19.95], [10.0, 0.1], [0.2, 19.8]]),
                           paper)
    isolated = st.render_kde(np.array([[4.3, 4.6], [15.2, 6.1], [9.7, 15.4]]), paper)
    sim = np.asarray(st.simulate(paper, 2, 11)["kde"])[..., 0]
    empty = np.zeros_like(pair)
    images = np.stack([isolated, pair, cluster, border, sim[0], sim[1], empty, empty])
    noise = _noisy(np.zeros_like(images), 0.01, 0)
    noise[6] = 0.0  # One exactly empty image, one of noise only.
    return images + noise


def test_matches_detect_on_noisy_kdes(paper, scenes):
    reference = [st.detect(im, paper) for im in scenes]
    assert len(reference[1]) == 2 and len(reference[2]) == 4  # Deblended and residual add.
    assert len(reference[6]) == 0
    _assert_same(detect_batch(scenes, paper), reference)
    # One image, the empty ones alone, and [N, H, W, 1] input.
    _assert_same(detect_batch(scenes[1:2], paper), reference[1:2])
    _assert_same(detect_batch(scenes[6:], paper), reference[6:])
    _assert_same(detect_batch(scenes[..., None], paper), reference)


def test_split_offset_is_a_detection_setting(paper, scenes):
    """DetectionConfig.split_offset moves where split parts start: detect and detect_batch agree
    with it, the merged pair is still resolved, and a bad value is refused."""
    wide = DetectionConfig(split_offset=0.75)
    reference = [st.detect(im, paper, detection=wide) for im in scenes]
    assert len(reference[1]) == 2
    _assert_same(detect_batch(scenes, paper, wide), reference)
    truth = np.array([[10.0, 10.0], [11.0, 10.3]])
    for found in (reference[1], st.detect(scenes[1], paper)):  # Either start ends at the pair.
        np.testing.assert_allclose(found[np.argsort(found[:, 0])], truth, atol=0.05)
    with pytest.raises(ValueError, match="split_offset"):
        DetectionConfig(split_offset=0.0)
    legacy = wide.to_legacy()
    assert legacy["detect_split_offset"] == 0.75
    assert DetectionConfig.from_legacy(legacy) == wide
    assert "detect_split_offset" not in DetectionConfig().to_legacy()


def test_split_trigger_is_a_detection_setting(paper, scenes):
    """DetectionConfig.split_trigger is deblending's trigger: the merged pair (amplitude ~1.8)
    is split under it, kept whole above it, in detect and detect_batch alike; an explicit
    deblend trigger wins; it round-trips through an export's keys; a bad value is refused."""
    assert DetectionConfig().split_trigger == detection.DEBLEND_DEFAULTS["trigger"]
    high = DetectionConfig(split_trigger=2.5)
    for found in (st.detect(scenes[1], paper, detection=high),
                  detect_batch(scenes[1:2], paper, high)[0]):
        assert len(found) == 1
    assert len(detect_batch(scenes[1:2], paper, high, deblend={"trigger": 1.25})[0]) == 2
    # An empty dict means the defaults in both (detect once read it as "no deblending").
    assert len(st.detect(scenes[1], paper, deblend={})) == 2
    assert len(detect_batch(scenes[1:2], paper, deblend={})[0]) == 2
    reference = [st.detect(im, paper, detection=high) for im in scenes]
    _assert_same(detect_batch(scenes, paper, high), reference)
    legacy = high.to_legacy()
    assert legacy["detect_split_trigger"] == 2.5
    assert DetectionConfig.from_legacy(legacy) == high
    assert "detect_split_trigger" not in DetectionConfig().to_legacy()
    for bad in (0.0, float("nan"), True):
        with pytest.raises(ValueError, match="split_trigger"):
            DetectionConfig(split_trigger=bad)


def test_block_sweeps_approach_the_joint_fit():
    """A crowded field's one big group (emitters >= 6 HR px apart, blobs overlapping, noise):
    the block sweeps detection uses for groups of more than BLOCK_PEAKS end close to the joint
    Levenberg-Marquardt fit of the whole group, from the same starts, and as close to the truth.
    (Each tile fits its own windows only, so they need not meet exactly: 0.017 HR px median
    apart here whatever the sweep count, 0.12 at most after 3 sweeps, 0.43 after 1.)"""
    config = st.SimulationConfig.preset("paper", frame_height=24, frame_width=24, region="frame",
                                        margin=0.0)
    rng = np.random.default_rng(3)
    pts = []
    while len(pts) < 60:  # Rejection sampling: pairwise >= 1.5 LR px (6 HR px).
        cand = rng.uniform(1, 23, 2)
        if all(np.hypot(*(cand - q)) >= 1.5 for q in pts):
            pts.append(cand)
    truth = np.array(pts)
    kde = st.render_kde(truth, config) + 0.02 * rng.standard_normal((96, 96))
    u = config.upsample
    start = (truth * u + rng.normal(0, 0.7, truth.shape))[None]
    valid = np.ones((1, len(truth)), bool)
    args = (kde[None], np.zeros(1, np.int64), start, np.ones((1, len(truth))), valid,
            config.kde_sigma, config.kde_norm, 3)
    assert len(truth) > BLOCK_PEAKS
    joint_xy, joint_amp = batched.fit_groups(*args)
    block_xy, block_amp = batched.fit_peak_groups(*args)
    err = np.hypot(*(block_xy - joint_xy)[0].T)  # HR px
    assert np.median(err) < 0.03 and err.max() < 0.2
    np.testing.assert_allclose(block_amp, joint_amp, atol=0.03)
    rmse = [np.sqrt(np.mean((xy[0] - truth * u) ** 2)) for xy in (joint_xy, block_xy)]
    assert rmse[0] < 0.05 and rmse[1] < 1.1 * rmse[0]


def test_matches_detect_on_a_crowded_field(monkeypatch):
    """A field where every peak links to the next (one group of > BLOCK_PEAKS peaks: block sweeps,
    local refits after split tries) and residual tries run several per round."""
    config = st.SimulationConfig.preset("paper", frame_height=32, frame_width=32, region="frame",
                                        margin=0.0)
    rng = np.random.default_rng(5)
    truth = rng.uniform(0, 32, (100, 2))
    kde = ndimage.gaussian_filter(st.render_kde(truth, config), 1.5)
    kde = kde + 0.01 * rng.standard_normal(kde.shape)
    peaks, valid = log_peaks_batch(kde[None], 0.2, 2.0)
    link = 2 * 3 + 1 + math.ceil(4.0 * config.kde_sigma)
    # One group of more than BLOCK_PEAKS: both detect and detect_batch fit it by block sweeps.
    assert batched._groups(peaks, valid, link)[2].sum(1).max() > BLOCK_PEAKS
    per_round = []
    spread = detection.spread_candidates
    monkeypatch.setattr(detection, "spread_candidates",
                        lambda *a: per_round.append(len(spread(*a))) or spread(*a))
    reference = st.detect(kde, config)
    assert max(per_round) > 1
    assert len(detect_batch(kde[None], config, deblend={"max_adds": 0})[0]) < len(reference)
    _assert_same(detect_batch(kde[None], config), [reference])
    assert len(match(reference, truth, 5.0 / config.upsample)[0]) >= 0.9 * len(truth)


def test_log_peaks_match_blob_log_with_pruning():
    # Smoothed noise: many maxima 2 px apart, so blob_log's overlap pruning (also in chains)
    # decides which survive.
    images = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((30, 40, 40)),
                                     (0, 1.0, 1.0))
    peaks, valid = log_peaks_batch(images, 0.01, 2.0)
    unpruned = sum(len(log_peaks(im, 0.01, 2.0, 2.0, 1, overlap=1.0)) for im in images)
    assert valid.sum() < unpruned
    for im, p, v in zip(images, peaks, valid):
        np.testing.assert_array_equal(p[v], log_peaks(im, 0.01, 2.0, 2.0, 1))


def test_options_match_detect(paper, scenes):
    det = DetectionConfig(threshold=0.25, refine_radius=2)
    images = scenes[:4]
    for kwargs in ({"deblend": False}, {"deblend": {"max_adds": 0}}):
        reference = st.detect(images, paper, detection=det, return_amplitude=True, **kwargs)
        got = detect_batch(images, paper, det, return_amplitude=True, **kwargs)
        _assert_same(got[0], reference[0])
        _assert_same(got[1], reference[1])
    # Several LoG scales: the per-image detect.
    multi = DetectionConfig(min_sigma=2.0, max_sigma=4.0, num_sigma=3)
    _assert_same(detect_batch(images, paper, multi), st.detect(images, paper, detection=multi))


def test_input_errors_name_the_problem(paper):
    good = np.zeros((2, 80, 80))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        detect_batch(np.zeros((80, 80)), paper)
    with pytest.raises(ValueError, match="NaN or Inf"):
        detect_batch(np.full((1, 80, 80), np.nan), paper)
    with pytest.raises(ValueError, match="at least 3x3"):
        detect_batch(np.zeros((1, 2, 80)), paper)
    with pytest.raises(TypeError, match="DetectionConfig"):
        detect_batch(good, paper, {"threshold": 0.2})
    with pytest.raises(ValueError, match="unknown deblend options"):
        detect_batch(good, paper, deblend={"trigger_x": 1.0})
    with pytest.raises(TypeError, match="list of"):
        associate(np.zeros((3, 2)), np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        associate([np.zeros((3, 2))], np.zeros((2, 2)), -1.0)
    with pytest.raises(ValueError, match=r"found\[1\]"):
        associate([np.zeros((3, 2)), np.zeros((3, 3))], np.zeros((2, 2)), 1.0)


def test_associate_equals_match():
    rng = np.random.default_rng(3)
    reference = rng.uniform(0, 20, (12, 2))
    found = [reference[rng.permutation(12)[:n]] + rng.normal(0, 0.3, (n, 2))
             for n in (0, 5, 12, 12)]
    found.append(np.concatenate([reference[:3], reference[:3] + 0.2]))  # Ambiguous: two each.
    s, f, r = associate(found, reference, 0.8)
    for i, det in enumerate(found):
        p, q = match(det, reference, 0.8)
        np.testing.assert_array_equal(f[s == i], p)
        np.testing.assert_array_equal(r[s == i], q)
    assert all(len(v) == 0 for v in associate([], reference, 0.8))


def test_uncertainty_matches_per_localization(paper):
    kde = np.asarray(st.simulate(paper, 1, 5)["kde"])[0, ..., 0]
    reference = st.detect(kde, paper)
    samples = _noisy(np.repeat(kde[None], 6, 0), 0.03, 1)
    want = st.localization_uncertainty(samples, None, paper, reference=reference)
    got = localization_uncertainty_batched(samples, reference, paper)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-9)
    assert np.all(np.isfinite(got["std_nm"])) and np.all(got["fraction"] > 0.5)
    # Several frames in one call: the same dicts as frame by frame.
    frames = localization_uncertainty_batched(np.stack([samples, samples[::-1]])[..., None],
                                              [reference, reference[:2]], paper)
    second = localization_uncertainty_batched(samples[::-1], reference[:2], paper)
    for got_frame, want_frame in zip(frames, (got, second)):
        for key in want_frame:
            np.testing.assert_allclose(got_frame[key], want_frame[key], rtol=1e-12)
    with pytest.raises(ValueError, match="list of B references"):
        localization_uncertainty_batched(np.stack([samples, samples]), reference, paper)
