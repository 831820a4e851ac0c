"""phi: the Deep-STORM-style KDE estimator, frame [B, H, W, 1] ADU -> KDE [B, 4H, 4W, 1].

Seeds' appendix A.6 (after Nehme et al. 2020): input normalisation to photons, a multi-scale context
aggregation module of dilated convolutions, an upsampling module of 2x nearest-neighbour
resize-convolutions, a prediction module of three conv blocks, and a HardTanh-style output.
Fully convolutional: any frame size works at inference.
"""

import dataclasses
import json
from typing import Tuple

import keras
from keras import layers, ops


@dataclasses.dataclass
class PhiConfig:
    """Widths, depths and dilations of phi. Trained with MSE against the KDE (seeds' L_phi)."""

    context_filters: int = 32  # Channels of the LR context module.
    dilations: Tuple[int, ...] = (1, 2, 4, 8, 4, 2)  # One dilated 3x3 conv per entry.
    upsample_filters: Tuple[int, ...] = (16, 8)  # One 2x resize-conv per entry (4x in total).
    prediction_filters: int = 8  # Channels of the three HR prediction blocks.
    prediction_blocks: int = 3
    photon_scale: float = 20.0  # Photons -> network input: (x - offset) / gain / photon_scale.

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)
        self.upsample_filters = tuple(int(f) for f in self.upsample_filters)
        for name in ("context_filters", "prediction_filters", "prediction_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PhiConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"PhiConfig.dilations must be positive (got {self.dilations})")
        if not self.upsample_filters or min(self.upsample_filters) < 1:
            raise ValueError(f"PhiConfig.upsample_filters must be positive "
                             f"(got {self.upsample_filters})")
        if not self.photon_scale > 0:
            raise ValueError(f"PhiConfig.photon_scale must be > 0 (got {self.photon_scale})")

    @property
    def upsample(self) -> int:
        return 2 ** len(self.upsample_filters)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PhiConfig":
        return cls(**json.loads(text))


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class PhotonNormalization(layers.Layer):
    """ADU -> scaled photons: (x - offset) / (gain * photon_scale). Scalar camera values."""

    def __init__(self, offset=0.0, gain=1.0, photon_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = float(offset)
        self.gain = float(gain)
        self.photon_scale = float(photon_scale)

    def call(self, x):
        return (x - self.offset) / (self.gain * self.photon_scale)

    def get_config(self):
        return {**super().get_config(), "offset": self.offset, "gain": self.gain,
                "photon_scale": self.photon_scale}


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class HardTanh(layers.Layer):
    """Element-wise clip to [low, high]; high is set above anything a KDE target reaches.

    Identity while training: a pixel whose pre-activation is below 0 would otherwise get no
    gradient even where the target is positive, and MSE training can die at an all-zero output.
    The MSE optimum is the same, and inference (training=False) clips as the seeds do.
    """

    def __init__(self, low=0.0, high=1.0, **kwargs):
        super().__init__(**kwargs)
        self.low = float(low)
        self.high = float(high)

    def call(self, x, training=None):
        if training:
            return x
        return ops.clip(x, self.low, self.high)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


def _conv_block(x, filters, name, dilation=1):
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def output_bound(sim_config) -> float:
    """Upper bound of the output: every emitter adds at most 1 to a KDE pixel (kernel peak < 1),
    so K padded emitters can never exceed K; never below 4 for sparse presets."""
    return float(max(4, sim_config.padded_emitters))


def build_phi(sim_config, phi_config=None, name="phi"):
    """The phi model for a SimulationConfig (camera offset/gain, KDE upsample factor)."""
    phi_config = phi_config or PhiConfig()
    if phi_config.upsample != sim_config.upsample:
        raise ValueError(f"PhiConfig.upsample_filters gives {phi_config.upsample}x upsampling but "
                         f"the SimulationConfig asks for {sim_config.upsample}x")
    for field in ("offset", "gain"):
        if getattr(getattr(sim_config, field), "ndim", 0):
            raise ValueError(f"phi normalises with scalar {field}; for per-pixel camera maps convert "
                             "frames to photons first (physics.to_photons) and build phi from a "
                             "config with offset=0, gain=1")
    frames = keras.Input(shape=(None, None, 1), name="frames")
    x0 = PhotonNormalization(sim_config.offset, sim_config.gain, phi_config.photon_scale,
                             name="photons")(frames)
    # Multi-scale context aggregation: dilated convs, each seeing the input features again.
    x = _conv_block(x0, phi_config.context_filters, "context0")
    for i, d in enumerate(phi_config.dilations):
        x = layers.Concatenate(name=f"context{i + 1}_skip")([x, x0])
        x = _conv_block(x, phi_config.context_filters, f"context{i + 1}", d)
    # Upsampling: nearest-neighbour 2x resize followed by a conv, twice.
    for i, f in enumerate(phi_config.upsample_filters):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"upsample{i}")(x)
        x = _conv_block(x, f, f"upsample{i}")
    # Prediction: three conv blocks, a 1x1 conv and the bounded linear output.
    for i in range(phi_config.prediction_blocks):
        x = _conv_block(x, phi_config.prediction_filters, f"predict{i}")
    x = layers.Conv2D(1, 1, name="predict_out")(x)
    kde = HardTanh(0.0, output_bound(sim_config), name="kde")(x)
    return keras.Model(frames, kde, name=name)
