"""A generic distributed trainer: custom loop under a tf.distribute strategy, checkpoints, TensorBoard.

Shared by phi and psi. Runs on one device, under MirroredStrategy (several local GPUs or logical
CPUs) or under MultiWorkerMirroredStrategy (several machines, from TF_CONFIG; see `make_strategy`).
The caller supplies the model, a per-example loss, an infinite dataset of global batches and
(optionally) an evaluation hook; the trainer owns the strategy, the optimizer,
`tf.train.CheckpointManager` (model, optimizer, step, EMA weights), resume, the NaN guard, progress
and TensorBoard scalars.

    trainer = Trainer(TrainerConfig(out_dir=..., steps=...), strategy, build_model, loss_fn,
                      dataset_fn, eval_fn)
    trainer.fit()
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
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
    # Multi-worker runs: the run folder shared by all workers when out_dir is a non-chief worker's
    # scratch folder (`worker_out_dir`); checkpoints are restored from it. None: out_dir.
    run_dir: Optional[str] = None

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


STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
_STRATEGY = None  # The strategy make_strategy built for this program.


def tf_config_workers() -> int:
    """Workers (the chief included) that the TF_CONFIG environment variable names; 0 without it."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    cluster = json.loads(raw).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def make_strategy(num_replicas: int = 0, kind: Optional[str] = None):
    """The one strategy for the run; call it before any other TensorFlow op.

    kind: "auto" (also None; the training scripts pass their --strategy) is "multi_worker" when
    TF_CONFIG names more than one worker, else what num_replicas asks for:
      num_replicas 0: all GPUs (MirroredStrategy), or the default strategy on a CPU-only machine;
      num_replicas n >= 1: MirroredStrategy over n devices; on a CPU-only machine the CPU is split
        into n logical devices (this must happen before TensorFlow initialises its devices).
    "default": the default (one-device) strategy. "mirrored": MirroredStrategy as above (0: all
    GPUs, or the CPU). "multi_worker": MultiWorkerMirroredStrategy over the TF_CONFIG cluster, each
    worker with all its GPUs (limit them with CUDA_VISIBLE_DEVICES) or its CPU; it starts this
    worker's gRPC server, so it must precede every other TensorFlow op.
    """
    global _STRATEGY
    kind = kind or "auto"
    if kind not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (got {kind!r})")
    if kind == "auto":
        kind = "multi_worker" if tf_config_workers() > 1 else None
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "multi_worker":
        if isinstance(_STRATEGY, tf.distribute.MultiWorkerMirroredStrategy):
            return _STRATEGY  # It can only be created once per program.
        if num_replicas not in (0, len(gpus) or 1):
            raise ValueError(
                f"with MultiWorkerMirroredStrategy each worker uses all its {len(gpus)} GPUs (or "
                f"its CPU); limit them with CUDA_VISIBLE_DEVICES, not num_replicas={num_replicas}")
        _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "default":
        if num_replicas > 1:
            raise ValueError(f"the default strategy has one replica (num_replicas={num_replicas})")
        _STRATEGY = tf.distribute.get_strategy()
    elif num_replicas == 0:
        _STRATEGY = (tf.distribute.MirroredStrategy() if gpus or kind == "mirrored"
                     else tf.distribute.get_strategy())
    else:
        _STRATEGY = _mirrored(num_replicas, gpus)
    return _STRATEGY


def _mirrored(num_replicas, gpus):
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


def worker_info(strategy=None):
    """(task_type, task_id, is_chief) of this process under strategy (None: the one make_strategy
    built); (None, None, True) outside a multi-worker cluster."""
    strategy = strategy if strategy is not None else _STRATEGY
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return None, None, True
    task_type, task_id = resolver.task_type, resolver.task_id
    # The TF multi-worker guides' rule: the "chief" task, or worker 0 when there is no chief task.
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict())
    return task_type, task_id, is_chief


