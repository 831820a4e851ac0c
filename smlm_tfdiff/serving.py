"""A SavedModel of the whole phi -> psi posterior sampler, for TensorFlow Serving.

    from smlm_tfdiff import pretrained
    from smlm_tfdiff.serving import export_savedmodel, load_savedmodel
    export_savedmodel(pretrained("paper"), "models/smlm/1")
    served = load_savedmodel("models/smlm/1")
    out = served.posterior(frames, num_samples=16, num_steps=10, seed=0)  # y_hat, mean, std

Signatures (no XLA inside, docs/CONVENTIONS.md "Stack facts"; frames float32 in ADU, outputs in KDE units):
  serving_default(frames [B, H, W, 1], num_samples int32, num_steps int32, seed [2] int32)
      -> kde_estimate, posterior_mean, posterior_std  [B, 4H, 4W, 1]   (std over samples, ddof 0)
  sample(same inputs) -> the above + samples [B, S, 4H, 4W, 1]
  estimate(frames) -> kde_estimate (phi only)
  config() -> sim_config_json, psi_config_json, diffusion_json (string scalars)

The sampler method ("ddpm" or "ddim") and the guided start t_start are fixed at export (default:
the models' recipe, diffusion.Recipe); num_steps (1..t_start) is chosen per request (default
the recipe's), and the visited noise levels are computed in graph exactly as
`NoiseSchedule.timesteps_for` + `sampler.noise_levels` do. The export's diffusion.json is the
recipe's with the export-only keys recipe.EXPORT_KEYS; restart sweeps are not exported (one pass).
The same seed gives the same output as
`PosteriorSampler(models, jit_compile=False)(frames, S, num_steps, seed, method, t_start=t_start,
restarts=0)` when all frames fit in one chunk of it (B <= max(1, max_images // S)).

Memory: one request runs psi on B * num_samples images of 4H x 4W at once. Each export has a
maximum of B * num_samples per request, max_images (default DEFAULT_MAX_IMAGES = 2048; set at
export: export_savedmodel(..., max_images=N), export/export_savedmodel.py --max_images N); a request above it fails in graph with an
InvalidArgument error that names the limit, instead of running out of memory. Split larger jobs
into several requests (ServedSampler.posterior and analyze do).
"""

import json
import math
import os
import shutil
import tempfile
import weakref

import numpy as np
import tensorflow as tf

from smlm_tfdiff import seeds as seeds_lib
from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.models.phi import phi_input
from smlm_tfdiff.simulation.config import SimulationConfig
from smlm_tfdiff.diffusion.recipe import METHODS, Recipe
from smlm_tfdiff.diffusion.schedule import from_diffusion_space
from smlm_tfdiff.diffusion.sampler import make_sample_loop

SIGNATURES = ("serving_default", "sample", "estimate", "config")
POSTERIOR_INPUTS = ("frames", "num_samples", "num_steps", "seed")
# frames has no static rank so that a wrong rank reaches the in-graph check and its message.
FRAMES_SPEC = tf.TensorSpec(None, tf.float32, name="frames")
POSTERIOR_SIGNATURE = [
    FRAMES_SPEC,
    tf.TensorSpec([], tf.int32, name="num_samples"),
    tf.TensorSpec([], tf.int32, name="num_steps"),
    tf.TensorSpec([2], tf.int32, name="seed"),
]
ASSET_FILES = ("sim_config.json", "psi_config.json", "diffusion.json")
DEFAULT_MAX_IMAGES = 2048  # frames x samples per request (module docstring).


