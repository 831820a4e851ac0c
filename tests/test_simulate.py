"""The simulator: shapes, seeds, scene statistics, KDE consistency, files on disk."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tifffile
from scipy import stats

import smlm_tfdiff as st
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch


def test_dataset_shapes_and_dtypes(paper):
    ds = st.make_dataset(paper, batch_size=8, seed=0)
    spec = ds.element_spec
    assert spec["frames"].shape.as_list() == [8, 20, 20, 1] and spec["frames"].dtype == tf.float32
    assert spec["kde"].shape.as_list() == [8, 80, 80, 1] and spec["kde"].dtype == tf.float32
    assert spec["positions"].shape.as_list() == [8, 10, 2]
    assert spec["mask"].dtype == tf.bool and spec["photons"].shape.as_list() == [8, 10]
    batch = next(iter(ds))
    assert np.all(batch["mask"].numpy())
    assert np.all(np.isfinite(batch["frames"].numpy()))


def test_same_seed_same_data_different_seed_independent(paper):
    a = [b["frames"].numpy() for b in st.make_dataset(paper, 64, seed=7).take(3)]
    b = [b["frames"].numpy() for b in st.make_dataset(paper, 64, seed=7).take(3)]
    c = [b["frames"].numpy() for b in st.make_dataset(paper, 64, seed=8).take(3)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])  # Consecutive batches differ.
    # Frames of different seeds are uncorrelated beyond the shared per-pixel mean (the disc):
    # |r| of 76800 pixel pairs < 5 standard errors.
    x = np.concatenate(a) - np.concatenate(a).mean(axis=0)
    y = np.concatenate(c) - np.concatenate(c).mean(axis=0)
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    r = (x @ y) / np.sqrt((x @ x) * (y @ y))
    assert abs(r) < 5 / np.sqrt(x.size)
    np.testing.assert_array_equal(st.simulate(paper, 50, 3)["kde"], st.simulate(paper, 50, 3)["kde"])
    np.testing.assert_array_equal(st.simulate(paper, 50, np.array([0, 3], np.int32))["frames"],
                                  st.simulate(paper, 50, 3)["frames"])


def test_simulate_returns_numpy_with_element_keys(paper):
    data = st.simulate(paper, 1500, seed=1)  # Crosses the internal chunk boundary.
    assert set(data) == {"frames", "kde", "positions", "mask", "photons", "frame_background",
                         "frame_photons", "frame_spread"}
    assert np.all(data["frame_background"] == 0)  # No background_range.
    assert all(isinstance(v, np.ndarray) for v in data.values())
    assert data["frames"].shape == (1500, 20, 20, 1) and data["kde"].shape == (1500, 80, 80, 1)
    assert not np.array_equal(data["positions"][:1024][:5], data["positions"][1024:][:5])


def test_disc_positions_are_uniform(paper):
    data = st.simulate(paper, 2000, seed=2)
    xy = data["positions"].reshape(-1, 2) - np.array([10.0, 10.0])
    r2 = (xy ** 2).sum(1) / 7.0 ** 2
    assert r2.max() <= 1.0 + 1e-6
    # Uniform on a disc: r^2 / R^2 ~ U(0, 1) and the angle ~ U(-pi, pi).
    assert stats.kstest(r2, "uniform").pvalue > 1e-3
    assert stats.kstest((np.arctan2(xy[:, 1], xy[:, 0]) + np.pi) / (2 * np.pi), "uniform").pvalue > 1e-3
    np.testing.assert_allclose(data["photons"], 200.0)


def test_frame_region_poisson_counts_photon_range():
    config = st.SimulationConfig.preset("dense", num_emitters=6, margin=2.0,
                                        photons_range=(300.0, 900.0))
    data = st.simulate(config, 4000, seed=3)
    counts = data["mask"].sum(1)
    k = config.padded_emitters
    assert data["mask"].shape == (4000, k)
    # Poisson(6): mean and variance 6; standard errors sqrt(6/n) and ~6*sqrt(2/n)(1+...)
    assert counts.mean() == pytest.approx(6.0, abs=5 * np.sqrt(6 / 4000))
    assert counts.var() == pytest.approx(6.0, abs=5 * np.sqrt((6 + 2 * 36) / 4000))
    on = data["mask"]
    xy = data["positions"][on]
    assert xy.min() >= 2.0 and xy.max() <= 18.0
    assert np.all(data["positions"][~on] == 0) and np.all(data["photons"][~on] == 0)
    ph = data["photons"][on]
    assert ph.min() >= 300 and ph.max() <= 900
    assert ph.mean() == pytest.approx(600.0, abs=5 * 600 / np.sqrt(12 * ph.size))
    # Masks are contiguous from the start (padding at the end).
    assert np.all(np.diff(on.astype(int), axis=1) <= 0)


def test_density_range_photon_and_background_distributions():
    """The whole-field scene: Poisson counts whose mean is log-uniform per frame, log-uniform N0,
    a per-frame background ~ U(lo, hi), emitters up to |margin| px outside the frame."""
    config = st.SimulationConfig.preset(
        "wholefield", frame_height=12, frame_width=12, margin=-1.0, density_range=(0.02, 0.2),
        photons_range=(100.0, 5000.0), background_range=(2.0, 30.0))
    n = 4000
    data = st.simulate(config, n, seed=11)
    area = 14.0 * 14.0
    assert config.region_area == area
    counts = data["mask"].sum(1).astype(np.float64)
    lo, hi = 0.02 * area, 0.2 * area
    # count | mu ~ Poisson(mu), mu = area * d, d log-uniform: E mu = (hi - lo) / ln(hi / lo),
    # E mu^2 = (hi^2 - lo^2) / (2 ln(hi / lo)); Var count = E mu + Var mu.
    e_mu = (hi - lo) / np.log(hi / lo)
    var = e_mu + (hi ** 2 - lo ** 2) / (2 * np.log(hi / lo)) - e_mu ** 2
    assert counts.max() <= config.padded_emitters
    assert counts.mean() == pytest.approx(e_mu, abs=5 * np.sqrt(var / n))
    assert counts.var() > e_mu + 0.5 * (var - e_mu)  # Over-dispersed: the mean varies per frame.
    on = data["mask"]
    ph = data["photons"][on].astype(np.float64)
    u = (np.log(ph) - np.log(100.0)) / (np.log(5000.0) - np.log(100.0))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    xy = data["positions"][on]
    assert xy.min() >= -1.0 and xy.max() <= 13.0 and xy.min() < -0.9 and xy.max() > 12.9
    assert stats.kstest((xy[:, 0] + 1.0) / 14.0, "uniform").pvalue > 1e-3
    bg = data["frame_background"].astype(np.float64)
    assert stats.kstest((bg - 2.0) / 28.0, "uniform").pvalue > 1e-3
    # Per frame: sum(x - offset) ~ Poisson(sum omega + 144 bg) + Normal(0, 144 * 5).
    omega = expected_counts_batch(data["positions"][:200], data["photons"][:200], config,
                                  mask=on[:200], dtype=tf.float64).numpy().sum(axis=(1, 2))
    rate = omega + 144.0 * bg[:200]
    excess = data["frames"][:200, ..., 0].astype(np.float64).sum(axis=(1, 2)) - 100.0 * 144
    z = (excess - rate) / np.sqrt(rate + 144 * 5.0)
    assert abs(z.mean()) < 5 / np.sqrt(200) and 0.8 < z.std() < 1.2
    # A config without the new fields draws what it drew before them: the same scene as one
    # with a zero-width background range, whose frames differ only by that constant background.
    plain = st.SimulationConfig.preset("dense")
    a, b = st.simulate(plain, 8, 5), st.simulate(plain.replace(background_range=(0.0, 0.0)), 8, 5)
    np.testing.assert_array_equal(a["positions"], b["positions"])
    np.testing.assert_array_equal(a["frames"], b["frames"])


def test_photons_per_frame_with_spread():
    """photons_frame_spread: one log-uniform N0 per frame, emitters' photons log-normal around it
    (log-sd = the spread); frame_photons reports the frame's N0. Without it frame_photons is the
    range's typical value, and the draws are what they were before the field."""
    config = st.SimulationConfig.preset("wholefield_dye", frame_height=12, frame_width=12)
    assert config.photons_frame_spread == 0.4
    n = 3000
    data = st.simulate(config, n, seed=12)
    n0 = data["frame_photons"].astype(np.float64)
    u = (np.log(n0) - np.log(100.0)) / (np.log(5000.0) - np.log(100.0))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    on = data["mask"]
    log_ratio = np.log(data["photons"][on].astype(np.float64)
                       / np.broadcast_to(n0[:, None], on.shape)[on])
    assert stats.kstest(log_ratio / 0.4, "norm").pvalue > 1e-3
    plain = config.replace(photons_frame_spread=None)
    a = st.simulate(plain, 8, 5)
    np.testing.assert_allclose(a["frame_photons"], np.sqrt(100.0 * 5000.0), rtol=1e-6)
    assert len(np.unique(a["photons"][a["mask"]])) == a["mask"].sum()  # Per emitter, as before.
    np.testing.assert_array_equal(st.simulate(st.SimulationConfig.preset("paper"), 2, 1)[
        "frame_photons"], 200.0)
    with pytest.raises(ValueError, match="photons_frame_spread.*photons_range"):
        st.SimulationConfig.preset("paper", photons_frame_spread=0.2)
    with pytest.raises(ValueError, match="photons_frame_spread"):
        config.replace(photons_frame_spread=-0.1)


