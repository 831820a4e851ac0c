"""`analyze` on simulated movies: speed, memory and accuracy against the truth, per movie and mode.

    python benchmarks/analyze.py [--cases dense40_64,...] [--modes posterior,posterior_all,phi_only]
        [--frames 100] [--posterior_frames 4] [--out benchmarks/results/analyze.json]
        [--window_px 20] [--num_steps 5] [--num_samples 16] [--in_samples refit]
        (unset: the model's own sampling, as analyze's defaults)

Movies (the seeds' camera and optics, N0 = 200 photons unless said, emitters uniform over the
whole frame, edges included; seed 123 + case index, never a training or validation seed;
--seed 8200 gives validation movies, for choosing between models):
  dense40_64      64x64 px, 1 emitter per 40 px^2 (the paper frames' average density)
  dense15_64      64x64 px, 1 emitter per 15 px^2 (the seeds' local density: 10 in a disc of r 7)
  sparse_64       64x64 px, 1 emitter per 400 px^2
  sparse_256      256x256 px, 1 emitter per 400 px^2
  bright_64       64x64 px, 1 per 400 px^2, N0 1000-5000 photons
  background_64   64x64 px, 1 per 100 px^2 over a background of 20 photons per pixel (the other
                  movies have none)
Modes: `posterior` (psi's posterior uncertainty, the default analysis: psi sampled only in the
tiles or windows that hold a localization), `posterior_all` (the path before: psi sampled in every
tile, --sample_windows all) and `phi_only` (--num_samples 0: phi's localizations, the CRLB as
uncertainty). The posterior modes run --posterior_frames frames (they are slow), phi_only
--frames frames.

Each movie is simulated by one process and each (movie, mode) analyzed in another, so the peak
memory (ru_maxrss) is the analysis's own (the simulator's KDE rendering of a 256x256 movie alone
takes gigabytes); the time
counts analyze() on the TIFF after a warm-up on 2 frames of the same size (tracing, compiling).
Reported per case: localizations/s and frames/s, peak RSS, P / R / Jaccard / RMSE against the truth
(tolerance 5 HR px, the seeds'), std(z) of z = (localization - truth) / reported uncertainty per
axis (with its 95% interval from the chi-square distribution; in the JSON also std_z_raw, of psi's
own spread before the model's calibration scale), and recall within 3 px of the frame
edge against the centre, and the posterior windows sampled per frame (by side, for a whole-field
model, whose window size is chosen per frame unless --window_px fixes it). Prints a table and
writes the JSON.
"""

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

CASES = {
    "dense40_64": dict(size=(64, 64), per_px2=1 / 40),
    "dense15_64": dict(size=(64, 64), per_px2=1 / 15),
    "sparse_64": dict(size=(64, 64), per_px2=1 / 400),
    "sparse_256": dict(size=(256, 256), per_px2=1 / 400),
    "bright_64": dict(size=(64, 64), per_px2=1 / 400, photons_range=(1000.0, 5000.0)),
    "background_64": dict(size=(64, 64), per_px2=1 / 100, background=20.0),
}
MODES = ("posterior", "posterior_all", "phi_only")
EDGE_PX = 3.0

flags.DEFINE_list("cases", list(CASES), f"Movies: {', '.join(CASES)}.")
flags.DEFINE_list("modes", list(MODES), "posterior, phi_only.")
flags.DEFINE_string("model", "paper", "Model (bundled name or folder).")
flags.DEFINE_integer("frames", 100, "Frames per movie in phi_only mode.")
flags.DEFINE_integer("posterior_frames", 4, "Frames per movie in posterior mode.")
flags.DEFINE_integer("num_samples", None, "Posterior samples per frame (posterior mode; "
                     "default: the model's, as analyze's).")
flags.DEFINE_integer("num_steps", None, "Reverse steps per sample (default: the model's).")
flags.DEFINE_integer("window_px", None, "Posterior window side, camera px (whole-field "
                     "models; default: chosen per frame, as analyze does).")
flags.DEFINE_enum("in_samples", None, ["detect", "refit"], "How the posterior samples are "
                  "localized (analyze --in_samples; default: the model's).")
flags.DEFINE_integer("seed", 123, "Seed of the first movie (+ case index).")
flags.DEFINE_string("out", None, "JSON file for the results (default: print only).")
flags.DEFINE_string("case", None, "Internal: run one case (movie:mode) in this process.")
flags.DEFINE_string("make_movie", None, "Internal: simulate this movie into --movie_dir.")
flags.DEFINE_string("movie_dir", None, "Internal: folder of the simulated movies.")
FLAGS = flags.FLAGS


def make_movie(name, num_frames, folder):
    """Simulate one case into folder/<name>.npz (truth) and its config JSON."""
    frames, data, config = movie(name, num_frames)
    np.savez(os.path.join(folder, f"{name}.npz"), frames=frames, positions=data["positions"],
             mask=data["mask"], config_json=np.array(config.to_json()))


