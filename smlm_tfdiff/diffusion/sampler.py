"""Posterior sampling of psi: y ~ p(y | x) for camera frames x, in graph, with stateless seeds.

phi runs once per frame; psi then runs num_steps times on frames x num_samples images at once inside
one compiled loop (tf.while_loop). Samplers step between any decreasing noise levels of the
schedule (psi is conditioned on the continuous level sqrt(gamma), not on a step index):

  z0_hat  = (z_t - sqrt(1 - g_t) eps_psi) / sqrt(g_t)                     (predict y_0)
  z_s     = sqrt(g_s) z0_hat + sqrt(1 - g_s - sigma^2) eps_psi + sigma n,  n ~ N(0, I)
  sigma^2 = eta^2 (1 - g_s)/(1 - g_t) (1 - g_t/g_s)

eta = 1 is the ancestral DDPM step of the seeds' appendix A.1 (z_s drawn from the forward posterior
q(z_s | z_t, z0_hat), generalised to strided steps); eta = 0 is DDIM (deterministic given the start).
The last step goes to g = 1 (z_0 = z0_hat), then clipped at z = -1 (KDE >= 0; values above 1 are
real and kept).

Frame-mean-free noise (dc_free, the default): every noise draw has its mean over the image removed.
psi cannot see that one direction of the noise (1/80 of a pixel's noise on an 80x80 KDE), so it is
never denoised and ends up as a random constant offset on each sample (88 % of psi's variance on
empty pixels: docs/sampler.md, "Sampling"). A KDE is a sum of kernels on zero and has
no free offset, so the sampler draws its noise orthogonal to the constant image instead.

Starts: "noise" draws z ~ N(0, I) at t = T (with the seeds' schedule g_T ~ 0.60, so this does not
match the forward process: docs/CONVENTIONS.md, "Known traps"); "guided" draws z_{t*} ~ q(z_{t*} | 2 y_hat - 1),
the seeds' guided start from phi's estimate.
"""

from typing import TYPE_CHECKING, Optional

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.diffusion.projection import project_samples
from smlm_tfdiff.diffusion.recipe import METHODS, Recipe
from smlm_tfdiff.diffusion.schedule import NoiseSchedule, from_diffusion_space, to_diffusion_space
from smlm_tfdiff.models.shape_free import shape_free

if TYPE_CHECKING:
    from smlm_tfdiff.pretrained import Pretrained

STARTS = ("guided", "noise")


def default_recipe(models, t_start=None):
    """(t_start, num_steps) ints of the guided start of `models` (Pretrained): its Recipe's for
    t_start None (or the recipe's own), every level from another t_start (Recipe.steps_for)."""
    return models.recipe.steps_for(t_start)


def noise_levels(schedule: NoiseSchedule, num_steps: int, start: Optional[int] = None):
    """gamma at the visited steps, then 1: float64 [num_steps + 1] (see NoiseSchedule.timesteps_for)."""
    steps = schedule.timesteps_for(num_steps, start)
    return np.concatenate([schedule.gamma[steps], [1.0]]), steps


CLIPS = ("final", "each", "none")


def standard_noise(shape, seed, dc_free):
    """N(0, I) draws [N, H, W, 1]; dc_free: with each image's mean removed (module docstring)."""
    noise = seeds_lib.stateless_normal(shape, seed)
    if dc_free:
        noise = noise - tf.reduce_mean(noise, axis=[1, 2, 3], keepdims=True)
    return noise


def generate_step(psi, z_t, y_hat, g_t, g_s, eta, seed, clip=False, dc_free=False, frame=None):
    """One reverse step from level g_t to g_s > g_t (pure: same inputs, same output).

    z_t, y_hat: [N, H, W, 1] (diffusion space, KDE units); g_t, g_s, eta: scalars; seed: [2] int32.
    clip: the predicted z_0 is clipped at -1 (a KDE is >= 0) and eps made consistent with it, as
      DDPM's clip_denoised does. Off by default: clipping every step lifts empty pixels to a
      pedestal of ~0.01 (docs/sampler.md, "Sampling"); the loop clips once, at the end.
    dc_free: frame-mean-free noise (standard_noise).
    frame: [N, H/u, W/u, 1] ADU, the camera frames of a frame-conditioned psi
      (PsiConfig.frame_condition); None for a psi that sees y_hat only.
    Returns z_s [N, H, W, 1].
    """
    n = tf.shape(z_t)[0]
    level = tf.fill([n], tf.sqrt(g_t))
    inputs = {"y_t": z_t, "y_hat": y_hat, "noise_level": level}
    if frame is not None:
        inputs["frame"] = frame
    eps = psi(inputs, training=False)
    z0 = (z_t - tf.sqrt(1.0 - g_t) * eps) / tf.sqrt(g_t)
    if clip:
        z0 = tf.maximum(z0, -1.0)
        eps = (z_t - tf.sqrt(g_t) * z0) / tf.sqrt(1.0 - g_t)
    var = eta ** 2 * (1.0 - g_s) / (1.0 - g_t) * (1.0 - g_t / g_s)
    var = tf.clip_by_value(var, 0.0, 1.0 - g_s)
    noise = standard_noise(tf.shape(z_t), seed, dc_free)
    return tf.sqrt(g_s) * z0 + tf.sqrt(1.0 - g_s - var) * eps + tf.sqrt(var) * noise


