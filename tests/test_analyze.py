"""`analyze`: tiling, photometry, stack reading, outputs, bad input, and an end-to-end run whose
localizations match the simulation's ground truth."""

import csv
import os

import numpy as np
import pytest
import tifffile

from smlm_tfdiff import SimulationConfig, localization_metrics, oracle_metrics
from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.analyze import Camera, KerasBackend, StackAnalyzer, load_backend
from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.io.stacks import (EXTRA_COLUMNS, THUNDERSTORM_COLUMNS, StackError, TiffStack,
                                  find_stacks)
from smlm_tfdiff.io.tiling import TileGrid, coverage_tiling


# ------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("frame, pad", [((20, 20), 0), ((36, 44), 3), ((13, 27), 3),
                                        ((50, 21), 0)])
def test_tiles_cover_and_stitch_exactly(frame, pad):
    grid = TileGrid(frame, (20, 20), overlap=11, upsample=4, pad=pad)
    rng = np.random.default_rng(0)
    lr = rng.normal(size=(2,) + frame).astype(np.float32)
    tiles = grid.cut(lr)
    assert tiles.shape == (2 * len(grid), 20, 20)
    hr = rng.normal(size=(2, 4 * grid.padded[0], 4 * grid.padded[1]))
    hr_tiles = np.stack([hr[b, 4 * r:4 * r + 80, 4 * c:4 * c + 80]
                         for b in range(2) for r, c in grid.origins])
    # A map that agrees between tiles stitches back to itself, with no seams.
    p = 4 * pad
    np.testing.assert_allclose(grid.stitch(hr_tiles),
                               hr[:, p:p + 4 * frame[0], p:p + 4 * frame[1]], atol=1e-12)
    # Equal means and variances in every tile: the mixture variance is that variance.
    mean, var = grid.stitch(np.ones_like(hr_tiles), np.full_like(hr_tiles, 0.25))
    np.testing.assert_allclose(var, 0.25, atol=1e-12)
    # cut_hr cuts the same windows from a whole-frame HR map (padding filled with `fill`).
    inner = hr[:, p:p + 4 * frame[0], p:p + 4 * frame[1]]
    windows = grid.cut_hr(inner, fill=-7.0)
    padded = np.full_like(hr, -7.0)
    padded[:, p:p + 4 * frame[0], p:p + 4 * frame[1]] = inner
    np.testing.assert_array_equal(windows, np.stack([
        padded[b, 4 * r:4 * r + 80, 4 * c:4 * c + 80] for b in range(2) for r, c in grid.origins]))
    with pytest.raises(ValueError, match="HR pixels"):
        grid.cut_hr(inner[:, 1:])
    # Tiles overlap by at least the requested overlap and stay inside the (padded) frame.
    for r, c in grid.origins:
        assert 0 <= r <= grid.padded[0] - 20 and 0 <= c <= grid.padded[1] - 20
    assert np.all(grid.weights() > 0)


def test_small_frames_are_padded_with_background_not_signal():
    grid = TileGrid((12, 16), (20, 20), pad=1)
    frames = np.full((1, 12, 16), 100.0, np.float32)
    frames[0, 5, 5] = 500.0
    tile = grid.cut(frames)[0]
    assert tile.shape == (20, 20) and tile[6, 6] == 500.0
    assert np.all(tile[13:, :] == 100.0) and np.all(tile[:, 17:] == 100.0)
    assert np.all(tile[0, :] == 100.0) and np.all(tile[:, 0] == 100.0)


@pytest.mark.parametrize("frame", [(20, 20), (36, 44), (64, 30)])
def test_coverage_tiling_keeps_every_pixel_near_a_tile_centre(frame):
    config = SimulationConfig.preset("paper")  # Emitters in a disc of radius 7 around the centre.
    pad, overlap = coverage_tiling(config)
    grid = TileGrid(frame, (20, 20), overlap=overlap, pad=pad)
    xy = np.random.default_rng(1).uniform([0, 0], [frame[1], frame[0]], size=(2000, 2))
    owner = grid.owner(xy)
    for p, k in zip(xy, owner):
        local = grid.to_tile(p[None], k)[0]
        assert np.max(np.abs(local - 10.0)) <= config.disc_radius + 1e-9, (p, local)


def test_tile_grid_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid((40, 40), (20, 20), overlap=20)


