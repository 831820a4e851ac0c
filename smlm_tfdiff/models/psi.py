"""psi: the conditional denoiser of the diffusion model, an SR3-style attention U-Net.

eps_pred = psi(y_t, y_hat, sqrt(gamma)): the noise in y_t = sqrt(gamma) z_0 + sqrt(1 - gamma) eps,
given phi's KDE estimate y_hat (seeds' section 3.2 and appendix A.6; architecture after DDPM / SR3,
conditioning on the continuous noise level as WaveGrad / SR3 do, so samplers may use any schedule).

With PsiConfig.frame_condition, psi also sees the camera frame x itself, not only phi's summary
of it: eps_pred = psi(y_t, y_hat, x, sqrt(gamma)). phi's KDE is brightness-free by construction
(every emitter one unit blob), so a psi that sees y_hat alone cannot know how narrow a bright
emitter's posterior is, nor what phi merged on a dense frame; the frame carries that evidence.
The frame enters as variance-stabilised photons repeated onto the KDE grid (an experimental
option, measured without gain so far: experimental/frame_condition.py).

The network's own output is eps (PsiConfig.prediction "eps", the seeds' and the bundled models').
The experimental predictions "v" and "v_residual" (smlm_tfdiff.experimental.PREDICTIONS) read the
same network's output as a v and turn it into eps inside the model (experimental/prediction.py), so
every caller sees eps whatever the prediction.

Layout (DDPM): conv_in -> per level [num_res_blocks x (res block, attention where configured)],
stride-2 conv down between levels -> middle (res, attention, res) -> mirrored up path with skip
concatenations, nearest 2x upsampling + conv -> GroupNorm, swish, zero-initialised conv_out.
Fully convolutional: any height and width divisible by 2^(levels - 1) works at call time.

With PsiConfig.space_to_depth = f > 1 the U-Net runs on an f-times coarser grid: the inputs'
f x f blocks of KDE pixels become f^2 channels of one position (space-to-depth) before conv_in,
and eps_out's f^2 channels are put back into the blocks (depth-to-space) at the end. Nothing is
lost (the blocks are rearranged, not pooled), and every convolution costs ~f^2 fewer positions;
the KDE's kernel (3 HR px) still spans a coarse pixel or more at f <= 4. Height and width must
then divide by f * 2^(levels - 1).

PsiConfig.output_head = c > 0 adds a small head on the KDE grid after depth-to-space: two 3x3
convolutions of c channels over [y_t, 2 y_hat - 1, eps], each followed by a per-channel scale and
shift from the noise-level embedding (FiLM) and swish, and a zero-initialised 3x3 convolution
whose output is added to eps. At low noise eps is y_t's fine, per-pixel noise, amplified by
1 / sqrt(1 - gamma); the coarse grid's channels carry it only through the whole U-Net, and a psi
on the camera grid without the head leaves a floor of noise and an offset in its samples
(weights/wholefield_fast/MODEL.md). The head costs ~c^2 x 9 multiply-adds per KDE pixel.
"""

import dataclasses
import json
import math
from typing import Optional, Tuple

import keras
from keras import layers, ops


from smlm_tfdiff.experimental import PREDICTIONS as _EXPERIMENTAL_PREDICTIONS

PREDICTIONS = ("eps",) + _EXPERIMENTAL_PREDICTIONS


