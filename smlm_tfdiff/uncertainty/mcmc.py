"""MCMC reference posterior p(theta | x) for an isolated emitter, and its KDE mean / std maps.

theta = (x, y, N0[, b]): position in LR pixels (docs/CONVENTIONS.md convention), photons per emitter and
optionally a uniform background in photons per pixel. The likelihood is the Poisson approximation on
offset-corrected data (seeds eq. 10, docs/CONVENTIONS.md): x' = (x - offset) / gain + readout_var / gain^2 ~
Poisson(omega'), omega' = N0 dEx dEy + background + readout_var / gain^2.

Prior (flat, proper): x ~ U(0, W), y ~ U(0, H) (the frame), N0 ~ U(0, photons_max),
b ~ U(0, background_max). Target: log p = beta * log-likelihood + log prior; beta = 1 is the posterior,
the seeds' beta = 0.2 samples p^0.2 (std ~sqrt(5) wider) and is an option only.

Sampling space: chains run on an unconstrained z in R^P with
    theta = Sigmoid(low, high)(loc + scale * z)
(tfp bijectors; the log-Jacobian is added to the target, so the prior above is exactly the one
sampled and chains never leave the support). loc and scale whiten z near a rough start estimate
(brightest-pixel centroid, CRLB from the Fisher information there): one z unit ~ one posterior std of
each parameter, so one HMC step size and one random-walk scale fit every direction.

Kernels (all chains of all frames in one batched, XLA-compiled tfp.mcmc.sample_chain):
- "rwm": tfp.mcmc.RandomWalkMetropolis, the seeds' appendix A.4. Gaussian proposal of variance
  `rwm_variance` (0.05, seeds) in LR px^2 for x and y, applied in z: the z step has std
  sqrt(rwm_variance) / r_xy (r_xy: the start's CRLB of x, y), so near the start x and y move by
  ~N(0, 0.05 px^2) and N0 (and b) by the same fraction of their own CRLB.
- "hmc": tfp.mcmc.HamiltonianMonteCarlo, step size adapted during burn-in by dual averaging
  (tfp.mcmc.DualAveragingStepSizeAdaptation, target acceptance 0.75, the first 80% of burn-in).
  Default num_leapfrog_steps = 1 (Langevin-like): in the whitened space the posterior is close to
  N(0, I), and fixed trajectories of 2-3 steps (length ~pi) make chains antithetic: a huge ESS for
  the means but a poor one for the variances (measured ESS of x^2: 1000-2000 of 40000 draws with 2
  steps, 20000+ with 1 step, at a third of the cost; benchmarks/mcmc.py).
- "nuts": tfp.mcmc.NoUTurnSampler (max_tree_depth 6), step size adapted the same way.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Tuple

import numpy as np
from scipy.special import erf
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import unnest

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.simulation.physics.kde import render_kde_batch
from smlm_tfdiff.simulation.physics.likelihood import corrected_counts, readout_term
from smlm_tfdiff.simulation.physics.psf import pixel_integrals
from smlm_tfdiff.simulation.config import check_config
from smlm_tfdiff.validation import as_numpy

tfb = tfp.bijectors

KERNELS = ("hmc", "rwm", "nuts")
RHAT_MAX = 1.05  # Warn above (Vehtari et al. 2021 suggest 1.01 for final results; 1.05 is lenient).
_MIN_ESS_PER_CHAIN = 100  # Warn when the total ESS of a parameter is below 100 * num_chains.


class MCMCConvergenceWarning(UserWarning):
    """R-hat above RHAT_MAX or an effective sample size below min_ess."""


@dataclasses.dataclass
class MCMCResult:
    """Posterior samples of one frame. Parameters (columns) are `names`: x, y in LR pixels, photons
    (N0) in photons, background in photons per pixel.

    samples: [num_results * num_chains, P] (chain-major); chains: [num_results, num_chains, P];
    mean, std, rhat, ess (total over chains): [P]; acceptance: mean acceptance rate over all steps
    after burn-in; acceptance_per_chain: [num_chains]; step_size: the final step size in whitened
    z units (HMC / NUTS), the z proposal std for RWM; wall_time_s: the whole call (a batched call
    reports the same time for every frame, batch_size > 1).
    """

    samples: np.ndarray
    chains: np.ndarray
    names: Tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    acceptance: float
    acceptance_per_chain: np.ndarray
    kernel: str
    beta: float
    step_size: float
    num_results: int
    num_burnin: int
    num_chains: int
    wall_time_s: float
    batch_size: int = 1
    converged: bool = True

    def summary(self) -> dict:
        """JSON-friendly scalars: per-parameter mean, std, rhat, ess and the run settings."""
        out = {"kernel": self.kernel, "beta": self.beta, "num_results": self.num_results,
               "num_burnin": self.num_burnin, "num_chains": self.num_chains,
               "acceptance": self.acceptance, "step_size": self.step_size,
               "wall_time_s": self.wall_time_s, "converged": self.converged}
        for i, name in enumerate(self.names):
            for key in ("mean", "std", "rhat", "ess"):
                out[f"{name}_{key}"] = float(getattr(self, key)[i])
        return out


# ---------------------------------------------------------------------------------- validation
def _check_frames(frames, config, batched):
    arr = as_numpy(frames, "frames" if batched else "frame")
    h, w = config.lr_shape
    name = "frames" if batched else "frame"
    want = f"[B, {h}, {w}] or [B, {h}, {w}, 1]" if batched else f"[{h}, {w}] or [{h}, {w}, 1]"
    shape = arr.shape
    if arr.ndim == (4 if batched else 3) and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != (3 if batched else 2) or arr.shape[-2:] != (h, w):
        raise ValueError(f"{name} must be {want} in ADU for this config (got shape {shape}); "
                         f"check config.frame_height/frame_width or pass one frame at a time")
    if batched and arr.shape[0] < 1:
        raise ValueError("frames is empty: pass at least one frame")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf: MCMC needs finite ADU values everywhere")
    return arr if batched else arr[None]


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _check_positive(value, name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r})") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0 (got {value!r})")
    return value


# ------------------------------------------------------------------------------------ the model
def _log_likelihood(theta, counts, config, estimate_background):
    """theta: [..., B, P]; counts: [B, H, W] corrected x' -> sum_k n_k log w'_k - w'_k - log n_k!
    ([..., B]), w' = N0 dEy dEx + background + readout_var / gain^2."""
    dtype = theta.dtype
    h, w = config.lr_shape
    dex = pixel_integrals(theta[..., 0], w, config.psf_sigma, dtype)  # [..., B, W]
    dey = pixel_integrals(theta[..., 1], h, config.psf_sigma, dtype)  # [..., B, H]
    omega = theta[..., 2, None, None] * dey[..., :, None] * dex[..., None, :]
    if estimate_background:
        omega = omega + theta[..., 3, None, None]
    else:
        omega = omega + tf.constant(config.background, dtype)
    omega = omega + readout_term(config, dtype)
    ll = counts * tf.math.log(omega) - omega - tf.math.lgamma(counts + 1.0)
    return tf.reduce_sum(ll, axis=[-2, -1])