def make_sample_loop(psi, jit_compile=True, clip="final", dc_free=True):
    """The compiled reverse loop: (y_hat [N, H, W, 1], gammas [S + 1] float32, eta, start,
    seed [2] int32[, y_start][, frame=]) -> z_0 [N, H, W, 1] (diffusion space). start: 0 guided,
    1 noise. y_start: the KDEs the guided start noises (default y_hat; a restart passes earlier
    samples). frame: [N, H/u, W/u, 1] ADU for a frame-conditioned psi (generate_step).
    clip: "final" clips z_0 at -1 (KDE >= 0) after the last step, "each" clips the predicted z_0
      in every step (generate_step), "none" never (targets that may be negative).
    dc_free: frame-mean-free noise in the start and every step (module docstring)."""
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS} (got {clip!r})")

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def loop(y_hat, gammas, eta, start_from_noise, seed, y_start=None, frame=None):
        # Philox-only seed arithmetic: the same samples with and without XLA (seeds.py).
        start_seed, loop_seed = tf.unstack(seeds_lib.philox_split(seed, 2))
        g0 = gammas[0]
        eps = standard_noise(tf.shape(y_hat), start_seed, dc_free)
        y0 = y_hat if y_start is None else y_start
        guided = tf.sqrt(g0) * to_diffusion_space(y0) + tf.sqrt(1.0 - g0) * eps
        z = tf.where(start_from_noise, eps, guided)
        num = tf.shape(gammas)[0] - 1

        def body(i, z):
            step_seed = seeds_lib.philox_fold_in(loop_seed, i)
            return i + 1, generate_step(psi, z, y_hat, gammas[i], gammas[i + 1], eta, step_seed,
                                        clip == "each", dc_free, frame)

        _, z = tf.while_loop(lambda i, z: i < num, body, (tf.constant(0), z))
        return tf.maximum(z, -1.0) if clip == "final" else z

    # Without XLA: one graph for all shapes, so the samples do not depend on earlier calls.
    return loop if jit_compile else shape_free(loop)


