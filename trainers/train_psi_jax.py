"""Train psi under the Keras JAX backend, on a machine with JAX (a GPU) and no TensorFlow.

    KERAS_BACKEND=jax python trainers/train_psi_jax.py --out_dir runs/psi_jax --phi paper \
        --base_channels 16 --time_budget_s 480

The recipe of train_psi.py (frozen phi, the paper schedule, the SNR-weighted loss, AdamW with
warm-up and cosine decay, EMA weights exported), with the batches simulated inside the jitted step
(smlm_tfdiff/simulation/simulate_jax.py). --time_budget_s sizes the cosine schedule to the wall clock the
measured speed allows, so the run ends validated and saved within it. The EMA weights and the model
folder (phi's files, psi.weights.h5, psi_config.json, diffusion.json, train_log.json) are written
every --checkpoint_every_s seconds and at the end; `st.load_models(out_dir)` reads them under
either backend. With --state_dir the full state is saved too, and the same command resumes.
"""

import json
import os
import shutil
import sys

from absl import app, flags, logging

from smlm_tfdiff.flags import (define_jax_trainer_flags, jax_trainer_config_from_flags,
                               require_jax_backend)

define_jax_trainer_flags(batch_size=128, learning_rate=1e-3)

flags.DEFINE_string("phi", "paper", "Frozen phi: a bundled model name or a model folder.")
flags.DEFINE_string("preset", "paper", "Scene preset psi trains on (phi's camera and optics).")
flags.DEFINE_string("mix_preset", "isolated", "A second scene mixed into every batch (empty: none).")
flags.DEFINE_float("mix_fraction", 0.25, "Fraction of each batch from --mix_preset.")
flags.DEFINE_integer("base_channels", 16, "psi: channels of the first U-Net level.")
flags.DEFINE_list("channel_multipliers", ["1", "2", "4", "8"], "psi: channel multiplier per level.")
flags.DEFINE_integer("num_res_blocks", 1, "psi: res blocks per level (down; one more up).")
flags.DEFINE_list("attention_resolutions", ["10"], "psi: feature-map sizes with self-attention.")
flags.DEFINE_integer("embedding_dim", 64, "psi: noise-level embedding width.")
flags.DEFINE_integer("groups", 8, "psi: GroupNorm groups.")
flags.DEFINE_enum("noise_schedule", "paper", ["paper", "paper_extended", "cosine", "linear"],
                  "Noise schedule (NoiseSchedule.named); 'paper_extended' adds 0.4 T steps that "
                  "reach noise, so that the sampler's start carries no information about phi's "
                  "estimate (benchmarks/guided_start_information.py).")
flags.DEFINE_integer("diffusion_steps", 100, "T of the noise schedule ('paper_extended': of its "
                     "seeds' part).")
flags.DEFINE_enum("prediction", "eps", ["eps", "v", "v_residual"], "What psi's network outputs "
                  "(models/psi.py); use v or v_residual with a schedule that reaches noise.")
flags.DEFINE_bool("frame_condition", False, "Condition psi on the camera frame too, not only on "
                  "phi's KDE (PsiConfig.frame_condition; the camera from phi's config). With "
                  "--init_psi from a psi without it, the frame's input channel starts at zero.")
flags.DEFINE_enum("weighting", "snr", ["snr", "simple"], "Loss weighting.")
flags.DEFINE_string("init_psi", None, "Start psi from this model's psi weights (a bundled name or "
                    "a model folder; fine-tuning, e.g. onto another schedule or prediction): the "
                    "same psi flags otherwise. Ignored on resume.")
