"""The JAX simulator and psi trainer (for a GPU machine without TensorFlow) against the TensorFlow
physics, on the CPU: same expected counts and KDE to float32 precision, the camera's moments, the
scene's distribution, the noise-level draw and learning-rate schedule of the TF trainer, and the
trainer end to end under KERAS_BACKEND=jax (weights readable under TensorFlow, resume)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

jax = pytest.importorskip("jax")  # In the test extras; skipped only outside `make test`.
import jax.numpy as jnp  # noqa: E402

import smlm_tfdiff as st  # noqa: E402
from smlm_tfdiff.simulation import simulate_jax as simulation_jax
from smlm_tfdiff.diffusion.schedule import NoiseSchedule  # noqa: E402
from smlm_tfdiff.simulation.physics.camera import frame_moments  # noqa: E402
from smlm_tfdiff.simulation.physics.kde import render_kde_batch  # noqa: E402
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch  # noqa: E402
from smlm_tfdiff.models.phi import build_phi  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(config, seed=0, batch=3):
    rng = np.random.default_rng(seed)
    k = 7
    pos = np.stack([rng.uniform(-1, config.frame_width + 1, (batch, k)),
                    rng.uniform(-1, config.frame_height + 1, (batch, k))], -1).astype(np.float32)
    photons = rng.uniform(50, 3000, (batch, k)).astype(np.float32)
    mask = rng.uniform(size=(batch, k)) < 0.7
    return pos, photons, mask


@pytest.mark.parametrize("background", [0.0, 7.5])
def test_rate_and_kde_match_tf_physics(background):
    config = st.SimulationConfig.preset("paper", frame_height=16, frame_width=24,
                                        background=background)
    pos, photons, mask = _scene(config)
    rate_tf = expected_counts_batch(pos, photons, config, mask).numpy()
    rate_jax = np.asarray(simulation_jax.expected_counts(pos, photons, mask, config))
    kde_tf = render_kde_batch(pos, config, mask).numpy()
    kde_jax = np.asarray(simulation_jax.render_kde(pos, mask, config))
    assert rate_jax.shape == rate_tf.shape == (3, 16, 24)
    assert kde_jax.shape == kde_tf.shape == (3, 64, 96)
    # float32 round-off of erf differences: a few ulps of the largest value.
    assert np.max(np.abs(rate_jax - rate_tf)) <= 1e-5 * rate_tf.max()
    assert np.max(np.abs(kde_jax - kde_tf)) <= 1e-5 * kde_tf.max()
    # Padding contributes nothing.
    off = simulation_jax.render_kde(pos, np.zeros_like(mask), config)
    assert float(jnp.abs(off).max()) == 0.0


def test_frames_have_the_camera_moments():
    """Per-pixel mean and variance of many frames of one scene against physics.frame_moments,
    each within 5 standard errors (the variance's from the fourth moment of Poisson + Normal)."""
    config = st.SimulationConfig.preset("paper", frame_height=8, frame_width=8, gain=2.5,
                                        offset=400.0, readout_var=9.0, background=3.0,
                                        region="frame")
    pos = np.array([[[3.2, 4.7], [5.5, 2.1]]], np.float32)
    photons = np.array([[400.0, 150.0]], np.float32)
    mask = np.ones((1, 2), bool)
    rate = simulation_jax.expected_counts(pos, photons, mask, config)
    n = 20000
    frames = np.asarray(simulation_jax.sample_frames(
        jax.random.PRNGKey(3), jnp.broadcast_to(rate, (n, 8, 8)), config), np.float64)
    mean_th, var_th = (m.numpy()[0] for m in frame_moments(np.asarray(rate), config))
    lam = np.asarray(rate, np.float64)[0]
    g, rv = config.gain, config.readout_var
    # Fourth central moment of g*Poisson(lam) + N(0, rv): g^4 (lam + 3 lam^2) + 6 g^2 lam rv + 3 rv^2.
    mu4 = g ** 4 * (lam + 3 * lam ** 2) + 6 * g ** 2 * lam * rv + 3 * rv ** 2
    z_mean = (frames.mean(0) - mean_th) / np.sqrt(var_th / n)
    z_var = (frames.var(0, ddof=1) - var_th) / np.sqrt((mu4 - var_th ** 2 * (n - 3) / (n - 1)) / n)
    assert np.max(np.abs(z_mean)) < 5.0
    assert np.max(np.abs(z_var)) < 5.0


def test_scene_distribution():
    disc = st.SimulationConfig.preset("paper")
    pos, photons, mask, _, _ = (np.asarray(a) for a in simulation_jax.sample_scene(
        jax.random.PRNGKey(0), disc, 2000))
    assert mask.all() and mask.shape == (2000, 10)
    r2 = ((pos - np.array(disc.center)) ** 2).sum(-1)
    assert r2.max() <= disc.disc_radius ** 2 * (1 + 1e-6)
    # Uniform on the disc: r^2 / R^2 ~ U(0, 1), mean 1/2 with sd sqrt(1/12 / N).
    u = r2.ravel() / disc.disc_radius ** 2
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    np.testing.assert_array_equal(photons, 200.0)

    dense = st.SimulationConfig.preset("dense")
    pos, photons, mask, _, _ = (np.asarray(a) for a in simulation_jax.sample_scene(
        jax.random.PRNGKey(1), dense, 4000))
    counts = mask.sum(1)
    # Poisson(10) (truncation at K = 30 is never reached in practice).
    assert abs(counts.mean() - 10) < 5 * np.sqrt(10 / counts.size)
    assert abs(counts.var() - 10) < 5 * np.sqrt(2 * 10 ** 2 / counts.size + 10 / counts.size)
    lo, hi = dense.photons_range
    on = photons[mask]
    assert on.min() >= lo and on.max() <= hi
    assert abs(on.mean() - (lo + hi) / 2) < 5 * (hi - lo) / np.sqrt(12 * on.size)
    xy = pos[mask]
    assert xy.min() >= dense.margin and xy[:, 0].max() <= dense.frame_width - dense.margin
    np.testing.assert_array_equal(pos[~mask], 0.0)
    np.testing.assert_array_equal(photons[~mask], 0.0)


def test_clustered_scene_distribution():
    """Clustered frames as the TF simulator draws them: the fraction of cluster frames, each
    cluster uniform on its disc, wholly inside the emitter region, with a Poisson count."""
    config = st.SimulationConfig.preset("wholefield_clusters", frame_height=24, frame_width=24)
    n = 4000
    cluster, mean = simulation_jax._sample_clusters(jax.random.PRNGKey(3), config, n)
    is_cluster, radius = np.asarray(cluster["is_cluster"]), np.asarray(cluster["radius"])
    p = config.cluster_fraction
    assert abs(is_cluster.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert radius.min() >= 3.0 and radius.max() <= 10.0
    assert abs(radius.mean() - 6.5) < 5 * 7.0 / np.sqrt(12 * n)
    for c in ("cx", "cy"):
        centre = np.asarray(cluster[c])
        assert np.all(centre - radius >= config.margin - 1e-4)
        assert np.all(centre + radius <= 24 - config.margin + 1e-4)
    density = np.asarray(mean) / (np.pi * radius ** 2)
    assert density.min() >= 1 / 25 * (1 - 1e-5) and density.max() <= 1 / 10 * (1 + 1e-5)

    tight = config.replace(cluster_fraction=1.0, cluster_radius_range=(4.0, 4.0),
                           cluster_density_range=(0.1, 0.1))
    key = jax.random.PRNGKey(4)
    pos, _, on, _, _ = (np.asarray(a) for a in simulation_jax.sample_scene(key, tight, n))
    lam = 16 * np.pi / 10
    assert abs(on.sum(1).mean() - lam) < 5 * np.sqrt(lam / n)
    # sample_scene's own draw of the centres (the count key's stream 2).
    count_key = jax.random.split(key, 4)[0]
    drawn, _ = simulation_jax._sample_clusters(jax.random.fold_in(count_key, 2), tight, n)
    centre = np.stack([np.asarray(drawn["cx"]), np.asarray(drawn["cy"])], -1)[:, None]
    u = (((pos - centre) ** 2).sum(-1) / 16.0)[on]
    assert u.max() <= 1 + 1e-5 and abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)


def test_batch_shapes_and_keys():
    config = st.SimulationConfig.preset("paper")
    a = simulation_jax.simulate_batch(jax.random.PRNGKey(5), config, 4)
    b = simulation_jax.simulate_batch(jax.random.PRNGKey(5), config, 4)
    c = simulation_jax.simulate_batch(jax.random.PRNGKey(6), config, 4)
    assert a["frames"].shape == (4, 20, 20, 1) and a["kde"].shape == (4, 80, 80, 1)
    np.testing.assert_array_equal(np.asarray(a["frames"]), np.asarray(b["frames"]))
    assert not np.array_equal(np.asarray(a["frames"]), np.asarray(c["frames"]))
    # Every emitter of the disc scene lies well inside: the KDE counts all ten.
    counts = np.asarray(a["kde"]).sum(axis=(1, 2, 3)) / config.kde_norm
    np.testing.assert_allclose(counts, 10.0, rtol=1e-3)


def test_spread_zero_fraction_as_in_tf():
    """photons_frame_spread_zero_fraction in the JAX draw: that fraction of frames (binomial,
    4 sds) at spread 0, the rest uniform in the range."""
    config = st.SimulationConfig.preset(
        "wholefield", photons_frame_spread_range=(0.1, 0.6), frame_height=8, frame_width=8,
        photons_frame_spread_zero_fraction=0.3)
    n = 600
    spread = np.asarray(simulation_jax.sample_scene(jax.random.PRNGKey(3), config, n)[4])
    zero = spread == 0
    assert abs(zero.sum() - 0.3 * n) < 4 * np.sqrt(n * 0.3 * 0.7)
    assert spread[~zero].min() >= 0.1 and spread[~zero].max() <= 0.6


def test_noise_level_draw_matches_the_tf_draw():
    from smlm_tfdiff.models.psi_training_jax import noise_level_draw
    schedule = NoiseSchedule.named("paper")
    t, gamma = (np.asarray(a) for a in noise_level_draw(jax.random.PRNGKey(0), schedule, 50000, 2))
    assert t.min() == 2 and t.max() == schedule.T
    lo, hi = schedule.gamma[t], schedule.gamma[t - 1]
    assert np.all(gamma >= lo * (1 - 1e-6)) and np.all(gamma <= hi * (1 + 1e-6))
    # sqrt(gamma) uniform within its bin: the relative position has mean 1/2.
    s = (np.sqrt(gamma) - np.sqrt(lo)) / (np.sqrt(hi) - np.sqrt(lo))
    assert abs(s.mean() - 0.5) < 5 * np.sqrt(1 / 12 / s.size)
    counts = np.bincount(t, minlength=schedule.T + 1)[2:]
    expected = t.size / (schedule.T - 1)
    assert np.max(np.abs(counts - expected)) < 5 * np.sqrt(expected)


def test_learning_rate_matches_the_tf_trainer():
    from smlm_tfdiff.models.psi_training_jax import JaxTrainConfig, learning_rate_at
    from smlm_tfdiff.models.training import TrainerConfig, make_learning_rate
    for steps in (50, 1000):
        schedule = make_learning_rate(TrainerConfig(out_dir="", steps=steps, learning_rate=2e-3))
        config = JaxTrainConfig(out_dir="", learning_rate=2e-3)
        for step in (0, 1, 20, 199, 200, 201, steps // 2, steps - 1, steps):
            np.testing.assert_allclose(learning_rate_at(step, steps, config),
                                       float(schedule(step)), rtol=1e-5)


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    """The environment of a JAX trainer subprocess, as on the GPU machine: KERAS_BACKEND=jax and
    no TensorFlow (a stub package `tensorflow` that refuses to import shadows the installed one).
    The runs share a persistent XLA compilation cache: on the CPU, JAX compiles every weight
    initialiser's shape and every jitted step afresh in each process (~40 s of a 50 s run), and
    a resumed run compiles the same programs again."""
    root = tmp_path_factory.mktemp("jax")
    (root / "no_tensorflow" / "tensorflow").mkdir(parents=True)
    (root / "no_tensorflow" / "tensorflow" / "__init__.py").write_text(
        "raise ImportError('TensorFlow is not installed on this machine')\n")
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(root / "no_tensorflow"), ROOT]),
            "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(env, script, *args):
    cmd = [sys.executable, os.path.join(ROOT, "trainers", script), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _train(env, out_dir, state_dir, steps, *extra):
    return _run(env, "train_psi_jax.py", "--out_dir", out_dir, "--state_dir", state_dir,
                "--steps", steps, "--base_channels", "8", "--channel_multipliers", "1,2",
                "--attention_resolutions", "40", "--embedding_dim", "16", "--batch_size", "4",
                "--val_frames", "8", "--log_every", "2", "--eval_every", "4", "--seed", "3",
                *extra)  # The last of a repeated flag wins.


@pytest.mark.slow
def test_jax_trainer_end_to_end_and_resume(tmp_path, jax_env):
    out, state = str(tmp_path / "psi"), str(tmp_path / "state")
    _train(jax_env, out, state, 4)
    with open(os.path.join(out, "train_log.json")) as f:
        info = json.load(f)
    assert info["backend"] == "jax" and info["steps"] == 4
    assert [r["step"] for r in info["loss"]] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in info["loss"])
    assert set(info["validation"][-1]) >= {"mse_t1-5", "mse_t51-100", "kde_mse_phi"}

    # The folder loads under TensorFlow: bundled phi unchanged, psi trained (not its init).
    models = st.load_models(out)
    paper = st.pretrained("paper")
    for a, b in zip(models.phi.get_weights(), paper.phi.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert models.psi_config.base_channels == 8 and models.schedule.T == 100
    out_conv = models.psi.get_layer("eps").get_weights()[0]
    assert np.abs(out_conv).max() > 0  # Zero-initialised; four AdamW steps moved it.
    x = {"y_t": tf.zeros([1, 80, 80, 1]), "y_hat": tf.zeros([1, 80, 80, 1]),
         "noise_level": tf.constant([0.8])}
    assert np.all(np.isfinite(models.psi(x, training=False).numpy()))

    # The same command with more steps resumes from the saved state.
    log = _train(jax_env, out, state, 6)
    assert "Resumed at step 4 of 6" in log
    with open(os.path.join(out, "train_log.json")) as f:
        info = json.load(f)
    assert info["steps"] == 6 and [r["step"] for r in info["loss"]] == [2, 4, 6]


@pytest.mark.slow
def test_jax_phi_trainer_end_to_end_loads_under_tensorflow(tmp_path, jax_env):
    """trainers/train_phi_jax.py without TensorFlow: a phi folder that load_phi reads under
    TensorFlow (BatchNormalization statistics moved by training), which the JAX psi trainer
    takes as its frozen phi."""
    out = str(tmp_path / "phi")
    _run(jax_env, "train_phi_jax.py", "--out_dir", out, "--preset", "paper",
         "--context_filters", "8", "--upsample_filters", "8,8", "--prediction_filters", "4",
         "--batch_size", "4", "--steps", "3", "--val_frames", "8", "--log_every", "1",
         "--eval_every", "2", "--seed", "3")
    with open(os.path.join(out, "train_log.json")) as f:
        info = json.load(f)
    assert info["backend"] == "jax" and info["steps"] == 3
    assert [r["step"] for r in info["loss"]] == [1, 2, 3]
    assert [r["step"] for r in info["validation"]] == [2, 3]
    models = st.load_phi(out)
    assert models.phi_config.context_filters == 8 and models.config.region == "disc"
    untrained = build_phi(models.config, models.phi_config)
    moved = [(a, b) for a, b in zip(models.phi.non_trainable_weights,
                                    untrained.non_trainable_weights) if "moving" in a.path]
    assert moved and any(np.abs(a.numpy() - b.numpy()).max() > 0 for a, b in moved)
    frames = st.simulate(models.config, 2, seed=1)["frames"]
    assert np.all(np.isfinite(models.phi(frames, training=False).numpy()))


def test_jax_trainers_refuse_the_tensorflow_backend(cli, tmp_path):
    for script, twin in (("train_phi_jax.py", "train_phi.py"), ("train_psi_jax.py", "train_psi.py")):
        res = cli(os.path.join(ROOT, "trainers", script), "--out_dir", str(tmp_path / script))
        assert res.returncode != 0 and "KERAS_BACKEND=jax" in res.stderr and twin in res.stderr
        assert not os.path.exists(tmp_path / script)
