"""The calibration scale of a whole-field model, fitted through analyze itself: psi sampled in
windows around phi's localizations, on whole frames with emitters anywhere (edges included), over
densities and brightnesses; fitted on validation seeds, checked on held-out ones.

    python benchmarks/calibration_wholefield_scale.py --model wholefield [--scale_out <folder>]

The scale is the one of uncertainty.scale (log s = a + b log(1 + k) + c log(N / 200), or b k with
--neighbour_term linear; k: the frame's other localizations within --radius camera px, N: their
photometry, both from analyze's own table; with --background_term or --base_scale + d log w, w the
factor by which the fitted background widens the CRLB; with --photons_squared_term
+ f log(N / 200)^2; with --nearest_term + h log(1 + (2 px / r)^2), r the distance to the frame's
nearest other localization; with --interaction_term + e log(1 + k) log(N / 200)), fitted by
maximum likelihood of z = (localization - truth) / (s x psi's std) ~ N(0, 1) per axis, beside one constant scale. Each cell is a movie of --size x --size px frames simulated with the
seeds' camera and optics (the paper preset, emitters uniform over the frame, edges included) at
1 emitter per D px^2 (D in --densities) and N0 in --photons (a number, or lo-hi for a uniform
range per emitter), with enough frames for --localizations emitters, analyzed by StackAnalyzer
with the default settings (the model's samples per frame and recipe) and no scale (its raw
spread); the localizations are matched to the truth as benchmarks/analyze.py does (5 HR px).
Fit cells: seed 8300 + --seed_offset + cell index; check cells: the same grid, seed 9300 +
--seed_offset + cell index (held out; never an evaluation seed). Per check cell: std(z) raw / constant / scaled with standard errors, the
mean reported std and the Spearman correlation of |error| with the reported std (sharpness).
--scores_cache keeps the scored localizations, so that a refit needs no new analysis; several
caches (comma-separated, each made by one run, e.g. with other --photons and --seed_offset) are
merged for the fit and the check. The cache also keeps each localization's fitted background
(photons per pixel) and its widening w. --background simulates every cell over a uniform
background (photons per pixel; several values: every cell at each); the background term is fitted
on such cells, with a, b, c either fitted jointly (--background_term) or kept from a scale fitted
without background (--base_scale, the bundled scale's recipe: docs/calibration.md). Prints a
table and one JSON line (--out also writes it).
"""

import csv
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

from _validation import (check_row, describe_scaled, features, fit_log_scale, std_z,
                         write_scale)
from smlm_tfdiff.uncertainty.scale import count_neighbours, nearest_distance

flags.DEFINE_string("model", "wholefield", "A whole-field model (bundled name or folder).")
flags.DEFINE_list("densities", ["400", "100", "40", "20", "15"],
                  "px^2 per emitter of the cells.")
flags.DEFINE_list("photons", ["150", "400", "1000-5000"],
                  "N0 of the cells: photons, or lo-hi (uniform per emitter).")
flags.DEFINE_list("background", None, "Backgrounds, photons per pixel: every density x N0 cell "
                  "at each (default: the paper preset's, 0).")
flags.DEFINE_string("fit_from", None, "A JSON report of this script (--out): take its fitted "
                    "scale and score only the check cells (e.g. at another --background).")
flags.DEFINE_integer("size", 64, "Frame side, camera px.")
flags.DEFINE_integer("localizations", 150, "Emitters simulated per cell (fit and check).")
flags.DEFINE_integer("seed_offset", 0, "Added to the cells' seeds: more cells for a fit without "
                     "reusing a seed (e.g. another --photons into another --scores_cache).")
flags.DEFINE_integer("num_samples", None, "Posterior samples per frame (default: analyze's, "
                     "the model's own).")
flags.DEFINE_float("radius", 8.0, "Neighbourhood radius, camera px.")
flags.DEFINE_enum("neighbour_term", "log1p", ["linear", "log1p"], "How the neighbour count k "
                  "enters log s: b k, or b log(1 + k) (uncertainty.scale).")
flags.DEFINE_bool("background_term", False, "Fit a fourth term d log w, w the fitted "
                  "background's widening of the CRLB (analyze.background_widening), jointly with "
                  "the others.")
flags.DEFINE_bool("interaction_term", False, "Fit a further term e g(k) log(N / 200), the "
                  "brightness slope changing with crowding (uncertainty.scale).")
flags.DEFINE_bool("photons_squared_term", False, "Fit a further term f log(N / 200)^2, the "
                  "brightness slope changing with brightness (uncertainty.scale).")
