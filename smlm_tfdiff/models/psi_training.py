"""Training pieces for psi: data, loss, validation hook. Used by trainers/train_psi.py.

Pairs (y, y_hat = phi(x)) are made on the fly: the simulator gives (x, y), the frozen phi maps x to
y_hat inside the training step. The noise level and the noise are drawn in the tf.data pipeline from
stateless seeds, so a batch is the same whichever replica takes it.

Crops (crop_size): psi learns p(y | y_hat) on a window of a larger frame, as analyze samples the
windows of a whole-field model: phi sees the whole frame (its estimate near a window's edge has the
context beyond it), then psi's input y_hat and its target KDE are cut to a window of crop_size
camera pixels at a random whole-pixel offset per example (`crop_offsets`). psi is fully
convolutional, so it runs on windows of any size at inference.
"""

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.diffusion.schedule import (BUCKETS, T_MIN, buckets_for, diffusion_loss_weights,  # noqa: F401
                                   per_example_loss, q_sample, sample_training_noise_level,
                                   to_diffusion_space)
from smlm_tfdiff.models.phi import BRIGHTNESS_JITTER, normalize_brightness
from smlm_tfdiff.models.psi import PREDICTIONS
from smlm_tfdiff.simulation.simulate import make_dataset, simulate


def crop_offsets(sim_config, crop_size, batch_size, seed):
    """Window corners of a batch of crops: int32 [B, 2] (row, column), camera pixels, uniform over
    every whole-pixel position of a crop_size x crop_size window inside the frame."""
    h, w = sim_config.lr_shape
    return tf.stack([tf.random.stateless_uniform([batch_size], seeds_lib.fold_in(seed, axis),
                                                 0, size - crop_size + 1, tf.int32)
                     for axis, size in enumerate((h, w))], axis=1)


