"""Lever 3 of the dense-calibration work, measured: a scale of the reported per-localization std
keyed on crowding (no other localization within --radius camera px, or at least one), fitted on
the validation frames and checked on held-out seeds over a grid of densities and brightnesses.

    python benchmarks/calibration_crowding_scale.py --model paper

Fit: dense paper frames (seed 777) and isolated frames (seed 778) of `_validation`; every
localization of phi matched to the truth (5 HR px) gives z = (phi's position - truth) / reported
std per axis; the scale of a group is its std(z) (so that the scaled z has unit std there).
Check: for every cell of the grid (--grid_emitters emitters in the paper disc x --grid_photons
N0), --grid_frames frames from its own seed (9000 + cell index, never an evaluation seed), the
raw and the scaled std(z) with their standard errors (sd / sqrt(2 (n - 1)), n the z values), the
mean reported std, and the Spearman correlation of |error| with the reported std (sharpness).
Prints a table and one JSON line.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from _validation import (check_grid, crowding_scores, define_check_grid_flags, describe_scaled,
                         scaled_scores, std_z, validation_frames)
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.pretrained import load_phi_source

define_check_grid_flags()
flags.DEFINE_integer("dense_frames", 36, "Fit: paper-preset frames (validation seed 777).")
flags.DEFINE_integer("iso_frames", 24, "Fit: isolated-emitter frames (validation seed 778).")
flags.DEFINE_float("radius", 5.0, "Neighbourhood radius, camera px.")
FLAGS = flags.FLAGS


def scored(sampler, data, cfg):
    """_validation.crowding_scores of these frames, with company [n] bool: another localization
    within --radius."""
    s = crowding_scores(sampler, data, cfg, FLAGS.radius, FLAGS.num_samples)
    return {**s, "company": s["neighbours"] > 0}


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    sampler = PosteriorSampler(models)
    icfg, iso, dcfg, dense = validation_frames(models, FLAGS.iso_frames, FLAGS.dense_frames)
    parts = [scored(sampler, dense, dcfg), scored(sampler, iso, icfg)]
    z = np.concatenate([p["z"] for p in parts])
    company = np.concatenate([p["company"] for p in parts])
    scale = {}
    for name, sel in (("alone", ~company), ("company", company)):
        sd, se = std_z(z[sel])
        scale[name] = {"scale": sd, "se": se, "localizations": int(sel.sum())}
    print(f"fit (validation seeds 777/778, radius {FLAGS.radius:g} px): " + ", ".join(
        f"{k} {v['scale']:.3f} +- {v['se']:.3f} ({v['localizations']} locs)"
        for k, v in scale.items()))

    rows = []
    for n, photons, seed, cfg, data in check_grid(dcfg):
        s = scored(sampler, data, cfg)
        factor = np.where(s["company"], scale["company"]["scale"], scale["alone"]["scale"])
        r = {"emitters": n, "photons": photons, "seed": seed,
             "company_fraction": float(s["company"].mean()), **scaled_scores(s, factor)}
        rows.append(r)
        print(f"N={n:3d} N0={photons:5.0f} locs {r['localizations']:4d} company "
              f"{r['company_fraction']:.2f}  " + describe_scaled(r), flush=True)
    print(json.dumps({"model": FLAGS.model, "radius_px": FLAGS.radius, "scale": scale,
                      "grid": rows}))


if __name__ == "__main__":
    app.run(main)
