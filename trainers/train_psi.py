"""Train psi (the conditional diffusion model) on (y, phi(x)) pairs from the on-the-fly simulator.

    python trainers/train_psi.py --out_dir runs/psi_paper --phi paper --steps 20000

--phi names a bundled phi ("paper") or a phi run folder; phi is frozen. Restarting the same command
resumes from the latest checkpoint (also after a kill); a larger --steps extends a finished run.
TensorBoard (`tensorboard --logdir runs/psi_paper`): loss, learning rate, the validation noise-
estimation MSE per noise-level bucket, KDE MSE of y_hat and of the posterior mean, and images of
posterior samples, mean and std for fixed validation frames.
Writes psi.weights.h5 (EMA weights when --ema_decay is set), psi_config.json, diffusion.json,
sim_config.json and a copy of phi's files into --out_dir at the end: `st.load_models(out_dir)`.
"""

import json
import os
import sys

from absl import app, flags, logging

from smlm_tfdiff.flags import (define_trainer_flags, sim_config_from_flags,
                               trainer_config_from_flags)

define_trainer_flags(steps=20000, batch_size=32, learning_rate=1e-3, ema_decay=0.999)
flags.DEFINE_string("phi", "paper", "Frozen phi: a bundled model name or a phi run folder.")
flags.DEFINE_integer("base_channels", 8, "psi: channels of the first U-Net level.")
flags.DEFINE_list("channel_multipliers", ["1", "2", "4", "8"], "psi: channel multiplier per level.")
flags.DEFINE_integer("num_res_blocks", 1, "psi: res blocks per level (down; one more up).")
flags.DEFINE_list("attention_resolutions", ["10"], "psi: feature-map sizes with self-attention "
                  "(of the 80x80 paper KDE; the middle block always attends).")
flags.DEFINE_integer("space_to_depth", 1, "psi: run the U-Net on a grid this many KDE pixels "
                     "coarser per side (f x f blocks as f^2 channels; PsiConfig.space_to_depth): "
                     "~f^2 cheaper per evaluation.")
flags.DEFINE_integer("output_head", 0, "psi: channels of an output head on the KDE grid "
                     "(PsiConfig.output_head; for a psi on a coarser grid): 0, none. With "
                     "--init_psi from a psi without one, the head starts as no change.")
flags.DEFINE_float("dropout", 0.0, "psi: dropout in the res blocks.")
flags.DEFINE_integer("embedding_dim", 64, "psi: noise-level embedding width.")
flags.DEFINE_enum("noise_schedule", "paper", ["paper", "paper_extended", "cosine", "linear"],
                  "Noise schedule (NoiseSchedule.named): 'paper' is the seeds' linear 1e-4..1e-2; "
                  "'paper_extended' adds 0.4 T steps after it that reach noise.")
flags.DEFINE_integer("diffusion_steps", 100, "T of the noise schedule ('paper_extended': of its "
                     "seeds' part; the schedule then has 1.4 T steps).")
flags.DEFINE_bool("frame_condition", False, "Condition psi on the camera frame too, not only on "
                  "phi's KDE (PsiConfig.frame_condition; the camera from phi's config). With "
                  "--init_psi from a psi without it, the frame's input channel starts at zero.")
flags.DEFINE_enum("prediction", "eps", ["eps", "v", "v_residual"], "What psi's network "
                  "outputs: the noise eps (the seeds'), v = sqrt(gamma) eps - sqrt(1 - gamma) z_0, "
                  "which keeps the predicted z_0 accurate near noise, or the v of z_0 - (2 y_hat - "
                  "1), which predicts phi's estimate near noise before any training (use either v "
                  "with --noise_schedule paper_extended; models/psi.py).")
flags.DEFINE_enum("weighting", "snr", ["snr", "simple"], "Loss weighting: the seeds' SNR-weighted "
                  "eq. 8 or the uniform 'simple' loss.")
flags.DEFINE_integer("sample_t_start", None, "Guided-start step t* of the validation sampler and "
                     "the default of the exported model (default: T, the forward marginal; the "
                     "calibration tables of docs/calibration.md show what a smaller t* costs).")
flags.DEFINE_integer("sample_steps", 10, "Reverse steps of the validation sampler and the default "
                     "of the exported model.")
flags.DEFINE_string("mix_preset", None, "A second scene preset (e.g. isolated) mixed into every "
                    "batch with phi's camera, so psi also learns sparse frames' narrow posteriors.")
flags.DEFINE_float("mix_fraction", 0.25, "Fraction of each batch from --mix_preset.")
flags.DEFINE_integer("crop_size", None, "Train psi on windows of this many camera pixels cut "
                     "from each frame after phi has seen it whole (whole-field models: analyze "
                     "samples such windows); default: whole frames.")
