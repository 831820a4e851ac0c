"""The scale of psi's per-pixel std maps (uncertainty.scale.pixel_factor_map, pixel_scale.json):
each pixel takes the factor of its nearest localization; analyze scales its std maps with it and
the demo scores the scaled intervals."""

import csv
import math
import os
import shutil

import numpy as np
import pytest
import tifffile

from smlm_tfdiff.analyze import StackAnalyzer
from smlm_tfdiff.demo import coverage
from smlm_tfdiff.uncertainty.evaluation import scaled_samples
from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_models
from smlm_tfdiff.uncertainty.scale import PIXEL_SCALE_FILE, UncertaintyScale, pixel_factor_map


def test_each_pixel_takes_its_nearest_localizations_factor():
    scale = UncertaintyScale(0.1, 0.2, -0.5, radius_px=5.0)
    # Two localizations 3 px apart (neighbours of each other) and a lone one far away.
    xy = np.array([[2.5, 2.5], [5.5, 2.5], [15.0, 12.0]])
    photons = np.array([200.0, 800.0, np.nan])
    factor = scale.factor(xy, photons)
    assert factor[0] != factor[1] != factor[2]
    out = pixel_factor_map(scale, xy, photons, (14, 18), 4)
    assert out.shape == (56, 72)
    for row in range(14):
        for col in range(18):
            centre = np.array([col + 0.5, row + 0.5])
            nearest = np.argmin(np.hypot(*(xy - centre).T))
            # Every HR pixel of the camera pixel carries that factor.
            np.testing.assert_array_equal(out[4 * row:4 * row + 4, 4 * col:4 * col + 4],
                                          factor[nearest])
    # A frame without localizations: k = 0 at the reference brightness.
    empty = pixel_factor_map(scale, np.zeros((0, 2)), np.zeros(0), (3, 5), 2)
    np.testing.assert_allclose(empty, math.exp(0.1))
    assert empty.shape == (6, 10)
    with pytest.raises(ValueError, match="background term"):
        pixel_factor_map(UncertaintyScale(0.0, 0.0, 0.0, per_log_widening=0.5), xy, photons,
                         (4, 4), 4)
    with pytest.raises(ValueError, match="one value per localization"):
        pixel_factor_map(scale, xy, photons[:2], (4, 4), 4)


def test_bundled_paper_model_has_a_map_scale_fitted_on_coverage():
    models = load_models(os.path.join(WEIGHTS_DIR, "paper"))
    scale = models.pixel_scale
    assert isinstance(scale, UncertaintyScale)
    assert "calibration_pixel_scale" in scale.fitted_on
    # Crowded pixels' intervals widen (docs/calibration.md, "The scale of the std maps").
    assert scale.per_neighbour > 0 and not scale.uses_background
    # A model folder without the file has none; a broken one is refused with the file named.
    assert load_models(os.path.join(WEIGHTS_DIR, "paper_wide")).pixel_scale is None


def test_a_broken_map_scale_file_is_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(WEIGHTS_DIR, "paper"), folder)
    (folder / PIXEL_SCALE_FILE).write_text('{"intercept": 0}')
    with pytest.raises(ValueError, match=PIXEL_SCALE_FILE + ".*remove the file"):
        load_models(str(folder))
    (folder / PIXEL_SCALE_FILE).write_text(UncertaintyScale(0.0, 0.1, 0.0,
                                                            per_log_widening=0.3).to_json())
    with pytest.raises(ValueError, match=PIXEL_SCALE_FILE + ".*background term"):
        load_models(str(folder))


def test_scaled_samples_widen_the_intervals_about_the_mean():
    rng = np.random.default_rng(0)
    b, s, h, w = 2, 64, 8, 8
    truth = rng.uniform(0.2, 1.0, (b, h, w))
    # Samples whose spread is half the truth's scatter about their mean: intervals under-cover;
    # scaled by 2 they cover at the level of exchangeable samples.
    noise = rng.normal(size=(b, s, h, w, 1))
    centre = truth[:, None, ..., None] + rng.normal(size=(b, 1, h, w, 1))
    post = {"samples": centre + 0.5 * noise}
    post["mean"] = post["samples"].mean(axis=1)
    post["std"] = post["samples"].std(axis=1, ddof=1)
    twice = scaled_samples(post, np.full((b, h, w), 2.0))
    dev = post["samples"] - post["mean"][:, None]
    np.testing.assert_allclose(twice["samples"] - post["mean"][:, None], 2 * dev, atol=1e-12)
    np.testing.assert_allclose(twice["std"], 2 * post["std"])
    own = coverage(post, truth, post, truth, s, threshold=0.0)
    shipped = coverage(post, truth, post, truth, s, threshold=0.0, shipped=(twice, twice))
    assert own["shipped"] is None and own["coverage_90"] == own["coverage_own_90"]
    assert shipped["coverage_own_90"] == own["coverage_90"]
    assert shipped["coverage_90"] > own["coverage_90"] + 0.2
    assert shipped["coverage_90"] == shipped["shipped"]["dense"]["coverage_quantile"][
        shipped["dense"]["levels"].index(0.9)]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_analyze_scales_its_std_maps(tmp_path, backend, small_movie):
    """The std map analyze writes is psi's own times the map scale of each pixel's nearest
    localization; the mean map and the table are untouched; --noscale_uncertainty and a
    num_steps the scale was not fitted for write psi's own map."""
    config, stack, camera = small_movie(backend, 32)
    scale = backend.pixel_scale
    assert scale is not None
    maps, rows, summaries = {}, {}, {}
    for name, kwargs in (("scaled", {}), ("raw", {"scale_uncertainty": False}),
                         ("other_steps", {"num_steps": 3})):
        analyzer = StackAnalyzer(backend, camera, num_samples=4, progress=False,
                                 **{"num_steps": None, **kwargs})
        summaries[name] = analyzer.analyze(stack, tmp_path / name)
        maps[name] = {k: tifffile.imread(tmp_path / name / f"movie_{k}.tif")
                      for k in ("posterior_mean", "posterior_std")}
        rows[name] = _rows(tmp_path / name / "movie.csv")
    assert summaries["scaled"]["pixel_scale"]["intercept"] == scale.intercept
    assert summaries["raw"]["pixel_scale"] is None
    assert summaries["other_steps"]["pixel_scale"] is None
    np.testing.assert_array_equal(maps["scaled"]["posterior_mean"], maps["raw"]["posterior_mean"])
    assert rows["scaled"] and [r["x [nm]"] for r in rows["scaled"]] == [
        r["x [nm]"] for r in rows["raw"]]
    nm = config.pixel_size_nm
    for f in range(2):
        mine = [r for r in rows["scaled"] if int(r["frame"]) == f + 1]
        xy = np.array([[float(r["x [nm]"]), float(r["y [nm]"])] for r in mine]) / nm
        photons = np.array([float(r["intensity [photon]"]) for r in mine])
        factor = pixel_factor_map(scale, xy.reshape((-1, 2)), photons, (24, 24),
                                  config.upsample)
        np.testing.assert_allclose(maps["scaled"]["posterior_std"][f],
                                   maps["raw"]["posterior_std"][f] * factor, rtol=1e-5,
                                   atol=1e-7)
        assert not np.allclose(factor, 1.0)