def test_stitch_prefers_the_sampled_tiles_where_they_reach():
    """With `preferred`, a pixel a preferred tile covers takes the preferred tiles' blend alone
    (mean and variance); a pixel no preferred tile covers takes the blend of all."""
    grid = TileGrid((8, 20), (8, 8), overlap=4, upsample=1)
    n = len(grid)  # Origins at columns 0, 4, 8, 12.
    assert n == 4
    tiles = np.zeros((n, 8, 8))
    var = np.zeros((n, 8, 8))
    tiles[1], var[1] = 2.0, 0.5  # Columns 4-11: the sampled window.
    preferred = np.array([False, True, False, False])
    mean, variance = grid.stitch(tiles, var, preferred=preferred)
    np.testing.assert_allclose(mean[0, :, 4:12], 2.0)
    np.testing.assert_allclose(variance[0, :, 4:12], 0.5)
    np.testing.assert_allclose(mean[0, :, :4], 0.0)
    np.testing.assert_allclose(mean[0, :, 12:], 0.0)
    blend, _ = grid.stitch(tiles, var)  # Without: the neighbours dilute it.
    assert blend[0, 0, 5] < 1.5 and blend[0, 0, 8] == pytest.approx(2.0 * grid.weights()[0, 4]
                                                                   / (grid.weights()[0, 4]
                                                                      + grid.weights()[0, 0]))


@pytest.mark.parametrize("pad", [0, 2])
def test_stitch_over_equals_stitch_of_every_tile(pad):
    """stitch_over (the sampled windows over phi's estimate) gives what stitch gives with every
    window cut from the estimate and the sampled ones preferred, at the cost of those alone."""
    rng = np.random.default_rng(4)
    grid = TileGrid((14, 11), (6, 6), overlap=4, upsample=2, pad=pad)
    base = rng.random((28, 22))
    sampled = np.array([0, 3, len(grid) - 1, 7])
    means = rng.random((len(sampled), 12, 12))
    variances = rng.random((len(sampled), 12, 12)) * 0.1
    np.testing.assert_array_equal(grid.cut_hr(base[None], tiles=sampled),
                                  grid.cut_hr(base[None])[sampled])
    assert grid.cut_hr(base[None], tiles=[]).shape == (0, 12, 12)
    lr = rng.random((2, 14, 11))
    np.testing.assert_array_equal(grid.cut(lr, tiles=sampled),
                                  grid.cut(lr).reshape(2, len(grid), 6, 6)[:, sampled]
                                  .reshape(-1, 6, 6))
    assert grid.cut(lr, tiles=[]).shape == (0, 6, 6)
    mean_tiles = grid.cut_hr(base[None])
    var_tiles = np.zeros_like(mean_tiles)
    mean_tiles[sampled], var_tiles[sampled] = means, variances
    preferred = np.zeros(len(grid), bool)
    preferred[sampled] = True
    want_mean, want_var = grid.stitch(mean_tiles, var_tiles, preferred=preferred)
    mean, var = grid.stitch_over(base, sampled, means, variances)
    np.testing.assert_allclose(mean, want_mean[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, want_var[0], rtol=1e-9, atol=1e-12)
    # Nothing sampled: the estimate, with no spread.
    mean, var = grid.stitch_over(base, [], np.zeros((0, 12, 12)), np.zeros((0, 12, 12)))
    np.testing.assert_array_equal(mean, base)
    assert not var.any()
    with pytest.raises(ValueError, match="HR pixels"):
        grid.stitch_over(base[1:], sampled, means, variances)


# -------------------------------------------------------------------------------- photometry
def test_photometry_recovers_photons_and_background():
    config = SimulationConfig.preset("isolated", background=5.0)
    data = simulate(config, 300, seed=3)
    got, bg = [], []
    for frame, pos in zip(data["frames"][..., 0], data["positions"][:, :1]):
        out = photometry((frame - config.offset) / config.gain, pos, config.psf_sigma)
        got.append(out["intensity"][0])
        bg.append(out["background"][0])
    got, bg = np.array(got), np.array(bg)
    # Unbiased at the true position: mean within 4 standard errors of the truth.
    assert abs(got.mean() - 200.0) < 4 * got.std() / np.sqrt(len(got))
    assert abs(bg.mean() - 5.0) < 4 * bg.std() / np.sqrt(len(bg))


def test_photometry_fits_close_pairs_jointly():
    config = SimulationConfig.preset("isolated", photons=1000.0, readout_var=1e-6)
    from smlm_tfdiff.simulation.simulate import expected_counts

    pos = np.array([[8.3, 10.1], [10.6, 10.4]])
    counts = np.asarray(expected_counts(pos, [1000.0, 1000.0], config, include_background=False))
    out = photometry(np.squeeze(counts), pos, config.psf_sigma)
    np.testing.assert_allclose(out["intensity"], 1000.0, rtol=1e-6)
    np.testing.assert_allclose(out["background"], 0.0, atol=1e-6)


# ------------------------------------------------------------------------------ stack reading
def test_crlb_column_in_a_window_equals_the_whole_frame(monkeypatch):
    """analyze's CRLB sums each localization's Fisher information over 16x16 px around it, slid
    inside the frame at the edges: the whole frame's bound, edges and corners included."""
    import smlm_tfdiff.analyze as analyze

    config = SimulationConfig.preset("wholefield", frame_height=40, frame_width=24)
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(0, [24, 40], (30, 2)),
                         [[0.01, 0.01], [23.99, 39.99], [0.5, 20.0], [12.0, 39.5], [30.0, 5.0]]])
    photons, background = rng.uniform(100, 5000, len(xy)), rng.uniform(0, 30, len(xy))
    photons[3] = np.nan
    windowed = analyze._crlb_nm(xy, photons, background, config)
    monkeypatch.setattr(analyze, "CRLB_HALF_WINDOW", 100)
    whole = analyze._crlb_nm(xy, photons, background, config)
    assert np.isnan(windowed[[3, -1]]).all() and np.isnan(whole[[3, -1]]).all()
    np.testing.assert_allclose(windowed, whole, rtol=1e-10)


