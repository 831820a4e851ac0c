"""A generic distributed trainer: custom loop under a tf.distribute strategy, checkpoints, TensorBoard.

Shared by phi and psi. The caller supplies the model, a per-example loss, an infinite dataset of
global batches and (optionally) an evaluation hook; the trainer owns the strategy, the optimizer,
`tf.train.CheckpointManager` (model, optimizer, step, EMA weights), resume, the NaN guard, progress
and TensorBoard scalars.

    trainer = Trainer(TrainerConfig(out_dir=..., steps=...), strategy, build_model, loss_fn,
                      dataset_fn, eval_fn)
    trainer.fit()
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; the last good state was checkpointed."""


@dataclasses.dataclass
class TrainerConfig:
    out_dir: str
    steps: int
    batch_size: int = 64  # Global batch, split across replicas.
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # "cosine" (with warm-up) or "constant".
    warmup_steps: int = 200
    min_learning_rate_ratio: float = 0.02  # Cosine decays to this fraction of learning_rate.
    weight_decay: float = 0.0
    clipnorm: Optional[float] = 1.0
    ema_decay: Optional[float] = None  # Keep an exponential moving average of the weights.
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    max_to_keep: int = 3
    seed: int = 0
    progress: bool = True
    jit_compile: bool = False  # XLA for the replica step (forward, backward, optimizer update).

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"TrainerConfig.steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            raise ValueError(f"TrainerConfig.batch_size must be >= 1 (got {self.batch_size})")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainerConfig.learning_rate must be > 0 (got {self.learning_rate})")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainerConfig.schedule must be 'cosine' or 'constant' "
                             f"(got {self.schedule!r})")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"TrainerConfig.ema_decay must be in (0, 1) (got {self.ema_decay})")


