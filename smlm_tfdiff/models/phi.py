"""phi: the Deep-STORM-style KDE estimator, frame [B, H, W, 1] ADU -> KDE [B, 4H, 4W, 1]
([B, H, W, 2] with the emitters' brightness spread as a second channel: PhiConfig.spread_input).

Seeds' appendix A.6 (after Nehme et al. 2020): input normalisation to photons, a multi-scale context
aggregation module of dilated convolutions, an upsampling module of 2x nearest-neighbour
resize-convolutions, a prediction module of three conv blocks, and a HardTanh-style output.
Fully convolutional: any frame size works at inference.
"""

import dataclasses
import json
import math
from typing import Optional, Tuple

import keras
import numpy as np
from keras import layers, ops


INPUT_TRANSFORMS = ("linear", "anscombe")
# Log-sd of the N0 a brightness-normalised phi is told in training around the frame's true N0:
# analyze estimates N0 from the movie (a median of photometry), never exactly.
BRIGHTNESS_JITTER = 0.1
# Sd of the spread (log-sd) a phi told it (PhiConfig.spread_input) is told in training around the
# frame's true one: analyze measures it from a few hundred spots' photometry.
SPREAD_JITTER = 0.05


@dataclasses.dataclass
class PhiConfig:
    """Widths, depths and dilations of phi. Trained with MSE against the KDE (seeds' L_phi)."""

    context_filters: int = 32  # Channels of the LR context module.
    dilations: Tuple[int, ...] = (1, 2, 4, 8, 4, 2)  # One dilated 3x3 conv per entry.
    upsample_filters: Tuple[int, ...] = (16, 8)  # One 2x resize-conv per entry (4x in total).
    prediction_filters: int = 8  # Channels of the three HR prediction blocks.
    prediction_blocks: int = 3
    photon_scale: float = 20.0  # Divisor of the network input (after input_transform).
    # "linear": the input is photons, (x - offset) / gain (the seeds'). "anscombe": the
    # variance-stabilised photons 2 sqrt(max(p + 3/8 + readout_var / gain^2, 0)) (generalised
    # Anscombe): shot noise becomes ~1 at every brightness, so dim and bright frames look alike to
    # the network (N0 100-5000 spans ~50x in photons, ~7x after the transform).
    input_transform: str = "linear"
    # Dropout after every context and upsampling block (0: none). A phi trained with dropout is
    # the MC-dropout baseline of the uncertainty evaluation (smlm_tfdiff.uncertainty.mc_dropout).
    dropout: float = 0.0
    # Set (photons): phi reads frames whose photons are scaled by brightness_reference / N0, N0
    # the movie's typical photons per emitter (normalize_brightness; analyze estimates N0 or takes
    # it from the user). One emitter is then as bright to phi in every movie, so a close pair
    # (twice the light) is told from one brighter emitter, which a phi trained over a brightness
    # range cannot do from the light alone. None: frames as they are.
    brightness_reference: Optional[float] = None
    # True (with brightness_reference): phi is also told the log-sd of the movie's emitters'
    # photons about N0 (the dye's spread: 0 when all emitters are alike, ~0.4 for a dye whose
    # photons vary from frame to frame), as a second input channel holding that number at every
    # pixel (phi_input; analyze measures it, io.brightness). Told no spread, a phi must guess
    # whether twice the light is a close pair or one bright emitter; told it, it counts pairs
    # where emitters are alike and does not split bright ones where they vary.
    spread_input: bool = False

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
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"PhiConfig.input_transform must be one of {INPUT_TRANSFORMS} "
                             f"(got {self.input_transform!r})")
        self.dropout = float(self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PhiConfig.dropout must lie in [0, 1) (got {self.dropout})")
        self.spread_input = bool(self.spread_input)
        if self.spread_input and self.brightness_reference is None:
            raise ValueError("PhiConfig.spread_input tells phi the spread of the emitters' "
                             "photons about N0: set brightness_reference too")
        if self.brightness_reference is not None:
            self.brightness_reference = float(self.brightness_reference)
            if not (math.isfinite(self.brightness_reference) and self.brightness_reference > 0):
                raise ValueError(f"PhiConfig.brightness_reference must be > 0 photons or None "
                                 f"(got {self.brightness_reference})")

    @property
    def upsample(self) -> int:
        return 2 ** len(self.upsample_filters)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PhiConfig":
        return cls(**json.loads(text))


def normalize_brightness(frames, offset, reference, n0):
    """Frames [B, H, W, 1] ADU as a brightness-normalised phi reads them: their photons scaled
    by reference / n0, offset kept (offset + (frames - offset) reference / n0). n0: the photons
    per emitter, a number or [B] per frame. NumPy, TensorFlow or JAX, as given."""
    factor = reference / n0
    if getattr(factor, "ndim", 0):  # Per frame.
        factor = factor[:, None, None, None]
    return offset + (frames - offset) * factor


def phi_input(frames, offset, phi_config, n0=None, spread=None):
    """What phi reads for frames [B, H, W, 1] ADU: the frames as they are; scaled to N0 for a
    brightness-normalised phi (normalize_brightness; n0 a number or [B]); and for one told the
    spread (PhiConfig.spread_input), the spread (log-sd, a number or [B]) as a second channel
    [B, H, W, 2]. NumPy, or tensors of the Keras backend, as given; a ValueError names a missing
    value."""
    if phi_config is None or phi_config.brightness_reference is None:
        return frames
    if n0 is None:
        raise ValueError("this phi reads frames scaled to the movie's photons per emitter (N0): "
                         "pass n0")
    frames = normalize_brightness(frames, offset, phi_config.brightness_reference, n0)
    if not phi_config.spread_input:
        return frames
    if spread is None:
        raise ValueError("this phi is told the spread of the emitters' photons about N0 "
                         "(PhiConfig.spread_input): pass spread (a log-sd >= 0)")
    if isinstance(frames, np.ndarray):
        value = np.reshape(np.asarray(spread, frames.dtype), (-1, 1, 1, 1))
        return np.concatenate([frames, np.zeros_like(frames) + value], axis=-1)
    value = ops.reshape(ops.cast(spread, frames.dtype), (-1, 1, 1, 1))
    return ops.concatenate([frames, ops.zeros_like(frames) + value], axis=-1)


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class InputChannels(layers.Layer):
    """Channels [start, stop) of the input [B, H, W, C]."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), int(stop)

    def call(self, x):
        return x[..., self.start:self.stop]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.stop - self.start,)

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class PhotonNormalization(layers.Layer):
    """ADU -> network input, scalar camera values. With p = (x - offset) / gain photons:
    "linear": p / photon_scale; "anscombe": 2 sqrt(max(p + 3/8 + readout_var / gain^2, 0)) /
    photon_scale (readout_var in ADU^2)."""

    def __init__(self, offset=0.0, gain=1.0, photon_scale=1.0, transform="linear",
                 readout_var=0.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = float(offset)
        self.gain = float(gain)
        self.photon_scale = float(photon_scale)
        self.transform = str(transform)
        self.readout_var = float(readout_var)
        if self.transform not in INPUT_TRANSFORMS:
            raise ValueError(f"transform must be one of {INPUT_TRANSFORMS} (got {transform!r})")

    def call(self, x):
        photons = (x - self.offset) / self.gain
        if self.transform == "anscombe":
            shift = 3.0 / 8.0 + self.readout_var / self.gain ** 2
            photons = 2.0 * ops.sqrt(ops.maximum(photons + shift, 0.0))
        return photons / self.photon_scale

    def get_config(self):
        return {**super().get_config(), "offset": self.offset, "gain": self.gain,
                "photon_scale": self.photon_scale, "transform": self.transform,
                "readout_var": self.readout_var}


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


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class ResizeConv2D(layers.Conv2D):
    """2x nearest-neighbour resize followed by a 3x3 "same" conv, [B, H, W, C] -> [B, 2H, 2W, F].

    Computed as its exact sub-pixel equivalent: the 3x3 kernel is folded into one 3x3 kernel per
    output phase, applied at the input resolution ([B, H, W, 4F]) and interleaved (depth to
    space). Same weights and result as UpSampling2D + Conv2D, a quarter of the conv positions;
    phi's two resize-convs take ~40% less time on a CPU (benchmarks/phi.py).
    """

    # _FOLD[a, p, r]: weight of the resized-grid tap r (rows -1, 0, +1 around the output pixel)
    # at input offset p (-1, 0, +1) for output phase a (even or odd row); the same for columns.
    _FOLD = (((1, 0, 0), (0, 1, 1), (0, 0, 0)), ((0, 0, 0), (1, 1, 0), (0, 0, 1)))

    def __init__(self, filters, **kwargs):
        kwargs.setdefault("kernel_size", 3)
        kwargs.setdefault("padding", "same")
        super().__init__(filters, **kwargs)
        if (tuple(self.kernel_size) != (3, 3) or self.padding != "same"
                or tuple(self.strides) != (1, 1) or tuple(self.dilation_rate) != (1, 1)
                or self.groups != 1 or self.data_format != "channels_last"):
            raise ValueError("ResizeConv2D supports 3x3 'same' kernels, stride 1, no dilation, "
                             "channels_last")

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, None if h is None else 2 * h, None if w is None else 2 * w, self.filters)

    def call(self, inputs):
        fold = ops.convert_to_tensor(self._FOLD, dtype=self.kernel.dtype)
        # [3, 3, C, 2, 2, F] -> [3, 3, C, 4F], channels ordered (row phase, column phase, filter).
        kernel = ops.einsum("apr,bqs,rsio->pqiabo", fold, fold, self.kernel)
        kernel = ops.reshape(kernel, (3, 3, ops.shape(self.kernel)[2], 4 * self.filters))
        y = ops.conv(inputs, kernel, strides=1, padding="same")
        if self.use_bias:
            y = y + ops.tile(self.bias, [4])
        shape = ops.shape(inputs)
        y = ops.reshape(y, (shape[0], shape[1], shape[2], 2, 2, self.filters))
        y = ops.transpose(y, (0, 1, 3, 2, 4, 5))
        y = ops.reshape(y, (shape[0], 2 * shape[1], 2 * shape[2], self.filters))
        return self.activation(y) if self.activation is not None else y


def _conv_block(x, filters, name, dilation=1, resize=False, dropout=0.0):
    if resize:
        x = ResizeConv2D(filters, use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False,
                          name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    if dropout:  # No weights: a phi with dropout loads the weights of one without, and back.
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def output_bound(sim_config) -> float:
    """Upper bound of the output: every emitter adds at most 1 to a KDE pixel (kernel peak < 1),
    so K padded emitters can never exceed K; never below 4 for sparse presets."""
    return float(max(4, sim_config.padded_emitters))


def add_spread_weights(phi):
    """The weights of phi (a model without PhiConfig.spread_input) for the same phi told the
    spread: every convolution that reads the photons directly (context0 and each context block's
    skip) gets a last input channel, the spread's, with zero weights, so the model computes the
    same function until trained. A list in the order of the spread model's get_weights()."""
    out = []
    for layer in phi.layers:
        for weight in layer.weights:
            value = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
            if layer.name.startswith("context") and weight.name == "kernel":
                value = np.concatenate([value, np.zeros(value.shape[:2] + (1,) + value.shape[3:],
                                                        value.dtype)], axis=2)
            out.append(value)
    return out


def build_phi(sim_config, phi_config=None, name="phi", fused_resize=True):
    """The phi model for a SimulationConfig (camera offset/gain, KDE upsample factor).

    fused_resize=False builds the resize-convs as separate UpSampling2D and Conv2D layers: the
    same function and weights, the layer layout of weight files written before the fusion."""
    phi_config = phi_config or PhiConfig()
    if phi_config.upsample != sim_config.upsample:
        raise ValueError(f"PhiConfig.upsample_filters gives {phi_config.upsample}x upsampling but "
                         f"the SimulationConfig asks for {sim_config.upsample}x")
    # The anscombe input reads the readout variance too; the linear one neither needs nor keeps it.
    anscombe = phi_config.input_transform == "anscombe"
    for field in ("offset", "gain") + (("readout_var",) if anscombe else ()):
        if getattr(getattr(sim_config, field), "ndim", 0):
            raise ValueError(f"phi normalises with scalar {field}; for per-pixel camera maps convert "
                             "frames to photons first (physics.to_photons) and build phi from a "
                             "config with offset=0, gain=1")
    spread = phi_config.spread_input
    frames = keras.Input(shape=(None, None, 2 if spread else 1), name="frames")
    camera = InputChannels(0, 1, name="frame")(frames) if spread else frames
    x0 = PhotonNormalization(sim_config.offset, sim_config.gain, phi_config.photon_scale,
                             phi_config.input_transform,
                             sim_config.readout_var if anscombe else 0.0, name="photons")(camera)
    if spread:  # The spread beside the photons wherever they enter (a last input channel).
        x0 = layers.Concatenate(name="photons_spread")(
            [x0, InputChannels(1, 2, name="spread")(frames)])
    # Multi-scale context aggregation: dilated convs, each seeing the input features again.
    rate = phi_config.dropout
    x = _conv_block(x0, phi_config.context_filters, "context0", dropout=rate)
    for i, d in enumerate(phi_config.dilations):
        x = layers.Concatenate(name=f"context{i + 1}_skip")([x, x0])
        x = _conv_block(x, phi_config.context_filters, f"context{i + 1}", d, dropout=rate)
    # Upsampling: nearest-neighbour 2x resize followed by a conv, twice (fused, ResizeConv2D).
    for i, f in enumerate(phi_config.upsample_filters):
        if not fused_resize:
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"upsample{i}")(x)
        x = _conv_block(x, f, f"upsample{i}", resize=fused_resize, dropout=rate)
    # Prediction: three conv blocks, a 1x1 conv and the bounded linear output.
    for i in range(phi_config.prediction_blocks):
        x = _conv_block(x, phi_config.prediction_filters, f"predict{i}")
    x = layers.Conv2D(1, 1, name="predict_out")(x)
    kde = HardTanh(0.0, output_bound(sim_config), name="kde")(x)
    return keras.Model(frames, kde, name=name)