flags.DEFINE_bool("nearest_term", False, "Fit a further term h log(1 + (2 px / r)^2), r the "
                  "distance to the frame's nearest other localization (a close pair's errors; "
                  "uncertainty.scale).")
flags.DEFINE_string("base_scale", None, "An uncertainty_scale.json whose a, b, c (fitted on "
                    "cells without background) are kept: fit only the background term d, on "
                    "these cells (with --background).")
flags.DEFINE_string("scale_out", None, "A model folder: write the fitted scale there as "
                    "uncertainty_scale.json, which analyze then applies.")
flags.DEFINE_bool("check", True, "Score the held-out cells (--nocheck: fit only).")
flags.DEFINE_list("scores_cache", None, "An .npz of the scored localizations: read if it "
                    "exists (and was made with the same cells), written otherwise.")
flags.DEFINE_string("out", None, "JSON file for the results.")
FLAGS = flags.FLAGS

FIT_SEED, CHECK_SEED = 8300, 9300
INTERACTION_TERM = "neighbour term x log(photons / 200)"  # The report's names of them.
SQUARED_TERM = "log(photons / 200)^2"
NEAREST_TERM = "log(1 + (2 px / nearest distance)^2)"
KEYS = ("z", "neighbours", "photons", "background", "widening", "uncertainty_nm", "error_nm",
        "nearest")


def _photons(spec):
    """(N0, range or None) of a --photons entry."""
    if "-" in spec:
        lo, hi = (float(v) for v in spec.split("-"))
        return (lo + hi) / 2, (lo, hi)
    return float(spec), None


def cells():
    """(px^2 per emitter, N0 spec, background or None) of every cell."""
    backgrounds = [None] if FLAGS.background is None else [float(b) for b in FLAGS.background]
    return [(float(d), p, b) for b in backgrounds for d in FLAGS.densities for p in FLAGS.photons]


def movie(density, photons, background, seed):
    """(frames [N, H, W] ADU, simulate() dict, config) of one cell."""
    from smlm_tfdiff import SimulationConfig
    from smlm_tfdiff.simulation.simulate import simulate

    count = max(1, int(round(FLAGS.size ** 2 / density)))
    n0, photons_range = _photons(photons)
    extra = {} if photons_range is None else dict(photons_range=photons_range)
    if background is not None:
        extra["background"] = background
    config = SimulationConfig.preset("paper", frame_height=FLAGS.size, frame_width=FLAGS.size,
                                     region="frame", margin=0.0, num_emitters=count, photons=n0,
                                     **extra)
    frames = max(1, -(-FLAGS.localizations // count))
    data = simulate(config, frames, seed=seed)
    return data["frames"][..., 0], data, config


def score_cell(backend, density, photons, background, seed):
    """Scored localizations of one cell (dict of KEYS arrays; z [n, 2], the rest [n]) and its
    precision / recall."""
    import tifffile

    from smlm_tfdiff.analyze import Camera, StackAnalyzer, background_widening
    from smlm_tfdiff.localization.metrics import localization_metrics

    frames, data, config = movie(density, photons, background, seed)
    analyzer = StackAnalyzer(backend, Camera(config.offset, config.gain), FLAGS.num_samples,
                             progress=False, maps=False, scale_uncertainty=False)
    work = tempfile.mkdtemp(prefix="wholefield-scale-")
    try:
        path = os.path.join(work, "movie.tif")
        tifffile.imwrite(path, np.round(frames).astype(np.uint16), photometric="minisblack")
        analyzer.analyze(path, os.path.join(work, "out"))
        with open(os.path.join(work, "out", "movie.csv")) as f:
            rows = list(csv.DictReader(f))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nm = config.pixel_size_nm
    col = lambda key: np.array([float(r[key]) for r in rows])  # noqa: E731
    frame_of = col("frame").astype(np.int64) - 1
    xy = np.stack([col("x [nm]"), col("y [nm]")], axis=1).reshape(-1, 2) / nm
    std = np.stack([col("uncertainty_x [nm]"), col("uncertainty_y [nm]")], axis=1).reshape(-1, 2)
    photometry, fitted_background = col("intensity [photon]"), col("offset [photon]")
    widening = background_widening(xy, photometry, fitted_background, config,
                                   col("crlb_xy [nm]"))  # analyze's own CRLB at the background.
    neighbours = np.zeros(len(rows), np.int64)
    nearest = np.zeros(len(rows))
    for k in range(len(frames)):  # As analyze counts them: the frame's other localizations.
        neighbours[frame_of == k] = count_neighbours(xy[frame_of == k], FLAGS.radius)
        nearest[frame_of == k] = nearest_distance(xy[frame_of == k])
    pred = [xy[frame_of == k] for k in range(len(frames))]
    metrics = localization_metrics(pred, data, config)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pred])])
    row = offsets[metrics["matches"][:, 0]] + metrics["matches"][:, 1]
    err = metrics["errors"] * nm
    scores = {"z": err / std[row], "neighbours": neighbours[row], "photons": photometry[row],
              "background": fitted_background[row], "widening": widening[row],
              "uncertainty_nm": np.sqrt(np.mean(std[row] ** 2, axis=1)),
              "error_nm": np.sqrt(np.mean(err ** 2, axis=1)), "nearest": nearest[row]}
    ok = np.all(np.isfinite(scores["z"]), axis=1)
    return ({k: v[ok] for k, v in scores.items()},
            {"frames": len(frames), "precision": metrics["precision"],
             "recall": metrics["recall"]})


