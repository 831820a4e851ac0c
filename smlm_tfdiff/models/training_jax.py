"""Training under the Keras JAX backend, for an accelerator machine that has JAX but no
TensorFlow: the loop shared by the psi and phi trainers (psi_training_jax, phi_training_jax).

One jitted step draws its own batch (the simulator in jax.numpy), computes the loss and applies
AdamW with clipnorm and a cosine schedule with linear warm-up (`training.make_learning_rate`),
and keeps an EMA of the weights (the exported ones). A run can be sized by wall clock: with
time_budget_s the cosine schedule is stretched over the number of steps the measured speed
allows, so that a run on a lent machine ends, validated and saved, inside its time. Weights are
saved every checkpoint_every_s seconds (each file written under a temporary name and renamed), so
a run cut off still leaves the latest EMA weights; with a state_dir the full state is saved too
and the same command resumes from it.
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


class JaxTrainer:
    """The training loop of a Keras model under the JAX backend; subclasses define the loss.

    Subclasses implement `loss(params, non_trainable, key) -> (mean loss, non_trainable)` (a batch
    drawn from `key` inside, so the accelerator never waits for data) and
    `validate(params, non_trainable) -> dict`. save_fn(out_dir, model) writes the model folder;
    state_file names the resumable state inside config.state_dir.
    """

    state_file = "jax_state.npz"

    def __init__(self, config, model, save_fn, run_info=None):
        self.config, self.model, self.save_fn = config, model, save_fn
        self.run_info = dict(run_info or {})
        self.optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                                weight_decay=config.weight_decay,
                                                clipnorm=config.clipnorm)
        self.optimizer.build(model.trainable_variables)
        names = [v.name for v in self.optimizer.variables]
        self._lr_index = names.index("learning_rate")
        self.history = {"loss": [], "validation": []}
        self._train_step = jax.jit(self._step, donate_argnums=(0,))

    def loss(self, params, non_trainable, key):
        raise NotImplementedError

    def validate(self, params, non_trainable):
        raise NotImplementedError

    def _step(self, state, key, lr):
        params, non_trainable, opt_vars, ema = state
        (loss, non_trainable), grads = jax.value_and_grad(self.loss, has_aux=True)(
            params, non_trainable, key)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
        opt_vars = list(opt_vars)
        opt_vars[self._lr_index] = jnp.asarray(lr, opt_vars[self._lr_index].dtype)
        params, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, params)
        decay = self.config.ema_decay
        ema = [decay * e + (1.0 - decay) * p for e, p in zip(ema, params)]
        return (params, non_trainable, opt_vars, ema), loss, finite

    # --------------------------------------------------------------------------- state
    def _initial_state(self):
        model, opt = self.model, self.optimizer
        params = [v.value for v in model.trainable_variables]
        return ([jnp.array(p) for p in params], [v.value for v in model.non_trainable_variables],
                [v.value for v in opt.variables], [jnp.array(p) for p in params])

    def _state_path(self):
        return os.path.join(self.config.state_dir, self.state_file)

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
        """The EMA weights into the model, then the model folder (save_fn)."""
        _, non_trainable, _, ema = state
        for var, value in zip(self.model.trainable_variables, ema):
            var.assign(value)
        for var, value in zip(self.model.non_trainable_variables, non_trainable):
            var.assign(value)
        self.save_fn(self.config.out_dir, self.model)
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