flags.DEFINE_integer("sample_steps", 10, "Default reverse steps of the exported sampler recipe.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    require_jax_backend("trainers/train_psi.py")
    from smlm_tfdiff.diffusion.recipe import Recipe
    from smlm_tfdiff.diffusion.schedule import NoiseSchedule
    from smlm_tfdiff.models.psi import PsiConfig, build_psi, frame_fields, transfer_weights
    from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_phi, save_models
    from smlm_tfdiff.models.psi_training_jax import JaxPsiTrainer

    phi_dir = FLAGS.phi if os.path.isdir(FLAGS.phi) else os.path.join(WEIGHTS_DIR, FLAGS.phi)
    if not os.path.isdir(phi_dir):
        raise app.UsageError(f"--phi {FLAGS.phi!r} is neither a model folder nor a bundled model")
    phi_models = load_phi(phi_dir)
    if getattr(phi_models.phi_config, "spread_input", False):
        raise app.UsageError(f"--phi {FLAGS.phi} is told the spread of the emitters' photons "
                             "(PhiConfig.spread_input), which psi training does not pass it yet; "
                             "train psi on the KDEs of a phi without it (psi reads only the KDE)")
    phi = phi_models.phi
    phi.trainable = False
    sim_config = phi_models.scene_config(FLAGS.preset)
    mix_config = phi_models.scene_config(FLAGS.mix_preset) if FLAGS.mix_preset else None
    schedule = NoiseSchedule.named(FLAGS.noise_schedule, FLAGS.diffusion_steps)
    psi_config = PsiConfig(
        base_channels=FLAGS.base_channels,
        channel_multipliers=tuple(int(m) for m in FLAGS.channel_multipliers),
        num_res_blocks=FLAGS.num_res_blocks,
        attention_resolutions=tuple(int(r) for r in FLAGS.attention_resolutions),
        image_size=sim_config.hr_shape[0], dropout=0.0, groups=FLAGS.groups,
        embedding_dim=FLAGS.embedding_dim, prediction=FLAGS.prediction,
        **frame_fields(phi_models.config, FLAGS.frame_condition))
    psi = build_psi(psi_config)
    if FLAGS.init_psi:
        from smlm_tfdiff.pretrained import load_phi_source
        init = load_phi_source(FLAGS.init_psi)  # A bundled name or a model folder.
        if init.psi is None:
            raise app.UsageError(f"--init_psi {FLAGS.init_psi!r} is not a model folder with psi")
        # The same network; its output may be read as eps or v (fine-tuning from eps to v), it
        # may be trained at another size, and it may gain the frame as an input.
        if not psi_config.same_network(init.psi_config):
            raise app.UsageError(f"--init_psi {FLAGS.init_psi!r} has {init.psi_config}, this run "
                                 f"{psi_config}: set the psi flags to match it")
        transfer_weights(init.psi, psi)
    # diffusion.json: the schedule, the weighting and the sampler's defaults (guided start at T).
    recipe = Recipe(schedule, FLAGS.weighting, num_steps=FLAGS.sample_steps)

    def save(out_dir, model):
        save_models(out_dir, phi_models, psi=model, psi_config=psi_config, recipe=recipe)
        # phi's own file, byte for byte (save_models would re-serialise it).
        shutil.copyfile(os.path.join(phi_dir, "phi.weights.h5"),
                        os.path.join(out_dir, "phi.weights.h5"))

    config = jax_trainer_config_from_flags()
    run_info = {"command": " ".join(sys.argv), "phi": FLAGS.phi, "preset": FLAGS.preset,
                "init_psi": FLAGS.init_psi,
                "mix_preset": FLAGS.mix_preset or None,
                "mix_fraction": FLAGS.mix_fraction if FLAGS.mix_preset else 0.0,
                "psi_config": json.loads(psi_config.to_json()), "diffusion": recipe.to_dict(),
                "psi_parameters": int(psi.count_params())}
    logging.info("psi %s: %d parameters", psi_config, run_info["psi_parameters"])
    trainer = JaxPsiTrainer(config, phi, psi, sim_config, schedule, FLAGS.weighting, save,
                            mix_config, FLAGS.mix_fraction, run_info, FLAGS.prediction,
                            psi_config.frame_condition,
                            getattr(phi_models.phi_config, "brightness_reference", None))
    result = trainer.fit()
    logging.info("Wrote %s at step %d: %s", FLAGS.out_dir, result["step"], result["validation"])


if __name__ == "__main__":
    app.run(main)
