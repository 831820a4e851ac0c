"""`make demo`: the main job end to end on held-out simulated data, with a report.

    python -m smlm_tfdiff.demo --out demo_output [--model paper] [--quick]

1. Simulates a paper-preset stack with ground truth: <out>/paper_stack.tif (uint16 ADU),
   <out>/ground_truth.csv (frame 1-based, x [nm], y [nm], intensity [photon]) and
   <out>/ground_truth.npz (smlm_tfdiff.load_dataset: frames, KDEs, positions in LR px, config).
2. Runs analyze (StackAnalyzer, bundled phi and psi) on the TIFF -> <out>/analysis/paper_stack/
   (ThunderSTORM CSV, KDE / posterior mean / std TIFF stacks, PNGs) and scores it against the
   truth: precision, recall, Jaccard, RMSE, efficiency (oracle beside it), z = error /
   uncertainty per axis and the uncertainty against the CRLB column.
3. MCMC (HMC, beta = 1) and psi on isolated-emitter frames: per-pixel std maps compared (Pearson r,
   ratio of means), MCMC's x, y std against sqrt(CRLB); psi's per-pixel interval coverage of the
   true KDE on the first demo frames.
4. Writes <out>/report.md (tables, pass/fail against the targets), <out>/figures/*.png and
   <out>/summary.json (every number; "headline" holds the key ones), and prints the headline.
Positions in files are in nm with the LR-pixel convention of docs/CONVENTIONS.md (pixel j covers
[j, j + 1) px, so a pixel centre is at (j + 0.5) * pixel size).
"""

import csv
import json
import math
import os
import sys
import time

from absl import app, flags
import numpy as np

from smlm_tfdiff.simulation.physics.fisher import crlb

FLAGS = flags.FLAGS

# --quick: a much smaller run (tests); explicit flags still win.
QUICK = dict(num_frames=2, num_samples=4, num_steps=2, mcmc_frames=2, map_samples=8,
             mcmc_results=300, coverage_frames=2)
HEADLINE = ("precision", "recall", "jaccard", "rmse_lateral_nm", "efficiency_lateral",
            "oracle_recall", "std_z", "uncertainty_over_crlb_median", "std_map_pearson_r",
            "std_map_mean_ratio", "mcmc_xy_std_over_sqrt_crlb", "coverage_50", "coverage_90",
            "total_seconds")


def define_flags():
    flags.DEFINE_string("out", "demo_output", "Output folder (data, analysis, figures, report).")
    flags.DEFINE_string("model", "paper", "Bundled model name or a psi training-run folder "
                        "(phi and psi), e.g. runs/reproduce/psi_paper.")
    flags.DEFINE_integer("num_frames", 8, "Paper-preset frames in the demo stack.")
    flags.DEFINE_integer("seed", 50_000, "Seed of the demo data (held out: training uses seeds "
                         "0.., validation 10000).")
    flags.DEFINE_integer("num_samples", 16, "Posterior samples per frame in analyze.")
    flags.DEFINE_integer("num_steps", None, "Reverse diffusion steps per sample (all psi runs; "
                         "default: the model's, 10 for the bundled one).")
    flags.DEFINE_integer("mcmc_frames", 4, "Isolated-emitter frames for MCMC against psi.")
    flags.DEFINE_integer("mcmc_results", 2000, "HMC draws per chain (500 burn-in steps before).")
    flags.DEFINE_integer("map_samples", 48, "psi samples per frame for the per-pixel std maps "
                         "and the coverage.")
    flags.DEFINE_integer("coverage_frames", 4, "Demo frames for the per-pixel coverage.")
    flags.DEFINE_bool("project", True, "Std maps and coverage from projected samples (each "
                      "sample replaced by the KDE of the emitters detected in it; README, "
                      "\"Calibration\"); --noproject for psi's raw samples.")
    flags.DEFINE_bool("quick", False, "A much smaller run (for tests): " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()) + ".")


