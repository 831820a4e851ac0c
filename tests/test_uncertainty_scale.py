"""The calibration scale of psi's per-localization std (uncertainty.scale): its formula, its file,
and analyze applying it (uncertainty columns scaled, uncertainty_raw_xy psi's own spread)."""

import csv
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import tifffile

from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend
from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_models
from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.uncertainty.scale import SCALE_FILE, UncertaintyScale


def test_factor_follows_the_formula():
    scale = UncertaintyScale(intercept=0.1, per_neighbour=0.05, per_log_photons=-0.3,
                             radius_px=8.0, reference_photons=200.0)
    # Two within 8 px of each other (distance 5), one alone (the third is 8.5 px from the second).
    xy = np.array([[0.0, 0.0], [3.0, 4.0], [11.5, 4.0]])
    np.testing.assert_array_equal(scale.neighbours(xy), [1, 1, 0])
    photons = np.array([400.0, np.nan, 1e9])
    expected = np.exp([0.1 + 0.05 - 0.3 * math.log(2.0),
                       0.1 + 0.05,  # A failed photometry counts as the reference brightness.
                       0.1 - 0.3 * math.log(1e5 / 200.0)])  # Clipped to 1e5 photons.
    np.testing.assert_allclose(scale.factor(xy, photons), expected, rtol=1e-12)
    # Exactly at the radius counts as a neighbour (as the fit counted them).
    np.testing.assert_array_equal(scale.neighbours([[0, 0], [8, 0]]), [1, 1])
    assert scale.factor(np.zeros((0, 2)), np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="one value per localization"):
        scale.factor(xy, photons[:2])
    # log(1 + k) in place of k (the whole-field model's form).
    log1p = dataclasses.replace(scale, neighbour_term="log1p")
    xy4 = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 5.0], [40.0, 0.0]])  # k = 2, 2, 2, 0.
    np.testing.assert_allclose(log1p.factor(xy4, np.full(4, 200.0)),
                               np.exp([0.1 + 0.05 * math.log(3.0)] * 3 + [0.1]), rtol=1e-12)
    with pytest.raises(ValueError, match="neighbour_term must be one of"):
        UncertaintyScale(0.0, 0.0, 0.0, neighbour_term="quadratic")


def test_background_term_follows_the_formula():
    scale = UncertaintyScale(intercept=0.1, per_neighbour=0.05, per_log_photons=-0.3,
                             per_log_widening=0.8)
    assert scale.uses_background and not dataclasses.replace(scale, per_log_widening=0.0) \
        .uses_background
    xy = np.array([[0.0, 0.0], [20.0, 0.0], [40.0, 0.0], [60.0, 0.0]])  # k = 0 for all.
    photons = np.full(4, 200.0)
    widening = np.array([1.0, 1.5, np.nan, 50.0])
    expected = np.exp(0.1 + 0.8 * np.log([1.0, 1.5, 1.0, 10.0]))  # NaN: 1; clipped to 10.
    np.testing.assert_allclose(scale.factor(xy, photons, widening), expected, rtol=1e-12)
    # Without the widening (None) the term is 0, as on a frame without background.
    np.testing.assert_allclose(scale.factor(xy, photons), np.exp(0.1), rtol=1e-12)
    with pytest.raises(ValueError, match="widening must hold one value per localization"):
        scale.factor(xy, photons, widening[:3])