def _bounds(config, photons_max, background_max, estimate_background):
    h, w = config.lr_shape
    low = [0.0, 0.0, 0.0] + ([0.0] if estimate_background else [])
    high = [float(w), float(h), photons_max] + ([background_max] if estimate_background else [])
    return np.array(low), np.array(high)


def _start_estimate(counts, config, photons_max, background_max, estimate_background):
    """Rough theta per frame from the data alone (never the truth): the centroid of the 5x5 window
    about the brightest pixel (3x3-smoothed), the photons in a 7x7 window above background.
    counts: [B, H, W] corrected photons (readout term removed). Returns [B, P]."""
    b, h, w = counts.shape
    if estimate_background:
        floor = min(1e-2, 1e-3 * background_max)  # Inside the support (0, background_max).
        bg = np.clip(np.median(counts, axis=(1, 2)), floor, 0.5 * background_max)
    else:
        bg = np.broadcast_to(np.asarray(config.background, np.float64), (b, h, w))
    signal = counts - (bg[:, None, None] if estimate_background else bg)
    pad = np.pad(signal, ((0, 0), (1, 1), (1, 1)), mode="edge")
    smooth = sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
    out = []
    rows, cols = np.arange(h) + 0.5, np.arange(w) + 0.5
    for k in range(b):
        i, j = np.unravel_index(np.argmax(smooth[k]), (h, w))
        win = lambda r: (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))  # noqa
        s5 = np.maximum(signal[k][win(2)], 0.0)
        total = s5.sum()
        if total > 0:
            cy = (s5.sum(1) * rows[win(2)[0]]).sum() / total
            cx = (s5.sum(0) * cols[win(2)[1]]).sum() / total
        else:
            cx, cy = j + 0.5, i + 0.5
        n0 = np.clip(signal[k][win(3)].sum(), 10.0, 0.5 * photons_max)
        theta = [np.clip(cx, 0.05, w - 0.05), np.clip(cy, 0.05, h - 0.05), n0]
        if estimate_background:
            theta.append(bg[k])
        out.append(theta)
    return np.array(out, np.float64)