def cut_windows(images, offsets, crop_size, upsample):
    """HR images [B, uH, uW, C] -> their windows [B, u crop, u crop, C] at offsets [B, 2] (camera
    pixels, crop_offsets)."""
    size = upsample * crop_size
    rows = offsets[:, :1] * upsample + tf.range(size)[None]  # [B, size]
    cols = offsets[:, 1:] * upsample + tf.range(size)[None]
    return tf.gather(tf.gather(images, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def check_crop_size(sim_config, crop_size, psi_stride=8):
    """A crop_size (camera pixels) that fits the frame and whose HR window psi's U-Net can halve
    down to its lowest level (psi_stride: PsiConfig.downsample_factor)."""
    h, w = sim_config.lr_shape
    if not 1 <= crop_size <= min(h, w):
        raise ValueError(f"crop_size {crop_size} px must be between 1 and the frame's smaller "
                         f"side ({h}x{w} px): train on smaller windows or larger frames")
    if (crop_size * sim_config.upsample) % psi_stride:
        raise ValueError(f"crop_size {crop_size} px makes {crop_size * sim_config.upsample} HR px "
                         f"windows, not divisible by psi's stride {psi_stride}: pick a multiple "
                         f"of {psi_stride // np.gcd(psi_stride, sim_config.upsample)} px")


def psi_dataset(sim_config, schedule, weighting, batch_size, seed, start_step, mix_config=None,
                mix_fraction=0.0, crop_size=None, psi_stride=8, brightness_reference=None):
    """Infinite batches {frames, kde, t, gamma, eps} (and with crop_size, `offsets` [B, 2]); a run
    resumed at start_step draws fresh data.

    brightness_reference: that of a brightness-normalised phi (PhiConfig); the batches then hold
    `phi_frames` too, the frames scaled as phi reads them (reference / N0, N0 the frame's
    typical photons times exp(BRIGHTNESS_JITTER z), as phi_training.phi_dataset).

    mix_config, mix_fraction: a second scene (same camera and frame size, e.g. the isolated
    preset) that fills round(mix_fraction * batch_size) frames of every batch, so psi also learns
    the narrow posteriors of sparse frames; the rest comes from sim_config.
    crop_size: psi trains on windows of this many camera pixels (module docstring); eps has the
    window's HR size, frames and kde stay whole (PsiLoss cuts them after phi)."""
    sim_seed, noise_seed = seeds_lib.split(seeds_lib.fold_in(seed, start_step))
    hr = sim_config.hr_shape
    if crop_size is not None:
        check_crop_size(sim_config, crop_size, psi_stride)
        hr = (crop_size * sim_config.upsample,) * 2
    num_mix = int(round(mix_fraction * batch_size)) if mix_config is not None else 0
    if not 0.0 <= mix_fraction <= 1.0:
        raise ValueError(f"mix_fraction must be in [0, 1] (got {mix_fraction})")
    if num_mix:
        if tuple(mix_config.hr_shape) != tuple(hr) or mix_config.lr_shape != sim_config.lr_shape:
            raise ValueError(f"the mixed-in scene has frames {mix_config.lr_shape} and KDEs "
                             f"{mix_config.hr_shape}, the main one {sim_config.lr_shape} and {hr}: "
                             "mix scenes of the same frame size and upsampling only")
    parts = []
    if batch_size - num_mix:
        parts.append(make_dataset(sim_config, batch_size - num_mix, sim_seed, prefetch=0))
    if num_mix:
        parts.append(make_dataset(mix_config, num_mix, seeds_lib.fold_in(sim_seed, 1), prefetch=0))
    ds = tf.data.Dataset.zip(tuple(parts))
    t_min = T_MIN[weighting]

    def add_noise(i, batches):
        level_seed, eps_seed = seeds_lib.split(seeds_lib.fold_in(noise_seed, i))
        t, gamma = sample_training_noise_level(schedule, batch_size, level_seed, t_min)
        eps = tf.random.stateless_normal([batch_size, hr[0], hr[1], 1], eps_seed)
        frames = tf.concat([b["frames"] for b in batches], 0)
        kde = tf.concat([b["kde"] for b in batches], 0)
        batch = {"frames": frames, "kde": kde, "t": t, "gamma": gamma, "eps": eps}
        if brightness_reference is not None:
            n0 = tf.concat([b["frame_photons"] for b in batches], 0)
            n0 = n0 * tf.exp(BRIGHTNESS_JITTER * tf.random.stateless_normal(
                [batch_size], seeds_lib.fold_in(eps_seed, 2)))
            batch["phi_frames"] = normalize_brightness(frames, float(sim_config.offset),
                                                       brightness_reference, n0)
        if crop_size is not None:
            batch["offsets"] = crop_offsets(sim_config, crop_size, batch_size,
                                            seeds_lib.fold_in(eps_seed, 1))
        return batch

    return ds.enumerate().map(add_noise).prefetch(tf.data.AUTOTUNE)


class PsiLoss:
    """Per-example noise-estimation loss of psi given the frozen phi -> [B].

    weighting "snr": the seeds' eq. 8 weight (normalised to mean 1 over t = 2..T; t = 1 never
    drawn), "simple": uniform (diffusion.diffusion_loss_weights).
    prediction: PsiConfig.prediction; an experimental v prediction scores v instead of eps
    (experimental/prediction.py, loss_weights).
    crop_size, upsample: batches with `offsets` (psi_dataset's crop_size) are cut to those windows
    after phi has seen the whole frames.
    frame_condition: psi's PsiConfig.frame_condition; psi then gets the frames (their windows)
    too."""

    def __init__(self, phi, schedule, weighting, prediction="eps", crop_size=None, upsample=None,
                 frame_condition=False):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (got {prediction!r})")
        if (crop_size is None) != (upsample is None):
            raise ValueError("give crop_size and upsample together (or neither)")
        self.phi, self.schedule, self.weighting = phi, schedule, weighting
        self.prediction = prediction
        self.crop_size, self.upsample = crop_size, upsample
        self.frame_condition = bool(frame_condition)

    def __call__(self, model, batch, training):
        frames = batch["frames"]
        # A brightness-normalised phi reads the frames scaled (psi_dataset's phi_frames).
        y_hat = tf.stop_gradient(self.phi(batch.get("phi_frames", frames), training=False))
        kde = batch["kde"]
        if self.crop_size is not None:
            y_hat = cut_windows(y_hat, batch["offsets"], self.crop_size, self.upsample)
            kde = cut_windows(kde, batch["offsets"], self.crop_size, self.upsample)
            frames = cut_windows(frames, batch["offsets"], self.crop_size, 1)
        gamma = batch["gamma"]
        y_t = q_sample(to_diffusion_space(kde), gamma, batch["eps"])
        inputs = {"y_t": y_t, "y_hat": y_hat, "noise_level": tf.sqrt(gamma)}
        if self.frame_condition:
            inputs["frame"] = frames
        eps_pred = model(inputs, training=training)
        weights = diffusion_loss_weights(self.schedule, batch["t"], self.weighting)
        if self.prediction != "eps":
            from smlm_tfdiff.experimental.prediction import loss_weights
            weights = loss_weights(weights, gamma)
        return per_example_loss(batch["eps"], eps_pred, weights)


class PsiValidation:
    """Fixed seeded validation frames; per-bucket noise-estimation MSE and posterior images.

    Scalars: mse_t{lo}-{hi} (unweighted eps MSE, noise fixed by the seed), kde_mse_phi and
    kde_mse_posterior_mean (against the true KDE, on the sampled frames), posterior_std_mean.

    recipe: the run's diffusion.Recipe (schedule, and the sampler's t_start, num_steps, method).
    psi_config: the PsiConfig of the trained psi (None: a psi that sees y_hat only).
    """

    def __init__(self, sim_config, phi, recipe, num_frames, seed, num_sample_frames=8,
                 num_samples=16, psi_config=None, brightness_reference=None):
        self.psi_config = psi_config
        schedule = recipe.schedule
        self.config, self.phi, self.recipe, self.schedule = sim_config, phi, recipe, schedule
        self.data = simulate(sim_config, num_frames, seed)
        phi_frames = self.data["frames"]
        if brightness_reference is not None:  # The frames' true N0 (training adds jitter).
            phi_frames = normalize_brightness(phi_frames, float(sim_config.offset),
                                              brightness_reference,
                                              self.data["frame_photons"]).astype(np.float32)
        self.y_hat = np.concatenate([phi(phi_frames[i:i + 256], training=False).numpy()
                                     for i in range(0, num_frames, 256)])
        rng = np.random.default_rng(seed)
        self.t = 1 + (np.arange(num_frames) * schedule.T) // num_frames  # Every bucket covered.
        self.gamma = schedule.gamma_between(self.t, rng.uniform(size=num_frames)).astype(np.float32)
        self.eps = rng.standard_normal(self.data["kde"].shape).astype(np.float32)
        self.num_sample_frames, self.num_samples = num_sample_frames, num_samples

    def __call__(self, trainer, step):
        from smlm_tfdiff.diffusion.sampler import PosteriorSampler
        from smlm_tfdiff.pretrained import Pretrained
        model = trainer.model
        y_t = q_sample(to_diffusion_space(self.data["kde"]), self.gamma, self.eps).numpy()
        frame_condition = self.psi_config is not None and self.psi_config.frame_condition

        def inputs(i):
            x = {"y_t": tf.constant(y_t[i:i + 128]), "y_hat": tf.constant(self.y_hat[i:i + 128]),
                 "noise_level": tf.constant(np.sqrt(self.gamma[i:i + 128]))}
            if frame_condition:
                x["frame"] = tf.constant(self.data["frames"][i:i + 128])
            return x

        eps_pred = np.concatenate([model(inputs(i), training=False).numpy()
                                   for i in range(0, len(self.t), 128)])
        sq = np.mean((eps_pred - self.eps) ** 2, axis=(1, 2, 3))
        metrics = {}
        for lo, hi in buckets_for(self.schedule):
            sel = (self.t >= lo) & (self.t <= min(hi, self.schedule.T))
            if sel.any():
                metrics[f"mse_t{lo}-{hi}"] = float(sq[sel].mean())
        n = self.num_sample_frames
        models = Pretrained(phi=self.phi, psi=model, config=self.config, recipe=self.recipe,
                            psi_config=self.psi_config)
        post = PosteriorSampler(models, jit_compile=False)(
            self.data["frames"][:n], self.num_samples, seed=step, return_samples=True,
            y_hat=self.y_hat[:n])
        truth = self.data["kde"][:n]
        metrics["kde_mse_phi"] = float(np.mean((self.y_hat[:n] - truth) ** 2))
        metrics["kde_mse_posterior_mean"] = float(np.mean((post["mean"] - truth) ** 2))
        metrics["posterior_std_mean"] = float(post["std"].mean())
        k = min(n, 4)
        top = max(float(truth[:k].max()), 1e-6)
        with trainer.val_writer.as_default(step=step):
            tf.summary.image("kde_target", np.clip(truth[:k] / top, 0, 1), step, k)
            tf.summary.image("y_hat", np.clip(self.y_hat[:k] / top, 0, 1), step, k)
            tf.summary.image("posterior_sample", np.clip(post["samples"][:k, 0] / top, 0, 1), step, k)
            tf.summary.image("posterior_mean", np.clip(post["mean"][:k] / top, 0, 1), step, k)
            smax = max(float(post["std"][:k].max()), 1e-6)
            tf.summary.image("posterior_std", post["std"][:k] / smax, step, k)
        return metrics

