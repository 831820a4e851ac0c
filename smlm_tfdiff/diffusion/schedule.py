"""Noise schedule, forward noising and training loss of the conditional diffusion model psi.

Notation (seeds, section 3.2): beta_t for t = 1..T, alpha_t = 1 - beta_t, gamma_t = prod_{s<=t}
alpha_s, q(y_t | y_0) = N(sqrt(gamma_t) y_0, (1 - gamma_t) I), SNR_t = gamma_t / (1 - gamma_t).
Arrays are indexed by t = 0..T with beta_0 = 0, gamma_0 = 1 and SNR_0 = inf.

psi is conditioned on the continuous noise level sqrt(gamma) (WaveGrad / SR3), not on t: training
draws t, then sqrt(gamma) uniformly between sqrt(gamma_t) and sqrt(gamma_{t-1}); samplers may use
any sub-sequence of the schedule (`NoiseSchedule.timesteps_for`).

Diffusion works on z = 2*y - 1 for KDE y (docs/CONVENTIONS.md); `to_diffusion_space` / `from_diffusion_space`.

The schedule is NumPy (float64) so samplers, exporters and tests share it without a framework; the
training draw uses tf.random.stateless_* (seeded, docs/CONVENTIONS.md); noising and the loss use keras.ops.
"""

import math

import numpy as np
from keras import ops

WEIGHTINGS = ("snr", "simple")
# The core schedules; smlm_tfdiff.experimental.SCHEDULES adds "paper_extended" (the seeds' steps,
# then more to noise: experimental/schedules.py), which every constructor here also accepts.
SCHEDULE_NAMES = ("paper", "linear", "cosine")
# Smallest t each weighting is defined for: the SNR weight is infinite at t = 1 (gamma_0 = 1).
T_MIN = {"snr": 2, "simple": 1}