def test_interaction_term_follows_the_formula(tmp_path):
    """per_neighbour_log_photons e: + e g(k) log(N / N_ref); absent from older files (0); the
    benchmarks' design matrix and write_scale put it last."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    from _validation import features, write_scale

    scale = UncertaintyScale(intercept=0.1, per_neighbour=0.3, per_log_photons=-0.4,
                             neighbour_term="log1p", per_log_widening=0.7,
                             per_neighbour_log_photons=0.1)
    xy = np.array([[0.0, 0.0], [3.0, 4.0], [40.0, 0.0]])  # k = 1, 1, 0.
    photons = np.array([800.0, 50.0, 800.0])
    widening = np.array([1.0, 2.0, 1.0])
    g, p = np.log([2.0, 2.0, 1.0]), np.log(photons / 200.0)
    expected = np.exp(0.1 + 0.3 * g - 0.4 * p + 0.7 * np.log(widening) + 0.1 * g * p)
    np.testing.assert_allclose(scale.factor(xy, photons, widening), expected, rtol=1e-12)
    old = json.loads(scale.to_json())
    del old["per_neighbour_log_photons"]
    assert UncertaintyScale.from_json(json.dumps(old)).per_neighbour_log_photons == 0.0
    scores = {"neighbours": np.array([1, 1, 0]), "photons": photons, "widening": widening}
    x = features(scores, "log1p", widening=True, interaction=True)
    beta = np.array([0.1, 0.3, -0.4, 0.7, 0.1])
    np.testing.assert_allclose(np.exp(x @ beta), expected, rtol=1e-12)
    for terms, widen in ((beta, True), (beta[[0, 1, 2, 4]], False)):
        write_scale(str(tmp_path), terms, 8.0, "test", "log1p", interaction=True)
        written = UncertaintyScale.from_json((tmp_path / SCALE_FILE).read_text())
        assert written.per_neighbour_log_photons == 0.1
        assert written.per_log_widening == (0.7 if widen else 0.0)


def test_photons_squared_term_follows_the_formula(tmp_path):
    """per_log_photons_squared f: + f log(N / N_ref)^2 (a failed photometry, NaN: N_ref, the term
    0); absent from older files (0); the benchmarks' design matrix puts it after the widening and
    before the interaction, and write_scale reads it from there."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    from _validation import features, write_scale

    scale = UncertaintyScale(intercept=0.1, per_neighbour=0.3, per_log_photons=-0.6,
                             neighbour_term="log1p", per_log_widening=0.7,
                             per_neighbour_log_photons=0.1, per_log_photons_squared=0.05)
    xy = np.array([[0.0, 0.0], [3.0, 4.0], [40.0, 0.0], [40.0, 40.0]])  # k = 1, 1, 0, 0.
    photons = np.array([800.0, 50.0, 3000.0, np.nan])
    widening = np.array([1.0, 2.0, 1.0, 1.5])
    g = np.log([2.0, 2.0, 1.0, 1.0])
    p = np.log(np.array([800.0, 50.0, 3000.0, 200.0]) / 200.0)
    expected = np.exp(0.1 + 0.3 * g - 0.6 * p + 0.7 * np.log(widening) + 0.1 * g * p
                      + 0.05 * p ** 2)
    np.testing.assert_allclose(scale.factor(xy, photons, widening), expected, rtol=1e-12)
    # The curvature: the step in log s from 800 to 3000 photons is not the one from 200 to 800
    # times log(3000 / 800) / log(4), as it is without the term.
    without = dataclasses.replace(scale, per_log_photons_squared=0.0)
    lone = np.array([[0.0, 0.0]])
    steps = [np.log(s.factor(lone, [3000.0]) / s.factor(lone, [800.0]))
             / np.log(s.factor(lone, [800.0]) / s.factor(lone, [200.0]))
             for s in (scale, without)]
    assert abs(steps[1][0] - np.log(3000 / 800) / np.log(4)) < 1e-12
    assert abs(steps[0][0] - steps[1][0]) > 0.1
    old = json.loads(scale.to_json())
    del old["per_log_photons_squared"]
    assert UncertaintyScale.from_json(json.dumps(old)).per_log_photons_squared == 0.0
    scores = {"neighbours": np.array([1, 1, 0, 0]), "photons": photons, "widening": widening}
    x = features(scores, "log1p", widening=True, interaction=True, photons_squared=True)
    beta = np.array([0.1, 0.3, -0.6, 0.7, 0.05, 0.1])
    np.testing.assert_allclose(np.exp(x @ beta), expected, rtol=1e-12)
    for terms, widen, inter in ((beta, True, True), (beta[[0, 1, 2, 4, 5]], False, True),
                                (beta[[0, 1, 2, 4]], False, False),
                                (beta[[0, 1, 2, 3, 4]], True, False)):
        write_scale(str(tmp_path), terms, 8.0, "test", "log1p", interaction=inter,
                    photons_squared=True)
        written = UncertaintyScale.from_json((tmp_path / SCALE_FILE).read_text())
        assert written.per_log_photons_squared == 0.05
        assert written.per_log_widening == (0.7 if widen else 0.0)
        assert written.per_neighbour_log_photons == (0.1 if inter else 0.0)


