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

from smlm_tfdiff import flags as shared_flags
from smlm_tfdiff.simulation.physics.fisher import crlb

# --quick: a much smaller run (tests); explicit flags still win.
QUICK = dict(num_frames=2, num_samples=4, num_steps=2, mcmc_frames=2, map_samples=8,
             mcmc_results=300, coverage_frames=2, jit_compile=False)
# run_demo's keyword arguments, each given by the flag of the same name.
SETTINGS = ("model", "num_frames", "seed", "num_samples", "num_steps", "mcmc_frames",
            "mcmc_results", "map_samples", "coverage_frames", "project", "quick",
            "jit_compile")
HEADLINE = ("precision", "recall", "jaccard", "rmse_lateral_nm", "efficiency_lateral",
            "oracle_recall", "std_z", "std_z_raw", "uncertainty_over_crlb_median",
            "std_map_pearson_r", "std_map_mean_ratio", "mcmc_xy_std_over_sqrt_crlb", "coverage_50",
            "coverage_90", "total_seconds")


def define_flags():
    flags.DEFINE_string("out", "demo_output", "Output folder (data, analysis, figures, report).")
    shared_flags.define_model_flag()
    flags.DEFINE_integer("num_frames", 8, "Paper-preset frames in the demo stack.")
    shared_flags.define_seed_flag(50_000, "Seed of the demo data (held out: training uses seeds "
                                  "0.., validation 10000).")
    shared_flags.define_sampling_flags(num_samples=16, method=None)
    flags.DEFINE_integer("mcmc_frames", 4, "Isolated-emitter frames for MCMC against psi.")
    flags.DEFINE_integer("mcmc_results", 2000, "HMC draws per chain (500 burn-in steps before).")
    flags.DEFINE_integer("map_samples", 48, "psi samples per frame for the per-pixel std maps "
                         "and the coverage.")
    flags.DEFINE_integer("coverage_frames", 4, "Demo frames for the per-pixel coverage.")
    flags.DEFINE_bool("project", True, "Std maps and coverage from projected samples (each "
                      "sample replaced by the KDE of the emitters detected in it; "
                      "docs/calibration.md); --noproject for psi's raw samples.")
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


def camera_of(config):
    """analyze's Camera for stacks written by write_stack from frames of `config` (scalar camera:
    offset, gain, readout noise, pixel size)."""
    from smlm_tfdiff.analyze import Camera

    return Camera(offset_adu=float(config.offset), gain_adu_per_photon=float(config.gain),
                  readout_noise_adu=float(np.sqrt(config.readout_var)),
                  pixel_size_nm=config.pixel_size_nm)


def read_localizations(path, num_frames, pixel_size_nm, raw=False):
    """ThunderSTORM CSV -> per frame (xy [M, 2] LR px, unc [M, 2] nm, crlb [M] nm). raw: unc is
    psi's own spread, before the model's calibration scale (uncertainty_raw_xy over
    uncertainty_xy, the one factor of both axes)."""
    xy = [[] for _ in range(num_frames)]
    unc = [[] for _ in range(num_frames)]
    bound = [[] for _ in range(num_frames)]
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            i = int(float(row["frame"])) - 1
            xy[i].append((float(row["x [nm]"]) / pixel_size_nm,
                          float(row["y [nm]"]) / pixel_size_nm))
            ux, uy = float(row["uncertainty_x [nm]"]), float(row["uncertainty_y [nm]"])
            if raw:
                shipped = float(row["uncertainty_xy [nm]"])
                ratio = float(row["uncertainty_raw_xy [nm]"]) / shipped if shipped > 0 else 1.0
                ux, uy = ux * ratio, uy * ratio
            unc[i].append((ux, uy))
            bound[i].append(float(row["crlb_xy [nm]"]))
    return ([np.array(v, np.float64).reshape(-1, 2) for v in xy],
            [np.array(v, np.float64).reshape(-1, 2) for v in unc],
            [np.array(v, np.float64).reshape(-1) for v in bound])


