"""psi models and sampler recipes against the MCMC posterior and the truth, on validation frames
(never the evaluation seeds): the quick comparison behind the choice of the bundled psi and its
default recipe. `trainers/evaluate_uncertainty.py` gives the held-out figures of the chosen one.

    python benchmarks/calibration_recipes.py --models paper,runs/psi_ext --steps 0,20

For each model and number of reverse steps (0: the model's own default; guided
start at the model's t_start; --method ddpm (ancestral, the default) or ddim; projected samples, as
evaluate_uncertainty scores them):
  isolated frames (seed 778, 100 samples): ratio of psi's and MCMC's (HMC, beta = 1) mean std and
    their Pearson r, pooled; per-localization std / MCMC's x, y std (median); std(z);
  dense paper frames (seed 777, 48 samples): coverage of 50% / 90% per-pixel intervals, the
    fraction of PIT values in the top tenth (0.10 when calibrated) and of pixels whose truth is
    above every sample (1/49 = 0.020 when calibrated: emitters the samples lack), the fraction of
    true emitters phi's estimate misses (no detection within 5 HR px), std(z) per localization
    and Spearman's rho of |error| with the reported std (sharpness), KDE MSE of the mean;
(Speed: benchmarks/sampler.py.)
Prints a table and one JSON line.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

from _validation import mcmc_reference, validation_frames
from smlm_tfdiff.uncertainty import calibration as cal
from smlm_tfdiff.uncertainty import evaluation
from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.localization.metrics import match
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.diffusion.sampler import PosteriorSampler, default_recipe

flags.DEFINE_list("models", ["paper"], "Bundled model names or run folders with psi.")
flags.DEFINE_list("steps", ["0"], "Reverse steps to compare (0: each model's default).")
flags.DEFINE_enum("method", "ddpm", ["ddpm", "ddim"], "Reverse steps: ancestral or deterministic.")
flags.DEFINE_integer("restart_t", None, "Restart step of the sampler (PosteriorSampler "
                     "restart_t; default: none).")
flags.DEFINE_integer("restarts", 1, "Restart sweeps, each from the previous samples (with "
                     "--restart_t).")
flags.DEFINE_integer("iso_frames", 12, "Isolated-emitter frames (validation seed 778).")
flags.DEFINE_integer("dense_frames", 12, "Paper-preset frames (validation seed 777).")
FLAGS = flags.FLAGS


def _missed(y_hat, data, config):
    """Fraction of true emitters with no detection in y_hat within 5 HR px (one-to-one)."""
    missed = total = 0
    for y, pos, mask in zip(y_hat, data["positions"], data["mask"]):
        truth = pos[mask]
        _, q = match(detect(y, config), truth, 5.0 / config.upsample)
        missed += len(truth) - len(q)
        total += len(truth)
    return missed / max(total, 1)


def main(argv):
    del argv
    icfg, iso, dcfg, dense = validation_frames(load_phi_source(FLAGS.models[0]),
                                               FLAGS.iso_frames, FLAGS.dense_frames)
    ref = mcmc_reference(iso, icfg)
    truth = dense["kde"][..., 0]
    rows = []
    for name in FLAGS.models:
        models = load_phi_source(name)
        t_start, default_steps = default_recipe(models)
        sampler = PosteriorSampler(models)
        for steps in (int(s) or default_steps for s in FLAGS.steps):
            kw = dict(num_steps=steps, method=FLAGS.method, return_samples=True, project=True,
                      restart_t=FLAGS.restart_t, restarts=FLAGS.restarts)
            ip = sampler(iso["frames"], 100, seed=1, **kw)
            agree = cal.std_map_agreement(ip["std"][..., 0], ref.std)
            # Matching radius 5 HR px, as evaluate_uncertainty's.
            _, iso_arrays, ilocs = evaluation.posterior_localization_z(
                ip, iso, icfg, 5.0 / icfg.upsample, num_samples=50)
            loc_ratio = evaluation.single_emitter_std_ratios(ilocs, ref.results,
                                                             icfg.pixel_size_nm)
            dp = sampler(dense["frames"], 48, seed=2, **kw)
            samples = dp["samples"][..., 0]
            mask = evaluation.coverage_mask(truth, dp["mean"][..., 0], 0.05)
            u = cal.pit(samples, truth, axis=1)[mask]
            above_all = (truth > samples.max(axis=1))[mask]
            phi_missed = _missed(dp["y_hat"], dense, dcfg)
            dense_z, dense_arrays, _ = evaluation.posterior_localization_z(
                dp, dense, dcfg, 5.0 / dcfg.upsample, num_samples=32)
            row = {"model": name, "method": FLAGS.method, "restart_t": FLAGS.restart_t,
                   "restarts": FLAGS.restarts if FLAGS.restart_t else 0,
                   "t_start": t_start,
                   "num_steps": steps,
                   "iso_ratio": agree["mean_ratio"], "iso_r": agree["pearson_r"],
                   "iso_loc_std_over_mcmc": float(np.median(loc_ratio)),
                   # std(z) here with ddof 0 (z_summary's std has ddof 1).
                   "iso_std_z": float(np.nanstd(iso_arrays["z"])),
                   "dense_coverage_50_90": cal.coverage(samples, truth, [0.5, 0.9], mask=mask,
                                                        axis=1).tolist(),
                   "dense_pit_top_tenth": float(np.mean(u > 0.9)),
                   "dense_truth_above_all": float(np.mean(above_all)),
                   "dense_phi_missed": phi_missed,
                   "dense_std_z": float(np.nanstd(dense_arrays["z"])),
                   "dense_spearman": dense_z["sharpness_nm"]["spearman_abs_error_vs_std"],
                   "dense_mean_mse": float(np.mean((dp["mean"][..., 0] - truth) ** 2))}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'model':24s} {'t*':>4s} {'steps':>5s} {'ratio':>6s} {'r':>6s} {'loc/MCMC':>8s} "
          f"{'z iso':>6s} {'cov 50/90':>12s} {'PIT>0.9':>7s} {'>all':>6s} {'missed':>6s} "
          f"{'z dense':>7s} {'rho':>5s} {'MSE':>8s}")
    for r in rows:
        c50, c90 = r["dense_coverage_50_90"]
        print(f"{r['model'][-24:]:24s} {r['t_start']:4d} {r['num_steps']:5d} {r['iso_ratio']:6.2f} "
              f"{r['iso_r']:6.3f} {r['iso_loc_std_over_mcmc']:8.2f} {r['iso_std_z']:6.2f} "
              f"{c50:5.3f}/{c90:.3f} {r['dense_pit_top_tenth']:7.3f} "
              f"{r['dense_truth_above_all']:6.3f} {r['dense_phi_missed']:6.3f} {r['dense_std_z']:7.2f} "
              f"{r['dense_spearman']:5.2f} "
              f"{r['dense_mean_mse']:8.2e}")
    print(json.dumps({"iso_frames": FLAGS.iso_frames, "dense_frames": FLAGS.dense_frames,
                      "rows": rows}))


if __name__ == "__main__":
    app.run(main)
