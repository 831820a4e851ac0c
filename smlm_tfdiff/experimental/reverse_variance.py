"""The reverse step's missing variance: a learned per-pixel Var(z_0 | z_t) for psi's sampler.

A reverse step z_t -> z_s draws from q(z_s | z_t, z0_hat) with z0_hat psi's point estimate of z_0,
so its variance (the eta term, sampler.py) leaves out how unsure z0_hat itself is. The exact step
p(z_s | z_t) = E_{z_0 | z_t} q(z_s | z_t, z_0) has the mean of the sampler's step and, per pixel,
the variance

    sigma^2 + c^2 Var(z_0 | z_t),   c = sqrt(g_s) - sqrt(1 - g_s - sigma^2) sqrt(g_t / (1 - g_t))

(Analytic-DPM, Bao et al. 2022; per pixel as in their NPR-DPM). Left out, a chain of a few strided
steps is too narrow even with an exact denoiser (tests/test_sampler.py: 10 ancestral steps give
0.7 of a Gaussian posterior's std on the cosine schedule).

psi_var is a second network, psi's U-Net (same PsiConfig, started from psi's weights), whose output
is log k per pixel with

    Var(z_0 | z_t) = (1 - g) k,   k = E[(eps - eps_psi)^2 | z_t, y_hat] / g,

trained on the frozen psi's own residuals r = eps - eps_psi with the Gaussian negative
log-likelihood (r^2 / g) / k + log k, minimised by the k above (trainers/train_psi_variance.py). It
includes psi's own error (the "imperfect mean" of NPR-DPM), which a sample's spread must add. k is
the scale that stays of one order over the whole schedule: near the data (g -> 1) it is the eps
residual, near noise (g -> 0) Var(z_0 | y_hat, noise) itself, while E[r^2] there falls like g
(psi_var trained to output log E[r^2] failed at t > 110 of the extended schedule: 1e-7 targets).

The sampler sees psi_var only as its `x0_variance` hook (diffusion.sampler.X0Variance), through
`LearnedX0Variance`, the `x0_variance` field of the models that pretrained.load_models reads from
a folder with psi_var.weights.h5. Measured, it did not calibrate the bundled psi (docs/calibration.md,
Calibration), so no bundled model has one.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from smlm_tfdiff.diffusion.schedule import q_sample, to_diffusion_space

# Starting value of k: about psi's mean squared eps error over the paper schedule.
INITIAL_K = 0.01


def build_variance_net(psi_config, psi=None, name="psi_var"):
    """psi's U-Net with output log k [B, H, W, 1] (same inputs as psi; module docstring). With
    `psi`, its weights are copied in (the features that predict eps also locate where it is
    uncertain) and the output conv is reset to log k = log(INITIAL_K) everywhere."""
    from smlm_tfdiff.models.psi import build_psi
    net = build_psi(dataclasses.replace(psi_config, prediction="eps"), name=name)
    if psi is not None:
        net.set_weights(psi.get_weights())
        out = net.get_layer("eps")
        kernel, bias = out.get_weights()
        out.set_weights([np.zeros_like(kernel), np.full_like(bias, np.log(INITIAL_K))])
    return net


def x0_variance_term(log_k, g_t, g_s, var):
    """The step variance the eta step leaves out, c^2 Var(z_0 | z_t) [N, H, W, 1] (module doc).
    log_k: psi_var's output at level g_t; g_t < g_s: levels of the step; var: the eta step's
    sigma^2."""
    c = tf.sqrt(g_s) - tf.sqrt(tf.maximum(1.0 - g_s - var, 0.0)) * tf.sqrt(g_t / (1.0 - g_t))
    return tf.square(c) * (1.0 - g_t) * tf.exp(log_k)


class LearnedX0Variance(tf.Module):
    """The sampler's x0_variance hook for a psi_var network `net`: (psi's inputs, g_t, g_s,
    sigma^2) -> c^2 Var(z_0 | z_t) [N, H, W, 1] (x0_variance_term). A tf.Module, so that an export
    (serving.py) tracks the network's variables."""

    def __init__(self, net, name="x0_variance"):
        super().__init__(name=name)
        self.net = net

    @classmethod
    def build(cls, psi_config, psi=None):
        """An untrained one (build_variance_net), for loading weights or training from psi."""
        return cls(build_variance_net(psi_config, psi))

    def __call__(self, inputs, g_t, g_s, var):
        return x0_variance_term(self.net(inputs, training=False), g_t, g_s, var)


