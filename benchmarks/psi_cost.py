"""What one psi evaluation costs on this CPU, for the bundled psi and cheaper designs.

    python benchmarks/psi_cost.py --out benchmarks/results/psi_cost.json

analyze samples a whole-field model's posterior in small windows (8x8 px when this was written,
32x32 on the KDE grid; 6x6 px since), 16 samples x 10 steps each for `wholefield`: the time of one network evaluation of one window sets the speed with
uncertainty. This times psi's forward pass (XLA-compiled, as analyze runs it; untrained weights,
which cost the same) on a batch of windows for the bundled configuration and for cheaper ones:
fewer levels, fewer channels, and the same U-Net on a 2x or 4x coarser grid (the input side
--side / 2 or / 4, as a psi that reads the KDE space-to-depth would see it; its channels grow to
keep the information). Prints a table and writes JSON: ms per window evaluation, parameters,
multiply-adds per window (Keras' conv layers counted).
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np

flags.DEFINE_integer("batch", 256, "Windows per call (analyze: 32 windows x 16 samples = 512).")
flags.DEFINE_integer("side", 32, "Window side on the KDE grid (HR px; 8 camera px x 4).")
flags.DEFINE_integer("repeats", 5, "Timed calls per configuration (after two warm-up calls).")
flags.DEFINE_string("out", None, "JSON file for the results.")
FLAGS = flags.FLAGS

BASE = dict(num_res_blocks=1, image_size=80, dropout=0.0, groups=8, embedding_dim=64)
# (name, PsiConfig fields, input side divisor)
DESIGNS = [
    ("bundled: 8 ch, levels x1 x2 x4 x8, attention at level 3", dict(
        BASE, base_channels=8, channel_multipliers=[1, 2, 4, 8], attention_resolutions=[10]), 1),
    ("no level attention", dict(
        BASE, base_channels=8, channel_multipliers=[1, 2, 4, 8], attention_resolutions=[]), 1),
    ("3 levels (x1 x2 x4)", dict(
        BASE, base_channels=8, channel_multipliers=[1, 2, 4], attention_resolutions=[]), 1),
    ("4 channels at level 0", dict(
        BASE, base_channels=4, channel_multipliers=[1, 2, 4, 8], attention_resolutions=[],
        groups=4), 1),
    ("2x coarser grid, 16 ch, 3 levels", dict(
        BASE, base_channels=16, channel_multipliers=[1, 2, 4], attention_resolutions=[]), 2),
    ("2x coarser grid, 8 ch, 3 levels", dict(
        BASE, base_channels=8, channel_multipliers=[1, 2, 4], attention_resolutions=[]), 2),
    ("4x coarser grid, 32 ch, 2 levels", dict(
        BASE, base_channels=32, channel_multipliers=[1, 2], attention_resolutions=[]), 4),
]


def conv_macs(model, side):
    """Multiply-adds of the model's Conv2D layers for one side x side input (stride-aware)."""
    import keras

    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            shape = layer.output.shape  # [None, h, w, c] for the model's build size
            kh, kw = layer.kernel_size
            total += int(shape[1]) * int(shape[2]) * int(shape[3]) * kh * kw * int(
                layer.input.shape[-1])
    return total


def main(argv):
    del argv
    import tensorflow as tf

    from smlm_tfdiff.models.psi import PsiConfig, build_psi

    rows = []
    for name, fields, divisor in DESIGNS:
        side = FLAGS.side // divisor
        model = build_psi(PsiConfig(**fields), image_size=side)
        b = FLAGS.batch
        rng = np.random.default_rng(0)
        inputs = {"y_t": rng.random((b, side, side, 1), np.float32),
                  "y_hat": rng.random((b, side, side, 1), np.float32),
                  "noise_level": np.full((b, 1), 0.5, np.float32)}
        call = tf.function(lambda d: model(d, training=False), jit_compile=True)
        for _ in range(2):
            call(inputs).numpy()
        tic = time.perf_counter()
        for _ in range(FLAGS.repeats):
            call(inputs).numpy()
        seconds = (time.perf_counter() - tic) / FLAGS.repeats
        rows.append({"design": name, "input_side": side, "parameters": model.count_params(),
                     "conv_macs_per_window": conv_macs(model, side),
                     "ms_per_window_eval": 1e3 * seconds / b})
        r = rows[-1]
        print(f"{name:58s} {side:3d} {r['parameters']:8d} {r['conv_macs_per_window'] / 1e6:7.2f}M "
              f"{r['ms_per_window_eval']:6.3f} ms", flush=True)
    result = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "batch": FLAGS.batch,
              "window_side_hr": FLAGS.side, "rows": rows}
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