def test_nearest_neighbour_term_follows_the_formula(tmp_path):
    """per_log_nearest h: + h log(1 + (r0 / r)^2), r the distance to the frame's nearest other
    localization (a frame's only one: the term 0; two on one spot: r = MIN_NEAREST_PX, finite);
    absent from older files (0, r0 = 2 px); the benchmarks' design matrix puts it after
    log(N / 200)^2 and before the interaction, and write_scale reads it from there."""
    import sys

    from smlm_tfdiff.uncertainty.scale import MIN_NEAREST_PX, NEAREST_PX

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    from _validation import features, write_scale

    scale = UncertaintyScale(intercept=0.1, per_neighbour=0.3, per_log_photons=-0.6,
                             neighbour_term="log1p", per_neighbour_log_photons=0.1,
                             per_log_photons_squared=0.05, per_log_nearest=0.4)
    assert scale.nearest_px == NEAREST_PX == 2.0
    # A pair 1 px apart, two localizations on one spot, a lone one 44.7 px from them.
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [20.0, 0.0], [20.0, 0.0], [40.0, 40.0]])
    photons = np.array([800.0, 50.0, 300.0, 300.0, 3000.0])
    r = np.array([1.0, 1.0, MIN_NEAREST_PX, MIN_NEAREST_PX, math.hypot(20.0, 40.0)])
    g = np.log([2.0, 2.0, 2.0, 2.0, 1.0])
    p = np.log(photons / 200.0)
    h = np.log1p((2.0 / r) ** 2)
    expected = np.exp(0.1 + 0.3 * g - 0.6 * p + 0.1 * g * p + 0.05 * p ** 2 + 0.4 * h)
    np.testing.assert_allclose(scale.factor(xy, photons), expected, rtol=1e-12)
    # The pair 1 px apart is reported 5^0.4 = 1.9x wider than without the term.
    without = dataclasses.replace(scale, per_log_nearest=0.0)
    np.testing.assert_allclose(scale.factor(xy, photons)[:2] / without.factor(xy, photons)[:2],
                               5.0 ** 0.4, rtol=1e-12)
    np.testing.assert_allclose(scale.factor(xy[:1], [200.0]), np.exp(0.1), rtol=1e-12)
    old = json.loads(scale.to_json())
    del old["per_log_nearest"], old["nearest_px"]
    restored = UncertaintyScale.from_json(json.dumps(old))
    assert restored.per_log_nearest == 0.0 and restored.nearest_px == 2.0
    with pytest.raises(ValueError, match="nearest_px must be > 0"):
        dataclasses.replace(scale, nearest_px=0.0)
    scores = {"neighbours": np.array([1, 1, 1, 1, 0]), "photons": photons, "nearest": r}
    x = features(scores, "log1p", interaction=True, photons_squared=True, nearest=True)
    beta = np.array([0.1, 0.3, -0.6, 0.05, 0.4, 0.1])
    np.testing.assert_allclose(np.exp(x @ beta), expected, rtol=1e-12)
    for terms, squared, inter in ((beta, True, True), (beta[[0, 1, 2, 4, 5]], False, True),
                                  (beta[[0, 1, 2, 4]], False, False)):
        write_scale(str(tmp_path), terms, 8.0, "test", "log1p", interaction=inter,
                    photons_squared=squared, nearest=True)
        written = UncertaintyScale.from_json((tmp_path / SCALE_FILE).read_text())
        assert written.per_log_nearest == 0.4 and written.per_log_widening == 0.0
        assert written.per_log_photons_squared == (0.05 if squared else 0.0)
        assert written.per_neighbour_log_photons == (0.1 if inter else 0.0)


