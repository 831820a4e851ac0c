"""Evaluation against the truth and the MCMC posterior: reference maps, scores, the targets.

Every function takes its settings as arguments; the demo (smlm_tfdiff.demo), the scripts
trainers/evaluate_uncertainty.py, evaluate_psi.py, evaluate_phi.py and the sampler benchmarks
call them with their own.

  targets                R_MIN, RATIO, Z_RANGE, COV_POINTS, their text and `within`: what a
                         calibrated psi meets.
  MCMC reference         `mcmc_reference`: HMC posterior of isolated-emitter frames rendered to
                         per-pixel KDE mean and std maps; `mcmc_diagnostics`; psi's maps against
                         them: `std_map_scores`, `mcmc_comparison` (the demo's), `psi_vs_mcmc`
                         (evaluate_uncertainty's), `recipe_comparison` (per guided start).
  per-pixel intervals    `coverage_mask`, `pixel_coverage`: central credible intervals of the
                         samples against the true KDE.
  per localization       `localization_z`, `posterior_localization_z` (posterior samples around
                         phi's localizations) and `score_localization_table` (an analyze table with
                         its uncertainty and CRLB columns): z = error / reported std, std(z) with
                         its 95% interval, the fractions within 1 and 2 std (coverage), Spearman's
                         rho of |error| with the std (sharpness).
  accuracy               `localization_with_oracle`, `kde_accuracy`, `recipe_agreement`.
  baselines              `crlb_baseline` (z = error / sqrt(CRLB)), `mc_dropout_scores`.

Units: positions (x, y) in LR pixels (pixel j covers [j, j + 1) px); frames [B, H, W, 1] ADU;
KDE maps [B, uH, uW] (HR grid, KDE units); per-localization errors and stds in nm. The
statistics themselves are in smlm_tfdiff/uncertainty/calibration.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.localization.detection import detect
from smlm_tfdiff.uncertainty import calibration as cal
from smlm_tfdiff.uncertainty.scale import pixel_factor_map

# ------------------------------------------------------------------------------------- targets
# The targets of the uncertainty: the demo's report and trainers/evaluate_uncertainty.py hold
# psi to these.
R_MIN = 0.9             # Pearson r of psi's and MCMC's std maps (isolated, beta = 1), at least.
RATIO = (0.8, 1.25)     # psi / MCMC mean std (and MCMC xy std / sqrt(CRLB)), within.
Z_RANGE = (0.8, 1.25)   # std(z), z = error / reported std per axis, within.
COV_POINTS = 0.05       # Coverage of central per-pixel intervals: |coverage - level| at most.

R_TEXT = f">= {R_MIN:g}"                          # ">= 0.9"
RATIO_TEXT = f"[{RATIO[0]:g}, {RATIO[1]:g}]"      # "[0.8, 1.25]"
Z_TEXT = f"[{Z_RANGE[0]:g}, {Z_RANGE[1]:g}]"      # "[0.8, 1.25]"


def coverage_text(level):
    """The target of a central `level` interval's coverage as text, e.g. 0.9 -> "0.85..0.95"."""
    return f"{level - COV_POINTS:.2f}..{level + COV_POINTS:.2f}"


def within(value, low, high) -> Optional[bool]:
    """low <= value <= high as a plain bool; None when value is None, NaN or infinite."""
    if value is None or not math.isfinite(float(value)):
        return None
    return bool(low <= float(value) <= high)


def std_map_targets(agreement) -> dict:
    """The std-map targets of a `std_map_scores` dict (beta = 1): {"pearson_r>=0.9",
    "pearson_r_median>=0.9", "ratio_in_[0.8,1.25]"} -> bool or None."""
    return {f"pearson_r>={R_MIN:g}": bool(agreement["pearson_r"] >= R_MIN),
            f"pearson_r_median>={R_MIN:g}": bool(agreement["pearson_r_median"] >= R_MIN),
            f"ratio_in_[{RATIO[0]:g},{RATIO[1]:g}]": within(agreement["mean_ratio"], *RATIO)}


