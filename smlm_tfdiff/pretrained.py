"""Bundled trained models: `pretrained("paper")` -> a `Pretrained` (phi, psi, config, recipe).

A model folder holds phi.weights.h5, phi_config.json and sim_config.json, and once psi is trained
also psi.weights.h5, psi_config.json and diffusion.json (the diffusion.Recipe: noise schedule, loss
weighting and the sampler's defaults), optionally uncertainty_scale.json (uncertainty.scale: the
calibration scale of psi's per-localization std fitted for these models). A psi_var.weights.h5 left by the removed learned reverse
variance (docs/sampler.md) is ignored."""

import dataclasses
import json
import os
import warnings
from typing import Any, Optional

from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.models.phi import PhiConfig, build_phi
from smlm_tfdiff.simulation.config import SimulationConfig

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclasses.dataclass
class Pretrained:
    """The models of one folder: phi, and psi with its recipe once trained.

    The sampler (diffusion.sampler.PosteriorSampler), the export (serving.py) and analyze read
    these fields; psi, psi_config and recipe are None for a phi-only folder."""

    phi: Any  # keras.Model: frames [B, H, W, 1] ADU -> KDE [B, 4H, 4W, 1] (KDE units).
    config: Optional[SimulationConfig] = None  # What phi was trained for (camera, optics, KDE).
    phi_config: Optional[PhiConfig] = None
    psi: Optional[Any] = None  # keras.Model {y_t, y_hat, noise_level} -> eps [B, 4H, 4W, 1].
    source: str = ""  # The folder (or checkpoint) the models were read from.
    psi_config: Optional[Any] = None  # models.psi.PsiConfig.
    recipe: Optional[Any] = None  # diffusion.recipe.Recipe: diffusion.json.
    # Detection in phi's and psi's KDEs: detection.json, or the detect_* keys of an older
    # sim_config.json, else the defaults.
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    # uncertainty.scale.UncertaintyScale of psi's per-localization std (uncertainty_scale.json),
    # fitted by simulation for these models and recipe; None where the folder has none.
    uncertainty_scale: Optional[Any] = None
    # The UncertaintyScale of psi's per-pixel std maps (pixel_scale.json; applied per pixel by
    # uncertainty.scale.pixel_factor_map), fitted on per-pixel coverage; None where none.
    pixel_scale: Optional[Any] = None
    # The PosteriorSampler that sample_posterior compiled for these models (kept for later calls).
    sampler: Optional[Any] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    # The recipe's fields, read-only (None without psi).
    @property
    def schedule(self):
        """diffusion.NoiseSchedule psi was trained with."""
        return None if self.recipe is None else self.recipe.schedule

    @property
    def weighting(self) -> str:
        """Loss weighting psi was trained with ("snr" or "simple")."""
        return "" if self.recipe is None else self.recipe.weighting

    @property
    def t_start(self) -> Optional[int]:
        """Default guided-start step of the sampler."""
        return None if self.recipe is None else self.recipe.t_start

    @property
    def num_steps(self) -> Optional[int]:
        """Default number of reverse steps from t_start."""
        return None if self.recipe is None else self.recipe.num_steps

    def scene_config(self, preset: str) -> SimulationConfig:
        """The model's config (camera, optics, KDE grid) with the scene of `preset`
        (emitter count, region, photons, background): held-out data the model is meant for."""
        scene = SimulationConfig.preset(preset)
        return self.config.replace(**{k: getattr(scene, k) for k in SCENE_FIELDS})


# What a preset's data is, beyond the camera, optics and KDE grid of the model: the frame size,
# the emitters, their brightness and the background, with the per-frame distributions of each.
SCENE_FIELDS = ("frame_height", "frame_width", "photons", "photons_range",
                "photons_distribution", "photons_frame_spread", "photons_frame_spread_range",
                "photons_frame_spread_zero_fraction",
                "num_emitters", "emitter_count",
                "max_emitters", "density_range", "region", "disc_radius", "disc_center", "margin",
                "cluster_fraction", "cluster_radius_range", "cluster_density_range",
                "background", "background_range")


