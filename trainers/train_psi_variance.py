"""Train psi_var, the experimental learned per-pixel reverse variance of a trained psi
(smlm_tfdiff/experimental/reverse_variance.py; measured as no gain, in no bundled model).

    python trainers/train_psi_variance.py --out_dir runs/psi_var --psi paper --steps 2000

--psi names a bundled model ("paper") or a psi run folder; phi and psi are frozen. psi_var starts
from psi's weights and learns log k, k = E[(eps - eps_psi)^2 | z_t, y_hat] / gamma per pixel (so
Var(z_0 | z_t) = (1 - gamma) k), from psi's own residuals at noise levels drawn uniformly over the
schedule. Restarting the same command resumes from the latest checkpoint. TensorBoard: the loss,
and per noise-level bucket of fixed validation frames the NLL, mean target / mean k (1 when k is
right on average) and the Pearson r of k with the target over pixels (how well k locates the
error), medians over frames. Writes phi's and psi's files and psi_var.weights.h5
(EMA weights when --ema_decay is set) into --out_dir: `st.load_models(out_dir)` samples with it.
"""

import json
import os
import sys

from absl import app, flags, logging

from smlm_tfdiff.flags import (define_trainer_flags, sim_config_from_flags,
                               trainer_config_from_flags)

define_trainer_flags(steps=2000, batch_size=32, learning_rate=5e-4, ema_decay=0.998)
flags.DEFINE_string("psi", "paper", "Frozen phi and psi: a bundled model name or a psi run folder.")
flags.DEFINE_string("mix_preset", "isolated", "A second scene preset mixed into every batch (as "
                    "psi was trained); empty for none.")
flags.DEFINE_float("mix_fraction", 0.25, "Fraction of each batch from --mix_preset.")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from smlm_tfdiff.models.training import Trainer, make_strategy
    strategy = make_strategy(FLAGS.num_replicas, FLAGS.strategy)
    from smlm_tfdiff.pretrained import load_phi_source, save_models
    from smlm_tfdiff.models.psi_training import psi_dataset
    from smlm_tfdiff.experimental.reverse_variance import VarianceLoss, VarianceValidation, build_variance_net

    cfg = trainer_config_from_flags()
    with strategy.scope():
        models = load_phi_source(FLAGS.psi)
    if models.psi is None:
        raise app.UsageError(f"--psi {FLAGS.psi!r} has no psi: train one with train_psi.py first")
    models.phi.trainable = models.psi.trainable = False
    sim_config = sim_config_from_flags(models.scene_config(FLAGS.preset))
    mix_config = models.scene_config(FLAGS.mix_preset) if FLAGS.mix_preset else None
    logging.info("Training psi_var for psi of %s on %d replica(s), %s", FLAGS.psi,
                 strategy.num_replicas_in_sync, models.schedule)
    trainer = Trainer(
        cfg, strategy,
        build_model=lambda: build_variance_net(models.psi_config, models.psi),
        loss_fn=VarianceLoss(models.phi, models.psi),
        dataset_fn=lambda start: psi_dataset(sim_config, models.schedule, "simple",
                                             cfg.batch_size, cfg.seed, start, mix_config,
                                             FLAGS.mix_fraction),
        eval_fn=VarianceValidation(sim_config, models.phi, models.psi, models.schedule,
                                   FLAGS.val_frames, FLAGS.val_seed),
        run_info={"preset": FLAGS.preset, "psi": FLAGS.psi, "mix_preset": FLAGS.mix_preset,
                  "mix_fraction": FLAGS.mix_fraction if FLAGS.mix_preset else 0.0,
                  "sim_config": sim_config.to_dict(),
                  "psi_config": json.loads(models.psi_config.to_json()), "diffusion": models.recipe.to_dict(),
                  "replicas": strategy.num_replicas_in_sync, "command": " ".join(sys.argv)})
    trainer.fit()
    trainer.swap_ema()
    save_models(cfg.out_dir, models, psi=models.psi, psi_config=models.psi_config,
                recipe=models.recipe, psi_var=trainer.model)
    logging.info("Wrote %s", os.path.join(cfg.out_dir, "psi_var.weights.h5"))


if __name__ == "__main__":
    app.run(main)
