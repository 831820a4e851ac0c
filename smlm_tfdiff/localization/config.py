"""Detection settings: how emitters are found and refined in a KDE (localization.detection).

Separate from the simulator's SimulationConfig, which describes the camera, optics, scene and KDE
grid; detection needs that grid (upsample, kde_sigma) too, so detect() takes both. Model folders
written before the split kept these settings in sim_config.json as detect_threshold,
detect_min_sigma, detect_max_sigma, detect_num_sigma and refine_radius; `from_legacy` reads them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

# Keys of a pre-split sim_config.json -> DetectionConfig fields.
LEGACY_KEYS = {"detect_threshold": "threshold", "detect_min_sigma": "min_sigma",
               "detect_max_sigma": "max_sigma", "detect_num_sigma": "num_sigma",
               "refine_radius": "refine_radius"}

IN_SAMPLES = ("detect", "refit")  # DetectionConfig.in_samples
IN_SAMPLES_KEY = "detect_in_samples"  # Its key in a SavedModel's sim_config.json (to_legacy).
SPLIT_OFFSET_KEY = "detect_split_offset"  # Likewise for split_offset.
SPLIT_TRIGGER_KEY = "detect_split_trigger"  # And split_trigger.


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """LoG detection and sub-pixel refinement on the HR grid.

    threshold: scale-normalised LoG response, KDE units (an isolated emitter of the fixed-scale KDE
        gives ~0.43 at 2 HR px, so 0.2 is about half an emitter).
    min_sigma, max_sigma, num_sigma: LoG scales in HR pixels. One scale by default: the KDE kernel
        width is known, and a scale search lets merged pairs suppress resolved ones.
    refine_radius: half-width of the sub-pixel refinement window, HR pixels.
    split_offset: where a peak tried as two (deblending) starts its two parts, +- this many KDE
        sigmas along its major axis; the fit moves them from there. 0.25 (the `paper` model's,
        tuned with it); 0.75 for a phi whose KDE holds close pairs' full mass (the whole-field
        models': the same P / R on validation scenes and 1.5-2x faster, the fits start nearer
        their end).
    split_trigger: the fitted amplitude (emitters) from which a peak is tried as two; 1.25
        (detection.DEBLEND_DEFAULTS, tuned with the `paper` model). A higher one trades recall
        of close pairs for precision where the KDE swells single emitters in crowds. A
        ``deblend={"trigger": ...}`` given to detect wins over it.
    in_samples: how analyze finds its localizations in each posterior sample for their
        per-localization uncertainty: "detect" (this detection afresh in every sample, then a
        one-to-one matching; localization.batched) or "refit" (the localizations refitted in
        every sample from their positions, ~10x cheaper; localization.refit). A model's
        calibration scale is fitted for one of them.
    """

    threshold: float = 0.2
    min_sigma: float = 2.0
    max_sigma: float = 2.0
    num_sigma: int = 1
    refine_radius: int = 3
    in_samples: str = "detect"
    split_offset: float = 0.25
    split_trigger: float = 1.25

    def __post_init__(self):
        def fail(field, message):
            raise ValueError(f"DetectionConfig.{field}: {message}")

        for field in ("threshold", "min_sigma", "max_sigma", "split_offset", "split_trigger"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                 np.floating)):
                fail(field, f"must be a number (got {value!r})")
        for field in ("num_sigma", "refine_radius"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                fail(field, f"must be an integer (got {value!r})")
            if value < 1:
                fail(field, f"must be >= 1 (got {value})")
        if self.in_samples not in IN_SAMPLES:
            fail("in_samples", f"must be one of {IN_SAMPLES} (got {self.in_samples!r})")
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            fail("threshold", f"must be a finite number > 0 (got {self.threshold!r})")
        if not (np.isfinite(self.split_offset) and self.split_offset > 0):
            fail("split_offset", f"must be a finite number > 0 KDE sigmas "
                                 f"(got {self.split_offset!r})")
        if not (np.isfinite(self.split_trigger) and self.split_trigger > 0):
            fail("split_trigger", f"must be a finite number > 0 emitters "
                                  f"(got {self.split_trigger!r})")
        if not (np.isfinite(self.min_sigma) and self.min_sigma > 0):
            fail("min_sigma", f"must be a finite number > 0 HR pixels (got {self.min_sigma!r})")
        if not (np.isfinite(self.max_sigma) and self.max_sigma >= self.min_sigma):
            fail("max_sigma", f"must be finite and >= min_sigma {self.min_sigma} "
                              f"(got {self.max_sigma!r})")

    def replace(self, **changes) -> "DetectionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (getattr(self, f.name).item() if isinstance(
            getattr(self, f.name), np.generic) else getattr(self, f.name))
            for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DetectionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown DetectionConfig fields {sorted(unknown)}; "
                             f"choose from {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "DetectionConfig":
        return cls.from_dict(json.loads(text))

    def to_legacy(self) -> dict:
        """The pre-split sim_config.json keys (a SavedModel's sim_config.json carries these, so
        exports stay readable by older versions), and IN_SAMPLES_KEY where in_samples is not the
        default "detect" (an export that older versions cannot localize as meant)."""
        values = self.to_dict()
        out = {old: values[new] for old, new in LEGACY_KEYS.items()}
        if self.in_samples != "detect":
            out[IN_SAMPLES_KEY] = self.in_samples
        if self.split_offset != DetectionConfig.split_offset:
            out[SPLIT_OFFSET_KEY] = self.split_offset
        if self.split_trigger != DetectionConfig.split_trigger:
            out[SPLIT_TRIGGER_KEY] = self.split_trigger
        return out

    @classmethod
    def from_legacy(cls, sim_config: Mapping[str, Any]) -> "DetectionConfig":
        """The detection settings of a pre-split sim_config.json dict (defaults where absent)."""
        keys = {**LEGACY_KEYS, IN_SAMPLES_KEY: "in_samples", SPLIT_OFFSET_KEY: "split_offset",
                SPLIT_TRIGGER_KEY: "split_trigger"}
        return cls(**{new: sim_config[old] for old, new in keys.items() if old in sim_config})
