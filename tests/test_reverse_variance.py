"""The learned reverse variance: its network, loss and trainer (the sampler side is checked
against an exact denoiser in test_sampler.py)."""

import os

import numpy as np
import pytest
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.diffusion.recipe import Recipe
from smlm_tfdiff.diffusion.schedule import NoiseSchedule
from smlm_tfdiff.models.psi import PsiConfig, build_psi
from smlm_tfdiff.pretrained import save_models
from smlm_tfdiff.experimental.reverse_variance import (INITIAL_K, VarianceLoss, build_variance_net,
                                          x0_variance_term)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Without self-attention (tested in test_psi_model.py), which costs a third of a training run.
SMALL = PsiConfig(base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(),
                  embedding_dim=16)
# One level: the trainer test needs only a psi for psi_var to start from (the experimental
# trainer's code path end to end; the shared Trainer on 2 replicas is tested in test_training.py
# and test_psi_training.py).
TINY = PsiConfig(base_channels=8, channel_multipliers=(1,), attention_resolutions=(),
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


@pytest.mark.parametrize("g_t, g_s, eta", [(0.8, 1.0, 0.0), (0.6, 0.7, 0.0), (0.6, 0.7, 1.0),
                                           (0.3, 0.9, 0.5)])
def test_x0_variance_term_completes_the_marginal_variance(g_t, g_s, eta):
    """A known answer: for data z_0 ~ N(0, s0^2) and the exact denoiser, a step of the DDIM
    family from g_t to g_s (noise variance var = eta^2 (1 - g_s) / (1 - g_t) (1 - g_t / g_s))
    must keep the forward marginal, Var(z_s) = g_s s0^2 + 1 - g_s. The step's mean (the DDIM
    update of the posterior mean E[z_0 | z_t]) carries a^2 Var(z_t) of it and its noise var; the
    rest is the x0 term with the exact k = Var(z_0 | z_t) / (1 - g_t)."""
    s0 = 0.7
    var_t = g_t * s0 ** 2 + 1 - g_t
    b = np.sqrt(g_t) * s0 ** 2 / var_t  # E[z_0 | z_t] = b z_t.
    var = min(eta ** 2 * (1 - g_s) / (1 - g_t) * (1 - g_t / g_s), 1 - g_s)
    # z_s = sqrt(g_s) x0 + sqrt(1 - g_s - var) (z_t - sqrt(g_t) x0) / sqrt(1 - g_t) + sqrt(var) n.
    a = np.sqrt(g_s) * b + np.sqrt(1 - g_s - var) * (1 - np.sqrt(g_t) * b) / np.sqrt(1 - g_t)
    missing = g_s * s0 ** 2 + 1 - g_s - a * a * var_t - var
    k = (s0 ** 2 * (1 - g_t) / var_t) / (1 - g_t)
    log_k = tf.fill([1, 2, 2, 1], np.float32(np.log(k)))
    got = x0_variance_term(log_k, np.float32(g_t), np.float32(g_s), np.float32(var)).numpy()
    assert missing > 1e-3  # Not a vanishing term.
    np.testing.assert_allclose(got, missing, rtol=1e-4)


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
    # The library's loss with the net's output set to a constant log k: the NLL is minimised at
    # k = E[r^2 / g], where it is 1 + log k.
    best = float(target.mean())
    kernel, bias = net.get_layer("eps").get_weights()
    nll = {}
    for factor in (0.5, 1.0, 2.0):
        net.get_layer("eps").set_weights([np.zeros_like(kernel),
                                          np.full_like(bias, np.log(factor * best))])
        nll[factor] = float(np.mean(VarianceLoss(phi, psi)(net, batch, False).numpy()))
    assert nll[1.0] == pytest.approx(1 + np.log(best), rel=1e-4)
    assert nll[1.0] < min(nll[0.5], nll[2.0])


@pytest.mark.slow
def test_train_psi_variance_resumes_and_the_sampler_uses_it(tmp_path, cli, scalars,
                                                          paper_models):
    src = str(tmp_path / "psi")
    base = paper_models
    recipe = Recipe(NoiseSchedule.named("paper"), "snr", t_start=10, num_steps=2)
    save_models(src, base, psi=build_psi(TINY), psi_config=TINY, recipe=recipe)
    out = str(tmp_path / "var")

    def train(steps, *extra, ok=True):
        res = cli(os.path.join(ROOT, "trainers", "train_psi_variance.py"), f"--out_dir={out}",
                  f"--psi={src}", f"--steps={steps}", "--batch_size=8", "--num_replicas=0",
                  "--log_every=2", "--eval_every=2", "--checkpoint_every=2", "--val_frames=16",
                  "--warmup_steps=1", "--noprogress", *extra)
        assert (res.returncode == 0) == ok, res.stderr[-3000:]
        return res.stderr

    log = train(2)
    assert "on 1 replica(s)" in log
    for lo, hi in ((1, 5), (51, 100)):
        for key in ("nll", "k_ratio", "k_r"):
            assert [s for s, _ in scalars(os.path.join(out, "val"), f"{key}_t{lo}-{hi}")] == [2]
    # A run in progress (no psi_var.weights.h5 yet) loads the EMA weights of its checkpoint.
    final = st.load_models(out).x0_variance.net.get_weights()
    os.remove(os.path.join(out, "psi_var.weights.h5"))
    for a, b in zip(st.load_models(out).x0_variance.net.get_weights(), final):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    log = train(3)
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
