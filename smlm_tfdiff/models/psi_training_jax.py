"""psi training under the Keras JAX backend, for an accelerator machine that has JAX but no
TensorFlow. Used by trainers/train_psi_jax.py.

The recipe is train_psi.py's: frozen phi, pairs (y, y_hat = phi(x)) made on the fly, the noise
level drawn as `diffusion.sample_training_noise_level` draws it (t ~ U{t_min..T}, then sqrt(gamma)
uniform between sqrt(gamma_t) and sqrt(gamma_{t-1})), the loss of `psi_training.PsiLoss` (the
per-step weights of `diffusion.loss_weight_table`), AdamW with clipnorm and a cosine schedule with
linear warm-up (`training.make_learning_rate`), an EMA of the weights (the exported ones), and an
optional mixed-in second scene. Here one jitted step simulates the batch (simulation_jax), runs
phi, draws the noise and updates psi, so the accelerator never waits for data.
The loop (sizing to a time budget, saving, resuming) is `training_jax.JaxTrainer`'s.
"""

import jax
import jax.numpy as jnp
import numpy as np

from smlm_tfdiff.simulation import simulate_jax as simulation_jax
from smlm_tfdiff.diffusion.schedule import (T_MIN, buckets_for, loss_weight_table, per_example_loss,
                                   q_sample, to_diffusion_space)
from smlm_tfdiff.models.phi import BRIGHTNESS_JITTER, normalize_brightness
from smlm_tfdiff.models.training_jax import JaxTrainConfig, JaxTrainer, learning_rate_at

__all__ = ["JaxPsiTrainer", "JaxTrainConfig", "learning_rate_at", "noise_level_draw"]


def noise_level_draw(key, schedule, batch, t_min):
    """(t [B] int32, gamma [B] float32): t ~ U{t_min..T}, sqrt(gamma) ~ U(sqrt(gamma_t),
    sqrt(gamma_{t-1})), the draw of `diffusion.sample_training_noise_level`."""
    t_key, u_key = jax.random.split(key)
    t = jax.random.randint(t_key, [batch], t_min, schedule.T + 1)
    sqrt_gamma = jnp.asarray(np.sqrt(schedule.gamma), jnp.float32)
    lo, hi = sqrt_gamma[t], sqrt_gamma[t - 1]
    u = jax.random.uniform(u_key, [batch])
    return t, jnp.square(lo + u * (hi - lo))


