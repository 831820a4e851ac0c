"""`analyze` throughput: frames per second from a TIFF stack to all outputs, per frame size, with
the time split into reading, posterior sampling, localization (+ per-localization uncertainty and
photometry) and writing.

    python benchmarks/analyze.py [--sizes 20x20,64x64] [--num_frames 16] [--num_samples 16]

Stacks are simulated at the paper preset's density (one emitter per 40 camera pixels, over the
whole frame). The first stack is analyzed twice and the second run is timed (the first traces and
compiles). Prints a readable table and one JSON line.
"""

import json
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
import tensorflow as tf
import tifffile

from smlm_tfdiff import flags as shared_flags
from smlm_tfdiff import SimulationConfig, simulate
from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend

shared_flags.define_model_flag(savedmodel=True)
shared_flags.define_sampling_flags(num_samples=16, method=None)
flags.DEFINE_list("sizes", ["20x20", "64x64"], "Frame sizes HxW in camera pixels.")
flags.DEFINE_integer("num_frames", 16, "Frames per stack.")
flags.DEFINE_integer("batch_frames", 8, "Frames per batch.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    backend = load_backend(FLAGS.model)
    analyzer = StackAnalyzer(backend, Camera(100.0, 1.0), FLAGS.num_samples, FLAGS.num_steps,
                             FLAGS.batch_frames, progress=False)
    results = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
               "tensorflow": tf.__version__, "model": FLAGS.model,
               "num_samples": FLAGS.num_samples, "num_steps": analyzer.num_steps,
               "num_frames": FLAGS.num_frames, "sizes": {}}
    work = tempfile.mkdtemp(prefix="bench-analyze-")
    try:
        for k, size in enumerate(FLAGS.sizes):
            h, w = (int(v) for v in size.lower().split("x"))
            config = SimulationConfig.preset("paper", frame_height=h, frame_width=w,
                                             region="frame", num_emitters=max(1, h * w // 40))
            data = simulate(config, FLAGS.num_frames, seed=123)
            path = os.path.join(work, f"stack_{size}.tif")
            tifffile.imwrite(path, np.round(data["frames"][..., 0]).astype(np.uint16),
                            photometric="minisblack")
            if k == 0:  # Warm-up: trace and compile.
                analyzer.analyze(path, os.path.join(work, "warmup"))
            start = time.perf_counter()
            summary = analyzer.analyze(path, os.path.join(work, f"out_{size}"))
            seconds = time.perf_counter() - start
            results["sizes"][size] = {
                "frames_per_second": round(FLAGS.num_frames / seconds, 3),
                "seconds_per_frame": round(seconds / FLAGS.num_frames, 3),
                "tiles_per_frame": summary["tiles_per_frame"],
                "localizations_per_frame": round(summary["localizations"] / FLAGS.num_frames, 2),
                **{k2: round(v / FLAGS.num_frames, 3) for k2, v in summary["timing"].items()},
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"analyze, {FLAGS.num_samples} samples x {analyzer.num_steps} steps per tile, "
          f"{os.cpu_count()} CPUs (seconds per frame)")
    print(f"{'size':>8} {'tiles':>6} {'locs':>6} {'frames/s':>9} {'total':>7} {'posterior':>10} "
          f"{'localize':>9} {'write':>6}")
    for size, r in results["sizes"].items():
        print(f"{size:>8} {r['tiles_per_frame']:>6} {r['localizations_per_frame']:>6} "
              f"{r['frames_per_second']:>9} {r['seconds_per_frame']:>7} {r['posterior_s']:>10} "
              f"{r['localize_s']:>9} {r['write_s']:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
