"""Export the phi -> psi posterior sampler as a SavedModel for TensorFlow Serving.

    python export/export_savedmodel.py --export_dir models/smlm            # -> models/smlm/1/
    python export/export_savedmodel.py --model runs/psi_paper --export_dir models/smlm --version 2

TF Serving loads <model base path>/<integer version>/, so the SavedModel goes to
--export_dir/--version. The export is atomic (written next to it, then renamed); an existing
non-empty version folder is refused unless --overwrite. See export/README.md for the signatures.
"""

import os
import sys
import time

from absl import app, flags, logging
from smlm_tfdiff import flags as shared_flags

shared_flags.define_model_flag()
flags.DEFINE_string("export_dir", None, "Model base path; the SavedModel goes to "
                    "<export_dir>/<version>/.")
flags.DEFINE_enum("method", "ddpm", ["ddpm", "ddim"], "Reverse sampler: ddpm (ancestral, eta 1) "
                  "or ddim (eta 0). Fixed in the export.")
flags.DEFINE_integer("t_start", None, "Guided-start step of the reverse process (default: the "
                     "model's t_start); requests may ask for 1..t_start steps.", lower_bound=1)
flags.DEFINE_integer("version", 1, "Version subfolder TF Serving loads.", lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty version folder.")
flags.DEFINE_float("photons", None, "Photons per emitter (N0) of the dye the export is for: "
                   "required for a model whose phi reads frames scaled to it (phi_config.json "
                   "brightness_reference), refused for others.")
flags.DEFINE_float("photon_spread", None, "The log-sd of the dye's photons about N0 the "
                   "export is for: required for a model whose phi is told it (phi_config.json "
                   "spread_input), refused for others.")
flags.DEFINE_integer("max_images", 2048, "Most frames x num_samples one request may ask for; "
                     "larger requests fail with InvalidArgument instead of running out of memory "
                     "(export/README.md).", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from smlm_tfdiff.serving import check_export_dir, describe_signatures, export_savedmodel

    target = os.path.join(FLAGS.export_dir, str(FLAGS.version))
    try:
        check_export_dir(os.path.abspath(target), FLAGS.overwrite)  # Before loading anything.
    except FileExistsError as e:
        sys.exit(f"error: {e}")

    from smlm_tfdiff.pretrained import load_phi_source
    models = load_phi_source(FLAGS.model)
    if getattr(models, "psi", None) is None:
        sys.exit(f"error: {FLAGS.model!r} has no diffusion model psi (psi.weights.h5); train one "
                 "with trainers/train_psi.py or use --model paper")
    start = time.time()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # tf.saved_model.save logs every captured variable.
    try:
        path = export_savedmodel(models, target, method=FLAGS.method, t_start=FLAGS.t_start,
                                 overwrite=FLAGS.overwrite, max_images=FLAGS.max_images,
                                 photons=FLAGS.photons, spread=FLAGS.photon_spread)
    except FileExistsError as e:
        sys.exit(f"error: {e}")
    finally:
        logging.set_verbosity(verbosity)
    logging.info("Wrote the SavedModel of %r (method %s, t_start %s) to %s in %.1f s",
                 FLAGS.model, FLAGS.method, FLAGS.t_start or models.t_start, path,
                 time.time() - start)
    for name, sig in sorted(describe_signatures(path).items()):
        logging.info("signature %r", name)
        for kind in ("inputs", "outputs"):
            for key, (dtype, shape) in sig[kind].items():
                shape = "unknown rank" if shape is None else shape
                logging.info("  %-7s %-16s %-7s %s", kind[:-1], key, dtype, shape)


if __name__ == "__main__":
    flags.mark_flag_as_required("export_dir")
    app.run(main)