class PosteriorSampler:
    """phi -> psi posterior sampler for one models object; compiles once per shape.

    models: a `Pretrained` with psi (`pretrained("paper")` or `load_models(run_dir)`); its recipe
      (diffusion.Recipe, the model's diffusion.json) gives every default of a call.
    recipe: another Recipe for these models (e.g. models.recipe.replace(method="ddim")).
    jit_compile: phi and psi's reverse loop compiled with XLA, once per input shape (default);
      False runs one graph for all shapes (models.shape_free; float32 round-off apart, the same
      samples, and the same bytes whatever was sampled before).
    clip: where KDEs are clipped at 0 (make_sample_loop): "final" (default), "each" step, or
      "none" (only for targets that may be negative: the exact Gaussian denoisers of the tests).
    dc_free: frame-mean-free noise (default; module docstring).
    """

    def __init__(self, models: "Pretrained", jit_compile=True, max_images=512, clip="final",
                 dc_free=True, recipe: Optional[Recipe] = None):
        if models.psi is None:
            raise ValueError("these models have no diffusion model psi: load a trained psi with "
                             "smlm_tfdiff.load_models(run_dir) or use pretrained('paper')")
        self.models = models
        self.frame_condition = bool(models.psi_config is not None
                                    and models.psi_config.frame_condition)
        self.recipe = models.recipe if recipe is None else recipe
        self.schedule = self.recipe.schedule
        self.max_images = int(max_images)
        self.jit_compile = bool(jit_compile)
        self._loop = make_sample_loop(models.psi, jit_compile, clip, dc_free)
        phi = tf.function(lambda x: models.phi(x, training=False), jit_compile=jit_compile,
                          reduce_retracing=True)
        self._phi = phi if jit_compile else shape_free(phi)

    def __call__(self, frames, num_samples=100, num_steps=None, seed=0, method=None,
                 start="guided", t_start=None, return_samples=False, y_hat=None, restart_t=None,
                 restart_steps=None, project=False, restarts=None):
        """frames [B, H, W, 1] (or [H, W]) ADU -> dict of NumPy arrays in KDE units:
        (frames None with y_hat given: psi for that estimate, phi not run; with both given,
        y_hat is used as phi's estimate of those frames, which a frame-conditioned psi also sees)
        y_hat, mean, std [B, 4H, 4W, 1] (std over samples, ddof 0), samples [B, S, 4H, 4W, 1] if
        return_samples; plus nfe_per_frame, steps (the visited t).

        Every None argument is the recipe's (self.recipe, the model's diffusion.json).
        method: "ddpm" (ancestral, eta 1; the bundled models'), "ddim" (eta 0) or a float eta in
          [0, 1]; default the recipe's.
        start: "guided" from q(y_t* | y_hat) at t* = t_start (default: the recipe's), or "noise"
          from N(0, I) at t = T. num_steps: reverse steps (default: the recipe's num_steps for its
          own t_start, otherwise t_start steps, i.e. every level; see Recipe.steps_for).
        seed: int or [2] int32; the same seed gives the same samples.
        restart_t: restart sweeps (default the recipe's; none in the bundled models): each sample
          of the first pass is noised to q(y_t | sample) at t = restart_t and the reverse chain
          runs again, conditioned on the same y_hat, in restart_steps steps (default: num_steps
          scaled by restart_t / t_start). The guided start lacks the spread of y around y_hat;
          the restart's start has it (docs/calibration.md). Costs (1 + restarts *
          restart_steps / num_steps) times the network evaluations.
        restarts: how many times the restart is repeated, each from the previous pass's samples
          (default: 1 with a restart_t given here, else the recipe's; 0 turns the recipe's sweeps
          off). Noising a sample to t and denoising it given y_hat is one sweep of a Gibbs sampler
          of p(y_0, y_t | y_hat), whose y_0-marginal is the posterior whatever the first pass
          gave; each sweep moves the spread towards it (docs/calibration.md, "A 4x psi trained on
          a GPU").
        project: each sample is replaced by the KDE of the emitters detected in it (projection.py):
          samples of emitter sets, whose spread is that of positions and counts, as MCMC's is.
          Adds sample_positions (per frame, per sample: [M, 2] LR px) to the output.
        """
        condition = None  # The frames a frame-conditioned psi sees beside y_hat.
        if frames is None:  # psi given phi's estimate only (e.g. windows of a whole frame's).
            if y_hat is None:
                raise ValueError("give frames, or y_hat (phi's estimate [B, 4H, 4W, 1]) to "
                                 "sample psi for an estimate computed elsewhere")
            if self.frame_condition:
                raise ValueError("this psi is conditioned on the camera frame too "
                                 "(psi_config.frame_condition): give the frames with y_hat")
            y_hat = np.asarray(y_hat, np.float32)
            frames = y_hat  # Only its length is read below.
        else:
            frames = _check_frames(frames)
            if self.frame_condition:
                condition = frames
            if y_hat is not None:
                y_hat = np.asarray(y_hat, np.float32)
                u = self.models.config.upsample if self.models.config is not None else None
                if len(y_hat) != len(frames) or (u and y_hat.shape[1:3] != (
                        frames.shape[1] * u, frames.shape[2] * u)):
                    raise ValueError(f"y_hat {y_hat.shape} is not phi's estimate of frames "
                                     f"{frames.shape} (one {u}x upsampled KDE per frame)")
        if project and self.models.config is None:
            raise ValueError("project=True needs the models' SimulationConfig (models.config), "
                             "for the detection and the KDE")
        recipe = self.recipe
        method = recipe.method if method is None else method
        eta = METHODS.get(method, method) if isinstance(method, str) else method
        if isinstance(eta, str) or not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"method must be one of {sorted(METHODS)} or an eta in [0, 1] "
                             f"(got {method!r})")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS} (got {start!r})")
        num_samples = int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        if start == "noise":
            t_start = default_steps = self.schedule.T
        else:
            t_start, default_steps = recipe.steps_for(t_start)
        num_steps = default_steps if num_steps is None else int(num_steps)
        gammas, steps = noise_levels(self.schedule, num_steps, t_start)
        gammas = tf.constant(gammas, tf.float32)
        seed = seeds_lib.as_seed(seed)
        if restart_t is None:
            restart_t = recipe.restart_t
            restarts = recipe.restarts if restarts is None else int(restarts)
            if restarts == 0:
                restart_t = None
        elif restarts is None:
            restarts = 1
        restart_gammas, restart_nfe = None, 0
        if restart_t is not None:
            # The Recipe's checks (1 <= restart_t <= T, restarts >= 1), in one place.
            checked = recipe.replace(restart_t=int(restart_t), restarts=int(restarts))
            restart_t, restarts = checked.restart_t, checked.restarts
            if restart_steps is None:
                restart_steps = max(1, round(num_steps * restart_t / int(steps[0])))
            restart_steps = min(int(restart_steps), restart_t)
            restart_gammas = tf.constant(noise_levels(self.schedule, restart_steps, restart_t)[0],
                                         tf.float32)
            restart_nfe = restarts * restart_steps * num_samples

        if y_hat is None:
            if getattr(self.models.phi_config, "brightness_reference", None) is not None:
                raise ValueError("this phi reads frames scaled by the movie's photons per "
                                 "emitter, which the sampler does not know: pass y_hat, phi's "
                                 "estimate at that N0 (KerasBackend.estimate(frames, photons))")
            y_hat = np.concatenate([self._phi(tf.constant(frames[i:i + 256])).numpy()
                                    for i in range(0, len(frames), 256)])
        per_call = max(1, self.max_images // num_samples)  # Frames per compiled call.
        eta_t = tf.constant(float(eta), tf.float32)
        means, stds, samples, positions = [], [], [], []
        for lo in range(0, len(frames), per_call):
            chunk = y_hat[lo:lo + per_call]
            rep = np.repeat(chunk, num_samples, axis=0)
            extra = {}
            if condition is not None:
                extra["frame"] = tf.constant(np.repeat(condition[lo:lo + per_call], num_samples,
                                                       axis=0))
            z = self._loop(tf.constant(rep), gammas, eta_t, tf.constant(start == "noise"),
                           seeds_lib.fold_in(seed, lo), **extra)
            for sweep in range(restarts if restart_gammas is not None else 0):
                z = self._loop(tf.constant(rep), restart_gammas, eta_t, tf.constant(False),
                               seeds_lib.fold_in(seeds_lib.fold_in(seed, lo), 1_000_003 + sweep),
                               from_diffusion_space(z), **extra)
            y = from_diffusion_space(z.numpy()).reshape((len(chunk), num_samples) + chunk.shape[1:])
            if project:
                projected = project_samples(y, self.models.config)
                y = projected["samples"]
                positions.extend(projected["positions"])
            means.append(y.mean(axis=1))
            stds.append(y.std(axis=1))
            if return_samples:
                samples.append(y)
        out = {"y_hat": y_hat, "mean": np.concatenate(means), "std": np.concatenate(stds),
               "nfe_per_frame": num_steps * num_samples + restart_nfe, "steps": steps}
        if return_samples:
            out["samples"] = np.concatenate(samples)
        if project:
            out["sample_positions"] = positions
        return out


def _check_frames(frames):
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None, :, :, None]
    elif frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] != 1:
        raise ValueError(f"frames must be [B, H, W, 1], [B, H, W] or [H, W] (got shape "
                         f"{frames.shape})")
    if not np.issubdtype(frames.dtype, np.number):
        raise ValueError(f"frames must be numeric (got dtype {frames.dtype})")
    frames = frames.astype(np.float32)
    if not np.all(np.isfinite(frames)):
        raise ValueError("frames contain NaN or Inf values; drop or repair those frames first")
    return frames


def sample_posterior(models, frames, num_samples=100, num_steps=None, seed=0, method=None,
                     start="guided", t_start=None, return_samples=False, restart_t=None,
                     project=False):
    """Posterior samples, mean and per-pixel std of the KDE for camera frames (PosteriorSampler).

    models: `pretrained("paper")` or `load_models(run_dir)`. frames [B, H, W, 1] ADU.
    Every None argument is the models' recipe's (method "ddpm" for the bundled models).
    Returns a dict of NumPy arrays in KDE units (see PosteriorSampler.__call__).
    """
    if models.sampler is None:
        models.sampler = PosteriorSampler(models)  # Keeps the compiled loop for later calls.
    return models.sampler(frames, num_samples, num_steps, seed, method, start, t_start,
                          return_samples, restart_t=restart_t, project=project)
