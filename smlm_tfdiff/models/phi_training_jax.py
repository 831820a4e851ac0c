"""phi training under the Keras JAX backend, for an accelerator machine that has JAX but no
TensorFlow. Used by trainers/train_phi_jax.py.

The recipe is train_phi.py's loss, the seeds' L_phi (per-frame mean squared error against the
KDE, `phi_training.phi_loss`), with each batch simulated inside the one jitted step by the
simulator in jax.numpy (simulate_jax); BatchNormalization's moving statistics are updated as in
Keras training. The loop (AdamW, cosine schedule sized to a time budget, EMA, saving, resuming)
is `training_jax.JaxTrainer`'s.
"""

import jax
import jax.numpy as jnp
import numpy as np

from smlm_tfdiff.models.phi import BRIGHTNESS_JITTER, SPREAD_JITTER, phi_input
from smlm_tfdiff.models.training_jax import JaxTrainer
from smlm_tfdiff.simulation import simulate_jax


class JaxPhiTrainer(JaxTrainer):
    """Trains `phi` (a Keras model under the JAX backend) on frames of `sim_config`.

    save_fn(out_dir, phi) writes the model folder (pretrained.save_models). Validation: the KDE
    MSE on config.val_frames fixed frames (seed config.val_seed), with the EMA weights.
    """

    state_file = "phi_jax_state.npz"

    def __init__(self, config, phi, sim_config, save_fn, run_info=None, phi_config=None):
        super().__init__(config, phi, save_fn, run_info)
        self.sim_config = sim_config
        # A brightness-normalised phi (PhiConfig.brightness_reference) reads frames scaled by
        # reference / N0, and one told the spread reads it beside them (phi_input), as
        # phi_training.phi_dataset makes them.
        self.phi_config = phi_config
        self.brightness_reference = getattr(phi_config, "brightness_reference", None)
        self._predict = jax.jit(
            lambda p, nt, x: phi.stateless_call(p, nt, x, training=False)[0])
        data = simulate_jax.simulate_batch(jax.random.PRNGKey(config.val_seed), sim_config,
                                           config.val_frames)
        self._offset = float(np.mean(sim_config.offset))
        frames = data["frames"]
        if self.brightness_reference is not None:  # True N0 and spread (training: jitter).
            frames = phi_input(frames, self._offset, phi_config, data["frame_photons"],
                               data["frame_spread"])
        self._validation = {"frames": np.asarray(frames), "kde": np.asarray(data["kde"])}

    def loss(self, params, non_trainable, key):
        normalized = self.brightness_reference is not None
        sim_key, jitter_key = jax.random.split(key) if normalized else (key, None)
        data = simulate_jax.simulate_batch(sim_key, self.sim_config, self.config.batch_size)
        frames = data["frames"]
        if normalized:
            z = jax.random.normal(jitter_key, data["frame_photons"].shape)
            z2 = jax.random.normal(jax.random.fold_in(jitter_key, 1), data["frame_spread"].shape)
            frames = phi_input(frames, self._offset, self.phi_config,
                               data["frame_photons"] * jnp.exp(BRIGHTNESS_JITTER * z),
                               jnp.maximum(data["frame_spread"] + SPREAD_JITTER * z2, 0.0))
        pred, non_trainable = self.model.stateless_call(params, non_trainable, frames,
                                                        training=True)
        return jnp.mean(jnp.square(pred - data["kde"])), non_trainable

    def validate(self, params, non_trainable):
        v = self._validation
        preds = np.concatenate([np.asarray(self._predict(params, non_trainable,
                                                         v["frames"][i:i + 64]))
                                for i in range(0, len(v["frames"]), 64)])
        return {"loss": float(np.mean((preds - v["kde"]) ** 2))}
