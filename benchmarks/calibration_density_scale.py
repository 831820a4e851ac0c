"""Lever 3 of the dense-calibration work, second form: a smooth scale of the reported
per-localization std in the local density and the brightness, fitted by simulation on validation
seeds and checked on held-out seeds over a grid of densities and brightnesses.

    python benchmarks/calibration_density_scale.py --model paper

The scale: log s = a + b k + c log(N / 200) (uncertainty.scale.UncertaintyScale; --scale_out writes
it into a model folder, where analyze applies it), with k the other localizations within --radius
camera px and N the localization's photometry (photons, io.photometry as analyze fits it); both
are known at analysis time. Fitted by maximum likelihood of z ~ N(0, s^2) per axis (z = (phi's
position - truth) / reported std), beside one constant scale fitted on the same z.
Fit: the paper disc with --fit_emitters emitters x --fit_photons N0, seeds 8000 + cell index,
--fit_localizations localizations per cell (frames = that / emitters). Check: the grid of
calibration_crowding_scale.py (--grid_emitters x --grid_photons, --grid_frames frames, seed 9000 +
cell index; never an evaluation seed): raw, constant-scaled and density-scaled std(z) with their
standard errors, the mean reported std and the Spearman correlation of |error| with the reported
std (sharpness). Prints a table and one JSON line.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

from _validation import (check_grid, crowding_scores, define_check_grid_flags, describe_scaled,
                         check_row, features, fit_log_scale, std_z, write_scale)
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.simulation.simulate import simulate

define_check_grid_flags()
flags.DEFINE_float("radius", 8.0, "Neighbourhood radius, camera px.")
flags.DEFINE_list("fit_emitters", ["1", "3", "6", "10", "15"], "Fit: emitters in the paper disc.")
flags.DEFINE_list("fit_photons", ["150", "300"], "Fit: N0 per emitter (photons).")
flags.DEFINE_integer("fit_localizations", 36, "Fit: emitters simulated per cell.")
flags.DEFINE_string("scale_out", None, "A model folder: write the fitted scale there as "
                    "uncertainty_scale.json, which analyze then applies (uncertainty.scale).")
flags.DEFINE_bool("check", True, "Check the fit on the held-out grid (--nocheck: fit only).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    sampler = PosteriorSampler(models)
    base = models.scene_config("paper")
    fit = []
    cells = [(int(n), float(p)) for n in FLAGS.fit_emitters for p in FLAGS.fit_photons]
    for index, (n, photons) in enumerate(cells):
        cfg = base.replace(num_emitters=n, photons=photons)
        frames = max(1, -(-FLAGS.fit_localizations // n))
        fit.append(crowding_scores(sampler, simulate(cfg, frames, 8000 + index), cfg,
                                   FLAGS.radius, FLAGS.num_samples))
        print(f"fit cell N={n} N0={photons:g}: {frames} frames, {len(fit[-1]['z'])} "
              f"localizations", flush=True)
    x = np.concatenate([features(s) for s in fit])
    z = np.concatenate([s["z"] for s in fit])
    beta, beta_se = fit_log_scale(x, z)
    constant, _ = std_z(z)
    print(f"fit ({len(z)} localizations, radius {FLAGS.radius:g} px): log s = "
          f"{beta[0]:.3f} + {beta[1]:.4f} k + {beta[2]:.3f} log(N/200)  (se {beta_se[0]:.3f}, "
          f"{beta_se[1]:.4f}, {beta_se[2]:.3f}); constant scale {constant:.3f}", flush=True)
    if FLAGS.scale_out:
        write_scale(FLAGS.scale_out, beta, FLAGS.radius,
                    f"python benchmarks/calibration_density_scale.py --model {FLAGS.model}: "
                    f"{len(z)} localizations of validation scenes (seeds 8000-"
                    f"{8000 + len(cells) - 1}: {', '.join(FLAGS.fit_emitters)} emitters in the "
                    f"paper disc x N0 {', '.join(FLAGS.fit_photons)}), default recipe, "
                    f"{FLAGS.num_samples} samples; docs/calibration.md")
    if not FLAGS.check:
        return

    rows = []
    for n, photons, seed, cfg, data in check_grid(base):
        s = crowding_scores(sampler, data, cfg, FLAGS.radius, FLAGS.num_samples)
        r = {"emitters": n, "photons": photons, "seed": seed,
             **check_row(s, constant, np.exp(features(s) @ beta))}
        rows.append(r)
        print(f"N={n:3d} N0={photons:5.0f} locs {r['localizations']:4d} k "
              f"{r['mean_neighbours']:4.1f}  constant {r['std_z_constant']:.2f}  "
              + describe_scaled(r),
              flush=True)
    print(json.dumps({"model": FLAGS.model, "radius_px": FLAGS.radius,
                      "fit": {"log_scale": beta.tolist(), "se": beta_se.tolist(),
                              "terms": ["1", "neighbours", "log(photons / 200)"],
                              "localizations": int(len(z)), "constant_scale": constant},
                      "grid": rows}))


if __name__ == "__main__":
    app.run(main)