def test_tiff_stack_reads_plain_imagej_and_ome(tmp_path):
    frames = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    paths = {"plain.tif": dict(), "imagej.tif": dict(imagej=True), "x.ome.tif": dict(ome=True)}
    for name, kw in paths.items():
        tifffile.imwrite(tmp_path / name, frames, **kw)
        with TiffStack(tmp_path / name) as stack:
            assert (stack.num_frames, stack.height, stack.width) == (5, 6, 7)
            got = np.concatenate([b for _, b in stack.batches(2)])
        np.testing.assert_array_equal(got, frames)
    tifffile.imwrite(tmp_path / "one.tif", frames[0])
    with TiffStack(tmp_path / "one.tif") as stack:
        assert stack.num_frames == 1
    assert find_stacks([tmp_path])[0].endswith("imagej.tif")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"), ("text", "not a readable TIFF"),
    ("channels", "wrong dimensionality"), ("rgb", "colour samples")])
def test_tiff_stack_bad_files(tmp_path, case, message):
    path = tmp_path / "bad.tif"
    if case == "text":
        path.write_text("not an image")
    elif case == "channels":
        tifffile.imwrite(path, np.zeros((3, 2, 8, 8), np.uint16), imagej=True,
                         metadata={"axes": "TCYX"})
    elif case == "rgb":
        tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(StackError, match=message):
        TiffStack(path)


# ---------------------------------------------------------------------------- end to end
def _frames_from_csv(path, num_frames, pixel_size_nm):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows, [np.array([[float(r["x [nm]"]), float(r["y [nm]"])] for r in rows
                            if int(r["frame"]) == k + 1]).reshape(-1, 2) / pixel_size_nm
                  for k in range(num_frames)]


