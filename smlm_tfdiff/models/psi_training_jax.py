"""psi training under the Keras JAX backend, for an accelerator machine that has JAX but no
TensorFlow. Used by trainers/train_psi_jax.py.

The recipe is train_psi.py's: frozen phi, pairs (y, y_hat = phi(x)) made on the fly, the noise
level drawn as `diffusion.sample_training_noise_level` draws it (t ~ U{t_min..T}, then sqrt(gamma)
uniform between sqrt(gamma_t) and sqrt(gamma_{t-1})), the loss of `psi_training.PsiLoss` (the
per-step weights of `diffusion.loss_weight_table`), AdamW with clipnorm and a cosine schedule with
linear warm-up (`training.make_learning_rate`), an EMA of the weights (the exported ones), and an
optional mixed-in second scene. Here one jitted step simulates the batch (simulation_jax), runs
phi, draws the noise and updates psi, so the accelerator never waits for data.

A run can be sized by wall clock: with time_budget_s the cosine schedule is stretched over the
number of steps the measured speed allows, so that a run on a lent machine ends, validated and
saved, inside its time. Weights are saved every checkpoint_every_s seconds (each file written
under a temporary name and renamed), so a run cut off still leaves the latest EMA weights; with
a state_dir the full state is saved too and the same command resumes from it.
"""

import dataclasses
import json
import math
import os
import platform
import time
from typing import Optional

import jax
import jax.numpy as jnp
import keras
import numpy as np
from absl import logging

from smlm_tfdiff.simulation import simulate_jax as simulation_jax
from smlm_tfdiff.diffusion.schedule import (T_MIN, buckets_for, loss_weight_table, per_example_loss,
                                   q_sample, to_diffusion_space)


@dataclasses.dataclass
class JaxTrainConfig:
    out_dir: str
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    min_learning_rate_ratio: float = 0.02
    weight_decay: float = 0.0
    clipnorm: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 100000  # The cosine schedule's length when no time budget is given.
    time_budget_s: Optional[float] = None  # Wall clock for the whole run, compile and saving included.
    sizing_steps: int = 50  # Timed steps before the schedule is sized to the budget.
    reserve_s: float = 30.0  # Kept free of the budget for the final validation and saving.
    checkpoint_every_s: float = 60.0
    log_every: int = 100
    eval_every: int = 2000
    seed: int = 0
    val_frames: int = 256
    val_seed: int = 10000
    state_dir: Optional[str] = None  # Where the full state (for resuming) goes; None: not saved.

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1 or self.sizing_steps < 1:
            raise ValueError("batch_size, max_steps and sizing_steps must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) (got {self.ema_decay})")
        if self.time_budget_s is not None and self.time_budget_s <= self.reserve_s:
            raise ValueError(f"time_budget_s {self.time_budget_s} leaves nothing after the "
                             f"{self.reserve_s} s reserved for validation and saving")