def test_background_widening_is_the_crlb_ratio():
    from smlm_tfdiff import SimulationConfig
    from smlm_tfdiff.analyze import background_widening
    from smlm_tfdiff.simulation.physics.fisher import crlb

    config = SimulationConfig.preset("paper", frame_height=20, frame_width=20)
    xy = np.array([[5.3, 6.1], [12.0, 14.7], [9.5, 9.5], [3.0, 3.0]])
    photons = np.array([150.0, 400.0, 2000.0, np.nan])
    background = np.array([20.0, 20.0, 0.0, 10.0])
    w = background_widening(xy, photons, background, config)
    # The ratio of the bounds (N0 unknown, rms of the axes) with and without the background.
    bound = crlb(xy[:3], config, photons[:3], estimate_photons=True, background=background[:3])
    free = crlb(xy[:3], config, photons[:3], estimate_photons=True, background=np.zeros(3))
    rms = lambda b: np.sqrt(np.mean(b[:, :2] ** 2, axis=1))  # noqa: E731
    np.testing.assert_allclose(w[:3], rms(bound) / rms(free), rtol=1e-9)
    # A background widens a dim emitter's bound more than a bright one's; none: 1; a failed
    # photometry: 1 (no term).
    assert w[0] > w[1] > 1.0 and w[2] == 1.0 and w[3] == 1.0
    # N = 150 over 20 photons per pixel with the seeds' camera: ~1.6x (docs/calibration.md).
    assert 1.45 < w[0] < 1.75


def test_file_round_trip_and_bad_files(tmp_path):
    scale = UncertaintyScale(0.04, 0.07, -0.26, fitted_on="a test")
    assert UncertaintyScale.from_json(scale.to_json()) == scale
    log1p = UncertaintyScale(0.1, 0.28, -0.36, neighbour_term="log1p", per_log_widening=0.9)
    assert UncertaintyScale.from_json(log1p.to_json()) == log1p
    # Files written before neighbour_term and the background term existed read as "linear",
    # without a background term.
    old = UncertaintyScale.from_json(json.dumps(
        {"intercept": 0.04, "per_neighbour": 0.07, "per_log_photons": -0.26}))
    assert old.neighbour_term == "linear" and old.per_log_widening == 0.0
    with pytest.raises(ValueError, match="not valid JSON"):
        UncertaintyScale.from_json("{")
    with pytest.raises(ValueError, match="with the keys"):
        UncertaintyScale.from_json(json.dumps({"intercept": 0, "per_neighbour": 0,
                                               "per_log_photons": 0, "slope": 1}))
    with pytest.raises(ValueError, match="with the keys"):
        UncertaintyScale.from_json(json.dumps({"intercept": 0}))
    with pytest.raises(ValueError, match="finite"):
        UncertaintyScale(float("nan"), 0.0, 0.0)
    with pytest.raises(ValueError, match="> 0"):
        UncertaintyScale(0.0, 0.0, 0.0, radius_px=0.0)
    # A model folder with a broken scale file is refused with the file named.
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(WEIGHTS_DIR, "paper"), folder)
    (folder / SCALE_FILE).write_text('{"intercept": "big"}')
    with pytest.raises(ValueError, match=SCALE_FILE + ".*remove the file"):
        load_models(str(folder))


def test_bundled_paper_model_has_its_fitted_scale(paper_models):
    scale = paper_models.uncertainty_scale
    assert isinstance(scale, UncertaintyScale) and "calibration_density_scale" in scale.fitted_on
    # Crowding widens, brightness narrows (docs/calibration.md).
    assert scale.per_neighbour > 0 and scale.per_log_photons < 0