def _fisher_scales(theta, config, estimate_background):
    """sqrt diag of the inverse Fisher information at theta [B, P] (the CRLB with every parameter
    unknown; analytic derivatives of the erf-integrated PSF): the whitening scale r [B, P]."""
    h, w = config.lr_shape
    s = config.psf_sigma

    def de_and_grad(coord, n):  # [B] -> dE [B, n], d dE / d coord [B, n]
        edges = np.arange(n + 1.0)[None] - coord[:, None]
        cdf = 0.5 * erf(edges / (math.sqrt(2.0) * s))
        pdf = np.exp(-0.5 * (edges / s) ** 2) / (math.sqrt(2.0 * math.pi) * s)
        return cdf[:, 1:] - cdf[:, :-1], pdf[:, :-1] - pdf[:, 1:]

    ex, gx = de_and_grad(theta[:, 0], w)
    ey, gy = de_and_grad(theta[:, 1], h)
    n0 = theta[:, 2, None, None]
    cols = [n0 * ey[:, :, None] * gx[:, None, :], n0 * gy[:, :, None] * ex[:, None, :],
            ey[:, :, None] * ex[:, None, :]]
    omega = n0 * cols[2] + readout_term(config, tf.float64).numpy()
    if estimate_background:
        cols.append(np.ones_like(omega))
        omega = omega + theta[:, 3, None, None]
    else:
        omega = omega + np.asarray(config.background, np.float64)
    jac = np.stack([c.reshape(c.shape[0], -1) for c in cols], axis=-1)  # [B, HW, P]
    info = np.einsum("bki,bkj->bij", jac / omega.reshape(omega.shape[0], -1, 1), jac)
    info += 1e-9 * np.eye(info.shape[-1]) * np.trace(info, axis1=1, axis2=2)[:, None, None]
    return np.sqrt(np.diagonal(np.linalg.inv(info), axis1=1, axis2=2))


# -------------------------------------------------------------------------------- the sampler
_SAMPLERS = {}


def _sampler(config, kernel, num_results, num_burnin, num_chains, estimate_background,
             num_leapfrog_steps, max_tree_depth, jit_compile, dtype):
    """A compiled run(counts, low, high, loc, scale, z0, beta, rwm_std, step0, seed) -> (z [R, C,
    B, P], accepted [R, C, B], final step size), cached per settings (no retracing per frame)."""
    key = (config.to_json(), kernel, num_results, num_burnin, num_chains, estimate_background,
           num_leapfrog_steps, max_tree_depth, jit_compile, dtype)
    if key in _SAMPLERS:
        return _SAMPLERS[key]

    def run(counts, low, high, loc, scale, z0, beta, rwm_std, step0, seed):
        bijector = tfb.Chain([tfb.Sigmoid(low=low, high=high), tfb.Shift(loc), tfb.Scale(scale)])
        log_prior = -tf.reduce_sum(tf.math.log(high - low))  # Uniform on the box: a constant.

        def target(z):  # [C, B, P] -> [C, B]
            theta = bijector.forward(z)
            return (beta * _log_likelihood(theta, counts, config, estimate_background) + log_prior
                    + bijector.forward_log_det_jacobian(z, event_ndims=1))

        adapt_steps = int(0.8 * num_burnin)
        if kernel == "rwm":
            mc = tfp.mcmc.RandomWalkMetropolis(
                target, new_state_fn=tfp.mcmc.random_walk_normal_fn(scale=rwm_std))
        elif kernel == "hmc":
            mc = tfp.mcmc.HamiltonianMonteCarlo(target, step_size=step0,
                                                num_leapfrog_steps=num_leapfrog_steps)
        else:
            mc = tfp.mcmc.NoUTurnSampler(target, step_size=step0, max_tree_depth=max_tree_depth)
        if kernel != "rwm" and adapt_steps > 0:
            mc = tfp.mcmc.DualAveragingStepSizeAdaptation(mc, num_adaptation_steps=adapt_steps)

        def trace(_, kr):
            return unnest.get_innermost(kr, "is_accepted")

        out = tfp.mcmc.sample_chain(num_results, z0, kernel=mc, num_burnin_steps=num_burnin,
                                    trace_fn=trace, seed=seed, return_final_kernel_results=True)
        if kernel == "rwm":
            step = tf.reduce_mean(rwm_std)
        else:
            step = tf.reshape(unnest.get_innermost(
                out.final_kernel_results, "step_size"), [])
        return out.all_states, out.trace, step

    _SAMPLERS[key] = tf.function(run, jit_compile=jit_compile, reduce_retracing=True)
    return _SAMPLERS[key]


