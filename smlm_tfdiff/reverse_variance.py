"""The reverse step's missing variance: a learned per-pixel Var(z_0 | z_t) for psi's sampler.

A reverse step z_t -> z_s draws from q(z_s | z_t, z0_hat) with z0_hat psi's point estimate of z_0,
so its variance (the eta term, sampler.py) leaves out how unsure z0_hat itself is. The exact step
p(z_s | z_t) = E_{z_0 | z_t} q(z_s | z_t, z_0) has the mean of the sampler's step and, per pixel,
the variance

    sigma^2 + c^2 Var(z_0 | z_t),   c = sqrt(g_s) - sqrt(1 - g_s - sigma^2) sqrt(g_t / (1 - g_t)),

(Analytic-DPM, Bao et al. 2022; per pixel as in their NPR-DPM) with
Var(z_0 | z_t) = (1 - g_t) / g_t E[(eps - eps_psi)^2 | z_t, y_hat]. Left out, a chain of a few
strided steps is too narrow even with an exact denoiser (tests/test_sampler.py: 10 ancestral steps
give 0.5-0.8 of a Gaussian posterior's std).

psi_var is a second network, psi's U-Net (same PsiConfig, started from psi's weights), whose output
is log h, h = E[(eps - eps_psi)^2 | z_t, y_hat] per pixel for the frozen psi: trained on psi's own
squared residuals with the Gaussian negative log-likelihood r^2 / h + log h, minimised by h =
E[r^2 | inputs] (trainers/train_psi_variance.py). It includes psi's own error (the "imperfect mean"
of NPR-DPM), which is what a sample's spread must add.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from smlm_tfdiff.diffusion import q_sample, to_diffusion_space

# Starting value of h: about psi's mean squared eps error over the paper schedule.
INITIAL_H = 0.01


def build_variance_net(psi_config, psi=None, name="psi_var"):
    """psi's U-Net with output log h [B, H, W, 1] (same inputs as psi). With `psi`, its weights are
    copied in (the features that predict eps also locate where it is uncertain) and the output conv
    is reset to log h = log(INITIAL_H) everywhere."""
    from smlm_tfdiff.models.psi import build_psi
    net = build_psi(dataclasses.replace(psi_config, prediction="eps"), name=name)
    if psi is not None:
        net.set_weights(psi.get_weights())
        out = net.get_layer("eps")
        kernel, bias = out.get_weights()
        out.set_weights([np.zeros_like(kernel), np.full_like(bias, np.log(INITIAL_H))])
    return net


def x0_variance_term(log_h, g_t, g_s, var):
    """The step variance the eta step leaves out, c^2 Var(z_0 | z_t) [N, H, W, 1] (module doc).
    log_h: psi_var's output; g_t < g_s: levels of the step; var: the eta step's sigma^2."""
    c = tf.sqrt(g_s) - tf.sqrt(tf.maximum(1.0 - g_s - var, 0.0)) * tf.sqrt(g_t / (1.0 - g_t))
    return tf.square(c) * (1.0 - g_t) / g_t * tf.exp(log_h)


class VarianceLoss:
    """Per-example Gaussian NLL of psi's residual, mean over pixels of r^2 / h + log h -> [B]
    (r = eps - eps_psi with the frozen phi and psi; batches of psi_training.psi_dataset)."""

    def __init__(self, phi, psi):
        self.phi, self.psi = phi, psi

    def residual(self, batch):
        y_hat = self.phi(batch["frames"], training=False)
        gamma = batch["gamma"]
        inputs = {"y_t": q_sample(to_diffusion_space(batch["kde"]), gamma, batch["eps"]),
                  "y_hat": y_hat, "noise_level": tf.sqrt(gamma)}
        r2 = tf.square(batch["eps"] - self.psi(inputs, training=False))
        return inputs, tf.stop_gradient(r2)

    def __call__(self, model, batch, training):
        inputs, r2 = self.residual(batch)
        log_h = model(inputs, training=training)
        return tf.reduce_mean(r2 * tf.exp(-log_h) + log_h, axis=[1, 2, 3])


class VarianceValidation:
    """Fixed seeded validation frames and noise (as psi_training.PsiValidation draws them); per
    noise-level bucket: nll_t{lo}-{hi} (VarianceLoss), h_ratio_t{lo}-{hi} = mean r^2 / mean h (1
    when h is right on average) and h_r_t{lo}-{hi}, the Pearson r of h with r^2 over pixels."""

    def __init__(self, sim_config, phi, psi, schedule, num_frames, seed):
        from smlm_tfdiff.psi_training import buckets_for
        from smlm_tfdiff.simulate import simulate
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
            inputs, r2 = loss.residual(batch)
            self.batches.append((inputs, r2.numpy()))
        self.buckets = buckets_for(schedule)

    def __call__(self, trainer, step):
        del step
        h = np.concatenate([np.exp(trainer.model(inputs, training=False).numpy())
                            for inputs, _ in self.batches])
        r2 = np.concatenate([r2 for _, r2 in self.batches])
        metrics = {}
        for lo, hi in self.buckets:
            sel = (self.t >= lo) & (self.t <= hi)
            if sel.any():
                hs, rs = h[sel].ravel(), r2[sel].ravel()
                metrics[f"nll_t{lo}-{hi}"] = float(np.mean(rs / hs + np.log(hs)))
                metrics[f"h_ratio_t{lo}-{hi}"] = float(rs.mean() / hs.mean())
                metrics[f"h_r_t{lo}-{hi}"] = float(np.corrcoef(hs, rs)[0, 1])
        return metrics