def noise_levels_graph(gamma, num_steps, t_start):
    """In-graph `sampler.noise_levels(schedule, num_steps, t_start)`.

    gamma: float64 [T + 1] (schedule.gamma); num_steps: int32 scalar in 1..t_start; t_start: int.
    Returns (gammas float64 [num_steps + 1], steps int32 [num_steps]), equal to the NumPy version.
    """
    num_steps = tf.convert_to_tensor(num_steps, tf.int32)
    start = tf.cast(t_start, tf.float64)
    # np.linspace(start, 1, n): arange(n) * ((1 - start) / (n - 1)) + start, last set to 1 exactly.
    step = (1.0 - start) / tf.cast(tf.maximum(num_steps - 1, 1), tf.float64)
    index = tf.range(num_steps)
    points = tf.cast(index, tf.float64) * step + start
    is_last = tf.logical_and(tf.equal(index, num_steps - 1), num_steps > 1)
    points = tf.where(is_last, tf.ones_like(points), points)
    steps = tf.cast(tf.round(points), tf.int32)  # tf.round, like np.round, rounds half to even.
    gammas = tf.concat([tf.gather(gamma, steps), tf.ones([1], tf.float64)], axis=0)
    return gammas, steps


def _assert(condition, template, *values):
    """tf.debugging.Assert whose message is `template` with {} filled from `values` at run time."""
    message = tf.strings.format(template, values) if values else tf.constant(template)
    return tf.debugging.Assert(condition, [message])