def _ess(theta, num_chains):
    """Total ESS over chains (Geyer's initial positive sequence: may exceed the sample count for
    antithetic HMC chains). theta: [R, C, B, P] -> [C or 1, B, P]."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # tf.cast of the FFT result logs a complex -> real warning.
    try:
        return tfp.mcmc.effective_sample_size(
            theta, filter_beyond_positive_pairs=True,
            cross_chain_dims=1 if num_chains > 1 else None).numpy()
    finally:
        logger.setLevel(level)


def mcmc_posterior_batch(frames, config, num_results=10000, num_burnin=1000, seed=0, kernel="hmc",
                         num_chains=4, beta=1.0, estimate_background=False, rwm_variance=0.05,
                         num_leapfrog_steps=1, max_tree_depth=6, init_spread=1.0,
                         photons_max=1e6, background_max=1e4, min_ess=None, jit_compile=True,
                         dtype=tf.float64, warn=True):
    """Independent posteriors of B isolated-emitter frames, all chains in one batched call.

    frames: [B, H, W] or [B, H, W, 1] ADU. Returns a list of B MCMCResult (see mcmc_posterior for
    the arguments). The B * num_chains chains share one seed stream and one adapted step size (in
    whitened units), so a frame's samples depend on the batch it is in; the same frames and seed
    always give the same samples.
    """
    check_config(config)
    frames = _check_frames(frames, config, batched=True)
    kernel = kernel.lower() if isinstance(kernel, str) else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} (got {kernel!r})")
    num_results = _check_int(num_results, "num_results", 1)
    num_burnin = _check_int(num_burnin, "num_burnin", 0)
    num_chains = _check_int(num_chains, "num_chains", 1)
    num_leapfrog_steps = _check_int(num_leapfrog_steps, "num_leapfrog_steps", 1)
    max_tree_depth = _check_int(max_tree_depth, "max_tree_depth", 1)
    beta = _check_positive(beta, "beta")
    rwm_variance = _check_positive(rwm_variance, "rwm_variance")
    photons_max = _check_positive(photons_max, "photons_max")
    background_max = _check_positive(background_max, "background_max")
    init_spread = float(init_spread)
    if not (math.isfinite(init_spread) and init_spread >= 0):
        raise ValueError(f"init_spread must be finite and >= 0 LR pixels (got {init_spread!r})")
    if estimate_background and np.ndim(config.background) != 0:
        raise ValueError("estimate_background fits one uniform background, but config.background "
                         "is a per-pixel map; pass a config with a scalar background")
    min_ess = _MIN_ESS_PER_CHAIN * num_chains if min_ess is None else float(min_ess)
    seed = seeds_lib.as_seed(seed)
    start_time = time.perf_counter()

    # Data-driven start and whitening (float64, NumPy; cheap).
    counts = corrected_counts(frames, config, tf.float64).numpy()  # x' (with the readout term)
    photons_img = counts - readout_term(config, tf.float64).numpy()
    low, high = _bounds(config, photons_max, background_max, estimate_background)
    start = _start_estimate(photons_img, config, photons_max, background_max, estimate_background)
    r = _fisher_scales(start, config, estimate_background)  # [B, P]
    # Dispersed starts about the estimate (theta space), clipped inside the support.
    init_seed, chain_seed = seeds_lib.split(seed)
    noise = tf.random.stateless_normal([num_chains] + list(start.shape), init_seed,
                                       dtype=tf.float64).numpy()
    theta0 = np.empty_like(noise)
    theta0[..., :2] = start[..., :2] + init_spread * noise[..., :2]
    theta0[..., 2] = start[..., 2] * np.exp(0.3 * noise[..., 2])
    if estimate_background:
        theta0[..., 3] = np.maximum(start[..., 3], r[..., 3]) * np.exp(0.5 * noise[..., 3])
    margin = 1e-3 * (high - low)
    theta0 = np.clip(theta0, low + margin, high - margin)
    # z = (logit((theta - low) / (high - low)) - loc) / scale, with loc = logit of the start and
    # scale = r / (d theta / d u) at the start: one z unit ~ one CRLB there.
    s = (start - low) / (high - low)
    loc = np.log(s) - np.log1p(-s)
    scale = r / ((high - low) * s * (1.0 - s))
    s0 = (theta0 - low) / (high - low)
    z0 = (np.log(s0) - np.log1p(-s0) - loc) / scale
    rwm_std = math.sqrt(rwm_variance) / np.mean(r[:, :2], axis=1, keepdims=True)  # [B, 1]

    run = _sampler(config, kernel, num_results, num_burnin, num_chains, bool(estimate_background),
                   num_leapfrog_steps, max_tree_depth, bool(jit_compile), tf.as_dtype(dtype).name)
    c = lambda v: tf.constant(v, dtype)  # noqa: E731
    z, accepted, step = run(c(counts), c(low), c(high), c(loc), c(scale), c(z0), c(beta),
                            c(rwm_std), c(0.5 if kernel == "hmc" else 0.7), chain_seed)
    bijector = tfb.Chain([tfb.Sigmoid(low=c(low), high=c(high)), tfb.Shift(c(loc)),
                          tfb.Scale(c(scale))])
    theta = tf.cast(bijector.forward(z), tf.float64)  # [R, C, B, P]
    if num_chains > 1 and num_results > 1:
        rhat = tfp.mcmc.potential_scale_reduction(theta, independent_chain_ndims=1).numpy()
    else:
        rhat = np.full(theta.shape[2:], np.nan)  # Undefined with one chain.
    if num_results > 1:
        ess = _ess(theta, num_chains)
        if num_chains == 1:
            ess = ess[0]
    else:
        ess = np.full(theta.shape[2:], float(num_chains))
    theta = theta.numpy()
    accept = tf.cast(accepted, tf.float64).numpy()  # [R, C, B]
    wall = time.perf_counter() - start_time
    names = ("x", "y", "photons") + (("background",) if estimate_background else ())

    results = []
    for b in range(frames.shape[0]):
        chains = theta[:, :, b]  # [R, C, P]
        flat = np.transpose(chains, (1, 0, 2)).reshape(-1, chains.shape[-1])
        converged = bool(np.all(np.nan_to_num(rhat[b], nan=1.0) <= RHAT_MAX)
                         and np.all(ess[b] >= min_ess))
        if warn and not converged:
            warnings.warn(
                f"MCMC ({kernel}, frame {b}) may not have converged: R-hat "
                f"{np.round(rhat[b], 3).tolist()} (want <= {RHAT_MAX}), ESS "
                f"{np.round(ess[b], 0).tolist()} (want >= {min_ess:g}) for {list(names)}; "
                "increase num_results / num_burnin or use kernel='hmc'",
                MCMCConvergenceWarning, stacklevel=3)
        results.append(MCMCResult(
            samples=flat, chains=chains, names=names, mean=flat.mean(0), std=flat.std(0, ddof=1)
            if flat.shape[0] > 1 else np.zeros(flat.shape[1]), rhat=rhat[b], ess=ess[b],
            acceptance=float(accept[:, :, b].mean()),
            acceptance_per_chain=accept[:, :, b].mean(0), kernel=kernel, beta=beta,
            step_size=float(step.numpy()) if kernel != "rwm" else float(rwm_std[b, 0]),
            num_results=num_results, num_burnin=num_burnin, num_chains=num_chains,
            wall_time_s=wall, batch_size=frames.shape[0], converged=converged))
    return results


def mcmc_posterior(frame, config, num_results=10000, num_burnin=1000, seed=0, kernel="hmc",
                   num_chains=4, beta=1.0, estimate_background=False, **kwargs):
    """Posterior samples of (x, y, N0[, background]) for one isolated emitter.

    frame: [H, W] or [H, W, 1] in ADU, one emitter (config gives the camera and the PSF; its
    emitter count is not used). num_results samples per chain are kept after num_burnin steps
    (RWM: the seeds used 1e4 iterations, 1e3 of them burn-in). Chains start dispersed
    (init_spread = 1 LR px, N0 x exp(N(0, 0.3^2))) about the brightest-pixel centroid, never at the
    truth. beta > 0 tempers the likelihood (1 = the posterior). seed: int or [2] int32 (stateless:
    the same seed gives identical samples).

    Other keyword arguments: rwm_variance (0.05 LR px^2, see the module docstring),
    num_leapfrog_steps (HMC, 1: see the module docstring), max_tree_depth (NUTS, 6), photons_max (1e6) and background_max
    (1e4) bound the uniform priors, min_ess (default 100 per chain), jit_compile (True: XLA),
    dtype (tf.float64), warn (True: MCMCConvergenceWarning when R-hat > 1.05 or ESS < min_ess).

    Returns an MCMCResult (samples [num_results * num_chains, P] in LR px / photons, chains,
    mean, std, rhat, ess, acceptance, wall_time_s, ...).
    """
    check_config(config)
    frame = _check_frames(frame, config, batched=False)
    return mcmc_posterior_batch(frame, config, num_results, num_burnin, seed, kernel, num_chains,
                                beta, estimate_background, **kwargs)[0]


# ---------------------------------------------------------------------------- KDE posterior
_KDE_STATS = {}


def _kde_chunk_stats(config, dtype):
    key = (config.to_json(), dtype)
    if key not in _KDE_STATS:
        def stats(positions, mask):
            kde = tf.cast(render_kde_batch(positions, config, mask, dtype=dtype), tf.float64)
            n = tf.cast(tf.shape(kde)[0], tf.float64)
            mean = tf.reduce_sum(kde, 0) / n
            return mean, tf.reduce_sum(tf.square(kde - mean), 0)
        _KDE_STATS[key] = tf.function(stats, reduce_retracing=True)
    return _KDE_STATS[key]


def kde_posterior(theta_samples, config, mask=None, batch_size=512, dtype=tf.float64):
    """Per-pixel posterior mean and std of the KDE (seeds eq. 4) over position samples.

    theta_samples: [S, 2] (one emitter) or [S, K, 2] (K emitters), (x, y) in LR pixels; extra
    columns of an [S, P] MCMC sample array (photons, background) are not accepted: pass
    samples[:, :2]. mask: [S, K] or [K] bool (padding off). The KDEs are rendered batch_size at a
    time and merged with Chan's parallel Welford update in float64 (memory ~ batch_size * 16HW
    values). Returns (mean, std), each [upsample*H, upsample*W] float64; std uses ddof=0.
    """
    check_config(config)
    pos = as_numpy(theta_samples, "theta_samples")
    if pos.ndim == 2:
        pos = pos[:, None, :]
    if pos.ndim != 3 or pos.shape[-1] != 2:
        raise ValueError(f"theta_samples must be [S, 2] or [S, K, 2] (x, y) in LR pixels "
                         f"(got shape {np.shape(theta_samples)}); pass samples[:, :2] of an "
                         "MCMC result")
    if pos.shape[0] < 1:
        raise ValueError("theta_samples is empty: pass at least one sample")
    if not np.all(np.isfinite(pos)):
        raise ValueError("theta_samples contains NaN or Inf")
    s, k = pos.shape[:2]
    if mask is None:
        m = np.ones((s, k), bool)
    else:
        m = np.asarray(mask, bool)
        if m.shape == (k,):
            m = np.broadcast_to(m, (s, k))
        if m.shape != (s, k):
            raise ValueError(f"mask must be [S, K] = {(s, k)} or [K] = ({k},) (got {m.shape})")
    batch_size = _check_int(batch_size, "batch_size", 1)
    fn = _kde_chunk_stats(config, tf.as_dtype(dtype).name)
    count, mean, m2 = 0, None, None
    for start in range(0, s, batch_size):
        stop = min(start + batch_size, s)
        cmean, cm2 = (v.numpy() for v in fn(tf.constant(pos[start:stop], dtype),
                                            tf.constant(m[start:stop])))
        n = stop - start
        if mean is None:
            count, mean, m2 = n, cmean, cm2
            continue
        delta = cmean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + cm2 + delta ** 2 * (count * n / total)
        count = total
    return mean, np.sqrt(np.maximum(m2, 0.0) / count)


__all__ = ["KERNELS", "MCMCConvergenceWarning", "MCMCResult", "kde_posterior", "mcmc_posterior",
           "mcmc_posterior_batch"]
