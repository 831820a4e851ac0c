"""The bundled paper-preset phi: loads out of the box and localizes held-out frames."""

import numpy as np
import pytest

import smlm_tfdiff as st
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.localization.batched import detect_batch


@pytest.mark.slow
def test_bundled_phi_localizes_paper_frames():
    model = st.pretrained("paper")
    assert model.config == st.SimulationConfig.preset("paper")
    data = st.simulate(model.config, 200, seed=123_456)
    kde = np.asarray(model.phi(data["frames"], training=False))
    assert kde.shape == (200, 80, 80, 1)
    # The KDE scale: sum / (2 pi sigma^2) counts the emitters.
    count = kde.sum(axis=(1, 2, 3)) / model.config.kde_norm
    assert count.mean() == pytest.approx(10.0, rel=0.05)
    m = st.localization_metrics(detect_batch(kde, model.config), data, model.config)
    oracle = st.oracle_metrics(data["positions"], data["mask"], model.config)
    # The bars (P >= 0.99, R >= 0.97 x oracle, met on 1000 held-out frames: 0.995, 0.979)
    # less ~2.5 standard errors of ~2000 emitters (0.002 for P, 0.004 for the recall ratio).
    assert m["precision"] >= 0.985, m
    assert m["recall"] >= 0.96 * oracle["recall"], (m, oracle)
    assert m["rmse_lateral_nm"] < 40


def test_isolated_emitters_near_the_crlb():
    model = st.pretrained("paper")
    config = model.scene_config("isolated")
    assert config == st.SimulationConfig.preset("isolated")
    # Every preset's scene whole, its frame size and per-frame distributions included (the
    # paper model has the seeds' camera, which every preset shares).
    for preset in ("paper", "bright", "dense", "wholefield"):
        assert model.scene_config(preset) == st.SimulationConfig.preset(preset), preset
    data = st.simulate(config, 200, seed=654_321)
    kde = np.asarray(model.phi(data["frames"], training=False))
    m = st.localization_metrics(detect_batch(kde, config), data, config)
    assert m["precision"] >= 0.99 and m["recall"] >= 0.99
    bound = st.crlb(data["positions"][:, 0], config)
    crlb_nm = np.sqrt(np.mean(np.sum(bound ** 2, axis=1))) * config.pixel_size_nm
    # 200 localizations: the RMSE estimate has ~5% relative standard error.
    assert m["rmse_lateral_nm"] < 1.5 * crlb_nm


def test_unknown_model_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no bundled model"):
        st.pretrained("nope")
    with pytest.raises(FileNotFoundError, match="train_phi.py"):
        st.load_phi(str(tmp_path))


@pytest.mark.slow
def test_bundled_psi_samples_a_posterior_around_phi():
    models = st.pretrained("paper")
    assert models.psi is not None and models.schedule.name == "paper"
    # The default recipe: guided start at t* = T (the forward marginal), 10 ancestral steps.
    assert models.weighting == "snr" and (models.t_start, models.num_steps) == (100, 10)
    data = st.simulate(models.config, 8, seed=424_242)
    # The loop traced, not compiled (XLA: test_analyze.py end to end, test_sampler.py).
    post = PosteriorSampler(models, jit_compile=False)(data["frames"], 16, seed=0, method="ddpm")
    assert post["nfe_per_frame"] == 160 and len(post["steps"]) == 10 and post["steps"][0] == 100
    truth = data["kde"]
    # The posterior mean stays as close to the truth as phi's estimate: its MSE less the Monte
    # Carlo part (mean sample variance / (S - 1)) is within 15% of phi's (measured: 1.09x; from
    # t* = T psi's mean is not better than y_hat, docs/sampler.md, "psi results").
    mse_mean = np.mean((post["mean"] - truth) ** 2) - np.mean(post["std"] ** 2) / 15
    mse_phi = np.mean((post["y_hat"] - truth) ** 2)
    assert mse_mean < 1.15 * mse_phi
    # Uncertainty sits where the molecules are, not in the empty background.
    near, far = truth[..., 0] > 0.2, truth[..., 0] < 1e-3
    assert post["std"][..., 0][near].mean() > 5 * post["std"][..., 0][far].mean()
    # (Same seed, same samples: the compiled sampler's, test_sampler.py
    # test_same_seed_same_samples_different_seed_different.)