def test_bundled_wholefield_model_has_a_scale_fitted_through_analyze():
    scale = load_models(os.path.join(WEIGHTS_DIR, "wholefield")).uncertainty_scale
    assert isinstance(scale, UncertaintyScale)
    assert "calibration_wholefield_scale" in scale.fitted_on
    # Crowding widens, brightness narrows (docs/calibration.md, "The whole-field model's scale");
    # the first neighbours count most.
    assert scale.per_neighbour > 0 and scale.per_log_photons < 0
    assert scale.neighbour_term == "log1p"
    # A background widens the reported std as it widens the CRLB, in part ("The whole-field
    # scale's background term").
    assert scale.uses_background and 0 < scale.per_log_widening < 1


def test_bundled_fast_wholefield_model_has_its_own_scale():
    """wholefield_fast's scale (MODEL.md there): fitted through analyze with the model's own
    sampling (8 samples x 5 steps, refits), with the crowding x brightness interaction, the
    brightness slope's curvature and the nearest neighbour's distance."""
    scale = load_models(os.path.join(WEIGHTS_DIR, "wholefield_fast")).uncertainty_scale
    assert ("--model wholefield_fast --background_term --photons_squared_term --nearest_term "
            "--interaction_term" in scale.fitted_on)
    assert "8 samples" in scale.fitted_on
    assert scale.per_neighbour > 0 and scale.per_log_photons < 0 and scale.uses_background
    # A lone emitter's reported std falls with brightness faster than a crowded one's, and
    # more slowly among bright emitters than dim ones.
    assert scale.per_neighbour_log_photons > 0 and scale.per_log_photons_squared > 0
    # A close pair is reported wider than a count within 8 px says (docs/calibration.md).
    assert scale.per_log_nearest > 0 and scale.nearest_px == 2.0


def test_report_names_the_scales_neighbour_term():
    from smlm_tfdiff.report import _scale_text

    linear = dataclasses.asdict(UncertaintyScale(0.04, 0.07, -0.26))
    log1p = dataclasses.asdict(UncertaintyScale(0.1, 0.28, -0.36, neighbour_term="log1p"))
    assert "exp(0.04 + 0.07 k - 0.26 log(N / 200))" in _scale_text(linear)
    assert "exp(0.1 + 0.28 log(1 + k) - 0.36 log(N / 200))" in _scale_text(log1p)
    background = dict(log1p, per_log_widening=0.9)
    assert ("exp(0.1 + 0.28 log(1 + k) - 0.36 log(N / 200) + 0.9 log w)"
            in _scale_text(background)) and "widens the CRLB" in _scale_text(background)
    assert "widens" not in _scale_text(log1p)
    both = dict(background, per_neighbour_log_photons=0.1)
    assert ("exp(0.1 + 0.28 log(1 + k) - 0.36 log(N / 200) + 0.9 log w + 0.1 log(1 + k) "
            "log(N / 200))" in _scale_text(both))
    curved = dict(both, per_log_photons_squared=0.05)
    assert ("exp(0.1 + 0.28 log(1 + k) - 0.36 log(N / 200) + 0.9 log w + 0.05 log(N / 200)^2 "
            "+ 0.1 log(1 + k) log(N / 200))" in _scale_text(curved))
    close = dict(curved, per_log_nearest=0.4)
    assert ("exp(0.1 + 0.28 log(1 + k) - 0.36 log(N / 200) + 0.9 log w + 0.05 log(N / 200)^2 "
            "+ 0.4 log(1 + (2 / r)^2) + 0.1 log(1 + k) log(N / 200))" in _scale_text(close))
    assert "r the distance" in _scale_text(close) and "r the distance" not in _scale_text(curved)


def _whole_field_movie(tmp_path, backend, per_px2, photons, background, seed):
    """(stack path, camera, config): 2 frames of 24x24 px of the backend's whole-field scene at
    1 emitter per 1/per_px2 px^2, N0 in photons (lo, hi) over a uniform background."""
    config = backend.config.replace(frame_height=24, frame_width=24,
                                    density_range=(per_px2, per_px2), photons_range=photons,
                                    background_range=(background, background),
                                    cluster_fraction=None)
    data = simulate(config, 2, seed)
    stack = tmp_path / "movie.tif"
    tifffile.imwrite(stack, np.round(data["frames"][..., 0]).astype(np.uint16), imagej=True)
    return stack, Camera(offset_adu=float(config.offset),
                         gain_adu_per_photon=float(config.gain)), config


