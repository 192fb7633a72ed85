"""U-Net feature extractor applied frame by frame (Liang et al. 2023, "Feature extraction network").

The paper's feature extractor is a U-Net in the style of milesial/Pytorch-UNet with BatchNorm
replaced by GroupNorm (16 channels per group): one `DoubleConv`, four `Down` blocks (2×2 max pool,
`DoubleConv`), four `Up` blocks (2×2 stride-2 transposed convolution, concatenation with the
encoder feature map of the same level, `DoubleConv`) and a 1×1 output convolution to 10 features.
Widths 64, 128, 256, 512, 1024. The paper text says the blocks carry residual-like skips; the
authors' code has none, so `residual` switches them on (default) or off (authors' code).

Every early frame of a slice goes through the same U-Net as a separate single-channel image and
the features are concatenated **frame-major**: channel ``t * F + f`` holds feature ``f`` of frame
``t`` (`apply_per_frame`, `FrameFeatureExtractor`).

All arrays are NHWC. There is no BatchNorm, hence no mutable batch statistics: the only NNX state
is `nnx.Param`, so the modules can be used functionally through `nnx.split` / `nnx.merge`.
"""

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

CHANNELS_PER_GROUP = 16
"""Channels per GroupNorm group (paper: "The number of channels per group is set to 16")."""

GROUPNORM_EPSILON = 1e-5
"""GroupNorm epsilon, PyTorch's default (Flax's default is 1e-6)."""

PAPER_WIDTHS = (64, 128, 256, 512, 1024)
"""Channel widths of the paper's U-Net levels, top to bottom."""


def _check_width(name: str, width: int) -> int:
    """Return ``width`` as an int if it is a positive multiple of 16, else raise ValueError."""
    try:
        w = operator.index(width)
    except TypeError:
        w = 0
    if isinstance(width, bool) or w <= 0 or w % CHANNELS_PER_GROUP:
        raise ValueError(
            f"{name} must be a positive multiple of {CHANNELS_PER_GROUP} (GroupNorm uses "
            f"{CHANNELS_PER_GROUP} channels per group), got {width!r}."
        )
    return w


