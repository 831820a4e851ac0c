"""The scale of psi's per-pixel posterior std maps, fitted on the coverage of per-pixel intervals.

    python benchmarks/calibration_pixel_scale.py --model paper --scale_out smlm_tfdiff/weights/paper

psi's per-pixel intervals under-cover on dense frames and over-cover on isolated ones (the
samples' spread about their mean is too narrow, then too wide). The map scale multiplies the
samples' deviations from their mean, and so the std map and every interval, by

    c = exp(a + b k + c' log(N / 200))

taken per camera pixel from the localization nearest it (uncertainty.scale.pixel_factor_map): k its
other localizations within --radius px, N its photometry, as the per-localization scale's
features. With the scaled samples m + c (s - m), a pixel's truth t lies in its level-l interval
iff c >= the smallest covering scale (t - m) / hi or (t - m) / lo, i.e. iff log c >= L_l. A
scale whose intervals cover as a calibrated sampler's do (the expected coverage of S samples'
quantile intervals, tau_l = l (S - 1) / (S + 1)) puts a fraction tau_l of the L_l below log c:
log c = a + b k + c' log(N / 200) is a quantile regression of L_l at tau_l. The fit minimises the
pinball loss of L_50 at tau_50 plus that of L_90 at tau_90 (convex), each cell weighted equally,
on psi's raw samples (those analyze's maps are made of).

Fit: the paper disc with --fit_emitters x --fit_photons, seeds 8400 + cell index, --fit_frames
frames per cell (twice that with one emitter). Cells where phi misses many emitters (15 in the
disc) are left out by default: a truth that lies above every sample counts against any scale,
and the quantile regression would widen every crowded pixel to make up for them. Check: the held-out grid of the other calibration
benchmarks (--grid_emitters x --grid_photons, --grid_frames frames, seed 9000 + cell index), and the
validation frames (12 dense, seed 777; 12 isolated, seed 778). Coverage pixels: true KDE or
posterior mean above 0.05 (evaluation.coverage_mask), as the demo scores them. Prints a table and
writes a JSON (--out).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from scipy.optimize import minimize

from _validation import (ISO_SEED, DENSE_SEED, check_grid, define_check_grid_flags,
                         phi_estimate)
from smlm_tfdiff.analyze import KerasBackend
from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.uncertainty import calibration as cal
from smlm_tfdiff.uncertainty.evaluation import coverage_mask
from smlm_tfdiff.uncertainty.scale import (PIXEL_SCALE_FILE, UncertaintyScale,
                                          count_neighbours, nearest_localization,
                                          neighbour_feature, photons_feature)

define_check_grid_flags()
flags.DEFINE_float("radius", 8.0, "Neighbourhood radius, camera px.")
flags.DEFINE_list("fit_emitters", ["1", "3", "6", "10"], "Fit: emitters in the paper disc (not "
                  "15: there phi misses emitters whose pixels no scale covers, and the fit would "
                  "widen every crowded pixel for them).")
flags.DEFINE_list("fit_photons", ["200"], "Fit: N0 per emitter (photons).")
flags.DEFINE_enum("neighbour_term", "linear", ["linear", "log1p"], "How k enters log c: b k or "
                  "b log(1 + k) (uncertainty.scale.NEIGHBOUR_TERMS).")
flags.DEFINE_bool("intercept", False, "Fit the intercept a too (else a = 0: c = 1 for a lone "
                  "emitter, where psi's std maps match the MCMC posterior's, docs/calibration.md).")
flags.DEFINE_bool("photons_term", False, "Fit the brightness term c' too (else c' = 0: off the "
                  "brightness psi was trained at, its maps are biased in amplitude, which no "
                  "scale of their spread mends; docs/calibration.md).")
flags.DEFINE_integer("fit_frames", 8, "Fit: frames per cell (twice that with one emitter).")
flags.DEFINE_integer("map_samples", 48, "Posterior samples per frame for the intervals.")
flags.DEFINE_string("cache", None, "An .npz of the scored cells: read where it holds a cell, "
                    "written with every cell scored (a rerun only fits and prints).")
flags.DEFINE_string("scale_out", None, "A model folder: write the fitted map scale there as "
                    f"{PIXEL_SCALE_FILE}, which analyze then applies to the std maps.")
flags.DEFINE_bool("check", True, "Check the fit on the validation frames and the held-out grid "
                  "(--nocheck: fit only).")
flags.DEFINE_string("out", "benchmarks/results/calibration_pixel_scale.json", "JSON results.")
FLAGS = flags.FLAGS

LEVELS = (0.5, 0.9)
FIT_SEED = 8400


def pixel_cell(backend, models, cfg, data, num_samples, radius):
    """psi's raw posterior of the frames, scored per coverage pixel. Returns a dict of arrays
    over the coverage pixels: need [n, 2] the smallest scale of the samples' deviations whose
    50% / 90% quantile interval covers the truth (inf: none), x [n, 3] the features (1, k,
    log(N / 200)) of the pixel's nearest localization, std [n] psi's per-pixel std, err [n]
    |truth - mean|."""
    post = backend.sampler(data["frames"], num_samples, seed=2, return_samples=True,
                           y_hat=phi_estimate(backend, data["frames"], cfg))
    samples = post["samples"][..., 0].astype(np.float64)
    mean = samples.mean(axis=1)
    truth = data["kde"][..., 0]
    mask = coverage_mask(truth, post["mean"][..., 0], 0.05)
    photon_frames = (data["frames"][..., 0] - cfg.offset) / cfg.gain
    need, x, std, err = [], [], [], []
    u = cfg.upsample
    for b in range(len(samples)):
        xy = np.asarray(detect(post["y_hat"][b], cfg, detection=models.detection))
        n = (photometry(photon_frames[b], xy, cfg.psf_sigma)["intensity"] if len(xy)
             else np.zeros(0))
        m = mask[b]
        dev = samples[b][:, m] - mean[b][m]
        t = truth[b][m] - mean[b][m]
        cols = []
        for level in LEVELS:
            lo, hi = np.quantile(dev, [(1 - level) / 2, (1 + level) / 2], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                c = np.where(t > 0, np.where(hi > 0, t / hi, np.inf),
                             np.where(lo < 0, t / lo, np.where(t < 0, np.inf, 0.0)))
            cols.append(c)
        need.append(np.stack(cols, axis=1))
        # Features of each pixel's nearest localization, as pixel_factor_map takes them.
        h, w = truth.shape[1] // u, truth.shape[2] // u
        if len(xy):
            nearest = np.repeat(np.repeat(nearest_localization(xy, (h, w)), u, 0), u, 1)
            k_map = count_neighbours(xy, radius)[nearest]
            n_map = photons_feature(n, 200.0)[nearest]
        else:
            k_map = np.zeros(truth.shape[1:])
            n_map = np.zeros(truth.shape[1:])
        x.append(np.stack([np.ones(m.sum()), k_map[m], n_map[m]], axis=1))
        std.append(samples[b][:, m].std(axis=0, ddof=1))
        err.append(np.abs(t))
    return {"need": np.concatenate(need), "x": np.concatenate(x), "std": np.concatenate(std),
            "err": np.concatenate(err)}


CELL_KEYS = ("need", "x", "std", "err")


def scored(cache, key, make):
    """The cell `key` from the cache dict (arrays CELL_KEYS, key/name), else make() and store it."""
    if cache is not None and f"{key}/need" in cache:
        return {k: cache[f"{key}/{k}"] for k in CELL_KEYS}
    cell = {k: v for k, v in make().items() if k in CELL_KEYS}
    if cache is not None:
        cache.update({f"{key}/{k}": v for k, v in cell.items()})
        np.savez(FLAGS.cache, **cache)
    return cell


def with_term(cell):
    """The cell with its k column as the scale's --neighbour_term reads it (g(k))."""
    x = cell["x"].copy()
    x[:, 1] = neighbour_feature(x[:, 1], FLAGS.neighbour_term)
    return {**cell, "x": x}


