"""Simulation configuration: camera, optics, scene and KDE grid, with named presets.

Units (see docs/CONVENTIONS.md): positions in low-resolution (LR) pixels, PSF width in LR pixels, KDE width in
high-resolution (HR) pixels, photons per emitter, background in photons per pixel, gain in ADU per
photon, offset in ADU, readout variance in ADU^2. Gain, offset, readout variance and background may be
per-pixel [H, W] maps (sCMOS cameras) as well as scalars.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Tuple, Union

import numpy as np

Scalar = Union[float, int]
ScalarOrMap = Union[float, int, np.ndarray]

_MAP_FIELDS = ("gain", "offset", "readout_var", "background")
_COUNT_MODES = ("fixed", "poisson")
_PHOTON_DISTRIBUTIONS = ("uniform", "log_uniform")
_REGIONS = ("disc", "frame")
_PAIR_UNITS = {"photons_range": "[low, high] photons", "disc_center": "[x, y] LR pixels",
               "density_range": "[low, high] emitters per LR px^2",
               "cluster_radius_range": "[low, high] LR pixels",
               "cluster_density_range": "[low, high] emitters per LR px^2",
               "background_range": "[low, high] photons per pixel",
               "photons_frame_spread_range": "[low, high] log-sd"}
# Detection settings in a sim_config.json: the keys it held before localization.config.
# DetectionConfig, and a SavedModel's in_samples (DetectionConfig.to_legacy).
_LEGACY_DETECTION_KEYS = ("detect_threshold", "detect_min_sigma", "detect_max_sigma",
                          "detect_num_sigma", "refine_radius", "detect_in_samples")


def _is_number(value) -> bool:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(eq=False)
class SimulationConfig:
    """Everything needed to simulate frames and KDE targets.

    Frames are [frame_height, frame_width] in ADU; KDEs are [upsample * H, upsample * W].
    """

    # Frame geometry.
    frame_height: int = 20
    frame_width: int = 20
    pixel_size_nm: float = 108.3  # LR pixel size in the sample plane.
    # Optics: isotropic Gaussian PSF, width in LR pixels.
    psf_sigma: float = 0.92
    # Emitters.
    photons: float = 200.0  # N0 per emitter when photons_range is None.
    photons_range: Optional[Tuple[float, float]] = None  # N0 ~ photons_distribution(lo, hi) when set.
    photons_distribution: str = "uniform"  # Of N0 in photons_range: "uniform" or "log_uniform".
    # Set (with photons_range): one N0 per frame from photons_range, and each emitter of the frame
    # N0 exp(photons_frame_spread z), z ~ N(0, 1), as one dye in one movie (a log-sd; 0: all
    # alike). None: every emitter draws its own N0 from photons_range.
    photons_frame_spread: Optional[float] = None
    # Set (with photons_range, instead of photons_frame_spread): one N0 per frame as above, with
    # the frame's log-sd drawn uniformly from this range, so that frames of alike emitters (0)
    # and of a dye whose brightness varies from frame to frame (~0.4) are both seen; each frame's
    # spread is in simulate()'s frame_spread (a phi told it: PhiConfig.spread_input).
    photons_frame_spread_range: Optional[Tuple[float, float]] = None
    # With photons_frame_spread_range: this fraction of frames has spread 0 (emitters all alike,
    # where a phi splits close pairs best) instead of a draw from the range.
    photons_frame_spread_zero_fraction: Optional[float] = None
    num_emitters: int = 10  # Fixed count, or the Poisson mean when emitter_count == "poisson".
    emitter_count: str = "fixed"  # "fixed" or "poisson" (truncated at max_emitters).
    max_emitters: Optional[int] = None  # Padding size K; default num_emitters (fixed) or mean + 6 sd.
    # Emitters per LR px^2 of the emitter region, log-uniform per frame (Poisson counts only): a
    # training scene from sparse to dense. Set, it replaces num_emitters as the Poisson mean.
    density_range: Optional[Tuple[float, float]] = None
    region: str = "disc"  # "disc": uniform on a disc; "frame": uniform over the frame minus a margin.
    disc_radius: float = 7.0  # LR pixels.
    disc_center: Optional[Tuple[float, float]] = None  # (x, y) LR pixels; default frame centre.
    # LR pixels kept free at each border when region == "frame"; negative: emitters up to -margin
    # px outside the frame, whose light reaches in (as on a camera chip, edges included).
    margin: float = 1.0
    # Structured samples (region "frame", Poisson counts): this fraction of the frames holds one
    # cluster instead, a disc of radius ~ Uniform(cluster_radius_range) (capped at what fits) at
    # a random place inside the emitter region, its density log-uniform in
    # cluster_density_range (the seeds' scene is one such disc: radius 7 px, 1 per 15 px^2). A
    # dense spot in an empty frame is not background. None: every frame uniform (the ranges
    # unused).
    cluster_fraction: Optional[float] = None
    cluster_radius_range: Optional[Tuple[float, float]] = None
    cluster_density_range: Optional[Tuple[float, float]] = None
    background: ScalarOrMap = 0.0  # Photons per pixel per frame.
    # Per frame, a further background ~ Uniform(lo, hi) photons per pixel on top of `background`.
    background_range: Optional[Tuple[float, float]] = None
    # Camera: x = gain * Poisson(omega + background) + Normal(offset, readout_var).
    gain: ScalarOrMap = 1.0  # ADU per photon.
    offset: ScalarOrMap = 100.0  # ADU.
    readout_var: ScalarOrMap = 5.0  # ADU^2.
    # KDE target grid.
    upsample: int = 4
    kde_sigma: float = 3.0  # HR pixels.

    def __post_init__(self):
        self._check_types()
        for name in _MAP_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (list, tuple, np.ndarray)):
                setattr(self, name, np.asarray(value, dtype=np.float64))
        for name in _PAIR_UNITS:
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        self.validate()

    def _check_types(self) -> None:
        """A wrong type (e.g. "photons_range": 500 in a JSON file) -> ValueError naming the field,
        as a wrong value does (validate)."""
        def fail(field, message):
            raise ValueError(f"SimulationConfig.{field}: {message}")

        for f in dataclasses.fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in _MAP_FIELDS:
                try:
                    ok = not isinstance(value, (bool, str, bytes)) and np.asarray(
                        value, dtype=np.float64).dtype == np.float64
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    fail(name, f"must be a number or an [H, W] map of numbers (got {value!r})")
            elif name in _PAIR_UNITS:
                pair = _PAIR_UNITS[name]
                if value is not None and (isinstance(value, (str, bytes, dict))
                                          or not hasattr(value, "__len__") or len(value) != 2
                                          or not all(_is_number(v) for v in value)):
                    fail(name, f"must be a pair of numbers {pair}, or null (got {value!r})")
            elif name in ("photons_frame_spread", "cluster_fraction",
                          "photons_frame_spread_zero_fraction"):
                if value is not None and not _is_number(value):
                    what = "a log-sd" if name == "photons_frame_spread" else "a fraction of frames"
                    fail(name, f"must be a number ({what}) or null (got {value!r})")
            elif name == "max_emitters":
                if value is not None and not _is_integer(value):
                    fail(name, f"must be an integer or null (got {value!r})")
            elif isinstance(f.default, str):
                if not isinstance(value, str):
                    fail(name, f"must be a string (got {value!r})")
            elif isinstance(f.default, float):
                if not _is_number(value):
                    fail(name, f"must be a number (got {value!r})")
            elif isinstance(f.default, int) and not _is_integer(value):
                fail(name, f"must be an integer (got {value!r})")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "SimulationConfig":
        """Named presets: 'paper', 'isolated', 'bright', 'bright500', 'dense', 'wholefield',
        'wholefield_dye', 'wholefield_clusters'."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "SimulationConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(field, message):
            raise ValueError(f"SimulationConfig.{field}: {message}")

        for field in ("frame_height", "frame_width", "upsample", "num_emitters"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                fail(field, f"must be an integer (got {value!r})")
        if self.frame_height < 4 or self.frame_width < 4:
            fail("frame_height" if self.frame_height < 4 else "frame_width",
                 f"frames must be at least 4x4 pixels (got {self.frame_height}x{self.frame_width})")
        if self.upsample < 1:
            fail("upsample", f"must be >= 1 (got {self.upsample})")
        for field in ("pixel_size_nm", "psf_sigma", "kde_sigma"):
            value = getattr(self, field)
            if not (np.isfinite(value) and value > 0):
                fail(field, f"must be a finite positive number (got {value!r})")
        if self.photons_range is None:
            if not (np.isfinite(self.photons) and self.photons > 0):
                fail("photons", f"must be > 0 photons per emitter (got {self.photons!r})")
        else:
            if len(self.photons_range) != 2:
                fail("photons_range", f"must be (low, high) (got {self.photons_range!r})")
            lo, hi = self.photons_range
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
                fail("photons_range", f"needs 0 < low <= high photons (got {self.photons_range!r})")
        if self.photons_frame_spread is not None:
            if self.photons_range is None:
                fail("photons_frame_spread", "draws one N0 per frame from photons_range: set "
                     "photons_range too (or drop photons_frame_spread)")
            if not (np.isfinite(self.photons_frame_spread) and self.photons_frame_spread >= 0):
                fail("photons_frame_spread", f"must be a finite log-sd >= 0 "
                     f"(got {self.photons_frame_spread!r})")
        if self.photons_frame_spread_range is not None:
            lo, hi = self.photons_frame_spread_range
            if self.photons_range is None:
                fail("photons_frame_spread_range", "draws one N0 per frame from photons_range: "
                     "set photons_range too (or drop photons_frame_spread_range)")
            if self.photons_frame_spread is not None:
                fail("photons_frame_spread_range", "replaces photons_frame_spread: set one of "
                     "them (photons_frame_spread=null with a range)")
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
                fail("photons_frame_spread_range", f"needs 0 <= low <= high, log-sds "
                     f"(got {self.photons_frame_spread_range!r})")
        zero = self.photons_frame_spread_zero_fraction
        if zero is not None:
            if self.photons_frame_spread_range is None:
                fail("photons_frame_spread_zero_fraction", "sets spread 0 in some frames of "
                     "photons_frame_spread_range's draw: set the range too (or drop this)")
            if not (np.isfinite(zero) and 0 <= zero <= 1):
                fail("photons_frame_spread_zero_fraction", f"must be a fraction of frames in "
                     f"[0, 1] (got {zero!r})")
        if self.photons_distribution not in _PHOTON_DISTRIBUTIONS:
            fail("photons_distribution", f"must be one of {_PHOTON_DISTRIBUTIONS} "
                 f"(got {self.photons_distribution!r})")
        if self.density_range is not None:
            lo, hi = self.density_range
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
                fail("density_range", f"needs 0 < low <= high emitters per LR px^2 "
                     f"(got {self.density_range!r})")
            if self.emitter_count != "poisson":
                fail("density_range", "draws Poisson counts: set emitter_count to 'poisson'")
        if self.background_range is not None:
            lo, hi = self.background_range
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
                fail("background_range", f"needs 0 <= low <= high photons per pixel "
                     f"(got {self.background_range!r})")
        if self.emitter_count not in _COUNT_MODES:
            fail("emitter_count", f"must be one of {_COUNT_MODES} (got {self.emitter_count!r})")
        if self.num_emitters < 0 or (self.emitter_count == "fixed" and self.num_emitters < 1):
            fail("num_emitters", f"must be >= 1 for a fixed count (got {self.num_emitters})")
        if self.max_emitters is not None:
            if self.max_emitters < 1:
                fail("max_emitters", f"must be >= 1 (got {self.max_emitters})")
            if self.emitter_count == "fixed" and self.max_emitters < self.num_emitters:
                fail("max_emitters", f"{self.max_emitters} is smaller than num_emitters "
                     f"{self.num_emitters}; raise it or leave it None")
        if self.region not in _REGIONS:
            fail("region", f"must be one of {_REGIONS} (got {self.region!r})")
        h, w = self.frame_height, self.frame_width
        self._validate_clusters(fail)
        if self.region == "disc":
            cx, cy = self.center
            if not (np.isfinite(self.disc_radius) and self.disc_radius >= 0):
                fail("disc_radius", f"must be >= 0 LR pixels (got {self.disc_radius!r})")
            if (cx - self.disc_radius < 0 or cx + self.disc_radius > w
                    or cy - self.disc_radius < 0 or cy + self.disc_radius > h):
                fail("disc_radius", f"a disc of radius {self.disc_radius} about ({cx}, {cy}) "
                     f"does not fit in the {w}x{h} frame; shrink it or move disc_center")
        else:
            if not np.isfinite(self.margin):
                fail("margin", f"must be a finite number of LR pixels (got {self.margin!r})")
            if self.margin < -4.0 * self.psf_sigma:
                fail("margin", f"{self.margin} puts emitters more than 4 PSF widths outside the "
                     f"frame, where none of their light reaches it; use >= "
                     f"{-4.0 * self.psf_sigma:.2f}")
            if 2 * self.margin >= min(h, w):
                fail("margin", f"{self.margin} px on each side leaves no room in a {w}x{h} frame")
        for field in _MAP_FIELDS:
            value = getattr(self, field)
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim not in (0, 2):
                fail(field, f"must be a scalar or an [H, W] map (got shape {arr.shape})")
            if arr.ndim == 2 and arr.shape != (h, w):
                fail(field, f"map shape {arr.shape} does not match the frame ({h}, {w})")
            if not np.all(np.isfinite(arr)):
                fail(field, "contains NaN or Inf")
            if field == "gain" and np.any(arr <= 0):
                fail(field, "must be > 0 ADU per photon everywhere")
            if field in ("readout_var", "background") and np.any(arr < 0):
                fail(field, "must be >= 0 everywhere")

    def _validate_clusters(self, fail) -> None:
        if self.cluster_fraction is None:  # No clusters; the ranges, if any, unused.
            return
        missing = [name for name in ("cluster_radius_range", "cluster_density_range")
                   if getattr(self, name) is None]
        if missing:
            fail(missing[0], f"clustered frames (cluster_fraction {self.cluster_fraction}) "
                 f"need {' and '.join(missing)} too")
        if not (np.isfinite(self.cluster_fraction) and 0 <= self.cluster_fraction <= 1):
            fail("cluster_fraction", f"must be a fraction of frames in [0, 1] "
                 f"(got {self.cluster_fraction!r})")
        if self.region != "frame" or self.emitter_count != "poisson":
            fail("cluster_fraction", "clusters are drawn in frame scenes with Poisson counts: "
                 "set region 'frame' and emitter_count 'poisson'")
        lo, hi = self.cluster_radius_range
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
            fail("cluster_radius_range", f"needs 0 < low <= high LR pixels "
                 f"(got {self.cluster_radius_range!r})")
        lo, hi = self.cluster_density_range
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
            fail("cluster_density_range", f"needs 0 < low <= high emitters per LR px^2 "
                 f"(got {self.cluster_density_range!r})")

    # ------------------------------------------------------------ derived values
    @property
    def lr_shape(self) -> Tuple[int, int]:
        return (self.frame_height, self.frame_width)

    @property
    def hr_shape(self) -> Tuple[int, int]:
        return (self.upsample * self.frame_height, self.upsample * self.frame_width)

    @property
    def center(self) -> Tuple[float, float]:
        """Disc centre (x, y) in LR pixels; the frame centre unless disc_center is set."""
        if self.disc_center is not None:
            return self.disc_center
        return (self.frame_width / 2.0, self.frame_height / 2.0)

    @property
    def region_area(self) -> float:
        """Area (LR px^2) over which emitters are drawn."""
        if self.region == "disc":
            return math.pi * self.disc_radius ** 2
        return (self.frame_width - 2 * self.margin) * (self.frame_height - 2 * self.margin)

    @property
    def padded_emitters(self) -> int:
        """K, the padded emitter axis of positions [B, K, 2]."""
        if self.max_emitters is not None:
            return int(self.max_emitters)
        if self.emitter_count == "fixed":
            return int(self.num_emitters)
        mean = (float(self.num_emitters) if self.density_range is None
                else self.density_range[1] * self.region_area)
        if self.cluster_fraction:
            mean = max(mean, self.cluster_density_range[1] * math.pi
                       * self.cluster_radii[1] ** 2)
        return max(1, int(math.ceil(mean + 6.0 * math.sqrt(mean) + 1)))

    @property
    def cluster_radii(self) -> Tuple[float, float]:
        """cluster_radius_range capped at the largest disc that fits inside the emitter region
        (LR px), so that a model's scene fits frames of any size."""
        fit = (min(self.frame_height, self.frame_width) - 2 * self.margin) / 2
        lo, hi = self.cluster_radius_range
        return min(lo, fit), min(hi, fit)

    @property
    def hr_pixel_size_nm(self) -> float:
        return self.pixel_size_nm / self.upsample

    @property
    def kde_norm(self) -> float:
        """2 pi sigma_y^2: the fixed KDE scale; sum(kde) / kde_norm = emitter count."""
        return 2.0 * math.pi * self.kde_sigma ** 2

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, (np.floating, np.integer)):
                value = value.item()
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SimulationConfig":
        """From to_dict()'s dict. The detection settings that files written before the split into
        DetectionConfig carry (detect_*, refine_radius) are skipped here: DetectionConfig.from_legacy
        reads them."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in _LEGACY_DETECTION_KEYS}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SimulationConfig fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SimulationConfig":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, SimulationConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


def check_config(config) -> None:
    """TypeError naming the fix unless `config` is a SimulationConfig."""
    if not isinstance(config, SimulationConfig):
        raise TypeError(f"config must be a SimulationConfig (got {type(config).__name__}); "
                        "use SimulationConfig.preset('paper') or SimulationConfig(...)")


def typical_photons(config) -> float:
    """A scene's typical N0, photons: config.photons, or the middle of photons_range (geometric
    for log-uniform draws)."""
    if config.photons_range is None:
        return float(config.photons)
    lo, hi = config.photons_range
    return math.sqrt(lo * hi) if config.photons_distribution == "log_uniform" else (lo + hi) / 2


def typical_spread(config) -> float:
    """The log-sd of a scene's emitters' N0 about the frame's typical N0 (simulate's frame_spread
    where the scene does not draw it per frame): 0 for one N0, photons_frame_spread, or the
    log-sd of the per-emitter draw from photons_range (uniform or log-uniform)."""
    if config.photons_range is None:
        return 0.0
    if config.photons_frame_spread is not None:
        return float(config.photons_frame_spread)
    lo, hi = config.photons_range
    if hi <= lo:
        return 0.0
    if config.photons_distribution == "log_uniform":
        return (math.log(hi) - math.log(lo)) / math.sqrt(12.0)
    # N ~ U(lo, hi): E[log N] and E[log^2 N] in closed form.
    m1 = (hi * math.log(hi) - hi - lo * math.log(lo) + lo) / (hi - lo)
    def second(x):
        return x * (math.log(x) ** 2 - 2.0 * math.log(x) + 2.0)
    m2 = (second(hi) - second(lo)) / (hi - lo)
    return math.sqrt(max(m2 - m1 * m1, 0.0))


PRESETS = {
    # The seeds' section 4, camera values from the authors' code.
    "paper": dict(),
    # One emitter, same camera and optics: the CRLB / MCMC reference case.
    "isolated": dict(num_emitters=1),
    # Brighter emitters.
    "bright": dict(photons=1000.0),
    "bright500": dict(photons=500.0),
    # Poisson-distributed counts over the whole frame with a photon range: a training-style scene.
    "dense": dict(emitter_count="poisson", num_emitters=10, region="frame", margin=1.0,
                  photons_range=(100.0, 1000.0)),
    # The whole-field models' training scene: the seeds' camera and optics, emitters anywhere in
    # the frame and up to 1 px outside it, from sparse (1 per 400 px^2) to beyond the seeds' local
    # density (1 per 15 px^2), N0 100-5000 photons log-uniform, background 0-30 photons per pixel.
    "wholefield": dict(frame_height=32, frame_width=32, emitter_count="poisson", region="frame",
                       margin=-1.0, density_range=(1.0 / 400.0, 1.0 / 12.0),
                       photons_range=(100.0, 5000.0), photons_distribution="log_uniform",
                       background_range=(0.0, 30.0)),
}
# The whole-field scene with one dye per movie: one N0 per frame (100-5000 log-uniform) and the
# frame's emitters spread around it (log-sd 0.4), for a phi that reads frames scaled to the
# movie's N0 (PhiConfig.brightness_reference).
PRESETS["wholefield_dye"] = dict(PRESETS["wholefield"], photons_frame_spread=0.4)
# The one-dye whole-field scene with structure: a quarter of the frames hold one dense cluster
# (radius 3-10 px, 1 per 25 to 1 per 10 px^2; the seeds' disc is radius 7 px at 1 per 15 px^2).
PRESETS["wholefield_clusters"] = dict(PRESETS["wholefield_dye"], cluster_fraction=0.25,
                                      cluster_radius_range=(3.0, 10.0),
                                      cluster_density_range=(1.0 / 25.0, 1.0 / 10.0))