def group_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm with 16 channels per group (``num_groups = num_features // 16``).

    Statistics are taken per example over all non-batch axes of the group (H, W and the group's
    channels for NHWC input), as PyTorch's `GroupNorm` does on NCHW input.
    """
    _check_width("GroupNorm num_features", num_features)
    return nnx.GroupNorm(
        num_features,
        num_groups=num_features // CHANNELS_PER_GROUP,
        epsilon=GROUPNORM_EPSILON,
        dtype=dtype,
        rngs=rngs,
    )


class DoubleConv(nnx.Module):
    """Two (3×3 conv 'SAME', no bias → GroupNorm → ReLU) layers, optionally residual.

    Without residual (authors' code):
        y = relu(gn2(conv2(relu(gn1(conv1(x))))))
    With residual (paper text, ResNet basic-block placement):
        y = relu(gn2(conv2(relu(gn1(conv1(x))))) + skip(x))
    where ``skip`` is the identity when ``in_ch == out_ch`` and a 1×1 convolution without bias
    (no normalisation) otherwise. The skip is added after the second GroupNorm and before the final
    ReLU.

    Args:
      in_ch: input channels.
      out_ch: output channels, a positive multiple of 16.
      residual: whether to add the skip connection.
      dtype: computation dtype (None: inferred from the input and parameters, float32 params).
      rngs: NNX random streams for initialisation.
    """

    def __init__(
        self, in_ch: int, out_ch: int, residual: bool, *, dtype=None, rngs: nnx.Rngs
    ) -> None:
        if not isinstance(in_ch, int) or in_ch <= 0:
            raise ValueError(f"DoubleConv in_ch must be a positive integer, got {in_ch!r}.")
        _check_width("DoubleConv out_ch", out_ch)
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.residual = bool(residual)
        conv = dict(kernel_size=(3, 3), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_ch, out_ch, **conv)
        self.norm1 = group_norm(out_ch, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out_ch, out_ch, **conv)
        self.norm2 = group_norm(out_ch, dtype=dtype, rngs=rngs)
        if self.residual and in_ch != out_ch:
            self.skip = nnx.Conv(
                in_ch, out_ch, kernel_size=(1, 1), use_bias=False, dtype=dtype, rngs=rngs
            )
        else:
            self.skip = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, H, W, in_ch] -> [N, H, W, out_ch]."""
        h = jax.nn.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if self.residual:
            h = h + (x if self.skip is None else self.skip(x))
        return jax.nn.relu(h)


class Down(nnx.Module):
    """2×2 max pool (stride 2) followed by a `DoubleConv`: [N, H, W, in] -> [N, H/2, W/2, out]."""

    def __init__(
        self, in_ch: int, out_ch: int, residual: bool, *, dtype=None, rngs: nnx.Rngs
    ) -> None:
        self.conv = DoubleConv(in_ch, out_ch, residual, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID"))


class Up(nnx.Module):
    """2×2 stride-2 transposed conv to ``out_ch``, concat the skip, then `DoubleConv(2·out, out)`.

    With doubling widths (``in_ch == 2 * out_ch``, the paper's case) this is milesial's
    ``Up(in_ch, out_ch, bilinear=False)``: the transposed convolution halves the channels.
    The concatenation order is (skip, upsampled) on the channel axis.

    Args:
      in_ch: channels of the coarser input.
      out_ch: channels of the skip feature map and of the output.
      residual: passed to the `DoubleConv`.
      dtype: computation dtype.
      rngs: NNX random streams.
    """

    def __init__(
        self, in_ch: int, out_ch: int, residual: bool, *, dtype=None, rngs: nnx.Rngs
    ) -> None:
        self.up = nnx.ConvTranspose(
            in_ch,
            out_ch,
            kernel_size=(2, 2),
            strides=(2, 2),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.conv = DoubleConv(2 * out_ch, out_ch, residual, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        """x [N, H, W, in_ch], skip [N, 2H, 2W, out_ch] -> [N, 2H, 2W, out_ch]."""
        return self.conv(jnp.concatenate([skip, self.up(x)], axis=-1))


class UNet(nnx.Module):
    """U-Net with GroupNorm: ``len(widths) - 1`` down/up levels, 1×1 output conv.

    With the defaults this is the paper's network: DoubleConv(1→64), Down 64→128→256→512→1024,
    Up 1024→512→256→128→64, 1×1 conv 64→10.

    Args:
      in_ch: input channels (1: one SUV frame).
      out_features: output channels of the final 1×1 convolution (with bias, no activation).
      widths: channel width per level, top to bottom; at least two, each a positive multiple of
        16. Input H and W must be divisible by ``2 ** (len(widths) - 1)``.
      residual: residual skips inside every `DoubleConv` (paper text) or not (authors' code).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      rngs: NNX random streams.
    """

    def __init__(
        self,
        in_ch: int = 1,
        out_features: int = 10,
        widths: Sequence[int] = PAPER_WIDTHS,
        residual: bool = True,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ) -> None:
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(f"UNet widths needs at least two levels, got {widths!r}.")
        widths = tuple(_check_width(f"UNet widths entry (widths={widths!r})", w) for w in widths)
        if not isinstance(out_features, int) or out_features <= 0:
            raise ValueError(f"UNet out_features must be a positive integer, got {out_features!r}.")
        self.in_ch = in_ch
        self.out_features = out_features
        self.widths = widths
        self.residual = bool(residual)
        self.inc = DoubleConv(in_ch, widths[0], residual, dtype=dtype, rngs=rngs)
        pairs = list(zip(widths[:-1], widths[1:], strict=True))  # (finer, coarser) per level
        self.downs = nnx.List([Down(a, b, residual, dtype=dtype, rngs=rngs) for a, b in pairs])
        self.ups = nnx.List(
            [Up(b, a, residual, dtype=dtype, rngs=rngs) for a, b in reversed(pairs)]
        )
        self.outc = nnx.Conv(widths[0], out_features, kernel_size=(1, 1), dtype=dtype, rngs=rngs)

    @property
    def size_multiple(self) -> int:
        """H and W of the input must be multiples of this (``2 ** (len(widths) - 1)``)."""
        return 2 ** (len(self.widths) - 1)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise ValueError unless ``shape`` is [N, H, W, in_ch], H and W multiples of 2**levels."""
        shape = tuple(shape)
        if len(shape) != 4 or shape[-1] != self.in_ch:
            raise ValueError(
                f"UNet expects input of shape [N, H, W, {self.in_ch}] (NHWC), got {shape}."
            )
        m = self.size_multiple
        if shape[1] % m or shape[2] % m:
            raise ValueError(
                f"UNet input size {shape[1]}×{shape[2]} is not divisible by {m} (2**"
                f"{len(self.widths) - 1} for {len(self.widths)} levels); pad or crop the images."
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, H, W, in_ch] -> [N, H, W, out_features]."""
        self.check_input_shape(x.shape)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            h = up(h, skips.pop())
        return self.outc(h)


def apply_per_frame(unet: UNet, x: jax.Array) -> jax.Array:
    """Apply a single-channel U-Net to every frame and concatenate features frame-major.

    Args:
      unet: a `UNet` with ``in_ch == 1`` and ``F = unet.out_features``.
      x: [B, H, W, T] frames (SUV), time last.

    Returns:
      [B, H, W, T * F] features; channel ``t * F + f`` is feature ``f`` of frame ``t``.
    """
    if x.ndim != 4:
        raise ValueError(f"Frames must have shape [B, H, W, T], got {x.shape}.")
    if unet.in_ch != 1:
        raise ValueError(f"apply_per_frame needs a single-channel UNet, got in_ch={unet.in_ch}.")
    b, h, w, t = x.shape
    unet.check_input_shape((b * t, h, w, 1))
    frames = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * t, h, w, 1)  # [B*T, H, W, 1]
    feats = unet(frames)  # [B*T, H, W, F]
    f = feats.shape[-1]
    feats = feats.reshape(b, t, h, w, f)  # [B, T, H, W, F]
    return jnp.transpose(feats, (0, 2, 3, 1, 4)).reshape(b, h, w, t * f)  # [B, H, W, T*F]


class FrameFeatureExtractor(nnx.Module):
    """Shared-weight single-channel `UNet` applied to each of T frames; frame-major features.

    Args:
      features_per_frame: F, U-Net output features per frame (paper: 10).
      widths: U-Net widths (see `UNet`).
      residual: residual `DoubleConv` blocks.
      dtype: computation dtype.
      rngs: NNX random streams.
    """

    def __init__(
        self,
        features_per_frame: int = 10,
        widths: Sequence[int] = PAPER_WIDTHS,
        residual: bool = True,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ) -> None:
        self.unet = UNet(1, features_per_frame, widths, residual, dtype=dtype, rngs=rngs)

    @property
    def features_per_frame(self) -> int:
        return self.unet.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, T] frames -> [B, H, W, T * F] features (channel ``t * F + f``)."""
        return apply_per_frame(self.unet, x)