def num_samples():
    """Posterior samples per frame: --num_samples, else the model's recipe's, else analyze's
    default (what StackAnalyzer draws)."""
    if FLAGS.num_samples is not None:
        return FLAGS.num_samples
    from smlm_tfdiff.analyze import DEFAULT_NUM_SAMPLES
    from smlm_tfdiff.diffusion.recipe import Recipe
    from smlm_tfdiff.pretrained import WEIGHTS_DIR

    folder = FLAGS.model if os.path.isdir(FLAGS.model) else os.path.join(WEIGHTS_DIR, FLAGS.model)
    with open(os.path.join(folder, "diffusion.json")) as f:
        return Recipe.from_json(f.read()).num_samples or DEFAULT_NUM_SAMPLES


def compute_scores():
    """{"fit": [...], "check": [...]}: per cell (density, photons, seed, scores, metrics)."""
    from smlm_tfdiff.analyze import load_backend

    backend = load_backend(FLAGS.model, need_psi=True)
    if not backend.config.region == "frame":
        raise app.UsageError(f"{FLAGS.model} is not a whole-field model; for tiles of the paper "
                             "scene use benchmarks/calibration_density_scale.py")
    out = {}
    for part, base in (("fit", FIT_SEED + FLAGS.seed_offset),
                       ("check", CHECK_SEED + FLAGS.seed_offset)):
        if (part == "check" and not FLAGS.check) or (part == "fit" and FLAGS.fit_from):
            continue
        out[part] = []
        for index, (density, photons, background) in enumerate(cells()):
            start = time.perf_counter()
            scores, metrics = score_cell(backend, density, photons, background, base + index)
            metrics["background"] = background
            out[part].append((density, photons, base + index, scores, metrics))
            bg = "" if background is None else f" background {background:g}"
            print(f"{part} 1/{density:g} px^2 N0 {photons}{bg}: {metrics['frames']} frames, "
                  f"{len(scores['z'])} matched, P {metrics['precision']:.3f} R "
                  f"{metrics['recall']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def _cache_key():
    """What a --scores_cache was made with: the cells (and the background, if set)."""
    key = [[d, p] + ([] if b is None else [b]) for d, p, b in cells()]
    return key if FLAGS.background is None else {"cells": key, "background": FLAGS.background}


def _save(path, result):
    arrays = {"cells": np.array(json.dumps(_cache_key()))}
    for part, rows in result.items():
        for i, (d, p, seed, scores, metrics) in enumerate(rows):
            arrays[f"{part}_{i}_meta"] = np.array(json.dumps([d, p, seed, metrics]))
            for k in KEYS:
                arrays[f"{part}_{i}_{k}"] = scores[k]
    np.savez(path, **arrays)


def _load(path, check_key=True):
    with np.load(path) as f:
        if check_key and json.loads(str(f["cells"])) != _cache_key():
            raise app.UsageError(f"{path} holds other cells (or another background); remove it "
                                 "or pass another --scores_cache")
        result = {}
        for part in ("fit", "check"):
            metas = sorted((k for k in f.files if k.startswith(part) and k.endswith("_meta")),
                           key=lambda k: int(k.split("_")[1]))
            result[part] = [(*json.loads(str(f[m]))[:3],
                             {k: (f[m.replace("meta", k)] if m.replace("meta", k) in f.files
                                  else np.full(len(f[m.replace("meta", "z")]), np.nan))
                              for k in KEYS},
                             json.loads(str(f[m]))[3]) for m in metas]
        return {k: v for k, v in result.items() if v}


def _base_scale():
    """The UncertaintyScale of --base_scale, checked against --neighbour_term and --radius."""
    from smlm_tfdiff.uncertainty.scale import UncertaintyScale

    with open(FLAGS.base_scale) as f:
        base = UncertaintyScale.from_json(f.read())
    if base.neighbour_term != FLAGS.neighbour_term or base.radius_px != FLAGS.radius:
        raise app.UsageError(f"{FLAGS.base_scale} has neighbour_term {base.neighbour_term} and "
                             f"radius {base.radius_px:g} px; pass those")
    return base


def _describe(rows):
    """'seeds a-b, c-d: SxS px, 1 emitter per ... px^2 x N0 ...' of scored cells."""
    seeds = sorted(seed for _, _, seed, _, _ in rows)
    runs, start = [], seeds[0]
    for prev, seed in zip(seeds, seeds[1:] + [None]):
        if seed != prev + 1 if seed is not None else True:
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = seed
    densities = sorted({d for d, *_ in rows}, reverse=True)
    photons = sorted({p for _, p, *_ in rows}, key=lambda p: _photons(p)[0])
    backgrounds = sorted({m.get("background") or 0.0 for *_, m in rows})
    return (f"seeds {', '.join(runs)}: {FLAGS.size}x{FLAGS.size} px, 1 emitter per "
            f"{', '.join(f'{d:g}' for d in densities)} px^2 x N0 {', '.join(photons)}"
            + ("" if backgrounds == [0.0] else
               f" x background {', '.join(f'{b:g}' for b in backgrounds)} photons per pixel"))


def main(argv):
    del argv
    caches = FLAGS.scores_cache or []
    if len(caches) > 1:  # Cells of several runs (e.g. more brightnesses), merged.
        missing = [p for p in caches if not os.path.exists(p)]
        if missing:
            raise app.UsageError(f"--scores_cache lists several files, so all must exist (missing "
                                 f"{missing}); make each with one run of its own flags")
        result = {}
        for path in caches:
            for part, rows in _load(path, check_key=False).items():
                result.setdefault(part, []).extend(rows)
    elif caches and os.path.exists(caches[0]):
        result = _load(caches[0])
    else:
        result = compute_scores()
        if caches:
            _save(caches[0], result)
    if caches and FLAGS.check and not result.get("check"):
        raise app.UsageError(f"{', '.join(caches)} hold no check cells: pass --nocheck, or add "
                             "a cache with check cells (a run with --fit_from scores only those)")
    if FLAGS.nearest_term and any(np.all(np.isnan(scores["nearest"]))
                                  for rows in result.values() for *_, scores, _ in rows):
        raise app.UsageError(f"{', '.join(caches)} holds cells scored before the nearest "
                             "distance was kept: score them again (another --scores_cache) "
                             "for --nearest_term")
    if not FLAGS.fit_from and not result.get("fit"):
        raise app.UsageError(f"{', '.join(caches)} hold no fit cells: pass --fit_from, or add "
                             "a cache with fit cells")
    widening = FLAGS.background_term or FLAGS.base_scale is not None
    interaction, squared = FLAGS.interaction_term, FLAGS.photons_squared_term
    nearest = FLAGS.nearest_term
    if (interaction or squared or nearest) and FLAGS.base_scale:
        raise app.UsageError("--interaction_term, --photons_squared_term and --nearest_term fit "
                             "every term jointly; they do not combine with --base_scale")
    fitted_on = ""
    if FLAGS.fit_from:
        with open(FLAGS.fit_from) as f:
            fitted = json.load(f)["fit"]
        if fitted.get("neighbour_term", "linear") != FLAGS.neighbour_term:
            raise app.UsageError(f"{FLAGS.fit_from} was fitted with neighbour_term "
                                 f"{fitted.get('neighbour_term', 'linear')}; pass that")
        beta, beta_se = np.array(fitted["log_scale"]), np.array(fitted["se"])
        terms = fitted.get("terms", [])
        widening, interaction = "log(widening)" in terms, INTERACTION_TERM in terms
        squared, nearest = SQUARED_TERM in terms, NEAREST_TERM in terms
        constant, z = fitted["constant_scale"], np.zeros((fitted["localizations"], 2))
        print(f"the scale fitted in {FLAGS.fit_from}:", end=" ")
    else:
        fit = [scores for _, _, _, scores, _ in result["fit"]]
        x = np.concatenate([features(s, FLAGS.neighbour_term, widening, interaction, squared,
                                     nearest) for s in fit])
        z = np.concatenate([s["z"] for s in fit])
        if FLAGS.base_scale:  # a, b, c kept: log s = (a, b, c) . x[:, :3] + d log w.
            base = _base_scale()
            fixed = np.array([base.intercept, base.per_neighbour, base.per_log_photons])
            d, d_se = fit_log_scale(x[:, 3:], z, offset=x[:, :3] @ fixed)
            beta, beta_se = np.concatenate([fixed, d]), np.concatenate([np.zeros(3), d_se])
            fitted_on = (f"a, b, c of {FLAGS.base_scale} ({base.fitted_on.rstrip('; ')}); d: ")
        else:
            beta, beta_se = fit_log_scale(x, z)
        constant, _ = std_z(z)
    g = "k" if FLAGS.neighbour_term == "linear" else "log(1 + k)"
    term_d = ((f" + {beta[3]:.4f} log w" if widening else "")
              + (f" + {beta[3 + widening]:.4f} log(N/200)^2" if squared else "")
              + (f" + {beta[3 + widening + squared]:.4f} log(1 + (2/r)^2)" if nearest else "")
              + (f" + {beta[-1]:.4f} {g} log(N/200)" if interaction else ""))
    print(f"fit ({len(z)} localizations, radius {FLAGS.radius:g} px): log s = "
          f"{beta[0]:.3f} + {beta[1]:.4f} {g} + {beta[2]:.3f} log(N/200){term_d}  (se "
          f"{', '.join(f'{v:.4f}' for v in beta_se)}{'; a, b, c kept' if FLAGS.base_scale else ''}"
          f"); constant scale {constant:.3f}", flush=True)
    if FLAGS.scale_out and not FLAGS.fit_from:
        write_scale(FLAGS.scale_out, beta, FLAGS.radius,
                    fitted_on + f"python benchmarks/calibration_wholefield_scale.py --model "
                    f"{FLAGS.model}{' --background_term' if widening else ''}"
                    f"{' --photons_squared_term' if squared else ''}"
                    f"{' --nearest_term' if nearest else ''}"
                    f"{' --interaction_term' if interaction else ''}: "
                    f"{len(z)} localizations of analyze's table on validation movies "
                    f"({_describe(result['fit'])}), default recipe, {num_samples()} samples; "
                    f"docs/calibration.md", FLAGS.neighbour_term, interaction, squared,
                    nearest)
    rows = []
    for density, photons, seed, s, metrics in result.get("check", []):
        r = {"px2_per_emitter": density, "photons": photons, "seed": seed, **metrics,
             **check_row(s, constant, np.exp(
                 features(s, FLAGS.neighbour_term, widening, interaction, squared, nearest)
                 @ beta))}
        rows.append(r)
        bg = metrics.get("background")
        print(f"1/{density:3g} px^2 N0 {photons:>9}{'' if bg is None else f' bg {bg:g}'}  locs "
              f"{r['localizations']:4d} k "
              f"{r['mean_neighbours']:4.1f}  constant {r['std_z_constant']:.2f}  "
              + describe_scaled(r),
              flush=True)
    if rows:
        inside = lambda key: sum(0.8 <= r[key] <= 1.25 for r in rows)  # noqa: E731
        print(f"check cells with std(z) in [0.8, 1.25], of {len(rows)}: raw "
              f"{inside('std_z_raw')}, constant {inside('std_z_constant')}, scaled "
              f"{inside('std_z_scaled')}", flush=True)
    report = {"model": FLAGS.model, "radius_px": FLAGS.radius, "size": FLAGS.size,
              "background": FLAGS.background, "fit_from": FLAGS.fit_from,
              "num_samples": num_samples(),
              "fit": {"log_scale": beta.tolist(), "se": beta_se.tolist(),
                      "terms": ["1", "neighbours" if FLAGS.neighbour_term == "linear"
                                else "log(1 + neighbours)", "log(photons / 200)"]
                      + (["log(widening)"] if widening else [])
                      + ([SQUARED_TERM] if squared else [])
                      + ([NEAREST_TERM] if nearest else [])
                      + ([INTERACTION_TERM] if interaction else []),
                      "kept_from": FLAGS.base_scale,
                      "neighbour_term": FLAGS.neighbour_term,
                      "localizations": int(len(z)), "constant_scale": constant},
              "check": rows}
    print(json.dumps(report))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
