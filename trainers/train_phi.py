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

from smlm_tfdiff.flags import (define_phi_flags, define_trainer_flags, init_phi_weights,
                               phi_config_from_flags, sim_config_from_flags,
                               trainer_config_from_flags)

define_trainer_flags(steps=10000, batch_size=64, learning_rate=2e-3)
define_phi_flags(dropout=True)
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # The strategy first: splitting the CPU into logical devices must precede any TF op.
    from smlm_tfdiff.models.training import Trainer, make_strategy
    strategy = make_strategy(FLAGS.num_replicas, FLAGS.strategy)
    from smlm_tfdiff.models.phi import build_phi
    from smlm_tfdiff.models.phi_training import PhiValidation, phi_dataset, phi_loss

    cfg = trainer_config_from_flags()
    sim_config = sim_config_from_flags()
    phi_config = phi_config_from_flags()
    init_weights = init_phi_weights(phi_config)

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
        dataset_fn=lambda start: phi_dataset(sim_config, cfg.batch_size, cfg.seed, start,
                                             phi_config),
        eval_fn=PhiValidation(sim_config, FLAGS.val_frames, FLAGS.val_seed,
                              phi_config=phi_config),
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
