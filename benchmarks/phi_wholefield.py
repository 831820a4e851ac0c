"""phi's localizations on whole frames (phi-only, no psi) over a grid of scenes, model by model.

    python benchmarks/phi_wholefield.py --models wholefield,runs/phi_new [--frames 8]
        [--out benchmarks/results/phi_wholefield.json]

64x64 px frames with the seeds' camera and optics, emitters uniform over the whole frame, edges
included, simulated with validation seeds (8100 + case index: not the training set, not the
benchmark movies of analyze.py), and two fixed scenes: the seeds' 20x20 frames (8x as many
frames) and their density over a 64x64 field (160 emitters on a disc of radius 28 px). Each
model's phi sees every frame whole, and its own detection settings (detection.json) localize on
its KDE. Reported per (model, case): precision, recall, recall over the oracle's (the same
detection on the true KDE), recall within 3 px of the edge against the centre, RMSE, and the
seconds phi and detection took.
What it is for: choosing between whole-field phis, on the scenes analyze is meant for.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

# name: (emitters per px^2, photons: a number or a (low, high) log-uniform range), emitters
# uniform over a --size frame; or a dict of `paper` preset fields (a fixed scene).
CASES = {
    "d40_n200": (1 / 40, 200.0),
    "d15_n200": (1 / 15, 200.0),
    "d40_n100": (1 / 40, 100.0),
    "d400_n200": (1 / 400, 200.0),
    "d40_n1000_5000": (1 / 40, (1000.0, 5000.0)),
    "d400_n1000_5000": (1 / 400, (1000.0, 5000.0)),
    # The seeds' frames: 10 emitters on a disc of radius 7 px in 20x20 px (8x the frames).
    "paper_frames": dict(),
    # The seeds' density over a 64x64 field: 160 emitters on a disc of radius 28 px.
    "disc28_n200": dict(frame_height=64, frame_width=64, disc_radius=28.0, num_emitters=160),
}
PAPER_FRAMES_PER_FRAME = 8  # paper_frames: 20x20 frames hold ~1/10 of a 64x64 frame's emitters.
EDGE_PX = 3.0
SEED = 8100

flags.DEFINE_list("models", ["wholefield"], "Bundled model names or folders with a phi.")
flags.DEFINE_list("cases", list(CASES), f"Scenes: {', '.join(CASES)}.")
flags.DEFINE_integer("frames", 8, "Frames per scene.")
flags.DEFINE_integer("size", 64, "Frame side, camera px.")
flags.DEFINE_string("out", None, "JSON file for the results (default: print only).")
FLAGS = flags.FLAGS


def scene(name, num_frames, size):
    """(simulate() dict, SimulationConfig) of one case."""
    from smlm_tfdiff import SimulationConfig
    from smlm_tfdiff.simulation.simulate import simulate

    seed = SEED + list(CASES).index(name)
    if isinstance(CASES[name], dict):
        config = SimulationConfig.preset("paper", **CASES[name])
        if config.frame_height < 64:
            num_frames *= PAPER_FRAMES_PER_FRAME
        return simulate(config, num_frames, seed=seed), config
    per_px2, photons = CASES[name]
    extra = (dict(photons=photons) if np.isscalar(photons)
             else dict(photons_range=photons, photons_distribution="log_uniform"))
    config = SimulationConfig.preset("paper", frame_height=size, frame_width=size,
                                     region="frame", margin=0.0,
                                     num_emitters=max(1, round(size * size * per_px2)), **extra)
    return simulate(config, num_frames, seed=seed), config


def evaluate(backend, data, config):
    from smlm_tfdiff.analyze import measure_emitter_photons, spread_read
    from smlm_tfdiff.localization.batched import detect_batch
    from smlm_tfdiff.localization.metrics import edge_centre_recall, localization_metrics

    n0 = spread = None
    if backend.brightness_reference is not None:  # Measured on these frames, as analyze does.
        n0, info = measure_emitter_photons(backend, data["frames"][..., 0], config)
        spread = spread_read(info)
    start = time.perf_counter()
    kde = backend.estimate(data["frames"], n0, spread)[..., 0]
    phi_s = time.perf_counter() - start
    start = time.perf_counter()
    found = detect_batch(kde, backend.config, backend.detection)
    detect_s = time.perf_counter() - start
    metrics = localization_metrics(found, data, config)
    # The oracle: the same detection on the true KDE (what a perfect phi would give).
    oracle = localization_metrics(detect_batch(np.asarray(data["kde"])[..., 0], backend.config,
                                               backend.detection), data, config)
    edge, centre = edge_centre_recall(metrics["matches"], data["positions"], data["mask"],
                                      config.lr_shape, EDGE_PX)
    return {"precision": metrics["precision"], "recall": metrics["recall"],
            "oracle_recall": oracle["recall"],
            "recall_edge": edge, "recall_centre": centre,
            "rmse_nm": metrics["rmse_lateral_nm"], "phi_s": round(phi_s, 2),
            "detect_s": round(detect_s, 2), "n0": None if n0 is None else round(n0, 1),
            "spread": None if spread is None else round(float(spread), 3),
            "true_spread": round(float(np.mean(data["frame_spread"])), 3)}


def main(argv):
    del argv
    from smlm_tfdiff.analyze import load_backend

    for name in FLAGS.cases:
        if name not in CASES:
            raise app.UsageError(f"--cases: unknown case {name!r}; one of {', '.join(CASES)}")
    scenes = {name: scene(name, FLAGS.frames, FLAGS.size) for name in FLAGS.cases}
    rows = []
    print(f"{'model':<28} {'case':<16} {'P':>6} {'R':>6} {'R/oracle':>8} {'R edge/centre':>13} "
          f"{'RMSE nm':>8} {'phi s':>6} {'detect s':>8}")
    for model in FLAGS.models:
        backend = load_backend(model, need_psi=False)
        backend.estimate(scenes[FLAGS.cases[0]][0]["frames"][:1], 1.0, 0.0)  # Trace, untimed.
        for name, (data, config) in scenes.items():
            row = {"model": model, "case": name, "frames": FLAGS.frames,
                   **evaluate(backend, data, config)}
            rows.append(row)
            print(f"{model:<28} {name:<16} {row['precision']:>6.3f} {row['recall']:>6.3f} "
                  f"{row['recall'] / row['oracle_recall']:>8.3f} "
                  f"{row['recall_edge']:>6.3f}/{row['recall_centre']:.3f} {row['rmse_nm']:>8.1f} "
                  f"{row['phi_s']:>6.2f} {row['detect_s']:>8.2f}"
                  + ("" if row["n0"] is None else f"  N0 {row['n0']:.0f}")
                  + ("" if row["spread"] is None else
                     f"  spread {row['spread']:.2f} (true {row['true_spread']:.2f})"), flush=True)
    if FLAGS.out:
        tmp = FLAGS.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"frames": FLAGS.frames, "size": FLAGS.size, "seed": SEED, "rows": rows},
                      f, indent=1)
        os.replace(tmp, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