# ---------------------------------------------------------------------------------- stages
def score_analysis(csv_path, data, config, num_samples):
    """An analyze CSV scored against the truth of `data` (evaluation.score_localization_table):
    localization metrics, the oracle and per-localization z-scores of the uncertainty analyze
    ships, and under "uncertainty_raw" those of psi's own spread (uncertainty_raw_xy; the same
    without a calibration scale). num_samples: the posterior samples per frame analyze drew.
    Returns (scores, arrays)."""
    from smlm_tfdiff.uncertainty.evaluation import score_localization_table

    args = (csv_path, len(data["frames"]), config.pixel_size_nm)
    rest = (data["positions"], data["mask"], config, num_samples)
    scores, arrays = score_localization_table(*read_localizations(*args), *rest)
    scores["uncertainty_raw"] = score_localization_table(*read_localizations(*args, raw=True),
                                                         *rest)[0]["uncertainty"]
    return scores, arrays


def mcmc_vs_psi(sampler, iso, config, recipe, mcmc_results, map_samples, seed):
    """HMC (beta = 1, 4 chains of mcmc_results draws after 500 burn-in, ~2000 KDEs per frame;
    seed) and psi (map_samples samples per frame; seed + 1; recipe: the sampler's keyword
    arguments) on isolated frames -> (evaluation.mcmc_comparison's numbers, MCMC std maps
    [B, uH, uW], psi's posterior dict with samples)."""
    from smlm_tfdiff.uncertainty.evaluation import mcmc_comparison, mcmc_reference

    ref = mcmc_reference(iso["frames"], config, mcmc_results, 500, seed=seed, num_chains=4,
                         beta=1.0, kde_samples=2000)
    post = sampler(iso["frames"], map_samples, seed=seed + 1, return_samples=True, **recipe)
    agree = mcmc_comparison(post, ref, iso["positions"][:, 0], iso["photons"][:, 0], config)
    return agree, ref.std, post


def coverage(post, kde, post_iso, kde_iso, num_samples, threshold=0.05, shipped=None):
    """psi's per-pixel central-interval coverage of the true KDE (dense and isolated frames).
    post, post_iso: posterior dicts with samples [B, S, uH, uW, 1]; kde, kde_iso: [B, uH, uW]
    true KDEs; num_samples: S (for the quantile intervals' expected coverage). shipped: the same
    (dense, isolated) posteriors scaled as analyze's maps are (evaluation.scaled_samples), or
    None without a map scale; coverage_50 / _90 are then theirs, coverage_own_50 / _90 psi's."""
    from smlm_tfdiff.uncertainty import calibration as cal
    from smlm_tfdiff.uncertainty.evaluation import coverage_mask

    out = {"threshold": threshold, "num_frames": int(len(kde))}
    for name, p, t in (("dense", post, kde), ("isolated", post_iso, kde_iso)):
        mask = coverage_mask(t, p["mean"][..., 0], threshold)
        out[name] = cal.reliability(p["samples"][..., 0], t, mask=mask, axis=1)
    lv = out["dense"]["levels"]
    out["coverage_own_50"] = out["dense"]["coverage_quantile"][lv.index(0.5)]
    out["coverage_own_90"] = out["dense"]["coverage_quantile"][lv.index(0.9)]
    out["shipped"] = None
    if shipped is not None:
        out["shipped"] = {}
        for name, p, t in (("dense", shipped[0], kde), ("isolated", shipped[1], kde_iso)):
            mask = coverage_mask(t, p["mean"][..., 0], threshold)
            out["shipped"][name] = cal.reliability(p["samples"][..., 0], t, mask=mask, axis=1)
    final = out["dense"] if shipped is None else out["shipped"]["dense"]
    out["coverage_50"] = final["coverage_quantile"][lv.index(0.5)]
    out["coverage_90"] = final["coverage_quantile"][lv.index(0.9)]
    out["expected_50"], out["expected_90"] = cal.expected_quantile_coverage(
        [0.5, 0.9], num_samples).tolist()
    return out