def test_bundled_wide_psi_denoises_better_than_the_paper_psi():
    """paper_wide (the 4x psi trained on a GPU, MODEL.md there): the paper phi byte for byte, and a
    psi whose noise estimate on held-out pairs beats the paper psi's (validation eps-MSE 0.0034
    against 0.0095 at t 51-100; 48 pairs at t = 60-100 separate them far beyond their spread)."""
    from smlm_tfdiff.diffusion.schedule import q_sample, to_diffusion_space
    wide, paper = st.pretrained("paper_wide"), st.pretrained("paper")
    for a, b in zip(wide.phi.get_weights(), paper.phi.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert wide.psi_config.base_channels == 16 and wide.psi.count_params() == 2_690_817
    assert wide.schedule.get_config() == paper.schedule.get_config()
    data = st.simulate(paper.config, 48, seed=123_457)
    rng = np.random.default_rng(0)
    t = rng.integers(60, 101, 48)
    gamma = paper.schedule.gamma[t].astype(np.float32)
    eps = rng.standard_normal(data["kde"].shape).astype(np.float32)
    y_t = np.asarray(q_sample(to_diffusion_space(data["kde"]), gamma, eps))
    y_hat = np.asarray(paper.phi(data["frames"], training=False))
    mse = {}
    for name, m in (("wide", wide), ("paper", paper)):
        pred = m.psi({"y_t": y_t, "y_hat": y_hat, "noise_level": np.sqrt(gamma)},
                     training=False)
        mse[name] = np.mean((np.asarray(pred) - eps) ** 2, axis=(1, 2, 3))
    assert mse["wide"].mean() < 0.6 * mse["paper"].mean(), {k: v.mean() for k, v in mse.items()}
    assert np.mean(mse["wide"] < mse["paper"]) > 0.8


def _phi_at_n0(models, data, config):
    """phi's estimate of simulated frames, each scaled by its true photons per emitter, and told
    their true spread where its phi is (the whole-field phis read frames scaled to N0; analyze
    measures N0 and the spread instead)."""
    from smlm_tfdiff.models.phi import phi_input

    assert models.phi_config.brightness_reference is not None
    frames = phi_input(data["frames"], float(config.offset), models.phi_config,
                       data["frame_photons"], data["frame_spread"])
    return models.phi(frames.astype(np.float32), training=False).numpy()


def test_bundled_wholefield_model_finds_emitters_at_the_edge_and_samples_windows():
    """wholefield (MODEL.md there): phi trained on emitters anywhere in the frame and up to 1 px
    beyond, psi on 20x20 px windows of such frames. On 48x48 frames with emitters everywhere
    (N0 1000-3000) phi finds them at the edge as in the centre (measured: P 1.0, R 0.985, edge
    0.976 of 42, centre 0.989 of 94); the bars sit about three binomial standard errors lower. psi
    sampled on windows of phi's whole-frame estimate puts its spread where the emitters are."""
    from smlm_tfdiff.io.tiling import TileGrid

    models = st.pretrained("wholefield")
    assert models.config.region == "frame" and models.config.margin < 0
    assert models.psi_config.image_size == 4 * 20  # Trained on 20x20 px windows.
    config = models.config.replace(frame_height=48, frame_width=48,
                                   density_range=(1 / 150, 1 / 150), photons_range=(1000.0, 3000.0),
                                   background_range=None, cluster_fraction=None)
    data = st.simulate(config, 8, seed=123_458)
    y_hat = _phi_at_n0(models, data, config)
    found = [detect_batch(image[None, ..., 0], config, models.detection)[0] for image in y_hat]
    metrics = st.localization_metrics(found, data, config)
    assert metrics["precision"] >= 0.95 and metrics["recall"] >= 0.9, metrics
    truth = data["positions"][data["mask"]]
    edge = (truth < 3).any(axis=1) | (truth > 45).any(axis=1)
    hit = np.zeros(len(truth), bool)
    starts = np.concatenate([[0], np.cumsum(data["mask"].sum(axis=1))])
    hit[starts[metrics["matches"][:, 0]] + metrics["matches"][:, 2]] = True
    assert edge.sum() >= 30 and hit[edge].mean() >= 0.85, (edge.sum(), hit[edge].mean())
    grid = TileGrid((48, 48), (20, 20), 4, 4)
    windows = grid.cut_hr(y_hat[:1, ..., 0])[..., None]
    post = PosteriorSampler(models, jit_compile=False)(None, 8, seed=0, y_hat=windows)
    std = grid.stitch(post["mean"][..., 0], post["std"][..., 0] ** 2)[1][0]
    truth_kde = data["kde"][0, ..., 0]
    assert std[truth_kde > 0.2].mean() > 5 * std[truth_kde < 1e-3].mean()


def test_bundled_fast_wholefield_model_samples_on_the_camera_grid():
    """wholefield_fast (MODEL.md there): the wholefield phi told the spread of the emitters'
    photons, with a psi on the camera grid (space-to-depth 4, an output head on the KDE grid),
    sampled 8 x 5 steps by default and refitted in the samples. Its windows of phi's estimate
    put the spread where the emitters are (measured on these frames: mean per-pixel variance
    0.0049 where the true KDE exceeds 0.2, 5.1e-5 where it is below 1e-3, 96x, 92x on another
    seed; without the head 4.2x, the floor MODEL.md describes), and analyze's defaults are the
    model's."""
    from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend
    from smlm_tfdiff.io.tiling import TileGrid

    models = st.pretrained("wholefield_fast")
    # The wholefield scene, with the spread of the emitters' photons drawn per frame (half the
    # frames at 0), which its phi is told (MODEL.md there, "phi told the spread").
    assert models.phi_config.spread_input
    assert models.config.photons_frame_spread_range == (0.0, 0.6)
    assert models.config.photons_frame_spread_zero_fraction == 0.5
    assert models.config.replace(photons_frame_spread_range=None, photons_frame_spread=0.4,
                                 photons_frame_spread_zero_fraction=None) \
        == st.pretrained("wholefield").config
    assert models.psi_config.space_to_depth == 4 and models.psi_config.downsample_factor == 8
    assert models.psi_config.output_head == 8
    assert (models.recipe.num_samples, models.recipe.num_steps) == (8, 5)
    assert models.detection.in_samples == "refit"
    config = models.config.replace(frame_height=40, frame_width=40,
                                   density_range=(1 / 100, 1 / 100), photons_range=(400.0, 400.0),
                                   background_range=None, cluster_fraction=None)
    data = st.simulate(config, 2, seed=123_459)
    y_hat = _phi_at_n0(models, data, config)
    grid = TileGrid((40, 40), (8, 8), 4, 4)
    windows = grid.cut_hr(y_hat[:1, ..., 0])[..., None]
    post = PosteriorSampler(models, jit_compile=False)(None, 8, seed=0, y_hat=windows)
    variance = grid.stitch(post["mean"][..., 0], post["std"][..., 0] ** 2)[1][0]
    truth_kde = data["kde"][0, ..., 0]
    assert variance[truth_kde > 0.2].mean() > 20 * variance[truth_kde < 1e-3].mean()
    backend = load_backend("wholefield_fast", jit_compile=False)
    analyzer = StackAnalyzer(backend, Camera(float(config.offset), float(config.gain)),
                             progress=False)
    assert (analyzer.num_samples, analyzer.num_steps, analyzer.in_samples) == (8, 5, "refit")
    assert StackAnalyzer(backend, Camera(100.0, 1.0), 16, progress=False).num_samples == 16