def load_movie(name, num_frames, folder):
    """(frames [N, H, W] ADU, truth dict, config) of a movie make_movie wrote."""
    from smlm_tfdiff import SimulationConfig

    with np.load(os.path.join(folder, f"{name}.npz")) as f:
        config = SimulationConfig.from_json(str(f["config_json"]))
        data = {k: f[k][:num_frames] for k in ("positions", "mask")}
        return f["frames"][:num_frames], data, config


def movie(name, num_frames):
    """(frames [N, H, W] ADU, simulate() dict, config) of one case."""
    from smlm_tfdiff import SimulationConfig
    from smlm_tfdiff.simulation.simulate import simulate

    case = CASES[name]
    h, w = case["size"]
    count = max(1, int(round(h * w * case["per_px2"])))
    extra = {k: case[k] for k in ("photons_range", "background") if k in case}
    config = SimulationConfig.preset("paper", frame_height=h, frame_width=w, region="frame",
                                     margin=0.0, num_emitters=count, **extra)
    data = simulate(config, num_frames, seed=FLAGS.seed + list(CASES).index(name))
    return data["frames"][..., 0], data, config


def _z_interval(z):
    """std(z) and its 95% interval (chi-square with n - 1 degrees of freedom)."""
    from scipy import stats

    z = z[np.isfinite(z)]
    n = len(z)
    if n < 3:
        return float("nan"), [float("nan"), float("nan")]
    s = float(np.std(z, ddof=1))
    lo, hi = stats.chi2.ppf([0.975, 0.025], n - 1)
    return s, [s * np.sqrt((n - 1) / lo), s * np.sqrt((n - 1) / hi)]


def run_case(name, mode):
    import csv

    import tifffile

    from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend
    from smlm_tfdiff.localization.metrics import edge_centre_recall, localization_metrics

    posterior = mode.startswith("posterior")
    num_frames = FLAGS.posterior_frames if posterior else FLAGS.frames
    frames, data, config = load_movie(name, num_frames, FLAGS.movie_dir)
    samples = FLAGS.num_samples if posterior else 0
    backend = load_backend(FLAGS.model, need_psi=samples != 0)
    analyzer = StackAnalyzer(backend, Camera(100.0, 1.0), samples,
                             FLAGS.num_steps if posterior else None, progress=False, maps=False,
                             sample_windows="all" if mode == "posterior_all" else "localized",
                             window_px=FLAGS.window_px if posterior else None,
                             in_samples=FLAGS.in_samples)
    work = tempfile.mkdtemp(prefix="bench-analyze-")
    path = os.path.join(work, "movie.tif")
    tifffile.imwrite(path, np.round(frames).astype(np.uint16), photometric="minisblack")
    warm = os.path.join(work, "warm.tif")
    tifffile.imwrite(warm, np.round(frames[:2]).astype(np.uint16), photometric="minisblack")
    analyzer.analyze(warm, os.path.join(work, "warm_out"))
    start = time.perf_counter()
    summary = analyzer.analyze(path, os.path.join(work, "out"))
    seconds = time.perf_counter() - start
    with open(os.path.join(work, "out", "movie.csv")) as f:
        rows = list(csv.DictReader(f))
    shutil.rmtree(work, ignore_errors=True)
    nm = config.pixel_size_nm
    frame_of = np.array([int(r["frame"]) - 1 for r in rows], np.int64)
    xy = np.array([[float(r["x [nm]"]), float(r["y [nm]"])] for r in rows]).reshape(-1, 2) / nm
    unc = np.array([[float(r["uncertainty_x [nm]"]), float(r["uncertainty_y [nm]"])]
                    for r in rows]).reshape(-1, 2)
    pred = [xy[frame_of == k] for k in range(num_frames)]
    metrics = localization_metrics(pred, data, config)
    matches, errors = metrics.pop("matches"), metrics.pop("errors")
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pred])])
    rows_matched = offsets[matches[:, 0]] + matches[:, 1]
    z = (errors * nm / unc[rows_matched]).ravel()
    std_z, interval = _z_interval(z)
    # psi's own spread (uncertainty_raw_xy): the reported std over the calibration scale's
    # factor, which is the same for both axes.
    factor = np.array([float(r["uncertainty_xy [nm]"]) / float(r["uncertainty_raw_xy [nm]"])
                       for r in rows]).reshape(-1)
    std_z_raw, interval_raw = _z_interval((errors * nm / unc[rows_matched]
                                           * factor[rows_matched, None]).ravel())
    h, w = config.lr_shape
    recall_edge, recall_centre = edge_centre_recall(matches, data["positions"], data["mask"],
                                                    (h, w), EDGE_PX)
    return {
        "movie": name, "mode": mode, "frames": num_frames, "size": [h, w],
        "num_samples": analyzer.num_samples, "num_steps": analyzer.num_steps,
        "in_samples": analyzer.in_samples,
        "emitters_per_frame": round(float(data["mask"].sum() / num_frames), 2),
        "seconds": round(seconds, 2), "frames_per_second": round(num_frames / seconds, 4),
        "localizations_per_second": round(len(rows) / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "precision": metrics["precision"], "recall": metrics["recall"],
        "jaccard": metrics["jaccard"], "rmse_nm": metrics["rmse_lateral_nm"],
        "std_z": std_z, "std_z_95": interval, "z_count": int(np.isfinite(z).sum()),
        "std_z_raw": std_z_raw, "std_z_raw_95": interval_raw,
        "recall_edge": recall_edge, "recall_centre": recall_centre,
        "tiles_per_frame": summary["tiles_per_frame"],
        "windows_sampled_per_frame": round(summary["windows_sampled"] / num_frames, 2),
        "windows_sampled_by_size_per_frame": {
            k: round(v / num_frames, 2)
            for k, v in summary.get("windows_sampled_by_size", {}).items()},
        "timing_s": summary["timing"],
    }


def main(argv):
    del argv
    if FLAGS.make_movie:
        make_movie(FLAGS.make_movie, FLAGS.frames, FLAGS.movie_dir)
        return
    if FLAGS.case:
        name, mode = FLAGS.case.split(":")
        print("RESULT " + json.dumps(run_case(name, mode)))
        return
    unknown = [c for c in FLAGS.cases if c not in CASES] + [m for m in FLAGS.modes
                                                            if m not in MODES]
    if unknown:
        raise app.UsageError(f"unknown cases or modes {unknown}; cases {list(CASES)}, modes "
                             f"{list(MODES)}")
    results = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "model": FLAGS.model,
               "num_samples": FLAGS.num_samples, "num_steps": FLAGS.num_steps,
               "window_px": FLAGS.window_px, "in_samples": FLAGS.in_samples, "seed": FLAGS.seed,
               "runs": []}
    movies = tempfile.mkdtemp(prefix="bench-movies-")
    try:
        _run_all(results, movies)
    finally:
        shutil.rmtree(movies, ignore_errors=True)
    _report(results)