class NoiseSchedule:
    """A discrete variance schedule beta_1..beta_T and the float64 arrays derived from it.

    Attributes (read-only float64 arrays of length T + 1, indexed by t = 0..T):
      beta   beta_0 = 0, then the schedule.
      alpha  1 - beta.
      gamma  cumulative product of alpha (gamma_0 = 1): the signal variance of q(y_t | y_0).
      snr_t  gamma / (1 - gamma), inf at t = 0, strictly decreasing.

    The seeds' "paper" schedule (`linear()` with its defaults, T = 100) ends at gamma_T ~ 0.60
    (SNR_T ~ 1.5): y_T is NOT pure noise, so a reverse process started from N(0, I) does not match
    the forward process (docs/CONVENTIONS.md, "Known traps"). `cosine()` and `named("linear")`
    reach noise (and the experimental "paper_extended": the seeds' 100 steps, then 40 more).
    """

    def __init__(self, betas, name="custom", params=None):
        """betas: [T] for t = 1..T, each in (0, 1)."""
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array (got shape {betas.shape})")
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError("betas must lie in (0, 1)")
        self.name = str(name)
        self.params = dict(params or {})
        beta = np.concatenate([[0.0], betas])
        alpha = 1.0 - beta
        gamma = np.cumprod(alpha)
        with np.errstate(divide="ignore"):
            snr = gamma / (1.0 - gamma)
        snr[0] = np.inf
        for arr in (beta, alpha, gamma, snr):
            arr.setflags(write=False)
        self.beta, self.alpha, self.gamma, self.snr_t = beta, alpha, gamma, snr

    # Constructors ---------------------------------------------------------------------------------
    @classmethod
    def linear(cls, T=100, beta_start=1e-4, beta_end=1e-2):
        """betas for t = 1..T linearly spaced from beta_start to beta_end (the seeds' schedule with
        the defaults: gamma_T ~ 0.60 at T = 100, not pure noise)."""
        T = _check_T(T)
        params = {"T": T, "beta_start": float(beta_start), "beta_end": float(beta_end)}
        return cls(np.linspace(beta_start, beta_end, T), "linear", params)

    @classmethod
    def cosine(cls, T=100, s=0.008, max_beta=0.999):
        """Nichol & Dhariwal (2021): gamma(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2),
        beta_t = min(1 - gamma_t/gamma_{t-1}, max_beta). gamma_T < 1e-3: y_T is noise."""
        T = _check_T(T)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must lie in (0, 1) (got {max_beta})")
        t = np.arange(T + 1, dtype=np.float64)
        f = np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 1e-12, max_beta)
        params = {"T": T, "s": float(s), "max_beta": float(max_beta)}
        return cls(betas, "cosine", params)

    @classmethod
    def named(cls, name, T=100):
        """"paper": the seeds' linear 1e-4..1e-2 (gamma_T ~ 0.60 at T = 100);
        "linear": Ho et al.'s DDPM linear 1e-4..0.02 at T = 1000, rescaled to T steps
          (beta from 0.1/T to 20/T; gamma_T ~ 4e-5 at T = 100), which reaches noise;
        "cosine": `cosine(T)`;
        an experimental name (smlm_tfdiff.experimental.SCHEDULES), e.g. "paper_extended": the
          seeds' T steps then 0.4 T more to noise (experimental/schedules.py)."""
        T = _check_T(T)
        if name == "paper":
            schedule = cls.linear(T, 1e-4, 1e-2)
        elif name == "linear":
            schedule = cls.linear(T, 0.1 / T, 20.0 / T)
        elif name == "cosine":
            schedule = cls.cosine(T)
        else:
            return cls._experimental(name, T=T)
        schedule.name = name
        return schedule

    def get_config(self):
        """JSON-able dict; `NoiseSchedule.from_config` rebuilds the same schedule."""
        if self.name == "custom":
            return {"name": "custom", "betas": self.beta[1:].tolist()}
        return {"name": self.name, **self.params}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        name = config.pop("name")
        if name == "custom":
            return cls(config["betas"])
        if name == "paper":
            return cls.named("paper", config["T"])
        constructor = {"linear": cls.linear, "cosine": cls.cosine}.get(name)
        if constructor is None:
            return cls._experimental(name, config)
        return constructor(**config)

    @classmethod
    def _experimental(cls, name, config=None, T=None):
        """An experimental schedule (experimental/schedules.py) by name, from its T (named) or
        from its get_config params."""
        from smlm_tfdiff import experimental

        if name not in experimental.SCHEDULES:
            raise ValueError(f"unknown schedule name {name!r}: use one of "
                             f"{SCHEDULE_NAMES + experimental.SCHEDULES}")
        from smlm_tfdiff.experimental import schedules

        betas, params = (schedules.NAMED[name](T) if config is None
                         else schedules.FROM_CONFIG[name](**config))
        return cls(betas, name, params)

    # Queries --------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.beta.size - 1

    @property
    def gamma_T(self) -> float:
        return float(self.gamma[-1])

    def snr(self, t):
        """SNR_t = gamma_t / (1 - gamma_t) for integer t (scalar or array) in 0..T; inf at t = 0."""
        return self.snr_t[self._check_t(t, 0)]

    def noise_level(self, t):
        """psi's conditioning input at step t: sqrt(gamma_t), float64."""
        return np.sqrt(self.gamma[self._check_t(t, 0)])

    def gamma_between(self, t, u):
        """The WaveGrad continuous draw: sqrt(gamma) = sqrt(gamma_t) + u (sqrt(gamma_{t-1}) -
        sqrt(gamma_t)), so sqrt(gamma) ~ Uniform(sqrt(gamma_t), sqrt(gamma_{t-1})) for u ~ U(0, 1).

        t: integers in 1..T, u: in [0, 1] (broadcast together). Returns gamma, float64.
        """
        t = self._check_t(t, 1)
        u = np.asarray(u, np.float64)
        lo, hi = np.sqrt(self.gamma[t]), np.sqrt(self.gamma[t - 1])
        return (lo + u * (hi - lo)) ** 2

    def timesteps_for(self, num_steps, start=None):
        """Decreasing integer steps for a strided sampler: num_steps values from `start` (default T)
        down to 1, always including both ends, as evenly spaced as integers allow.

        The sampler visits t = steps[0], steps[1], ..., steps[-1] = 1 and steps from each to the
        next (the last to t = 0). Returns int64 [num_steps], strictly decreasing.
        """
        start = self.T if start is None else int(start)
        if not 1 <= start <= self.T:
            raise ValueError(f"start must lie in 1..T = 1..{self.T} (got {start})")
        num_steps = int(num_steps)
        if not 1 <= num_steps <= start:
            raise ValueError(f"num_steps must lie in 1..start = 1..{start} (got {num_steps})")
        if num_steps == 1:
            return np.array([start], np.int64)
        # Spacing >= 1 between consecutive points, so rounding keeps them strictly decreasing.
        return np.round(np.linspace(start, 1, num_steps)).astype(np.int64)

    def _check_t(self, t, low):
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"t must be integer (got dtype {t.dtype})")
        if t.size and (t.min() < low or t.max() > self.T):
            raise ValueError(f"t must lie in {low}..{self.T} (got {t.min()}..{t.max()})")
        return t

    def __repr__(self):
        return f"NoiseSchedule({self.name!r}, T={self.T}, gamma_T={self.gamma_T:.4g})"