def coverage_at(cell, beta):
    """Coverage [2] of the 50% / 90% intervals with the samples scaled by exp(x @ beta)."""
    c = np.exp(cell["x"] @ beta)
    return np.mean(cell["need"] <= c[:, None], axis=0)


def fit(cells, num_samples, photons_term, intercept):
    """(a, b, c'): the joint quantile regression of the smallest covering log scales L_50, L_90
    at their expected coverage (pinball loss, cells weighted equally; convex, so Nelder-Mead from
    1 finds its minimum), and the loss."""
    tau = cal.expected_quantile_coverage(list(LEVELS), num_samples)
    # A truth no scale covers (L = +inf) or any covers (L = -inf): far beyond every log c, where
    # only its side of log c matters to the loss.
    x = np.concatenate([c["x"] for c in cells])
    big = np.log(np.concatenate([np.clip(c["need"], 1e-4, 1e4) for c in cells]))
    weight = np.concatenate([np.full(len(c["x"]), 1.0 / len(c["x"])) for c in cells])

    free = np.array([intercept, True, photons_term])
    x = x[:, free]

    def loss(beta):
        r = big - (x @ beta)[:, None]  # Residual L - log c per level.
        return float(np.sum(weight[:, None] * np.maximum(tau * r, (tau - 1) * r)))

    n = int(free.sum())
    simplex = np.vstack([np.zeros(n), np.diag(np.array([0.2, 0.05, 0.3])[free])])
    res = minimize(loss, np.zeros(n), method="Nelder-Mead",
                   options={"initial_simplex": simplex, "xatol": 1e-5, "fatol": 1e-10,
                            "maxiter": 6000})
    beta = np.zeros(3)
    beta[free] = res.x
    return beta, float(res.fun)