# --------------------------------------------------------------------------------- checks
def summarize(data, config):
    """Checks of the simulated data against the physics, as a dict of numbers."""
    frames = data["frames"][..., 0].astype(np.float64)
    photons_in_frame = ((frames - config.offset) / config.gain).sum(axis=(1, 2))
    expected = data["photons"].sum(axis=1) + np.sum(np.broadcast_to(config.background,
                                                                    config.lr_shape))
    counts = data["mask"].sum(axis=1)
    kde_counts = data["kde"].sum(axis=(1, 2, 3)) / config.kde_norm
    centre_crlb = crlb(config.center, config)
    return {
        "frames": list(data["frames"].shape),
        "kde": list(data["kde"].shape),
        "emitters_per_frame": float(counts.mean()),
        "photons_per_frame_measured": float(photons_in_frame.mean()),
        "photons_per_frame_expected": float(expected.mean()),
        "kde_count_recovered": float(kde_counts.mean()),
        "kde_peak_max": float(data["kde"].max()),
        "sqrt_crlb_centre_px": float(centre_crlb[0]),
        "sqrt_crlb_centre_nm": float(centre_crlb[0] * config.pixel_size_nm),
    }


# ----------------------------------------------------------------------------------- files
def write_stack(out, data, config):
    """The demo stack as uint16 ADU and its ground truth (CSV in nm, npz). Returns paths."""
    import tifffile

    from smlm_tfdiff.simulation.dataset_file import load_dataset, save_dataset

    tif = os.path.join(out, "paper_stack.tif")
    adu = np.clip(np.round(data["frames"][..., 0]), 0, 65535).astype(np.uint16)
    tifffile.imwrite(tif, adu, imagej=True, metadata={"axes": "TYX"})
    npz = os.path.join(out, "ground_truth.npz")
    save_dataset(npz, data, config, write_tiff=False)
    reloaded, _ = load_dataset(npz)
    assert all(np.array_equal(reloaded[k], data[k]) for k in data), "round trip failed"
    gt = os.path.join(out, "ground_truth.csv")
    nm = config.pixel_size_nm
    with open(gt, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "frame", "x [nm]", "y [nm]", "intensity [photon]"])
        k = 1
        for i, (pos, mask, ph) in enumerate(zip(data["positions"], data["mask"],
                                                data["photons"])):
            for (x, y), n in zip(pos[mask], ph[mask]):
                w.writerow([k, i + 1, f"{x * nm:.3f}", f"{y * nm:.3f}", f"{n:.1f}"])
                k += 1
    return tif, gt, npz


def read_localizations(path, num_frames, pixel_size_nm):
    """ThunderSTORM CSV -> per frame (xy [M, 2] LR px, unc [M, 2] nm, crlb [M] nm)."""
    xy = [[] for _ in range(num_frames)]
    unc = [[] for _ in range(num_frames)]
    bound = [[] for _ in range(num_frames)]
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            i = int(float(row["frame"])) - 1
            xy[i].append((float(row["x [nm]"]) / pixel_size_nm,
                          float(row["y [nm]"]) / pixel_size_nm))
            unc[i].append((float(row["uncertainty_x [nm]"]), float(row["uncertainty_y [nm]"])))
            bound[i].append(float(row["crlb_xy [nm]"]))
    return ([np.array(v, np.float64).reshape(-1, 2) for v in xy],
            [np.array(v, np.float64).reshape(-1, 2) for v in unc],
            [np.array(v, np.float64).reshape(-1) for v in bound])