class SamplerModule(tf.Module):
    """phi and psi of a `Pretrained` (`pretrained("paper")`, `load_models(run_dir)`) with the
    serving signatures (module docstring). method "ddpm" (eta 1) or "ddim" (eta 0) and the guided
    start t_start (default: the models' recipe's) are fixed here."""

    def __init__(self, models, method=None, t_start=None, name="smlm_sampler",
                 max_images=DEFAULT_MAX_IMAGES, photons=None, spread=None):
        super().__init__(name=name)
        if isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) \
                or max_images < 1:
            raise ValueError(f"max_images must be an integer >= 1 (got {max_images!r})")
        self._max_images = int(max_images)
        if models.psi is None:
            raise ValueError("these models have no diffusion model psi: export a trained psi "
                             "(smlm_tfdiff.load_models(run_dir)) or pretrained('paper')")
        method = models.recipe.method if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} (got {method!r})")
        schedule = models.recipe.schedule
        if t_start is not None and not 1 <= t_start <= schedule.T:
            raise ValueError(f"t_start must lie in 1..T = 1..{schedule.T} (got {t_start})")
        t_start, default_steps = models.recipe.steps_for(t_start)
        # The exported recipe: one pass, no restart sweeps.
        recipe = models.recipe.replace(t_start=t_start, num_steps=default_steps, method=method,
                                       restart_t=None, restarts=None)
        self.phi = models.phi
        # A brightness-normalised phi (PhiConfig.brightness_reference) is exported for one dye:
        # the photons per emitter are fixed here and the frames scaled inside the graph.
        reference = getattr(models.phi_config, "brightness_reference", None)
        self._brightness = None  # (reference, photons) of such a phi.
        if reference is not None:
            if photons is None or not (np.isfinite(photons) and photons > 0):
                raise ValueError(
                    "this phi reads frames scaled by the movie's photons per emitter (N0; "
                    "phi_config.json brightness_reference), which a SavedModel cannot measure: "
                    f"export it for one dye with photons N0 > 0 (--photons; got {photons!r})")
            self._brightness = (float(reference), float(photons))
        elif photons is not None:
            raise ValueError("photons applies to a brightness-normalised phi only; this phi "
                             "reads frames as they are: leave it unset")
        # One told the spread of the emitters' photons (PhiConfig.spread_input) is exported for
        # one dye's spread too.
        self._phi_config = models.phi_config
        self._spread = None
        if getattr(models.phi_config, "spread_input", False):
            if spread is None or not (np.isfinite(spread) and spread >= 0):
                raise ValueError(
                    "this phi is told the spread of the emitters' photons about N0 (a log-sd; "
                    "phi_config.json spread_input), which a SavedModel cannot measure: export it "
                    f"for one dye with spread >= 0 (--photon_spread; got {spread!r})")
            self._spread = float(spread)
        elif spread is not None:
            raise ValueError("spread applies to a phi told the spread of the emitters' photons "
                             "(phi_config.json spread_input) only: leave it unset")
        self._offset = float(np.mean(models.config.offset))
        self.psi = models.psi
        self._frame_condition = models.psi_config.frame_condition
        self._method_name = method
        self._t_start_value = t_start
        self._eta = float(recipe.eta)
        self._gamma = tf.constant(schedule.gamma, tf.float64)
        self._loop = make_sample_loop(models.psi, jit_compile=False)

        sim_config = models.config
        psi_factor = models.psi_config.downsample_factor
        upsample = int(sim_config.upsample)
        # upsample * H must be divisible by psi's factor: H a multiple of factor / gcd(factor, up).
        self._size_multiple = psi_factor // math.gcd(psi_factor, upsample)
        self._size_message = (
            f"frame height and width must be positive multiples of {self._size_multiple}, so that "
            f"the {upsample}x KDE grid passes the U-Net of psi (its sides must be divisible by "
            f"{psi_factor}); got {{}}x{{}}: pad or crop the frames to a multiple of "
            f"{self._size_multiple} (the model was trained on {sim_config.frame_height}x"
            f"{sim_config.frame_width} frames)")

        # The recipe and the export-only keys (recipe.EXPORT_KEYS).
        diffusion = {**recipe.to_dict(), "eta": self._eta, "start": "guided",
                     "max_images_per_request": self._max_images}
        # The detection settings ride in sim_config.json under their pre-split keys.
        texts = {"sim_config.json": json.dumps({**sim_config.to_dict(),
                                                **models.detection.to_legacy()}, sort_keys=True),
                 "psi_config.json": models.psi_config.to_json(),
                 "diffusion.json": json.dumps(diffusion, sort_keys=True)}
        # Plain attributes readable after tf.saved_model.load (.numpy()). Non-trainable variables,
        # since the SavedModel keeps no tensor attributes of a tf.Module.
        def attribute(value, name):
            return tf.Variable(value, trainable=False, name=name)

        self.sim_config_json = attribute(texts["sim_config.json"], "sim_config_json")
        self.psi_config_json = attribute(texts["psi_config.json"], "psi_config_json")
        self.diffusion_json = attribute(texts["diffusion.json"], "diffusion_json")
        self.method = attribute(method, "method")
        self.t_start = attribute(np.int32(t_start), "t_start")
        # Assets: copied into <export>/assets/ on save. The source files live in a temp folder
        # removed with this module.
        asset_dir = tempfile.mkdtemp(prefix="smlm_serving_assets_")
        weakref.finalize(self, shutil.rmtree, asset_dir, True)
        for file_name, text in texts.items():
            with open(os.path.join(asset_dir, file_name), "w") as f:
                f.write(text)
        self.sim_config_asset = tf.saved_model.Asset(os.path.join(asset_dir, "sim_config.json"))
        self.psi_config_asset = tf.saved_model.Asset(os.path.join(asset_dir, "psi_config.json"))
        self.diffusion_asset = tf.saved_model.Asset(os.path.join(asset_dir, "diffusion.json"))

        # One traced posterior shared by serving_default and sample (one trace of the loop).
        self._posterior = tf.function(self._posterior_graph, input_signature=POSTERIOR_SIGNATURE)
        self.serving_default = tf.function(self._serving_default,
                                           input_signature=POSTERIOR_SIGNATURE)
        self.sample = tf.function(self._sample, input_signature=POSTERIOR_SIGNATURE)
        self.estimate = tf.function(self._estimate, input_signature=[FRAMES_SPEC])
        self.config = tf.function(self._config, input_signature=[])

    def _phi(self, frames):
        if self._brightness is not None:
            frames = phi_input(frames, self._offset, self._phi_config, self._brightness[1],
                               self._spread)
        return self.phi(frames, training=False)

    def signatures(self):
        """{name: concrete function} for tf.saved_model.save."""
        return {"serving_default": self.serving_default.get_concrete_function(),
                "sample": self.sample.get_concrete_function(),
                "estimate": self.estimate.get_concrete_function(),
                "config": self.config.get_concrete_function()}

    # Graph pieces ---------------------------------------------------------------------------------
    def _checked_frames(self, frames, check_size):
        """frames of any rank -> [B, H, W, 1] float32, after in-graph checks with clear messages."""
        shape = tf.shape(frames)
        rank_ok = tf.logical_and(tf.equal(tf.size(shape), 4),
                                 tf.reduce_all(tf.equal(shape[3:], 1)))
        rank_check = _assert(
            rank_ok, "frames must be a float32 batch [B, H, W, 1] of camera frames in ADU (rank 4, "
            "one channel); got shape {}: add the batch and channel axes, e.g. "
            "frames[None, :, :, None] for one H x W frame", shape)
        with tf.control_dependencies([rank_check]):
            frames = tf.ensure_shape(frames, [None, None, None, 1])
            shape = tf.shape(frames)
            checks = [
                _assert(shape[0] > 0, "frames hold no frame (B = 0); send at least one frame"),
                _assert(tf.reduce_all(tf.math.is_finite(frames)),
                        "frames contain NaN or Inf values; drop or repair those frames before "
                        "sending them"),
            ]
            if check_size:
                h, w = shape[1], shape[2]
                m = self._size_multiple
                size_ok = tf.logical_and(tf.logical_and(h > 0, w > 0),
                                         tf.logical_and(tf.equal(h % m, 0), tf.equal(w % m, 0)))
                checks.append(_assert(size_ok, self._size_message, h, w))
        with tf.control_dependencies(checks):
            return tf.identity(frames)

    def _posterior_graph(self, frames, num_samples, num_steps, seed):
        """-> (y_hat [B, 4H, 4W, 1], samples [B, S, 4H, 4W, 1]) in KDE units; PosteriorSampler's
        randomness for one chunk: y_hat repeated S times (np.repeat order), loop seed
        fold_in(seed, 0)."""
        t_start = self._t_start_value
        checks = [
            _assert(num_samples >= 1, "num_samples must be >= 1 (got {}); ask for at least one "
                    "posterior sample per frame", num_samples),
            _assert(tf.logical_and(num_steps >= 1, num_steps <= t_start),
                    f"num_steps must lie in 1..t_start = 1..{t_start} (got {{}}); this export "
                    f"starts the reverse process at t_start = {t_start} ({self._method_name}): "
                    f"ask for 1 to {t_start} steps, or re-export with a larger --t_start",
                    num_steps),
        ]
        frames = self._checked_frames(frames, check_size=True)
        images = tf.cast(tf.shape(frames)[0], tf.int64) * tf.cast(num_samples, tf.int64)
        checks.append(_assert(
            images <= self._max_images,
            "this request asks for {} frames x {} samples = {} images of psi, above the limit of "
            f"this export, {self._max_images} per request (set at export: max_images / "
            "--max_images): send fewer frames or fewer samples per request, or re-export with a "
            "larger --max_images if the accelerator has the memory",
            tf.shape(frames)[0], num_samples, images))
        with tf.control_dependencies(checks):
            y_hat = self._phi(frames)
            gammas, _ = noise_levels_graph(self._gamma, num_steps, t_start)
            repeated = tf.repeat(y_hat, num_samples, axis=0)
            extra = {}
            if self._frame_condition:  # psi sees the frames too (PsiConfig.frame_condition).
                extra["frame"] = tf.repeat(frames, num_samples, axis=0)
            z = self._loop(repeated, tf.cast(gammas, tf.float32), tf.constant(self._eta),
                           tf.constant(False), seeds_lib.fold_in(seed, 0), **extra)
            batch = tf.shape(y_hat)[0:1]
            samples_shape = tf.concat([batch, [num_samples], tf.shape(y_hat)[1:]], axis=0)
            samples = tf.reshape(from_diffusion_space(z), samples_shape)
        return y_hat, samples

    def _sample(self, frames, num_samples, num_steps, seed):
        y_hat, samples = self._posterior(frames, num_samples, num_steps, seed)
        return {"kde_estimate": y_hat,
                "posterior_mean": tf.reduce_mean(samples, axis=1),
                "posterior_std": tf.math.reduce_std(samples, axis=1),
                "samples": samples}

    def _serving_default(self, frames, num_samples, num_steps, seed):
        out = self._sample(frames, num_samples, num_steps, seed)
        del out["samples"]
        return out

    def _estimate(self, frames):
        frames = self._checked_frames(frames, check_size=False)
        return {"kde_estimate": self._phi(frames)}

    def _config(self):
        return {"sim_config_json": tf.identity(self.sim_config_json),
                "psi_config_json": tf.identity(self.psi_config_json),
                "diffusion_json": tf.identity(self.diffusion_json)}


