"""Evaluate phi on fixed, seeded held-out sets: localization metrics, oracle, errors vs the CRLB.

    python trainers/evaluate_phi.py --model paper --out_dir runs/eval_phi
    python trainers/evaluate_phi.py --model runs/phi_paper --out_dir runs/eval_phi

--model is a bundled name (smlm_tfdiff.pretrained) or a training run folder. Writes metrics.json
(atomically) and crlb_errors.png (the seeds' Figure 5: localization errors against the CRLB).
"""

import json
import os
import time

from absl import app, flags, logging
from smlm_tfdiff import flags as shared_flags
import numpy as np

shared_flags.define_model_flag(needs_psi=False)
flags.DEFINE_string("out_dir", None, "Where metrics.json and the figure go.")
flags.DEFINE_list("presets", ["paper", "isolated", "bright"], "Held-out presets to evaluate.")
flags.DEFINE_integer("num_frames", 1000, "Frames per held-out set.")
flags.DEFINE_integer("seed", 20_000, "Seed of the held-out sets (never used for training).")
flags.DEFINE_float("tolerance_hr", 5.0, "Matching radius in HR pixels (the seeds: 5).")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS

KEYS = ("TP", "FP", "FN", "precision", "recall", "jaccard", "f1", "rmse_lateral_nm",
        "rmse_lateral_bias_corrected_nm", "rmse_x_nm", "rmse_y_nm", "mean_shift_x_nm",
        "mean_shift_y_nm", "efficiency_lateral")


def load_model(name):
    from smlm_tfdiff.pretrained import available, load_phi, pretrained
    if name in available():
        return pretrained(name)
    if os.path.isdir(name):
        return load_phi(name)
    raise app.UsageError(f"--model {name!r} is neither a bundled model {available()} nor a folder")


def evaluate_preset(model, preset, num_frames, seed, tolerance_hr):
    from smlm_tfdiff.localization.detection import detect
    from smlm_tfdiff.models.phi_training import predict
    from smlm_tfdiff.simulation.physics.fisher import crlb
    from smlm_tfdiff.simulation.simulate import simulate
    from smlm_tfdiff.uncertainty.evaluation import localization_with_oracle, truth_positions

    # The held-out scene; camera, optics and detection settings are those phi was trained for.
    config = model.scene_config(preset)
    data = simulate(config, num_frames, seed)
    t0 = time.perf_counter()
    pred = predict(model.phi, data["frames"])
    phi_seconds = time.perf_counter() - t0
    found = detect(pred, config)
    truth = truth_positions(data["positions"], data["mask"])
    phi_m, oracle, recall_over_oracle = localization_with_oracle(
        found, data["positions"], data["mask"], config, tolerance_hr)
    # CRLB at every matched true position (the bound for an isolated emitter there).
    matched_truth = np.array([truth[f][t] for f, _, t in phi_m["matches"]]).reshape(-1, 2)
    bounds = crlb(matched_truth, config) if len(matched_truth) else np.zeros((0, 2))
    crlb_rms_nm = float(np.sqrt(np.mean(np.sum(bounds ** 2, axis=1)))) * config.pixel_size_nm \
        if len(bounds) else float("nan")
    out = {
        "phi": {k: phi_m[k] for k in KEYS},
        "oracle": {k: oracle[k] for k in KEYS},
        "recall_over_oracle": recall_over_oracle,
        "crlb_lateral_rms_nm": crlb_rms_nm,
        "rmse_over_crlb": phi_m["rmse_lateral_nm"] / crlb_rms_nm,
        "phi_frames_per_second_eval": num_frames / phi_seconds,
        "num_frames": num_frames,
        "seed": seed,
        "config": config.to_dict(),
    }
    return out, phi_m["errors"], bounds, config


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (preset, (errors, bounds, config)) in zip(axes[0], results.items()):
        nm = config.pixel_size_nm
        err = errors * nm
        lim = max(5 * np.sqrt(np.mean(bounds ** 2)) * nm, 1e-3) if len(bounds) else 50
        bins = np.linspace(-lim, lim, 61)
        ax.hist(err[:, 0], bins, density=True, alpha=0.5, label="x error (phi)")
        ax.hist(err[:, 1], bins, density=True, alpha=0.5, label="y error (phi)")
        if len(bounds):
            s = np.sqrt(np.mean(bounds ** 2)) * nm
            ax.plot(bins, np.exp(-bins ** 2 / (2 * s ** 2)) / np.sqrt(2 * np.pi * s ** 2), "r",
                    label=f"CRLB N(0, {s:.1f} nm)")
        ax.set_title(f"{preset}: RMSE per axis {np.sqrt(np.mean(err ** 2)):.1f} nm")
        ax.set_xlabel("localization error [nm]")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv):
    del argv
    model = load_model(FLAGS.model)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    metrics, plots = {"model": FLAGS.model}, {}
    for i, preset in enumerate(FLAGS.presets):
        logging.info("Evaluating %s on %d '%s' frames", FLAGS.model, FLAGS.num_frames, preset)
        out, errors, bounds, config = evaluate_preset(model, preset, FLAGS.num_frames,
                                                      FLAGS.seed + i, FLAGS.tolerance_hr)
        metrics[preset] = out
        plots[preset] = (errors, bounds, config)
        p = out["phi"]
        logging.info("%s: P=%.4f R=%.4f (oracle R=%.4f, ratio %.3f) JAC=%.4f RMSE=%.2f nm "
                     "(CRLB %.2f nm, ratio %.2f) E_lat=%.1f", preset, p["precision"], p["recall"],
                     out["oracle"]["recall"], out["recall_over_oracle"] or float("nan"),
                     p["jaccard"], p["rmse_lateral_nm"], out["crlb_lateral_rms_nm"],
                     out["rmse_over_crlb"], p["efficiency_lateral"])
    path = os.path.join(FLAGS.out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    figure(plots, os.path.join(FLAGS.out_dir, "crlb_errors.png"))
    print(json.dumps({p: {k: metrics[p]["phi"][k] for k in ("precision", "recall", "jaccard",
                                                             "rmse_lateral_nm")}
                      | {"oracle_recall": metrics[p]["oracle"]["recall"],
                         "rmse_over_crlb": metrics[p]["rmse_over_crlb"]}
                      for p in FLAGS.presets}, indent=1))


if __name__ == "__main__":
    app.run(main)