def worker_out_dir(out_dir: str, strategy=None) -> str:
    """Where this worker writes: out_dir on the chief, out_dir/.<task>_<id>_tmp on other workers
    (a scratch folder the Trainer deletes at exit)."""
    task_type, task_id, is_chief = worker_info(strategy)
    return out_dir if is_chief else os.path.join(out_dir, f".{task_type}_{task_id}_tmp")


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
      images itself under trainer.val_writer. Only the chief evaluates.
    extra_trackables: more objects to save in the checkpoint.

    Multi-worker (MultiWorkerMirroredStrategy): every worker builds the same Trainer and calls
    fit(). Only the chief writes the run folder (checkpoints, TensorBoard, run_config.json); the
    others take part in each collective checkpoint save by writing into their scratch folder
    (`worker_out_dir`), emptied after each save and deleted at exit. All workers restore from the
    chief's checkpoints, so the run folder must be on a filesystem they share.
    """

    def __init__(self, config: TrainerConfig, strategy, build_model: Callable, loss_fn: Callable,
                 dataset_fn: Callable, eval_fn: Optional[Callable] = None,
                 extra_trackables: Optional[dict] = None, run_info: Optional[dict] = None):
        self.config = config
        self.strategy = strategy
        self.loss_fn = loss_fn
        self.dataset_fn = dataset_fn
        self.eval_fn = eval_fn
        self.task_type, self.task_id, self.is_chief = worker_info(strategy)
        self.run_dir = config.run_dir or config.out_dir  # The chief's folder.
        self.work_dir = worker_out_dir(self.run_dir, strategy)  # This worker's; run_dir on chief.
        if not self.is_chief:
            shutil.rmtree(self.work_dir, ignore_errors=True)  # Left over by a killed run.
            atexit.register(shutil.rmtree, self.work_dir, ignore_errors=True)
        os.makedirs(self.work_dir, exist_ok=True)
        with strategy.scope():
            self.model = build_model()
            self.learning_rate = make_learning_rate(config)
            self.optimizer = keras.optimizers.AdamW(
                learning_rate=self.learning_rate, weight_decay=config.weight_decay,
                clipnorm=config.clipnorm)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # A hand-made EMA, not Keras's optimizer(use_ema=True, ema_momentum=...). Tried under
            # MirroredStrategy, Keras's EMA updates, checkpoints, resumes and rolls back (its
            # averages are optimizer variables) and finalize_variable_values writes it into the
            # model, but: (1) it has no public handle on the averages, so `evaluate` could not swap
            # the EMA weights in and back out mid-run (finalize is one way) without the private
            # optimizer._model_variables_moving_average; (2) the checkpoint would keep them as
            # optimizer/_variables/<index> instead of "ema", so pretrained._restore_ema would have
            # to rebuild this exact optimizer to read a run in progress, and runs checkpointed
            # before would resume with zero averages; (3) it starts from the weights after the
            # first step, this one from the initial weights, so training figures would move.
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
            self.checkpoint, os.path.join(self.work_dir, "checkpoints"),
            max_to_keep=config.max_to_keep)
        if self.is_chief:
            self.train_writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "train"))
            self.val_writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "val"))
        else:
            self.train_writer = self.val_writer = tf.summary.create_noop_writer()
        self.restored_from = tf.train.latest_checkpoint(os.path.join(self.run_dir, "checkpoints"))
        if self.restored_from:
            self.checkpoint.restore(self.restored_from).expect_partial()
            logging.info("Resumed from %s at step %d", self.restored_from, int(self.step.numpy()))
        if self.task_type is not None:
            self._check_workers_agree()
        if self.is_chief:
            info = {"trainer": dataclasses.asdict(config), **(run_info or {})}
            with open(os.path.join(self.run_dir, "run_config.json"), "w") as f:
                json.dump(info, f, indent=2, default=str)
        self._train_step = self._make_train_step()
        self._snapshot, self._rollback = self._make_snapshot_fns()

    def _check_workers_agree(self):
        """Raise on every worker (rather than hang in a collective later) when the workers
        restored different steps, i.e. they do not see the same run folder."""
        strategy = self.strategy

        @tf.function
        def all_steps():
            local = strategy.run(lambda: tf.reshape(self.step.read_value(), [1]))
            return strategy.gather(local, axis=0)

        steps = all_steps().numpy()
        if not np.all(steps == steps[0]):
            raise RuntimeError(
                f"the workers restored different steps {steps.tolist()} from "
                f"{os.path.join(self.run_dir, 'checkpoints')}; a multi-worker run folder must be "
                "on a filesystem all workers share")

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
        """A checkpoint at the current step; a collective op under MultiWorkerMirroredStrategy, so
        every worker calls it. Returns the chief's checkpoint prefix."""
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.is_chief:  # The chief wrote the real one.
            shutil.rmtree(self.manager.directory, ignore_errors=True)
            path = os.path.join(self.run_dir, "checkpoints", os.path.basename(path))
        return path

    # ------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train until config.steps; returns a summary dict. Resumes from the latest checkpoint."""
        cfg = self.config
        start = int(self.step.numpy())
        if start >= cfg.steps:
            logging.info("Already at step %d >= %d steps; nothing to do", start, cfg.steps)
            return {"step": start, "losses": []}
        # The generated global batches are seeded the same on every worker; DATA sharding has each
        # worker keep its own replicas' slices of each global batch, so a multi-worker run trains
        # on exactly the batches of a one-machine run with the same seed (each worker simulates
        # the whole global batch, the price of that). AUTO would try FILE sharding first.
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        dataset = self.dataset_fn(start).with_options(options)
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
            if (self.eval_fn is not None and self.is_chief
                    and (step % cfg.eval_every == 0 or step == cfg.steps)):
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