def _run_all(results, movies):
    for name in FLAGS.cases:
        frames = max(FLAGS.frames if "phi_only" in FLAGS.modes else 0,
                     FLAGS.posterior_frames if any(m.startswith("posterior") for m in FLAGS.modes)
                     else 0)
        subprocess.run([sys.executable, os.path.abspath(__file__), f"--make_movie={name}",
                        f"--frames={frames}", f"--movie_dir={movies}", f"--seed={FLAGS.seed}"],
                       check=True, capture_output=True)
        for mode in FLAGS.modes:
            cmd = [sys.executable, os.path.abspath(__file__), f"--case={name}:{mode}",
                   f"--movie_dir={movies}",
                   f"--model={FLAGS.model}", f"--frames={FLAGS.frames}",
                   f"--posterior_frames={FLAGS.posterior_frames}"]
            cmd += [f"--{k}={FLAGS[k].value}"
                    for k in ("num_samples", "num_steps", "window_px", "in_samples")
                    if FLAGS[k].value is not None]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{name}:{mode} failed (rc {out.returncode}):\n"
                                 f"{out.stderr[-3000:]}")
            result = json.loads(line[-1][len("RESULT "):])
            results["runs"].append(result)
            print(f"{name}:{mode} done in {result['seconds']} s", file=sys.stderr)


def _windows(run):
    """Windows (tiles) sampled per frame, by window side when sizes were chosen per frame."""
    sizes = run.get("windows_sampled_by_size_per_frame")
    if sizes:
        return " ".join(f"{v:.1f}x{k}px" for k, v in sizes.items())
    return f"{run.get('windows_sampled_per_frame', float('nan')):.1f}/{run['tiles_per_frame']}"


def _report(results):
    header = (f"{'movie':>11} {'mode':>13} {'frames':>6} {'locs/s':>8} {'frames/s':>8} "
              f"{'RSS MB':>7} {'P':>5} {'R':>5} {'Jac':>5} {'RMSE':>5} {'std(z) [95%]':>18} "
              f"{'R edge/centre':>13} {'windows':>7}")
    print(f"analyze, model {FLAGS.model}, {os.cpu_count()} CPUs")
    print(header)
    for r in results["runs"]:
        lo, hi = r["std_z_95"]
        print(f"{r['movie']:>11} {r['mode']:>13} {r['frames']:>6} "
              f"{r['localizations_per_second']:>8.1f} {r['frames_per_second']:>8.3f} "
              f"{r['peak_rss_mb']:>7.0f} {r['precision']:>5.3f} {r['recall']:>5.3f} "
              f"{r['jaccard']:>5.3f} {r['rmse_nm']:>5.1f} "
              f"{r['std_z']:>5.2f} [{lo:.2f}, {hi:.2f}] "
              f"{r['recall_edge']:>6.3f}/{r['recall_centre']:.3f} "
              f"{_windows(r)}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
