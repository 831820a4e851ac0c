"""How much does the guided start tell psi about an emitter's position? Validation frames only.

    python benchmarks/guided_start_information.py --model paper --t_starts 100,50,30

The seeds' guided start draws z_t* ~ q(z_t* | 2 y_hat - 1): a copy of phi's estimate at signal level
sqrt(gamma_t*) under noise of variance 1 - gamma_t* per HR pixel. psi was trained on z_t drawn
about the TRUE KDE, so it reads the start as a second measurement of the emitters, centred on
phi's estimate. Its Fisher information on an emitter's x (or y) is
I_start = sum_pixels (d mu / dx)^2 / (1 - gamma), mu = sqrt(gamma) (2 kde - 1), computed here from
the KDE renderer by central differences at each emitter's true position. A psi that has learned
p(y | z_t, y_hat) then puts the sample spread near 1 / sqrt(1 / CRLB^2 + I_start) instead of the
posterior's ~CRLB (isolated emitters: the MCMC posterior std matches the CRLB).

For each t*: on isolated validation frames (seed 778), the median of that prediction, of the CRLB
and of psi's per-localization std (projected samples, 10 ancestral steps or t* if fewer).
Prints a table and one JSON line.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
from smlm_tfdiff import flags as shared_flags
import numpy as np

from _validation import validation_frames
from smlm_tfdiff.simulation.physics.fisher import crlb
from smlm_tfdiff.pretrained import load_phi_source
from smlm_tfdiff.diffusion.sampler import PosteriorSampler
from smlm_tfdiff.simulation.simulate import render_kde
from smlm_tfdiff.uncertainty.per_localization import localization_uncertainty

shared_flags.define_model_flag()
shared_flags.define_sampling_flags(num_samples=48, num_steps=10, method=None)
flags.DEFINE_list("t_starts", ["100", "50", "30"], "Guided-start steps t* to measure.")
flags.DEFINE_integer("frames", 12, "Isolated validation frames (seed 778).")
FLAGS = flags.FLAGS


def start_information(position, config, gamma, h=1e-3):
    """Fisher information [2] (x, y; 1 / LR px^2) of z_t* ~ N(sqrt(gamma) (2 kde - 1), 1 - gamma)
    on the position of one emitter, by central differences of the KDE."""
    info = []
    for axis in range(2):
        step = np.zeros(2)
        step[axis] = h
        d = (render_kde(position + step, config) - render_kde(position - step, config)) / (2 * h)
        info.append(float(np.sum((2.0 * np.sqrt(gamma) * d) ** 2) / (1.0 - gamma)))
    return np.array(info)


def main(argv):
    del argv
    models = load_phi_source(FLAGS.model)
    icfg, iso, _, _ = validation_frames(models, FLAGS.frames, 1)
    positions = iso["positions"][:, 0].astype(np.float64)  # One emitter per frame.
    nm = icfg.pixel_size_nm
    bound_nm = np.array([crlb(p, icfg) for p in positions]) * nm  # [F, 2]
    rows = []
    for t in (int(s) for s in FLAGS.t_starts):
        gamma = float(models.schedule.gamma[t])
        info = np.array([start_information(p, icfg, gamma) for p in positions]) / nm ** 2
        start_nm = 1.0 / np.sqrt(info)
        predicted_nm = 1.0 / np.sqrt(1.0 / bound_nm ** 2 + info)
        t0 = time.perf_counter()
        post = PosteriorSampler(models, jit_compile=FLAGS.jit_compile)(
            iso["frames"], FLAGS.num_samples, num_steps=min(FLAGS.num_steps, t), t_start=t,
            seed=1, method="ddpm", return_samples=True, project=True)
        locs = localization_uncertainty(post["samples"], post["y_hat"], icfg)
        std_nm = np.array([loc["std_nm"][0] for loc in locs if len(loc["xy"]) == 1])
        rows.append({"model": FLAGS.model, "t_start": t, "gamma": gamma,
                     "start_std_nm": float(np.median(start_nm)),
                     "crlb_nm": float(np.median(bound_nm)),
                     "predicted_std_nm": float(np.median(predicted_nm)),
                     "psi_std_nm": float(np.median(std_nm)), "num_localizations": int(len(std_nm)),
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':24s} {'t*':>4s} {'gamma':>6s} {'start':>7s} {'CRLB':>7s} {'predicted':>9s} "
          f"{'psi':>7s}   (median std per axis, nm)")
    for r in rows:
        print(f"{r['model'][-24:]:24s} {r['t_start']:4d} {r['gamma']:6.3f} {r['start_std_nm']:7.2f} "
              f"{r['crlb_nm']:7.2f} {r['predicted_std_nm']:9.2f} {r['psi_std_nm']:7.2f}")
    print(json.dumps({"frames": FLAGS.frames, "num_samples": FLAGS.num_samples, "rows": rows}))


if __name__ == "__main__":
    app.run(main)