# ---------------------------------------------------------------------------------- stages
def score_analysis(csv_path, data, config):
    """Localization metrics, oracle and per-localization z-scores of an analyze CSV."""
    from smlm_tfdiff.uncertainty import calibration as cal
    from smlm_tfdiff.localization.metrics import localization_metrics, oracle_metrics

    n = len(data["frames"])
    pred, unc, bound = read_localizations(csv_path, n, config.pixel_size_nm)
    truth = [p[m] for p, m in zip(data["positions"], data["mask"])]
    m = localization_metrics(pred, truth, config)
    oracle = oracle_metrics(data["positions"], data["mask"], config)
    keys = ("TP", "FP", "FN", "precision", "recall", "jaccard", "rmse_lateral_nm",
            "efficiency_lateral")
    matches = m["matches"]
    err_nm = m["errors"] * config.pixel_size_nm  # [TP, 2]
    u = np.array([unc[f][p] for f, p, _ in matches]).reshape(-1, 2)
    b = np.array([bound[f][p] for f, p, _ in matches]).reshape(-1)
    uxy = np.sqrt(np.mean(u ** 2, axis=1))
    z = cal.z_scores(err_nm, u)
    counts = np.array([len(p) for p in pred])
    s = FLAGS.num_samples
    ok = np.isfinite(b) & np.isfinite(uxy)
    rms_err = float(np.sqrt(np.mean(err_nm ** 2))) if len(err_nm) else float("nan")
    rms_crlb = float(np.sqrt(np.nanmean(b ** 2))) if np.isfinite(b).any() else float("nan")
    return {
        "localization": {
            "analyze": {k: m[k] for k in keys}, "oracle": {k: oracle[k] for k in keys},
            "recall_over_oracle": m["recall"] / oracle["recall"] if oracle["recall"] else None,
            "tolerance_nm": m["tolerance_nm"], "localizations": int(counts.sum())},
        "uncertainty": {
            "num_matched": int(len(matches)), "z": cal.z_summary(z),
            # A calibrated std estimated from S samples (ddof 1) gives Student-t z: std
            # sqrt((S - 1) / (S - 3)), not 1.
            "z_expected_calibrated": math.sqrt((s - 1) / (s - 3)) if s > 3 else None,
            "uncertainty_median_nm": float(np.nanmedian(uxy)) if uxy.size else float("nan"),
            "crlb_median_nm": float(np.nanmedian(b)) if np.isfinite(b).any() else float("nan"),
            "uncertainty_over_crlb_median": float(np.median(uxy[ok] / b[ok])) if ok.any()
            else float("nan"),
            "rms_error_per_axis_nm": rms_err, "rms_error_over_crlb": rms_err / rms_crlb},
    }, {"pred": pred, "truth": truth, "err_nm": err_nm, "crlb_nm": b, "unc_nm": uxy, "z": z}


