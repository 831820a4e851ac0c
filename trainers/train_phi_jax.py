"""Train phi under the Keras JAX backend, on a machine with JAX (a GPU) and no TensorFlow.

    KERAS_BACKEND=jax python trainers/train_phi_jax.py --out_dir runs/phi_jax --preset wholefield \
        --input_transform anscombe --context_filters 64 --upsample_filters 32,16 \
        --prediction_filters 16 --time_budget_s 240

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

from smlm_tfdiff.flags import (define_jax_trainer_flags, define_phi_flags, init_phi_weights,
                               jax_trainer_config_from_flags, phi_config_from_flags,
                               require_jax_backend)

define_jax_trainer_flags(batch_size=64, learning_rate=2e-3)

flags.DEFINE_string("preset", "wholefield", "Scene and camera preset (SimulationConfig.preset).")
define_phi_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    require_jax_backend("trainers/train_phi.py")
    from smlm_tfdiff.models.phi import build_phi
    from smlm_tfdiff.models.phi_training_jax import JaxPhiTrainer
    from smlm_tfdiff.pretrained import Pretrained, save_models
    from smlm_tfdiff.simulation.config import SimulationConfig

    sim_config = SimulationConfig.preset(FLAGS.preset)
    phi_config = phi_config_from_flags()
    phi = build_phi(sim_config, phi_config)
    init_weights = init_phi_weights(phi_config)
    if init_weights is not None:
        phi.set_weights(init_weights)

    def save(out_dir, model):
        save_models(out_dir, Pretrained(phi=model, config=sim_config, phi_config=phi_config))

    config = jax_trainer_config_from_flags()
    run_info = {"command": " ".join(sys.argv), "preset": FLAGS.preset, "init_phi": FLAGS.init_phi,
                "sim_config": sim_config.to_dict(),
                "phi_config": json.loads(phi_config.to_json()),
                "phi_parameters": int(phi.count_params())}
    logging.info("phi %s: %d parameters", phi_config, run_info["phi_parameters"])
    result = JaxPhiTrainer(config, phi, sim_config, save, run_info,
                           phi_config=phi_config).fit()
    logging.info("Wrote %s at step %d: %s", FLAGS.out_dir, result["step"], result["validation"])


if __name__ == "__main__":
    app.run(main)
