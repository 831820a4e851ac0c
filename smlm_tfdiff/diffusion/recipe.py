"""The sampling recipe of a trained psi: what a model folder's diffusion.json holds.

One frozen `Recipe` carries the noise schedule psi was trained with, the loss weighting, and the
sampler's defaults: the guided-start step t_start, the number of reverse steps num_steps from it,
the method (ancestral "ddpm" or deterministic "ddim"), the restart sweeps (restart_t,
restarts) and the posterior samples analyze draws per frame (num_samples). The trainers write it
(`to_json`), `pretrained.load_models` reads it (`from_json`), and the sampler, the export and
analyze take their defaults from it, so a model samples the way it was trained and validated
unless a caller asks otherwise.

diffusion.json (keys; files written before method and the sweeps existed lack them):
  schedule     NoiseSchedule.get_config(), e.g. {"name": "paper", "T": 100, ...}
  weighting    "snr" or "simple" ("" when unknown)
  t_start      int in 1..T: the guided start t* (default T)
  num_steps    int in 1..t_start: reverse steps from t_start (default t_start, every level)
  method       "ddpm" (default, the bundled models') or "ddim"
  restart_t    int in 1..T, only with restart sweeps: each sample is noised back to restart_t and
  restarts     denoised again, restarts times (sampler.PosteriorSampler)
  num_samples  int >= 2, optional: posterior samples per frame analyze draws by default (absent:
               analyze's DEFAULT_NUM_SAMPLES, 16); a model whose calibration scale was fitted
               with fewer samples says so here
A SavedModel's diffusion.json (serving.py) adds the export-only keys EXPORT_KEYS.
"""

import dataclasses
import json
from typing import Optional, Tuple

from smlm_tfdiff.diffusion.schedule import WEIGHTINGS, NoiseSchedule

# Sampler methods and their eta (sampler.generate_step): 1 ancestral DDPM, 0 DDIM.
METHODS = {"ddpm": 1.0, "ddim": 0.0}
DEFAULT_METHOD = "ddpm"  # The bundled models' (and analyze's and the export's) method.
# Keys a SavedModel's diffusion.json adds to the recipe's (serving.SamplerModule); ignored here.
EXPORT_KEYS = ("eta", "start", "max_images_per_request")
# Export-only keys of older SavedModels, also ignored: "reverse_variance" ("fixed" or "learned")
# was written before the learned reverse variance was removed (docs/sampler.md).
OLD_EXPORT_KEYS = ("reverse_variance",)


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """How psi was trained and is sampled by default (module docstring). Resolved on creation:
    t_start None -> schedule.T; num_steps None -> t_start (and at most t_start); restarts None ->
    1 with restart_t, 0 without."""

    schedule: NoiseSchedule
    weighting: str = "snr"
    t_start: Optional[int] = None
    num_steps: Optional[int] = None
    method: str = DEFAULT_METHOD
    restart_t: Optional[int] = None
    restarts: Optional[int] = None
    num_samples: Optional[int] = None

    def __post_init__(self):
        T = self.schedule.T
        t_start = T if self.t_start is None else int(self.t_start)
        if not 1 <= t_start <= T:
            raise ValueError(f"t_start must lie in 1..T = 1..{T} (got {self.t_start})")
        num_steps = t_start if self.num_steps is None else min(int(self.num_steps), t_start)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (got {self.num_steps})")
        if self.weighting not in WEIGHTINGS + ("",):
            raise ValueError(f"weighting must be one of {WEIGHTINGS} (got {self.weighting!r})")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} (got {self.method!r})")
        restart_t, restarts = self.restart_t, self.restarts
        if restart_t is None:
            if restarts:
                raise ValueError(f"restarts = {restarts} needs a restart_t")
            restarts = 0
        else:
            restart_t = int(restart_t)
            if not 1 <= restart_t <= T:
                raise ValueError(f"restart_t must lie in 1..T = 1..{T} (got {restart_t})")
            restarts = 1 if restarts is None else int(restarts)
            if restarts < 1:
                raise ValueError(f"restarts must be >= 1 with restart_t (got {restarts})")
        num_samples = self.num_samples
        if num_samples is not None:
            num_samples = int(num_samples)
            if num_samples < 2:
                raise ValueError(f"num_samples must be >= 2 to estimate a posterior std (got "
                                 f"{self.num_samples})")
        for name, value in (("t_start", t_start), ("num_steps", num_steps),
                            ("restart_t", restart_t), ("restarts", restarts),
                            ("num_samples", num_samples)):
            object.__setattr__(self, name, value)

    @property
    def eta(self) -> float:
        """The method's eta (1 DDPM, 0 DDIM)."""
        return METHODS[self.method]

    def steps_for(self, t_start=None) -> Tuple[int, int]:
        """(t_start, num_steps) of the guided start: for t_start None (or the recipe's own) the
        recipe's; for another t_start, every level from it (t_start, t_start)."""
        if t_start is not None and int(t_start) != self.t_start:
            return int(t_start), int(t_start)
        return self.t_start, self.num_steps

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (resolved again)."""
        return dataclasses.replace(self, **changes)

    # JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """diffusion.json as a dict; restart_t and restarts only when the recipe has sweeps,
        num_samples only when set."""
        out = {"schedule": self.schedule.get_config(), "weighting": self.weighting,
               "t_start": self.t_start, "num_steps": self.num_steps, "method": self.method}
        if self.restart_t is not None:
            out.update(restart_t=self.restart_t, restarts=self.restarts)
        if self.num_samples is not None:
            out["num_samples"] = self.num_samples
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, config: dict) -> "Recipe":
        """From diffusion.json's dict, old files (without method or sweeps) included; the
        export-only EXPORT_KEYS (and OLD_EXPORT_KEYS) are ignored, any other unknown key is an
        error."""
        config = dict(config)
        for key in EXPORT_KEYS + OLD_EXPORT_KEYS:
            config.pop(key, None)
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "schedule" not in config:
            raise ValueError(f"a diffusion recipe holds a schedule and optionally weighting, "
                             f"t_start, num_steps, method, restart_t, restarts and num_samples "
                             f"(got unknown "
                             f"keys {sorted(unknown)}, schedule "
                             f"{'present' if 'schedule' in config else 'missing'})")
        config["schedule"] = NoiseSchedule.from_config(config["schedule"])
        config.setdefault("weighting", "")
        return cls(**config)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other):
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self):
        sweeps = (f", restart_t={self.restart_t}, restarts={self.restarts}"
                  if self.restart_t is not None else "")
        samples = f", num_samples={self.num_samples}" if self.num_samples is not None else ""
        return (f"Recipe({self.schedule!r}, weighting={self.weighting!r}, t_start={self.t_start}, "
                f"num_steps={self.num_steps}, method={self.method!r}{sweeps}{samples})")
