"""psi sampler speed and agreement: network evaluations (NFE) and wall time per frame for a
num_samples std map, for the seeds' recipe and for faster ones, with how well their std maps agree.

    python benchmarks/sampler.py --model paper [--num_samples 100] [--num_frames 2]

Recipes are "name:start:method:steps[:t_start]". The seeds' recipe is 100 ancestral steps from
N(0, I) with 100 samples per frame. Agreement with a reference recipe: Pearson r between the std maps
(all pixels of all frames) and the ratio of their means. Wall time is the second call on the same
frames (the first, also reported, traces and compiles for that shape); with --project, also the time with the projection onto emitter-set KDEs.
Prints a readable table and one JSON line.
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from smlm_tfdiff import flags as shared_flags
import numpy as np
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.uncertainty.calibration import std_map_agreement

shared_flags.define_model_flag()
flags.DEFINE_integer("num_frames", 2, "Held-out paper-preset frames (seed 30000).")
flags.DEFINE_integer("num_samples", 100, "Posterior samples per frame.")
flags.DEFINE_list("recipes", ["seeds:noise:ddpm:100", "guided_full:guided:ddpm:100:100",
                              "guided_ddpm20:guided:ddpm:20:100",
                              "guided_ddpm10:guided:ddpm:10:100",
                              "fast_t30_ddpm5:guided:ddpm:5:30"],
                  "Recipes name:start:method:steps[:t_start]; guided_ddpm10 is the bundled "
                  "model's default, fast_t30_ddpm5 the earlier fast one (docs/calibration.md).")
flags.DEFINE_string("reference", "guided_full", "Recipe the others are compared with (besides "
                    "the first, the seeds').")
flags.DEFINE_bool("jit_compile", True, "XLA for the sampling loop.")
flags.DEFINE_bool("project", True, "Also time each recipe with project=True (samples projected "
                  "onto KDEs of the emitters detected in them).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    sampler = PosteriorSampler(models, jit_compile=FLAGS.jit_compile)
    data = st.simulate(models.scene_config("paper"), FLAGS.num_frames, seed=30_000)
    frames = data["frames"]
    results = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
               "tensorflow": tf.__version__, "psi_params": models.psi.count_params(),
               "num_frames": FLAGS.num_frames, "num_samples": FLAGS.num_samples,
               "jit_compile": FLAGS.jit_compile, "recipes": {}}
    stds = {}
    for recipe in FLAGS.recipes:
        name, start, method, steps, *t_start = recipe.split(":")
        kwargs = dict(num_samples=FLAGS.num_samples, num_steps=int(steps), method=method,
                      start=start, t_start=int(t_start[0]) if t_start else None)
        t0 = time.perf_counter()
        # Trace and compile for these shapes (XLA compiles once per batch shape).
        sampler(frames, seed=1, **kwargs)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sampler(frames, seed=0, **kwargs)
        per_frame = (time.perf_counter() - t0) / len(frames)
        stds[name] = out["std"]
        results["recipes"][name] = {
            "recipe": recipe, "nfe_per_frame": out["nfe_per_frame"], "seconds_per_frame": per_frame,
            "first_call_seconds": first, "std_mean": float(out["std"].mean()),
            "kde_mse_mean": float(np.mean((out["mean"] - data["kde"]) ** 2)),
            "kde_mse_y_hat": float(np.mean((out["y_hat"] - data["kde"]) ** 2))}
        if FLAGS.project:
            t0 = time.perf_counter()
            sampler(frames, seed=0, project=True, **kwargs)
            projected = (time.perf_counter() - t0) / len(frames)
            results["recipes"][name]["projected_seconds_per_frame"] = projected
        print(f"{name}: first call {first:.2f} s, then {per_frame:.2f} s/frame" +
              (f", {projected:.2f} with the projection" if FLAGS.project else ""), flush=True)
    seeds_name = FLAGS.recipes[0].split(":")[0]
    for name, row in results["recipes"].items():
        for ref in (seeds_name, FLAGS.reference):
            if ref in stds and ref != name:
                row[f"vs_{ref}"] = std_map_agreement(stds[name], stds[ref])
    seeds_nfe = results["recipes"][seeds_name]["nfe_per_frame"]
    print(f"\n{'recipe':16s} {'NFE/frame':>9s} {'x fewer':>7s} {'s/frame':>8s} {'std mean':>8s} "
          f"{'KDE MSE':>9s} {'r seeds':>7s} {'ratio':>6s} {'r ref':>6s} {'ratio':>6s}")
    for name, row in results["recipes"].items():
        vs_s = row.get(f"vs_{seeds_name}", {"pearson_r": 1.0, "mean_ratio": 1.0})
        vs_r = row.get(f"vs_{FLAGS.reference}", {"pearson_r": 1.0, "mean_ratio": 1.0})
        print(f"{name:16s} {row['nfe_per_frame']:9d} {seeds_nfe / row['nfe_per_frame']:7.1f} "
              f"{row['seconds_per_frame']:8.2f} {row['std_mean']:8.4f} {row['kde_mse_mean']:9.2e} "
              f"{vs_s['pearson_r']:7.3f} {vs_s['mean_ratio']:6.2f} {vs_r['pearson_r']:6.3f} "
              f"{vs_r['mean_ratio']:6.2f}")
    print(f"(y_hat KDE MSE on these frames: "
          f"{next(iter(results['recipes'].values()))['kde_mse_y_hat']:.2e})")
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    app.run(main)
