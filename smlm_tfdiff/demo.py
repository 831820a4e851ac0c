"""`make demo`: simulate a held-out paper-preset dataset, write it to disk, print its summary, then
localize it with the bundled phi and score the localizations against the ground truth.

    python -m smlm_tfdiff.demo --out demo_output --num_frames 1000 --preset paper --seed 0
"""

import json
import os
import time

from absl import app, flags
import numpy as np

from smlm_tfdiff.config import PRESETS, SimulationConfig
from smlm_tfdiff.dataset_file import load_dataset, save_dataset
from smlm_tfdiff.physics.fisher import crlb
from smlm_tfdiff.simulate import simulate

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("out", "demo_output", "Folder for the dataset and summary.")
    flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Simulation preset.")
    flags.DEFINE_integer("num_frames", 1000, "Frames to simulate.")
    flags.DEFINE_integer("seed", 0, "Simulation seed.")
    flags.DEFINE_bool("phi", True, "Run the bundled phi and detection on the simulated frames.")


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


def localize(data, preset):
    """Bundled phi + detection on the simulated frames -> metrics (phi and the oracle ceiling)."""
    from smlm_tfdiff.localization import detect, localization_metrics, oracle_metrics
    from smlm_tfdiff.phi_training import predict
    from smlm_tfdiff.pretrained import pretrained

    model = pretrained("paper")
    config = model.scene_config(preset)
    start = time.perf_counter()
    kde = predict(model.phi, data["frames"])
    phi_seconds = time.perf_counter() - start
    found = detect(kde, config)
    keys = ("precision", "recall", "jaccard", "rmse_lateral_nm", "efficiency_lateral")
    phi_m = localization_metrics(found, data, config)
    oracle = oracle_metrics(data["positions"], data["mask"], config)
    out = {f"phi_{k}": round(float(phi_m[k]), 4) for k in keys}
    out["oracle_recall"] = round(float(oracle["recall"]), 4)
    out["phi_frames_per_second"] = round(len(kde) / phi_seconds, 1)
    return out


def main(argv):
    del argv
    config = SimulationConfig.preset(FLAGS.preset)
    start = time.perf_counter()
    data = simulate(config, FLAGS.num_frames, FLAGS.seed)
    elapsed = time.perf_counter() - start
    path = os.path.join(FLAGS.out, f"{FLAGS.preset}_seed{FLAGS.seed}.npz")
    written = save_dataset(path, data, config)
    reloaded, _ = load_dataset(path)
    assert all(np.array_equal(reloaded[k], data[k]) for k in data), "round trip failed"
    summary = summarize(data, config)
    summary["simulate_seconds"] = round(elapsed, 3)
    if FLAGS.phi:
        summary.update(localize(data, FLAGS.preset))
    summary["files"] = written
    with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Simulated {FLAGS.num_frames} '{FLAGS.preset}' frames in {elapsed:.2f} s")
    for key, value in summary.items():
        print(f"  {key:30s} {value}")
    print(f"Wrote {', '.join(written)} and {os.path.join(FLAGS.out, 'summary.json')}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
