"""Training pieces for psi: data, loss, validation hook. Used by trainers/train_psi.py.

Pairs (y, y_hat = phi(x)) are made on the fly: the simulator gives (x, y), the frozen phi maps x to
y_hat inside the training step. The noise level and the noise are drawn in the tf.data pipeline from
stateless seeds, so a batch is the same whichever replica takes it.
"""

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.diffusion.schedule import (BUCKETS, T_MIN, buckets_for, diffusion_loss_weights,  # noqa: F401
                                   per_example_loss, q_sample, sample_training_noise_level,
                                   to_diffusion_space)
from smlm_tfdiff.models.psi import PREDICTIONS
from smlm_tfdiff.simulation.simulate import make_dataset, simulate


def psi_dataset(sim_config, schedule, weighting, batch_size, seed, start_step, mix_config=None,
                mix_fraction=0.0):
    """Infinite batches {frames, kde, t, gamma, eps}; a run resumed at start_step draws fresh data.

    mix_config, mix_fraction: a second scene (same camera and frame size, e.g. the isolated
    preset) that fills round(mix_fraction * batch_size) frames of every batch, so psi also learns
    the narrow posteriors of sparse frames; the rest comes from sim_config."""
    sim_seed, noise_seed = seeds_lib.split(seeds_lib.fold_in(seed, start_step))
    hr = sim_config.hr_shape
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
        return {"frames": frames, "kde": kde, "t": t, "gamma": gamma, "eps": eps}

    return ds.enumerate().map(add_noise).prefetch(tf.data.AUTOTUNE)


class PsiLoss:
    """Per-example noise-estimation loss of psi given the frozen phi -> [B].

    weighting "snr": the seeds' eq. 8 weight (normalised to mean 1 over t = 2..T; t = 1 never
    drawn), "simple": uniform (diffusion.diffusion_loss_weights).
    prediction: PsiConfig.prediction; an experimental v prediction scores v instead of eps
    (experimental/prediction.py, loss_weights)."""

    def __init__(self, phi, schedule, weighting, prediction="eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (got {prediction!r})")
        self.phi, self.schedule, self.weighting = phi, schedule, weighting
        self.prediction = prediction

    def __call__(self, model, batch, training):
        y_hat = tf.stop_gradient(self.phi(batch["frames"], training=False))
        gamma = batch["gamma"]
        y_t = q_sample(to_diffusion_space(batch["kde"]), gamma, batch["eps"])
        eps_pred = model({"y_t": y_t, "y_hat": y_hat, "noise_level": tf.sqrt(gamma)},
                         training=training)
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
    """

    def __init__(self, sim_config, phi, recipe, num_frames, seed, num_sample_frames=8,
                 num_samples=16):
        schedule = recipe.schedule
        self.config, self.phi, self.recipe, self.schedule = sim_config, phi, recipe, schedule
        self.data = simulate(sim_config, num_frames, seed)
        self.y_hat = np.concatenate([phi(self.data["frames"][i:i + 256], training=False).numpy()
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
        eps_pred = np.concatenate([
            model({"y_t": tf.constant(y_t[i:i + 128]), "y_hat": tf.constant(self.y_hat[i:i + 128]),
                   "noise_level": tf.constant(np.sqrt(self.gamma[i:i + 128]))},
                  training=False).numpy()
            for i in range(0, len(self.t), 128)])
        sq = np.mean((eps_pred - self.eps) ** 2, axis=(1, 2, 3))
        metrics = {}
        for lo, hi in buckets_for(self.schedule):
            sel = (self.t >= lo) & (self.t <= min(hi, self.schedule.T))
            if sel.any():
                metrics[f"mse_t{lo}-{hi}"] = float(sq[sel].mean())
        n = self.num_sample_frames
        models = Pretrained(phi=self.phi, psi=model, config=self.config, recipe=self.recipe)
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

