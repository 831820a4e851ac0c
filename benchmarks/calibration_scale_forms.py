"""Lever 3 of the dense-calibration work, third form: which features a scale of the reported
per-localization std must key on. Several log-linear forms fitted on the same validation scenes
and checked on the same held-out grid, side by side.

    python benchmarks/calibration_scale_forms.py --model paper

Features, all known at analysis time: k, the other localizations within --radius camera px;
N, the localization's photometry (photons, io.photometry as analyze fits it); r, psi's reported
std over the isolated-emitter CRLB at that photometry (analyze's uncertainty_xy / crlb_xy). r
measures how far psi's spread is from the physics bound of a lone emitter: psi reports bright
lone emitters too wide (it was trained at one brightness) and crowded ones too narrow. A form
log s = x @ beta (x a subset of 1, k, log(N / 200), log r) is fitted by maximum likelihood of
z ~ N(0, s^2) per axis (z = (phi's position - truth) / reported std).

Fit: the scenes of calibration_density_scale.py (the paper disc with --fit_emitters emitters x
--fit_photons N0, seeds 8000 + cell index). Check: calibration_crowding_scale.py's grid
(--grid_emitters x --grid_photons, seed 9000 + cell index; never an evaluation seed). Per form:
the cells whose scaled std(z) lies in [0.8, 1.25], per cell the scaled std(z) with its standard
error, the mean reported std and the Spearman correlation of |error| with the reported std. The
localizations' scores (psi sampling, the slow part) can be kept in --scores_cache (.npz) and
re-read when only the forms change. Prints tables and one JSON line.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

from smlm_tfdiff.uncertainty.scale import photons_feature
from _validation import (check_grid, crowding_scores, define_check_grid_flags, fit_log_scale,
                         scaled_scores)

define_check_grid_flags()
flags.DEFINE_float("radius", 8.0, "Neighbourhood radius, camera px.")
flags.DEFINE_list("fit_emitters", ["1", "3", "6", "10", "15"], "Fit: emitters in the paper disc.")
flags.DEFINE_list("fit_photons", ["150", "300"], "Fit: N0 per emitter (photons).")
flags.DEFINE_integer("fit_localizations", 36, "Fit: emitters simulated per cell.")
flags.DEFINE_string("scores_cache", "", "An .npz that keeps the localizations' scores: read if it "
                    "exists (same flags), written otherwise. Empty: no cache.")
FLAGS = flags.FLAGS

TERMS = {"1": "1", "k": "neighbours", "logN": "log(photons / 200)", "logr": "log(std / CRLB)"}
FORMS = {"constant": ("1",), "density": ("1", "k", "logN"), "ratio": ("1", "logr"),
         "density_ratio": ("1", "k", "logr"), "all": ("1", "k", "logN", "logr")}
KEYS = ("z", "neighbours", "std_nm", "uncertainty_nm", "error_nm", "photons", "background",
        "crlb_nm")


def features(scores, terms):
    """[n, len(terms)] design matrix. A failed photometry (NaN) counts as 200 photons and r = 1
    (its brightness and ratio terms 0)."""
    crlb = np.sqrt(np.mean(scores["crlb_nm"] ** 2, axis=1))
    ratio = np.where(np.isfinite(crlb) & (crlb > 0), scores["uncertainty_nm"] / crlb, 1.0)
    columns = {"1": np.ones(len(crlb)), "k": scores["neighbours"].astype(float),
               "logN": photons_feature(scores["photons"], 200.0), "logr": np.log(np.clip(ratio, 1e-2, 1e2))}
    return np.stack([columns[t] for t in terms], axis=1)


def _cells():
    fit = [(int(n), float(p), 8000 + i) for i, (n, p) in
           enumerate((n, p) for n in FLAGS.fit_emitters for p in FLAGS.fit_photons)]
    return fit


def compute_scores():
    """(fit scores, grid scores): lists of crowding_scores dicts with 'emitters', 'photons',
    'seed' added."""
    from smlm_tfdiff.diffusion.sampler import PosteriorSampler
    from smlm_tfdiff.pretrained import load_phi_source
    from smlm_tfdiff.simulation.simulate import simulate

    models = load_phi_source(FLAGS.model)
    sampler = PosteriorSampler(models)
    base = models.scene_config("paper")
    fit = []
    for n, photons, seed in _cells():
        cfg = base.replace(num_emitters=n, photons=photons)
        frames = max(1, -(-FLAGS.fit_localizations // n))
        s = crowding_scores(sampler, simulate(cfg, frames, seed), cfg, FLAGS.radius,
                            FLAGS.num_samples)
        fit.append({**s, "emitters": n, "photons_n0": photons, "seed": seed})
        print(f"fit cell N={n} N0={photons:g}: {frames} frames, {len(s['z'])} localizations",
              flush=True)
    grid = []
    for n, photons, seed, cfg, data in check_grid(base):
        s = crowding_scores(sampler, data, cfg, FLAGS.radius, FLAGS.num_samples)
        grid.append({**s, "emitters": n, "photons_n0": photons, "seed": seed})
        print(f"check cell N={n} N0={photons:g}: {len(s['z'])} localizations", flush=True)
    return fit, grid


def _save(path, fit, grid):
    arrays = {"flags": np.array(json.dumps(_cache_key()))}
    for name, cells in (("fit", fit), ("grid", grid)):
        for i, cell in enumerate(cells):
            for key in KEYS + ("emitters", "photons_n0", "seed"):
                arrays[f"{name}{i}_{key}"] = np.asarray(cell[key])
        arrays[f"{name}_cells"] = np.array(len(cells))
    np.savez_compressed(path, **arrays)


def _load(path):
    data = np.load(path)
    if json.loads(str(data["flags"])) != _cache_key():
        raise ValueError(f"--scores_cache {path} was written with other flags "
                         f"({str(data['flags'])}); remove it or name another file")
    out = []
    for name in ("fit", "grid"):
        cells = []
        for i in range(int(data[f"{name}_cells"])):
            cell = {k: data[f"{name}{i}_{k}"] for k in KEYS}
            cell.update({k: data[f"{name}{i}_{k}"].item() for k in ("emitters", "photons_n0",
                                                                      "seed")})
            cells.append(cell)
        out.append(cells)
    return out


def _cache_key():
    return {"model": FLAGS.model, "radius": FLAGS.radius, "fit_emitters": FLAGS.fit_emitters,
            "fit_photons": FLAGS.fit_photons, "fit_localizations": FLAGS.fit_localizations,
            "grid_emitters": FLAGS.grid_emitters, "grid_photons": FLAGS.grid_photons,
            "grid_frames": FLAGS.grid_frames, "num_samples": FLAGS.num_samples}


def main(argv):
    del argv
    path = FLAGS.scores_cache
    if path and os.path.exists(path):
        fit, grid = _load(path)
        print(f"scores read from {path}", flush=True)
    else:
        fit, grid = compute_scores()
        if path:
            _save(path, fit, grid)
    z_fit = np.concatenate([s["z"] for s in fit])
    results = {}
    for form, terms in FORMS.items():
        x = np.concatenate([features(s, terms) for s in fit])
        beta, se = fit_log_scale(x, z_fit)
        rows = []
        for cell in grid:
            r = scaled_scores(cell, np.exp(features(cell, terms) @ beta))
            rows.append({"emitters": cell["emitters"], "photons": cell["photons_n0"],
                         "seed": cell["seed"], **r})
        inside = sum(0.8 <= r["std_z_scaled"] <= 1.25 for r in rows)
        results[form] = {"terms": [TERMS[t] for t in terms], "log_scale": beta.tolist(),
                         "se": se.tolist(), "cells_in_target": inside, "grid": rows}
        print(f"\n{form}: log s = " + " + ".join(f"{b:.3f} [{e:.3f}] {t}" for b, e, t in
                                                zip(beta, se, terms))
              + f"; {inside} of {len(rows)} cells in [0.8, 1.25]")
        print("| emitters | N0 | locs | std(z) raw | scaled | mean std raw -> scaled | "
              "Spearman raw -> scaled |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            mark = "**" if 0.8 <= r["std_z_scaled"] <= 1.25 else ""
            print(f"| {r['emitters']} | {r['photons']:g} | {r['localizations']} | "
                  f"{r['std_z_raw']:.2f} +- {r['std_z_raw_se']:.2f} | {mark}"
                  f"{r['std_z_scaled']:.2f} +- {r['std_z_scaled_se']:.2f}{mark} | "
                  f"{r['mean_std_nm_raw']:.1f} -> {r['mean_std_nm_scaled']:.1f} nm | "
                  f"{r['spearman_raw']:.2f} -> {r['spearman_scaled']:.2f} |")
    print(json.dumps({"model": FLAGS.model, "radius_px": FLAGS.radius,
                      "fit_localizations": int(len(z_fit)), "forms": results}))


if __name__ == "__main__":
    app.run(main)