def _json(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    return float(v)


def run_demo(out, model="paper", num_frames=8, seed=50_000, num_samples=16, num_steps=None,
             mcmc_frames=4, mcmc_results=2000, map_samples=48, coverage_frames=4, project=True,
             quick=False, jit_compile=True):
    """Everything above into the folder `out`; returns the summary dict (also written to
    <out>/summary.json). The arguments are the flags of the same names (define_flags)."""
    from smlm_tfdiff import report
    from smlm_tfdiff.analyze import KerasBackend, StackAnalyzer
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
    models = load_phi_source(model)
    if models.psi is None:
        raise app.UsageError(f"--model {model!r} has phi but no psi; pass a psi run folder")
    # analyze's backend; its sampler is reused below.
    backend = KerasBackend(models, jit_compile=jit_compile)
    sampler = backend.sampler
    num_steps = num_steps or backend.num_steps
    recipe = dict(num_steps=num_steps, method=backend.method, project=project)
    cfg, iso_cfg = models.scene_config("paper"), models.scene_config("isolated")
    lap("load_models")

    # 1. Data.
    data = simulate(cfg, num_frames, seed)
    tif, gt_csv, gt_npz = write_stack(out, data, cfg)
    physics = summarize(data, cfg)
    lap("simulate")

    # 2. analyze on the TIFF, scored against the truth.
    camera = camera_of(cfg)
    # The demo owns <out>: a rerun replaces its earlier analysis folder whole.
    analyzer = StackAnalyzer(backend, camera, num_samples, num_steps,
                             batch_frames=8, seed=seed + 1, progress=not quick,
                             overwrite=True)
    an_dir = os.path.join(out, "analysis", "paper_stack")
    an = analyzer.analyze(tif, an_dir)
    lap("analyze")
    scores, arrays = score_analysis(os.path.join(an_dir, "paper_stack.csv"), data, cfg,
                                    num_samples)
    scores["localization"]["frames_per_second"] = an["frames_per_second"]
    scores["localization"]["tiles_per_frame"] = an["tiles_per_frame"]
    lap("score")

    # 3. psi against MCMC on isolated frames; per-pixel coverage on the first demo frames.
    iso = simulate(iso_cfg, mcmc_frames, seed + 4)
    agree, mcmc_std, iso_post = mcmc_vs_psi(sampler, iso, iso_cfg, recipe, mcmc_results,
                                            map_samples, seed + 2)
    lap("mcmc_vs_psi")
    nc = min(coverage_frames, num_frames)
    dense = sampler(data["frames"][:nc], map_samples, seed=seed + 5, return_samples=True,
                    **recipe)
    shipped = None
    if models.pixel_scale is not None and num_steps == backend.num_steps:
        from smlm_tfdiff.uncertainty import evaluation as ev

        # As analyze's std maps: psi's raw samples, scaled per pixel by the model's map scale.
        raw = dict(recipe, project=False)
        dense_raw = (sampler(data["frames"][:nc], map_samples, seed=seed + 5,
                             return_samples=True, **raw) if project else dense)
        iso_raw = (sampler(iso["frames"], map_samples, seed=seed + 3, return_samples=True, **raw)
                   if project else iso_post)
        shipped = tuple(
            ev.scaled_samples(p, ev.map_scale_factors(models.pixel_scale, p, f, c,
                                                      models.detection))
            for p, f, c in ((dense_raw, data["frames"][:nc], cfg),
                            (iso_raw, iso["frames"], iso_cfg)))
    cov = coverage(dense, data["kde"][:nc, ..., 0], iso_post, iso["kde"][..., 0], map_samples,
                   shipped=shipped)
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
    s = {"settings": {"model": model, "num_frames": num_frames, "seed": seed,
                      "num_samples": num_samples, "num_steps": num_steps,
                      "method": backend.method, "mcmc_frames": mcmc_frames,
                      "mcmc_results": mcmc_results, "mcmc_chains": 4,
                      "map_samples": map_samples, "coverage_frames": nc,
                      "project": project, "quick": quick, "jit_compile": jit_compile,
                      "uncertainty_scale": an["uncertainty_scale"],
                      "pixel_scale": an.get("pixel_scale")},
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
              "std_z": unc["z"]["std"], "std_z_raw": s["uncertainty_raw"]["z"]["std"],
              "uncertainty_over_crlb_median": unc["uncertainty_over_crlb_median"],
              "std_map_pearson_r": mc["pearson_r"], "std_map_mean_ratio": mc["mean_ratio"],
              "mcmc_xy_std_over_sqrt_crlb": mc["mcmc_xy_std_over_sqrt_crlb"],
              "coverage_50": cov["coverage_50"], "coverage_90": cov["coverage_90"],
              "total_seconds": s["timing_s"]["total"]}
    return {k: float(values[k]) for k in HEADLINE}


def main(argv):
    FLAGS = flags.FLAGS
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
    s = run_demo(FLAGS.out, **{name: FLAGS[name].value for name in SETTINGS})
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