def mcmc_vs_psi(sampler, iso, config, recipe):
    """HMC (beta = 1) and psi on isolated frames -> (agreement and MCMC-vs-CRLB numbers, MCMC
    std maps [B, uH, uW], psi's posterior dict with samples)."""
    from smlm_tfdiff.uncertainty import calibration as cal
    from smlm_tfdiff.uncertainty.mcmc import kde_posterior, mcmc_posterior_batch
    from smlm_tfdiff.uncertainty.per_localization import localization_uncertainty

    res = mcmc_posterior_batch(iso["frames"][..., 0], config, FLAGS.mcmc_results, 500,
                               seed=FLAGS.seed + 2, kernel="hmc", num_chains=4, beta=1.0,
                               warn=False)
    means, stds = [], []
    for r in res:
        step = max(1, r.chains.shape[0] * r.chains.shape[1] // 2000)  # ~2000 KDEs per frame.
        mean, std = kde_posterior(r.chains[::step, :, :2].reshape(-1, 2), config)
        means.append(mean)
        stds.append(std)
    mcmc_mean, mcmc_std = np.array(means), np.array(stds)
    post = sampler(iso["frames"], FLAGS.map_samples, seed=FLAGS.seed + 3, return_samples=True,
                   **recipe)
    psi_std = post["std"][..., 0]
    agree = cal.std_map_agreement(psi_std, mcmc_std)
    agree["mean_map_r"] = cal.pearson_r(post["mean"][..., 0], mcmc_mean)
    # The pooled mean includes empty pixels, where the posterior std is ~0 but psi's is not; the
    # emitter's own region (MCMC std above 10% of its peak) is scored separately.
    signal = mcmc_std > 0.1 * mcmc_std.max(axis=(1, 2), keepdims=True)
    sig = cal.std_map_agreement(psi_std, mcmc_std, mask=signal)
    agree["signal_region"] = {k: sig[k] for k in ("pearson_r", "mean_ratio", "num_pixels")}
    agree["background_psi_std"] = float(psi_std[~signal].mean())
    agree["peak_ratio"] = float(np.mean(psi_std.max(axis=(1, 2)) / mcmc_std.max(axis=(1, 2))))
    truth = iso["positions"][:, 0]
    bounds = crlb(truth, config, photons=iso["photons"][:, 0], estimate_photons=True)[:, :2]
    xy_std = np.array([r.std[:2] for r in res])
    nm = config.pixel_size_nm
    agree["mcmc_xy_std_nm"] = float(xy_std.mean() * nm)
    agree["sqrt_crlb_nm"] = float(bounds.mean() * nm)
    agree["mcmc_xy_std_over_sqrt_crlb"] = float(np.mean(xy_std / bounds))
    locs = localization_uncertainty(post["samples"], post["y_hat"], config)
    ratios = [loc["std_nm"][0] / (r.std[:2] * nm) for loc, r in zip(locs, res)
              if len(loc["xy"]) == 1]
    agree["psi_loc_std_over_mcmc_median"] = (float(np.nanmedian(ratios)) if len(ratios)
                                             else float("nan"))
    agree["mcmc"] = {"converged_fraction": float(np.mean([r.converged for r in res])),
                     "rhat_max": float(np.nanmax([r.rhat.max() for r in res])),
                     "ess_min": float(np.min([r.ess.min() for r in res])),
                     "acceptance": float(np.mean([r.acceptance for r in res]))}
    return agree, mcmc_std, post


def coverage(post, kde, post_iso, kde_iso, threshold=0.05):
    """psi's per-pixel central-interval coverage of the true KDE (dense and isolated frames)."""
    from smlm_tfdiff.uncertainty import calibration as cal

    out = {"threshold": threshold, "num_frames": int(len(kde))}
    for name, p, t in (("dense", post, kde), ("isolated", post_iso, kde_iso)):
        mask = (t > threshold) | (p["mean"][..., 0] > threshold)
        out[name] = cal.reliability(p["samples"][..., 0], t, mask=mask, axis=1)
    lv = out["dense"]["levels"]
    out["coverage_50"] = out["dense"]["coverage_quantile"][lv.index(0.5)]
    out["coverage_90"] = out["dense"]["coverage_quantile"][lv.index(0.9)]
    out["expected_50"], out["expected_90"] = cal.expected_quantile_coverage(
        [0.5, 0.9], FLAGS.map_samples).tolist()
    return out


def _json(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    return float(v)


def run_demo(out):
    """Everything above; returns the summary dict (also written to <out>/summary.json)."""
    from smlm_tfdiff import report
    from smlm_tfdiff.analyze import Camera, KerasBackend, StackAnalyzer
    from smlm_tfdiff.pretrained import load_phi_source
    from smlm_tfdiff.simulation.simulate import simulate

    t_all = time.perf_counter()
    timing = {}
    tic = time.perf_counter()

    def lap(name):
        nonlocal tic
        timing[name] = round(time.perf_counter() - tic, 2)
        tic = time.perf_counter()

    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    models = load_phi_source(FLAGS.model)
    if models.psi is None:
        raise app.UsageError(f"--model {FLAGS.model!r} has phi but no psi; pass a psi run folder")
    backend = KerasBackend(models)  # analyze's backend; its sampler is reused below.
    sampler = backend._sampler
    num_steps = FLAGS.num_steps or backend.num_steps
    recipe = dict(num_steps=num_steps, method=backend.method, project=FLAGS.project)
    cfg, iso_cfg = models.scene_config("paper"), models.scene_config("isolated")
    lap("load_models")

    # 1. Data.
    data = simulate(cfg, FLAGS.num_frames, FLAGS.seed)
    tif, gt_csv, gt_npz = write_stack(out, data, cfg)
    physics = summarize(data, cfg)
    lap("simulate")

    # 2. analyze on the TIFF, scored against the truth.
    camera = Camera(offset_adu=float(cfg.offset), gain_adu_per_photon=float(cfg.gain),
                    readout_noise_adu=float(np.sqrt(cfg.readout_var)),
                    pixel_size_nm=cfg.pixel_size_nm)
    # The demo owns <out>: a rerun replaces its earlier analysis folder whole.
    analyzer = StackAnalyzer(backend, camera, FLAGS.num_samples, num_steps,
                             batch_frames=8, seed=FLAGS.seed + 1, progress=not FLAGS.quick,
                             overwrite=True)
    an_dir = os.path.join(out, "analysis", "paper_stack")
    an = analyzer.analyze(tif, an_dir)
    lap("analyze")
    scores, arrays = score_analysis(os.path.join(an_dir, "paper_stack.csv"), data, cfg)
    scores["localization"]["frames_per_second"] = an["frames_per_second"]
    scores["localization"]["tiles_per_frame"] = an["tiles_per_frame"]
    lap("score")

    # 3. psi against MCMC on isolated frames; per-pixel coverage on the first demo frames.
    iso = simulate(iso_cfg, FLAGS.mcmc_frames, FLAGS.seed + 4)
    agree, mcmc_std, iso_post = mcmc_vs_psi(sampler, iso, iso_cfg, recipe)
    lap("mcmc_vs_psi")
    nc = min(FLAGS.coverage_frames, FLAGS.num_frames)
    dense = sampler(data["frames"][:nc], FLAGS.map_samples, seed=FLAGS.seed + 5,
                    return_samples=True, **recipe)
    cov = coverage(dense, data["kde"][:nc, ..., 0], iso_post, iso["kde"][..., 0])
    lap("coverage")

    # 4. Figures and report.
    fig = lambda name: os.path.join(out, "figures", name)  # noqa: E731
    u = cfg.upsample
    k = min(3, nc)
    report.fig_kde(fig("fig1_kde.png"), data["frames"][:k, ..., 0], dense["y_hat"][:k, ..., 0],
                   data["kde"][:k, ..., 0], arrays["truth"][:k], arrays["pred"][:k], u)
    report.fig_posterior(fig("fig2_posterior.png"), data["frames"][0, ..., 0],
                         dense["y_hat"][0, ..., 0], data["kde"][0, ..., 0],
                         dense["samples"][0, ..., 0], dense["mean"][0, ..., 0],
                         dense["std"][0, ..., 0], arrays["truth"][0], u)
    report.fig_std_maps(fig("fig3_std_maps.png"), iso["frames"][..., 0], mcmc_std,
                        iso_post["std"][..., 0], agree)
    report.fig_crlb(fig("fig4_crlb.png"), arrays["err_nm"], arrays["crlb_nm"], arrays["unc_nm"],
                    arrays["z"])
    report.fig_reliability(fig("fig5_reliability.png"), {"dense frames": cov["dense"],
                                                         "isolated frames": cov["isolated"]})
    lap("figures")

    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    files = [(rel(tif), "the demo stack, uint16 ADU (offset 100 ADU, gain 1 ADU/photon)"),
             (rel(gt_csv), "ground truth: frame (1-based), x, y [nm], intensity [photon]"),
             (rel(gt_npz), "ground truth for smlm_tfdiff.load_dataset (frames, KDEs, LR px)")]
    described = {".csv": "ThunderSTORM localizations with uncertainty_xy and crlb_xy",
                 "_kde_estimate.tif": "phi's KDE per frame (float32, HR grid)",
                 "_posterior_mean.tif": "psi's posterior mean KDE per frame",
                 "_posterior_std.tif": "psi's per-pixel posterior std per frame",
                 "_super_resolution.png": "rendered super-resolution image",
                 "_uncertainty.png": "its uncertainty (std of the summed posterior)",
                 "_summary.json": "analyze's settings, counts and timing"}
    for p in an["files"]:
        name = rel(p)
        files.append((name, next((d for s, d in described.items() if name.endswith(s)), "")))
    files += [(f"figures/{n}", d) for n, d in report.FIGURES.items()]
    files.append(("summary.json", "every number of this report"))

    timing["total"] = round(time.perf_counter() - t_all, 2)
    s = {"settings": {"model": FLAGS.model, "num_frames": FLAGS.num_frames, "seed": FLAGS.seed,
                      "num_samples": FLAGS.num_samples, "num_steps": num_steps,
                      "method": backend.method, "mcmc_frames": FLAGS.mcmc_frames,
                      "mcmc_results": FLAGS.mcmc_results, "mcmc_chains": 4,
                      "map_samples": FLAGS.map_samples, "coverage_frames": nc,
                      "project": FLAGS.project, "quick": FLAGS.quick},
         "physics": physics, **scores, "psi_vs_mcmc": agree, "coverage": cov,
         "files": files, "timing_s": timing}
    s["headline"] = headline(s)
    s["targets"] = [{"quantity": q, "value": v, "target": t, "pass": ok}
                    for q, v, t, ok in report.targets(s)]
    report_path = report.write_report(s, out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2, default=_json)
    s["report"] = report_path
    return s


def headline(s):
    a, unc, mc, cov = (s["localization"]["analyze"], s["uncertainty"], s["psi_vs_mcmc"],
                       s["coverage"])
    values = {**{k: a[k] for k in ("precision", "recall", "jaccard", "rmse_lateral_nm",
                                   "efficiency_lateral")},
              "oracle_recall": s["localization"]["oracle"]["recall"],
              "std_z": unc["z"]["std"],
              "uncertainty_over_crlb_median": unc["uncertainty_over_crlb_median"],
              "std_map_pearson_r": mc["pearson_r"], "std_map_mean_ratio": mc["mean_ratio"],
              "mcmc_xy_std_over_sqrt_crlb": mc["mcmc_xy_std_over_sqrt_crlb"],
              "coverage_50": cov["coverage_50"], "coverage_90": cov["coverage_90"],
              "total_seconds": s["timing_s"]["total"]}
    return {k: float(values[k]) for k in HEADLINE}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.quick:
        for name, value in QUICK.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
    for name in ("num_frames", "num_samples", "num_steps", "mcmc_frames", "mcmc_results",
                 "map_samples", "coverage_frames"):
        value = FLAGS[name].value  # num_steps may be None: the model's default.
        if value is not None and value < (2 if name in ("num_samples", "map_samples") else 1):
            raise app.UsageError(f"--{name} must be >= 1 (>= 2 for sample counts)")
    s = run_demo(FLAGS.out)
    h = s["headline"]
    print(f"\nReport: {s['report']}  (figures in {os.path.join(FLAGS.out, 'figures')}, numbers "
          f"in {os.path.join(FLAGS.out, 'summary.json')})")
    print(f"  localization: precision {h['precision']:.3f}, recall {h['recall']:.3f} (oracle "
          f"{h['oracle_recall']:.3f}), Jaccard {h['jaccard']:.3f}, RMSE "
          f"{h['rmse_lateral_nm']:.1f} nm, efficiency {h['efficiency_lateral']:.1f}")
    for t in s["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]]
        value = t["value"]
        shown = f"{value:.3f}" if value is not None and math.isfinite(value) else "n/a"
        print(f"  {t['quantity']:60s} {shown:>8s}  target {t['target']:12s} {verdict}")
    print(f"Total time {s['timing_s']['total']:.1f} s")
    sys.stdout.flush()


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
