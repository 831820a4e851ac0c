"""psi training: the data and loss pieces, and train_psi.py end to end on 2 logical CPUs."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.diffusion.schedule import NoiseSchedule, loss_weight_table, to_diffusion_space
from smlm_tfdiff.models.psi import PsiConfig, build_psi
from smlm_tfdiff.models.psi_training import BUCKETS, PsiLoss, psi_dataset
from smlm_tfdiff.diffusion.sampler import PosteriorSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small psi without self-attention (attention at 40 x 40 costs a third of every training run on
# 2 cores; its blocks are tested in test_psi_model.py).
SMALL = ["--base_channels=8", "--channel_multipliers=1,2", "--attention_resolutions=",
         "--embedding_dim=16"]
SMALL_PSI = PsiConfig(base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(),
                      embedding_dim=16)


def test_dataset_is_seeded_and_draws_t_from_2_for_snr(paper):
    schedule = NoiseSchedule.named("paper")
    a = next(iter(psi_dataset(paper, schedule, "snr", 64, seed=3, start_step=0)))
    b = next(iter(psi_dataset(paper, schedule, "snr", 64, seed=3, start_step=0)))
    c = next(iter(psi_dataset(paper, schedule, "snr", 64, seed=3, start_step=5)))
    for key in ("frames", "kde", "t", "gamma", "eps"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(a["eps"].numpy(), c["eps"].numpy())
    t, gamma = a["t"].numpy(), a["gamma"].numpy()
    assert t.min() >= 2 and t.max() <= 100
    # gamma lies between the levels of its bin: gamma_t <= gamma <= gamma_{t-1}.
    assert np.all(gamma >= schedule.gamma[t] - 1e-6) and np.all(gamma <= schedule.gamma[t - 1] + 1e-6)
    assert a["eps"].shape == (64, 80, 80, 1)
    simple = next(iter(psi_dataset(paper, schedule, "simple", 512, seed=3, start_step=0)))
    assert simple["t"].numpy().min() == 1


def test_loss_is_weighted_noise_mse_given_phi(paper, paper_models):
    schedule = NoiseSchedule.named("paper")
    batch = next(iter(psi_dataset(paper, schedule, "snr", 4, seed=0, start_step=0)))
    phi = paper_models.phi
    seen = {}

    def psi(inputs, training):
        seen.update(inputs)
        return tf.zeros_like(inputs["y_t"])

    loss = PsiLoss(phi, schedule, "snr")(psi, batch, True).numpy()
    eps, gamma = batch["eps"].numpy(), batch["gamma"].numpy()
    weights = loss_weight_table(schedule, "snr")[batch["t"].numpy()]
    np.testing.assert_allclose(loss, weights * np.mean(eps ** 2, axis=(1, 2, 3)), rtol=1e-5)
    y_hat = phi(batch["frames"], training=False).numpy()
    np.testing.assert_allclose(seen["y_hat"].numpy(), y_hat, atol=1e-6)
    g = gamma[:, None, None, None]
    z_0 = to_diffusion_space(batch["kde"].numpy())
    expected = np.sqrt(g) * z_0 + np.sqrt(1 - g) * eps
    np.testing.assert_allclose(seen["y_t"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(seen["noise_level"].numpy(), np.sqrt(gamma), rtol=1e-6)
    # v-prediction, through a real v-psi whose network outputs the constant v_psi = 0.3: the loss
    # is w(t) ||v - v_psi||^2 with v = sqrt(g) eps - sqrt(1 - g) z_0 ("v") or
    # sqrt(g) eps - sqrt(1 - g) (z_0 - mu), mu = 2 y_hat - 1 ("v_residual").
    mu = 2.0 * y_hat - 1.0
    for prediction, target in (("v", z_0), ("v_residual", z_0 - mu)):
        v_psi = build_psi(dataclasses.replace(SMALL_PSI, prediction=prediction))
        kernel, bias = v_psi.get_layer("eps").get_weights()
        v_psi.get_layer("eps").set_weights([np.zeros_like(kernel), np.full_like(bias, 0.3)])
        v_loss = PsiLoss(phi, schedule, "snr", prediction)(v_psi, batch, False).numpy()
        v = np.sqrt(g) * eps - np.sqrt(1 - g) * target
        np.testing.assert_allclose(v_loss, weights * np.mean((v - 0.3) ** 2, axis=(1, 2, 3)),
                                   rtol=1e-4, err_msg=prediction)
    with pytest.raises(ValueError, match="prediction"):
        PsiLoss(phi, schedule, "snr", "x0")


def _train(cli, out_dir, steps, *extra, ok=True):
    res = cli(os.path.join(ROOT, "trainers", "train_psi.py"), f"--out_dir={out_dir}",
              f"--steps={steps}", "--batch_size=8", "--num_replicas=0", "--log_every=2",
              "--eval_every=4", "--checkpoint_every=2", "--val_frames=16", "--learning_rate=2e-3",
              "--warmup_steps=2", "--sample_t_start=10", "--sample_steps=2", "--noprogress",
              *SMALL, *extra)
    assert (res.returncode == 0) == ok, res.stderr[-3000:]
    return res.stderr


@pytest.mark.slow
def test_train_psi_tensorboard_load_and_fine_tune(tmp_path, cli, scalars):
    """train_psi.py, then a fine-tuning run from it, on one replica: a psi step traced for 2
    replicas costs twice as much, and the shared Trainer on 2 replicas (resume included) is
    tested in test_training.py and test_multiworker.py, resuming with the EMA in
    test_training.py."""
    out = str(tmp_path / "psi")
    log = _train(cli, out, 4)
    assert "Training psi on 1 replica(s)" in log
    assert [s for s, _ in scalars(os.path.join(out, "train"), "loss")] == [2, 4]
    for lo, hi in BUCKETS:
        assert [s for s, _ in scalars(os.path.join(out, "val"), f"mse_t{lo}-{hi}")] == [4]
    assert scalars(os.path.join(out, "val"), "kde_mse_posterior_mean")
    models = st.load_models(out)
    assert models.psi is not None and models.schedule.name == "paper" and models.t_start == 10
    assert models.weighting == "snr" and models.psi_config.channel_multipliers == (1, 2)
    frames = st.simulate(models.config, 2, seed=1)["frames"]
    post = PosteriorSampler(models, jit_compile=False)(frames, 3, 2, seed=0, method="ddim")
    assert post["mean"].shape == post["std"].shape == (2, 80, 80, 1)
    assert np.all(np.isfinite(post["mean"]))
    # Fine-tuning (one replica): starts from the run's psi (one step at a negligible rate leaves
    # it in place) on a mixture with isolated-emitter frames, now conditioned on the frame too:
    # the frame's new input channel starts at zero, so it samples as the run's psi does.
    tuned = str(tmp_path / "tuned")
    _train(cli, tuned, 1, f"--init_psi={out}", "--mix_preset=isolated", "--learning_rate=1e-9",
           "--warmup_steps=0", "--weighting=simple", "--eval_every=1", "--frame_condition")
    info = json.load(open(os.path.join(tuned, "run_config.json")))
    assert info["init_psi"] == out and info["mix_preset"] == "isolated"
    tuned_models = st.load_models(tuned)
    assert tuned_models.psi_config.frame_condition
    assert tuned_models.psi_config.frame_offset == models.config.offset
    for layer in models.psi.layers:
        for a, b in zip(tuned_models.psi.get_layer(layer.name).get_weights(),
                        layer.get_weights()):
            if layer.name == "conv_in" and a.ndim == 4:
                np.testing.assert_allclose(a[:, :, 2], 0.0, atol=1e-5)
                a = a[:, :, :2]
            np.testing.assert_allclose(a, b, atol=1e-5)
    # (That the zero channel leaves psi's output unchanged is test_psi_model.py's.)
    with pytest.raises(ValueError, match="give the frames"):
        PosteriorSampler(tuned_models)(None, 3, 2, y_hat=post["y_hat"])
    log = _train(cli, str(tmp_path / "bad"), 1, f"--init_psi={out}", "--base_channels=16",
                 ok=False)
    assert "--init_psi" in log and "psi flags" in log


def test_dataset_mixes_in_a_second_scene(paper):
    schedule = NoiseSchedule.named("paper")
    isolated = paper.replace(num_emitters=1)
    batch = next(iter(psi_dataset(paper, schedule, "simple", 8, seed=3, start_step=0,
                                  mix_config=isolated, mix_fraction=0.25)))
    assert batch["frames"].shape == (8, 20, 20, 1) and batch["eps"].shape == (8, 80, 80, 1)
    # One emitter's KDE has the mass of a unit-peak Gaussian (2 pi s^2); ten have ten times it.
    mass = batch["kde"].numpy().sum(axis=(1, 2, 3)) / (2 * np.pi * paper.kde_sigma ** 2)
    np.testing.assert_allclose(mass[6:], 1.0, atol=0.05)
    assert np.all(mass[:6] > 8.5)
    with pytest.raises(ValueError, match="same frame size"):
        psi_dataset(paper, schedule, "simple", 8, 3, 0, paper.replace(frame_width=24), 0.25)
    with pytest.raises(ValueError, match="mix_fraction"):
        psi_dataset(paper, schedule, "simple", 8, 3, 0, isolated, 1.5)


def test_crops_cut_phi_and_the_kde_at_the_drawn_windows(paper, paper_models):
    """psi trains on windows of frames phi saw whole: the loss's y_hat and KDE are the windows
    of phi(frame) and of the KDE at each example's own offset, and the offsets cover the frame."""
    schedule = NoiseSchedule.named("paper")
    crop = 12
    batch = next(iter(psi_dataset(paper, schedule, "snr", 64, seed=3, start_step=0,
                                  crop_size=crop)))
    assert batch["frames"].shape == (64, 20, 20, 1) and batch["eps"].shape == (64, 48, 48, 1)
    offsets = batch["offsets"].numpy()
    assert offsets.min() == 0 and offsets.max() == 20 - crop  # 9 positions, 64 draws per axis.
    assert len({tuple(o) for o in offsets}) > 32  # Per example, not one window per batch.
    seen = {}

    def psi(inputs, training):
        seen.update(inputs)
        return tf.zeros_like(inputs["y_t"])

    PsiLoss(paper_models.phi, schedule, "snr", crop_size=crop, upsample=4)(psi, batch, True)
    y_hat = paper_models.phi(batch["frames"], training=False).numpy()
    kde, eps, gamma = batch["kde"].numpy(), batch["eps"].numpy(), batch["gamma"].numpy()
    for i in (0, 17, 63):
        r, c = 4 * offsets[i]
        np.testing.assert_allclose(seen["y_hat"][i].numpy(), y_hat[i, r:r + 48, c:c + 48],
                                   atol=1e-6)
        g = gamma[i]
        z_0 = to_diffusion_space(kde[i, r:r + 48, c:c + 48])
        np.testing.assert_allclose(seen["y_t"][i].numpy(),
                                   np.sqrt(g) * z_0 + np.sqrt(1 - g) * eps[i], atol=1e-5)
    assert "frame" not in seen
    # A frame-conditioned psi gets the same window of the frame (camera pixels).
    PsiLoss(paper_models.phi, schedule, "snr", crop_size=crop, upsample=4,
            frame_condition=True)(psi, batch, True)
    frames = batch["frames"].numpy()
    for i in (0, 17, 63):
        r, c = offsets[i]
        np.testing.assert_array_equal(seen["frame"][i].numpy(), frames[i, r:r + crop, c:c + crop])
    with pytest.raises(ValueError, match="stride 8"):
        psi_dataset(paper, schedule, "snr", 8, 3, 0, crop_size=11)
    with pytest.raises(ValueError, match="smaller side"):
        psi_dataset(paper, schedule, "snr", 8, 3, 0, crop_size=22)


@pytest.mark.slow
def test_train_psi_on_a_coarser_grid_in_windows(tmp_path, cli):
    """--space_to_depth 4 with --crop_size: the run trains, its psi loads with the setting and
    samples windows whose sides divide by its stride (4 x 2 HR px), and a crop it cannot take is
    refused with the size to pick."""
    out = str(tmp_path / "coarse")
    _train(cli, out, 2, "--space_to_depth=4", "--crop_size=10", "--eval_every=2")
    models = st.load_models(out)
    assert models.psi_config.space_to_depth == 4 and models.psi_config.downsample_factor == 8
    y_hat = np.zeros((1, 24, 40, 1), np.float32)
    post = PosteriorSampler(models, jit_compile=False)(None, 2, 2, seed=0, y_hat=y_hat,
                                                       return_samples=True)
    assert post["samples"].shape == (1, 2, 24, 40, 1)
    log = _train(cli, str(tmp_path / "bad"), 1, "--space_to_depth=4", "--crop_size=9", ok=False)
    assert "not divisible by psi's stride 8" in log