def export_savedmodel(models, export_dir, method=None, t_start=None, overwrite=False,
                      max_images=DEFAULT_MAX_IMAGES, photons=None, spread=None):
    """Write the SamplerModule of `models` as a SavedModel to export_dir and return export_dir.
    method, t_start: default the models' recipe's (module docstring).
    photons: the dye's photons per emitter, required for (and only for) a brightness-normalised
    phi, whose frames the export scales by brightness_reference / photons; spread: the dye's
    log-sd of photons about N0, required for (and only for) a phi told it (spread_input).
    max_images: the most frames x samples one request may ask for (module docstring).

    Atomic: saved to a temporary folder next to export_dir, then renamed. An existing non-empty
    export_dir is refused (FileExistsError) unless overwrite=True. For TF Serving, export_dir
    should be <model base path>/<integer version>.
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    check_export_dir(export_dir, overwrite)
    module = SamplerModule(models, method=method, t_start=t_start, max_images=max_images,
                           photons=photons, spread=spread)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    # A name TF Serving ignores (not an integer) while the export is incomplete.
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.tmp-", dir=parent)
    try:
        # mkdtemp makes the folder 0700; the model server may run as another user.
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)
        tf.saved_model.save(module, tmp_dir, signatures=module.signatures())
        check_export_dir(export_dir, overwrite)
        old_dir = None
        if os.path.isdir(export_dir) and os.listdir(export_dir):
            old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.old-", dir=parent)
            os.replace(export_dir, os.path.join(old_dir, "export"))
        elif os.path.isdir(export_dir):
            os.rmdir(export_dir)
        os.replace(tmp_dir, export_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return export_dir


def check_export_dir(export_dir, overwrite=False):
    """Raise FileExistsError if export_dir is a file, or a non-empty folder and not overwrite."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise FileExistsError(f"{export_dir!r} exists and is not a folder; choose another "
                              "export_dir")
    if not overwrite and os.path.isdir(export_dir) and os.listdir(export_dir):
        raise FileExistsError(f"{export_dir!r} exists and is not empty; refusing to overwrite "
                              "it: pass overwrite=True (--overwrite) or export to a new version "
                              "folder (--version)")


