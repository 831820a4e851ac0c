"""The learned reverse variance: its network, loss and trainer (the sampler side is checked
against an exact denoiser in test_sampler.py)."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.diffusion.recipe import Recipe
from smlm_tfdiff.diffusion.schedule import NoiseSchedule
from smlm_tfdiff.models.psi import PsiConfig, build_psi
from smlm_tfdiff.pretrained import save_models
from smlm_tfdiff.experimental.reverse_variance import (INITIAL_K, VarianceLoss, build_variance_net,
                                          x0_variance_term)
from test_training import _scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = PsiConfig(base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(40,),
                  embedding_dim=16)


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"y_t": tf.constant(rng.standard_normal((n, 80, 80, 1)), tf.float32),
            "y_hat": tf.constant(rng.uniform(0, 1, (n, 80, 80, 1)), tf.float32),
            "noise_level": tf.constant(rng.uniform(0.5, 1, n), tf.float32)}


def test_variance_net_starts_from_psi_with_a_constant_k():
    psi = build_psi(SMALL)
    rng = np.random.default_rng(1)
    psi.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in psi.get_weights()])
    net = build_variance_net(SMALL, psi)
    for a, b in zip(net.get_weights()[:-2], psi.get_weights()[:-2]):
        np.testing.assert_array_equal(a, b)  # Every layer but the output conv is psi's.
    log_k = net(_inputs(), training=False).numpy()
    np.testing.assert_allclose(log_k, np.log(INITIAL_K), rtol=1e-6)
    # A v-prediction psi's network is the same; psi_var's output is always read as is.
    v_net = build_variance_net(PsiConfig(**{**SMALL.__dict__, "prediction": "v_residual"}), psi)
    np.testing.assert_allclose(v_net(_inputs(), training=False).numpy(), log_k, rtol=1e-6)


def test_x0_variance_term():
    # The last step (g_s = 1, sigma = 0) adds all of Var(z_0 | z_t) = (1 - g) k.
    log_k = tf.fill([1, 2, 2, 1], np.log(0.04).astype(np.float32))
    np.testing.assert_allclose(x0_variance_term(log_k, 0.8, 1.0, 0.0).numpy(), 0.2 * 0.04,
                               rtol=1e-5)
    # A DDIM step (sigma = 0) from 0.6 to 0.7: c = sqrt(0.7) - sqrt(0.3) sqrt(0.6 / 0.4).
    c = np.sqrt(0.7) - np.sqrt(0.3) * np.sqrt(1.5)
    np.testing.assert_allclose(x0_variance_term(log_k, 0.6, 0.7, 0.0).numpy(),
                               c * c * 0.4 * 0.04, rtol=1e-5)


def test_loss_is_the_gaussian_nll_of_psi_s_residual(paper):
    phi = tf.keras.Sequential([tf.keras.Input((20, 20, 1)), tf.keras.layers.UpSampling2D(4)])
    psi = build_psi(SMALL)  # Untrained: eps_psi = 0, so r = eps.
    net = build_variance_net(SMALL, psi)
    rng = np.random.default_rng(2)
    batch = {"frames": tf.constant(rng.uniform(0, 200, (2, 20, 20, 1)), tf.float32),
             "kde": tf.constant(rng.uniform(0, 1, (2, 80, 80, 1)), tf.float32),
             "gamma": tf.constant([0.6, 0.95], tf.float32),
             "eps": tf.constant(rng.standard_normal((2, 80, 80, 1)), tf.float32)}
    loss = VarianceLoss(phi, psi)(net, batch, False).numpy()
    target = batch["eps"].numpy() ** 2 / batch["gamma"].numpy()[:, None, None, None]
    expected = np.mean(target / INITIAL_K + np.log(INITIAL_K), axis=(1, 2, 3))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Minimised by k = E[r^2 / g]: the NLL there is below the NLL a factor 2 off either way.
    nll = lambda k: np.mean(target[0] / k + np.log(k))  # noqa: E731
    best = target[0].mean()
    assert nll(best) < min(nll(2 * best), nll(best / 2))


def test_train_psi_variance_resumes_and_the_sampler_uses_it(tmp_path):
    src = str(tmp_path / "psi")
    base = st.pretrained("paper")
    recipe = Recipe(NoiseSchedule.named("paper"), "snr", t_start=10, num_steps=2)
    save_models(src, base, psi=build_psi(SMALL), psi_config=SMALL, recipe=recipe)
    out = str(tmp_path / "var")

    def train(steps, *extra, ok=True):
        cmd = [sys.executable, os.path.join(ROOT, "trainers", "train_psi_variance.py"),
               f"--out_dir={out}", f"--psi={src}", f"--steps={steps}", "--batch_size=8",
               "--num_replicas=2", "--log_every=2", "--eval_every=2", "--checkpoint_every=2",
               "--val_frames=16", "--warmup_steps=1", "--noprogress", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
        return proc.stderr

    log = train(2)
    assert "MirroredStrategy" in log
    for lo, hi in ((1, 5), (51, 100)):
        for key in ("nll", "k_ratio", "k_r"):
            assert [s for s, _ in _scalars(os.path.join(out, "val"), f"{key}_t{lo}-{hi}")] == [2]
    # A run in progress (no psi_var.weights.h5 yet) loads the EMA weights of its checkpoint.
    final = st.load_models(out).x0_variance.net.get_weights()
    os.remove(os.path.join(out, "psi_var.weights.h5"))
    for a, b in zip(st.load_models(out).x0_variance.net.get_weights(), final):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    log = train(4)
    assert "at step 2" in log
    models = st.load_models(out)
    assert models.x0_variance is not None and models.t_start == 10
    for a, b in zip(models.psi.get_weights(), st.load_models(src).psi.get_weights()):
        np.testing.assert_array_equal(a, b)  # psi itself is unchanged.
    sampler = st.PosteriorSampler(models, jit_compile=False)
    assert sampler.reverse_variance == "learned"
    frames = st.simulate(models.config, 1, seed=3)["frames"]
    learned = sampler(frames, num_samples=4, seed=0, method="ddpm")
    fixed = st.PosteriorSampler(models, jit_compile=False, reverse_variance="fixed")(
        frames, num_samples=4, seed=0, method="ddpm")
    assert np.all(np.isfinite(learned["std"]))
    assert not np.allclose(learned["std"], fixed["std"])
    assert "has no psi" in train(1, "--psi=paper_mcdropout", ok=False)
