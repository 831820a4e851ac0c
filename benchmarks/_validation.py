"""The validation frames, MCMC reference and per-localization scoring shared by the sampler
benchmarks (sampler_options.py, calibration_recipes.py, calibration_by_crowding.py,
calibration_crowding_scale.py, calibration_density_scale.py): never the evaluation seeds of
trainers/evaluate_uncertainty.py."""

import numpy as np

from smlm_tfdiff.analyze import _crlb_nm  # analyze's crlb_xy, per axis.
from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.localization.metrics import match
from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.uncertainty import evaluation
from smlm_tfdiff.uncertainty.per_localization import localization_uncertainty
from smlm_tfdiff.uncertainty.scale import (SCALE_FILE, UncertaintyScale,
                                          count_neighbours, nearest_feature,
                                          neighbour_feature, photons_feature,
                                          widening_feature)

ISO_SEED, DENSE_SEED = 778, 777
GRID_SEED = 9000  # Cell k of the calibration check grid: seed GRID_SEED + k.


def define_check_grid_flags():
    """--model, --grid_emitters, --grid_photons, --grid_frames and --num_samples of the held-out
    check grid of the calibration-scale benchmarks (check_grid)."""
    from absl import flags

    flags.DEFINE_string("model", "paper", "A bundled model name or a model folder with psi.")
    flags.DEFINE_list("grid_emitters", ["3", "6", "10", "15"], "Check: emitters in the paper disc.")
    flags.DEFINE_list("grid_photons", ["150", "200", "300"], "Check: N0 per emitter (photons).")
    flags.DEFINE_integer("grid_frames", 12, "Check: frames per grid cell.")
    flags.DEFINE_integer("num_samples", 32, "Posterior samples per frame.")


def check_grid(base):
    """The check grid of the flags above: per cell (its emitters in the paper disc x N0), yields
    (n, photons, seed, config, frames) with --grid_frames frames simulated from seed GRID_SEED +
    cell index (held out: never a validation or an evaluation seed)."""
    from absl import flags

    FLAGS = flags.FLAGS
    cells = [(int(n), float(p)) for n in FLAGS.grid_emitters for p in FLAGS.grid_photons]
    for index, (n, photons) in enumerate(cells):
        cfg = base.replace(num_emitters=n, photons=photons)
        yield n, photons, GRID_SEED + index, cfg, simulate(cfg, FLAGS.grid_frames,
                                                            GRID_SEED + index)


def validation_frames(models, iso_frames, dense_frames):
    """(iso config, isolated frames, paper config, dense frames) with the models' camera."""
    icfg, dcfg = models.scene_config("isolated"), models.scene_config("paper")
    iso = simulate(icfg, iso_frames, ISO_SEED)
    return icfg, iso, dcfg, simulate(dcfg, dense_frames, DENSE_SEED)


def mcmc_reference(iso, icfg):
    """HMC (beta = 1, 4 chains x 5000 draws after 1000 burn-in, seed 5) of each isolated frame ->
    evaluation.ReferenceMaps (its MCMCResults, KDE mean and std maps [B, uH, uW] of every 5th
    draw)."""
    return evaluation.mcmc_reference(iso["frames"], icfg, 5000, 1000, seed=5, num_chains=4,
                                     kde_samples=4000)