def test_whole_field_windows_get_the_scale(tmp_path):
    """The scale applies where psi is sampled in windows of a whole-field frame, as in tiles."""
    backend = load_backend("wholefield", jit_compile=False)
    stack, camera, config = _whole_field_movie(tmp_path, backend, 1 / 60, (300.0, 3000.0), 5.0, 41)
    summary = StackAnalyzer(backend, camera, num_samples=2, progress=False,
                            maps=False).analyze(stack, tmp_path / "out")
    scale = backend.uncertainty_scale
    assert summary["uncertainty_scale"]["intercept"] == scale.intercept
    assert summary["windows_sampled"] > 0
    rows = _rows(tmp_path / "out" / "movie.csv")
    raw = _column(rows, "uncertainty_raw_xy [nm]")
    assert np.isfinite(raw).sum() >= 8
    factor = _factors(rows, scale, config)
    _assert_scaled(rows, raw * factor)
    assert not np.allclose(factor, 1.0)
    # The same frames with the background term switched off: it widens every localization's
    # reported std over this background (5 photons per pixel), by the scale's own factor.
    if scale.uses_background:
        plain = dataclasses.replace(scale, per_log_widening=0.0)
        ratio = factor / _factors(rows, plain, config)
        assert np.all(ratio >= 1.0) and ratio.mean() > 1.01


def test_refit_in_samples_reports_psi_spread_unscaled(tmp_path):
    """analyze --in_samples refit on a model whose scale was fitted with detection in the
    samples: the same localizations, psi's spread from the refits (finite, of the order of the
    detected one) and, the scale not being fitted for it, the raw spread as the uncertainty."""
    backend = load_backend("wholefield", jit_compile=False)
    assert backend.detection.in_samples == "detect"
    stack, camera, _ = _whole_field_movie(tmp_path, backend, 1 / 40, (400.0, 400.0), 0.0, 43)
    runs = {}
    for way in ("detect", "refit"):
        summary = StackAnalyzer(backend, camera, num_samples=8, progress=False, maps=False,
                                in_samples=way).analyze(stack, tmp_path / way)
        assert summary["in_samples"] == way
        runs[way] = (summary, _rows(tmp_path / way / "movie.csv"))
    (detected, rows_d), (refitted, rows_r) = runs["detect"], runs["refit"]
    assert detected["uncertainty_scale"] is not None and refitted["uncertainty_scale"] is None
    assert len(rows_r) == len(rows_d) >= 10
    np.testing.assert_array_equal(_column(rows_r, "x [nm]"), _column(rows_d, "x [nm]"))
    raw_r, raw_d = (_column(r, "uncertainty_raw_xy [nm]") for r in (rows_r, rows_d))
    np.testing.assert_array_equal(_column(rows_r, "uncertainty_xy [nm]"), raw_r)
    ok = np.isfinite(raw_r) & np.isfinite(raw_d)
    assert ok.mean() > 0.8
    ratio = np.median(raw_r[ok] / raw_d[ok])
    assert 0.6 < ratio < 1.5, ratio
    fraction = _column(rows_r, "detection_fraction")
    assert np.all((fraction >= 0) & (fraction <= 1)) and fraction.mean() > 0.8
    with pytest.raises(ValueError, match="in_samples must be one of"):
        StackAnalyzer(backend, camera, num_samples=8, in_samples="fit")


