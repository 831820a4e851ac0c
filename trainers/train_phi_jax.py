"""Train phi under the Keras JAX backend, on a machine with JAX (a GPU) and no TensorFlow.

    KERAS_BACKEND=jax python trainers/train_phi_jax.py --out_dir runs/phi_jax --preset wholefield \
        --context_filters 64 --upsample_filters 32,16 --prediction_filters 16 --time_budget_s 240

train_phi.py's loss (the seeds' L_phi, MSE against the KDE), with the batches simulated inside
the jitted step (smlm_tfdiff/simulation/simulate_jax.py), AdamW with warm-up and cosine decay and
EMA weights exported. --time_budget_s sizes the cosine schedule to the wall clock the measured
speed allows. The model folder (phi.weights.h5, phi_config.json, sim_config.json,
detection.json, train_log.json) is written every --checkpoint_every_s seconds and at the end;
`st.load_phi(out_dir)` reads it under either backend, and train_psi(_jax).py take it as --phi.
With --state_dir the full state is saved too, and the same command resumes. Localization
metrics are not computed here (detection runs on the CPU): trainers/evaluate_phi.py does that.
"""

import json
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("out_dir", None, "Model folder to write (load_phi reads it).")
flags.DEFINE_string("preset", "wholefield", "Scene and camera preset (SimulationConfig.preset).")
flags.DEFINE_integer("context_filters", 32, "phi: channels of the context module.")
flags.DEFINE_list("dilations", ["1", "2", "4", "8", "4", "2"], "phi: dilation rates.")
flags.DEFINE_list("upsample_filters", ["16", "8"], "phi: channels of the 2x resize-convs.")
flags.DEFINE_integer("prediction_filters", 8, "phi: channels of the prediction blocks.")
flags.DEFINE_string("init_phi", None, "Start from this phi's weights (a bundled name or a model "
                    "folder): same widths required. Ignored on resume.")
flags.DEFINE_integer("batch_size", 64, "Global batch.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate (AdamW).")
flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
flags.DEFINE_float("ema_decay", 0.999, "EMA decay of the exported weights.")
flags.DEFINE_integer("steps", 100000, "Steps (the most, when --time_budget_s is set).")
flags.DEFINE_float("time_budget_s", None, "Wall clock for the whole run; sizes the schedule.")
flags.DEFINE_float("checkpoint_every_s", 60.0, "Seconds between weight saves.")
flags.DEFINE_integer("log_every", 100, "Steps between log lines.")
flags.DEFINE_integer("eval_every", 2000, "Steps between validations.")
flags.DEFINE_integer("val_frames", 256, "Validation frames.")
flags.DEFINE_integer("seed", 0, "Training seed.")
flags.DEFINE_string("state_dir", None, "Save the full training state here (resumable).")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import dataclasses

    import keras
    if keras.backend.backend() != "jax":
        raise app.UsageError(f"run with KERAS_BACKEND=jax (the backend is "
                             f"{keras.backend.backend()!r}); trainers/train_phi.py trains with "
                             "TensorFlow")
    from smlm_tfdiff.models.phi import PhiConfig, build_phi
    from smlm_tfdiff.models.phi_training_jax import JaxPhiTrainer
    from smlm_tfdiff.models.training_jax import JaxTrainConfig
    from smlm_tfdiff.pretrained import Pretrained, load_phi_source, save_models
    from smlm_tfdiff.simulation.config import SimulationConfig

    sim_config = SimulationConfig.preset(FLAGS.preset)
    phi_config = PhiConfig(context_filters=FLAGS.context_filters,
                           dilations=tuple(int(d) for d in FLAGS.dilations),
                           upsample_filters=tuple(int(f) for f in FLAGS.upsample_filters),
                           prediction_filters=FLAGS.prediction_filters)
    phi = build_phi(sim_config, phi_config)
    if FLAGS.init_phi:
        init = load_phi_source(FLAGS.init_phi)
        if dataclasses.replace(init.phi_config, dropout=0.0) != phi_config:
            raise app.UsageError(f"--init_phi {FLAGS.init_phi!r} has {init.phi_config}, this run "
                                 f"{phi_config}: set the phi flags to match it")
        phi.set_weights(init.phi.get_weights())

    def save(out_dir, model):
        save_models(out_dir, Pretrained(phi=model, config=sim_config, phi_config=phi_config))

    config = JaxTrainConfig(
        out_dir=FLAGS.out_dir, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps, ema_decay=FLAGS.ema_decay, max_steps=FLAGS.steps,
        time_budget_s=FLAGS.time_budget_s, checkpoint_every_s=FLAGS.checkpoint_every_s,
        log_every=FLAGS.log_every, eval_every=FLAGS.eval_every, seed=FLAGS.seed,
        val_frames=FLAGS.val_frames, state_dir=FLAGS.state_dir)
    run_info = {"command": " ".join(sys.argv), "preset": FLAGS.preset, "init_phi": FLAGS.init_phi,
                "sim_config": sim_config.to_dict(),
                "phi_config": json.loads(phi_config.to_json()),
                "phi_parameters": int(phi.count_params())}
    logging.info("phi %s: %d parameters", phi_config, run_info["phi_parameters"])
    result = JaxPhiTrainer(config, phi, sim_config, save, run_info).fit()
    logging.info("Wrote %s at step %d: %s", FLAGS.out_dir, result["step"], result["validation"])


if __name__ == "__main__":
    app.run(main)
