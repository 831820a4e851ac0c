"""Is psi's uncertainty honest? Calibration against MCMC, the truth and the CRLB.

    python trainers/evaluate_uncertainty.py --model runs/psi_paper --out_dir runs/eval_uncertainty

--model is a bundled name or a psi run folder. Writes metrics.json (atomically, after every
section) and PNG figures (std_maps.png, reliability.png, z_hist.png, recipes.png).
  1 psi_vs_mcmc  isolated frames: psi's per-pixel std map against the MCMC (HMC) KDE std map at
                 beta = 1 (the posterior) and beta = 0.2 (the seeds' tempering): Pearson r (pooled,
                 median per frame), ratio of means; and per sampler recipe (t_start, steps scaled).
                 Targets: r >= 0.9, ratio in [0.8, 1.25].
  2 coverage     dense paper frames: coverage of central 50% / 90% per-pixel intervals over pixels
                 where truth or posterior mean > --threshold; reliability diagram. Target +-5 pts.
  3 localization z = error / posterior std per axis of phi's localizations matched to the truth.
                 Target std(z) in [0.8, 1.25].
  4 baselines    (a) z = error / sqrt(CRLB) of phi's localizations; (b) MC dropout: a phi
                 trained with dropout (--mc_dropout_model), dropout on at inference, scored as psi
                 is (std maps against MCMC, coverage, z-scores of its own localizations).
Scores and targets: smlm_tfdiff/uncertainty/evaluation.py; statistics:
smlm_tfdiff/uncertainty/calibration.py.
"""

import dataclasses
import json
import os
import time

from absl import app, flags, logging
from smlm_tfdiff import flags as shared_flags
import numpy as np

shared_flags.define_model_flag()
shared_flags.define_sampling_flags(num_samples=100)
flags.DEFINE_string("out_dir", None, "Where metrics.json and the figures go.")
flags.DEFINE_integer("seed", 20_000, "Seed of the held-out frames (never used for training).")
flags.DEFINE_integer("iso_frames", 15, "Isolated-emitter frames for the MCMC comparison.")
flags.DEFINE_integer("t_start", None, "Guided start step (default: the model's).")
flags.DEFINE_integer("restart_t", None, "Restart of the default recipe (PosteriorSampler "
                     "restart_t; default: none).")
flags.DEFINE_integer("restarts", 1, "Restart sweeps of the default recipe, each from the "
                     "previous samples (PosteriorSampler restarts; with --restart_t).")
flags.DEFINE_bool("project", True, "Score projected samples: each sample replaced by the KDE of "
                  "the emitters detected in it (PosteriorSampler project); --noproject scores "
                  "psi's raw samples.")
flags.DEFINE_integer("mcmc_results", 5000, "HMC draws per chain.")
flags.DEFINE_integer("mcmc_burnin", 1000, "HMC burn-in steps.")
flags.DEFINE_integer("mcmc_chains", 4, "HMC chains per frame.")
flags.DEFINE_integer("mcmc_kde_samples", 4000, "Thinned MCMC draws rendered to KDEs per frame.")
flags.DEFINE_list("mcmc_betas", ["1.0", "0.2"], "Likelihood temperings (1 = the posterior).")
flags.DEFINE_list("recipe_t_starts", ["10", "20", "30", "50", "100"], "Guided starts to compare, "
                  "and always the default recipe's own (steps scaled: num_steps * t / t_default, "
                  "at least 2).")
flags.DEFINE_integer("recipe_frames", 5, "Isolated frames for the recipe comparison.")
flags.DEFINE_integer("dense_frames", 25, "Paper-preset frames for the coverage.")
flags.DEFINE_float("threshold", 0.05, "Coverage pixels: truth or posterior mean above (KDE units).")
flags.DEFINE_integer("loc_frames", 12, "Dense frames for per-localization z-scores.")
flags.DEFINE_integer("loc_samples", 32, "Samples per frame detected for z-scores.")
flags.DEFINE_integer("iso_loc_samples", 50, "Samples per isolated frame detected.")
flags.DEFINE_integer("crlb_frames", 200, "Frames per preset for the CRLB baseline.")
flags.DEFINE_string("mc_dropout_model", "paper_mcdropout", "MC-dropout baseline: a phi trained "
                    "with dropout (bundled name or run folder; empty: skip).")
flags.DEFINE_float("tolerance_hr", 5.0, "Matching radius to the truth, HR pixels (the seeds: 5).")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS


def save(metrics, out_dir):
    path = os.path.join(out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2, default=_json)
    os.replace(path + ".tmp", path)