def _assert_scaled(rows, expected):
    """The CSV's uncertainty_xy is expected (psi's spread x the scale's factor), except that a
    localization held by fewer than half the samples has each axis raised to its CRLB where
    below (docs/analyze.md): never below it then, nor below expected, and at most their root sum
    of squares."""
    crlb, reported = _column(rows, "crlb_xy [nm]"), _column(rows, "uncertainty_xy [nm]")
    few = _column(rows, "detection_fraction") < 0.5
    ok = np.isfinite(reported)
    np.testing.assert_array_equal(ok, np.isfinite(expected))
    np.testing.assert_allclose(reported[ok & ~few], expected[ok & ~few], rtol=1e-4)
    raised = ok & few
    assert np.all(reported[raised] >= crlb[raised] * (1 - 1e-9))
    assert np.all(reported[raised] >= expected[raised] * (1 - 1e-4))
    assert np.all(reported[raised] <= np.hypot(expected[raised], crlb[raised]) * (1 + 1e-4))
    per_axis = np.sqrt((_column(rows, "uncertainty_x [nm]") ** 2
                        + _column(rows, "uncertainty_y [nm]") ** 2) / 2)
    np.testing.assert_allclose(per_axis[ok], reported[ok], rtol=1e-6)
    return raised


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _column(rows, key):
    return np.array([float(r[key]) for r in rows])


def _factors(rows, scale, config):
    """The scale's factor of each CSV row from its frame's localizations, photometry and, where
    the scale has a background term, the background's widening of the CRLB in `config`'s frame."""
    from smlm_tfdiff.analyze import background_widening

    frame = _column(rows, "frame")
    xy = np.stack([_column(rows, "x [nm]"), _column(rows, "y [nm]")], 1) / config.pixel_size_nm
    photons, background = _column(rows, "intensity [photon]"), _column(rows, "offset [photon]")
    widening = (background_widening(xy, photons, background, config)
                if scale.uses_background else None)
    factor = np.empty(len(rows))
    for f in np.unique(frame):
        sel = frame == f
        factor[sel] = scale.factor(xy[sel], photons[sel],
                                   None if widening is None else widening[sel])
    return factor


@pytest.mark.slow
def test_analyze_applies_the_scale_and_keeps_the_raw_spread(tmp_path, backend,
                                                           small_movie):
    config, stack, camera = small_movie(backend, 31)
    scale = backend.uncertainty_scale
    assert scale is not None
    runs = {}
    for name, kwargs in (("scaled", {}), ("raw", {"scale_uncertainty": False}),
                         ("other_steps", {"num_steps": 3}),
                         ("mean", {"localize_on": "mean"})):
        analyzer = StackAnalyzer(backend, camera, num_samples=4, progress=False, maps=False,
                                 **{"num_steps": None, **kwargs})
        summary = analyzer.analyze(stack, tmp_path / name)
        runs[name] = (_rows(tmp_path / name / "movie.csv"), summary)
    rows, summary = runs["scaled"]
    assert summary["uncertainty_scale"]["intercept"] == scale.intercept
    raw = _column(rows, "uncertainty_raw_xy [nm]")
    assert np.isfinite(raw).sum() >= 10
    factor = _factors(rows, scale, config)
    _assert_scaled(rows, raw * factor)
    assert not np.allclose(factor, 1.0)
    # --noscale_uncertainty: the same analysis, psi's spread as it is.
    raw_rows, raw_summary = runs["raw"]
    assert raw_summary["uncertainty_scale"] is None
    np.testing.assert_array_equal(_column(raw_rows, "uncertainty_raw_xy [nm]"), raw)
    np.testing.assert_array_equal(_column(raw_rows, "uncertainty_xy [nm]"), raw)
    # Another num_steps than the recipe's, or positions from psi's mean, which the scale was not
    # fitted for: unscaled.
    for name in ("other_steps", "mean"):
        other_rows, other_summary = runs[name]
        assert other_summary["uncertainty_scale"] is None, name
        np.testing.assert_array_equal(_column(other_rows, "uncertainty_xy [nm]"),
                                      _column(other_rows, "uncertainty_raw_xy [nm]"))