def _check_T(T):
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer (got {T})")
    return int(T)


# Noise-level buckets (in t) of the paper schedule for the per-bucket validation loss; a longer
# schedule (e.g. the experimental paper_extended) adds one bucket for its steps beyond 100.
BUCKETS = ((1, 5), (6, 20), (21, 50), (51, 100))


def buckets_for(schedule):
    """BUCKETS, plus (101, T) when the schedule is longer than the seeds' 100 steps."""
    return BUCKETS + (((101, schedule.T),) if schedule.T > 100 else ())


# Training draw ------------------------------------------------------------------------------------
def sample_training_noise_level(schedule, batch, seed, t_min=T_MIN["snr"]):
    """WaveGrad-style training draw: t ~ U{t_min..T}, then sqrt(gamma) ~ U(sqrt(gamma_t),
    sqrt(gamma_{t-1})) (`NoiseSchedule.gamma_between`).

    seed: [2] int32 (or an int), split into one seed for t and one for the continuous draw.
    t_min: 2 by default, as the SNR weighting needs (its weight is infinite at t = 1); use
      `T_MIN[weighting]` (1 for "simple"). With t_min = 2 the noise levels in (sqrt(gamma_1), 1] are
      never trained; samplers only query sqrt(gamma_1), the edge of the t = 2 interval.
    Returns (t [batch] int32, gamma [batch] float32); psi's input is sqrt(gamma).
    """
    import tensorflow as tf

    from smlm_tfdiff import seeds

    if not 1 <= int(t_min) <= schedule.T:
        raise ValueError(f"t_min must lie in 1..T = 1..{schedule.T} (got {t_min})")
    seed_t, seed_u = seeds.split(seed, 2)
    t = tf.random.stateless_uniform([batch], seed_t, minval=int(t_min), maxval=schedule.T + 1,
                                    dtype=tf.int32)
    u = tf.random.stateless_uniform([batch], seed_u, dtype=tf.float64)
    sqrt_gamma = tf.constant(np.sqrt(schedule.gamma), tf.float64)
    lo, hi = tf.gather(sqrt_gamma, t), tf.gather(sqrt_gamma, t - 1)
    gamma = tf.square(lo + u * (hi - lo))
    return t, tf.cast(gamma, tf.float32)