def _json(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return float(v)


def _savefig(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def main(argv):
    del argv
    from smlm_tfdiff.uncertainty import calibration as cal
    from smlm_tfdiff.uncertainty import evaluation as ev
    from smlm_tfdiff.pretrained import load_phi_source
    from smlm_tfdiff.diffusion.sampler import PosteriorSampler, default_recipe
    from smlm_tfdiff.simulation.simulate import simulate

    t_all = time.perf_counter()
    models = load_phi_source(FLAGS.model)
    if models.psi is None:
        raise app.UsageError(f"--model {FLAGS.model!r} has no psi")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    t_default, num_steps = default_recipe(models, FLAGS.t_start)
    recipe = dict(num_steps=FLAGS.num_steps or num_steps, method=FLAGS.method, start="guided",
                  t_start=t_default, restart_t=FLAGS.restart_t, restarts=FLAGS.restarts,
                  project=FLAGS.project)
    sampler = PosteriorSampler(models, jit_compile=FLAGS.jit_compile)
    metrics = {"model": FLAGS.model, "source": models.source, "seed": FLAGS.seed,
               "num_samples": FLAGS.num_samples, "recipe": recipe, "timing_s": {},
               "flags": {k: FLAGS[k].value for k in FLAG_NAMES}}

    # ---------------------------------------------------------------- 1. psi vs MCMC, isolated
    t0 = time.perf_counter()
    iso_cfg = models.scene_config("isolated")
    iso = simulate(iso_cfg, FLAGS.iso_frames, FLAGS.seed)
    post = sampler(iso["frames"], FLAGS.num_samples, seed=1, return_samples=True, **recipe)
    mcmc = {}
    for i, b in enumerate(float(v) for v in FLAGS.mcmc_betas):
        mcmc[b] = ev.mcmc_reference(iso["frames"], iso_cfg, FLAGS.mcmc_results,
                                    FLAGS.mcmc_burnin, seed=2 + i, num_chains=FLAGS.mcmc_chains,
                                    beta=b, kde_samples=FLAGS.mcmc_kde_samples)
    sec1 = ev.psi_vs_mcmc(post, iso, mcmc, iso_cfg, FLAGS.threshold)
    for b in mcmc:
        agree = sec1["mcmc"][f"beta_{b:g}"]
        logging.info("psi vs MCMC beta=%g: r=%.3f (median %.3f) ratio=%.3f", b,
                     agree["pearson_r"], agree["pearson_r_median"], agree["mean_ratio"])
    metrics["psi_vs_mcmc"] = sec1
    metrics["timing_s"]["psi_vs_mcmc"] = time.perf_counter() - t0
    save(metrics, FLAGS.out_dir)

    # Recipes.
    t0 = time.perf_counter()
    n = min(FLAGS.recipe_frames, FLAGS.iso_frames)
    t_starts = sorted({int(v) for v in FLAGS.recipe_t_starts if int(v) <= models.schedule.T}
                      | {t_default})  # The default recipe's start always among them.
    metrics["recipes"] = ev.recipe_comparison(sampler, iso["frames"][:n], FLAGS.num_samples,
                                              recipe, t_starts, mcmc,
                                              default_std=post["std"][:n, ..., 0], seed=3)
    for row in metrics["recipes"]["rows"].values():
        logging.info("recipe t_start=%d steps=%d: %s", row["t_start"], row["num_steps"], row)
    metrics["timing_s"]["recipes"] = time.perf_counter() - t0
    save(metrics, FLAGS.out_dir)
    recipes_figure(metrics["recipes"]["rows"], list(mcmc),
                   os.path.join(FLAGS.out_dir, "recipes.png"))
    std_maps_figure(iso, post, mcmc, os.path.join(FLAGS.out_dir, "std_maps.png"))

    # ------------------------------------------------------------- 2. coverage, dense frames
    t0 = time.perf_counter()
    cfg = models.scene_config("paper")
    dense = simulate(cfg, FLAGS.dense_frames, FLAGS.seed + 1)
    dpost = sampler(dense["frames"], FLAGS.num_samples, seed=4, return_samples=True, **recipe)
    metrics["coverage"] = ev.pixel_coverage(dpost["samples"][..., 0], dense["kde"][..., 0],
                                            dpost["mean"][..., 0], FLAGS.threshold)
    # As analyze's std maps ship them: psi's raw samples scaled per pixel by the model's map
    # scale, where it has one and this is the recipe it was fitted for.
    metrics["coverage_shipped"] = None
    fitted_recipe = (recipe["num_steps"] == models.recipe.num_steps
                     and recipe["t_start"] == models.recipe.t_start
                     and recipe["method"] == models.recipe.method and FLAGS.restart_t is None)
    if models.pixel_scale is not None and fitted_recipe:
        raw = (sampler(dense["frames"], FLAGS.num_samples, seed=4, return_samples=True,
                       **dict(recipe, project=False)) if FLAGS.project else dpost)
        shipped = ev.scaled_samples(raw, ev.map_scale_factors(
            models.pixel_scale, raw, dense["frames"], cfg, models.detection))
        metrics["coverage_shipped"] = ev.pixel_coverage(
            shipped["samples"][..., 0], dense["kde"][..., 0], shipped["mean"][..., 0],
            FLAGS.threshold)
        metrics["coverage_shipped"]["pixel_scale"] = dataclasses.asdict(models.pixel_scale)
    metrics["timing_s"]["coverage"] = time.perf_counter() - t0
    save(metrics, FLAGS.out_dir)
    reliability_figure(metrics["coverage"]["reliability"], sec1["coverage_vs_truth"],
                       os.path.join(FLAGS.out_dir, "reliability.png"))

    # ------------------------------------------------ 3. per-localization z-scores
    t0 = time.perf_counter()
    tol = FLAGS.tolerance_hr / cfg.upsample
    nl, sl = min(FLAGS.loc_frames, FLAGS.dense_frames), min(FLAGS.loc_samples, FLAGS.num_samples)
    scores, dense_z, _ = ev.posterior_localization_z(dpost, dense, cfg, tol, nl, sl)
    sec3 = {"dense": {"num_frames": nl, "num_samples": sl, **scores,
                      "rmse_phi_nm": float(np.sqrt(np.mean(dense_z["errors"] ** 2)))}}
    si = min(FLAGS.iso_loc_samples, FLAGS.num_samples)
    scores, iso_z, ilocs = ev.posterior_localization_z(post, iso, iso_cfg, tol, num_samples=si)
    # psi's per-localization std against MCMC's posterior std of (x, y) on the same frames.
    ratios = (ev.single_emitter_std_ratios(ilocs, mcmc[1.0].results, iso_cfg.pixel_size_nm)
              if 1.0 in mcmc else np.zeros((0, 2)))
    sec3["isolated"] = {"num_frames": FLAGS.iso_frames, "num_samples": si, **scores,
                        "loc_std_over_mcmc_xy_std_median": float(np.nanmedian(ratios))
                        if ratios.size else None}
    sec3["target_std_z_in_[0.8,1.25]"] = ev.within(sec3["dense"]["z_phi_xy"]["std"],
                                                   *ev.Z_RANGE)
    metrics["localization_z"] = sec3
    metrics["timing_s"]["localization_z"] = time.perf_counter() - t0
    save(metrics, FLAGS.out_dir)

    # ----------------------------------------------------------------------- 4. baselines
    t0 = time.perf_counter()
    base = {"crlb": {}}
    z_crlb = {}
    for i, preset in enumerate(("isolated", "paper")):
        c = models.scene_config(preset)
        d = simulate(c, FLAGS.crlb_frames, FLAGS.seed + 10 + i)
        z_crlb[preset], bounds = ev.crlb_baseline(models.phi, d, c, tol)
        base["crlb"][preset] = {"num_frames": FLAGS.crlb_frames,
                                "z": cal.z_summary(z_crlb[preset]),
                                "sqrt_crlb_nm_median": float(np.median(bounds) * c.pixel_size_nm)}
    if FLAGS.mc_dropout_model:
        mcd = load_phi_source(FLAGS.mc_dropout_model)
        scores, z_mcd = ev.mc_dropout_scores(
            mcd, iso, dense, mcmc.get(1.0), FLAGS.num_samples, FLAGS.threshold, tol,
            FLAGS.loc_frames, FLAGS.loc_samples, FLAGS.iso_loc_samples)
        base["mc_dropout"] = {"available": True, "model": FLAGS.mc_dropout_model,
                              "source": mcd.source, **scores}
        logging.info("MC dropout: coverage %.3f / %.3f, std(z) dense %.3f isolated %.3f",
                     scores["coverage_50"], scores["coverage_90"], scores["z_dense"]["std"],
                     scores["z_isolated"]["std"])
    else:
        base["mc_dropout"] = {"available": False, "reason": "--mc_dropout_model not set"}
        z_mcd = {}
    metrics["baselines"] = base
    metrics["timing_s"]["baselines"] = time.perf_counter() - t0
    z_hist_figure((("psi, dense (phi xy)", dense_z["z"]), ("psi, isolated", iso_z["z"]),
                   ("CRLB, dense", z_crlb["paper"]), ("CRLB, isolated", z_crlb["isolated"]),
                   *((f"MC dropout, {k}", v) for k, v in z_mcd.items())),
                  os.path.join(FLAGS.out_dir, "z_hist.png"))

    metrics["timing_s"]["total"] = time.perf_counter() - t_all
    save(metrics, FLAGS.out_dir)
    summary(metrics)
    print(json.dumps(metrics, indent=1, default=_json))


# ------------------------------------------------------------------------------------ figures
def recipes_figure(rows, betas, path):
    """Mean std ratio and Pearson r against MCMC per guided start (ev.recipe_comparison rows)."""
    from smlm_tfdiff.uncertainty.evaluation import R_MIN, RATIO
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ts = [r["t_start"] for r in rows.values()]
    for b in betas:
        axes[0].plot(ts, [r[f"beta_{b:g}"]["mean_ratio"] for r in rows.values()], "o-",
                     label=f"MCMC beta={b:g}")
        axes[1].plot(ts, [r[f"beta_{b:g}"]["pearson_r"] for r in rows.values()], "o-",
                     label=f"MCMC beta={b:g}")
    axes[0].axhspan(*RATIO, color="g", alpha=0.15)
    axes[0].set_ylabel("mean std psi / MCMC")
    axes[1].axhline(R_MIN, color="g")
    axes[1].set_ylabel("Pearson r of std maps")
    for ax in axes:
        ax.set_xlabel("t_start")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def std_maps_figure(iso, post, mcmc, path):
    """(seeds' Figures 2/4) per isolated frame: frame, y_hat, posterior mean, psi std, MCMC std
    at each beta (mcmc: {beta: ReferenceMaps})."""
    plt = _plt()
    psi_std = post["std"][..., 0]
    k = min(3, len(iso["frames"]))
    cols = ["frame", "y_hat (phi)", "posterior mean", "psi std"] + \
        [f"MCMC std beta={b:g}" for b in mcmc]
    fig, axes = plt.subplots(k, len(cols), figsize=(2.4 * len(cols), 2.4 * k), squeeze=False)
    for r in range(k):
        vmax = max(psi_std[r].max(), mcmc.get(1.0, next(iter(mcmc.values()))).std[r].max())
        imgs = [iso["frames"][r, ..., 0], post["y_hat"][r, ..., 0], post["mean"][r, ..., 0],
                psi_std[r]] + [m.std[r] for m in mcmc.values()]
        for c, im in enumerate(imgs):
            kw = dict(cmap="gray") if c == 0 else (dict(cmap="magma") if c < 3 else
                                                  dict(cmap="viridis", vmin=0, vmax=vmax))
            h = axes[r, c].imshow(im, **kw)
            if c >= 3:
                fig.colorbar(h, ax=axes[r, c], fraction=0.046)
            axes[0, c].set_title(cols[c], fontsize=8)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def reliability_figure(rel, rel_isolated, path):
    """Reliability diagram: dense frames (quantile and rank coverage) and isolated frames."""
    from smlm_tfdiff.uncertainty.evaluation import COV_POINTS
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    lv = np.array(rel["levels"])
    ax.fill_between(lv, lv - COV_POINTS, lv + COV_POINTS, color="g", alpha=0.15, label="+-5 pts")
    ax.plot(lv, rel["coverage_quantile"], "o-", label="dense (sample quantiles)")
    ax.plot(lv, rel["coverage_rank"], "s-", label="dense (rank / PIT)")
    ax.plot(lv, rel_isolated["coverage_quantile"], "^-", label="isolated")
    ax.set_xlabel("nominal level")
    ax.set_ylabel("empirical coverage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def z_hist_figure(named_z, path):
    """Histograms of z = error / reported std, (name, z) pairs, against N(0, 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    bins = np.linspace(-5, 5, 51)
    for name, z in named_z:
        z = z[np.isfinite(z)]
        ax.hist(z.ravel(), bins, density=True, histtype="step",
                label=f"{name}: std {np.std(z):.2f}")
    ax.plot(bins, np.exp(-bins ** 2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    ax.set_xlabel("z = error / reported std")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def summary(m):
    """Print the table of the main numbers of metrics dict m against their targets."""
    from smlm_tfdiff.uncertainty.evaluation import R_TEXT, RATIO_TEXT, Z_TEXT, coverage_text

    b1 = m["psi_vs_mcmc"]["mcmc"].get("beta_1", {})
    lines = ["", "=== uncertainty calibration summary ===",
             f"{'quantity':48s} {'value':>10s}  target"]

    def row(name, v, target=""):
        lines.append(f"{name:48s} {v:10.3f}  {target}")
    for key, a in m["psi_vs_mcmc"]["mcmc"].items():
        row(f"psi vs MCMC {key}: pooled r", a["pearson_r"], R_TEXT if key == "beta_1" else "")
        row(f"psi vs MCMC {key}: median per-frame r", a["pearson_r_median"],
            R_TEXT if key == "beta_1" else "")
        row(f"psi vs MCMC {key}: mean std ratio", a["mean_ratio"],
            RATIO_TEXT if key == "beta_1" else "")
    for k, r in m["recipes"]["rows"].items():
        row(f"recipe {k}: ratio / r (beta 1)", r["beta_1"]["mean_ratio"],
            f"r = {r['beta_1']['pearson_r']:.3f}")
    lines.append(f"best-calibrated recipe (ratio, beta 1): {m['recipes']['best_by_ratio_beta_1']}")
    c = m["coverage"]
    row("dense coverage 50% (quantile)", c["coverage_50"], coverage_text(0.5))
    row("dense coverage 90% (quantile)", c["coverage_90"], coverage_text(0.9))
    row("dense coverage 50% / 90% (rank)", c["coverage_rank_50"], f"{c['coverage_rank_90']:.3f}")
    if m.get("coverage_shipped"):
        c = m["coverage_shipped"]
        row("dense coverage 50%, analyze's maps (raw x map scale)", c["coverage_50"],
            coverage_text(0.5))
        row("dense coverage 90%, analyze's maps (raw x map scale)", c["coverage_90"],
            coverage_text(0.9))
    z = m["localization_z"]
    for part in ("dense", "isolated"):
        zs = z[part]["z_phi_xy"]
        lo, hi = zs["std_ci95"]
        row(f"std(z) {part}, phi xy / psi std", zs["std"],
            f"{Z_TEXT}; 95% CI {lo:.2f}-{hi:.2f}, n = {zs['n']}")
        sh = z[part].get("sharpness_nm")
        if sh:
            row(f"Spearman |error| vs reported std, {part}", sh["spearman_abs_error_vs_std"],
                f"> 0; mean reported std {sh['mean_std']:.1f} nm")
    row("robust std(z) dense", z["dense"]["z_phi_xy"]["robust_std"])
    row("std(z) dense, posterior-mean xy", z["dense"]["z_posterior_mean"]["std"])
    if z["isolated"]["loc_std_over_mcmc_xy_std_median"] is not None:
        row("psi loc std / MCMC xy std (isolated, median)",
            z["isolated"]["loc_std_over_mcmc_xy_std_median"], "~1")
    for p, v in m["baselines"]["crlb"].items():
        row(f"std(z) CRLB baseline, {p}", v["z"]["std"])
    mcd = m["baselines"]["mc_dropout"]
    if mcd.get("available"):
        if "vs_mcmc_beta_1" in mcd:
            row("MC dropout vs MCMC beta_1: pooled r", mcd["vs_mcmc_beta_1"]["pearson_r"])
            row("MC dropout vs MCMC beta_1: mean std ratio", mcd["vs_mcmc_beta_1"]["mean_ratio"])
        row("MC dropout dense coverage 50%", mcd["coverage_50"])
        row("MC dropout dense coverage 90%", mcd["coverage_90"])
        row("MC dropout std(z) dense", mcd["z_dense"]["std"])
        row("MC dropout std(z) isolated", mcd["z_isolated"]["std"])
    else:
        lines.append(f"MC dropout: not run ({mcd.get('reason')})")
    row("total runtime (s)", m["timing_s"]["total"])
    if b1:
        lines.append(f"MCMC beta=1 converged fraction {b1['mcmc']['converged_fraction']:.2f}")
    print("\n".join(lines))


FLAG_NAMES = ("seed", "iso_frames", "num_samples", "num_steps", "jit_compile", "method",
              "t_start", "restart_t", "restarts", "project",
              "mcmc_results", "mcmc_burnin", "mcmc_chains", "mcmc_kde_samples", "mcmc_betas",
              "recipe_t_starts", "recipe_frames", "dense_frames", "threshold", "loc_frames",
              "loc_samples", "iso_loc_samples", "crlb_frames", "tolerance_hr", "mc_dropout_model")

if __name__ == "__main__":
    app.run(main)