@dataclasses.dataclass
class PsiConfig:
    """Widths and depths of psi.

    attention_resolutions are feature-map side lengths for an `image_size` x `image_size` input
    (default 80, the KDE size of the paper preset). The seeds' "attention at 16x16" does not exist
    on the 80/40/20/10/5 pyramid; the default puts it at 20 and 10 (levels 2 and 3). The levels are
    fixed by the config, so a model built for 80 applied to a 160x160 input attends at 40 and 20.
    The middle block always has attention, at the lowest resolution (5x5 for 80x80).
    """

    base_channels: int = 32  # Channels of level 0; level l has base_channels * multipliers[l].
    channel_multipliers: Tuple[int, ...] = (1, 2, 4, 8, 8)  # One resolution level per entry.
    num_res_blocks: int = 1  # Res blocks per level on the way down (one more on the way up).
    attention_resolutions: Tuple[int, ...] = (20, 10)  # Feature-map sizes for image_size input.
    image_size: int = 80  # Reference input side length for attention_resolutions.
    dropout: float = 0.1  # Inside every res block.
    groups: int = 8  # GroupNorm groups; must divide every channel count.
    num_heads: int = 1  # Self-attention heads; must divide the channels where attention is.
    embedding_dim: int = 128  # Sinusoidal embedding and MLP width of the noise level.
    noise_level_scale: float = 1000.0  # sqrt(gamma) in [0, 1] is scaled before the sinusoids.
    prediction: str = "eps"  # Network output: "eps", or an experimental "v" or "v_residual".
    # Experimental: condition on the camera frame too (experimental/frame_condition.py): the
    # camera it was trained for and the KDE's upsampling factor (frame_condition_fields).
    frame_condition: bool = False
    frame_offset: float = 0.0  # Camera offset, ADU.
    frame_gain: float = 1.0  # ADU per photon.
    frame_readout_var: float = 0.0  # Readout variance, ADU^2.
    frame_upsample: int = 4  # KDE pixels per frame pixel along each axis.
    # The U-Net's grid is this many KDE pixels per side coarser (module docstring); 1: the KDE's.
    space_to_depth: int = 1
    # Channels of the output head on the KDE grid (module docstring); 0: none.
    output_head: int = 0

    def __post_init__(self):
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        for name in ("base_channels", "num_res_blocks", "image_size", "groups", "num_heads",
                     "space_to_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PsiConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"PsiConfig.channel_multipliers must be non-empty and positive "
                             f"(got {self.channel_multipliers})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PsiConfig.dropout must lie in [0, 1) (got {self.dropout})")
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(f"PsiConfig.embedding_dim must be even and >= 2 "
                             f"(got {self.embedding_dim})")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"PsiConfig.prediction must be one of {PREDICTIONS} "
                             f"(got {self.prediction!r})")
        if not self.noise_level_scale > 0:
            raise ValueError(f"PsiConfig.noise_level_scale must be > 0 "
                             f"(got {self.noise_level_scale})")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"PsiConfig.groups = {self.groups} must divide every channel "
                                 f"count {self.channels} (base_channels * channel_multipliers)")
        self.frame_condition = bool(self.frame_condition)
        if self.frame_condition:
            if int(self.frame_upsample) < 1 or not float(self.frame_gain) > 0 \
                    or float(self.frame_readout_var) < 0:
                raise ValueError(f"PsiConfig: frame_upsample must be >= 1, frame_gain > 0 and "
                                 f"frame_readout_var >= 0 (got {self.frame_upsample}, "
                                 f"{self.frame_gain}, {self.frame_readout_var})")
            self.frame_upsample = int(self.frame_upsample)
        self.space_to_depth = int(self.space_to_depth)
        self.output_head = int(self.output_head)
        if self.output_head < 0:
            raise ValueError(f"PsiConfig.output_head must be >= 0 (got {self.output_head})")
        factor = self.downsample_factor
        if self.image_size % factor:
            raise ValueError(f"PsiConfig.image_size = {self.image_size} must be divisible by "
                             f"space_to_depth x 2^(levels - 1) = {factor}")
        sizes = self.resolutions
        for r in self.attention_resolutions:
            if r not in sizes:
                raise ValueError(f"PsiConfig.attention_resolutions: {r} is not a feature-map size "
                                 f"of a {self.image_size}x{self.image_size} input {sizes}")
        for level in self.attention_levels + (len(sizes) - 1,):
            if self.channels[level] % self.num_heads:
                raise ValueError(f"PsiConfig.num_heads = {self.num_heads} must divide the "
                                 f"{self.channels[level]} channels of attention level {level}")

    @property
    def channels(self) -> Tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def downsample_factor(self) -> int:
        """KDE pixels per feature-map pixel at the lowest level: input sides must divide by it."""
        return self.space_to_depth * 2 ** (len(self.channel_multipliers) - 1)

    @property
    def resolutions(self) -> Tuple[int, ...]:
        """Feature-map side length per level for the reference image_size."""
        levels = range(len(self.channel_multipliers))
        return tuple(self.image_size // self.space_to_depth // 2 ** level for level in levels)

    @property
    def attention_levels(self) -> Tuple[int, ...]:
        """Level indices (0 = full resolution) with attention after every res block."""
        return tuple(sorted(self.resolutions.index(r) for r in set(self.attention_resolutions)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PsiConfig":
        return cls(**json.loads(text))

    def same_network(self, other: "PsiConfig") -> bool:
        """True when `other` builds the same layers, up to the reference image_size (attention
        compared by level), the output's reading (prediction), the frame condition (which
        adds one input channel to conv_in) and the output head (whose last layer starts at
        zero): `transfer_weights` moves the weights of one into the other."""
        def key(c):
            d = dataclasses.asdict(c)
            for name in ("image_size", "attention_resolutions", "prediction", "frame_condition",
                         "frame_offset", "frame_gain", "frame_readout_var", "frame_upsample",
                         "output_head"):
                d.pop(name)
            return d, c.attention_levels
        return key(self) == key(other)


def frame_fields(sim_config, frame_condition: bool) -> dict:
    """The PsiConfig fields of the experimental frame condition for frames of `sim_config`'s
    camera and KDE (experimental/frame_condition.py), or none without it."""
    if not frame_condition:
        return {}
    from smlm_tfdiff.experimental.frame_condition import frame_condition_fields
    return frame_condition_fields(sim_config)


def check_input_size(h, w, config: Optional[PsiConfig] = None):
    """Raise ValueError unless an h x w input passes the U-Net (both divisible by
    space_to_depth x 2^(levels-1)).

    Returns the feature-map sizes [(h/f, w/f), (h/2f, w/2f), ...] per level (f: space_to_depth).
    """
    config = config or PsiConfig()
    factor = config.downsample_factor
    if int(h) < 1 or int(w) < 1 or h % factor or w % factor:
        raise ValueError(f"psi with {len(config.channel_multipliers)} levels"
                         + (f" on a {config.space_to_depth}x coarser grid"
                            if config.space_to_depth > 1 else "")
                         + f" needs height and width divisible by {factor} (got {h}x{w}); pad "
                         "or crop the input")
    u = config.frame_upsample
    if config.frame_condition and (h % u or w % u):
        raise ValueError(f"a frame-conditioned psi needs a KDE of whole frame pixels: height and "
                         f"width divisible by {u} (got {h}x{w})")
    f = config.space_to_depth
    return [(h // f // 2 ** level, w // f // 2 ** level)
            for level in range(len(config.channel_multipliers))]


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class NoiseLevelEmbedding(layers.Layer):
    """Transformer sinusoidal embedding of the noise level: [B] or [B, 1] sqrt(gamma) -> [B, dim].

    e = [sin(s * nl * f_k), cos(s * nl * f_k)], f_k = 10000^(-k / (dim/2)), k = 0..dim/2 - 1, with
    s = scale (1000, as WaveGrad / SR3 scale their continuous level to the range of step indices).
    """

    def __init__(self, dim=128, scale=1000.0, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.scale = float(scale)

    def call(self, noise_level):
        nl = ops.reshape(ops.cast(noise_level, self.compute_dtype), (-1, 1)) * self.scale
        half = self.dim // 2
        freqs = ops.exp(ops.arange(half, dtype=self.compute_dtype) * (-math.log(10000.0) / half))
        args = nl * ops.expand_dims(freqs, 0)
        return ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "scale": self.scale}


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class ToDiffusionSpace(layers.Layer):
    """KDE units -> diffusion space 2*y - 1 (the map `diffusion.to_diffusion_space` applies to the
    targets), so that the condition y_hat and the noisy target y_t share one range."""

    def call(self, y):
        return 2.0 * y - 1.0


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class SpaceToDepth(layers.Layer):
    """[B, H, W, C] -> [B, H/f, W/f, f*f*C]: each f x f block becomes the channels of one pixel,
    ordered (block row, block column, channel) as tf.nn.space_to_depth orders them."""

    def __init__(self, block=2, **kwargs):
        super().__init__(**kwargs)
        self.block = int(block)

    def call(self, x):
        f = self.block
        shape = ops.shape(x)
        b, h, w, c = shape[0], shape[1], shape[2], x.shape[-1]
        x = ops.reshape(x, (b, h // f, f, w // f, f, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (b, h // f, w // f, f * f * c))

    def compute_output_shape(self, input_shape):
        f = self.block
        b, h, w, c = input_shape
        return (b, None if h is None else h // f, None if w is None else w // f, f * f * c)

    def get_config(self):
        return {**super().get_config(), "block": self.block}


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class DepthToSpace(layers.Layer):
    """The inverse of SpaceToDepth: [B, h, w, f*f*C] -> [B, f h, f w, C]."""

    def __init__(self, block=2, **kwargs):
        super().__init__(**kwargs)
        self.block = int(block)

    def call(self, x):
        f = self.block
        shape = ops.shape(x)
        b, h, w = shape[0], shape[1], shape[2]
        c = x.shape[-1] // (f * f)
        x = ops.reshape(x, (b, h, w, f, f, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (b, h * f, w * f, c))

    def compute_output_shape(self, input_shape):
        f = self.block
        b, h, w, c = input_shape
        return (b, None if h is None else h * f, None if w is None else w * f, c // (f * f))

    def get_config(self):
        return {**super().get_config(), "block": self.block}


@keras.saving.register_keras_serializable(package="smlm_tfdiff")
class SelfAttention2D(layers.Layer):
    """x + proj(attention(GroupNorm(x))) over all H*W positions: [B, H, W, C] -> [B, H, W, C].

    Multi-head dot-product attention, queries/keys/values from one 1x1 projection; the output
    projection is zero-initialised so the block starts as the identity (DDPM).
    """

    def __init__(self, groups=8, num_heads=1, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.num_heads = int(num_heads)
        self.norm = layers.GroupNormalization(self.groups, epsilon=1e-5, name="norm")
        self.qkv = None
        self.proj = None

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.qkv = layers.Dense(3 * channels, name="qkv")
        self.proj = layers.Dense(channels, kernel_initializer="zeros", name="proj")
        self.norm.build(input_shape)
        self.qkv.build(input_shape)
        self.proj.build(input_shape)

    def call(self, x):
        shape = ops.shape(x)
        b, h, w, c = shape[0], shape[1], shape[2], x.shape[-1]
        d = c // self.num_heads
        qkv = ops.reshape(self.qkv(self.norm(x)), (b, h * w, 3, self.num_heads, d))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, d]
        logits = ops.einsum("bnhd,bmhd->bhnm", q, k) * (1.0 / math.sqrt(d))
        attn = ops.softmax(logits, axis=-1)
        out = ops.reshape(ops.einsum("bhnm,bmhd->bnhd", attn, v), (b, h, w, c))
        return x + self.proj(out)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "num_heads": self.num_heads}


def _res_block(x, emb, channels, config, name):
    """GroupNorm, swish, conv3x3, + Dense(emb), GroupNorm, swish, dropout, conv3x3; 1x1 skip when
    the channel count changes. emb: the swish-activated noise-level embedding [B, E]."""
    h = layers.GroupNormalization(config.groups, epsilon=1e-5, name=f"{name}_norm1")(x)
    h = layers.Activation("swish", name=f"{name}_act1")(h)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv1")(h)
    e = layers.Dense(channels, name=f"{name}_emb")(emb)
    h = layers.Add(name=f"{name}_add_emb")([h, layers.Reshape((1, 1, channels),
                                                               name=f"{name}_emb_4d")(e)])
    h = layers.GroupNormalization(config.groups, epsilon=1e-5, name=f"{name}_norm2")(h)
    h = layers.Activation("swish", name=f"{name}_act2")(h)
    h = layers.Dropout(config.dropout, name=f"{name}_dropout")(h)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv2")(h)
    if x.shape[-1] != channels:
        x = layers.Conv2D(channels, 1, name=f"{name}_skip")(x)
    return layers.Add(name=f"{name}_out")([x, h])


def _film(h, emb, channels, name):
    """h [B, H, W, C] x (1 + Dense(emb)) + Dense(emb): a per-channel scale and shift from the
    noise-level embedding [B, E], the scale starting at 1."""
    scale = layers.Dense(channels, kernel_initializer="zeros", bias_initializer="ones",
                         name=f"{name}_scale")(emb)
    shift = layers.Dense(channels, name=f"{name}_shift")(emb)
    h = layers.Multiply(name=f"{name}_scaled")(
        [h, layers.Reshape((1, 1, channels), name=f"{name}_scale_4d")(scale)])
    return layers.Add(name=f"{name}_shifted")(
        [h, layers.Reshape((1, 1, channels), name=f"{name}_shift_4d")(shift)])


def _output_head(eps, y_t, cond, emb, channels):
    """eps + the head's correction on the KDE grid (module docstring); its last convolution is
    zero-initialised, so a psi given a head starts as the same function."""
    h = layers.Concatenate(name="head_inputs")([y_t, cond, eps])
    for i in (1, 2):
        h = layers.Conv2D(channels, 3, padding="same", name=f"head_conv{i}")(h)
        h = _film(h, emb, channels, f"head_film{i}")
        h = layers.Activation("swish", name=f"head_act{i}")(h)
    out = layers.Conv2D(1, 3, padding="same", kernel_initializer="zeros",
                        bias_initializer="zeros", name="head_out")(h)
    return layers.Add(name="head_eps")([eps, out])


def _attention(x, config, name):
    return SelfAttention2D(config.groups, config.num_heads, name=name)(x)


def build_psi(psi_config: Optional[PsiConfig] = None, image_size=None, name="psi"):
    """The psi model: {"y_t", "y_hat", "noise_level"[, "frame"]} -> eps_pred [B, H, W, 1] (float32).

    Inputs:
      y_t          [B, H, W, 1]: noisy target in diffusion space (2*kde - 1 noised).
      y_hat        [B, H, W, 1]: phi's KDE estimate in KDE units (phi's output as is); mapped to
                   2*y_hat - 1 inside the model (layer "y_hat_diffusion_space") and concatenated.
      frame        [B, H/u, W/u, 1] ADU, only with config.frame_condition (u = frame_upsample):
                   the camera frame phi saw, through the experimental FrameCondition,
                   concatenated as a third channel.
      noise_level  [B] or [B, 1]: sqrt(gamma), continuous in (0, 1]; not a step index.
    image_size: None (any H, W divisible by 2^(levels-1), checked by the caller with
      `check_input_size`), an int or (h, w) for a static input shape (checked here).
    The output conv is zero-initialised: before training eps_pred is exactly 0 for any input
    (prediction "eps"; the experimental v predictions start from v = 0, experimental/prediction.py).
    """
    config = psi_config or PsiConfig()
    if image_size is None:
        h = w = None
    else:
        if isinstance(image_size, (tuple, list)):
            h, w = (int(v) for v in image_size)
        else:
            h = w = int(image_size)
        check_input_size(h, w, config)
    y_t = keras.Input((h, w, 1), name="y_t")
    y_hat = keras.Input((h, w, 1), name="y_hat")
    noise_level = keras.Input((), name="noise_level")
    inputs = {"y_t": y_t, "y_hat": y_hat, "noise_level": noise_level}
    if config.frame_condition:
        u = config.frame_upsample
        inputs["frame"] = keras.Input((None if h is None else h // u,
                                       None if w is None else w // u, 1), name="frame")

    emb = NoiseLevelEmbedding(config.embedding_dim, config.noise_level_scale,
                              name="noise_embedding")(noise_level)
    emb = layers.Dense(config.embedding_dim, name="embedding_dense0")(emb)
    emb = layers.Activation("swish", name="embedding_act0")(emb)
    emb = layers.Dense(config.embedding_dim, name="embedding_dense1")(emb)
    emb = layers.Activation("swish", name="embedding_act1")(emb)  # Shared input of every block.

    cond = ToDiffusionSpace(name="y_hat_diffusion_space")(y_hat)
    channels_in = [y_t, cond]
    if config.frame_condition:
        from smlm_tfdiff.experimental.frame_condition import FrameCondition
        channels_in.append(FrameCondition(config.frame_offset, config.frame_gain,
                                          config.frame_readout_var, config.frame_upsample,
                                          name="frame_condition")(inputs["frame"]))
    x = layers.Concatenate(name="inputs")(channels_in)
    f = config.space_to_depth
    if f > 1:
        x = SpaceToDepth(f, name="space_to_depth")(x)
    x = layers.Conv2D(config.channels[0], 3, padding="same", name="conv_in")(x)

    num_levels = len(config.channels)
    attention = set(config.attention_levels)
    skips = [x]
    for level, channels in enumerate(config.channels):
        for i in range(config.num_res_blocks):
            x = _res_block(x, emb, channels, config, f"down{level}_res{i}")
            if level in attention:
                x = _attention(x, config, f"down{level}_res{i}_attn")
            skips.append(x)
        if level != num_levels - 1:
            x = layers.Conv2D(channels, 3, strides=2, padding="same",
                              name=f"down{level}_downsample")(x)
            skips.append(x)

    x = _res_block(x, emb, config.channels[-1], config, "mid_res0")
    x = _attention(x, config, "mid_attn")
    x = _res_block(x, emb, config.channels[-1], config, "mid_res1")

    for level in reversed(range(num_levels)):
        channels = config.channels[level]
        for i in range(config.num_res_blocks + 1):
            x = layers.Concatenate(name=f"up{level}_res{i}_concat")([x, skips.pop()])
            x = _res_block(x, emb, channels, config, f"up{level}_res{i}")
            if level in attention:
                x = _attention(x, config, f"up{level}_res{i}_attn")
        if level != 0:
            x = layers.UpSampling2D(2, interpolation="nearest", name=f"up{level}_upsample")(x)
            x = layers.Conv2D(channels, 3, padding="same", name=f"up{level}_upsample_conv")(x)

    x = layers.GroupNormalization(config.groups, epsilon=1e-5, name="out_norm")(x)
    x = layers.Activation("swish", name="out_act")(x)
    # Named "eps" in both parametrizations, so that the weights of either load into the other.
    eps = layers.Conv2D(f * f, 3, padding="same", kernel_initializer="zeros",
                        bias_initializer="zeros", name="eps")(x)
    if f > 1:
        eps = DepthToSpace(f, name="depth_to_space")(eps)
    if config.output_head:
        eps = _output_head(eps, y_t, cond, emb, config.output_head)
    if config.prediction != "eps":
        from smlm_tfdiff.experimental.prediction import eps_output
        eps = eps_output(config.prediction, eps, y_t, noise_level, cond)
    return keras.Model(inputs, eps, name=name)


def transfer_weights(source, target):
    """Copy psi `source`'s weights into `target`, a psi of the same network that may take more
    input channels (a frame-conditioned psi started from one that is not): conv_in's kernel gets
    the source's channels first and zeros for the new ones, so `target` starts as exactly the
    function `source` computes. The layers of an output head the source lacks keep their
    initialisation (its last layer is zero: the same function again). Any other difference of
    shapes raises ValueError."""
    for layer in target.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        try:
            src = source.get_layer(layer.name).get_weights()
        except ValueError:
            if layer.name.startswith("head_"):
                continue
            raise ValueError(f"psi layer {layer.name!r} has no counterpart in the source psi; "
                             "start from a psi of the same network") from None
        if len(src) != len(weights):
            raise ValueError(f"psi layer {layer.name!r}: {len(src)} weights in the source, "
                             f"{len(weights)} here")
        new = []
        for s_w, t_w in zip(src, weights):
            if s_w.shape == t_w.shape:
                new.append(s_w)
            elif (layer.name == "conv_in" and s_w.ndim == 4 and s_w.shape[:2] == t_w.shape[:2]
                  and s_w.shape[3] == t_w.shape[3] and s_w.shape[2] < t_w.shape[2]):
                padded = t_w * 0.0
                padded[:, :, :s_w.shape[2], :] = s_w
                new.append(padded)
            else:
                raise ValueError(f"psi layer {layer.name!r}: weight shape {s_w.shape} in the "
                                 f"source, {t_w.shape} here; start from a psi of the same network")
        layer.set_weights(new)
