"""A calibration scale of psi's per-localization std, fitted by simulation (docs/calibration.md,
"The calibration scale analyze applies").

psi's spread is too narrow where emitters crowd and too wide for lone bright ones; the errors
follow the number of emitters nearby and the brightness. The scale

    s = exp(a + b k + c log(N / N_ref) + d log w)     (neighbour_term "linear")
    s = exp(a + b log(1 + k) + c log(N / N_ref) + d log w)     (neighbour_term "log1p")

and optionally + e g(k) log(N / N_ref), g(k) the neighbour term (the brightness slope changing
with crowding: on whole-field scenes a lone emitter's error falls with N faster than a crowded
one's), and + f log(N / N_ref)^2 (the brightness slope changing with brightness itself), and
+ h log(1 + (r0 / r)^2), r the distance to the frame's nearest other localization and r0
`nearest_px` (a close pair: one of two emitters ~1 px apart is placed far less surely than a lone
one, which a count within 8 px does not tell),

with k the other localizations of the frame within `radius_px` camera px, N the localization's
photometry (photons; io.photometry as analyze fits it) and w >= 1 the factor by which its fitted
background widens its CRLB (analyze.background_widening; d = 0 in scales fitted without
background) multiplies the posterior std of each localization. a, b, c, d (and e) are fitted by
maximum likelihood of z = error / (s std) ~ N(0, 1) on validation scenes
(benchmarks/calibration_density_scale.py, calibration_wholefield_scale.py) and checked on
held-out ones; they belong to one pair of models and one sampler recipe, and a model folder that
has them keeps them in SCALE_FILE. Pure NumPy.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from scipy.spatial import cKDTree

SCALE_FILE = "uncertainty_scale.json"
# The photometry as the fit saw it: a failed fit (NaN) counts as N_ref (brightness term 0), and
# values are clipped to this range (photons) so that an outlier cannot blow the scale up.
PHOTON_RANGE = (20.0, 1e5)
# The background's widening of the CRLB as the fit saw it: NaN counts as 1 (no background), and
# values are clipped to this range.
WIDENING_RANGE = (1.0, 10.0)
# How the neighbour count k enters log s: "linear" (b k) or "log1p" (b log(1 + k): the first
# neighbours count most, as on whole-field scenes).
NEIGHBOUR_TERMS = ("linear", "log1p")
# The nearest-neighbour term's distance r0 (camera px): log(1 + (r0 / r)^2) is ~0 beyond a few r0
# and grows as 2 log(r0 / r) for a close pair. Distances below MIN_NEAREST_PX (two localizations
# on one spot) count as that, so that the term stays finite.
NEAREST_PX = 2.0
MIN_NEAREST_PX = 0.1


@dataclasses.dataclass(frozen=True)
class UncertaintyScale:
    """log s = intercept + per_neighbour g(k) + per_log_photons log(N / reference_photons)
    + per_log_widening log(w) + per_neighbour_log_photons g(k) log(N / reference_photons)
    + per_log_photons_squared log(N / reference_photons)^2
    + per_log_nearest log(1 + (nearest_px / r)^2), g(k) = k (neighbour_term "linear")
    or log(1 + k) ("log1p"), w the background's widening of the CRLB (1 without background),
    r the distance to the frame's nearest other localization (camera px; none: the term is 0).

    radius_px: the neighbourhood of k, camera px. fitted_on: where the coefficients come from
    (the command and the scenes), kept with them."""

    intercept: float
    per_neighbour: float
    per_log_photons: float
    radius_px: float = 8.0
    reference_photons: float = 200.0
    neighbour_term: str = "linear"
    per_log_widening: float = 0.0
    per_neighbour_log_photons: float = 0.0
    per_log_photons_squared: float = 0.0
    per_log_nearest: float = 0.0
    nearest_px: float = NEAREST_PX
    fitted_on: str = ""

    def __post_init__(self):
        for name in ("intercept", "per_neighbour", "per_log_photons", "radius_px",
                     "reference_photons", "per_log_widening", "per_neighbour_log_photons",
                     "per_log_photons_squared", "per_log_nearest", "nearest_px"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"UncertaintyScale.{name} must be a finite number (got "
                                 f"{value!r})")
        if self.neighbour_term not in NEIGHBOUR_TERMS:
            raise ValueError(f"UncertaintyScale.neighbour_term must be one of {NEIGHBOUR_TERMS} "
                             f"(got {self.neighbour_term!r})")
        if self.radius_px <= 0 or self.reference_photons <= 0 or self.nearest_px <= 0:
            raise ValueError(f"UncertaintyScale radius_px, reference_photons and nearest_px must "
                             f"be > 0 (got {self.radius_px}, {self.reference_photons}, "
                             f"{self.nearest_px})")

    @classmethod
    def from_json(cls, text: str) -> "UncertaintyScale":
        """From the JSON object SCALE_FILE holds (to_json's); a ValueError names what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the uncertainty scale is not valid JSON ({err})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        required = ("intercept", "per_neighbour", "per_log_photons")
        if (not isinstance(data, dict) or set(data) - fields
                or any(k not in data for k in required)):
            raise ValueError(f"the uncertainty scale must be a JSON object with the keys "
                             f"{list(required)} and optionally "
                             f"{sorted(fields - set(required))} (got {data!r})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def neighbours(self, xy) -> np.ndarray:
        """[M] int: for each of the frame's localizations xy [M, 2] (camera px), how many others
        lie within radius_px."""
        return count_neighbours(xy, self.radius_px)

    @property
    def uses_background(self) -> bool:
        """Whether the scale reads the background's widening of the CRLB (factor's widening)."""
        return self.per_log_widening != 0.0

    def factor(self, xy, photons, widening=None) -> np.ndarray:
        """[M] scale of the std of one frame's localizations xy [M, 2] (camera px, all of the
        frame's) with their photometry photons [M] (NaN where it failed) and the background's
        widening of their CRLB [M] (analyze.background_widening; None: 1, no background; NaN
        counts as 1; values are clipped to WIDENING_RANGE)."""
        photons = np.asarray(photons, np.float64).reshape(-1)
        k = self.neighbours(xy)
        if len(photons) != len(k):
            raise ValueError(f"photons must hold one value per localization ({len(k)}; got "
                             f"{len(photons)})")
        g = neighbour_feature(k, self.neighbour_term)
        p = photons_feature(photons, self.reference_photons)
        log_s = (self.intercept + self.per_neighbour * g + self.per_log_photons * p
                 + self.per_neighbour_log_photons * g * p + self.per_log_photons_squared * p * p)
        if self.per_log_nearest != 0.0:
            log_s = log_s + self.per_log_nearest * nearest_feature(nearest_distance(xy),
                                                                   self.nearest_px)
        if widening is not None:
            w = np.asarray(widening, np.float64).reshape(-1)
            if len(w) != len(k):
                raise ValueError(f"widening must hold one value per localization ({len(k)}; "
                                 f"got {len(w)})")
            log_s = log_s + self.per_log_widening * widening_feature(w)
        return np.exp(log_s)


def count_neighbours(xy, radius_px):
    """[M] int: for each of one frame's localizations xy [M, 2] (camera px), how many others lie
    within radius_px (exactly at it included)."""
    xy = np.asarray(xy, np.float64).reshape((-1, 2))
    if len(xy) == 0:
        return np.zeros(0, np.int64)
    return cKDTree(xy).query_ball_point(xy, radius_px, return_length=True) - 1


def nearest_distance(xy):
    """[M] float64: for each of one frame's localizations xy [M, 2] (camera px), the distance to
    the nearest other one (inf for a frame's only localization)."""
    xy = np.asarray(xy, np.float64).reshape((-1, 2))
    if len(xy) < 2:
        return np.full(len(xy), np.inf)
    return cKDTree(xy).query(xy, k=2)[0][:, 1]


def nearest_feature(distance, nearest_px=NEAREST_PX):
    """log(1 + (nearest_px / r)^2) of the scale for distances r (camera px; inf or NaN: 0; r
    below MIN_NEAREST_PX counts as MIN_NEAREST_PX), float64."""
    r = np.asarray(distance, np.float64)
    r = np.maximum(np.nan_to_num(r, nan=np.inf), MIN_NEAREST_PX)
    return np.log1p((nearest_px / r) ** 2)


def neighbour_feature(k, term="linear"):
    """g(k) of the scale: k itself ("linear") or log(1 + k) ("log1p"), float64."""
    k = np.asarray(k, np.float64)
    return np.log1p(k) if term == "log1p" else k


def photons_feature(photons, reference_photons=200.0):
    """log(N / reference_photons) of the scale, N clipped to PHOTON_RANGE (NaN, a failed
    photometry: N = reference_photons, the term 0), float64."""
    n = np.clip(np.nan_to_num(np.asarray(photons, np.float64), nan=reference_photons),
                *PHOTON_RANGE)
    return np.log(n / reference_photons)


def widening_feature(widening):
    """log w of the scale, w clipped to WIDENING_RANGE (NaN: w = 1), float64."""
    w = np.asarray(widening, np.float64)
    return np.log(np.clip(np.nan_to_num(w, nan=1.0), *WIDENING_RANGE))


# ----------------------------------------------------------------------------- per-pixel maps
# The scale of the posterior std maps (analyze's _posterior_std.tif): an UncertaintyScale of its
# own, fitted on the coverage of per-pixel intervals (benchmarks/calibration_pixel_scale.py).
PIXEL_SCALE_FILE = "pixel_scale.json"


def pixel_factor_map(scale: UncertaintyScale, xy, photons, shape, upsample) -> np.ndarray:
    """[upsample * H, upsample * W] scale of one frame's posterior std map: every camera pixel of
    the frame (shape (H, W)) takes the factor (scale.factor) of the localization nearest its
    centre, so a pixel is scaled for the crowding and brightness of the emitter that shapes it;
    a frame without localizations takes exp(intercept) (k = 0, N = reference_photons).

    xy [M, 2] (x, y) camera px, pixel centres at +0.5 (analyze's convention); photons [M] the
    localizations' photometry (NaN where it failed). A scale with a background term is refused:
    the maps' scales are fitted without background so far."""
    if scale.uses_background:
        raise ValueError("a per-pixel scale with a background term (per_log_widening != 0) is "
                         "not supported: fit the map scale without it")
    height, width = (int(v) for v in shape)
    up = int(upsample)
    if height < 1 or width < 1 or up < 1:
        raise ValueError(f"shape must be positive (H, W) and upsample >= 1 (got {shape}, "
                         f"{upsample})")
    xy = np.asarray(xy, np.float64).reshape((-1, 2))
    if len(xy) == 0:
        lr = np.full((height, width), math.exp(scale.intercept))
    else:
        lr = scale.factor(xy, photons)[nearest_localization(xy, (height, width))]
    return np.repeat(np.repeat(lr, up, axis=0), up, axis=1)


def nearest_localization(xy, shape) -> np.ndarray:
    """[H, W] int: for each camera pixel of a frame of shape (H, W), the index of the
    localization of xy [M, 2] (x, y camera px, pixel centres at +0.5; M >= 1) nearest its
    centre."""
    height, width = (int(v) for v in shape)
    rows, cols = np.mgrid[0:height, 0:width]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    _, nearest = cKDTree(np.asarray(xy, np.float64).reshape((-1, 2))).query(centres)
    return nearest.reshape(height, width)
