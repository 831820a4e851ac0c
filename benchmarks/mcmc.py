"""MCMC reference posterior: wall time and ESS/s for one isolated emitter; optional physics check.

    python benchmarks/mcmc.py [--kernels rwm,hmc,nuts] [--num_results 10000] [--num_burnin 1000]
                              [--num_chains 4] [--physics_frames 200]

Speed: one isolated-emitter frame (preset 'isolated'), num_chains chains, num_results kept after
num_burnin, per kernel with and without XLA; the first call (trace + compile + run) and the second
call (run only) separately; ESS/s = the smallest ESS of x, y and of (x - mean)^2, (y - mean)^2
(the variance estimates) / second-call seconds.
Physics (--physics_frames N > 0): N simulated frames, one batched HMC call; the posterior std of x, y
against sqrt(CRLB) (N0 unknown too) at each true position, and the std of (posterior mean - truth) /
sqrt(CRLB) across frames, with a 95% chi-square interval for a std from that many frames.
Prints a readable table and one JSON line.
"""

import json
import os
import platform
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from scipy import stats
import tensorflow as tf
import tensorflow_probability as tfp

import smlm_tfdiff as st
from smlm_tfdiff.uncertainty.mcmc import mcmc_posterior, mcmc_posterior_batch

flags.DEFINE_string("kernels", "rwm,hmc,nuts", "Kernels to time.")
flags.DEFINE_string("xla", "1,0", "XLA settings to time (1: jit_compile=True, 0: graph only).")
flags.DEFINE_integer("num_results", 10000, "Samples kept per chain.")
flags.DEFINE_integer("num_burnin", 1000, "Burn-in steps per chain.")
flags.DEFINE_integer("num_chains", 4, "Chains.")
flags.DEFINE_integer("physics_frames", 0, "Frames for the physics check (0: skip it).")
flags.DEFINE_integer("seed", 0, "Simulation and chain seed.")
FLAGS = flags.FLAGS


def speed(config, frame, kernel, jit):
    kw = dict(num_results=FLAGS.num_results, num_burnin=FLAGS.num_burnin, kernel=kernel,
              num_chains=FLAGS.num_chains, seed=FLAGS.seed, jit_compile=jit)
    start = time.perf_counter()
    mcmc_posterior(frame, config, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    res = mcmc_posterior(frame, config, **kw)
    second = time.perf_counter() - start
    ess = float(res.ess[:2].min())
    sq = (res.chains[..., :2] - res.mean[:2]) ** 2  # ESS of the variance estimates too.
    ess_sq = float(tfp.mcmc.effective_sample_size(sq, filter_beyond_positive_pairs=True,
                                                  cross_chain_dims=1).numpy().min())
    return {"first_s": first, "second_s": second, "ess_xy_min": ess, "ess_sq_xy_min": ess_sq,
            "ess_per_s": min(ess, ess_sq) / second,
            "acceptance": res.acceptance, "rhat_max": float(res.rhat.max()),
            "std_x": float(res.std[0]), "std_y": float(res.std[1])}


def physics(config, num_frames):
    data = st.simulate(config, num_frames, seed=FLAGS.seed + 1)
    truth = data["positions"][:, 0].astype(np.float64)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mcmc_posterior_batch(data["frames"], config, num_results=FLAGS.num_results,
                                   num_burnin=FLAGS.num_burnin, num_chains=FLAGS.num_chains,
                                   seed=FLAGS.seed + 2, kernel="hmc")
    wall = time.perf_counter() - start
    bound = st.crlb(truth, config, estimate_photons=True)[:, :2]
    std = np.array([r.std[:2] for r in res])
    err = (np.array([r.mean[:2] for r in res]) - truth) / bound
    dof = 2 * num_frames - 1  # x and y errors pooled (independent to first order).
    lo, hi = (np.sqrt(stats.chi2.ppf(q, dof) / dof) for q in (0.025, 0.975))
    return {"physics_frames": num_frames, "physics_wall_s": wall,
            "post_std_over_crlb_x": float((std[:, 0] / bound[:, 0]).mean()),
            "post_std_over_crlb_y": float((std[:, 1] / bound[:, 1]).mean()),
            "err_std_over_crlb_x": float(err[:, 0].std(ddof=1)),
            "err_std_over_crlb_y": float(err[:, 1].std(ddof=1)),
            "err_std_over_crlb_pooled": float(err.std(ddof=1)),
            "err_std_chi2_95_lo": float(lo), "err_std_chi2_95_hi": float(hi),
            "physics_rhat_max": float(max(r.rhat.max() for r in res)),
            "physics_ess_min": float(min(r.ess.min() for r in res)),
            "physics_warnings": len(caught)}


def main(argv):
    del argv
    config = st.SimulationConfig.preset("isolated")
    frame = st.simulate(config, 1, seed=FLAGS.seed)["frames"][0]
    results = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
               "tensorflow": tf.__version__, "num_results": FLAGS.num_results,
               "num_burnin": FLAGS.num_burnin, "num_chains": FLAGS.num_chains}
    rows = []
    for kernel in FLAGS.kernels.split(","):
        for jit in (bool(int(v)) for v in FLAGS.xla.split(",")):
            row = speed(config, frame, kernel, jit)
            rows.append((kernel, jit, row))
            for key, value in row.items():
                results[f"{kernel}{'_xla' if jit else ''}_{key}"] = value
    print(f"{'kernel':8s} {'XLA':>4s} {'first s':>8s} {'second s':>9s} {'ESS x,y':>8s} "
          f"{'ESS sq':>8s} {'ESS/s':>8s} {'accept':>7s} {'R-hat':>6s}")
    for kernel, jit, r in rows:
        print(f"{kernel:8s} {'yes' if jit else 'no':>4s} {r['first_s']:8.2f} {r['second_s']:9.2f} "
              f"{r['ess_xy_min']:8.0f} {r['ess_sq_xy_min']:8.0f} {r['ess_per_s']:8.0f} {r['acceptance']:7.3f} "
              f"{r['rhat_max']:6.3f}")
    if FLAGS.physics_frames > 0:
        phys = physics(config, FLAGS.physics_frames)
        results.update(phys)
        print(f"\nphysics, {phys['physics_frames']} frames (HMC, one batched call, "
              f"{phys['physics_wall_s']:.1f} s):")
        print(f"  mean posterior std / sqrt(CRLB): x {phys['post_std_over_crlb_x']:.3f}, "
              f"y {phys['post_std_over_crlb_y']:.3f}")
        print(f"  std of (mean - truth) / sqrt(CRLB): x {phys['err_std_over_crlb_x']:.3f}, "
              f"y {phys['err_std_over_crlb_y']:.3f}, pooled {phys['err_std_over_crlb_pooled']:.3f} "
              f"(95% chi-square interval for 1: {phys['err_std_chi2_95_lo']:.3f}.."
              f"{phys['err_std_chi2_95_hi']:.3f})")
        print(f"  max R-hat {phys['physics_rhat_max']:.4f}, min ESS {phys['physics_ess_min']:.0f}, "
              f"convergence warnings {phys['physics_warnings']}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}))


if __name__ == "__main__":
    app.run(main)
