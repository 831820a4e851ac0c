"""The demo's figures and its Markdown report (`python -m smlm_tfdiff.demo` writes both).

Figures (PNG, analogues of the seeds' Figures 1-5):
  fig1_kde.png          camera frames, phi's KDE estimate y_hat and the true KDE
  fig2_posterior.png    psi's posterior samples, mean and std for one frame
  fig3_std_maps.png     MCMC (beta = 1) against psi per-pixel std maps, isolated emitters
  fig4_crlb.png         localization error against sqrt(CRLB) and against psi's uncertainty
  fig5_reliability.png  reliability diagram of psi's per-pixel central credible intervals
Coordinates: HR images are drawn with imshow, whose pixel (I, J) is centred on (J, I); an LR
position x therefore sits at upsample * x - 0.5 (docs/CONVENTIONS.md conventions).
"""

import math
import os

import numpy as np

# The targets of the uncertainty, shared with trainers/evaluate_uncertainty.py.
from smlm_tfdiff.uncertainty.evaluation import (COV_POINTS, R_MIN, R_TEXT, RATIO, RATIO_TEXT,
                                                Z_RANGE, Z_TEXT, coverage_text, within as _within)
from smlm_tfdiff.uncertainty.scale import NEAREST_PX

FIGURES = {
    "fig1_kde.png": "Frames, phi's KDE estimate and the true KDE (seeds' Figure 1)",
    "fig2_posterior.png": "psi's posterior samples, mean and std for one frame (seeds' "
                          "Figures 3-4)",
    "fig3_std_maps.png": "MCMC (beta = 1) against psi std maps, isolated emitters (seeds' "
                         "Figure 2)",
    "fig4_crlb.png": "Localization errors against sqrt(CRLB) and psi's uncertainty (seeds' "
                     "Figure 5)",
    "fig5_reliability.png": "Reliability diagram of per-pixel credible intervals",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def _clean(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _dots(ax, xy, upsample, **kw):
    """LR positions [M, 2] drawn on an HR image."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy):
        ax.plot(upsample * xy[:, 0] - 0.5, upsample * xy[:, 1] - 0.5, ls="none", **kw)


# ------------------------------------------------------------------------------------ figures
def fig_kde(path, frames, y_hat, kde, truth, found, upsample):
    """frames [B, H, W] ADU, y_hat and kde [B, uH, uW], truth / found: lists of [M, 2] LR px."""
    plt = _plt()
    rows = len(frames)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for r in range(rows):
        top = max(float(kde[r].max()), 1e-6)
        axes[r, 0].imshow(frames[r], cmap="gray")
        axes[r, 1].imshow(y_hat[r], cmap="magma", vmin=0, vmax=top)
        axes[r, 2].imshow(kde[r], cmap="magma", vmin=0, vmax=top)
        _dots(axes[r, 0], truth[r], 1, marker="+", color="c", ms=6)
        _dots(axes[r, 1], found[r], upsample, marker="x", color="c", ms=5)
        _dots(axes[r, 2], truth[r], upsample, marker="+", color="c", ms=6)
        for c in range(3):
            _clean(axes[r, c])
    for c, title in enumerate(["frame x (ADU), + truth", "y_hat = phi(x), x analyze",
                               "true KDE y, + truth"]):
        axes[0, c].set_title(title, fontsize=8)
    _save(fig, path)


def fig_posterior(path, frame, y_hat, kde, samples, mean, std, truth, upsample):
    """One frame: frame [H, W], y_hat / kde / mean / std [uH, uW], samples [S, uH, uW]."""
    plt = _plt()
    shown = min(3, len(samples))
    images = [(frame, "frame x", "gray"), (y_hat, "y_hat (phi)", "magma"),
              (kde, "true KDE", "magma")]
    images += [(samples[i], f"sample {i + 1}", "magma") for i in range(shown)]
    images += [(mean, f"posterior mean ({len(samples)})", "magma")]
    fig, axes = plt.subplots(1, len(images) + 1, figsize=(2.3 * (len(images) + 1), 2.6))
    top = max(float(kde.max()), 1e-6)
    for ax, (image, title, cmap) in zip(axes, images):
        kw = {} if cmap == "gray" else dict(vmin=0, vmax=top)
        ax.imshow(image, cmap=cmap, **kw)
        ax.set_title(title, fontsize=8)
        _clean(ax)
    _dots(axes[2], truth, upsample, marker="+", color="c", ms=5)
    h = axes[-1].imshow(std, cmap="viridis", vmin=0)
    fig.colorbar(h, ax=axes[-1], fraction=0.046)
    axes[-1].set_title("posterior std", fontsize=8)
    _clean(axes[-1])
    _save(fig, path)


def fig_std_maps(path, frames, mcmc_std, psi_std, agreement):
    """Isolated frames [B, H, W]; MCMC and psi std maps [B, uH, uW]; agreement: the dict of
    calibration.std_map_agreement."""
    plt = _plt()
    rows = len(frames)
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.5 * rows), squeeze=False)
    for r in range(rows):
        top = max(float(mcmc_std[r].max()), float(psi_std[r].max()), 1e-9)
        axes[r, 0].imshow(frames[r], cmap="gray")
        h = axes[r, 1].imshow(mcmc_std[r], cmap="viridis", vmin=0, vmax=top)
        axes[r, 2].imshow(psi_std[r], cmap="viridis", vmin=0, vmax=top)
        fig.colorbar(h, ax=axes[r, 2], fraction=0.046)
        for c in range(3):
            _clean(axes[r, c])
        a, b = mcmc_std[r].ravel(), psi_std[r].ravel()
        axes[r, 3].plot(a, b, ".", ms=1, alpha=0.3)
        lim = max(a.max(), b.max(), 1e-9)
        axes[r, 3].plot([0, lim], [0, lim], "k--", lw=1, label="psi = MCMC")
        axes[r, 3].set_xlabel("MCMC std", fontsize=7)
        axes[r, 3].set_ylabel("psi std", fontsize=7)
        axes[r, 3].tick_params(labelsize=6)
        axes[r, 3].set_title(f"r = {agreement['pearson_r_per_frame'][r]:.2f}, ratio = "
                             f"{agreement['mean_ratio_per_frame'][r]:.2f}", fontsize=8)
    for c, title in enumerate(["isolated frame", "MCMC std (beta = 1)", "psi std (same scale)"]):
        axes[0, c].set_title(title, fontsize=8)
    axes[0, 3].legend(fontsize=6)
    _save(fig, path)


def _binned_rms(x, err, bins=6):
    """rms of err in quantile bins of x -> (bin mean of x, rms, count)."""
    ok = np.isfinite(x) & np.isfinite(err)
    x, err = x[ok], err[ok]
    if len(x) < 2:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, min(bins, len(x)) + 1)))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    out = [(x[idx == k].mean(), np.sqrt(np.mean(err[idx == k] ** 2)), np.sum(idx == k))
           for k in range(len(edges) - 1) if np.any(idx == k)]
    return tuple(np.array(v) for v in zip(*out))


def fig_crlb(path, error_nm, crlb_nm, uncertainty_nm, z):
    """Matched localizations: error_nm [M, 2] (dx, dy), crlb_nm and uncertainty_nm [M] (per-axis
    rms), z [M, 2] = error / psi std per axis."""
    plt = _plt()
    error_nm = np.asarray(error_nm, np.float64).reshape(-1, 2)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    # (a) The seeds' Figure 5: errors against N(0, CRLB).
    bound = np.asarray(crlb_nm, np.float64)
    s = float(np.sqrt(np.nanmean(bound ** 2))) if np.isfinite(bound).any() else float("nan")
    rms = float(np.sqrt(np.mean(error_nm ** 2))) if error_nm.size else float("nan")
    lim = 5 * (s if math.isfinite(s) else max(rms, 1.0))
    bins = np.linspace(-lim, lim, 41)
    axes[0].hist(np.clip(error_nm[:, 0], -lim, lim), bins, density=True, alpha=0.5,
                 label="x error")
    axes[0].hist(np.clip(error_nm[:, 1], -lim, lim), bins, density=True, alpha=0.5,
                 label="y error")
    if math.isfinite(s):
        axes[0].plot(bins, np.exp(-bins ** 2 / (2 * s ** 2)) / math.sqrt(2 * math.pi * s ** 2),
                     "r", label=f"N(0, CRLB), sqrt = {s:.1f} nm")
    axes[0].set_title(f"rms error per axis {rms:.1f} nm", fontsize=9)
    axes[0].set_xlabel("localization error [nm] (clipped)")
    axes[0].legend(fontsize=7)
    # (b) Errors against the reported uncertainty.
    err = np.sqrt(np.mean(error_nm ** 2, axis=1))  # Per-axis rms error per localization.
    unc = np.asarray(uncertainty_nm, np.float64)
    axes[1].plot(unc, err, ".", ms=3, alpha=0.5, label="localizations")
    cx, rms_bin, _ = _binned_rms(unc, err)
    if len(cx):
        axes[1].plot(cx, rms_bin, "o-", color="C3", label="rms error per bin")
    finite = np.concatenate([unc[np.isfinite(unc)], err, [1.0]])
    top = float(np.percentile(finite, 99)) * 1.1
    axes[1].plot([0, top], [0, top], "k--", lw=1, label="error = uncertainty")
    if math.isfinite(s):
        axes[1].axvline(s, color="r", lw=1, label="sqrt(CRLB)")
    axes[1].set_xlim(0, top)
    axes[1].set_ylim(0, top)
    axes[1].set_xlabel("psi uncertainty_xy [nm]")
    axes[1].set_ylabel("|error| per axis (rms of dx, dy) [nm]")
    axes[1].legend(fontsize=7)
    # (c) z-scores.
    zf = np.asarray(z, np.float64).ravel()
    zf = zf[np.isfinite(zf)]
    zb = np.linspace(-5, 5, 41)
    if zf.size > 1:
        axes[2].hist(np.clip(zf, -5, 5), zb, density=True, alpha=0.6,
                     label=f"z = error / psi std, std {np.std(zf, ddof=1):.2f}")
    axes[2].plot(zb, np.exp(-zb ** 2 / 2) / math.sqrt(2 * math.pi), "k--", label="N(0, 1)")
    axes[2].set_xlabel("z per axis (clipped to +-5)")
    axes[2].legend(fontsize=7)
    _save(fig, path)


def fig_reliability(path, curves):
    """curves: {label: calibration.reliability() dict}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.3))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    lv = np.linspace(0, 1, 11)
    ax.fill_between(lv, lv - COV_POINTS, lv + COV_POINTS, color="g", alpha=0.15,
                    label="+-5 points")
    for label, rel in curves.items():
        ax.plot(rel["levels"], rel["coverage_quantile"], "o-", ms=4,
                label=f"{label} ({rel['num_values']} px)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("fraction of true KDE values inside")
    ax.legend(fontsize=7)
    _save(fig, path)


# ------------------------------------------------------------------------------------- report
def _f(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return "n/a"
    if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _verdict(ok):
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


PRECISION_FLOOR = 0.99
PRECISION_ALPHA = 0.05


def precision_consistent(tp, fp, floor=PRECISION_FLOOR, alpha=PRECISION_ALPHA):
    """Whether tp true and fp false localizations are consistent with a precision >= floor: the
    chance of fp or more false ones among tp + fp at a false rate of exactly 1 - floor is >= alpha
    (one-sided binomial test). On the demo's ~80 localizations one false one is 1.3 points of
    precision and happens in 55% of runs of a detector at exactly 0.99, so the point estimate
    alone cannot judge the floor there; a large sample's estimate must lie near it."""
    from scipy.stats import binom

    # P(X >= fp) for X ~ Binomial(tp + fp, 1 - floor).
    return bool(binom.sf(fp - 1, tp + fp, 1.0 - floor) >= alpha)


def targets(s):
    """Rows (quantity, measured, target, pass) of the summary dict `s` (demo.run_demo)."""
    loc, unc, mc, cov = s["localization"], s["uncertainty"], s["psi_vs_mcmc"], s["coverage"]
    rows = [
        ("psi / MCMC mean std ratio (isolated, beta = 1)", mc["mean_ratio"], RATIO_TEXT,
         _within(mc["mean_ratio"], *RATIO)),
        ("Pearson r of psi and MCMC std maps (pooled)", mc["pearson_r"], R_TEXT,
         _within(mc["pearson_r"], R_MIN, math.inf)),
        ("psi / MCMC mean std ratio where MCMC std > 10% of its peak",
         mc["signal_region"]["mean_ratio"], RATIO_TEXT,
         _within(mc["signal_region"]["mean_ratio"], *RATIO)),
        ("std(z), z = error / reported std per axis (analyze)", unc["z"]["std"], Z_TEXT,
         _within(unc["z"]["std"], *Z_RANGE)),
        ("std(z) of psi's own spread, before the calibration scale (analyze)",
         s["uncertainty_raw"]["z"]["std"], "reported beside (the shipped one above)", None),
        ("Spearman of |error| with the reported std (analyze; sharpness)",
         unc["sharpness"]["spearman_abs_error_vs_std"], "> 0 (ranks the errors)",
         _within(unc["sharpness"]["spearman_abs_error_vs_std"], 0.0, math.inf)),
        ("Spearman of |error| with psi's own spread",
         s["uncertainty_raw"]["sharpness"]["spearman_abs_error_vs_std"],
         "reported beside (the shipped one above)", None),
        ("median psi uncertainty_xy / sqrt(CRLB) (analyze)", unc["uncertainty_over_crlb_median"],
         ">= 0.8 (~1 for an isolated emitter)",
         _within(unc["uncertainty_over_crlb_median"], 0.8, math.inf)),
        ("MCMC xy std / sqrt(CRLB) (physics check)", mc["mcmc_xy_std_over_sqrt_crlb"],
         RATIO_TEXT, _within(mc["mcmc_xy_std_over_sqrt_crlb"], *RATIO)),
        ("coverage of 50% intervals (dense frames)", cov["coverage_50"], coverage_text(0.5),
         _within(cov["coverage_50"], 0.5 - COV_POINTS, 0.5 + COV_POINTS)),
        ("coverage of 90% intervals (dense frames)", cov["coverage_90"], coverage_text(0.9),
         _within(cov["coverage_90"], 0.9 - COV_POINTS, 0.9 + COV_POINTS)),
    ]
    if cov.get("shipped"):
        rows += [(f"coverage of {lv}% intervals of psi's own samples, before the map scale",
                  cov[f"coverage_own_{lv}"], "reported beside (the scaled ones above)", None)
                 for lv in (50, 90)]
    rows += [
        ("precision (analyze)", loc["analyze"]["precision"],
         f">= {PRECISION_FLOOR} (binomial test at {PRECISION_ALPHA:.0%}: "
         f"{loc['analyze']['FP']} false of {loc['analyze']['TP'] + loc['analyze']['FP']})",
         precision_consistent(loc["analyze"]["TP"], loc["analyze"]["FP"])),
        ("recall / oracle recall (analyze)", loc["recall_over_oracle"], ">= 0.97",
         _within(loc["recall_over_oracle"], 0.97, math.inf)),
    ]
    return rows


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(s, out_dir):
    """Write <out_dir>/report.md from the summary dict `s`; returns its path. Paths in `s` are
    relative to out_dir."""
    st, loc, unc = s["settings"], s["localization"], s["uncertainty"]
    mc, cov, phys, files = s["psi_vs_mcmc"], s["coverage"], s["physics"], s["files"]
    a, o = loc["analyze"], loc["oracle"]
    rows = targets(s)
    passed = sum(1 for r in rows if r[3])
    md = ["# smlm_tfdiff demo report",
          "",
          f"Model `{st['model']}`; {st['num_frames']} held-out paper-preset frames (seed "
          f"{st['seed']}, never used for training); analyze with {st['num_samples']} posterior "
          f"samples x {st['num_steps']} ancestral steps per frame; {st['mcmc_frames']} isolated "
          f"frames for MCMC (HMC, beta = 1, {st['mcmc_chains']} chains x {st['mcmc_results']} "
          f"draws) against psi ({st['map_samples']} samples). Total time "
          f"{s['timing_s']['total']:.0f} s." + (" **Quick run: too small for conclusions.**"
                                                 if st["quick"] else ""),
          "",
          "## Targets",
          "",
          f"{passed} of {len(rows)} targets met.",
          "",
          _table(["quantity", "measured", "target", "result"],
                 [(q, _f(v), t, _verdict(ok)) for q, v, t, ok in rows]),
          "",
          _honest_text(s),
          "",
          "## 1. Simulated data (physics checks)",
          "",
          _table(["check", "value"], [
              ("frames / KDE shape", f"{phys['frames']} / {phys['kde']}"),
              ("emitters per frame", _f(phys["emitters_per_frame"], 2)),
              ("photons per frame, measured (ADU -> photons)",
               _f(phys["photons_per_frame_measured"], 1)),
              ("photons per frame, expected (N0 x emitters + background)",
               _f(phys["photons_per_frame_expected"], 1)),
              ("emitters recovered from the KDE sum / (2 pi sigma_y^2)",
               _f(phys["kde_count_recovered"], 3)),
              ("KDE peak max (isolated emitter ~1)", _f(phys["kde_peak_max"], 3)),
              ("sqrt(CRLB) at the frame centre, nm", _f(phys["sqrt_crlb_centre_nm"], 2)),
          ]),
          "",
          "![frames, y_hat, true KDE](figures/fig1_kde.png)",
          "",
          f"*Figure 1. {FIGURES['fig1_kde.png']}; + true positions, x localizations of analyze.*",
          "",
          "## 2. Localization (`smlm-tfdiff` analyze on the TIFF stack)",
          "",
          f"Localizations of the ThunderSTORM CSV matched one-to-one (Hungarian, "
          f"{loc['tolerance_nm']:.0f} nm) to the ground truth. The oracle runs the same detection "
          "on the true KDE: the ceiling of any KDE-based method.",
          "",
          _table(["", "precision", "recall", "Jaccard", "RMSE lateral [nm]", "efficiency",
                  "TP", "FP", "FN"],
                 [(name, _f(m["precision"]), _f(m["recall"]), _f(m["jaccard"]),
                   _f(m["rmse_lateral_nm"], 2), _f(m["efficiency_lateral"], 2), m["TP"], m["FP"],
                   m["FN"]) for name, m in (("analyze", a), ("oracle (true KDE)", o))]),
          "",
          f"Analyze ran at {_f(loc['frames_per_second'], 2)} frames/s "
          f"({loc['tiles_per_frame']} tiles per frame).",
          "",
          "## 3. Per-localization uncertainty",
          "",
          "![posterior samples](figures/fig2_posterior.png)",
          "",
          f"*Figure 2. {FIGURES['fig2_posterior.png']} (the first demo frame).*",
          "",
          "z = (localization - truth) / uncertainty per axis (CSV columns `uncertainty_x [nm]`, "
          "`uncertainty_y [nm]`: the std of the localization over psi's samples, times the "
          "model's calibration scale where it has one, docs/calibration.md) for the matched "
          "localizations; `uncertainty_raw_xy [nm]` is psi's spread before that scale, "
          "`crlb_xy [nm]` sqrt of the isolated-emitter CRLB at the fitted photometry. "
          + _scale_text(s["settings"].get("uncertainty_scale")),
          "",
          _table(["quantity", "value"], [
              ("matched localizations (z values)", f"{unc['num_matched']} ({unc['z']['n']})"),
              ("std(z) [95% interval]", f"{_f(unc['z']['std'])} [{_f(unc['z']['std_ci95'][0])}, "
                                        f"{_f(unc['z']['std_ci95'][1])}]"),
              ("std(z) of psi's own spread (uncertainty_raw_xy) [95% interval]",
               f"{_f(s['uncertainty_raw']['z']['std'])} "
               f"[{_f(s['uncertainty_raw']['z']['std_ci95'][0])}, "
               f"{_f(s['uncertainty_raw']['z']['std_ci95'][1])}]"),
              ("robust std(z) (1.4826 MAD)", _f(unc["z"]["robust_std"])),
              ("fraction \\|z\\| <= 1 (0.683 if calibrated)", _f(unc["z"]["frac_abs_le_1"])),
              ("std(z) of a calibrated std from these samples (Student t)",
               _f(unc["z_expected_calibrated"])),
              ("median uncertainty_xy [nm]", _f(unc["uncertainty_median_nm"], 2)),
              ("median sqrt(CRLB) crlb_xy [nm]", _f(unc["crlb_median_nm"], 2)),
              ("median uncertainty_xy / crlb_xy", _f(unc["uncertainty_over_crlb_median"])),
              ("rms error per axis [nm]", _f(unc["rms_error_per_axis_nm"], 2)),
              ("rms error / rms sqrt(CRLB)", _f(unc["rms_error_over_crlb"])),
          ]),
          "",
          "![errors against the CRLB](figures/fig4_crlb.png)",
          "",
          f"*Figure 4. {FIGURES['fig4_crlb.png']}: left, x and y errors with the CRLB's "
          "Gaussian in red; middle, error against psi's uncertainty; right, histogram of z.*",
          "",
          "## 4. psi against MCMC (isolated emitters)",
          "",
          "The reference posterior: HMC on (x, y, N0) with the exact likelihood at beta = 1, "
          "rendered to KDEs (per-pixel std of the KDE over the posterior), against psi's "
          "per-pixel std over its samples of the same frames" + (
              ": each psi sample projected onto the KDE of the emitters detected in it, as the "
              "MCMC draws are rendered (`--noproject` scores the raw samples)."
              if st.get("project") else " (raw samples, not projected)."),
          "",
          _table(["quantity", "value"], [
              ("Pearson r of std maps, pooled / median per frame",
               f"{_f(mc['pearson_r'])} / {_f(mc['pearson_r_median'])}"),
              ("mean std ratio psi / MCMC, pooled / median per frame",
               f"{_f(mc['mean_ratio'])} / {_f(mc['mean_ratio_median'])}"),
              ("mean std psi / MCMC (KDE units)",
               f"{_f(mc['mean_std'], 5)} / {_f(mc['mean_ref_std'], 5)}"),
              ("emitter region (MCMC std > 10% of its peak): r / mean std ratio",
               f"{_f(mc['signal_region']['pearson_r'])} / "
               f"{_f(mc['signal_region']['mean_ratio'])}"),
              ("peak std psi / MCMC (mean over frames)", _f(mc["peak_ratio"])),
              ("psi std on the other (empty) pixels, where MCMC's is ~0",
               _f(mc["background_psi_std"], 5)),
              ("Pearson r of the posterior mean maps", _f(mc["mean_map_r"])),
              ("MCMC posterior std of x, y [nm] (mean)", _f(mc["mcmc_xy_std_nm"], 2)),
              ("sqrt(CRLB) of x, y at the truth, N0 unknown [nm] (mean)",
               _f(mc["sqrt_crlb_nm"], 2)),
              ("MCMC xy std / sqrt(CRLB)", _f(mc["mcmc_xy_std_over_sqrt_crlb"])),
              ("psi per-localization std / MCMC xy std (median)",
               _f(mc["psi_loc_std_over_mcmc_median"])),
              ("MCMC converged fraction (R-hat <= 1.05, ESS), max R-hat",
               f"{_f(mc['mcmc']['converged_fraction'], 2)}, {_f(mc['mcmc']['rhat_max'], 4)}"),
          ]),
          "",
          "![MCMC vs psi std maps](figures/fig3_std_maps.png)",
          "",
          f"*Figure 3. {FIGURES['fig3_std_maps.png']}.*",
          "",
          "## 5. Per-pixel calibration",
          "",
          f"Fraction of true KDE values inside psi's central credible intervals (sample "
          f"quantiles of {st['map_samples']} samples), over pixels where the truth or the "
          f"posterior mean exceeds {cov['threshold']}; {cov['num_frames']} dense frames. With "
          f"{st['map_samples']} samples a calibrated sampler gives {_f(cov['expected_50'])} / "
          f"{_f(cov['expected_90'])} at 50% / 90% (slightly under nominal).",
          "",
          _pixel_scale_text(st.get("pixel_scale"), cov),
          "",
          _coverage_table(cov),
          "",
          "![reliability diagram](figures/fig5_reliability.png)",
          "",
          f"*Figure 5. {FIGURES['fig5_reliability.png']}.*",
          "",
          "## Files",
          "",
          _table(["file", "content"], [(f"[{p}]({p})", d) for p, d in files]),
          "",
          "## Timing",
          "",
          _table(["step", "seconds"], [(k, _f(v, 1)) for k, v in s["timing_s"].items()]),
          ""]
    path = os.path.join(out_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md))
    os.replace(path + ".tmp", path)
    return path


def _scale_text(scale):
    """One sentence on the calibration scale analyze applied (its summary's uncertainty_scale)."""
    if not scale:
        return ("No calibration scale was applied (the model has none, or the sampling is not "
                "the recipe it was fitted for): the uncertainty is psi's own spread.")
    c, d = scale["per_log_photons"], scale.get("per_log_widening", 0.0)
    g = "log(1 + k)" if scale.get("neighbour_term") == "log1p" else "k"
    e = scale.get("per_neighbour_log_photons", 0.0)
    w = f" {'-' if d < 0 else '+'} {abs(d):g} log w" if d else ""
    n = f"log(N / {scale['reference_photons']:g})"
    f = scale.get("per_log_photons_squared", 0.0)
    w += f" {'-' if f < 0 else '+'} {abs(f):g} {n}^2" if f else ""
    h = scale.get("per_log_nearest", 0.0)
    r0 = scale.get("nearest_px", NEAREST_PX)
    w += f" {'-' if h < 0 else '+'} {abs(h):g} log(1 + ({r0:g} / r)^2)" if h else ""
    w += f" {'-' if e < 0 else '+'} {abs(e):g} {g} {n}" if e else ""
    return (f"analyze applied the model's calibration scale s = exp({scale['intercept']:g} + "
            f"{scale['per_neighbour']:g} {g} {'-' if c < 0 else '+'} {abs(c):g} {n}{w}), k "
            f"the other localizations within "
            f"{scale['radius_px']:g} px and N the photometry (photons)"
            + (", r the distance (px) to the nearest other localization" if h else "")
            + (", w the factor by which the fitted background widens the CRLB." if d else "."))


def _pixel_scale_text(scale, cov):
    """The sentence on the map scale behind section 5's "as shipped" columns."""
    if not cov.get("shipped"):
        return ("The model has no map scale (or the sampling is not the recipe it was fitted "
                "for): the columns are psi's own samples, as analyze's std maps are.")
    c = scale["per_log_photons"] if scale else 0.0
    text = (f"exp({scale['intercept']:g} + {scale['per_neighbour']:g} k "
            f"{'-' if c < 0 else '+'} {abs(c):g} log(N / {scale['reference_photons']:g}))"
            if scale else "the model's map scale")
    return (f"\"As shipped\": psi's raw samples with their deviations from the mean scaled per "
            f"pixel by {text}, k and N those of the pixel's nearest localization (the other "
            f"localizations within {scale['radius_px'] if scale else 8:g} px, the photometry), "
            "as analyze scales its `_posterior_std.tif` maps; \"psi's own\": the samples as "
            "they come (projected where the settings say so).")


def _coverage_table(cov):
    """Section 5's table: coverage per level, as shipped (map scale) and psi's own."""
    lv = cov["dense"]["levels"]
    if not cov.get("shipped"):
        return _table(["level", "dense (quantile)", "dense (rank / PIT)", "isolated (quantile)"],
                      [(f"{v:.1f}", _f(q), _f(r), _f(i)) for v, q, r, i in zip(
                          lv, cov["dense"]["coverage_quantile"], cov["dense"]["coverage_rank"],
                          cov["isolated"]["coverage_quantile"])])
    sh = cov["shipped"]
    return _table(["level", "dense, as shipped", "isolated, as shipped", "dense, psi's own",
                   "isolated, psi's own"],
                  [(f"{v:.1f}", _f(a), _f(b), _f(c), _f(d)) for v, a, b, c, d in zip(
                      lv, sh["dense"]["coverage_quantile"], sh["isolated"]["coverage_quantile"],
                      cov["dense"]["coverage_quantile"], cov["isolated"]["coverage_quantile"])])


def _honest_text(s):
    """What the measured numbers say, in words."""
    mc, unc, cov = s["psi_vs_mcmc"], s["uncertainty"], s["coverage"]
    ratio, r, zstd = mc["mean_ratio"], mc["pearson_r"], unc["z"]["std"]
    inner = mc["signal_region"]["mean_ratio"]
    over = unc["uncertainty_over_crlb_median"]
    fin = lambda v: v is not None and math.isfinite(float(v))  # noqa: E731
    out = []
    if fin(ratio) and _within(ratio, *RATIO) is False:
        side = "wider" if ratio > 1 else "narrower"
        out.append(f"Averaged over all pixels, psi's per-pixel std maps are {ratio:.2f}x {side} "
                   f"than the MCMC posterior's at beta = 1 (target {RATIO[0]:g}-{RATIO[1]:g}; "
                   f"Pearson r = {r:.2f}): psi's per-pixel uncertainty is miscalibrated (a "
                   "known issue of the bundled psi).")
        if fin(inner) and (inner < 1) != (ratio < 1):
            out.append(f"The average hides two errors of opposite sign: on empty pixels psi "
                       f"reports a std of ~{mc['background_psi_std']:.4f} where the posterior "
                       f"has none, while around the emitter (MCMC std > 10% of its peak) psi's "
                       f"std is {inner:.2f}x MCMC's (peak {mc['peak_ratio']:.2f}x).")
    elif fin(ratio):
        out.append(f"psi's per-pixel std maps match MCMC's in scale (ratio {ratio:.2f}).")
    if fin(over) and over < 0.8:
        out.append(f"Per localization, psi's uncertainty_xy is {over:.2f}x the CRLB (median): "
                   "below the bound an unbiased estimator can reach, so it is over-confident" +
                   (f"; the errors are {zstd:.2f}x the reported std (std(z))." if fin(zstd)
                    else "."))
    elif fin(zstd) and _within(zstd, *Z_RANGE) is False:
        out.append(f"Per localization, errors are {zstd:.2f}x the reported std (std(z)).")
    if fin(cov["coverage_90"]) and cov["coverage_90"] < 0.9 - COV_POINTS:
        out.append(f"Per pixel, the 90% credible intervals contain the true KDE only "
                   f"{100 * cov['coverage_90']:.0f}% of the time (dense frames).")
    if not out:
        return "All uncertainty targets are met on this run."
    return ("**Calibration status.** " + " ".join(out) + " The numbers above are measured on this "
            "run; use the CRLB column (`crlb_xy [nm]`) as the physics reference until psi is "
            "recalibrated.")
