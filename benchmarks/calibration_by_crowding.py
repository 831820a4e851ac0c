"""std(z) of the per-localization uncertainty by crowding, on validation frames (never the
evaluation seeds): does psi's dense under-dispersion depend on how close the neighbours are?

    python benchmarks/calibration_by_crowding.py --model paper --dense_frames 36

Dense paper frames (seed 777) and isolated frames (seed 778) of `_validation.validation_frames`,
32 projected posterior samples per frame with the model's recipe; every localization of phi
matched to the truth (5 HR px) gets z = (phi's position - truth) / reported std per axis, and is
binned by the number of other localizations within --radius camera px (its crowding). Prints
std(z) per bin with its standard error (sd / sqrt(2 (n - 1)), n the z values) and the mean
reported std, and one JSON line.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

from _validation import crowding_scores, std_z, validation_frames
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.pretrained import load_phi_source

flags.DEFINE_string("model", "paper", "A bundled model name or a model folder with psi.")
flags.DEFINE_integer("dense_frames", 36, "Paper-preset frames (validation seed 777).")
flags.DEFINE_integer("iso_frames", 12, "Isolated-emitter frames (validation seed 778).")
flags.DEFINE_float("radius", 5.0, "Neighbourhood radius, camera px.")
flags.DEFINE_list("bins", ["0", "1", "4", "7"], "Lower edges of the neighbour-count bins.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    icfg, iso, dcfg, dense = validation_frames(models, FLAGS.iso_frames, FLAGS.dense_frames)
    sampler = PosteriorSampler(models)
    scores = [crowding_scores(sampler, data, cfg, FLAGS.radius)
              for data, cfg in ((dense, dcfg), (iso, icfg))]
    counts = np.concatenate([s["neighbours"] for s in scores])
    z = np.concatenate([s["z"] for s in scores])
    std = np.concatenate([s["std_nm"] for s in scores]).mean(axis=1)
    edges = [int(b) for b in FLAGS.bins] + [np.inf]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (counts >= lo) & (counts < hi)
        values = z[sel].ravel()
        if len(values) < 5:
            continue
        sd, se = std_z(values)
        rows.append({"neighbours": [lo, None if hi == np.inf else hi], "localizations": int(sel.sum()),
                     "std_z": sd, "std_z_se": se,
                     "mean_std_nm": float(std[sel].mean())})
    print(f"{'neighbours within %.0f px' % FLAGS.radius:>24s} {'locs':>5s} {'std(z)':>12s} "
          f"{'mean std':>9s}")
    for r in rows:
        lo, hi = r["neighbours"]
        label = f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
        print(f"{label:>24s} {r['localizations']:5d} {r['std_z']:6.2f} +- {r['std_z_se']:.2f} "
              f"{r['mean_std_nm']:6.1f} nm")
    print(json.dumps({"model": FLAGS.model, "radius_px": FLAGS.radius, "rows": rows}))


if __name__ == "__main__":
    app.run(main)