class JaxPsiTrainer(JaxTrainer):
    """Trains `psi` (a Keras model under the JAX backend) against the frozen `phi`.

    sim_config: the scene psi trains on; mix_config, mix_fraction: a second scene (same frame
    size) filling round(mix_fraction * batch_size) frames of every batch. save_fn(out_dir, psi)
    writes the model folder (phi's files and psi's, pretrained.save_models). prediction: psi's
    PsiConfig.prediction; for "v" and "v_residual" the weights are divided by gamma as in
    psi_training.PsiLoss (the model itself turns its v into eps). frame_condition: psi's
    PsiConfig.frame_condition; psi then gets the simulated frames too (its "frame" input).
    """

    state_file = "psi_jax_state.npz"

    def __init__(self, config, phi, psi, sim_config, schedule, weighting, save_fn,
                 mix_config=None, mix_fraction=0.0, run_info=None, prediction="eps",
                 frame_condition=False, brightness_reference=None):
        super().__init__(config, psi, save_fn, run_info)
        self.phi, self.psi = phi, psi
        # A brightness-normalised phi (PhiConfig) reads frames scaled by reference / N0, as
        # psi_training.psi_dataset's phi_frames.
        self.brightness_reference = brightness_reference
        self.sim_config, self.mix_config = sim_config, mix_config
        self.schedule, self.weighting = schedule, weighting
        self.num_mix = int(round(mix_fraction * config.batch_size)) if mix_config else 0
        if self.num_mix and (mix_config.lr_shape != sim_config.lr_shape
                             or mix_config.upsample != sim_config.upsample):
            raise ValueError("the mixed-in scene must have the frame size and upsampling of the "
                             "main one")
        self.t_min = T_MIN[weighting]
        self.prediction = prediction  # PsiConfig.prediction of psi: "eps", "v" or "v_residual".
        self.frame_condition = bool(frame_condition)
        self.weights = jnp.asarray(loss_weight_table(schedule, weighting), jnp.float32)
        self._eval = jax.jit(self._eval_fn)
        self._validation = self._validation_set()

    # ------------------------------------------------------------------ jitted pieces
    def _inputs(self, y_t, y_hat, level, frames):
        inputs = {"y_t": y_t, "y_hat": y_hat, "noise_level": level}
        if self.frame_condition:
            inputs["frame"] = frames
        return inputs

    def _batch(self, key):
        main_key, mix_key = jax.random.split(key)
        n = self.config.batch_size - self.num_mix
        parts = [simulation_jax.simulate_batch(main_key, self.sim_config, n)]
        if self.num_mix:
            parts.append(simulation_jax.simulate_batch(mix_key, self.mix_config, self.num_mix))
        return (jnp.concatenate([p["frames"] for p in parts]),
                jnp.concatenate([p["kde"] for p in parts]),
                jnp.concatenate([p["frame_photons"] for p in parts]))

    def _phi_frames(self, frames, n0):
        """The frames as phi reads them (scaled by reference / n0 for a normalised phi)."""
        if self.brightness_reference is None:
            return frames
        return normalize_brightness(frames, float(np.mean(self.sim_config.offset)),
                                    self.brightness_reference, n0)

    def loss(self, params, non_trainable, key):
        data_key, level_key, eps_key = jax.random.split(key, 3)
        frames, kde, n0 = self._batch(data_key)
        if self.brightness_reference is not None:
            n0 = n0 * jnp.exp(BRIGHTNESS_JITTER * jax.random.normal(
                jax.random.fold_in(eps_key, 1), n0.shape))
        y_hat = jax.lax.stop_gradient(self.phi(self._phi_frames(frames, n0), training=False))
        t, gamma = noise_level_draw(level_key, self.schedule, self.config.batch_size, self.t_min)
        eps = jax.random.normal(eps_key, kde.shape)
        y_t = q_sample(to_diffusion_space(kde), gamma, eps)
        w = self.weights[t]
        if self.prediction != "eps":  # As psi_training.PsiLoss (experimental/prediction.py).
            from smlm_tfdiff.experimental.prediction import loss_weights
            w = loss_weights(w, gamma)
        eps_pred, non_trainable = self.psi.stateless_call(
            params, non_trainable, self._inputs(y_t, y_hat, jnp.sqrt(gamma), frames),
            training=True)
        return jnp.mean(per_example_loss(eps, eps_pred, w)), non_trainable

    def _eval_fn(self, params, non_trainable, y_t, y_hat, level, frames):
        eps_pred, _ = self.psi.stateless_call(
            params, non_trainable, self._inputs(y_t, y_hat, level, frames), training=False)
        return eps_pred

    # --------------------------------------------------------------------- validation
    def _validation_set(self):
        """Fixed frames of sim_config with t covering every step evenly (as PsiValidation)."""
        n = self.config.val_frames
        data = simulation_jax.simulate_batch(jax.random.PRNGKey(self.config.val_seed),
                                             self.sim_config, n)
        phi_frames = self._phi_frames(data["frames"], data["frame_photons"])
        y_hat = np.concatenate([np.asarray(self.phi(phi_frames[i:i + 256], training=False))
                                for i in range(0, n, 256)])
        rng = np.random.default_rng(self.config.val_seed)
        t = 1 + (np.arange(n) * self.schedule.T) // n
        gamma = self.schedule.gamma_between(t, rng.uniform(size=n)).astype(np.float32)
        eps = rng.standard_normal(data["kde"].shape).astype(np.float32)
        kde = np.asarray(data["kde"])
        y_t = np.asarray(q_sample(to_diffusion_space(kde), gamma, eps))
        return {"t": t, "gamma": gamma, "eps": eps, "y_t": y_t, "y_hat": y_hat,
                "frames": np.asarray(data["frames"]),
                "kde_mse_phi": float(np.mean((y_hat - kde) ** 2))}

    def validate(self, params, non_trainable):
        """Unweighted eps-MSE per noise-level bucket on the fixed validation frames."""
        v = self._validation
        preds = [np.asarray(self._eval(params, non_trainable, v["y_t"][i:i + 256],
                                       v["y_hat"][i:i + 256], np.sqrt(v["gamma"][i:i + 256]),
                                       v["frames"][i:i + 256]))
                 for i in range(0, len(v["t"]), 256)]
        sq = np.mean((np.concatenate(preds) - v["eps"]) ** 2, axis=(1, 2, 3))
        metrics = {"kde_mse_phi": v["kde_mse_phi"]}
        for lo, hi in buckets_for(self.schedule):
            sel = (v["t"] >= lo) & (v["t"] <= min(hi, self.schedule.T))
            if sel.any():
                metrics[f"mse_t{lo}-{hi}"] = float(sq[sel].mean())
        return metrics
