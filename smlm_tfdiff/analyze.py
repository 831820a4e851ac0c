"""`smlm-tfdiff`: TIFF stacks -> localizations with posterior uncertainty, maps and pictures.

    smlm-tfdiff --input movie.tif --out results --offset_adu 100 --gain_adu_per_photon 1 \\
        --readout_noise_adu 2.24 --pixel_size_nm 108.3

Per stack (written to <out>/<stack name>/, all at once when the stack is done; stacks with the same
name get their parent folders' names in front; existing results are refused unless --overwrite,
which replaces the folder whole; a killed run resumes from its last checkpoint, docs/analyze.md):
  <name>.csv            ThunderSTORM localizations (frames 1-based, nm, photons, uncertainty_xy
                        = the posterior std of the localization, from psi's samples)
  <name>_locs.hdf5/.yaml  Picasso localizations (--picasso)
  <name>_kde_estimate.tif, _posterior_mean.tif, _posterior_std.tif   float32 HR stacks (--maps)
  <name>_super_resolution.png   sum over frames of the posterior mean (HR grid)
  <name>_uncertainty.png        std of that sum (sqrt of the summed per-pixel posterior variances)
  <name>_summary.json           settings, counts, timing

The model is the bundled whole-field `wholefield_fast` (DEFAULT_MODEL) unless --model names
another (`paper`: the seeds' models, for their reproduction). Frames are converted to photons with
the camera settings given here, then to the ADU of the camera the model was trained for. For a
model trained on a central region (the paper preset's disc), frames of any size are padded with
background and cut into training-size tiles that overlap so
that every pixel lies in the region the model was trained on (for the paper preset: within 7 px of
a tile centre in x and y; 4 tiles for a 20x20 frame), and stitched without seams
(smlm_tfdiff.io.tiling). A whole-field model (trained on emitters anywhere in its frame) gets
each frame whole through phi, and psi samples windows cut from phi's estimate, overlapping by
WINDOW_OVERLAP px: per frame, of psi's training size or of its smallest size (MIN_WINDOW px),
whichever samples fewer pixels for that frame's localizations (--window_px fixes one).

psi works where the emitters are: localizations are found in phi's estimate first, and psi is
sampled only in the tiles (windows) that hold one, each localization's tile being the one whose
centre is nearest (it takes its uncertainty from there). Elsewhere the posterior maps hold phi's
estimate with zero std, and a frame without localizations costs no sampling (--sample_windows all
samples every tile, as --localize_on mean must).
"""

import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from typing import Optional

import numpy as np

from smlm_tfdiff.io import stacks as stack_io
from smlm_tfdiff.io.brightness import MIN_SPOTS
from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.io.stacks import StackError
from smlm_tfdiff.io.tiling import TileGrid, coverage_tiling
from smlm_tfdiff.localization.batched import detect_batch, localization_uncertainty_batched
from smlm_tfdiff.localization.config import IN_SAMPLES
from smlm_tfdiff.localization.refit import localization_uncertainty_refit
from smlm_tfdiff.uncertainty.scale import pixel_factor_map

# The model `smlm-tfdiff` analyzes with unless --model names another: whole-field phi and psi,
# any frame size in one pass, psi only around the localizations (docs/analyze.md; its MODEL.md).
DEFAULT_MODEL = "wholefield_fast"


