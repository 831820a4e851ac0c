"""phi speed: inference frames/s at batch 256 (with and without XLA), time per training step, and
the time `detect` takes per frame on phi's KDEs (paper and isolated presets).

    python benchmarks/phi.py [--model paper] [--batch_size 256] [--train_batch_size 64]

Prints a readable table and one JSON line.
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import keras
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.models.phi import PhiConfig, build_phi
from smlm_tfdiff.models.phi_training import inference_fn, phi_loss, predict

flags.DEFINE_string("model", "", "Bundled model name or run folder (default: a fresh default phi; "
                    "speed does not depend on the weights).")
flags.DEFINE_integer("batch_size", 256, "Inference batch.")
flags.DEFINE_integer("chunk", 32, "Frames per chunk inside the batch (phi_training.predict).")
flags.DEFINE_integer("train_batch_size", 64, "Training batch.")
flags.DEFINE_float("seconds", 10.0, "Measuring time per variant.")
flags.DEFINE_integer("detect_frames", 100, "Frames per preset for the detection timing (0: skip).")
FLAGS = flags.FLAGS


def timed(fn, seconds):
    fn()
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main(argv):
    del argv
    if FLAGS.model:
        from smlm_tfdiff.pretrained import available, load_phi, pretrained
        model = pretrained(FLAGS.model) if FLAGS.model in available() else load_phi(FLAGS.model)
    else:
        from smlm_tfdiff.pretrained import Pretrained
        config = st.SimulationConfig.preset("paper")
        model = Pretrained(build_phi(config, PhiConfig()), config, PhiConfig())
    phi, config = model.phi, model.config
    data = st.simulate(config, max(FLAGS.batch_size, FLAGS.train_batch_size), seed=0)
    frames = tf.constant(data["frames"][:FLAGS.batch_size])
    results = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
               "tensorflow": tf.__version__, "params": phi.count_params(),
               "batch_size": FLAGS.batch_size}
    for jit in (False, True):
        fn = tf.function(lambda x: phi(x, training=False), jit_compile=jit)
        sec = timed(lambda: fn(frames).numpy(), FLAGS.seconds)
        results[f"inference_fps{'_xla' if jit else ''}"] = FLAGS.batch_size / sec
    # What phi_training.predict runs: the batch as chunks inside one XLA graph.
    fn = inference_fn(phi, FLAGS.chunk)
    sec = timed(lambda: fn(frames).numpy(), FLAGS.seconds)
    results[f"inference_fps_xla_chunk{FLAGS.chunk}"] = FLAGS.batch_size / sec
    optimizer = keras.optimizers.AdamW(1e-3)
    batch = {k: tf.constant(v[:FLAGS.train_batch_size]) for k, v in data.items()}

    for jit in (False, True):
        @tf.function(jit_compile=jit)
        def step(batch):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(phi_loss(phi, batch, True))
            grads = tape.gradient(loss, phi.trainable_variables)
            optimizer.apply_gradients(zip(grads, phi.trainable_variables))
            return loss

        sec = timed(lambda: step(batch).numpy(), FLAGS.seconds)
        results[f"train_step_ms_b{FLAGS.train_batch_size}{'_xla' if jit else ''}"] = 1000 * sec
    if FLAGS.detect_frames:
        for preset in ("paper", "isolated"):
            scene = model.scene_config(preset)
            kde = predict(phi, st.simulate(scene, FLAGS.detect_frames, seed=1)["frames"])
            start = time.perf_counter()
            st.detect(kde, scene)
            results[f"detect_ms_per_frame_{preset}"] = (
                1000 * (time.perf_counter() - start) / FLAGS.detect_frames)
    print(f"{'measure':32s} {'value':>10s}")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:32s} {value:10.1f}")
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in results.items()}))


if __name__ == "__main__":
    app.run(main)