flags.DEFINE_string("init_psi", None, "Start psi from this model's psi weights (a bundled name or "
                    "a run folder; fine-tuning): the same network required (PsiConfig."
                    "same_network: the crop size, prediction and frame condition may differ). "
                    "Ignored on resume.")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    # The strategy first: splitting the CPU into logical devices must precede any TF op.
    from smlm_tfdiff.models.training import Trainer, make_strategy
    strategy = make_strategy(FLAGS.num_replicas, FLAGS.strategy)
    from smlm_tfdiff.diffusion.recipe import Recipe
    from smlm_tfdiff.diffusion.schedule import NoiseSchedule
    from smlm_tfdiff.models.psi import PsiConfig, build_psi, frame_fields, transfer_weights
    from smlm_tfdiff.pretrained import load_phi_source, save_models
    from smlm_tfdiff.models.psi_training import PsiLoss, PsiValidation, psi_dataset

    cfg = trainer_config_from_flags()
    with strategy.scope():
        phi_models = load_phi_source(FLAGS.phi)
    phi = phi_models.phi
    phi.trainable = False
    # A brightness-normalised phi reads frames scaled to their N0 (PhiConfig).
    brightness = getattr(phi_models.phi_config, "brightness_reference", None)
    if getattr(phi_models.phi_config, "spread_input", False):
        raise app.UsageError(f"--phi {FLAGS.phi} is told the spread of the emitters' photons "
                             "(PhiConfig.spread_input), which psi training does not pass it yet; "
                             "train psi on the KDEs of a phi without it (psi reads only the KDE)")
    # phi's camera and optics with the scene of --preset (or --sim_config), then --set.
    sim_config = sim_config_from_flags(phi_models.scene_config(FLAGS.preset))
    schedule = NoiseSchedule.named(FLAGS.noise_schedule, FLAGS.diffusion_steps)
    # diffusion.json: the schedule, the weighting and the sampler's defaults (t_start None: T).
    recipe = Recipe(schedule, FLAGS.weighting, FLAGS.sample_t_start or None, FLAGS.sample_steps)
    if FLAGS.crop_size:  # Named in camera pixels before PsiConfig names its HR image_size.
        from smlm_tfdiff.models.psi_training import check_crop_size
        stride = FLAGS.space_to_depth * 2 ** (len(FLAGS.channel_multipliers) - 1)
        try:
            check_crop_size(sim_config, FLAGS.crop_size, stride)
        except ValueError as err:
            raise app.UsageError(f"--crop_size: {err}") from None
    psi_config = PsiConfig(
        base_channels=FLAGS.base_channels,
        channel_multipliers=tuple(int(m) for m in FLAGS.channel_multipliers),
        num_res_blocks=FLAGS.num_res_blocks,
        attention_resolutions=tuple(int(r) for r in FLAGS.attention_resolutions),
        image_size=(FLAGS.crop_size * sim_config.upsample if FLAGS.crop_size
                    else sim_config.hr_shape[0]), dropout=FLAGS.dropout,
        embedding_dim=FLAGS.embedding_dim, prediction=FLAGS.prediction,
        space_to_depth=FLAGS.space_to_depth, output_head=FLAGS.output_head,
        **frame_fields(phi_models.config, FLAGS.frame_condition))
    mix_config = phi_models.scene_config(FLAGS.mix_preset) if FLAGS.mix_preset else None
    init_psi = None
    if FLAGS.init_psi:
        init = load_phi_source(FLAGS.init_psi)
        if init.psi is None:
            raise app.UsageError(f"--init_psi {FLAGS.init_psi!r} has no psi")
        # The same network; its output may be read as eps or v (fine-tuning from eps to v), it
        # may be trained at another size, and it may gain the frame as an input.
        if not psi_config.same_network(init.psi_config):
            raise app.UsageError(f"--init_psi {FLAGS.init_psi!r} has {init.psi_config}, this run "
                                 f"{psi_config}: set the psi flags to match it")
        init_psi = init.psi

    def build_model():
        model = build_psi(psi_config)
        if init_psi is not None:  # A resumed run then restores its checkpoint over these.
            transfer_weights(init_psi, model)
        return model

    logging.info("Training psi on %d replica(s) (%s), %s, weighting %s",
                 strategy.num_replicas_in_sync, type(strategy).__name__, schedule, FLAGS.weighting)
    trainer = Trainer(
        cfg, strategy,
        build_model=build_model,
        loss_fn=PsiLoss(phi, schedule, FLAGS.weighting, psi_config.prediction, FLAGS.crop_size,
                        sim_config.upsample if FLAGS.crop_size else None,
                        psi_config.frame_condition),
        dataset_fn=lambda start: psi_dataset(sim_config, schedule, FLAGS.weighting,
                                             cfg.batch_size, cfg.seed, start, mix_config,
                                             FLAGS.mix_fraction, FLAGS.crop_size,
                                             psi_config.downsample_factor, brightness),
        eval_fn=PsiValidation(sim_config, phi, recipe, FLAGS.val_frames, FLAGS.val_seed,
                              psi_config=psi_config, brightness_reference=brightness),
        run_info={"preset": FLAGS.preset, "phi": FLAGS.phi, "init_psi": FLAGS.init_psi,
                  "mix_preset": FLAGS.mix_preset, "crop_size": FLAGS.crop_size,
                  "mix_fraction": FLAGS.mix_fraction if FLAGS.mix_preset else 0.0, "sim_config": sim_config.to_dict(),
                  "psi_config": json.loads(psi_config.to_json()), "diffusion": recipe.to_dict(),
                  "replicas": strategy.num_replicas_in_sync, "command": " ".join(sys.argv)})
    trainer.fit()
    trainer.swap_ema()  # Export the EMA weights when there are any.
    save_models(cfg.out_dir, phi_models, psi=trainer.model, psi_config=psi_config,
                recipe=recipe)
    logging.info("Wrote %s", os.path.join(cfg.out_dir, "psi.weights.h5"))


if __name__ == "__main__":
    app.run(main)