@pytest.mark.parametrize("shape, xla", [((20, 20), True), ((28, 44), False)])
def test_analyze_end_to_end_matches_ground_truth(tmp_path, request, shape, xla):
    """The default backend (psi's loop compiled with XLA, here for every tile of the frame: one
    window count, one compilation) and the one without XLA (psi where the localizations are)."""
    backend = request.getfixturevalue("xla_backend" if xla else "backend")
    config = SimulationConfig.preset("paper", frame_height=shape[0], frame_width=shape[1],
                                     region="frame", num_emitters=int(shape[0] * shape[1] / 40))
    data = simulate(config, 6, seed=11)
    # A camera other than the model's: gain 2.5 ADU/photon, offset 400 ADU, as uint16.
    frames = (data["frames"][..., 0] - config.offset) * 2.5 + 400.0
    stack = tmp_path / "movie.tif"
    tifffile.imwrite(stack, np.round(frames).astype(np.uint16), imagej=True)
    camera = Camera(offset_adu=400.0, gain_adu_per_photon=2.5)
    analyzer = StackAnalyzer(backend, camera, num_samples=4, num_steps=2, batch_frames=4,
                             picasso=True, progress=False,
                             sample_windows="all" if xla else "localized")
    out = tmp_path / "out"
    summary = analyzer.analyze(stack, out)
    names = sorted(os.listdir(out))
    assert names == sorted(["movie.csv", "movie_locs.hdf5", "movie_locs.yaml",
                            "movie_kde_estimate.tif", "movie_posterior_mean.tif",
                            "movie_posterior_std.tif", "movie_super_resolution.png",
                            "movie_uncertainty.png", "movie_summary.json"])
    rows, pred = _frames_from_csv(out / "movie.csv", 6, config.pixel_size_nm)
    assert tuple(rows[0].keys()) == THUNDERSTORM_COLUMNS + EXTRA_COLUMNS
    assert summary["localizations"] == len(rows) and summary["tiles_per_frame"] >= 1
    assert summary["jit_compile"] is xla and backend.sampler.jit_compile is xla
    assert [int(r["id"]) for r in rows] == list(range(1, len(rows) + 1))
    metrics = localization_metrics(pred, data, config)
    oracle = oracle_metrics(data["positions"], data["mask"], config)
    # The phi issue's bars (P >= 0.99, R >= 0.97 x oracle on 1000 frames), loosened by about two
    # binomial standard errors for these ~60 emitters.
    assert metrics["precision"] >= 0.95, metrics
    assert metrics["recall"] >= 0.9 * oracle["recall"], (metrics, oracle)
    assert metrics["rmse_lateral_nm"] < 50.0, metrics
    unc = np.array([float(r["uncertainty_xy [nm]"]) for r in rows])
    assert np.all(np.isfinite(unc) | (np.array([float(r["detection_fraction"]) for r in rows])
                                      < 0.5))
    photons = np.median([float(r["intensity [photon]"]) for r in rows])
    assert 140 < photons < 260  # 200 photons per emitter, converted from this camera's ADU.
    for key in ("kde_estimate", "posterior_mean", "posterior_std"):
        maps = tifffile.imread(out / f"movie_{key}.tif")
        assert maps.shape == (6, 4 * shape[0], 4 * shape[1]) and maps.dtype == np.float32
    import h5py

    with h5py.File(out / "movie_locs.hdf5") as f:
        locs = f["locs"][...]
    assert len(locs) == len(rows) and locs["frame"].min() >= 0
    np.testing.assert_allclose(locs["x"], [float(r["x [nm]"]) / config.pixel_size_nm - 0.5
                                           for r in rows], rtol=1e-5)
    assert "Frames: 6" in (out / "movie_locs.yaml").read_text()