def make_strategy(num_replicas: int = 0):
    """One strategy for the run.

    num_replicas 0: all GPUs (MirroredStrategy), or the default strategy on a CPU-only machine.
    num_replicas n >= 1: MirroredStrategy over n devices; on a CPU-only machine the CPU is split into
    n logical devices (this must happen before TensorFlow initialises its devices).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if num_replicas == 0:
        return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()
    if gpus:
        if num_replicas > len(gpus):
            raise ValueError(f"asked for {num_replicas} replicas but only {len(gpus)} GPUs exist")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(num_replicas)])
    cpus = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpus[0]) or []
    if len(existing) < num_replicas:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_replicas)
        except RuntimeError as err:
            raise RuntimeError(
                f"cannot split the CPU into {num_replicas} logical devices after TensorFlow has "
                "initialised; build the strategy before running any TensorFlow op") from err
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])


def make_learning_rate(config: TrainerConfig):
    if config.schedule == "constant":
        return config.learning_rate
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.01 if warmup else config.learning_rate,
        decay_steps=max(config.steps - warmup, 1),
        alpha=config.min_learning_rate_ratio,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup)


class Trainer:
    """Custom training loop.

    build_model(): a Keras model, created inside strategy.scope().
    loss_fn(model, batch, training) -> per-example loss [B_replica] (the trainer averages it over the
      GLOBAL batch, so gradients summed over replicas are those of the global mean).
    dataset_fn(start_step) -> an infinite tf.data.Dataset of global batches; called with the step
      the run (re)starts at, so a resumed run draws fresh data.
    eval_fn(trainer, step) -> dict of scalars (written to TensorBoard 'val/...'); it may also write
      images itself under trainer.val_writer.
    extra_trackables: more objects to save in the checkpoint.
    """

    def __init__(self, config: TrainerConfig, strategy, build_model: Callable, loss_fn: Callable,
                 dataset_fn: Callable, eval_fn: Optional[Callable] = None,
                 extra_trackables: Optional[dict] = None, run_info: Optional[dict] = None):
        self.config = config
        self.strategy = strategy
        self.loss_fn = loss_fn
        self.dataset_fn = dataset_fn
        self.eval_fn = eval_fn
        os.makedirs(config.out_dir, exist_ok=True)
        with strategy.scope():
            self.model = build_model()
            self.learning_rate = make_learning_rate(config)
            self.optimizer = keras.optimizers.AdamW(
                learning_rate=self.learning_rate, weight_decay=config.weight_decay,
                clipnorm=config.clipnorm)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.ema = None
            if config.ema_decay is not None:
                self.ema = [tf.Variable(v, trainable=False, name=f"ema_{i}")
                            for i, v in enumerate(self.model.trainable_variables)]
            # The state before the current step, restored if that step goes non-finite.
            self._state = list(self.model.variables) + list(self.optimizer.variables)
            self._shadow = [tf.Variable(v, trainable=False) for v in self._state]
        trackables = dict(model=self.model, optimizer=self.optimizer, step=self.step)
        if self.ema is not None:
            trackables["ema"] = self.ema
        trackables.update(extra_trackables or {})
        self.checkpoint = tf.train.Checkpoint(**trackables)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(config.out_dir, "checkpoints"),
            max_to_keep=config.max_to_keep)
        self.train_writer = tf.summary.create_file_writer(os.path.join(config.out_dir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(config.out_dir, "val"))
        self.restored_from = None
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).expect_partial()
            self.restored_from = self.manager.latest_checkpoint
            logging.info("Resumed from %s at step %d", self.restored_from, int(self.step.numpy()))
        info = {"trainer": dataclasses.asdict(config), **(run_info or {})}
        with open(os.path.join(config.out_dir, "run_config.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        self._train_step = self._make_train_step()
        self._snapshot, self._rollback = self._make_snapshot_fns()

    # ---------------------------------------------------------------- graph functions
    def _make_train_step(self):
        strategy, model, optimizer = self.strategy, self.model, self.optimizer
        global_batch = self.config.batch_size
        ema, decay = self.ema, self.config.ema_decay

        def replica_step(batch):
            with tf.GradientTape() as tape:
                per_example = self.loss_fn(model, batch, True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            return loss, 1.0 - tf.cast(finite, tf.float32)

        if self.config.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_step(iterator):
            per_replica, bad = strategy.run(replica_step, args=(next(iterator),))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            bad = strategy.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None)
            if ema is not None:
                for e, v in zip(ema, model.trainable_variables):
                    e.assign(decay * e + (1.0 - decay) * tf.convert_to_tensor(v))
            self.step.assign_add(1)
            return loss, bad

        return train_step

    def _make_snapshot_fns(self):
        state, shadow = self._state, self._shadow

        @tf.function
        def snapshot():
            for s, v in zip(shadow, state):
                s.assign(v)

        @tf.function
        def rollback():
            for s, v in zip(shadow, state):
                v.assign(s)

        return snapshot, rollback

    # ---------------------------------------------------------------------- helpers
    def current_learning_rate(self) -> float:
        lr = self.learning_rate
        if callable(lr):
            return float(lr(self.optimizer.iterations))
        return float(lr)

    def swap_ema(self):
        """Swap model weights and EMA weights (call twice to swap back)."""
        if self.ema is None:
            return
        for e, v in zip(self.ema, self.model.trainable_variables):
            tmp = tf.convert_to_tensor(v)
            v.assign(e)
            e.assign(tmp)

    def save(self) -> str:
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    # ------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train until config.steps; returns a summary dict. Resumes from the latest checkpoint."""
        cfg = self.config
        start = int(self.step.numpy())
        if start >= cfg.steps:
            logging.info("Already at step %d >= %d steps; nothing to do", start, cfg.steps)
            return {"step": start, "losses": []}
        dataset = self.dataset_fn(start)
        iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
        progbar = keras.utils.Progbar(cfg.steps, stateful_metrics=["loss", "lr"],
                                      verbose=1 if cfg.progress else 0)
        progbar.update(start)
        losses, window, t0 = [], [], time.perf_counter()
        step = start
        while step < cfg.steps:
            self._snapshot()
            loss, bad = self._train_step(iterator)
            loss = float(loss)
            if not np.isfinite(loss) or float(bad) > 0:
                self._rollback()
                self.step.assign(step)
                path = self.save()
                what = f"loss became {loss}" if not np.isfinite(loss) else "gradients became NaN/Inf"
                raise NonFiniteLossError(
                    f"{what} at step {step + 1}; the last good state (step {step}) is "
                    f"saved in {path}. Lower --learning_rate (now {cfg.learning_rate}) or check the "
                    "data, then rerun the same command to resume from it.")
            step += 1
            losses.append(loss)
            window.append(loss)
            progbar.update(step, [("loss", loss), ("lr", self.current_learning_rate())])
            if step % cfg.log_every == 0 or step == cfg.steps:
                with self.train_writer.as_default(step=step):
                    tf.summary.scalar("loss", np.mean(window))
                    tf.summary.scalar("learning_rate", self.current_learning_rate())
                    tf.summary.scalar("steps_per_second",
                                      len(window) / (time.perf_counter() - t0))
                window, t0 = [], time.perf_counter()
            if self.eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                self.evaluate(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.save()
        self.train_writer.flush()
        self.val_writer.flush()
        return {"step": step, "losses": losses}

    def evaluate(self, step=None) -> dict:
        step = int(self.step.numpy()) if step is None else step
        self.swap_ema()
        try:
            metrics = self.eval_fn(self, step)
        finally:
            self.swap_ema()
        with self.val_writer.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(key, value)
        logging.info("step %d: %s", step,
                     ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
        return metrics