class VarianceLoss:
    """Per-example Gaussian NLL of psi's residual, mean over pixels of (r^2 / g) / k + log k -> [B]
    (r = eps - eps_psi with the frozen phi and psi; batches of psi_training.psi_dataset)."""

    def __init__(self, phi, psi):
        self.phi, self.psi = phi, psi

    def residual(self, batch):
        """(psi's inputs, the target r^2 / g [B, H, W, 1])."""
        y_hat = self.phi(batch["frames"], training=False)
        gamma = batch["gamma"]
        inputs = {"y_t": q_sample(to_diffusion_space(batch["kde"]), gamma, batch["eps"]),
                  "y_hat": y_hat, "noise_level": tf.sqrt(gamma)}
        r2 = tf.square(batch["eps"] - self.psi(inputs, training=False))
        return inputs, tf.stop_gradient(r2 / tf.reshape(gamma, [-1, 1, 1, 1]))

    def __call__(self, model, batch, training):
        inputs, target = self.residual(batch)
        log_k = model(inputs, training=training)
        return tf.reduce_mean(target * tf.exp(-log_k) + log_k, axis=[1, 2, 3])


class VarianceValidation:
    """Fixed seeded validation frames and noise (as psi_training.PsiValidation draws them); per
    noise-level bucket: nll_t{lo}-{hi} (VarianceLoss), k_ratio_t{lo}-{hi} = median over frames of
    mean(r^2 / g) / mean(k) (1 when k is right on average) and k_r_t{lo}-{hi}, the median over
    frames of the Pearson r of k with r^2 over pixels (how well k locates the error)."""

    def __init__(self, sim_config, phi, psi, schedule, num_frames, seed):
        from smlm_tfdiff.diffusion.schedule import buckets_for
        from smlm_tfdiff.simulation.simulate import simulate
        data = simulate(sim_config, num_frames, seed)
        rng = np.random.default_rng(seed)
        self.t = 1 + (np.arange(num_frames) * schedule.T) // num_frames  # Every bucket covered.
        gamma = schedule.gamma_between(self.t, rng.uniform(size=num_frames)).astype(np.float32)
        eps = rng.standard_normal(data["kde"].shape).astype(np.float32)
        loss = VarianceLoss(phi, psi)
        self.batches = []
        for i in range(0, num_frames, 64):
            batch = {"frames": data["frames"][i:i + 64], "kde": data["kde"][i:i + 64],
                     "gamma": gamma[i:i + 64], "eps": eps[i:i + 64]}
            inputs, target = loss.residual(batch)
            self.batches.append((inputs, target.numpy()))
        self.buckets = buckets_for(schedule)

    def __call__(self, trainer, step):
        del step
        k = np.concatenate([np.exp(trainer.model(inputs, training=False).numpy())
                            for inputs, _ in self.batches])
        target = np.concatenate([target for _, target in self.batches])
        axes = (1, 2, 3)
        nll = np.mean(target / k + np.log(k), axis=axes)
        ratio = target.mean(axis=axes) / k.mean(axis=axes)
        kc, tc = k - k.mean(axis=axes, keepdims=True), target - target.mean(axis=axes, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (kc * tc).sum(axis=axes) / np.sqrt((kc ** 2).sum(axis=axes) * (tc ** 2).sum(axis=axes))
        metrics = {}
        for lo, hi in self.buckets:
            sel = (self.t >= lo) & (self.t <= hi)
            if sel.any():
                metrics[f"nll_t{lo}-{hi}"] = float(nll[sel].mean())
                metrics[f"k_ratio_t{lo}-{hi}"] = float(np.median(ratio[sel]))
                metrics[f"k_r_t{lo}-{hi}"] = float(np.nanmedian(r[sel]))
        return metrics