def test_bad_frames_leave_no_output(tmp_path, backend):
    frames = np.full((3, 20, 20), 110.0, np.float32)
    frames[2, 3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", frames, photometric="minisblack")
    analyzer = StackAnalyzer(backend, Camera(100.0, 1.0), num_samples=2, num_steps=1,
                             batch_frames=2, progress=False)
    with pytest.raises(StackError, match="frame 3 .*NaN"):
        analyzer.analyze(tmp_path / "nan.tif", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tifffile.imwrite(tmp_path / "dark.tif", np.full((2, 20, 20), 100, np.uint16))
    high = StackAnalyzer(backend, Camera(1000.0, 1.0), num_samples=2, num_steps=1,
                         progress=False)
    (tmp_path / "out2").mkdir()
    with pytest.raises(StackError, match="below the camera offset.*--offset_adu"):
        high.analyze(tmp_path / "dark.tif", tmp_path / "out2")
    assert os.listdir(tmp_path / "out2") == []


def test_camera_and_settings_are_checked(backend):
    with pytest.raises(ValueError, match="gain_adu_per_photon must be > 0"):
        Camera(100.0, 0.0)
    assert Camera.from_electrons(100.0, 0.5, em_gain=100).gain_adu_per_photon == 200.0
    with pytest.raises(ValueError, match="num_samples"):
        StackAnalyzer(backend, Camera(100.0, 1.0), num_samples=1)
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        load_backend("no-such-model")


def test_command_line_errors_exit_nonzero(tmp_path, cli):
    args = ["--out", tmp_path / "o", "--offset_adu", "100", "--gain_adu_per_photon", "1",
            "--noprogress", "--input", tmp_path / "missing.tif"]
    res = cli("analyze", *args)
    assert res.returncode != 0 and "no such file" in res.stderr
    res = cli("analyze", *args[:5], *args[7:])  # Without --gain_adu_per_photon.
    assert res.returncode != 0 and "gain_adu_per_photon" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_restart_sweeps_reach_the_sampler_and_the_summary(tmp_path):
    """--restart_t / --restarts: the backend's posterior is the sampler's with those sweeps, the
    summary records them, bad values are refused."""
    import json

    from smlm_tfdiff.diffusion.sampler import PosteriorSampler

    swept = load_backend("paper", restart_t=100, restarts=2, jit_compile=False)
    assert swept.recipe == {"restart_t": 100, "restarts": 2}
    frames = simulate(swept.config, 1, seed=5)["frames"]
    got = swept.posterior(frames, 2, 2, seed=3)
    # The backend's compiled sampler with the sweeps given explicitly, and with them turned off
    # (restarts=0): one compilation for the three calls.
    assert isinstance(swept.sampler, PosteriorSampler)
    want = swept.sampler(frames, 2, 2, seed=3, method="ddpm", return_samples=True,
                         restart_t=100, restarts=2)
    np.testing.assert_array_equal(got["samples"], want["samples"])
    plain = swept.sampler(frames, 2, 2, seed=3, method="ddpm", return_samples=True, restarts=0)
    assert plain["nfe_per_frame"] == 2 * 2 and want["nfe_per_frame"] == 2 * 2 * 3
    assert not np.array_equal(got["samples"], plain["samples"])
    tifffile.imwrite(tmp_path / "s.tif", (frames[..., 0] + 0.5).astype(np.uint16),
                     photometric="minisblack")
    summary = StackAnalyzer(swept, Camera(100.0, 1.0), num_samples=2, num_steps=2,
                            progress=False).analyze(tmp_path / "s.tif", tmp_path / "out")
    assert summary["restart_t"] == 100 and summary["restarts"] == 2
    with open(next((tmp_path / "out").glob("*_summary.json"))) as f:
        assert json.load(f)["restarts"] == 2
    with pytest.raises(ValueError, match=r"restart_t must lie in 1\.\.T = 1\.\.100"):
        load_backend("paper", restart_t=101)
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        load_backend("paper", restart_t=50, restarts=0)


def test_phi_only_mode_reports_the_crlb_and_says_so(tmp_path, backend):
    """num_samples 0: phi's localizations (the same as with psi, which localizes on phi's KDE
    estimate by default), the CRLB in the uncertainty columns, flagged in the CSV and summary."""
    config = SimulationConfig.preset("paper", frame_height=24, frame_width=30, region="frame",
                                     num_emitters=18)
    data = simulate(config, 3, seed=12)
    stack = tmp_path / "movie.tif"
    tifffile.imwrite(stack, np.round(data["frames"][..., 0]).astype(np.uint16),
                     photometric="minisblack")
    camera = Camera(offset_adu=100.0, gain_adu_per_photon=1.0)
    quick = StackAnalyzer(backend, camera, num_samples=0, picasso=True, progress=False)
    full = StackAnalyzer(backend, camera, num_samples=2, num_steps=1, progress=False)
    summary = quick.analyze(stack, tmp_path / "quick")
    full.analyze(stack, tmp_path / "full")
    assert summary["uncertainty"] == "crlb" and summary["num_steps"] is None
    assert sorted(os.listdir(tmp_path / "quick")) == sorted([
        "movie.csv", "movie_locs.hdf5", "movie_locs.yaml", "movie_kde_estimate.tif",
        "movie_super_resolution.png", "movie_summary.json"])
    rows, pred = _frames_from_csv(tmp_path / "quick" / "movie.csv", 3, config.pixel_size_nm)
    full_rows, full_pred = _frames_from_csv(tmp_path / "full" / "movie.csv", 3,
                                            config.pixel_size_nm)
    assert len(rows) == len(full_rows) > 20
    for a, b in zip(pred, full_pred):  # phi compiled apart from the sampler's: float32 round-off.
        np.testing.assert_allclose(a, b, atol=1e-4)
    column = lambda rs, key: np.array([float(r[key]) for r in rs])
    assert np.all(column(rows, "uncertainty_is_crlb") == 1)
    assert np.all(column(full_rows, "uncertainty_is_crlb") == 0)
    np.testing.assert_allclose(column(rows, "uncertainty_xy [nm]"), column(rows, "crlb_xy [nm]"),
                               rtol=1e-6)
    np.testing.assert_allclose(column(rows, "crlb_xy [nm]"), column(full_rows, "crlb_xy [nm]"),
                               rtol=1e-3)
    # The CRLB of 200-photon emitters without background: about 10-20 nm.
    assert 5 < np.nanmedian(column(rows, "uncertainty_x [nm]")) < 30
    assert np.all(np.isnan(column(rows, "detection_fraction")))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "quick" / "movie_kde_estimate.tif"),
                               tifffile.imread(tmp_path / "full" / "movie_kde_estimate.tif"),
                               atol=1e-5)
    import h5py

    with h5py.File(tmp_path / "quick" / "movie_locs.hdf5") as f:
        locs = f["locs"][...]
    assert np.all(locs["flags"] & 1)  # lpx / lpy are the CRLB.
    np.testing.assert_allclose(locs["lpx"], column(rows, "uncertainty_x [nm]")
                               / config.pixel_size_nm, rtol=1e-5)


