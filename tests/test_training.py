"""The shared trainer: MirroredStrategy on 2 logical CPUs, checkpoints, resume (with the EMA),
TensorBoard, NaN guard."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.models.phi import PhiConfig, build_phi
from smlm_tfdiff.models.phi_training import phi_dataset, phi_loss
from smlm_tfdiff.models.training import NonFiniteLossError, Trainer, TrainerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--context_filters=8", "--dilations=1,2", "--upsample_filters=8,4",
         "--prediction_filters=4"]


def _train(cli, out_dir, steps):
    res = cli(os.path.join(ROOT, "trainers", "train_phi.py"), f"--out_dir={out_dir}",
              f"--steps={steps}", "--batch_size=16", "--num_replicas=2", "--log_every=5",
              "--eval_every=20", "--checkpoint_every=10", "--val_frames=16",
              "--learning_rate=3e-3", "--warmup_steps=5", "--noprogress", *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


@pytest.mark.slow
def test_mirrored_training_checkpoints_resume_and_tensorboard(tmp_path, cli, scalars):
    out = str(tmp_path / "run")
    log = _train(cli, out, 40)
    assert "Training phi on 2 replica(s) (MirroredStrategy)" in log
    losses = scalars(os.path.join(out, "train"), "loss")
    assert [s for s, _ in losses] == list(range(5, 45, 5))
    assert losses[-1][1] < 0.7 * losses[0][1]  # The loss fell.
    assert os.path.exists(os.path.join(out, "checkpoints", "ckpt-40.index"))
    for tag in ("learning_rate", "steps_per_second"):
        assert len(scalars(os.path.join(out, "train"), tag)) == 8
    assert [s for s, _ in scalars(os.path.join(out, "val"), "loss")] == [20, 40]
    assert os.path.exists(os.path.join(out, "phi.weights.h5"))
    # Extending the finished run resumes at step 40 and continues the step count.
    log = _train(cli, out, 60)
    assert "Resumed from" in log and "at step 40" in log
    steps = [s for s, _ in scalars(os.path.join(out, "train"), "loss")]
    assert steps[-4:] == [45, 50, 55, 60]
    assert os.path.exists(os.path.join(out, "checkpoints", "ckpt-60.index"))
    # The weights written at the end load into a fresh phi.
    from smlm_tfdiff.pretrained import load_phi
    loaded = load_phi(out)
    assert loaded.phi_config.context_filters == 8
    assert loaded.phi(np.full((1, 20, 20, 1), 100.0, np.float32)).shape == (1, 80, 80, 1)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, paper):
    holder = {}

    def poisoned_loss(model, batch, training):
        loss = phi_loss(model, batch, training)
        # The 4th step (step counter 3 before it is incremented) goes NaN.
        return loss * tf.where(holder["trainer"].step >= 3, np.nan, 1.0)

    small = PhiConfig(context_filters=4, dilations=(1,), upsample_filters=(4, 4),
                      prediction_filters=4)
    cfg = TrainerConfig(out_dir=str(tmp_path), steps=10, batch_size=4, checkpoint_every=100,
                        progress=False)
    trainer = Trainer(cfg, tf.distribute.get_strategy(), lambda: build_phi(paper, small),
                      poisoned_loss, lambda start: phi_dataset(paper, 4, 0, start))
    holder["trainer"] = trainer
    good = {}

    with pytest.raises(NonFiniteLossError, match="loss became nan at step 4.*last good state \\(step 3\\)"):
        original = trainer._snapshot

        def snapshot():
            original()
            good.update({v.path: v.numpy().copy() for v in trainer.model.variables})
        trainer._snapshot = snapshot
        trainer.fit()
    assert os.path.exists(os.path.join(str(tmp_path), "checkpoints", "ckpt-3.index"))
    assert int(trainer.step.numpy()) == 3
    for v in trainer.model.variables:
        np.testing.assert_array_equal(v.numpy(), good[v.path])
        assert np.all(np.isfinite(v.numpy()))
    assert glob.glob(os.path.join(str(tmp_path), "train", "events*"))


def _tiny_trainer(out_dir, steps):
    """A Trainer with an EMA of a 2-layer Dense model on seeded regression batches: batch i of
    the run depends on i only, so a resumed run sees the batches an unbroken one does."""
    def build():
        init = keras.initializers.GlorotUniform(seed=1)  # The same start in every run.
        return keras.Sequential([keras.Input((3,)),
                                 keras.layers.Dense(4, "tanh", kernel_initializer=init),
                                 keras.layers.Dense(1, kernel_initializer=init)])

    def batches(start):
        def batch(i):
            x = tf.random.stateless_normal([8, 3], tf.stack([i, tf.constant(0, tf.int64)]))
            return {"x": x, "y": tf.reduce_sum(x, axis=1, keepdims=True)}
        return tf.data.Dataset.range(start, 1 << 30).map(batch)

    def loss(model, batch, training):
        return tf.reduce_mean(tf.square(model(batch["x"], training=training) - batch["y"]), 1)

    cfg = TrainerConfig(out_dir=out_dir, steps=steps, batch_size=8, learning_rate=0.05,
                        schedule="constant", ema_decay=0.5, checkpoint_every=100, progress=False)
    return Trainer(cfg, tf.distribute.get_strategy(), build, loss, batches,
                   run_info={"what": "tiny"})


def test_resumed_run_restores_the_ema_and_a_run_in_progress_loads_it(tmp_path):
    """The EMA weights are checkpointed: a run resumed from step 3 ends with the model, optimizer
    and EMA of an unbroken 5-step run, and pretrained._restore_ema (load_models of a psi run in
    progress) reads the EMA weights of a checkpoint into a fresh model."""
    from smlm_tfdiff.pretrained import _restore_ema, _run_info

    straight = _tiny_trainer(str(tmp_path / "straight"), 5)
    straight.fit()
    out = str(tmp_path / "resumed")
    first = _tiny_trainer(out, 3)
    first.fit()
    ema_at_3 = [e.numpy() for e in first.ema]
    assert any(np.abs(e - v.numpy()).max() > 1e-3
               for e, v in zip(ema_at_3, first.model.trainable_variables))
    fresh = _tiny_trainer(str(tmp_path / "fresh"), 3).model  # At its initial weights.
    assert np.abs(fresh.trainable_variables[0].numpy() - ema_at_3[0]).max() > 1e-3
    _restore_ema(fresh, tf.train.latest_checkpoint(os.path.join(out, "checkpoints")),
                 _run_info(out))
    for a, b in zip(fresh.trainable_variables, ema_at_3):
        np.testing.assert_array_equal(a.numpy(), b)
    resumed = _tiny_trainer(out, 5)
    assert int(resumed.step.numpy()) == 3
    for a, b in zip(resumed.ema, ema_at_3):
        np.testing.assert_array_equal(a.numpy(), b)
    resumed.fit()
    for a, b in zip(resumed.ema + resumed.model.trainable_variables,
                    straight.ema + straight.model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_trainer_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainerConfig(out_dir="x", steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(out_dir="x", steps=1, schedule="linear")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainerConfig(out_dir="x", steps=1, ema_decay=1.5)
    assert st.SimulationConfig.preset("paper").padded_emitters == 10


def test_config_overrides_for_your_own_camera():
    from absl import app

    from smlm_tfdiff.simulation.config import SimulationConfig
    from smlm_tfdiff.flags import apply_overrides

    base = SimulationConfig.preset("paper")
    cfg = apply_overrides(base, ["gain=2.5", "offset=400", "readout_var=9",
                                 "photons_range=[100, 1000]", "region=frame"])
    assert (cfg.gain, cfg.offset, cfg.readout_var) == (2.5, 400, 9)
    assert cfg.photons_range == (100.0, 1000.0) and cfg.region == "frame"
    with pytest.raises(app.UsageError, match="unknown SimulationConfig field 'gian'"):
        apply_overrides(base, ["gian=2"])
    with pytest.raises(app.UsageError, match="FIELD=VALUE"):
        apply_overrides(base, ["gain"])
    with pytest.raises(app.UsageError, match="invalid config"):
        apply_overrides(base, ["gain=-1"])


def test_trainer_flags_are_key_flags_of_the_script():
    """define_trainer_flags makes every flag it defines (and --seed, --model, ... defined before by
    smlm_tfdiff.flags) a key flag of the running script, so that its --help lists them."""
    import sys

    from absl import flags

    from smlm_tfdiff.flags import define_model_flag, define_trainer_flags

    FLAGS = flags.FLAGS
    before = set(FLAGS)
    try:
        define_model_flag()
        define_trainer_flags()
        defined = {f.name for f in FLAGS.get_flags_for_module("smlm_tfdiff.flags")}
        assert {"out_dir", "steps", "batch_size", "ema_decay", "seed", "model", "jit_compile",
                "strategy", "resume"} <= defined
        key = {f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])}
        assert defined <= key, defined - key
        text = FLAGS.module_help(sys.argv[0])
        for name in ("--out_dir", "--steps", "--[no]resume", "--model", "--seed"):
            assert name in text, name
    finally:
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)