def test_clustered_frames():
    """cluster_fraction: that fraction of frames holds one disc of emitters (radius uniform in
    cluster_radius_range, wholly inside the emitter region, density log-uniform in
    cluster_density_range, Poisson count); fraction 0 draws what a scene without the fields draws."""
    from smlm_tfdiff.simulation.simulate import _sample_clusters

    config = st.SimulationConfig.preset("wholefield_clusters", frame_height=24, frame_width=24)
    n = 4000
    cluster, mean = _sample_clusters(config, n, [3, 4])
    is_cluster = np.asarray(cluster["is_cluster"])
    p = config.cluster_fraction
    assert abs(is_cluster.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    radius = np.asarray(cluster["radius"], np.float64)
    assert stats.kstest((radius - 3.0) / 7.0, "uniform").pvalue > 1e-3
    m = config.margin
    for c in ("cx", "cy"):
        centre = np.asarray(cluster[c], np.float64)
        assert np.all(centre - radius >= m - 1e-4) and np.all(centre + radius <= 24 - m + 1e-4)
    density = np.asarray(mean, np.float64) / (np.pi * radius ** 2)
    u = (np.log(density) - np.log(1 / 25)) / (np.log(1 / 10) - np.log(1 / 25))
    assert stats.kstest(u, "uniform").pvalue > 1e-3

    # Every frame one cluster of radius 4 at 1 per 10 px^2: emitters within 8 px of each other,
    # the count Poisson(16 pi / 10).
    tight = config.replace(cluster_fraction=1.0, cluster_radius_range=(4.0, 4.0),
                           cluster_density_range=(0.1, 0.1), density_range=(0.0025, 0.01))
    data = st.simulate(tight, n, seed=9)
    counts = data["mask"].sum(1)
    lam = 16 * np.pi / 10
    assert abs(counts.mean() - lam) < 5 * np.sqrt(lam / n)
    for pos, on in zip(data["positions"][:500], data["mask"][:500]):
        q = pos[on]
        if len(q) > 1:
            assert np.sqrt(((q[:, None] - q[None]) ** 2).sum(-1)).max() <= 8.0 + 1e-4
    # Uniform on the disc: r^2 / R^2 ~ U(0, 1) about the centre the scene drew.
    from smlm_tfdiff import seeds as seeds_lib
    from smlm_tfdiff.simulation.simulate import sample_scene

    pos, _, on, _, _ = (np.asarray(v) for v in sample_scene(tight, 1000, [5, 6]))
    drawn, _ = _sample_clusters(tight, 1000, seeds_lib.fold_in(seeds_lib.split([5, 6], 4)[0], 2))
    centre = np.stack([np.asarray(drawn["cx"]), np.asarray(drawn["cy"])], -1)[:, None]
    u = (((pos - centre) ** 2).sum(-1) / 16.0)[on]
    assert u.max() <= 1 + 1e-5 and stats.kstest(u, "uniform").pvalue > 1e-3
    plain = config.replace(cluster_fraction=None, cluster_radius_range=None,
                           cluster_density_range=None)
    a = st.simulate(plain, 16, seed=2)
    for off in (config.replace(cluster_fraction=0.0), config.replace(cluster_fraction=None)):
        b = st.simulate(off, 16, seed=2)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    with pytest.raises(ValueError, match="cluster_density_range"):
        plain.replace(cluster_fraction=0.2, cluster_radius_range=(3.0, 5.0))
    # A model's scene fits frames of any size: the radii are capped at what fits.
    small = config.replace(frame_height=6, frame_width=8)
    assert small.cluster_radii == (3.0, 4.0)
    assert st.simulate(small.replace(cluster_fraction=1.0), 4, seed=1)["positions"].shape[0] == 4
    with pytest.raises(ValueError, match="cluster_fraction.*region 'frame'"):
        st.SimulationConfig.preset("paper", cluster_fraction=0.5, cluster_radius_range=(1.0, 2.0),
                                   cluster_density_range=(0.1, 0.2))
    with pytest.raises(ValueError, match="cluster_fraction"):
        config.replace(cluster_fraction=1.5)
    with pytest.raises(ValueError, match="cluster_fraction.*number"):
        config.replace(cluster_fraction="many")


def test_big_frames_render_a_few_at_a_time(monkeypatch):
    """simulate() of big frames renders them in parts (memory); the same bytes as in one call."""
    from smlm_tfdiff.simulation import simulate as simulate_module

    config = st.SimulationConfig.preset("dense", frame_height=24, frame_width=24)
    whole = st.simulate(config, 12, seed=21)
    per_frame = config.padded_emitters * config.hr_shape[0] * config.hr_shape[1]
    monkeypatch.setattr(simulate_module, "_RENDER_ELEMENTS", 5 * per_frame)  # 5 frames a call.
    monkeypatch.setattr(simulate_module, "_RENDERERS", {})
    parts = st.simulate(config, 12, seed=21)
    for key in whole:
        np.testing.assert_array_equal(whole[key], parts[key])


def test_kde_targets_match_render_kde_and_count(paper):
    data = st.simulate(st.SimulationConfig.preset("dense"), 20, seed=4)
    config = st.SimulationConfig.preset("dense")
    for i in range(5):
        pos = data["positions"][i][data["mask"][i]]
        np.testing.assert_allclose(data["kde"][i, ..., 0], st.render_kde(pos, config), atol=2e-5)
    d = st.simulate(paper, 200, seed=5)
    np.testing.assert_allclose(d["kde"].sum(axis=(1, 2, 3)) / paper.kde_norm, 10.0, rtol=1e-4)


def test_frames_follow_expected_counts(paper):
    """Frame mean over many scenes equals the mean of gain * omega + offset scene by scene."""
    data = st.simulate(paper, 3000, seed=6)
    photons = data["frames"][..., 0].astype(np.float64).sum(axis=(1, 2)) - 100.0 * 400
    # Per frame: sum of x - offset ~ Poisson(2000) + Normal(0, 400 * 5).
    z = (photons.mean() - 2000.0) / np.sqrt((2000.0 + 2000.0) / 3000)
    assert abs(z) < 4.5


def test_save_and_load(tmp_path, paper):
    data = st.simulate(paper, 32, seed=9)
    path = str(tmp_path / "eval" / "set.npz")
    written = st.save_dataset(path, data, paper)
    assert written == [path, path[:-4] + ".tif"]
    back, config = st.load_dataset(path)
    assert config == paper
    for k in data:
        np.testing.assert_array_equal(back[k], data[k])
    stack = tifffile.imread(written[1])
    assert stack.shape == (32, 20, 20) and stack.dtype == np.float32
    np.testing.assert_array_equal(stack, data["frames"][..., 0])
    assert not [f for f in os.listdir(tmp_path / "eval") if f.startswith(".tmp")]


def test_failed_write_leaves_no_file(tmp_path, paper):
    data = st.simulate(paper, 4, seed=9)
    data["kde"] = data["kde"][:2]  # Inconsistent lengths.
    with pytest.raises(ValueError, match="kde"):
        st.save_dataset(str(tmp_path / "x.npz"), data, paper)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="save_dataset"):
        st.load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match=".npz"):
        st.save_dataset(str(tmp_path / "x.h5"), st.simulate(paper, 2, 0), paper)


def test_bad_arguments(paper):
    with pytest.raises(ValueError, match="batch_size"):
        st.make_dataset(paper, 0, 0)
    with pytest.raises(ValueError, match="num_frames"):
        st.simulate(paper, 0, 0)
    with pytest.raises(TypeError, match="SimulationConfig"):
        st.simulate({"photons": 200}, 4, 0)
    with pytest.raises(ValueError, match=r"\[K, 2\]"):
        st.render_kde(np.zeros((3, 3)), paper)
    with pytest.raises(ValueError, match="NaN"):
        st.expected_counts([[np.nan, 1.0]], [200.0], paper)
    with pytest.raises(ValueError, match="photons"):
        st.expected_counts([[1.0, 1.0]], [-5.0], paper)
    with pytest.raises(ValueError, match="seed"):
        st.simulate(paper, 2, -1)