def test_phi_only_model_folder(tmp_path, paper_models):
    """A folder with phi but no psi analyzes with num_samples 0 and is refused otherwise, with
    the fix in the message."""
    import shutil

    from smlm_tfdiff.pretrained import WEIGHTS_DIR

    folder = tmp_path / "phi_only"
    folder.mkdir()
    for name in ("phi.weights.h5", "phi_config.json", "sim_config.json"):
        shutil.copy(os.path.join(WEIGHTS_DIR, "paper", name), folder / name)
    with pytest.raises(FileNotFoundError, match="--num_samples 0"):
        load_backend(str(folder))
    phi_only = load_backend(str(folder), need_psi=False)
    camera = Camera(offset_adu=100.0, gain_adu_per_photon=1.0)
    with pytest.raises(ValueError, match="no psi"):
        StackAnalyzer(phi_only, camera, num_samples=16, progress=False)
    with pytest.raises(ValueError, match="localize_on 'mean'"):
        StackAnalyzer(phi_only, camera, num_samples=0, localize_on="mean", progress=False)
    with pytest.raises(ValueError, match="or 0 for"):
        StackAnalyzer(phi_only, camera, num_samples=1, progress=False)
    config = SimulationConfig.preset("paper")
    data = simulate(config, 2, seed=13)
    stack = tmp_path / "m.tif"
    tifffile.imwrite(stack, np.round(data["frames"][..., 0]).astype(np.uint16),
                     photometric="minisblack")
    summary = StackAnalyzer(phi_only, camera, num_samples=0, progress=False).analyze(
        stack, tmp_path / "out")
    assert summary["localizations"] >= 15 and summary["uncertainty"] == "crlb"


def _corner_movie(tmp_path, size=44, frames=2):
    """Paper-preset frames (emitters in a disc of radius 7 px about (10, 10)) pasted into the top
    left of larger frames of the same camera's background: the rest holds no emitter."""
    config = SimulationConfig.preset("paper")
    data = simulate(config, frames, seed=21)
    rng = np.random.default_rng(21)
    # Background of the same camera: offset + Poisson(background) + readout noise, ADU (gain 1).
    movie = (config.offset + rng.poisson(config.background, (frames, size, size))
             + rng.normal(0, np.sqrt(config.readout_var), (frames, size, size)))
    movie[:, :20, :20] = data["frames"][..., 0]
    movie[-1, :20, :20] = movie[-1, 24:, 24:]  # The last frame holds no emitter at all.
    stack = tmp_path / "corner.tif"
    tifffile.imwrite(stack, np.round(movie).astype(np.uint16), photometric="minisblack")
    return stack, config


@pytest.mark.parametrize("whole_field", [False, True])
def test_psi_is_sampled_only_where_localizations_are(tmp_path, paper_models, whole_field):
    """psi runs only in the tiles (whole-field: windows of phi's whole-frame estimate) that own a
    localization; elsewhere the maps hold phi's estimate with zero std; the localizations are those
    of sampling everywhere, and an empty frame costs no sampling."""
    import dataclasses

    from smlm_tfdiff.io.tiling import TileGrid

    models = paper_models
    if whole_field:  # The paper networks read as a whole-field model: phi sees frames whole.
        models = dataclasses.replace(models, config=models.config.replace(region="frame",
                                                                          margin=0.0))
    backend = KerasBackend(models, method="ddpm", jit_compile=False)
    stack, config = _corner_movie(tmp_path)
    camera = Camera(offset_adu=100.0, gain_adu_per_photon=1.0)
    runs = {}
    for where in ("localized", "all"):
        analyzer = StackAnalyzer(backend, camera, num_samples=4, num_steps=2, progress=False,
                                 sample_windows=where)
        runs[where] = analyzer.analyze(stack, tmp_path / where)
    local, every = runs["localized"], runs["all"]
    assert local["whole_field"] is whole_field
    assert local["window_px"] == [20, 20]
    rows, pred = _frames_from_csv(tmp_path / "localized" / "corner.csv", 2, config.pixel_size_nm)
    _, pred_all = _frames_from_csv(tmp_path / "all" / "corner.csv", 2, config.pixel_size_nm)
    assert len(pred[0]) >= 6 and len(pred[1]) == 0
    np.testing.assert_array_equal(pred[0], pred_all[0])
    analyzer = StackAnalyzer(backend, camera, num_samples=4, progress=False)
    grid = TileGrid((44, 44), (20, 20), analyzer.overlap, 4, analyzer.pad)
    assert every["windows_sampled"] == 2 * len(grid) == 2 * local["tiles_per_frame"]
    assert local["windows_sampled"] == len(np.unique(grid.owner(pred[0])))
    assert local["windows_sampled"] < len(grid) / 2
    maps = {key: tifffile.imread(tmp_path / "localized" / f"corner_{key}.tif")
            for key in ("kde_estimate", "posterior_mean", "posterior_std")}
    far = (slice(None), slice(4 * 34, None), slice(4 * 34, None))  # No tile there is sampled.
    np.testing.assert_allclose(maps["posterior_mean"][far], maps["kde_estimate"][far], atol=1e-6)
    frames = tifffile.imread(stack).astype(np.float32)
    if whole_field:  # phi's estimate of the whole frame, not of tiles; no psi spread far off.
        np.testing.assert_allclose(maps["kde_estimate"], backend.estimate(frames[..., None])[
            ..., 0], atol=1e-6)
        # Zero up to the round-off of the stitched mixture variance (float64 sums).
        assert maps["posterior_std"][far].max() < 1e-8 and maps["posterior_std"][1].max() < 1e-8
    else:  # Far off, the spread is that of the overlapping tiles' estimates (tiling.stitch).
        estimates = backend.estimate(grid.cut(frames)[..., None])[..., 0]
        _, var = grid.stitch(estimates, np.zeros_like(estimates))
        np.testing.assert_allclose(maps["posterior_std"][far], np.sqrt(var)[far], atol=1e-6)
        np.testing.assert_allclose(maps["posterior_std"][1], np.sqrt(var)[1], atol=1e-6)
        assert maps["posterior_std"][far].max() < 1e-3
    assert maps["posterior_std"][0, :80, :80].mean() > 1e-3  # psi's spread where emitters are.
    unc = np.array([float(r["uncertainty_xy [nm]"]) for r in rows])
    fraction = np.array([float(r["detection_fraction"]) for r in rows])
    assert np.all(np.isfinite(unc[fraction >= 0.5])) and np.mean(fraction >= 0.5) > 0.8