def learning_rate_at(step, total_steps, config):
    """keras CosineDecay with warm-up as `training.make_learning_rate` builds it, at `step`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    lr = config.learning_rate
    if step < warmup:
        return 0.01 * lr + (lr - 0.01 * lr) * step / warmup
    decay_steps = max(total_steps - warmup, 1)
    progress = min(step - warmup, decay_steps) / decay_steps
    alpha = config.min_learning_rate_ratio
    return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * progress)) + alpha)


def noise_level_draw(key, schedule, batch, t_min):
    """(t [B] int32, gamma [B] float32): t ~ U{t_min..T}, sqrt(gamma) ~ U(sqrt(gamma_t),
    sqrt(gamma_{t-1})), the draw of `diffusion.sample_training_noise_level`."""
    t_key, u_key = jax.random.split(key)
    t = jax.random.randint(t_key, [batch], t_min, schedule.T + 1)
    sqrt_gamma = jnp.asarray(np.sqrt(schedule.gamma), jnp.float32)
    lo, hi = sqrt_gamma[t], sqrt_gamma[t - 1]
    u = jax.random.uniform(u_key, [batch])
    return t, jnp.square(lo + u * (hi - lo))


class JaxPsiTrainer:
    """Trains `psi` (a Keras model under the JAX backend) against the frozen `phi`.

    sim_config: the scene psi trains on; mix_config, mix_fraction: a second scene (same frame
    size) filling round(mix_fraction * batch_size) frames of every batch. save_fn(out_dir, psi)
    writes the model folder (phi's files and psi's, pretrained.save_models). prediction: psi's
    PsiConfig.prediction; for "v" and "v_residual" the weights are divided by gamma as in
    psi_training.PsiLoss (the model itself turns its v into eps). frame_condition: psi's
    PsiConfig.frame_condition; psi then gets the simulated frames too (its "frame" input).
    """

    def __init__(self, config, phi, psi, sim_config, schedule, weighting, save_fn,
                 mix_config=None, mix_fraction=0.0, run_info=None, prediction="eps",
                 frame_condition=False):
        self.config, self.phi, self.psi = config, phi, psi
        self.sim_config, self.mix_config = sim_config, mix_config
        self.schedule, self.weighting, self.save_fn = schedule, weighting, save_fn
        self.num_mix = int(round(mix_fraction * config.batch_size)) if mix_config else 0
        if self.num_mix and (mix_config.lr_shape != sim_config.lr_shape
                             or mix_config.upsample != sim_config.upsample):
            raise ValueError("the mixed-in scene must have the frame size and upsampling of the "
                             "main one")
        self.run_info = dict(run_info or {})
        self.t_min = T_MIN[weighting]
        self.prediction = prediction  # PsiConfig.prediction of psi: "eps", "v" or "v_residual".
        self.frame_condition = bool(frame_condition)
        self.weights = jnp.asarray(loss_weight_table(schedule, weighting), jnp.float32)
        self.optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                                weight_decay=config.weight_decay,
                                                clipnorm=config.clipnorm)
        self.optimizer.build(psi.trainable_variables)
        names = [v.name for v in self.optimizer.variables]
        self._lr_index = names.index("learning_rate")
        self.history = {"loss": [], "validation": []}
        self._train_step = jax.jit(self._step, donate_argnums=(0,))
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
                jnp.concatenate([p["kde"] for p in parts]))

    def _step(self, state, key, lr):
        params, non_trainable, opt_vars, ema = state
        data_key, level_key, eps_key = jax.random.split(key, 3)
        frames, kde = self._batch(data_key)
        y_hat = jax.lax.stop_gradient(self.phi(frames, training=False))
        t, gamma = noise_level_draw(level_key, self.schedule, self.config.batch_size, self.t_min)
        eps = jax.random.normal(eps_key, kde.shape)
        y_t = q_sample(to_diffusion_space(kde), gamma, eps)
        w = self.weights[t]
        if self.prediction != "eps":  # As psi_training.PsiLoss (experimental/prediction.py).
            from smlm_tfdiff.experimental.prediction import loss_weights
            w = loss_weights(w, gamma)

        def loss_fn(p):
            eps_pred, nt = self.psi.stateless_call(
                p, non_trainable, self._inputs(y_t, y_hat, jnp.sqrt(gamma), frames),
                training=True)
            return jnp.mean(per_example_loss(eps, eps_pred, w)), nt

        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
        opt_vars = list(opt_vars)
        opt_vars[self._lr_index] = jnp.asarray(lr, opt_vars[self._lr_index].dtype)
        params, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, params)
        decay = self.config.ema_decay
        ema = [decay * e + (1.0 - decay) * p for e, p in zip(ema, params)]
        return (params, non_trainable, opt_vars, ema), loss, finite

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
        y_hat = np.concatenate([np.asarray(self.phi(data["frames"][i:i + 256], training=False))
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

    # --------------------------------------------------------------------------- state
    def _initial_state(self):
        psi, opt = self.psi, self.optimizer
        params = [v.value for v in psi.trainable_variables]
        return ([jnp.array(p) for p in params], [v.value for v in psi.non_trainable_variables],
                [v.value for v in opt.variables], [jnp.array(p) for p in params])

    def _state_path(self):
        return os.path.join(self.config.state_dir, "psi_jax_state.npz")

    def _save_state(self, state, step, total_steps):
        if not self.config.state_dir:
            return
        os.makedirs(self.config.state_dir, exist_ok=True)
        arrays = {}
        for name, group in zip(("params", "non_trainable", "opt", "ema"), state):
            for i, value in enumerate(group):
                arrays[f"{name}_{i}"] = np.asarray(value)
        tmp = self._state_path() + ".tmp.npz"
        np.savez(tmp, step=step, total_steps=total_steps,
                 history=json.dumps(self.history), **arrays)
        os.replace(tmp, self._state_path())

    def _load_state(self):
        if not self.config.state_dir or not os.path.exists(self._state_path()):
            return None
        with np.load(self._state_path()) as f:
            groups = []
            for name, template in zip(("params", "non_trainable", "opt", "ema"),
                                      self._initial_state()):
                groups.append([jnp.asarray(f[f"{name}_{i}"]) for i in range(len(template))])
            self.history = json.loads(str(f["history"]))
            return tuple(groups), int(f["step"]), int(f["total_steps"])

    def _write_weights(self, state):
        """psi's EMA weights into the model, then the model folder (save_fn)."""
        _, non_trainable, _, ema = state
        for var, value in zip(self.psi.trainable_variables, ema):
            var.assign(value)
        for var, value in zip(self.psi.non_trainable_variables, non_trainable):
            var.assign(value)
        self.save_fn(self.config.out_dir, self.psi)
        self._write_log()

    def _write_log(self):
        path = os.path.join(self.config.out_dir, "train_log.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**self.run_info, **self.history}, f, indent=1)
        os.replace(path + ".tmp", path)

    # ---------------------------------------------------------------------------- loop
    def fit(self):
        cfg = self.config
        start_time = time.perf_counter()
        os.makedirs(cfg.out_dir, exist_ok=True)
        resumed = self._load_state()
        if resumed is not None:
            state, step, total_steps = resumed
            if cfg.time_budget_s is None:  # A larger max_steps extends a finished run.
                total_steps = cfg.max_steps
            logging.info("Resumed at step %d of %d from %s", step, total_steps, self._state_path())
        else:
            state, step, total_steps = self._initial_state(), 0, cfg.max_steps
        sized = resumed is not None or cfg.time_budget_s is None
        base_key = jax.random.PRNGKey(cfg.seed)
        last_save = time.perf_counter()
        losses, window_start, window_steps = [], time.perf_counter(), 0
        compile_s = None
        sizing_start = None
        self.run_info.update({"backend": keras.backend.backend(), "jax": jax.__version__,
                              "keras": keras.__version__, "device": str(jax.devices()[0]),
                              "platform": platform.platform(), "train_config": dataclasses.asdict(cfg)})
        while step < total_steps:
            lr = learning_rate_at(step, total_steps, cfg)
            new_state, loss, finite = self._train_step(state, jax.random.fold_in(base_key, step),
                                                       np.float32(lr))
            if compile_s is None:
                loss.block_until_ready()
                compile_s = time.perf_counter() - start_time
                logging.info("First step (compilation) after %.1f s", compile_s)
                sizing_start = time.perf_counter()
            state = new_state
            step += 1
            losses.append(loss)
            window_steps += 1
            if not sized and step >= cfg.sizing_steps + 1:
                float(loss)  # Wait for the device.
                per_step = (time.perf_counter() - sizing_start) / cfg.sizing_steps
                left = cfg.time_budget_s - (time.perf_counter() - start_time) - cfg.reserve_s
                total_steps = int(min(cfg.max_steps, step + max(0, left // per_step)))
                sized = True
                self.run_info["sized"] = {"seconds_per_step": per_step, "total_steps": total_steps,
                                          "compile_s": compile_s}
                logging.info("%.4f s per step: the schedule spans %d steps", per_step, total_steps)
            if step % cfg.log_every == 0 or step == total_steps:
                values = np.asarray(jnp.stack(losses))
                ok = bool(finite)
                if not np.all(np.isfinite(values)) or not ok:
                    # Nothing is written: the files of the last save are the last good state.
                    raise FloatingPointError(
                        f"loss or gradients became NaN/Inf before step {step}; {cfg.out_dir} "
                        "holds the weights of the last save before it (and state_dir, if set, "
                        f"its state). Lower the learning rate (now {cfg.learning_rate}) and rerun.")
                rate = window_steps / (time.perf_counter() - window_start)
                self.history["loss"].append({"step": step, "loss": float(values.mean()),
                                             "lr": lr, "steps_per_s": rate})
                logging.info("step %d/%d loss %.5f lr %.2e %.1f steps/s (%.0f frames/s), "
                             "%.0f s elapsed", step, total_steps, values.mean(), lr, rate,
                             rate * cfg.batch_size, time.perf_counter() - start_time)
                losses, window_start, window_steps = [], time.perf_counter(), 0
            if step % cfg.eval_every == 0 and step < total_steps:
                metrics = self.validate(state[3], state[1])
                self.history["validation"].append({"step": step, **metrics})
                logging.info("validation at step %d: %s", step, metrics)
            if time.perf_counter() - last_save > cfg.checkpoint_every_s:
                self._write_weights(state)
                self._save_state(state, step, total_steps)
                last_save = time.perf_counter()
        metrics = self.validate(state[3], state[1])
        self.history["validation"].append({"step": step, **metrics})
        logging.info("final validation at step %d: %s", step, metrics)
        self.run_info["steps"] = step
        self.run_info["wall_clock_s"] = time.perf_counter() - start_time
        self._write_weights(state)
        self._save_state(state, step, total_steps)
        return {"step": step, "validation": metrics}