# Loss ---------------------------------------------------------------------------------------------
def loss_weight_table(schedule, weighting):
    """Per-step loss weights w[t], float64 [T + 1] (see `diffusion_loss_weights`)."""
    T = schedule.T
    table = np.zeros(T + 1, np.float64)
    if weighting == "simple":
        table[1:] = 1.0
    elif weighting == "snr":
        if T < 2:
            raise ValueError("the SNR weighting needs T >= 2 (it is undefined at t = 1)")
        snr = schedule.snr_t
        w = 0.5 * T * (snr[1:T] / snr[2:] - 1.0)  # t = 2..T; the T/2 cancels below.
        table[2:] = w / w.mean()
    else:
        raise ValueError(f"unknown weighting {weighting!r}: use one of {WEIGHTINGS}")
    return table


def diffusion_loss_weights(schedule, t, weighting):
    """Per-example loss weights for integer steps t [B] -> float32 [B].

    "snr":    the seeds' eq. 8 weight (T/2) (SNR_{t-1}/SNR_t - 1), the variational bound's
              diffusion loss. It is infinite at t = 1 (SNR_0 = inf since gamma_0 = 1): t = 1 is the
              reconstruction term -log p(y_0 | y_1), which the seeds drop (appendix A.2 sums from
              t = 2). So t = 1 is excluded: draw t from 2..T (t_min = 2, the default of
              `sample_training_noise_level`); its table entry is 0 (never inf/NaN), and a concrete
              (NumPy / int) t = 1 raises ValueError. The weights are then divided by their mean over
              t = 2..T, so that E_t[w] = 1 under the uniform draw: the loss has the scale of the
              simple one, which only rescales the learning rate (the T/2 factor cancels).
    "simple": weight 1 for t = 1..T (the noise-estimation loss the seeds train with).
    The weight is a property of the bin t; the continuous gamma drawn inside the bin does not
    change it.
    """
    table = loss_weight_table(schedule, weighting)
    if isinstance(t, (int, np.integer, np.ndarray, list, tuple)):
        t_np = np.asarray(t)
        if t_np.size and (t_np.min() < T_MIN[weighting] or t_np.max() > schedule.T):
            raise ValueError(f"the {weighting!r} weighting is defined for t in "
                             f"{T_MIN[weighting]}..{schedule.T} (got {t_np.min()}..{t_np.max()})")
    return ops.take(ops.convert_to_tensor(table.astype(np.float32)), ops.cast(t, "int32"), axis=0)


def per_example_loss(eps, eps_pred, weights=None):
    """weights * mean over all non-batch axes of (eps - eps_pred)^2: [B, H, W, C] x2, [B] -> [B]."""
    sq = ops.square(ops.convert_to_tensor(eps) - eps_pred)
    loss = ops.mean(sq, axis=tuple(range(1, len(sq.shape))))
    if weights is None:
        return loss
    return ops.cast(weights, loss.dtype) * loss


# Forward process ----------------------------------------------------------------------------------
def q_sample(y0, gamma, eps):
    """y_t = sqrt(gamma) y0 + sqrt(1 - gamma) eps; y0, eps [B, H, W, C], gamma [B] (broadcast to
    [B, 1, 1, 1]), all in diffusion space. Returns [B, H, W, C] in y0's dtype."""
    y0 = ops.convert_to_tensor(y0)
    gamma = ops.cast(gamma, y0.dtype)
    gamma = ops.reshape(gamma, (-1,) + (1,) * (len(y0.shape) - 1))
    return ops.sqrt(gamma) * y0 + ops.sqrt(1.0 - gamma) * ops.cast(eps, y0.dtype)


def to_diffusion_space(kde):
    """KDE units (isolated peak ~1, background 0) -> diffusion space z = 2*kde - 1."""
    return 2.0 * kde - 1.0


def from_diffusion_space(z):
    """Diffusion space z -> KDE units (z + 1) / 2. Never clipped (targets can exceed 1)."""
    return 0.5 * (z + 1.0)