@dataclasses.dataclass
class Camera:
    """Camera settings of the data, in physical units. gain: ADU per detected photon."""

    offset_adu: float
    gain_adu_per_photon: float
    readout_noise_adu: Optional[float] = None  # rms, ADU.
    pixel_size_nm: Optional[float] = None  # Back-projected camera pixel (default: the model's).

    def __post_init__(self):
        for name in ("offset_adu", "gain_adu_per_photon", "readout_noise_adu", "pixel_size_nm"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise ValueError(f"camera {name} must be a finite number (got {value})")
        if self.gain_adu_per_photon <= 0:
            raise ValueError(f"gain_adu_per_photon must be > 0 (got {self.gain_adu_per_photon}); "
                             "for e-/ADU conversion factors use gain = em_gain / electrons_per_adu")
        if self.readout_noise_adu is not None and self.readout_noise_adu < 0:
            raise ValueError(f"readout_noise_adu must be >= 0 (got {self.readout_noise_adu})")
        if self.pixel_size_nm is not None and self.pixel_size_nm <= 0:
            raise ValueError(f"pixel_size_nm must be > 0 (got {self.pixel_size_nm})")

    @classmethod
    def from_electrons(cls, offset_adu, electrons_per_adu, em_gain=1.0, **kwargs):
        """From a conversion factor in e-/ADU (and EM gain): gain = em_gain / electrons_per_adu."""
        if electrons_per_adu <= 0 or em_gain <= 0:
            raise ValueError(f"electrons_per_adu and em_gain must be > 0 (got {electrons_per_adu}, "
                             f"{em_gain})")
        return cls(offset_adu, em_gain / electrons_per_adu, **kwargs)


def _sweeps(recipe):
    """The restart sweeps of a diffusion.Recipe as analyze records them (summary, resume key)."""
    return {"restart_t": recipe.restart_t, "restarts": recipe.restarts}


class KerasBackend:
    """phi and psi in this process (pretrained() or load_models(run_dir)), sampled with the
    models' recipe (diffusion.Recipe) with method and restart sweeps as given (None: the
    recipe's). jit_compile: psi's reverse loop compiled with XLA (PosteriorSampler), once per
    window count: on 2 CPU cores 5-9 s per count, then calls 2-17% faster than without XLA, whose
    loop is traced once (~4 s) for every count; without XLA the samples differ at float32
    round-off."""

    def __init__(self, models, method=None, restart_t=None, restarts=None, jit_compile=True):
        from smlm_tfdiff.diffusion.sampler import PosteriorSampler

        self.config = models.config
        self.detection = models.detection
        self.source = models.source
        self._phi = models.phi
        self._phi_config = models.phi_config
        self._estimate = None
        # phi reads frames scaled to this many photons per emitter (PhiConfig), or None.
        self.brightness_reference = getattr(models.phi_config, "brightness_reference", None)
        # phi is also told the spread of the emitters' photons about N0 (PhiConfig).
        self.spread_input = bool(getattr(models.phi_config, "spread_input", False))
        self.frame_condition = False  # psi sees the camera frame beside phi's estimate.
        self.jit_compile = bool(jit_compile)
        self.uncertainty_scale = self.pixel_scale = None
        if models.psi is None:  # phi only: the KDE estimate, no posterior (num_samples 0).
            self.sampling = self._sampler = self.method = self.window = self.window_factor = None
            self.max_images = None
            self.num_steps, self.num_samples, self.recipe = None, None, {}
            return
        changes = {} if method is None else {"method": method}
        if restart_t is not None:
            # Restart sweeps: the calibrated recipe of the paper_wide model (docs/calibration.md,
            # "A 4x psi trained on a GPU"); off in the bundled recipes.
            changes.update(restart_t=int(restart_t), restarts=restarts)
        # The recipe every posterior uses; Recipe checks restart_t and restarts.
        self.sampling = models.recipe.replace(**changes)
        self._sampler = PosteriorSampler(models, jit_compile=self.jit_compile,
                                         recipe=self.sampling)
        self.method = self.sampling.method
        self.num_steps = self.sampling.num_steps  # The defaults.
        self.num_samples = self.sampling.num_samples or DEFAULT_NUM_SAMPLES
        self.recipe = _sweeps(self.sampling)
        # psi's own window (camera px): the frame size, or crop, it was trained on; the posterior
        # of a whole-field model is sampled in windows of this size (posterior_windows).
        self.window = models.psi_config.image_size // models.config.upsample
        self.window_factor = models.psi_config.downsample_factor  # HR px a window side divides.
        self.max_images = self._sampler.max_images  # Windows x samples per compiled call.
        self.frame_condition = models.psi_config.frame_condition
        # The calibration scale was fitted for the models' own recipe: not for other methods or
        # restart sweeps (StackAnalyzer also requires the recipe's num_steps).
        self.uncertainty_scale = (models.uncertainty_scale if self.sampling == models.recipe
                                  else None)
        self.pixel_scale = models.pixel_scale if self.sampling == models.recipe else None

    @property
    def sampler(self):
        """The PosteriorSampler behind `posterior` (other recipes on the same compiled psi)."""
        return self._sampler

    @property
    def has_posterior(self):
        return self._sampler is not None

    def estimate(self, frames, photons=None, spread=None):
        """phi's KDE estimate of frames [B, H, W, 1] ADU -> [B, uH, uW, 1] float32.

        photons: the movie's typical photons per emitter (N0), which a brightness-normalised phi
        (brightness_reference) needs and other phis ignore. spread: the log-sd of the emitters'
        photons about N0, which a phi told it (spread_input) needs and other phis ignore."""
        import tensorflow as tf

        if self.brightness_reference is not None:
            if photons is None or not (np.isfinite(photons) and photons > 0):
                raise ValueError(
                    f"the phi of {self.source} reads frames scaled by the movie's photons per "
                    f"emitter (N0); pass photons > 0 (got {photons!r}): analyze estimates it "
                    "from the movie, or takes it from --photons")
            if self.spread_input and (spread is None or not (np.isfinite(spread)
                                                             and spread >= 0)):
                raise ValueError(
                    f"the phi of {self.source} is told the spread of the emitters' photons "
                    f"about N0 (a log-sd); pass spread >= 0 (got {spread!r}): analyze "
                    "measures it on the movie, or takes it from --photon_spread")
            from smlm_tfdiff.models.phi import phi_input

            offset = _scalar(self.config.offset, "offset")
            frames = phi_input(np.asarray(frames, np.float32), offset, self._phi_config,
                               float(photons), None if spread is None else float(spread))
        if self._estimate is None:
            # One graph for all frame sizes: phi's estimate of a frame does not depend on the
            # sizes analyzed before it in the same process (models.shape_free).
            from smlm_tfdiff.models.shape_free import shape_free

            self._estimate = shape_free(tf.function(lambda x: self._phi(x, training=False)))
        frames = np.asarray(frames, np.float32)
        # Bounded memory: phi's HR activations of a call hold ~ESTIMATE_PIXELS pixels per channel.
        u = self.config.upsample
        chunk = max(1, ESTIMATE_PIXELS // (u * u * frames.shape[1] * frames.shape[2]))
        return np.concatenate([self._estimate(tf.constant(frames[i:i + chunk])).numpy()
                               for i in range(0, len(frames), chunk)])

    def posterior(self, frames, num_samples, num_steps, seed):
        return self._sampler(frames, num_samples, num_steps, seed=seed, return_samples=True)

    def posterior_windows(self, y_hat, num_samples, num_steps, seed, frames=None):
        """psi's posterior for windows [n, uh, uw, 1] of phi's estimate of whole frames; frames:
        the same windows of the frames [n, h, w, 1] (model ADU), for a frame-conditioned psi."""
        return self._sampler(frames, num_samples, num_steps, seed=seed, return_samples=True,
                             y_hat=y_hat)


class SavedModelBackend:
    """A SavedModel written by export/export_savedmodel.py (its method and t_start)."""

    def __init__(self, path):
        from smlm_tfdiff.serving import load_savedmodel

        self._served = load_savedmodel(path)
        self.config = self._served.sim_config
        self.detection = self._served.detection
        self.source = str(path)
        self.sampling = self._served.recipe  # Fixed at export, without restart sweeps.
        self.num_steps = self.sampling.num_steps  # The export's defaults.
        self.num_samples = self.sampling.num_samples or DEFAULT_NUM_SAMPLES
        self.recipe = _sweeps(self.sampling)

    has_posterior = True
    jit_compile = False  # The export's graph runs as written (serving.py).
    window = None  # The export's posterior takes frames: a whole-field model sees them whole.
    uncertainty_scale = None  # Not part of an export: its posterior std is reported unscaled.
    pixel_scale = None  # Nor the scale of its std maps.
    frame_condition = False  # Its psi, if conditioned on the frame, gets it from the request.
    brightness_reference = None  # Exports take frames as they are.
    spread_input = False  # An export of a phi told the spread has it built in.

    @property
    def max_images(self):
        """Frames x samples per request (posterior's chunks)."""
        return min(512, self._served.max_images or 512)

    def estimate(self, frames, photons=None, spread=None):
        """phi's KDE estimate (the export's `estimate` signature; an export of a
        brightness-normalised phi has its photons per emitter, and spread, built in, so photons
        and spread are unused)."""
        return self._served.estimate(frames)

    def posterior(self, frames, num_samples, num_steps, seed):
        out = {}
        limit = self._served.max_images  # frames x samples per request (None: older exports).
        if limit is not None and num_samples > limit:
            raise ValueError(f"num_samples {num_samples} is above the SavedModel's limit of "
                             f"{limit} frames x samples per request (set at export with "
                             "--max_images): ask for fewer samples or re-export")
        # Bounds the graph's memory, as PosteriorSampler does.
        chunk = max(1, self.max_images // num_samples)
        for lo in range(0, len(frames), chunk):
            # The first chunk's samples equal the in-package sampler's for the same seed.
            part = self._served.posterior(frames[lo:lo + chunk], num_samples, num_steps,
                                          seed=seed if lo == 0 else _fold(seed, lo),
                                          return_samples=True)
            for key in ("y_hat", "mean", "std", "samples"):
                out.setdefault(key, []).append(part[key])
        return {k: np.concatenate(v) for k, v in out.items()}


def _fold(seed, data):
    from smlm_tfdiff import seeds

    return seeds.fold_in(seed, data).numpy()


def load_backend(model=DEFAULT_MODEL, method=None, restart_t=None, restarts=None, need_psi=True,
                 jit_compile=True):
    """A bundled model's name (default DEFAULT_MODEL), a SavedModel folder (or its base folder of
    versions), or a model / training-run folder with phi and psi. method, restart_t, restarts:
    change the models' recipe (None: keep it; restarts default 1 with restart_t) for the
    in-package sampler (not for a SavedModel, whose recipe is fixed at export). need_psi=False also accepts a folder with phi
    only (for the phi-only analysis, num_samples 0). jit_compile: KerasBackend's."""
    from smlm_tfdiff.pretrained import available, load_models, pretrained

    if model in available():
        models = pretrained(model)
    else:
        if not os.path.isdir(model):
            raise FileNotFoundError(
                f"model {model!r} is neither a bundled model ({available()}) nor a "
                "folder; pass a bundled model's name (e.g. --model wholefield_fast), a SavedModel "
                "folder or a training-run folder")
        versions = sorted((d for d in os.listdir(model) if d.isdigit()
                           and os.path.exists(os.path.join(model, d, "saved_model.pb"))), key=int)
        saved = (model if os.path.exists(os.path.join(model, "saved_model.pb"))
                 else os.path.join(model, versions[-1]) if versions else None)
        if saved is not None:
            if restart_t is not None:
                raise ValueError(f"{model} is a SavedModel, whose sampler recipe is fixed at "
                                 "export: drop --restart_t, or analyze with the model folder")
            return SavedModelBackend(saved)
        models = load_models(model)
    if models.psi is None and need_psi:  # A phi-only folder (e.g. the MC-dropout baseline).
        raise FileNotFoundError(f"{model} holds phi but no trained psi; analyze needs both "
                                "(--model paper, or train psi with trainers/train_psi.py --phi "
                                + model + "), or --num_samples 0 for phi's localizations with "
                                "the CRLB as their uncertainty")
    return KerasBackend(models, method, restart_t, restarts, jit_compile)


def _crlb_nm(xy, intensity, background, config):
    """sqrt of the isolated-emitter CRLB (N0 unknown) at the fitted photometry, nm, per axis
    [M, 2]; NaN where the photometry failed. A physics reference beside the posterior uncertainty
    (and the uncertainty itself without psi, num_samples 0).

    xy: [M, 2] LR px in the frame of `config`; intensity, background: [M] photons (per pixel for
    the background). One batched Fisher-information call for all M."""
    from smlm_tfdiff.simulation.physics.fisher import crlb

    out = np.full((len(xy), 2), np.nan)
    ok = np.isfinite(intensity) & (intensity > 0) & np.isfinite(background)
    inside = ((xy[:, 0] >= 0) & (xy[:, 0] < config.frame_width) & (xy[:, 1] >= 0)
              & (xy[:, 1] < config.frame_height))
    ok &= inside
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    xy = xy[idx]
    h, w = config.frame_height, config.frame_width
    local = all(np.ndim(getattr(config, f)) == 0 for f in ("background", "readout_var", "gain",
                                                           "offset"))
    if local and max(h, w) > 2 * CRLB_HALF_WINDOW:
        # The Fisher information of a PSF of ~1 px is all within a few px of the emitter: a
        # window of 2 CRLB_HALF_WINDOW px around each one, slid inside the frame so that the
        # frame's edge cuts it where it cuts the PSF, gives the frame's bound (to ~1e-12) at a
        # fraction of the cost (a 256x256 frame: 256x fewer pixels per localization).
        size_h, size_w = min(h, 2 * CRLB_HALF_WINDOW), min(w, 2 * CRLB_HALF_WINDOW)
        origin = np.floor(xy) - CRLB_HALF_WINDOW + 1
        origin[:, 0] = np.clip(origin[:, 0], 0, w - size_w)
        origin[:, 1] = np.clip(origin[:, 1], 0, h - size_h)
        xy = xy - origin
        config = config.replace(frame_height=size_h, frame_width=size_w)
    # Each position's Fisher information is a sum over its frame: chunks bound memory.
    chunk = max(1, CRLB_PIXELS // (config.frame_height * config.frame_width))
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk]
        bound = crlb(xy[lo:lo + chunk], config, photons=intensity[part], estimate_photons=True,
                     background=np.maximum(background[part], 0.0))
        out[part] = bound[:, :2] * config.pixel_size_nm
    return out


def _xy_average(std):
    """[M, 2] per-axis std -> [M], sqrt of the mean variance (uncertainty_xy, crlb_xy)."""
    return np.sqrt(np.mean(np.asarray(std) ** 2, axis=1))


def background_widening(xy, intensity, background, config, crlb_xy_nm=None):
    """[M] how much the fitted background widens each localization's CRLB: crlb_xy at its
    photometry (intensity, background >= 0) over crlb_xy at the same intensity without
    background, >= 1; 1 where the photometry failed. The background feature of a calibration
    scale (uncertainty.scale). crlb_xy_nm: [M] the crlb_xy column at the background, if already
    at hand (analyze's table, or its CSV), else computed here.

    xy: [M, 2] LR px in the frame of `config`; intensity, background: [M] photons (per pixel for
    the background)."""
    xy = np.asarray(xy, np.float64).reshape((-1, 2))
    intensity = np.asarray(intensity, np.float64).reshape(-1)
    background = np.asarray(background, np.float64).reshape(-1)
    if crlb_xy_nm is None:
        crlb_xy_nm = _xy_average(_crlb_nm(xy, intensity, background, config))
    free = _crlb_nm(xy, intensity, np.zeros_like(background), config)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(crlb_xy_nm, np.float64).reshape(-1) / _xy_average(free)
    return np.where(np.isfinite(ratio), np.maximum(ratio, 1.0), 1.0)


MIN_FRAME = 4  # Camera pixels, each side.
# Posterior samples per frame when neither the caller nor the model's recipe (diffusion.json's
# num_samples) says otherwise.
DEFAULT_NUM_SAMPLES = 16
# Camera px: the smallest posterior window (--window_px). With the overlap of 4 px every
# localization sampled in it lies 2-3 px inside it (psi's context), 2-4 px in one of 8 px.
MIN_WINDOW = 6
# Overlap of a whole-field model's posterior windows, camera px: a localization is sampled in the
# window whose centre is nearest, so it lies >= 2 px inside it (psi's context) unless at the frame
# edge.
WINDOW_OVERLAP = 4
CRLB_PIXELS = 2 ** 22  # Frame pixels x positions per CRLB call (_crlb_nm; memory bound).
CRLB_HALF_WINDOW = 8  # px: _crlb_nm sums each localization's Fisher information over 16x16 px.
ESTIMATE_PIXELS = 2 ** 21  # HR pixels per phi call in KerasBackend.estimate (memory bound).
# Where psi is sampled: "localized", the windows (tiles) that hold a localization, each
# localization's nearest-centre one; "all", every window (the path before; localize_on "mean").
SAMPLE_WINDOWS = ("localized", "all")
_WINDOW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # StackAnalyzer._posterior.
CHECKPOINT_SECONDS = 10.0  # At most one resume checkpoint per this many seconds (StackAnalyzer).

# Camera sanity (check_camera): margins beyond which the settings are called wrong.
OFFSET_MARGIN_PHOTONS = 3.0  # Offset above the frames' median pixel by more than this.
NOISE_VAR_FACTOR = 4.0  # Observed vs predicted background noise variance (2x in std).
BRIGHTNESS_FACTOR = 10.0  # Brightest spots vs the model's emitters, either way.
BACKGROUND_MARGIN_PHOTONS = 20.0  # Background above the model's by more than this (per pixel).
CHECK_FRAMES = 32  # Frames read at the start for the check.
BRIGHTNESS_FRAMES = 16  # Frames, spread over a stack, its photons per emitter are measured on.
# The spread (log-sd of the emitters' photons about N0) a phi told it reads while the spread is
# measured, and where too few isolated spots measure it: the spread the whole-field phis were
# trained at before (models/phi.py, PhiConfig.spread_input), at which phi rarely splits a bright
# emitter, so that the isolated spots are single emitters.
MEASURE_SPREAD = 0.4


def spread_read(info):
    """The spread a phi told it reads after measure_emitter_photons: info's "spread", or
    MEASURE_SPREAD where too few isolated spots measured it (NaN); None for other phis."""
    spread = info.get("spread")
    if spread is None:
        return None
    return float(spread) if np.isfinite(spread) else MEASURE_SPREAD


def measure_emitter_photons(backend, model_frames, config, n0=None):
    """The photons per emitter (N0) of frames for the backend's brightness-normalised phi
    (io.brightness): phi on each frame, normalised by the current estimate, and the
    model's detection give the spots. model_frames [N, H, W] model ADU, config the model's
    SimulationConfig at the frames' size. Returns (n0, info) as estimate_emitter_photons; n0
    given: that N0, not measured (info {"source": "given"}).

    For a phi told the spread of the emitters' photons (spread_input), info also holds "spread"
    (a log-sd) measured on the isolated spots phi finds told MEASURE_SPREAD
    (io.brightness.estimate_emitter_spread; NaN where too few, "spread_spots" their count)."""
    from smlm_tfdiff.io.brightness import estimate_emitter_photons, estimate_emitter_spread

    gain = _scalar(config.gain, "gain")
    photons = (model_frames - _scalar(config.offset, "offset")) / gain

    def localize(n0):  # One frame per call, as analyze runs phi.
        kde = np.concatenate([backend.estimate(f[None, ..., None], n0, MEASURE_SPREAD)[..., 0]
                              for f in model_frames])
        # Without splitting merged blobs or adding from residuals (most of detection's time on
        # crowded frames): only isolated spots are measured, and a merged pair is rarely one.
        return detect_batch(kde, config, backend.detection, deblend=False)

    if n0 is None:
        n0, info = estimate_emitter_photons(photons, localize, float(config.psf_sigma),
                                            fallback=backend.brightness_reference)
    else:
        n0, info = float(n0), {"source": "given"}
    if getattr(backend, "spread_input", False):
        spread, spots = estimate_emitter_spread(
            photons, localize(n0), float(config.psf_sigma),
            _scalar(config.readout_var, "readout_var") / gain ** 2)
        info = dict(info, spread=spread, spread_spots=spots)
    return n0, info


def check_camera(frames, camera: Camera, config):
    """Camera settings against the frames themselves -> (warnings, estimates).

    frames: [n, H, W] ADU (a few dozen frames suffice). Most pixels of SMLM frames are background,
    x = offset + gain * Poisson(b) + readout noise, so
      - the median pixel is >= the offset: an offset above it by more than OFFSET_MARGIN_PHOTONS
        photons is wrong (a negative background);
      - the background level m and its noise var come from the lower tail of the pixel values
        (where emitters do not reach); the likely offset is m minus the photon-noise part of var,
        (var - readout_var) / gain;
      - var must be about gain * (m - offset) + readout_var: off by more than NOISE_VAR_FACTOR
        either way, the gain (or the offset) is wrong; the likely gain solves that equation for gain
        (readout noise: --readout_noise_adu, else the model's in photons);
      - the brightest spots, in photons, must be within BRIGHTNESS_FACTOR of the model's emitters'
        peak pixel, and the background within BACKGROUND_MARGIN_PHOTONS of the model's.
    Nothing here changes the analysis; the caller shows the warnings."""
    from scipy.special import erf

    frames = np.asarray(frames, np.float64)
    g, o = camera.gain_adu_per_photon, camera.offset_adu
    model_gain = _scalar(config.gain, "gain")
    if camera.readout_noise_adu is not None:
        read_var, read_text = camera.readout_noise_adu ** 2, "--readout_noise_adu"
        read_photons_var = None
    else:  # The model's readout noise in photons, in this camera's ADU at the given gain.
        read_photons_var = _scalar(config.readout_var, "readout_var") / model_gain ** 2
        read_var = read_photons_var * g ** 2
        read_text = (f"the model's readout noise {np.sqrt(read_photons_var):.2f} photons rms, "
                     "as no --readout_noise_adu was given")
    median = float(np.median(frames))
    # The background level and noise from the lower tail of the pixel values, which emitters
    # (adding light) do not reach: for N(level, sd), the 2.28 % and 15.87 % quantiles are
    # level - 2 sd and level - sd. Integer ADU are dithered first (then 1/12 ADU^2 less).
    values = frames.reshape(-1)
    integer = np.all(values == np.round(values))
    if integer:
        values = values + np.random.default_rng(0).uniform(-0.5, 0.5, values.shape)
    q2, q16 = np.quantile(values, [0.02275, 0.158655])
    sd = float(q16 - q2)
    median_bg = float(q16 + sd)  # The background level.
    var = max(sd ** 2 - (1.0 / 12.0 if integer else 0.0), 1.0 / 12.0)
    background = (median_bg - o) / g
    photon_var = max(var - read_var, 0.0)
    likely_offset = median_bg - photon_var / g
    # gain from var = gain * (m - o) + readout (readout fixed in ADU, or in photons: quadratic).
    level = median_bg - o
    if read_photons_var is None:
        likely_gain = (var - read_var) / level if level > 0 and var > read_var else None
    else:
        r2 = read_photons_var
        likely_gain = (-level + np.sqrt(level ** 2 + 4 * r2 * var)) / (2 * r2) if r2 > 0 else None
    predicted_var = g * max(level, 0.0) + read_var
    peak = float(np.median(frames.reshape(len(frames), -1).max(axis=1)) - median_bg) / g
    s = config.psf_sigma
    centre = erf(0.5 / (np.sqrt(2) * s)) ** 2  # Share of the photons in an emitter's pixel.
    lo_ph, hi_ph = config.photons_range or (config.photons, config.photons)
    # The model's training background, photons per pixel: its per-frame range where it has one.
    bg_range = getattr(config, "background_range", None)
    model_bg = float(max(bg_range)) if bg_range else float(np.mean(config.background))
    model_bg_text = (f"{min(bg_range):g}-{max(bg_range):g}" if bg_range else f"{model_bg:g}")
    estimates = {"median_adu": round(median, 3), "background_level_adu": round(median_bg, 3),
                 "noise_var_adu2": round(var, 3),
                 "predicted_noise_var_adu2": round(predicted_var, 3),
                 "background_photons": round(background, 3),
                 "likely_offset_adu": round(likely_offset, 2),
                 "likely_gain_adu_per_photon": (None if likely_gain is None
                                                else round(float(likely_gain), 4)),
                 "peak_photons": round(peak, 2)}
    out = []
    if o - median > OFFSET_MARGIN_PHOTONS * g:
        out.append(f"--offset_adu {o:g} lies {o - median:.1f} ADU above the frames' median pixel "
                   f"{median:.1f} ADU, but the offset is the camera's dark level, below nearly "
                   f"every background pixel: the likely offset is about {likely_offset:.0f} ADU "
                   f"(the background level minus its photon noise); check the camera's baseline "
                   f"(margin {OFFSET_MARGIN_PHOTONS:g} photons)")
    elif not 1 / NOISE_VAR_FACTOR <= var / predicted_var <= NOISE_VAR_FACTOR:
        gain_text = ("" if likely_gain is None or likely_gain <= 0 else
                     f"the likely gain is about {likely_gain:.3g} ADU/photon with this offset")
        offset_text = (f"the likely offset is about {likely_offset:.0f} ADU with this gain"
                       if var < predicted_var and level > 0 else "")
        likely = " or ".join(t for t in (gain_text, offset_text) if t) or "check both"
        out.append(f"the frames' background noise (variance {var:.3g} ADU^2) does not fit "
                   f"--gain_adu_per_photon {g:g} and --offset_adu {o:g}, which predict "
                   f"{predicted_var:.3g} ADU^2 ({read_text}): {likely} (margin: a factor "
                   f"{NOISE_VAR_FACTOR:g} in variance)")
    if background > model_bg + BACKGROUND_MARGIN_PHOTONS:
        out.append(f"the background is about {background:.1f} photons per pixel with these "
                   f"settings, far above the model's training range ({model_bg_text}): if the "
                   f"offset is right, retrain phi and psi for this background; else the offset "
                   f"is about {likely_offset:.0f} ADU")
    model_peak = (centre * lo_ph, centre * hi_ph)
    model_text = (f"{model_peak[0]:.3g}" if lo_ph == hi_ph else
                  f"{model_peak[0]:.3g}-{model_peak[1]:.3g}")
    photons_text = f"{lo_ph:g}" if lo_ph == hi_ph else f"{lo_ph:g}-{hi_ph:g}"
    if peak < model_peak[0] / BRIGHTNESS_FACTOR or peak > model_peak[1] * BRIGHTNESS_FACTOR:
        out.append(f"the brightest spots are about {peak:.3g} photons per pixel with these "
                   f"settings, far outside the model's emitters ({model_text} at the peak pixel "
                   f"for {photons_text} photons, margin a factor {BRIGHTNESS_FACTOR:g}): "
                   "check --gain_adu_per_photon"
                   + (f" (the frames' noise says about {likely_gain:.3g})"
                      if likely_gain else "") + ", or the frames hold no emitters")
    return out, estimates


def _scalar(value, name):
    arr = np.asarray(value, np.float64)
    if arr.ndim:
        if np.ptp(arr) > 0:
            raise ValueError(f"the model was trained for a per-pixel camera {name} map; analyze "
                             "supports models trained with scalar camera values")
        arr = arr.reshape(-1)[0]
    return float(arr)


def _window_step(backend):
    """Camera px between the window sides psi can take: its down-sampling must divide the HR
    side (upsample x the camera side)."""
    factor, u = backend.window_factor, backend.config.upsample
    return factor // int(np.gcd(factor, u))


def _smallest_window(backend):
    """The smallest posterior window side >= MIN_WINDOW (camera px) that psi can take."""
    step = _window_step(backend)
    return min(backend.window, -(-MIN_WINDOW // step) * step)


def _window_px(window_px, backend):
    """The posterior window side (camera px) asked for, checked against psi's down-sampling."""
    window = int(window_px)
    u = backend.config.upsample
    factor = backend.window_factor
    step = _window_step(backend)
    if window != window_px or window < MIN_WINDOW or window % step:
        raise ValueError(f"window_px must be an integer >= {MIN_WINDOW} whose HR side "
                         f"(x{u}) psi's {factor}x down-sampling divides, i.e. a multiple of "
                         f"{step} px (got {window_px}); psi was trained on {backend.window} px")
    return window


class StackAnalyzer:
    """Runs one model over TIFF stacks. See the module docstring for the outputs."""

    def __init__(self, backend, camera: Camera, num_samples=None, num_steps=None, batch_frames=8,
                 overlap=None, seed=0, localize_on="kde_estimate", picasso=False, maps=True,
                 progress=True, overwrite=False, allow_partial=False, series=None,
                 sample_windows="localized", window_px=None, scale_uncertainty=True,
                 in_samples=None, photons=None, photon_spread=None):
        if num_samples is None:  # The model's (its recipe's), else DEFAULT_NUM_SAMPLES.
            num_samples = getattr(backend, "num_samples", None) or DEFAULT_NUM_SAMPLES
        if num_samples == 1 or num_samples < 0:
            raise ValueError(f"num_samples must be >= 2 to estimate a posterior std, or 0 for "
                             f"phi's localizations with the CRLB as uncertainty (got "
                             f"{num_samples})")
        if num_samples and not backend.has_posterior:
            raise ValueError(f"the model {backend.source} has no psi, so no posterior: pass "
                             "num_samples 0 (phi's localizations, the CRLB as uncertainty) or a "
                             "model with psi")
        if num_samples == 0:
            num_steps = None  # No sampling.
        else:
            num_steps = backend.num_steps if num_steps is None else num_steps
            if num_steps < 1:
                raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
        if batch_frames < 1:
            raise ValueError(f"batch_frames must be >= 1 (got {batch_frames})")
        if localize_on not in ("mean", "kde_estimate"):
            raise ValueError(f"localize_on must be 'mean' or 'kde_estimate' (got {localize_on!r})")
        if sample_windows not in SAMPLE_WINDOWS:
            raise ValueError(f"sample_windows must be one of {SAMPLE_WINDOWS} (got "
                             f"{sample_windows!r})")
        if localize_on == "mean" and num_samples == 0:
            raise ValueError("localize_on 'mean' needs psi's posterior mean: num_samples >= 2")
        self.backend = backend
        self.camera = camera
        self.model_config = backend.config
        self.num_samples = int(num_samples)
        self.num_steps = None if num_steps is None else int(num_steps)
        # Which uncertainty the tables hold: psi's posterior std, or without psi the CRLB.
        self.uncertainty = "posterior" if self.num_samples else "crlb"
        # How the localizations are found in each sample (DetectionConfig.in_samples): the
        # model's way unless asked otherwise.
        model_way = getattr(getattr(backend, "detection", None), "in_samples", "detect")
        self.in_samples = model_way if in_samples is None else in_samples
        if self.in_samples not in IN_SAMPLES:
            raise ValueError(f"in_samples must be one of {IN_SAMPLES} (got {in_samples!r})")
        # The model's calibration scale of psi's std (uncertainty.scale), where it has one and
        # the analysis is the one it was fitted for (the recipe's steps, phi's positions);
        # uncertainty_raw_xy keeps psi's own spread.
        fitted_for = (scale_uncertainty and self.num_samples
                      and self.num_steps == backend.num_steps and localize_on == "kde_estimate"
                      and self.in_samples == model_way)
        scale = getattr(backend, "uncertainty_scale", None)
        self.uncertainty_scale = scale if scale is not None and fitted_for else None
        # Likewise the scale of the per-pixel std maps (pixel_scale.json, fitted on per-pixel
        # coverage), applied per pixel from its nearest localization (pixel_factor_map).
        scale = getattr(backend, "pixel_scale", None)
        self.pixel_scale = scale if scale is not None and fitted_for else None
        self.batch_frames, self.seed = int(batch_frames), seed
        self.localize_on, self.picasso, self.maps, self.progress = (localize_on, picasso, maps,
                                                                    progress)
        # psi where the localizations are, or everywhere (localize_on "mean" needs the latter).
        self.sample_windows = "all" if localize_on == "mean" else sample_windows
        # Existing result folders are replaced only with overwrite; a truncated stack is analyzed
        # (its readable frames) only with allow_partial; series: TiffStack's choice of series.
        self.overwrite, self.allow_partial, self.series = overwrite, allow_partial, series
        # A killed run resumes from its last checkpoint, written after a finished batch when this
        # much time has passed since the previous one (OutputSet; the arrays can be large).
        self.checkpoint_seconds = CHECKPOINT_SECONDS
        cfg = self.model_config
        # A model trained on emitters anywhere in its frame, edges included, sees a frame of any
        # size whole; one trained on a central region (the paper preset's disc) sees tiles, padded
        # and overlapping so every pixel is near a tile centre (tiling module doc).
        self.whole_field = cfg.region == "frame" and cfg.margin <= 0
        # psi of a whole-field model is sampled in windows cut from phi's estimate of the whole
        # frame (in-package models; a SavedModel's posterior takes frames, so it sees them
        # whole); self.window is the largest window side, its training size by default.
        self.window = (getattr(backend, "window", None) if self.whole_field and self.num_samples
                       else None)
        if window_px is not None and self.num_samples:
            if not self.window:
                raise ValueError(
                    "window_px sizes psi's posterior windows, which only a whole-field model "
                    f"loaded in the package has ({backend.source} "
                    + ("is a SavedModel, whose posterior sees frames whole)"
                       if isinstance(backend, SavedModelBackend)
                       else "is sampled in its training tiles)") + "; leave window_px unset")
            self.window = _window_px(window_px, backend)
        # The window sides (camera px) each frame's grid is chosen from (_choose_grid): psi's
        # smallest window and its training window, unless window_px fixes one.
        self.windows = ()
        if self.window:
            self.windows = ((self.window,) if window_px is not None
                            else tuple(sorted({_smallest_window(backend), self.window})))
        if self.whole_field:
            self.pad = 0
            auto_overlap = WINDOW_OVERLAP if self.window else 0
        else:
            self.pad, auto_overlap = coverage_tiling(cfg)
        self.overlap = auto_overlap if overlap is None else int(overlap)
        if len(self.windows) > 1:  # A window must exceed the overlap (TileGrid).
            self.windows = tuple(w for w in self.windows if w > self.overlap) or self.windows[-1:]
        # Windows (tiles) per compiled sampler call, as the backend chunks them.
        self._per_call = (max(1, backend.max_images // self.num_samples) if self.num_samples
                          else 1)
        self.model_gain = _scalar(cfg.gain, "gain")
        self.model_offset = _scalar(cfg.offset, "offset")
        self.pixel_size_nm = float(camera.pixel_size_nm or cfg.pixel_size_nm)
        # The movie's photons per emitter, for a brightness-normalised phi: given, or estimated
        # from each stack (io.brightness) when None.
        if photons is not None and not (np.isfinite(photons) and photons > 0):
            raise ValueError(f"photons (per emitter, N0) must be > 0 (got {photons!r}); leave "
                             "it unset to estimate it from the movie")
        self.photons = None if photons is None else float(photons)
        # And the log-sd of the emitters' photons about N0, for a phi told it (spread_input):
        # given, or measured on each stack when None.
        if photon_spread is not None and not (np.isfinite(photon_spread) and photon_spread >= 0):
            raise ValueError(f"photon_spread (the log-sd of the emitters' photons about N0) must "
                             f"be >= 0 (got {photon_spread!r}); leave it unset to measure it on "
                             "the movie")
        self.photon_spread = None if photon_spread is None else float(photon_spread)
        self._n0 = self._spread = None  # The current stack's N0 and spread.
        self._warn_mismatch()

    def _warn_mismatch(self):
        cfg, cam = self.model_config, self.camera
        if cam.readout_noise_adu is not None:
            ours = cam.readout_noise_adu / cam.gain_adu_per_photon
            theirs = np.sqrt(_scalar(cfg.readout_var, "readout_var")) / self.model_gain
            if not 0.5 <= (ours + 1e-9) / (theirs + 1e-9) <= 2.0:
                warnings.warn(f"readout noise is {ours:.2f} photons rms here but the model was "
                              f"trained with {theirs:.2f}; retrain phi and psi for this camera "
                              "(trainers/train_phi.py, train_psi.py) for calibrated uncertainty")
        if abs(self.pixel_size_nm / cfg.pixel_size_nm - 1) > 0.1:
            warnings.warn(f"pixel size {self.pixel_size_nm} nm differs from the model's "
                          f"{cfg.pixel_size_nm} nm, so the PSF is {cfg.psf_sigma:.2f} px wide "
                          "only if the optics scale with it; retrain for these optics otherwise")

    # ------------------------------------------------------------------------------ frames
    def _to_model_adu(self, frames, first):
        """Validate a batch [b, H, W] (ADU of the data) and convert it to the model's ADU;
        also returns the photon frames."""
        bad = ~np.all(np.isfinite(frames), axis=(1, 2))
        if bad.any():
            raise StackError(f"frame {first + int(np.argmax(bad)) + 1} (1-based) contains NaN or "
                             "Inf values; remove or repair it before analysis")
        photons = (frames - self.camera.offset_adu) / self.camera.gain_adu_per_photon
        dark = np.all(photons < 0, axis=(1, 2))
        if dark.any():
            k = int(np.argmax(dark))
            raise StackError(
                f"frame {first + k + 1} (1-based) is below the camera offset everywhere (max "
                f"{frames[k].max():.1f} ADU < offset {self.camera.offset_adu} ADU): the offset "
                "is wrong; pass the camera's baseline with --offset_adu")
        return photons * self.model_gain + self.model_offset, photons

    # ------------------------------------------------------------------------------ stacks
    def analyze(self, path, out_dir):
        """One stack -> its output folder; returns the summary dict. out_dir must not hold files
        unless overwrite (then it is replaced whole); if anything fails it is left as it was."""
        name = stack_io.stack_name(path)
        start = time.perf_counter()
        stack_io.check_output_dir(out_dir, self.overwrite)  # Before any work.
        with stack_io.TiffStack(path, self.allow_partial, self.series) as stack, \
                stack_io.OutputSet(out_dir, self.overwrite, self._resume_key(stack)) as outputs:
            if outputs.discarded:
                warnings.warn(f"{path}: removed the files of an interrupted run with another "
                              f"input or other settings ({outputs.staging}); starting from "
                              "frame 1", stacklevel=2)
            if outputs.resumed is not None:
                warnings.warn(f"{path}: resuming an interrupted run from frame "
                              f"{outputs.resumed['frames_done'] + 1} of {stack.num_frames} "
                              f"({outputs.staging})", stacklevel=2)
            self._check_frame_size(stack)
            for note in stack.notes:
                warnings.warn(f"{path}: {note}", stacklevel=2)
            sample = stack.read(0, min(CHECK_FRAMES, stack.num_frames))
            camera_warnings, estimates = check_camera(sample, self.camera, self.model_config)
            for text in camera_warnings:
                warnings.warn(f"{path}: {text}", stacklevel=2)
            brightness = self._emitter_photons(stack)
            summary = self._run(stack, name, outputs)
            if brightness is not None:
                summary["emitter_photons"] = brightness
            summary["camera_check"] = {"estimates": estimates, "warnings": camera_warnings}
            summary["notes"] = list(stack.notes)
            if outputs.resumed is not None:
                summary["resumed_from_frame"] = outputs.resumed["frames_done"] + 1
            if stack.loss is not None:
                summary["input_loss"] = stack.loss
            if len(stack.series_frames) > 1:
                summary["series_frames"] = stack.series_frames
            summary["seconds"] = round(time.perf_counter() - start, 2)
            summary["frames_per_second"] = round(stack.num_frames / summary["seconds"], 3)
            with open(outputs.path(f"{name}_summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            summary["files"] = outputs.commit()
        return summary

    def _emitter_photons(self, stack):
        """Sets the stack's N0 for a brightness-normalised phi (None for other phis); returns
        what the summary records of it."""
        self._n0 = self._spread = None
        reference = getattr(self.backend, "brightness_reference", None)
        if reference is None:
            return None
        told_spread = getattr(self.backend, "spread_input", False)
        if self.photons is not None and (not told_spread or self.photon_spread is not None):
            self._n0, self._spread = self.photons, self.photon_spread
            return {"n0": self.photons, "source": "given",
                    **({"spread": self.photon_spread, "spread_source": "given"}
                       if told_spread else {})}
        start = time.perf_counter()
        # Frames spread over the movie; deterministic, so a resumed run finds the same N0.
        index = np.unique(np.linspace(0, stack.num_frames - 1,
                                      min(BRIGHTNESS_FRAMES, stack.num_frames)).astype(int))
        model_frames = np.concatenate([
            self._to_model_adu(stack.read(int(i), int(i) + 1), int(i))[0] for i in index])
        config = self.model_config.replace(frame_height=stack.height, frame_width=stack.width,
                                           pixel_size_nm=self.pixel_size_nm)
        self._n0, info = measure_emitter_photons(self.backend, model_frames, config,
                                                 self.photons)
        if info["source"] == "fallback":
            warnings.warn(f"{stack.path}: {info['reason']}, so the photons per emitter were not "
                          f"measured; phi reads the frames as {reference:g} photons per emitter. "
                          "Pass the dye's photons per frame with --photons", stacklevel=3)
        if told_spread:
            if self.photon_spread is not None:
                self._spread = self.photon_spread
                info.update(spread=self.photon_spread, spread_source="given")
            else:
                measured = np.isfinite(info["spread"])
                self._spread = spread_read(info)
                info.update(spread=self._spread,
                            spread_source="estimated" if measured else "fallback")
            if info["spread_source"] == "fallback":
                warnings.warn(f"{stack.path}: fewer than {MIN_SPOTS} isolated spots in "
                              f"{len(index)} frames, so the spread of the emitters' photons was "
                              f"not measured; phi reads it as {MEASURE_SPREAD:g} (a log-sd). "
                              "Pass the dye's with --photon_spread", stacklevel=3)
        return {"n0": round(self._n0, 2), "frames_used": int(len(index)), **info,
                "seconds": round(time.perf_counter() - start, 2)}

    def _resume_key(self, stack):
        """Fixes the input file (path, size, modification time) and every setting that changes
        the output: a killed run is resumed only by the same command on the same file."""
        import hashlib

        info = os.stat(stack.path)
        fields = {"input": os.path.realpath(stack.path), "size": info.st_size,
                  "mtime_ns": info.st_mtime_ns, "frames": stack.num_frames,
                  "camera": dataclasses.asdict(self.camera), "model": self.backend.source,
                  "num_samples": self.num_samples, "num_steps": self.num_steps,
                  "recipe": self.backend.recipe, "whole_field": self.whole_field,
                  "windows": list(self.windows), "sample_windows": self.sample_windows,
                  "batch_frames": self.batch_frames, "seed": self.seed, "overlap": self.overlap,
                  "localize_on": self.localize_on, "picasso": self.picasso, "maps": self.maps,
                  "in_samples": self.in_samples, "photons": self.photons,
                  "photon_spread": self.photon_spread,
                  "allow_partial": self.allow_partial, "series": self.series,
                  "pixel_size_nm": self.pixel_size_nm,
                  "method": getattr(self.backend, "method", None),
                  "jit_compile": self.backend.jit_compile,
                  "uncertainty_scale": (None if self.uncertainty_scale is None
                                        else dataclasses.asdict(self.uncertainty_scale)),
                  "pixel_scale": (None if self.pixel_scale is None
                                  else dataclasses.asdict(self.pixel_scale)),
                  "columns": stack_io.THUNDERSTORM_COLUMNS + stack_io.EXTRA_COLUMNS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def _check_frame_size(self, stack):
        if stack.height < MIN_FRAME or stack.width < MIN_FRAME:
            how = ("the whole-field model reads whole frames of any size from that up"
                   if self.whole_field else
                   f"the model works on {self.model_config.frame_height}x"
                   f"{self.model_config.frame_width} tiles, padded with background")
            raise StackError(f"{stack.path}: frames are {stack.height}x{stack.width} camera "
                             f"pixels; analyze needs at least {MIN_FRAME}x{MIN_FRAME} ({how}): "
                             "analyze the full camera frames rather than a crop this small")

    def _padded_count(self, n):
        """Windows sent to the sampler for n (repeats, dropped after): full calls of
        _per_call windows, the rest padded to one of _WINDOW_BUCKETS, so that the compiled sampler
        sees few shapes whatever the number of windows a frame needs."""
        per_call = self._per_call
        rest = n % per_call
        pad = next((k for k in _WINDOW_BUCKETS if k >= rest), per_call) if rest else 0
        return n - rest + min(pad, per_call)

    def _posterior(self, inputs, windows, frame_index, frame_windows=None):
        """psi's posterior for some windows of one frame, seeded by the frame (fold_in(seed,
        frame index)), so the samples of a frame do not depend on batch_frames.

        inputs: the frame's tiles [n, h, w, 1] (model ADU), or for a whole-field model the
        windows of phi's estimate [n, uh, uw, 1]; windows: the indices into inputs to sample;
        frame_windows: the same windows of the frame [n, h, w, 1] (model ADU), for a
        frame-conditioned psi sampled in windows."""
        n = len(windows)
        size = self._padded_count(n)
        index = np.concatenate([windows, np.full(size - n, windows[-1])])
        seed = _fold(self.seed, frame_index)
        if self.window:
            frames = None if frame_windows is None else frame_windows[index]
            post = self.backend.posterior_windows(inputs[index], self.num_samples,
                                                  self.num_steps, seed, frames)
        else:
            post = self.backend.posterior(inputs[index], self.num_samples, self.num_steps, seed)
        return {k: post[k][:n] for k in ("mean", "std", "samples")}

    def _sampled_windows(self, grid, xy):
        """Indices of the tiles (windows) of grid to sample for the localizations xy [M, 2] of
        one frame: each localization's owner, or every one with sample_windows 'all'."""
        if self.sample_windows == "all":
            return np.arange(len(grid))
        return np.unique(grid.owner(xy)).astype(int)

    def _choose_grid(self, grids, xy):
        """(grid, windows to sample): of the window grids (psi's window sizes), the one that
        samples the fewest HR pixels for the localizations xy [M, 2] of one frame (None with
        sample_windows 'all'); ties go to the larger windows (more context)."""
        best = None
        for g in grids:
            windows = self._sampled_windows(g, xy)
            cost = (self._padded_count(len(windows)) * g.tile[0] * g.tile[1] if len(windows)
                    else 0)
            if best is None or (cost, -g.tile[0]) < best[0]:
                best = ((cost, -g.tile[0]), g, windows)
        return best[1], best[2]

    def _run(self, stack, name, outputs):
        cfg = self.model_config
        u = cfg.upsample
        shape = (stack.height, stack.width)
        if self.window:  # One grid per window size; each frame takes the cheapest.
            grids = [TileGrid(shape, (w, w), self.overlap, u, self.pad) for w in self.windows]
            grid = grids[-1]
        else:
            tile = shape if self.whole_field else cfg.lr_shape
            grid = TileGrid(shape, tile, self.overlap, u, self.pad)
            grids = [grid]
        tile_config = cfg.replace(pixel_size_nm=self.pixel_size_nm)
        # The CRLB of a whole-field model's localizations: in the frame, whose edges are real.
        frame_config = (tile_config.replace(frame_height=stack.height, frame_width=stack.width)
                        if self.whole_field else None)
        def track(make):  # A writer, cut back to the checkpoint when resuming.
            return outputs.track(make(outputs.writer_state(len(outputs._open))))

        csv_out = track(lambda r: stack_io.ThunderstormWriter(outputs.path(f"{name}.csv"), r))
        picasso = None
        if self.picasso:
            cam = self.camera
            picasso = track(lambda r: stack_io.PicassoWriter(
                outputs.path(f"{name}_locs.hdf5"), stack.height, stack.width, self.pixel_size_nm,
                stack.path, dtype=stack.dtype, metadata={
                    # Picasso's camera entries: photons = (ADU - Baseline) * Sensitivity / Gain.
                    "Baseline": cam.offset_adu, "Sensitivity": 1.0 / cam.gain_adu_per_photon,
                    "Gain": 1.0, "Qe": 1.0,
                    "Camera": dataclasses.asdict(cam),
                    "Analysis": {"model": self.backend.source, "num_samples": self.num_samples,
                                 "num_steps": self.num_steps, **self.backend.recipe,
                                 "seed": self.seed,
                                 "localize_on": self.localize_on, "overlap_px": self.overlap,
                                 "in_samples": self.in_samples, "pad_px": self.pad,
                                 "batch_frames": self.batch_frames,
                                 "input": os.path.abspath(stack.path)}}, resume=r))
        writers = {}
        posterior = self.num_samples > 0
        if self.maps:
            for key in (("kde_estimate", "posterior_mean", "posterior_std") if posterior
                        else ("kde_estimate",)):
                writers[key] = track(lambda r, key=key: stack_io.TiffStackWriter(
                    outputs.path(f"{name}_{key}.tif"), r))
        sr_sum = np.zeros((u * stack.height, u * stack.width))
        var_sum = np.zeros_like(sr_sum)
        state = outputs.resumed or {}
        start_frame = int(state.get("frames_done", 0))
        if state:
            sr_sum, var_sum = outputs.arrays["sr_sum"], outputs.arrays["var_sum"]
        progbar = None
        if self.progress:
            import keras

            progbar = keras.utils.Progbar(stack.num_frames, unit_name="frame",
                                          stateful_metrics=["frames/s", "locs"])
        next_id, t0 = int(state.get("next_id", 1)), time.perf_counter()
        clock = state.get("clock") or {"read_s": 0.0, "posterior_s": 0.0, "localize_s": 0.0,
                                       "write_s": 0.0}
        last_checkpoint = time.perf_counter()
        if progbar is not None and start_frame:
            progbar.update(start_frame)
        tic = time.perf_counter()
        # Windows sampled so far, per window side (camera px).
        sampled = {int(k): v for k, v in state.get("windows_sampled_by_size", {}).items()}
        for lo, frames in stack.batches(self.batch_frames, start=start_frame):
            model_frames, photons = self._to_model_adu(frames, lo)
            clock["read_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            # phi one frame per call: on some CPUs a network's float32 output depends on the
            # batch size and on the position in the batch (the kernels' blocking), so a call
            # per frame keeps the results independent of --batch_frames, as psi's per-frame
            # calls do.
            if self.window:  # phi on whole frames; psi's windows cut from its estimate.
                y_hat = np.concatenate([self.backend.estimate(f[None, ..., None], self._n0,
                                                              self._spread)
                                        [..., 0] for f in model_frames])
            else:  # Tiles (or whole frames) through phi and psi alike.
                inputs = grid.cut(model_frames)[..., None]
                per_frame = len(inputs) // len(model_frames)
                estimate = np.concatenate([
                    self.backend.estimate(inputs[i:i + per_frame], self._n0,
                                          self._spread)[..., 0]
                    for i in range(0, len(inputs), per_frame)])
                y_hat = grid.stitch(estimate)
            clock["posterior_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            found = (self._detect(y_hat, tile_config) if self.localize_on == "kde_estimate"
                     else None)
            clock["localize_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            samples, frame_grids = None, [grid] * len(frames)
            if posterior:
                # psi only in the windows that hold a localization (each localization's owner);
                # elsewhere the posterior is phi's estimate with no spread. With localize_on
                # "mean" the localizations come from the posterior mean, so every window.
                samples, means, variances = [], [], []
                for b in range(len(frames)):
                    xy = None if found is None else found[b]
                    if self.window:
                        # psi's windows are cut from phi's one estimate of the whole frame, so
                        # where a sampled window reaches only sampled windows speak, and
                        # elsewhere the posterior is that estimate: only the sampled windows are
                        # cut and stitched (TileGrid.stitch_over).
                        g, windows = self._choose_grid(grids, xy)
                        frame_grids[b] = g
                        inputs_b = g.cut_hr(y_hat[b:b + 1], tiles=windows)[..., None]
                        frame_windows = (g.cut(model_frames[b:b + 1], tiles=windows)[..., None]
                                         if self.backend.frame_condition else None)
                        part = (self._posterior(inputs_b, np.arange(len(windows)), lo + b,
                                                frame_windows)
                                if len(windows) else None)
                        if part is None:
                            m, v = y_hat[b].astype(np.float64), np.zeros(y_hat[b].shape)
                        else:
                            m, v = g.stitch_over(y_hat[b], windows, part["mean"][..., 0],
                                                 part["std"][..., 0] ** 2)
                        means.append(m)
                        variances.append(v)
                    else:
                        # The paper's overlapping tiles each hold their own estimate of the same
                        # pixels, whose spread the stitched variance keeps.
                        g, windows = grid, self._sampled_windows(grid, xy)
                        rows = slice(b * len(g), (b + 1) * len(g))
                        estimate_b, inputs_b = estimate[rows], inputs[rows]
                        part = (self._posterior(inputs_b, windows, lo + b)
                                if len(windows) else None)
                        mean_tiles = estimate_b.astype(np.float64)
                        var_tiles = np.zeros(estimate_b.shape)
                        if part is not None:
                            mean_tiles[windows] = part["mean"][..., 0]
                            var_tiles[windows] = part["std"][..., 0] ** 2
                        m, v = g.stitch(mean_tiles, var_tiles)
                        means.append(m[0])
                        variances.append(v[0])
                    samples.append((windows, None if part is None else part["samples"]))
                    sampled[g.tile[0]] = sampled.get(g.tile[0], 0) + len(windows)
                mean, var = np.stack(means), np.stack(variances)
                var_sum += var.sum(axis=0)
            else:
                mean = y_hat
            clock["posterior_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            sr_sum += mean.sum(axis=0)
            if found is None:
                found = self._detect(mean, tile_config)
            table = self._table(found, samples, photons, frame_grids, tile_config, frame_config,
                                lo, next_id)
            clock["localize_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            if self.maps:
                writers["kde_estimate"].write(y_hat)
                if posterior:
                    writers["posterior_mean"].write(mean)
                    std_map = np.sqrt(var)
                    if self.pixel_scale is not None:
                        std_map = std_map * self._pixel_factors(table, lo, len(frames), shape)
                    writers["posterior_std"].write(std_map)
            clock["write_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
            next_id += len(table["id"])
            csv_out.write(table)
            if picasso is not None:
                picasso.write(self._picasso(table))
                picasso.frames = lo + len(frames)
            clock["write_s"] += time.perf_counter() - tic
            done = lo + len(frames)
            if done < stack.num_frames and (time.perf_counter() - last_checkpoint
                                            >= self.checkpoint_seconds):
                outputs.checkpoint({"frames_done": done, "next_id": next_id, "clock": clock,
                                    "windows_sampled_by_size": {str(k): v for k, v in
                                                                sampled.items()}},
                                   {"sr_sum": sr_sum, "var_sum": var_sum})
                last_checkpoint = time.perf_counter()
            if progbar is not None:
                rate = (done - start_frame) / (time.perf_counter() - t0)
                progbar.update(lo + len(frames), [("frames/s", rate), ("locs", next_id - 1)])
            tic = time.perf_counter()
        what = "posterior mean" if posterior else "phi's KDE estimate"
        stack_io.save_png(outputs.path(f"{name}_super_resolution.png"), sr_sum,
                          f"{name}: {what}, sum of {stack.num_frames} frames",
                          "KDE units (emitters x kernel peak)")
        if posterior:
            stack_io.save_png(outputs.path(f"{name}_uncertainty.png"), np.sqrt(var_sum),
                              f"{name}: posterior std of that sum", "KDE units", cmap="viridis")
        return {
            "input": os.path.abspath(stack.path), "frames": stack.num_frames,
            "frame_size": [stack.height, stack.width], "tiles_per_frame": len(grid),
            "window_px": list(grid.tile), "window_sizes_px": list(self.windows),
            "sample_windows": self.sample_windows,
            "windows_sampled": int(sum(sampled.values())),
            "windows_sampled_by_size": {str(k): v for k, v in sorted(sampled.items())},
            "localizations": next_id - 1, "model": self.backend.source,
            "camera": dataclasses.asdict(self.camera), "pixel_size_nm": self.pixel_size_nm,
            "num_samples": self.num_samples, "num_steps": self.num_steps, **self.backend.recipe,
            "jit_compile": self.backend.jit_compile, "uncertainty": self.uncertainty,
            "uncertainty_scale": (None if self.uncertainty_scale is None
                                  else dataclasses.asdict(self.uncertainty_scale)),
            "pixel_scale": (None if self.pixel_scale is None
                            else dataclasses.asdict(self.pixel_scale)),
            "whole_field": self.whole_field, "seed": self.seed,
            "localize_on": self.localize_on, "overlap_px": self.overlap, "pad_px": self.pad,
            "in_samples": self.in_samples if self.num_samples else None,
            "timing": {k: round(v, 3) for k, v in clock.items()},
        }

    def _pixel_factors(self, table, lo, count, shape):
        """[count, uH, uW] pixel_scale factors of the std maps of frames lo..lo + count - 1
        (0-based) of shape (H, W) camera px, from each frame's localizations in `table`."""
        nm, frame = self.pixel_size_nm, table["frame"]
        out = []
        for b in range(count):
            mine = frame == lo + b + 1
            xy = np.stack([table["x [nm]"][mine], table["y [nm]"][mine]], axis=1) / nm
            out.append(pixel_factor_map(self.pixel_scale, xy, table["intensity [photon]"][mine],
                                        shape, self.model_config.upsample))
        return np.stack(out)

    def _detect(self, images, tile_config):
        """Localizations [M, 2] (x, y) LR px of each whole-frame KDE of images [B, uH, uW].
        Detection reads only the KDE grid of the config (upsample, kde_sigma), so the tile config
        serves frames of any size. One detect_batch per frame: the results depend on that frame
        only, not on --batch_frames (a stack's floating-point sums follow its composition)."""
        return [detect_batch(image[None], tile_config, self.backend.detection)[0]
                for image in images]

    def _table(self, found, samples, photons, grids, tile_config, frame_config, lo, next_id):
        """Localizations of a batch -> ThunderSTORM columns (dict of arrays).

        samples: per frame (window indices, their samples [n, S, uh, uw, 1] or None), or None
        without psi; grids: per frame, the TileGrid of its tiles or windows. frame_config: the
        CRLB in the frame (whole-field models), else (None) in each localization's tile, the
        frame the model saw it in."""
        cols = {k: [] for k in stack_io.THUNDERSTORM_COLUMNS + stack_io.EXTRA_COLUMNS
                if k not in ("crlb_xy [nm]", "uncertainty_is_crlb", "uncertainty_raw_xy [nm]")}
        crlb_in = []  # (xy [m, 2] for the CRLB's frame, intensity [m], background [m]) per frame.
        nm = self.pixel_size_nm
        stds, fractions, scale_in = [], [], []  # scale_in: (xy, photometry) per frame.
        for b, xy in enumerate(found):
            grid = grids[b]
            m = len(xy)
            std = np.full((m, 2), np.nan)
            fraction = np.full(m, np.nan if samples is None else 0.0)
            owner = grid.owner(xy)
            phot = photometry(photons[b], xy, self.model_config.psf_sigma)
            local = np.zeros_like(xy)  # Positions in their owner tile.
            for k in np.unique(owner):
                local[owner == k] = grid.to_tile(xy[owner == k], k)
            crlb_in.append((xy if frame_config is not None else local, phot["intensity"],
                            phot["background"]))
            if samples is not None and m:
                # Detection in the samples of all windows of a frame at once; per frame, so that
                # the results do not depend on --batch_frames.
                windows, frame_samples = samples[b]
                position = {int(k): i for i, k in enumerate(windows)}
                mine = [(owner == k, position[int(k)]) for k in np.unique(owner)]
                picked = frame_samples[[i for _, i in mine]]
                reference = [local[sel] for sel, _ in mine]
                if self.in_samples == "refit":
                    # The frame's other localizations in or next to each window are refitted
                    # with its own (their blobs reach into it), and not reported there.
                    context = []
                    for (sel, _), k in zip(mine, np.unique(owner)):
                        near = grid.to_tile(xy[~sel], int(k))
                        reach = ((near >= -1.0) & (near <= np.array(grid.tile[::-1]) + 1.0)).all(1)
                        context.append(near[reach])
                    results = localization_uncertainty_refit(
                        picked, reference, tile_config, self.backend.detection, context=context)
                else:
                    results = localization_uncertainty_batched(
                        picked, reference, tile_config, self.backend.detection)
                for (sel, _), res in zip(mine, results):
                    std[sel] = res["std_nm"]
                    fraction[sel] = res["fraction"]
            stds.append(std)
            fractions.append(fraction)
            if self.uncertainty_scale is not None:
                scale_in.append((xy, phot["intensity"]))
            cols["id"].append(np.arange(m) + next_id + sum(len(f) for f in found[:b]))
            cols["frame"].append(np.full(m, lo + b + 1))
            cols["x [nm]"].append(xy[:, 0] * nm)
            cols["y [nm]"].append(xy[:, 1] * nm)
            cols["sigma [nm]"].append(np.full(m, self.model_config.psf_sigma * nm))
            cols["intensity [photon]"].append(phot["intensity"])
            cols["offset [photon]"].append(phot["background"])
            cols["bkgstd [photon]"].append(phot["bkgstd"])
            cols["detection_fraction"].append(fraction)
        table = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()
                 if not k.startswith("uncertainty")}
        # One batched CRLB for every localization of the batch.
        local, intensity, background = ((np.concatenate(v) for v in zip(*crlb_in)) if crlb_in
                                        else (np.zeros((0, 2)), np.zeros(0), np.zeros(0)))
        crlb_config = tile_config if frame_config is None else frame_config
        bound = _crlb_nm(local, intensity, background, crlb_config)
        table["crlb_xy [nm]"] = _xy_average(bound)
        # Without psi (num_samples 0) the uncertainty columns hold the CRLB, and say so.
        std = bound if samples is None else (np.concatenate(stds) if stds else np.zeros((0, 2)))
        table["uncertainty_raw_xy [nm]"] = _xy_average(std)
        if samples is not None and self.uncertainty_scale is not None and scale_in:
            scale = self.uncertainty_scale
            widening = (background_widening(local, intensity, background, crlb_config,
                                            table["crlb_xy [nm]"])
                        if scale.uses_background else None)
            starts = np.cumsum([0] + [len(xy) for xy, _ in scale_in])
            std = std * np.concatenate([
                scale.factor(xy, n, None if widening is None else widening[i:j])
                for (xy, n), i, j in zip(scale_in, starts[:-1], starts[1:])])[:, None]
            # A spread from fewer than half the samples (2 of 8: one degree of freedom per
            # axis) comes out near zero by chance now and then: there, not below the CRLB, per
            # axis, which no unbiased estimate from one frame beats. NaN (fewer than 2 samples
            # held it) stays NaN.
            few = np.concatenate(fractions) < 0.5
            floored = few[:, None] & np.isfinite(std) & np.isfinite(bound) & (std < bound)
            std = np.where(floored, bound, std)
        table["uncertainty_xy [nm]"] = _xy_average(std)
        table["uncertainty_x [nm]"], table["uncertainty_y [nm]"] = std[:, 0], std[:, 1]
        table["uncertainty_is_crlb"] = np.full(len(std), 0.0 if samples is not None else 1.0)
        return table

    def _picasso(self, table):
        locs = np.zeros(len(table["id"]), stack_io.PICASSO_DTYPE)
        nm = self.pixel_size_nm
        locs["frame"] = table["frame"] - 1
        locs["x"] = table["x [nm]"] / nm - 0.5  # Picasso: pixel centres at integers.
        locs["y"] = table["y [nm]"] / nm - 0.5
        locs["photons"] = table["intensity [photon]"]
        locs["sx"] = locs["sy"] = table["sigma [nm]"] / nm
        locs["bg"] = table["offset [photon]"]
        # No NaN (Picasso drops such rows): where no posterior sample held the localization, the
        # CRLB; without photometry, the PSF width (stack_io.PICASSO_FLAGS).
        lpx, lpy = table["uncertainty_x [nm]"] / nm, table["uncertainty_y [nm]"] / nm
        crlb = table["crlb_xy [nm]"] / nm
        finite = np.isfinite(lpx) & np.isfinite(lpy)
        # Flag 1 also where the uncertainty columns are the CRLB (an analysis without psi).
        no_post = ~finite | (table["uncertainty_is_crlb"] == 1)
        no_crlb = ~finite & ~np.isfinite(crlb)
        fill = np.where(np.isfinite(crlb), crlb, table["sigma [nm]"] / nm)
        locs["lpx"] = np.where(finite, lpx, fill)
        locs["lpy"] = np.where(finite, lpy, fill)
        photons, bg = table["intensity [photon]"], table["offset [photon]"]
        no_phot = ~(np.isfinite(photons) & np.isfinite(bg))
        negative = ~no_phot & (photons < 0)
        locs["photons"] = np.where(no_phot | negative, 0.0, photons)
        locs["bg"] = np.where(no_phot, 0.0, bg)
        edge = (locs["x"] < 0) | (locs["y"] < 0)
        locs["x"] = np.maximum(locs["x"], 0.0)
        locs["y"] = np.maximum(locs["y"], 0.0)
        locs["flags"] = ((no_post & ~no_crlb) * 1 + no_crlb * 2 + no_phot * 4 + negative * 8
                         + edge * 16).astype(np.uint8)
        return locs


# ---------------------------------------------------------------------------------- command
def define_flags():
    from absl import flags

    from smlm_tfdiff import flags as shared_flags

    flags.DEFINE_multi_string("input", None, "TIFF stack(s) or folder(s) of them (repeatable).")
    flags.DEFINE_string("out", "smlm_results", "Output folder; one subfolder per stack.")
    shared_flags.define_model_flag(DEFAULT_MODEL, savedmodel=True)
    flags.DEFINE_float("offset_adu", None, "Camera baseline (offset), ADU.")
    flags.DEFINE_float("gain_adu_per_photon", None, "ADU per detected photon (or give "
                       "--electrons_per_adu).")
    flags.DEFINE_float("electrons_per_adu", None, "Conversion factor e-/ADU (gain = em_gain / "
                       "electrons_per_adu).")
    flags.DEFINE_float("em_gain", 1.0, "EM gain (with --electrons_per_adu).")
    flags.DEFINE_float("readout_noise_adu", None, "Readout noise, ADU rms (checked against the "
                       "model's camera).")
    flags.DEFINE_float("pixel_size_nm", None, "Camera pixel size in the sample plane, nm "
                       "(default: the model's).")
    shared_flags.define_sampling_flags(num_samples=None)
    flags.FLAGS["num_samples"].help = (f"Posterior samples per frame (default: the model's, from "
                                       f"its diffusion.json, else {DEFAULT_NUM_SAMPLES}); 0: phi "
                                       "only, a quick look with the CRLB as uncertainty "
                                       "(uncertainty_is_crlb = 1).")
    flags.DEFINE_integer("restart_t", None, "Restart sweeps of the sampler from this step "
                         "(with --restarts): the calibrated recipe of --model paper_wide is "
                         "--restart_t 100 --restarts 2 (docs/calibration.md); off by default.")
    flags.DEFINE_integer("restarts", 2, "Restart sweeps (with --restart_t), each from the "
                         "previous samples.")
    flags.DEFINE_integer("batch_frames", 8, "Frames per batch (memory is bounded by this).")
    flags.DEFINE_integer("overlap", None, "Tile overlap in camera pixels (default: enough that "
                         "every pixel is within the model's trained region of a tile centre).")
    shared_flags.define_seed_flag(0, "Sampling seed (same seed, same output).")
    flags.DEFINE_enum("localize_on", "kde_estimate", ["kde_estimate", "mean"], "Detect on phi's "
                      "KDE estimate (the default: with the bundled models it localizes better "
                      "than the posterior mean, docs/sampler.md) or on psi's posterior mean.")
    flags.DEFINE_enum("sample_windows", "localized", list(SAMPLE_WINDOWS), "Where psi is "
                      "sampled: 'localized', only the tiles (windows) that hold a localization, "
                      "elsewhere the posterior is phi's estimate with zero std; 'all', every one "
                      "(slower; always with --localize_on mean).")
    flags.DEFINE_integer("window_px", None, "Whole-field models: side of psi's posterior "
                         "windows, camera px (default: per frame, psi's smallest window or its "
                         "training window, whichever samples fewer pixels). Smaller windows "
                         "cost less per isolated emitter, larger ones less per pixel of a "
                         "crowded frame (docs/analyze.md).")
    flags.DEFINE_bool("scale_uncertainty", True, "Apply the model's calibration scale of psi's "
                      "spread (uncertainty_scale.json of the model folder, fitted by simulation: "
                      "docs/calibration.md) to the uncertainty columns; uncertainty_raw_xy keeps "
                      "psi's own spread. Only with the model's sampling recipe and num_steps and "
                      "--localize_on kde_estimate, which it was fitted for; "
                      "--noscale_uncertainty reports psi's spread unscaled.")
    flags.DEFINE_enum("in_samples", None, list(IN_SAMPLES), "How each posterior sample is "
                      "localized for the per-localization uncertainty: 'detect' (detection "
                      "afresh, then matching) or 'refit' (the localizations refitted from their "
                      "positions, ~10x cheaper; docs/analyze.md). Default: the model's "
                      "(detection.json); the calibration scale applies only to the model's way.")
    flags.DEFINE_float("photons", None, "Photons per emitter per frame (N0) of the dye, for a "
                       "model whose phi reads frames scaled to it (phi_config.json "
                       "brightness_reference); by default it is measured on each movie "
                       "(photometry of isolated spots; the summary's emitter_photons). Other "
                       "models ignore it.")
    flags.DEFINE_float("photon_spread", None, "The log-sd of the emitters' photons about N0 "
                       "(0: all alike; ~0.4 for a dye whose photons vary from frame to frame), "
                       "for a model whose phi is told it (phi_config.json spread_input); by "
                       "default it is measured on each movie (the summary's emitter_photons). "
                       "Other models ignore it.")
    flags.DEFINE_bool("picasso", False, "Also write Picasso HDF5 + YAML.")
    flags.DEFINE_bool("maps", True, "Write KDE / posterior mean / std TIFF stacks.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("overwrite", False, "Replace existing result folders whole (by default a "
                      "result folder that holds files is refused).")
    flags.DEFINE_bool("allow_partial", False, "Analyze the readable frames of a truncated or "
                      "damaged stack (by default such a stack stops the run); the loss is "
                      "recorded in the summary (input_loss) and on stderr.")
    flags.DEFINE_float("checkpoint_seconds", CHECKPOINT_SECONDS, "A killed run resumes from its "
                       "last checkpoint, written after a finished batch when this many seconds "
                       "have passed since the previous one (0: after every batch).")
    flags.DEFINE_string("series", None, "For TIFF files with several image series: 'all' "
                        "analyzes them one after the other as one movie, K (0-based) series K "
                        "only. By default such files are refused.")


def main(argv):
    from absl import flags, logging

    FLAGS = flags.FLAGS
    # Warnings (damaged input, camera settings) as one plain line each on stderr.
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)

    def terminated(signum, frame):  # SIGTERM as Ctrl-C: the checkpoint is kept for a resume.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}; pass stacks with --input (the only "
                         "subcommand is `analyze`, which may also be left out)")
    if not FLAGS.input:
        raise SystemExit("error: no input; pass --input movie.tif (repeatable, or a folder)")
    if FLAGS.offset_adu is None:
        raise SystemExit("error: pass the camera offset with --offset_adu (ADU)")
    if (FLAGS.gain_adu_per_photon is None) == (FLAGS.electrons_per_adu is None):
        raise SystemExit("error: pass exactly one of --gain_adu_per_photon or --electrons_per_adu")
    try:
        extra = dict(readout_noise_adu=FLAGS.readout_noise_adu, pixel_size_nm=FLAGS.pixel_size_nm)
        if FLAGS.electrons_per_adu is not None:
            camera = Camera.from_electrons(FLAGS.offset_adu, FLAGS.electrons_per_adu,
                                           FLAGS.em_gain, **extra)
        else:
            camera = Camera(FLAGS.offset_adu, FLAGS.gain_adu_per_photon, **extra)
        series = FLAGS.series
        if series is not None and series != "all":
            if not series.isdigit():
                raise ValueError(f"--series must be 'all' or a series number >= 0 (got {series!r})")
            series = int(series)
        # Distinct inputs get distinct folders; existing results are checked before any work.
        jobs = [(path, os.path.join(FLAGS.out, folder))
                for path, folder in stack_io.output_folders(stack_io.find_stacks(FLAGS.input))]
        for _, out_dir in jobs:
            stack_io.check_output_dir(out_dir, FLAGS.overwrite)
        backend = load_backend(FLAGS.model, FLAGS.method, FLAGS.restart_t, FLAGS.restarts,
                               need_psi=FLAGS.num_samples != 0, jit_compile=FLAGS.jit_compile)
        analyzer = StackAnalyzer(backend, camera, FLAGS.num_samples, FLAGS.num_steps,
                                 FLAGS.batch_frames, FLAGS.overlap, FLAGS.seed, FLAGS.localize_on,
                                 FLAGS.picasso, FLAGS.maps, FLAGS.progress, FLAGS.overwrite,
                                 FLAGS.allow_partial, series, FLAGS.sample_windows,
                                 FLAGS.window_px, FLAGS.scale_uncertainty, FLAGS.in_samples,
                                 FLAGS.photons, FLAGS.photon_spread)
        analyzer.checkpoint_seconds = max(0.0, FLAGS.checkpoint_seconds)
        for path, out_dir in jobs:
            summary = analyzer.analyze(path, out_dir)
            logging.info("%s: %d frames, %d localizations, %.2f frames/s -> %s", path,
                         summary["frames"], summary["localizations"],
                         summary["frames_per_second"], out_dir)
            print(f"{path}: {summary['localizations']} localizations in {summary['frames']} "
                  f"frames ({summary['frames_per_second']} frames/s) -> {out_dir}")
    except (StackError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: the batches finished before the last checkpoint are kept in a hidden "
              f"'.<name>.partial' folder in {FLAGS.out}; run the same command again to resume "
              "(another input or other settings start afresh and remove it)", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:  # E.g. the disk filled up while writing.
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: cannot read or write a file{where}: {err.strerror or err}; check the "
              "input and that --out is writable with free space", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv=None):
    """Console-script entry point: `smlm-tfdiff [analyze] --input ... [flags]`.

    The word `analyze` after the command is accepted (and dropped), so that both spellings work.
    `--help` lists this command's flags (absl lists the flags of the entry script, which defines
    none, so they are registered for it here); `--helpfull` adds TensorFlow's and absl's."""
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "analyze":
        del argv[1]
    define_flags()
    for module in (__name__, "smlm_tfdiff.flags"):
        for flag in flags.FLAGS.get_flags_for_module(module):
            # absl's --help lists the key flags of the module named sys.argv[0].
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