def crowding_scores(sampler, data, cfg, radius, num_samples=32):
    """Every localization of phi in these frames matched to the truth (5 HR px), scored with
    `num_samples` projected posterior samples (seed 2) of `sampler`. Returns a dict of arrays
    over the matched localizations with a finite reported std:
      z [n, 2]           (phi's position - truth) / reported std, per axis
      neighbours [n]     other localizations of the frame within `radius` camera px
      std_nm [n, 2]      the reported std per axis (nm)
      uncertainty_nm [n] the one-number uncertainty analyze reports (nm)
      error_nm [n]       the rms of the two axes' errors (nm)
      photons [n]        the localization's photometry (io.photometry, as analyze fits it)
      background [n]     its fitted background (photons per pixel)
      crlb_nm [n, 2]     sqrt of the isolated-emitter CRLB per axis at that photometry (N0
                         unknown; NaN where the photometry failed), as analyze's crlb_xy"""
    post = sampler(data["frames"], num_samples, seed=2, return_samples=True, project=True)
    locs = localization_uncertainty(post["samples"], post["y_hat"], cfg)
    parts = {k: [] for k in ("z", "neighbours", "std_nm", "uncertainty_nm", "error_nm",
                             "photons", "background", "crlb_nm")}
    photon_frames = (data["frames"][..., 0] - cfg.offset) / cfg.gain
    for loc, truth, frame in zip(locs, evaluation.truth_positions(data["positions"],
                                                                  data["mask"]), photon_frames):
        xy = loc["xy"]
        if not len(xy):
            continue
        near = count_neighbours(xy, radius)
        p, q = match(xy, truth, 5.0 / cfg.upsample)
        err = (xy[p] - truth[q]) * cfg.pixel_size_nm
        parts["z"].append(err / loc["std_nm"][p])
        parts["neighbours"].append(near[p])
        parts["std_nm"].append(loc["std_nm"][p])
        parts["uncertainty_nm"].append(loc["uncertainty_nm"][p])
        parts["error_nm"].append(np.sqrt(np.mean(err ** 2, axis=1)))
        phot = {k: v[p] for k, v in photometry(frame, xy, cfg.psf_sigma).items()}
        parts["photons"].append(phot["intensity"])
        parts["background"].append(phot["background"])
        parts["crlb_nm"].append(_crlb_nm(xy[p], phot["intensity"], phot["background"], cfg))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    ok = np.all(np.isfinite(out["z"]), axis=1)
    return {k: v[ok] for k, v in out.items()}


def phi_estimate(backend, frames, cfg):
    """phi's estimate of frames [B, H, W, 1] as analyze makes it: for a phi that reads frames
    scaled by the photons per emitter (and told their spread), at the N0 and spread measured on
    the frames as on a movie (analyze.measure_emitter_photons); None for other phis (the
    sampler runs phi itself)."""
    from smlm_tfdiff.analyze import measure_emitter_photons, spread_read

    if backend.brightness_reference is None:
        return None
    n0, info = measure_emitter_photons(backend, frames[..., 0], cfg)
    return backend.estimate(frames, n0, spread_read(info))


def features(scores, neighbour_term="linear", widening=False, interaction=False,
             photons_squared=False, nearest=False):
    """[n, 3] design matrix (1, g(k), log(N / 200)) of scored localizations (their "neighbours"
    k and "photons" N) for the scale of uncertainty.scale, g its neighbour_term; a failed
    photometry (NaN) counts as 200 photons, its brightness term 0, and N is clipped to
    PHOTON_RANGE, as analyze does. widening: a further column log w of their "widening" (the
    background's widening of the CRLB, analyze.background_widening); photons_squared: a further
    column log(N / 200)^2; nearest: a further column log(1 + (2 px / r)^2) of their "nearest"
    (distance r to the frame's nearest other localization, camera px; uncertainty.scale's
    nearest_feature); interaction: a last column g(k) log(N / 200).
    [n, 3 + widening + photons_squared + nearest + interaction]."""
    columns = [np.ones(len(scores["photons"])),
               neighbour_feature(scores["neighbours"], neighbour_term),
               photons_feature(scores["photons"], 200.0)]
    if widening:
        columns.append(widening_feature(scores["widening"]))
    if photons_squared:
        columns.append(columns[2] ** 2)
    if nearest:
        columns.append(nearest_feature(scores["nearest"]))
    if interaction:
        columns.append(columns[1] * columns[2])
    return np.stack(columns, axis=1)


def fit_log_scale(x, z, offset=None):
    """Maximum-likelihood coefficients of log s = offset + x @ beta for z [n, 2] ~ N(0, s^2) per
    axis, and their standard errors; offset [n]: a part of log s held fixed (e.g. a scale fitted
    before, when only a new term is fitted), 0 if None. The negative log-likelihood is convex in
    beta; Newton's method with a halving line search (BFGS stopped short of the optimum on
    whole-field scenes, whose z span 0.4-3 in scale)."""
    if offset is not None:  # z / exp(offset) ~ N(0, exp(x @ beta)^2).
        z = z / np.exp(np.asarray(offset, np.float64))[:, None]
    q = np.sum(z ** 2, axis=1)

    def nll(beta):
        log_s = x @ beta
        return float(np.mean(2.0 * log_s + 0.5 * q * np.exp(-2.0 * log_s)))

    beta = np.zeros(x.shape[1])
    beta[0] = np.log(np.std(z)) if np.all(x[:, 0] == 1.0) else 0.0
    value = nll(beta)
    for _ in range(200):
        w = q * np.exp(-2.0 * (x @ beta))
        grad = x.T @ (2.0 - w) / len(q)
        hess = 2.0 * (x.T * w) @ x / len(q)
        step = np.linalg.solve(hess, grad)
        for _ in range(50):
            trial = nll(beta - step)
            if trial <= value:
                break
            step = step / 2
        else:
            raise RuntimeError("the scale fit found no descent step (a singular design: a "
                               "feature constant over all localizations?)")
        beta, value = beta - step, trial
        if np.max(np.abs(step)) < 1e-10:
            break
    else:
        raise RuntimeError("the scale fit did not converge in 200 Newton steps")
    # Standard errors from the inverse Fisher information of the Gaussian scale (4 x^T x).
    info = 4.0 * x.T @ x
    return beta, np.sqrt(np.diag(np.linalg.inv(info)))


