"""Sampler options against the MCMC posterior, on validation frames (never the evaluation seeds):
where psi's spread goes on empty pixels, and what the projection changes.

    python benchmarks/sampler_options.py --model paper

For each sampler (clip "each" or "final", with or without frame-mean-free noise): psi's mean std
and mean value on empty pixels (MCMC std < 1e-4), the ratio of psi's and MCMC's mean std (all
pixels), and on dense frames the coverage of 50% / 90% per-pixel intervals and the KDE MSE of
the posterior mean. For the default sampler also: the sample-to-sample spread (CV) of an isolated
emitter's mass, and per frame the std ratio over all samples and over the samples holding exactly
one emitter after the projection (MCMC knows the count is one). Prints a table and one JSON line.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from smlm_tfdiff import flags as shared_flags
import numpy as np

from _validation import mcmc_reference, validation_frames
from smlm_tfdiff.uncertainty import calibration as cal
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.diffusion.projection import project_samples
from smlm_tfdiff.diffusion.sampler import PosteriorSampler

shared_flags.define_model_flag()
flags.DEFINE_integer("iso_frames", 20, "Isolated-emitter frames (validation seed 778).")
flags.DEFINE_integer("dense_frames", 12, "Paper-preset frames (validation seed 777).")
flags.DEFINE_list("samplers", ["each:0", "each:1", "final:0", "final:1"],
                  "clip:dc_free pairs; the last is the sampler's default.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    icfg, iso, dcfg, dense = validation_frames(models, FLAGS.iso_frames, FLAGS.dense_frames)
    t0 = time.perf_counter()
    mstd = mcmc_reference(iso, icfg).std
    empty = mstd < 1e-4
    results = {"model": FLAGS.model, "iso_frames": FLAGS.iso_frames,
               "dense_frames": FLAGS.dense_frames, "mcmc_seconds": time.perf_counter() - t0,
               "samplers": {}}
    truth = dense["kde"][..., 0]
    for spec in FLAGS.samplers:
        clip, dc = spec.split(":")
        sampler = PosteriorSampler(models, clip=clip, dc_free=bool(int(dc)))
        ip = sampler(iso["frames"], 100, seed=1, method="ddpm", return_samples=True)
        dp = sampler(dense["frames"], 48, seed=2, method="ddpm", return_samples=True)
        std = ip["std"][..., 0]
        mask = (truth > 0.05) | (dp["mean"][..., 0] > 0.05)
        results["samplers"][spec] = {
            "empty_std": float(std[empty].mean()),
            "empty_mean": float(ip["mean"][..., 0][empty].mean()),
            "ratio": cal.std_map_agreement(std, mstd)["mean_ratio"],
            "dense_coverage_50_90": cal.coverage(dp["samples"][..., 0], truth, [0.5, 0.9],
                                                 mask=mask, axis=1).tolist(),
            "dense_mean_mse": float(np.mean((dp["mean"][..., 0] - truth) ** 2))}
        print(f"{spec}: {results['samplers'][spec]}", flush=True)

    # The default sampler (the last one run): mass spread and the projection, per frame.
    up = icfg.upsample
    cv, frames = [], []
    proj = project_samples(ip["samples"], icfg)
    for b in range(FLAGS.iso_frames):
        x, y = iso["positions"][b][iso["mask"][b]][0] * up
        r, c = int(y), int(x)
        window = ip["samples"][b][:, max(r - 6, 0):r + 7, max(c - 6, 0):c + 7, 0]
        mass = window.sum(axis=(1, 2))
        cv.append(mass.std() / mass.mean())
        counts = np.array([len(p) for p in proj["positions"][b]])
        one = proj["samples"][b][counts == 1, ..., 0]
        frames.append({"ratio": float(proj["samples"][b][..., 0].std(0).mean() / mstd[b].mean()),
                       "ratio_one_emitter_samples": float(one.std(0).mean() / mstd[b].mean())
                       if len(one) > 2 else None,
                       "fraction_not_one_emitter": float(np.mean(counts != 1))})
    pooled = cal.std_map_agreement(proj["samples"][..., 0].std(1), mstd)["mean_ratio"]
    results["default"] = {"mass_cv_mean": float(np.mean(cv)), "projected_ratio_pooled": pooled,
                          "frames": frames}

    print(f"\n{'clip:dc_free':12s} {'empty std':>9s} {'empty mean':>10s} {'ratio':>6s} "
          f"{'dense cov 50/90':>16s} {'dense MSE':>9s}")
    for spec, row in results["samplers"].items():
        c50, c90 = row["dense_coverage_50_90"]
        print(f"{spec:12s} {row['empty_std']:9.4f} {row['empty_mean']:10.4f} {row['ratio']:6.2f} "
              f"{c50:8.3f}/{c90:.3f} {row['dense_mean_mse']:9.2e}")
    print(f"\ndefault sampler: isolated emitter mass CV {np.mean(cv):.3f}; projected std ratio "
          f"pooled {pooled:.2f}")
    print(f"{'frame':>5s} {'ratio':>6s} {'one-emitter samples':>19s} {'not one emitter':>15s}")
    for b, f in enumerate(frames):
        one = f["ratio_one_emitter_samples"]
        print(f"{b:5d} {f['ratio']:6.2f} {one if one is None else round(one, 2)!s:>19s} "
              f"{f['fraction_not_one_emitter']:15.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