# ------------------------------------------------------------------------------ MCMC reference
class ReferenceMaps(NamedTuple):
    """The MCMC reference posterior of B isolated-emitter frames."""
    results: list       # B MCMCResult (smlm_tfdiff.uncertainty.mcmc): chains, std, rhat, ess, ...
    mean: np.ndarray    # [B, uH, uW] per-pixel posterior mean of the KDE (KDE units)
    std: np.ndarray     # [B, uH, uW] per-pixel posterior std of the KDE (ddof 0)


def mcmc_reference(frames, config, num_results, num_burnin, seed, num_chains=4, beta=1.0,
                   kde_samples=2000) -> ReferenceMaps:
    """HMC posterior of each isolated-emitter frame, rendered to per-pixel KDE maps.

    frames: [B, H, W(, 1)] ADU, one emitter each; config: their SimulationConfig. All B frames run
    in one batched call (`mcmc_posterior_batch`, kernel "hmc", num_chains chains of num_results
    draws after num_burnin steps; beta tempers the likelihood, 1 = the posterior). Of the
    num_results * num_chains draws of (x, y), every step-th is rendered, step =
    max(1, num_results * num_chains // kde_samples), i.e. about kde_samples KDEs per frame.
    The same arguments give the same maps.
    """
    from smlm_tfdiff.uncertainty.mcmc import kde_posterior, mcmc_posterior_batch

    frames = np.asarray(frames)
    if frames.ndim == 4:
        frames = frames[..., 0]
    res = mcmc_posterior_batch(frames, config, num_results, num_burnin, seed=seed, kernel="hmc",
                               num_chains=num_chains, beta=beta, warn=False)
    means, stds = [], []
    for r in res:
        step = max(1, r.chains.shape[0] * r.chains.shape[1] // kde_samples)
        mean, std = kde_posterior(r.chains[::step, :, :2].reshape(-1, 2), config)
        means.append(mean)
        stds.append(std)
    return ReferenceMaps(res, np.array(means), np.array(stds))


def mcmc_diagnostics(results) -> dict:
    """Convergence of a list of MCMCResult: fraction converged, largest R-hat, smallest ESS."""
    return {"converged_fraction": float(np.mean([r.converged for r in results])),
            "rhat_max": float(np.nanmax([r.rhat.max() for r in results])),
            "ess_min": float(np.min([r.ess.min() for r in results]))}


def std_map_scores(psi_mean, psi_std, reference: ReferenceMaps) -> dict:
    """psi's per-pixel std maps against the reference's: `calibration.std_map_agreement` (Pearson
    r pooled and per frame, ratio of means) and "mean_map_r", Pearson r of the mean maps.
    psi_mean, psi_std: [B, uH, uW] (or [B, uH, uW, 1]) for the reference's B frames."""
    psi_mean, psi_std = _squeeze(psi_mean), _squeeze(psi_std)
    agree = cal.std_map_agreement(psi_std, reference.std)
    agree["mean_map_r"] = cal.pearson_r(psi_mean, reference.mean)
    return agree


def single_emitter_std_ratios(locs, results, pixel_size_nm) -> np.ndarray:
    """psi's per-localization std over MCMC's posterior std of (x, y), per axis, on the frames
    where exactly one emitter was localized. locs: per frame, a `localization_uncertainty` dict
    (std_nm [M, 2] nm); results: the frames' MCMCResult (std in LR px). Returns [N, 2]."""
    ratios = [loc["std_nm"][0] / (r.std[:2] * pixel_size_nm) for loc, r in zip(locs, results)
              if len(loc["xy"]) == 1]
    return np.array(ratios, np.float64).reshape(-1, 2)


def mcmc_comparison(post, reference: ReferenceMaps, positions, photons, config,
                    signal_fraction=0.1) -> dict:
    """psi on isolated frames against the MCMC reference and MCMC against the CRLB.

    post: PosteriorSampler output for the reference's B frames (mean, std [B, uH, uW, 1],
    samples [B, S, uH, uW, 1], y_hat [B, uH, uW, 1]); positions [B, 2] true (x, y) LR px and
    photons [B] of each frame's emitter. Returns `std_map_scores` plus:
      signal_region        the agreement where MCMC's std exceeds signal_fraction of its peak (the
                           emitter's own region: the pooled numbers include empty pixels, where the
                           posterior std is ~0 but psi's is not)
      background_psi_std   psi's mean std outside that region
      peak_ratio           mean over frames of psi's peak std / MCMC's
      mcmc_xy_std_nm, sqrt_crlb_nm, mcmc_xy_std_over_sqrt_crlb   MCMC's (x, y) posterior std
                           against sqrt(CRLB) at the truth (photons estimated), nm
      psi_loc_std_over_mcmc_median   median of `single_emitter_std_ratios`
      mcmc                 `mcmc_diagnostics` and the mean acceptance rate
    """
    from smlm_tfdiff.simulation.physics.fisher import crlb
    from smlm_tfdiff.uncertainty.per_localization import localization_uncertainty

    psi_std, mcmc_std, res = _squeeze(post["std"]), reference.std, reference.results
    agree = std_map_scores(post["mean"], psi_std, reference)
    signal = mcmc_std > signal_fraction * mcmc_std.max(axis=(1, 2), keepdims=True)
    sig = cal.std_map_agreement(psi_std, mcmc_std, mask=signal)
    agree["signal_region"] = {k: sig[k] for k in ("pearson_r", "mean_ratio", "num_pixels")}
    agree["background_psi_std"] = float(psi_std[~signal].mean())
    agree["peak_ratio"] = float(np.mean(psi_std.max(axis=(1, 2)) / mcmc_std.max(axis=(1, 2))))
    bounds = crlb(positions, config, photons=photons, estimate_photons=True)[:, :2]
    xy_std = np.array([r.std[:2] for r in res])
    nm = config.pixel_size_nm
    agree["mcmc_xy_std_nm"] = float(xy_std.mean() * nm)
    agree["sqrt_crlb_nm"] = float(bounds.mean() * nm)
    agree["mcmc_xy_std_over_sqrt_crlb"] = float(np.mean(xy_std / bounds))
    locs = localization_uncertainty(post["samples"], post["y_hat"], config)
    ratios = single_emitter_std_ratios(locs, res, nm)
    agree["psi_loc_std_over_mcmc_median"] = (float(np.nanmedian(ratios)) if len(ratios)
                                             else float("nan"))
    agree["mcmc"] = {**mcmc_diagnostics(res),
                     "acceptance": float(np.mean([r.acceptance for r in res]))}
    return agree


def psi_vs_mcmc(post, iso, references, config, threshold=0.05) -> dict:
    """psi on isolated frames against the MCMC reference at each tempering, and against the truth.

    post: PosteriorSampler output (mean, std, y_hat [B, uH, uW, 1], samples [B, S, uH, uW, 1]) for
    the frames of iso (`simulate` output: kde [B, uH, uW, 1]); references: {beta: ReferenceMaps}
    of the same frames; config: their SimulationConfig; threshold: coverage pixels (KDE units).
    Returns num_frames; mcmc: {"beta_<beta>": `std_map_scores` with mcmc ({beta,
    `mcmc_diagnostics`, wall_time_s}), mcmc_xy_std_nm_mean (MCMC's (x, y) std, nm) and at beta = 1
    targets (`std_map_targets`)}; kde_mse_psi_mean and kde_mse_y_hat (against the true KDE);
    coverage_vs_truth (`calibration.reliability` on the pixels of `coverage_mask`).
    """
    out = {"num_frames": int(len(iso["frames"])), "mcmc": {}}
    for b, ref in references.items():
        agree = std_map_scores(post["mean"], post["std"], ref)
        agree["mcmc"] = {"beta": b, **mcmc_diagnostics(ref.results),
                         "wall_time_s": ref.results[0].wall_time_s}
        agree["mcmc_xy_std_nm_mean"] = float(np.mean([r.std[:2] for r in ref.results])
                                             * config.pixel_size_nm)
        if b == 1.0:
            agree["targets"] = std_map_targets(agree)
        out["mcmc"][f"beta_{b:g}"] = agree
    out["kde_mse_psi_mean"] = float(np.mean((post["mean"] - iso["kde"]) ** 2))
    out["kde_mse_y_hat"] = float(np.mean((post["y_hat"] - iso["kde"]) ** 2))
    mask = coverage_mask(iso["kde"][..., 0], post["mean"][..., 0], threshold)
    out["coverage_vs_truth"] = cal.reliability(post["samples"][..., 0], iso["kde"][..., 0],
                                               mask=mask, axis=1)
    return out


def recipe_comparison(sampler, frames, num_samples, recipe, t_starts, references,
                      default_std=None, seed=3) -> dict:
    """psi's std maps under guided starts t_start against the MCMC references.

    sampler: a PosteriorSampler; frames [n, H, W, 1] ADU (isolated); recipe: the default recipe
    (num_steps, method, t_start, restart_t, project: the sampler's keyword arguments); t_starts:
    the starts to compare (ints, each <= T); each runs min(t, max(2, round(num_steps * t /
    recipe t_start))) steps with num_samples samples (seed). default_std [n, uH, uW]: the default
    recipe's std maps of these frames, reused for its own row when it has no restart.
    references: {beta: ReferenceMaps} of at least these frames (the first n are used).
    Returns {"num_frames": n, "rows": {"t<t>_s<steps>": {t_start, num_steps, psi_std_mean,
    "beta_<beta>": {pearson_r, pearson_r_median, mean_ratio}}}, "best_by_ratio_beta_1": the row
    whose beta = 1 mean ratio is closest to 1 (in log)}.
    """
    n, t_default = len(frames), recipe["t_start"]
    rows = {}
    for t in t_starts:
        steps = int(min(t, max(2, round(recipe["num_steps"] * t / t_default))))
        if (t == t_default and steps == recipe["num_steps"] and recipe["restart_t"] is None
                and default_std is not None):
            std = default_std
        else:
            std = sampler(frames, num_samples, num_steps=steps, method=recipe["method"],
                          start="guided", t_start=t, seed=seed,
                          project=recipe["project"])["std"][..., 0]
        row = {"t_start": t, "num_steps": steps, "psi_std_mean": float(std.mean())}
        for b, ref in references.items():
            a = cal.std_map_agreement(std, ref.std[:n])
            row[f"beta_{b:g}"] = {k: a[k] for k in ("pearson_r", "pearson_r_median",
                                                    "mean_ratio")}
        rows[f"t{t}_s{steps}"] = row
    best = min(rows, key=lambda k: abs(np.log(rows[k]["beta_1"]["mean_ratio"])))
    return {"num_frames": n, "rows": rows, "best_by_ratio_beta_1": best}


# ---------------------------------------------------------------------- per-pixel intervals
def coverage_mask(truth_kde, posterior_mean, threshold=0.05) -> np.ndarray:
    """The pixels scored for coverage: true KDE or posterior mean above threshold (KDE units).
    truth_kde, posterior_mean: the same shape, e.g. [B, uH, uW]. Returns bool, that shape."""
    return (np.asarray(truth_kde) > threshold) | (np.asarray(posterior_mean) > threshold)


def pixel_coverage(samples, truth_kde, posterior_mean, threshold=0.05) -> dict:
    """Coverage of the true KDE by central per-pixel 50% and 90% intervals of the samples.

    samples [B, S, uH, uW], truth_kde and posterior_mean [B, uH, uW] (KDE units); the pixels of
    `coverage_mask`. Returns num_frames, threshold, coverage_50 / _90 (intervals between sample
    quantiles; `calibration.coverage`), coverage_rank_50 / _90 (from the randomised PIT),
    expected_quantile_50_90 (the quantile intervals' expected coverage for S exchangeable
    samples), reliability (`calibration.reliability`), pit_histogram, and
    target_within_5_points (both quantile coverages within COV_POINTS of their level).
    """
    samples, truth_kde = np.asarray(samples), np.asarray(truth_kde)
    mask = coverage_mask(truth_kde, posterior_mean, threshold)
    rel = cal.reliability(samples, truth_kde, mask=mask, axis=1)
    cov = cal.coverage(samples, truth_kde, [0.5, 0.9], mask=mask, axis=1)
    cov_rank = cal.coverage(samples, truth_kde, [0.5, 0.9], mask=mask, axis=1, method="rank")
    return {
        "num_frames": int(len(truth_kde)), "threshold": threshold,
        "coverage_50": float(cov[0]), "coverage_90": float(cov[1]),
        "coverage_rank_50": float(cov_rank[0]), "coverage_rank_90": float(cov_rank[1]),
        "expected_quantile_50_90": cal.expected_quantile_coverage([0.5, 0.9],
                                                                  samples.shape[1]).tolist(),
        "reliability": rel,
        "pit_histogram": cal.pit_histogram(cal.pit(samples, truth_kde, axis=1)[mask]),
        "target_within_5_points": cal.coverage_within(cov, [0.5, 0.9], COV_POINTS)}


# ---------------------------------------------------------------------------- map scale
def map_scale_factors(scale, post, frames, config, detection):
    """[B, uH, uW] the map scale (uncertainty.scale.pixel_factor_map) of each frame's posterior,
    as analyze applies it to its std maps: from the localizations detected in phi's estimate
    (post["y_hat"]) and their photometry in frames [B, H, W, 1] (ADU of config's camera)."""
    out = []
    for y_hat, frame in zip(post["y_hat"][..., 0], frames[..., 0]):
        xy = np.asarray(detect(y_hat, config, detection=detection)).reshape((-1, 2))
        photons = (photometry((frame - config.offset) / config.gain, xy,
                              config.psf_sigma)["intensity"] if len(xy) else np.zeros(0))
        out.append(pixel_factor_map(scale, xy, photons, frame.shape, config.upsample))
    return np.stack(out)


def scaled_samples(post, factors):
    """post with its samples' deviations from their mean multiplied per pixel by factors
    [B, uH, uW] (the map scale), and its std with them."""
    s = np.asarray(post["samples"], np.float64)
    mean = s.mean(axis=1, keepdims=True)
    f = factors[:, None, ..., None]
    return {**post, "samples": mean + f * (s - mean), "std": post["std"] * factors[..., None]}


# ---------------------------------------------------------------------------- per localization
def localization_z(locs, truth, config, tolerance):
    """z-scores of scored localizations matched to the truth.

    locs: per frame, a `localization_uncertainty` dict; truth: per frame, [K, 2] true (x, y) LR px;
    tolerance: matching radius, LR px (one-to-one). Returns (scores, arrays):
      scores  z_phi_xy (`calibration.z_summary` of z = (phi's position - truth) / reported std per
              axis: std with std_ci95, robust_std, frac_abs_le_1 / _2, n), z_posterior_mean (the
              samples' mean position instead of phi's), sharpness_nm (`calibration.sharpness`:
              Spearman's rho of |error| with the std, mean std in nm), median_std_nm
      arrays  z [M, 2], errors [M, 2] nm (phi's position - truth), stds [M, 2] nm
    """
    from smlm_tfdiff.uncertainty.per_localization import localization_errors

    e_phi, e_mean, sd = localization_errors(locs, truth, config, tolerance)
    z = cal.z_scores(e_phi, sd)
    scores = {"z_phi_xy": cal.z_summary(z),
              "z_posterior_mean": cal.z_summary(cal.z_scores(e_mean, sd)),
              "sharpness_nm": cal.sharpness(e_phi, sd),
              "median_std_nm": float(np.nanmedian(sd))}
    return scores, {"z": z, "errors": e_phi, "stds": sd}


def posterior_localization_z(post, data, config, tolerance, num_frames=None, num_samples=None):
    """z-scores of phi's localizations with the std of posterior samples around them.

    post: posterior dict (samples [B, S, uH, uW, 1], y_hat [B, uH, uW, 1]) of the frames of data
    (`simulate` output: positions, mask); the first num_frames frames (default all) and num_samples
    samples (default all) go to `localization_uncertainty`; tolerance: matching radius, LR px.
    Returns (`localization_z`'s scores and arrays, the per-frame localization dicts).
    """
    from smlm_tfdiff.uncertainty.per_localization import localization_uncertainty

    n = len(data["frames"]) if num_frames is None else min(num_frames, len(data["frames"]))
    s = post["samples"].shape[1] if num_samples is None else num_samples
    locs = localization_uncertainty(post["samples"][:n, :s], post["y_hat"][:n], config)
    truth = truth_positions(data["positions"][:n], data["mask"][:n])
    scores, arrays = localization_z(locs, truth, config, tolerance)
    return scores, arrays, locs


LOCALIZATION_KEYS = ("TP", "FP", "FN", "precision", "recall", "jaccard", "rmse_lateral_nm",
                     "efficiency_lateral")


def score_localization_table(pred, uncertainty_nm, crlb_nm, positions, mask, config,
                             num_samples):
    """A localization table with its per-localization uncertainty, scored against the truth.

    pred: per frame, [M, 2] (x, y) LR px; uncertainty_nm: per frame, [M, 2] reported std in x and
    y (nm); crlb_nm: per frame, [M] sqrt(CRLB) (nm); positions [N, K, 2] LR px and mask [N, K] the
    truth; num_samples: posterior samples behind each std (S; a calibrated std estimated from S
    samples gives Student-t z of std sqrt((S - 1) / (S - 3)), not 1).
    Returns (scores, arrays):
      scores  localization: analyze and oracle metrics (LOCALIZATION_KEYS), recall_over_oracle,
                tolerance_nm, localizations;
              uncertainty: num_matched, z (`calibration.z_summary` of error / std per axis),
                z_expected_calibrated, sharpness (`calibration.sharpness` of the errors and
                stds per axis), uncertainty_median_nm, crlb_median_nm,
                uncertainty_over_crlb_median (uncertainty_xy = rms of the two axes' std, over
                sqrt(CRLB)), rms_error_per_axis_nm, rms_error_over_crlb
      arrays  pred, truth (per frame), err_nm [TP, 2], crlb_nm [TP], unc_nm [TP] (uncertainty_xy),
              z [TP, 2] of the matched localizations
    """
    truth = truth_positions(positions, mask)
    m, oracle, recall_over_oracle = localization_with_oracle(pred, positions, mask, config)
    matches = m["matches"]
    err_nm = m["errors"] * config.pixel_size_nm  # [TP, 2]
    u = np.array([uncertainty_nm[f][p] for f, p, _ in matches]).reshape(-1, 2)
    b = np.array([crlb_nm[f][p] for f, p, _ in matches]).reshape(-1)
    uxy = np.sqrt(np.mean(u ** 2, axis=1))
    z = cal.z_scores(err_nm, u)
    counts = np.array([len(p) for p in pred])
    s = num_samples
    ok = np.isfinite(b) & np.isfinite(uxy)
    rms_err = float(np.sqrt(np.mean(err_nm ** 2))) if len(err_nm) else float("nan")
    rms_crlb = float(np.sqrt(np.nanmean(b ** 2))) if np.isfinite(b).any() else float("nan")
    return {
        "localization": {
            "analyze": {k: m[k] for k in LOCALIZATION_KEYS},
            "oracle": {k: oracle[k] for k in LOCALIZATION_KEYS},
            "recall_over_oracle": recall_over_oracle,
            "tolerance_nm": m["tolerance_nm"], "localizations": int(counts.sum())},
        "uncertainty": {
            "num_matched": int(len(matches)), "z": cal.z_summary(z),
            "sharpness": cal.sharpness(err_nm, u),
            "z_expected_calibrated": math.sqrt((s - 1) / (s - 3)) if s > 3 else None,
            "uncertainty_median_nm": float(np.nanmedian(uxy)) if uxy.size else float("nan"),
            "crlb_median_nm": float(np.nanmedian(b)) if np.isfinite(b).any() else float("nan"),
            "uncertainty_over_crlb_median": float(np.median(uxy[ok] / b[ok])) if ok.any()
            else float("nan"),
            "rms_error_per_axis_nm": rms_err, "rms_error_over_crlb": rms_err / rms_crlb},
    }, {"pred": pred, "truth": truth, "err_nm": err_nm, "crlb_nm": b, "unc_nm": uxy, "z": z}


# ------------------------------------------------------------------------------ accuracy
def truth_positions(positions, mask):
    """Per frame, the true (x, y) LR px of the valid emitters: positions [N, K, 2], mask [N, K]
    -> list of N arrays [K_i, 2]."""
    return [p[m] for p, m in zip(positions, mask)]


def localization_with_oracle(pred, positions, mask, config, tolerance_hr=5.0):
    """Localizations scored against the truth beside the oracle (detection on the true KDE).

    pred: per frame, [M, 2] (x, y) LR px; positions [N, K, 2] LR px and mask [N, K] the truth;
    tolerance_hr: matching radius, HR px. Returns (`localization_metrics` dict with errors and
    matches, the oracle's dict, recall / oracle recall or None when the oracle recalls nothing).
    """
    from smlm_tfdiff.localization.metrics import localization_metrics, oracle_metrics

    m = localization_metrics(pred, truth_positions(positions, mask), config, tolerance_hr)
    oracle = oracle_metrics(positions, mask, config, tolerance_hr=tolerance_hr)
    return m, oracle, (m["recall"] / oracle["recall"] if oracle["recall"] else None)


ACCURACY_KEYS = ("precision", "recall", "jaccard", "rmse_lateral_nm", "efficiency_lateral")


def kde_accuracy(kde, true_kde, truth, config, tolerance_hr=5.0) -> dict:
    """A KDE estimate scored against the truth: "kde_mse" (mean squared difference from the true
    KDE, KDE units squared) and the ACCURACY_KEYS of `localization_metrics` for detect() on it.
    kde, true_kde: [B, uH, uW, 1]; truth: per frame, [K, 2] LR px; tolerance_hr: HR px."""
    from smlm_tfdiff.localization.detection import detect
    from smlm_tfdiff.localization.metrics import localization_metrics

    m = localization_metrics(detect(kde, config), truth, config, tolerance_hr)
    return {"kde_mse": float(np.mean((kde - true_kde) ** 2)),
            **{k: float(m[k]) for k in ACCURACY_KEYS}}


def recipe_agreement(outputs, true_kde, references) -> dict:
    """Sampler outputs of the same frames under several recipes, compared.

    outputs: {name: PosteriorSampler output (mean, std [n, uH, uW, 1], nfe_per_frame)};
    true_kde [n, uH, uW, 1]; references: {key: name of an output} whose std maps every recipe is
    compared with. Returns {name: {nfe_per_frame, kde_mse_mean (of the posterior mean),
    std_mean, key: `calibration.std_map_agreement` with that reference, ...}}.
    """
    rows = {}
    for name, res in outputs.items():
        rows[name] = {"nfe_per_frame": res["nfe_per_frame"],
                      "kde_mse_mean": float(np.mean((res["mean"] - true_kde) ** 2)),
                      "std_mean": float(res["std"].mean()),
                      **{key: cal.std_map_agreement(res["std"], outputs[ref]["std"])
                         for key, ref in references.items()}}
    return rows


# ------------------------------------------------------------------------------------ baselines
def crlb_baseline(phi, data, config, tolerance):
    """z = error / sqrt(CRLB) of phi's localizations: the physics bound as the reported std.

    phi: the Keras phi; data: `simulate` output (frames [N, H, W, 1] ADU, positions, mask) of
    `config`; tolerance: matching radius, LR px. The CRLB is taken at each matched localization
    with config.photons (photons estimated). Returns (z [M, 2], sqrt(CRLB) [M, 2] LR px).
    """
    from smlm_tfdiff.localization.detection import detect
    from smlm_tfdiff.localization.metrics import match
    from smlm_tfdiff.models.phi_training import predict
    from smlm_tfdiff.simulation.physics.fisher import crlb

    found = detect(predict(phi, data["frames"]), config)
    errs, bounds = [], []
    for f, p, m in zip(found, data["positions"], data["mask"]):
        a, b = match(f, p[m], tolerance)
        if len(a):
            errs.append(f[a] - p[m][b])
            bounds.append(crlb(f[a], config, photons=config.photons, estimate_photons=True)[:, :2])
    errs, bounds = np.concatenate(errs), np.concatenate(bounds)
    return cal.z_scores(errs, bounds), bounds


def mc_dropout_scores(models, iso, dense, reference: Optional[ReferenceMaps], num_samples,
                      threshold, tolerance, loc_frames, loc_samples, iso_loc_samples):
    """An MC-dropout phi scored as psi is: std maps against the MCMC reference (isolated frames),
    per-pixel coverage (dense frames) and per-localization z-scores of its own localizations
    (detected on its y_hat).

    models: a Pretrained whose phi has dropout; iso, dense: `simulate` outputs (isolated and
    paper presets); reference: the isolated frames' MCMC reference at beta = 1 (None: skip);
    num_samples dropout passes per frame (seeds 5 isolated, 6 dense); threshold: coverage pixels
    (KDE units); tolerance: matching radius, LR px; the first loc_frames dense frames with
    loc_samples samples and iso_loc_samples samples per isolated frame are localized.
    Returns (summary dict: dropout, phi_dropout_layers, num_samples, vs_mcmc_beta_1, coverage_50 /
    _90, z_dense / z_isolated (`calibration.z_summary`), median_std_nm_dense / _isolated (nm);
    {"dense": z [M, 2], "isolated": z [M, 2]}).
    """
    from smlm_tfdiff.uncertainty.mc_dropout import dropout_layers, mc_dropout_posterior

    out = {"dropout": models.phi_config.dropout,
           "phi_dropout_layers": dropout_layers(models.phi), "num_samples": num_samples}
    zs = {}
    iso_cfg, cfg = models.scene_config("isolated"), models.scene_config("paper")
    ipost = mc_dropout_posterior(models.phi, iso["frames"], num_samples, seed=5,
                                 return_samples=True)
    if reference is not None:
        a = cal.std_map_agreement(ipost["std"][..., 0], reference.std)
        out["vs_mcmc_beta_1"] = {k: a[k] for k in ("pearson_r", "pearson_r_median", "mean_ratio")}
    dpost = mc_dropout_posterior(models.phi, dense["frames"], num_samples, seed=6,
                                 return_samples=True)
    truth_kde = dense["kde"][..., 0]
    mask = coverage_mask(truth_kde, dpost["mean"][..., 0], threshold)
    cov = cal.coverage(dpost["samples"][..., 0], truth_kde, [0.5, 0.9], mask=mask, axis=1)
    out["coverage_50"], out["coverage_90"] = float(cov[0]), float(cov[1])
    for name, d, post, c, n, s in (
            ("dense", dense, dpost, cfg, loc_frames, loc_samples),
            ("isolated", iso, ipost, iso_cfg, len(iso["frames"]), iso_loc_samples)):
        scores, arrays, _ = posterior_localization_z(post, d, c, tolerance, n,
                                                     min(s, num_samples))
        zs[name] = arrays["z"]
        out[f"z_{name}"] = scores["z_phi_xy"]
        out[f"median_std_nm_{name}"] = scores["median_std_nm"]
    return out, zs


def _squeeze(maps):
    """[B, uH, uW, 1] -> [B, uH, uW]; [B, uH, uW] unchanged."""
    maps = np.asarray(maps)
    return maps[..., 0] if maps.ndim == 4 else maps