def write_scale(folder, beta, radius, fitted_on, neighbour_term="linear", interaction=False,
                photons_squared=False, nearest=False):
    """Write the fitted scale (coefficients beta of features(): 3, a 4th with the widening, then
    log(N / 200)^2 when photons_squared, the nearest-neighbour term when nearest, and the
    interaction last when interaction; rounded to 4 digits) into the model folder as SCALE_FILE,
    where analyze applies it; returns the path."""
    import os

    widening = len(beta) - interaction - photons_squared - nearest > 3
    scale = UncertaintyScale(
        intercept=round(float(beta[0]), 4), per_neighbour=round(float(beta[1]), 4),
        per_log_photons=round(float(beta[2]), 4), radius_px=radius, reference_photons=200.0,
        neighbour_term=neighbour_term,
        per_log_widening=round(float(beta[3]), 4) if widening else 0.0,
        per_neighbour_log_photons=round(float(beta[-1]), 4) if interaction else 0.0,
        per_log_photons_squared=(round(float(beta[3 + widening]), 4) if photons_squared
                                 else 0.0),
        per_log_nearest=(round(float(beta[3 + widening + photons_squared]), 4) if nearest
                         else 0.0),
        fitted_on=fitted_on)
    path = os.path.join(folder, SCALE_FILE)
    with open(path, "w") as f:
        f.write(scale.to_json() + "\n")
    print(f"wrote {path}", flush=True)
    return path


def scaled_scores(scores, factor):
    """The per-localization calibration of crowding_scores' localizations before and after their
    reported std is multiplied by factor [n]: std(z) with its standard error, the mean reported
    std (nm) and the Spearman correlation of |error| with the reported std (sharpness)."""
    from scipy.stats import spearmanr

    std, err = scores["uncertainty_nm"], scores["error_nm"]
    raw, raw_se = std_z(scores["z"])
    cal, cal_se = std_z(scores["z"] / factor[:, None])
    return {"localizations": int(len(std)), "std_z_raw": raw, "std_z_raw_se": raw_se,
            "std_z_scaled": cal, "std_z_scaled_se": cal_se,
            "mean_std_nm_raw": float(std.mean()),
            "mean_std_nm_scaled": float((std * factor).mean()),
            "spearman_raw": float(spearmanr(err, std).correlation),
            "spearman_scaled": float(spearmanr(err, std * factor).correlation)}


def check_row(scores, constant, factor):
    """A check cell's figures: the mean neighbour count, std(z) under one constant scale (with
    its standard error) and scaled_scores under factor [n]."""
    const, const_se = std_z(scores["z"] / constant)
    return {"mean_neighbours": float(scores["neighbours"].mean()), "std_z_constant": const,
            "std_z_constant_se": const_se, **scaled_scores(scores, factor)}


def describe_scaled(row):
    """One line of scaled_scores' figures."""
    return (f"std(z) raw {row['std_z_raw']:.2f} +- {row['std_z_raw_se']:.2f}  scaled "
            f"{row['std_z_scaled']:.2f} +- {row['std_z_scaled_se']:.2f}  mean std "
            f"{row['mean_std_nm_raw']:5.1f} -> {row['mean_std_nm_scaled']:5.1f} nm  spearman "
            f"{row['spearman_raw']:.2f} -> {row['spearman_scaled']:.2f}")


def std_z(values):
    """(std, its standard error sd / sqrt(2 (n - 1))) of the z values (any shape, pooled)."""
    values = np.ravel(values)
    sd = float(np.std(values, ddof=1))
    return sd, sd / np.sqrt(2 * (len(values) - 1))