def describe_signatures(export_dir):
    """{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}} read from saved_model.pb
    (what TF Serving sees; shape None for unknown rank, -1 for unknown sizes)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())

    def spec(info):
        dtype = tf.dtypes.as_dtype(info.dtype).name
        if info.tensor_shape.unknown_rank:
            return dtype, None
        return dtype, [d.size for d in info.tensor_shape.dim]

    out = {}
    for name, sig in proto.meta_graphs[0].signature_def.items():
        if name.startswith("__"):  # __saved_model_init_op (asset initialisation), not served.
            continue
        out[name] = {"inputs": {k: spec(v) for k, v in sorted(sig.inputs.items())},
                     "outputs": {k: spec(v) for k, v in sorted(sig.outputs.items())}}
    return out


class ServedSampler:
    """A loaded SavedModel with the interface of the in-package sampler (see load_savedmodel)."""

    def __init__(self, path):
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            versions = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else [])
                              if os.path.isfile(os.path.join(path, d, "saved_model.pb")))
            hint = (f"; it holds the versions {versions}: pass one of them, e.g. "
                    f"{os.path.join(path, versions[-1])!r}" if versions else
                    "; export one with smlm_tfdiff.serving.export_savedmodel or "
                    "export/export_savedmodel.py")
            raise FileNotFoundError(f"no SavedModel at {path!r} (no saved_model.pb){hint}")
        self.path = path
        self.loaded = tf.saved_model.load(path)
        sim_dict = json.loads(self.loaded.sim_config_json.numpy().decode())
        self.sim_config = SimulationConfig.from_dict(sim_dict)
        self.detection = DetectionConfig.from_legacy(sim_dict)
        self.psi_config_json = self.loaded.psi_config_json.numpy().decode()
        self.diffusion_json = self.loaded.diffusion_json.numpy().decode()
        diffusion = json.loads(self.diffusion_json)
        self.recipe = Recipe.from_dict(diffusion)  # The export-only keys are read below.
        self.schedule = self.recipe.schedule
        self.method = self.recipe.method
        self.t_start = self.recipe.t_start
        self.num_steps = self.recipe.num_steps  # Default per request.
        # frames x samples per request; None for exports made before the limit existed.
        self.max_images = diffusion.get("max_images_per_request")

    def estimate(self, frames):
        """frames [B, H, W, 1] (or [B, H, W], [H, W]) ADU -> y_hat [B, 4H, 4W, 1] float32."""
        out = self.loaded.signatures["estimate"](frames=tf.constant(_as_batch(frames)))
        return out["kde_estimate"].numpy()

    def posterior(self, frames, num_samples=100, num_steps=None, seed=0, return_samples=False):
        """Like PosteriorSampler.__call__ with the exported method and t_start: dict of NumPy
        y_hat, mean, std [B, 4H, 4W, 1] (KDE units, std ddof 0), samples [B, S, 4H, 4W, 1] if
        return_samples, nfe_per_frame and steps. num_steps: default the export's (diffusion.json).
        seed: int or [2] int32."""
        num_steps = self.num_steps if num_steps is None else int(num_steps)
        signature = "sample" if return_samples else "serving_default"
        out = self.loaded.signatures[signature](
            frames=tf.constant(_as_batch(frames)),
            num_samples=tf.constant(int(num_samples), tf.int32),
            num_steps=tf.constant(num_steps, tf.int32),
            seed=seeds_lib.as_seed(seed))
        result = {"y_hat": out["kde_estimate"].numpy(), "mean": out["posterior_mean"].numpy(),
                  "std": out["posterior_std"].numpy(),
                  "nfe_per_frame": num_steps * int(num_samples),
                  "steps": self.schedule.timesteps_for(num_steps, self.t_start)}
        if return_samples:
            result["samples"] = out["samples"].numpy()
        return result


def _as_batch(frames):
    """[H, W] or [B, H, W] -> [B, H, W, 1] float32; other ranks pass to the in-graph check."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 2:
        return frames[None, :, :, None]
    if frames.ndim == 3:
        return frames[..., None]
    return frames


def load_savedmodel(path):
    """A SavedModel written by export_savedmodel -> ServedSampler with .sim_config
    (SimulationConfig), .psi_config_json, .estimate(frames) and .posterior(frames, num_samples,
    num_steps, seed, return_samples). FileNotFoundError if path has no saved_model.pb."""
    return ServedSampler(path)