def load_phi(run_dir):
    """phi from a folder holding phi.weights.h5, phi_config.json and sim_config.json, or from a
    training run still in progress (run_config.json + checkpoints/: the latest checkpoint)."""
    if (not os.path.exists(os.path.join(run_dir, "phi.weights.h5"))
            and os.path.exists(os.path.join(run_dir, "run_config.json"))):
        return _load_phi_checkpoint(run_dir)
    needed = ["phi.weights.h5", "phi_config.json", "sim_config.json"]
    missing = [n for n in needed if not os.path.exists(os.path.join(run_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"{run_dir!r} lacks {missing}; train phi with `python trainers/train_phi.py "
            f"--out_dir {run_dir}` (it writes these files when it finishes)")
    with open(os.path.join(run_dir, "sim_config.json")) as f:
        sim_dict = json.load(f)
    config = SimulationConfig.from_dict(sim_dict)
    detection = _load_detection(run_dir, sim_dict)
    with open(os.path.join(run_dir, "phi_config.json")) as f:
        phi_config = PhiConfig.from_json(f.read())
    phi = build_phi(config, phi_config)
    path = os.path.join(run_dir, "phi.weights.h5")
    try:
        with warnings.catch_warnings():  # Keras warns about every group of a legacy file.
            warnings.simplefilter("ignore", UserWarning)
            phi.load_weights(path)
    except ValueError:
        # Files written before the resize-convs were fused (UpSampling2D + Conv2D layers): same
        # weights, other layer keys. Load them into that graph and copy by layer name.
        legacy = build_phi(config, phi_config, fused_resize=False)
        legacy.load_weights(path)
        for layer in phi.layers:
            if layer.weights:
                layer.set_weights(legacy.get_layer(layer.name).get_weights())
    return Pretrained(phi=phi, config=config, phi_config=phi_config, source=run_dir,
                      detection=detection)


def _load_detection(run_dir, sim_dict):
    """detection.json of a model folder, else the detect_* keys of its sim_config.json dict."""
    path = os.path.join(run_dir, "detection.json")
    if os.path.exists(path):
        with open(path) as f:
            return DetectionConfig.from_json(f.read())
    return DetectionConfig.from_legacy(sim_dict)


def _load_phi_checkpoint(run_dir):
    import tensorflow as tf
    with open(os.path.join(run_dir, "run_config.json")) as f:
        info = json.load(f)
    config = SimulationConfig.from_dict(info["sim_config"])
    phi_config = PhiConfig(**info["phi_config"])
    latest = _latest_checkpoint(run_dir)
    phi = build_phi(config, phi_config)
    tf.train.Checkpoint(model=phi).restore(latest).expect_partial()
    return Pretrained(phi=phi, config=config, phi_config=phi_config, source=latest,
                      detection=DetectionConfig.from_legacy(info["sim_config"]))


def load_models(run_dir):
    """phi and, when the folder has one, psi (see the module docstring for the files). A psi
    training run still in progress loads its phi and the EMA weights of its latest checkpoint."""
    info = _run_info(run_dir)
    if "psi_config" in info and not os.path.exists(os.path.join(run_dir, "psi.weights.h5")):
        return _load_psi_checkpoint(run_dir, info)
    models = load_phi(run_dir)
    if not os.path.exists(os.path.join(run_dir, "psi.weights.h5")):
        return models
    from smlm_tfdiff.models.psi import PsiConfig
    missing = [n for n in ("psi_config.json", "diffusion.json")
               if not os.path.exists(os.path.join(run_dir, n))]
    if missing:
        raise FileNotFoundError(f"{run_dir!r} has psi.weights.h5 but lacks {missing}; copy the "
                                "whole output folder of trainers/train_psi.py")
    with open(os.path.join(run_dir, "psi_config.json")) as f:
        psi_config = PsiConfig.from_json(f.read())
    from smlm_tfdiff.diffusion.recipe import Recipe
    with open(os.path.join(run_dir, "diffusion.json")) as f:
        models = _with_psi(models, psi_config, Recipe.from_json(f.read()))
    models.psi.load_weights(os.path.join(run_dir, "psi.weights.h5"))
    from smlm_tfdiff.uncertainty.scale import PIXEL_SCALE_FILE, SCALE_FILE, UncertaintyScale
    for name, field, what in ((SCALE_FILE, "uncertainty_scale", "psi's spread"),
                              (PIXEL_SCALE_FILE, "pixel_scale", "psi's per-pixel std maps")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                try:
                    scale = UncertaintyScale.from_json(f.read())
                    if field == "pixel_scale" and scale.uses_background:
                        raise ValueError("a map scale with a background term is not supported")
                except ValueError as err:
                    raise ValueError(f"{path}: {err}; fix or remove the file (without it "
                                     f"analyze reports {what} unscaled)") from None
            setattr(models, field, scale)
    return models


def _with_psi(models, psi_config, recipe):
    """`models` with an untrained psi of psi_config and the recipe (diffusion.Recipe)."""
    from smlm_tfdiff.models.psi import build_psi
    return dataclasses.replace(models, psi=build_psi(psi_config), psi_config=psi_config,
                               recipe=recipe)


def _run_info(run_dir):
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _load_psi_checkpoint(run_dir, info):
    from smlm_tfdiff.diffusion.recipe import Recipe
    from smlm_tfdiff.models.psi import PsiConfig
    latest = _latest_checkpoint(run_dir, "psi")
    models = _with_psi(load_phi_source(info["phi"]), PsiConfig(**info["psi_config"]),
                       Recipe.from_dict(info["diffusion"]))
    _restore_ema(models.psi, latest, info)
    return dataclasses.replace(models, source=latest)


def _latest_checkpoint(run_dir, what=""):
    """The newest Trainer checkpoint of a run in progress; a clear error when there is none."""
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None:
        what = f"{what} " if what else ""
        raise FileNotFoundError(f"{run_dir!r} has no {what}checkpoint yet; let training run until "
                                "the first --checkpoint_every steps have passed")
    return latest


def _restore_ema(model, checkpoint, info):
    """Restore a Trainer checkpoint into model, its EMA weights when the run kept them."""
    import tensorflow as tf
    weights = model.trainable_variables
    ckpt = {"model": model}
    if info.get("trainer", {}).get("ema_decay") is not None:
        ckpt["ema"] = [tf.Variable(v, trainable=False) for v in weights]
    tf.train.Checkpoint(**ckpt).restore(checkpoint).expect_partial()
    for v, e in zip(weights, ckpt.get("ema", [])):
        v.assign(e)


def load_phi_source(source):
    """A bundled model name ("paper") or a run folder -> Pretrained (phi, and psi if present)."""
    if os.path.isdir(source):
        return load_models(source)
    return pretrained(source)


def save_models(out_dir, models, psi=None, psi_config=None, recipe=None):
    """Write phi (from `models`) and optionally psi (with its psi_config and recipe, a
    diffusion.Recipe written as diffusion.json) into out_dir so `load_models(out_dir)` reads them
    back. Each file is written under a temporary name and renamed when complete."""
    os.makedirs(out_dir, exist_ok=True)

    def write(name, writer):
        tmp = os.path.join(out_dir, f".{name}.tmp" + (".weights.h5" if name.endswith(".h5") else ""))
        writer(tmp)
        os.replace(tmp, os.path.join(out_dir, name))

    def text(content):
        def writer(path):
            with open(path, "w") as f:
                f.write(content)
        return writer

    write("phi.weights.h5", models.phi.save_weights)
    write("phi_config.json", text(models.phi_config.to_json()))
    write("sim_config.json", text(models.config.to_json()))
    write("detection.json", text(models.detection.to_json()))
    if psi is not None:
        write("psi.weights.h5", psi.save_weights)
        write("psi_config.json", text(psi_config.to_json()))
        write("diffusion.json", text(recipe.to_json()))


def available():
    """Names of the bundled models."""
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(d for d in os.listdir(WEIGHTS_DIR)
                  if os.path.exists(os.path.join(WEIGHTS_DIR, d, "phi.weights.h5")))


def pretrained(name="paper"):
    """The bundled model trained for preset `name` (see available())."""
    if name not in available():
        raise ValueError(f"no bundled model {name!r}; bundled: {available()}. Load your own "
                         "training run with smlm_tfdiff.pretrained.load_phi(run_dir)")
    return load_models(os.path.join(WEIGHTS_DIR, name))
