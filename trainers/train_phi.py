"""Train phi (frame -> KDE) on the on-the-fly simulator under a tf.distribute strategy.

    python trainers/train_phi.py --out_dir runs/phi_paper --preset paper --steps 10000

Restarting the same command resumes from the latest checkpoint (also after a kill); a larger
--steps extends a finished run. TensorBoard: `tensorboard --logdir runs/phi_paper`.
Writes phi.weights.h5, phi_config.json and sim_config.json into --out_dir at the end.
"""

import json
import os
import sys

from absl import app, flags, logging

from smlm_tfdiff.flags import (define_trainer_flags, sim_config_from_flags,
                               trainer_config_from_flags)

define_trainer_flags(steps=10000, batch_size=64, learning_rate=2e-3)
flags.DEFINE_integer("context_filters", 32, "phi: channels of the context module.")
flags.DEFINE_list("dilations", ["1", "2", "4", "8", "4", "2"], "phi: dilation rates.")
flags.DEFINE_list("upsample_filters", ["16", "8"], "phi: channels of the 2x resize-convs.")
flags.DEFINE_integer("prediction_filters", 8, "phi: channels of the prediction blocks.")
flags.DEFINE_float("dropout", 0.0, "phi: dropout after every context and upsampling block (> 0 "
                   "makes an MC-dropout model, smlm_tfdiff.uncertainty.mc_dropout).")
flags.DEFINE_string("init_phi", None, "Start from this phi's weights (a bundled name or a run "
                    "folder; fine-tuning): same widths required, dropout may differ. Ignored on "
                    "resume.")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # The strategy first: splitting the CPU into logical devices must precede any TF op.
    from smlm_tfdiff.models.training import Trainer, make_strategy
    strategy = make_strategy(FLAGS.num_replicas, FLAGS.strategy)
    from smlm_tfdiff.models.phi import PhiConfig, build_phi
    from smlm_tfdiff.models.phi_training import PhiValidation, phi_dataset, phi_loss

    cfg = trainer_config_from_flags()
    sim_config = sim_config_from_flags()
    phi_config = PhiConfig(context_filters=FLAGS.context_filters,
                           dilations=tuple(int(d) for d in FLAGS.dilations),
                           upsample_filters=tuple(int(f) for f in FLAGS.upsample_filters),
                           prediction_filters=FLAGS.prediction_filters,
                           dropout=FLAGS.dropout)
    init_weights = None
    if FLAGS.init_phi:
        import dataclasses
        from smlm_tfdiff.pretrained import load_phi_source
        init = load_phi_source(FLAGS.init_phi)
        if dataclasses.replace(init.phi_config, dropout=0.0) != dataclasses.replace(
                phi_config, dropout=0.0):
            raise app.UsageError(f"--init_phi {FLAGS.init_phi!r} has {init.phi_config}, this run "
                                 f"{phi_config}: set the phi flags to match it")
        init_weights = init.phi.get_weights()

    def build_model():
        model = build_phi(sim_config, phi_config)
        if init_weights is not None:  # A resumed run then restores its checkpoint over these.
            model.set_weights(init_weights)
        return model

    logging.info("Training phi on %d replica(s) (%s)", strategy.num_replicas_in_sync,
                 type(strategy).__name__)
    trainer = Trainer(
        cfg, strategy,
        build_model=build_model,
        loss_fn=phi_loss,
        dataset_fn=lambda start: phi_dataset(sim_config, cfg.batch_size, cfg.seed, start),
        eval_fn=PhiValidation(sim_config, FLAGS.val_frames, FLAGS.val_seed),
        run_info={"preset": FLAGS.preset, "init_phi": FLAGS.init_phi,
                  "sim_config": sim_config.to_dict(),
                  "phi_config": json.loads(phi_config.to_json()),
                  "replicas": strategy.num_replicas_in_sync, "command": " ".join(sys.argv)})
    trainer.fit()
    trainer.swap_ema()  # Export the EMA weights when there are any.
    trainer.model.save_weights(os.path.join(cfg.out_dir, "phi.weights.h5"))
    with open(os.path.join(cfg.out_dir, "phi_config.json"), "w") as f:
        f.write(phi_config.to_json())
    with open(os.path.join(cfg.out_dir, "sim_config.json"), "w") as f:
        f.write(sim_config.to_json())
    logging.info("Wrote %s", os.path.join(cfg.out_dir, "phi.weights.h5"))


if __name__ == "__main__":
    app.run(main)