def test_scale_fit_recovers_known_coefficients_with_and_without_a_kept_part():
    """benchmarks/_validation.fit_log_scale on z drawn from a known scale: every coefficient
    within 4 of its reported standard errors, jointly and with a, b, c kept as an offset."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    from _validation import features, fit_log_scale

    rng = np.random.default_rng(7)
    n = 4000
    scores = {"neighbours": rng.integers(0, 12, n), "photons": np.exp(rng.uniform(4.6, 8.5, n)),
              "widening": np.exp(rng.uniform(0.0, 0.6, n))}
    x = features(scores, "log1p", widening=True)
    truth = np.array([0.12, 0.23, -0.39, 0.55])
    z = rng.normal(size=(n, 2)) * np.exp(x @ truth)[:, None]
    beta, se = fit_log_scale(x, z)
    assert np.all(np.abs(beta - truth) < 4 * se), (beta, se)
    # Only d, the rest held fixed (--base_scale): the same d, with a smaller standard error.
    d, d_se = fit_log_scale(x[:, 3:], z, offset=x[:, :3] @ truth[:3])
    assert abs(d[0] - truth[3]) < 4 * d_se[0] and d_se[0] < se[3]


def test_a_spread_from_few_samples_is_raised_to_the_crlb():
    """A localization held by fewer than half the samples (2 of 8 here, with a spread of 0.01 px:
    one degree of freedom per axis, which comes out near zero now and then) reports at least its
    CRLB per axis; one held by every sample keeps psi's spread x the scale, below the CRLB or
    not."""
    from smlm_tfdiff.io.tiling import TileGrid
    from smlm_tfdiff.simulation.physics.psf import pixel_integrals_numpy
    from smlm_tfdiff.simulation.simulate import render_kde

    backend = load_backend("wholefield_fast", jit_compile=False)
    cfg = backend.config
    analyzer = StackAnalyzer(backend, Camera(float(cfg.offset), float(cfg.gain)),
                             progress=False, maps=False)
    assert analyzer.uncertainty_scale is not None and analyzer.num_samples == 8
    h = w = 12
    u = cfg.upsample
    tile_config = cfg.replace(pixel_size_nm=analyzer.pixel_size_nm)
    frame_config = tile_config.replace(frame_height=h, frame_width=w)
    grid = TileGrid((h, w), (6, 6), 4, u)
    xy = np.array([[3.4, 3.6], [8.5, 8.4]])  # LR px; two windows apart.
    owners = grid.owner(xy)
    windows = np.unique(owners)
    assert len(windows) == 2
    samples = np.zeros((2, 8, 6 * u, 6 * u, 1), np.float32)
    window_config = cfg.replace(frame_height=6, frame_width=6)
    for i, k in enumerate(windows):
        j = int(np.flatnonzero(owners == k)[0])
        local = grid.to_tile(xy[j:j + 1], int(k))
        for s in range(8):
            if j == 1 or s < 2:  # The first localization is in 2 samples of 8 only.
                shift = 0.01 * np.array([[s % 2, (s // 2) % 2]])
                samples[i, s, ..., 0] = render_kde(local + shift, window_config)
    photons = np.full((h, w), 2.0)
    for x, y in xy:  # 1000 photons each over 2 per pixel.
        photons += 1000.0 * np.outer(pixel_integrals_numpy(y, h, cfg.psf_sigma)[0],
                                     pixel_integrals_numpy(x, w, cfg.psf_sigma)[0])
    table = analyzer._table([xy], [(windows, samples)], photons[None], [grid], tile_config,
                            frame_config, 0, 1)
    np.testing.assert_allclose(table["detection_fraction"], [0.25, 1.0])
    raw, crlb = table["uncertainty_raw_xy [nm]"], table["crlb_xy [nm]"]
    assert np.all(np.isfinite(raw)) and np.all(raw < 0.2 * crlb)  # psi "sure" of both.
    per_axis = np.stack([table["uncertainty_x [nm]"], table["uncertainty_y [nm]"]], 1)
    assert np.all(per_axis[0] >= 0.99 * crlb[0]) and per_axis[0].max() <= 1.01 * crlb[0]
    assert table["uncertainty_xy [nm]"][1] < 0.5 * crlb[1]  # All 8 samples: not floored.