@pytest.mark.parametrize("whole_field", [False, True])
def test_a_frame_conditioned_psi_sees_the_frame_under_its_window(tmp_path, paper_models,
                                                                 whole_field):
    """A psi conditioned on the frame (PsiConfig.frame_condition) gets, beside each tile or
    window of phi's estimate, the same window of the frame: the frame's brightest pixel lies
    under the estimate's peak. Started from the paper psi (the frame channel at zero), it gives
    the paper psi's localizations and uncertainties."""
    import dataclasses

    from smlm_tfdiff.experimental.frame_condition import frame_condition_fields
    from smlm_tfdiff.models.psi import build_psi, transfer_weights

    models = paper_models
    if whole_field:
        models = dataclasses.replace(models, config=models.config.replace(region="frame",
                                                                          margin=0.0))
    framed_config = dataclasses.replace(models.psi_config,
                                        **frame_condition_fields(models.config))
    framed_psi = build_psi(framed_config)
    transfer_weights(models.psi, framed_psi)
    framed = dataclasses.replace(models, psi=framed_psi, psi_config=framed_config)
    stack, config = _corner_movie(tmp_path)
    camera = Camera(offset_adu=100.0, gain_adu_per_photon=1.0)
    seen = []
    backends = {"plain": KerasBackend(models, method="ddpm", jit_compile=False),
                "framed": KerasBackend(framed, method="ddpm", jit_compile=False)}
    sampler = backends["framed"].sampler
    call = sampler.__call__

    def spy(frames, *args, **kwargs):
        out = call(frames, *args, **kwargs)
        seen.append((np.asarray(frames)[..., 0], out["y_hat"][..., 0]))
        return out

    backends["framed"]._sampler = type("Spy", (), {"__call__": lambda self, *a, **k: spy(*a, **k)})()
    tables = {}
    for name, backend in backends.items():
        StackAnalyzer(backend, camera, num_samples=4, num_steps=2, progress=False).analyze(
            stack, tmp_path / name)
        with open(tmp_path / name / "corner.csv") as f:
            tables[name] = list(csv.DictReader(f))
    assert len(tables["plain"]) >= 6 and len(tables["framed"]) == len(tables["plain"])
    for a, b in zip(tables["plain"], tables["framed"]):
        for key in ("x [nm]", "y [nm]", "uncertainty_xy [nm]"):  # NaN where no sample has it.
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-3, atol=1e-3)
    assert seen
    for frames, y_hat in seen:
        assert y_hat.shape[1:] == (4 * frames.shape[1], 4 * frames.shape[2])
        for frame, estimate in zip(frames, y_hat):
            if estimate.max() < 0.5:
                continue
            r, c = np.unravel_index(np.argmax(estimate), estimate.shape)
            block = frame[max(r // 4 - 1, 0):r // 4 + 2, max(c // 4 - 1, 0):c // 4 + 2]
            assert block.max() - config.offset > 0.5 * (frame.max() - config.offset)


def test_whole_field_windows_follow_the_emitters(tmp_path):
    """A whole-field model's posterior windows are chosen per frame: psi's smallest windows
    (6 px) around isolated emitters, its training window (20 px) over a crowded frame, whichever
    samples fewer pixels; window_px fixes one size, and a size psi cannot take is named."""
    backend = load_backend("wholefield", jit_compile=False)
    base = SimulationConfig.preset("wholefield", frame_height=28, frame_width=28,
                                   photons_range=(2000.0, 2000.0), background_range=(10.0, 10.0))
    sparse = simulate(base.replace(density_range=(1 / 150, 1 / 150)), 1, seed=5)
    dense = simulate(base.replace(density_range=(1 / 15, 1 / 15)), 1, seed=6)
    assert 2 <= sparse["mask"].sum() <= 8 and dense["mask"].sum() > 40
    movie = np.concatenate([sparse["frames"], dense["frames"]])[..., 0]
    stack = tmp_path / "mixed.tif"
    tifffile.imwrite(stack, np.round(movie).astype(np.uint16), photometric="minisblack")
    camera = Camera(offset_adu=float(base.offset), gain_adu_per_photon=float(base.gain))
    runs = {}
    for window in (None, 20):
        analyzer = StackAnalyzer(backend, camera, num_samples=2, num_steps=5, progress=False,
                                 window_px=window)
        runs[window] = analyzer.analyze(stack, tmp_path / f"w{window}")
    auto, fixed = runs[None], runs[20]
    assert auto["window_sizes_px"] == [6, 20] and fixed["window_sizes_px"] == [20]
    rows, pred = _frames_from_csv(tmp_path / "wNone" / "mixed.csv", 2, base.pixel_size_nm)
    grid = TileGrid((28, 28), (6, 6), 4, 4)
    # The sparse frame: one 6 px window per isolated localization; the dense one: 20 px windows.
    assert auto["windows_sampled_by_size"] == {"6": len(np.unique(grid.owner(pred[0]))),
                                               "20": 4}
    assert fixed["windows_sampled_by_size"]["20"] < auto["windows_sampled"]
    _, pred_fixed = _frames_from_csv(tmp_path / "w20" / "mixed.csv", 2, base.pixel_size_nm)
    np.testing.assert_array_equal(pred[0], pred_fixed[0])  # Localizations are phi's.
    unc = np.array([float(r["uncertainty_xy [nm]"]) for r in rows if r["frame"] == "1"])
    # With 2 samples detected afresh, a localization neither sample holds has NaN (docs/analyze.md;
    # 5-6 of ~42 on 8 such frames, either phi); the others have psi's spread.
    assert np.isfinite(unc).mean() >= 0.8 and np.all(unc[np.isfinite(unc)] > 0), unc
    maps = {key: tifffile.imread(tmp_path / "wNone" / f"mixed_{key}.tif")
            for key in ("kde_estimate", "posterior_std")}
    # psi's spread at each isolated emitter, none far from all of them.
    for x, y in pred[0]:
        r, c = int(4 * y), int(4 * x)
        assert maps["posterior_std"][0, max(r - 4, 0):r + 5, max(c - 4, 0):c + 5].max() > 1e-3
    hr = (np.arange(112) + 0.5) / 4
    dist = np.min(np.hypot(hr[:, None, None] - pred[0][:, 1], hr[None, :, None] - pred[0][:, 0]),
                  axis=-1)
    # A 6 px window reaches <= 4 px from its localizations in x and y (<= 6 px at the frame
    # edge, where windows align with it).
    assert maps["posterior_std"][0][dist > 6.0 * np.sqrt(2)].max() < 1e-8
    # An overlap the small windows cannot take leaves psi's training window.
    wide = StackAnalyzer(backend, camera, num_samples=4, overlap=10, progress=False)
    assert wide.windows == (20,)
    with pytest.raises(ValueError, match="multiple of 2 px"):
        StackAnalyzer(backend, camera, num_samples=4, window_px=9, progress=False)
    with pytest.raises(ValueError, match="integer >= 6"):
        StackAnalyzer(backend, camera, num_samples=4, window_px=4, progress=False)
    paper = load_backend("paper", jit_compile=False)
    with pytest.raises(ValueError, match="training tiles"):
        StackAnalyzer(paper, camera, num_samples=4, window_px=12, progress=False)