def spearman(a, b):
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).correlation)


def row(name, cell, beta):
    raw = coverage_at(cell, np.zeros(3))
    scaled = coverage_at(cell, beta)
    c = np.exp(cell["x"] @ beta)
    return {"cell": name, "pixels": int(len(cell["need"])),
            "coverage_raw": raw.round(4).tolist(), "coverage_scaled": scaled.round(4).tolist(),
            "mean_std_raw": float(cell["std"].mean()),
            "mean_std_scaled": float((cell["std"] * c).mean()),
            "spearman_raw": spearman(cell["err"], cell["std"]),
            "spearman_scaled": spearman(cell["err"], cell["std"] * c)}


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    backend = KerasBackend(models, jit_compile=True)
    base = models.scene_config("paper")
    s = FLAGS.map_samples
    cache = None
    if FLAGS.cache:  # Cells scored before, for this model and sample count only.
        cache = dict(np.load(FLAGS.cache)) if os.path.exists(FLAGS.cache) else {}
        tag = np.array(f"{FLAGS.model} {s} samples radius {FLAGS.radius:g}")
        if "tag" in cache and str(cache["tag"]) != str(tag):
            raise app.UsageError(f"--cache {FLAGS.cache} holds cells of {cache['tag']}, not "
                                 f"{tag}: pass another file")
        cache["tag"] = tag
    fit_cells, fit_names = [], []
    cells = [(int(n), float(p)) for n in FLAGS.fit_emitters for p in FLAGS.fit_photons]
    for index, (n, photons) in enumerate(cells):
        cfg = base.replace(num_emitters=n, photons=photons)
        frames = FLAGS.fit_frames * (2 if n == 1 else 1)
        fit_names.append(f"fit {n} emitters N0 {photons:g}")
        fit_cells.append(with_term(scored(cache, f"{fit_names[-1]} seed {FIT_SEED + index} frames {frames}",
                                lambda: pixel_cell(backend, models, cfg, simulate(
                                    cfg, frames, FIT_SEED + index), s, FLAGS.radius))))
        print(f"{fit_names[-1]}: {frames} frames, {len(fit_cells[-1]['need'])} pixels",
              flush=True)
    beta, loss = fit(fit_cells, s, FLAGS.photons_term, FLAGS.intercept)
    g = "log(1 + k)" if FLAGS.neighbour_term == "log1p" else "k"
    print(f"fit: log c = {beta[0]:.4f} + {beta[1]:.4f} {g} + {beta[2]:.4f} log(N / 200) "
          f"(loss {loss:.2e})", flush=True)
    expected = cal.expected_quantile_coverage(list(LEVELS), s).round(4).tolist()
    rows = [row(nm, c, beta) for nm, c in zip(fit_names, fit_cells)]
    checks = []
    icfg, dcfg = models.scene_config("isolated"), models.scene_config("paper")
    for name, cfg, seed in ((("validation dense (seed 777)", dcfg, DENSE_SEED),
                             ("validation isolated (seed 778)", icfg, ISO_SEED))
                            if FLAGS.check else ()):
        checks.append((name, with_term(scored(cache, name, lambda: pixel_cell(
            backend, models, cfg, simulate(cfg, 12, seed), s, FLAGS.radius)))))
    for n, photons, seed, cfg, data in (check_grid(base) if FLAGS.check else ()):
        name = f"check {n} emitters N0 {photons:g} (seed {seed})"
        checks.append((name, with_term(scored(
            cache, f"{name} frames {FLAGS.grid_frames}",
            lambda: pixel_cell(backend, models, cfg, data, s, FLAGS.radius)))))
        print(f"{name} done", flush=True)
    rows += [row(nm, c, beta) for nm, c in checks]
    print(f"\nexpected coverage of calibrated quantile intervals ({s} samples): {expected}")
    print(f"{'cell':44s} {'pixels':>7s} {'raw 50/90':>13s} {'scaled 50/90':>13s} "
          f"{'std raw/scaled':>15s} {'rho raw/scaled':>15s}")
    for r in rows:
        print(f"{r['cell']:44s} {r['pixels']:7d} {r['coverage_raw'][0]:6.3f}/"
              f"{r['coverage_raw'][1]:.3f} {r['coverage_scaled'][0]:6.3f}/"
              f"{r['coverage_scaled'][1]:.3f} {r['mean_std_raw']:7.4f}/{r['mean_std_scaled']:.4f}"
              f" {r['spearman_raw']:7.3f}/{r['spearman_scaled']:.3f}")
    options = "".join([" --intercept" if FLAGS.intercept else "",
                       " --photons_term" if FLAGS.photons_term else "",
                       "" if FLAGS.neighbour_term == "linear" else
                       f" --neighbour_term {FLAGS.neighbour_term}"])
    fitted_on = (f"python benchmarks/calibration_pixel_scale.py --model {FLAGS.model}{options}"
                 f" --fit_emitters {','.join(FLAGS.fit_emitters)} --fit_photons "
                 f"{','.join(FLAGS.fit_photons)}: coverage "
                 f"of 50% / 90% per-pixel intervals of {s} raw samples on validation scenes "
                 f"(seeds {FIT_SEED}-{FIT_SEED + len(cells) - 1}: "
                 f"{', '.join(FLAGS.fit_emitters)} emitters in the paper disc x N0 "
                 f"{', '.join(FLAGS.fit_photons)}), default recipe; docs/calibration.md")
    scale = UncertaintyScale(round(float(beta[0]), 4), round(float(beta[1]), 4),
                             round(float(beta[2]), 4), radius_px=FLAGS.radius,
                             neighbour_term=FLAGS.neighbour_term, fitted_on=fitted_on)
    if FLAGS.scale_out:
        with open(os.path.join(FLAGS.scale_out, PIXEL_SCALE_FILE), "w") as f:
            f.write(scale.to_json() + "\n")
        print(f"wrote {os.path.join(FLAGS.scale_out, PIXEL_SCALE_FILE)}")
    result = {"model": FLAGS.model, "map_samples": s, "expected": expected,
              "scale": json.loads(scale.to_json()), "loss": loss, "rows": rows}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"scale": result["scale"], "loss": loss}))


if __name__ == "__main__":
    app.run(main)
