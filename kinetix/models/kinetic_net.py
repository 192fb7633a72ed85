"""Kinetic model network: U-Net features of the early frames → bounded 2TCM parameters per voxel.

Liang et al. 2023, "Kinetic model network": the frame-major U-Net features ([B, H, W, 22·10])
go through a pointwise network of 1×1 convolutions 220→256→128→128→64 (GroupNorm with 16
channels per group, LeakyReLU) → 5, bounded to the 2TCM parameters (fv, K1, k2, k3, k4) of every
voxel. `params_to_frames` turns them into PET frames with `kinetix.kinetics`.

Output bounding (``activation``):
- ``'scaled_sigmoid'`` (kinetix default): ``lower + (upper - lower) · sigmoid(z)`` with
  physiological bounds, by default lower 0 and upper (fv 1, K1 2 mL/min/mL, k2 3, k3 1, k4 0.2
  1/min).
- ``'log_scaled_sigmoid'`` (kinetix option): the scaled sigmoid on a log scale,
  ``exp(ln lower + (ln upper - ln lower) · sigmoid(z))``, with lower > 0 (default `LOG_LOWER`).
  A step in z changes a parameter by the same *relative* amount anywhere in its range, so rates
  spanning decades (k3 ≈ 0.01 in liver, 0.15 in a tumour) are equally easy to reach and a
  small rate sits mid-range instead of in the sigmoid's flat lower tail.
- ``'hardsigmoid'`` (authors' code): PyTorch ``Hardsigmoid`` = ``relu6(z + 3) / 6``
  (`jax.nn.hard_sigmoid`), all five parameters in [0, 1].
- ``'none'``: the raw outputs (used by `kinetix.models.direct_net`).

Initialisation: Flax defaults (LeCun-normal kernels, zero biases), except that the final layer's
bias is set so that a zero pre-activation maps to ``init_params`` — by default the middle of the
range (sigmoid(0) = hard_sigmoid(0) = 1/2, i.e. half the bound); the random kernel spreads the
initial parameters around it.

The 1×1 convolutions are `nnx.Linear` layers on the channel axis. GroupNorm statistics are taken
per image over H, W and the group's channels (as PyTorch's GroupNorm after 1×1 convolutions), so
the head is pointwise except for these statistics.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kinetix.kinetics as kk
from kinetix.models.backbone import PAPER_BACKBONE, PAPER_HEAD_HIDDEN, Backbone
from kinetix.models.unet import FrameFeatureExtractor, group_norm

PARAM_NAMES = kk.PARAM_NAMES
"""Order of the 2TCM parameters on the last axis: (fv, K1, k2, k3, k4)."""

DEFAULT_LOWER = (0.0, 0.0, 0.0, 0.0, 0.0)
"""Default lower bounds of (fv, K1, k2, k3, k4): fv unitless, K1 mL/min/mL, k2..k4 1/min."""

DEFAULT_UPPER = (1.0, 2.0, 3.0, 1.0, 0.2)
"""Default upper bounds of (fv, K1, k2, k3, k4): fv unitless, K1 mL/min/mL, k2..k4 1/min."""

LOG_LOWER = (1e-3, 1e-3, 1e-3, 1e-4, 1e-5)
"""Default lower bounds of (fv, K1, k2, k3, k4) for ``'log_scaled_sigmoid'`` (must be > 0)."""

MACRO_LOWER = (0.0, 0.0, 0.05, 0.0, 0.0)
"""Default lower bounds of the macro outputs (fv, K1, Vd, E, k4) (`kk.rates_from_macro`)."""

MACRO_UPPER = (1.0, 2.0, 2.0, 1.0, 0.2)
"""Default upper bounds of the macro outputs: fv 1, K1 2 mL/min/mL, Vd 2 mL/mL, E 1, k4 0.2/min."""

ACTIVATIONS = ("scaled_sigmoid", "log_scaled_sigmoid", "hardsigmoid", "none")

BOUNDED_ACTIVATIONS = ("scaled_sigmoid", "log_scaled_sigmoid")
"""The activations with ``(lower, upper)`` bounds."""


def _float_tuple(name: str, values, n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of {n} numbers, got {values!r}.") from e
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {n} finite numbers, got {values!r}.")
    return out


def _final_bias(activation, lower, upper, init_params, n) -> np.ndarray:
    """Final-layer bias giving ``init_params`` when the kernel's contribution is zero."""
    if init_params is None:
        return np.zeros(n, np.float32)  # sigmoid(0) = hard_sigmoid(0) = 1/2: mid-range.
    p = np.asarray(_float_tuple("KineticHead init_params", init_params, n))
    if activation == "none":
        return p.astype(np.float32)
    bounded = activation in BOUNDED_ACTIVATIONS
    lo = np.asarray(lower) if bounded else np.zeros(n)
    hi = np.asarray(upper) if bounded else np.ones(n)
    if np.any(p <= lo) or np.any(p >= hi):
        raise ValueError(
            f"KineticHead init_params {tuple(p)} must lie strictly inside the output range "
            f"({tuple(lo)}, {tuple(hi)})."
        )
    if activation == "log_scaled_sigmoid":
        p, lo, hi = np.log(p), np.log(lo), np.log(hi)
    frac = (p - lo) / (hi - lo)
    if bounded:
        return np.log(frac / (1.0 - frac)).astype(np.float32)  # logit
    return (6.0 * frac - 3.0).astype(np.float32)  # inverse of relu6(z + 3) / 6 on (0, 1)


def _macro_init(init_params) -> tuple[float, ...]:
    """Rates (fv, K1, k2, k3, k4) -> macro (fv, K1, Vd, E, k4) in NumPy (at construction)."""
    fv, k1, k2, k3, k4 = _float_tuple("KineticNet init_params", init_params, 5)
    if k1 <= 0 or k2 + k3 <= 0:
        raise ValueError(
            f"KineticNet init_params {(fv, k1, k2, k3, k4)} need K1 > 0 and k2 + k3 > 0 for the "
            "macro parameterisation (Vd = K1/(k2 + k3), E = k3/(k2 + k3))."
        )
    return (fv, k1, k1 / (k2 + k3), k3 / (k2 + k3), k4)


def _uncoupled_init(init_params) -> tuple[float, ...]:
    """Rates (fv, K1, k2, k3, k4) -> uncoupled (fv, (1 − fv)·K1, k2, k3, k4) in NumPy (at
    construction; `kk.uncoupled_from_rates` in float64, so the initial bias is not rounded to
    float32 before the logit)."""
    fv, k1, *rest = _float_tuple("KineticNet init_params", init_params, 5)
    return (fv, (1.0 - fv) * k1, *rest)


# parameterisation -> (rates -> head outputs, in NumPy for init_params; head outputs -> rates).
_CONVERSIONS = {
    "rates": (None, None),
    "macro": (_macro_init, kk.rates_from_macro),
    "uncoupled": (_uncoupled_init, kk.rates_from_uncoupled),
}
PARAMETERIZATIONS = tuple(_CONVERSIONS)  # ("rates", "macro", "uncoupled")


class KineticHead(nnx.Module):
    """Pointwise network: [B, H, W, in_features] → [B, H, W, n_params], bounded.

    Layers: for each hidden width h: Linear (1×1 conv, with bias) → GroupNorm(h // 16 groups) →
    LeakyReLU(0.01); then Linear → ``n_params`` → bounding ``activation`` (module docstring).

    Args:
      in_features: input channels (paper: 22 frames × 10 features = 220).
      hidden: hidden widths, each a positive multiple of 16 (may be empty).
      n_params: outputs per voxel (5 for the 2TCM: fv, K1, k2, k3, k4).
      activation: ``'scaled_sigmoid'``, ``'log_scaled_sigmoid'``, ``'hardsigmoid'`` or
        ``'none'``.
      bounds: ``(lower, upper)``, each ``n_params`` numbers with lower < upper (and lower > 0
        for ``'log_scaled_sigmoid'``), only for the two scaled sigmoids; None gives
        `DEFAULT_LOWER` (`LOG_LOWER` for the log scale), `DEFAULT_UPPER` (needs n_params = 5).
        Units: fv unitless, K1 mL/min/mL, k2, k3, k4 1/min.
      init_params: output values the final bias is set to produce at zero kernel contribution
        (strictly inside the range); None: the middle of the range (zero bias).
      dtype: computation dtype of the layers; the bounding is computed in float32 or wider.
      rngs: NNX random streams.
    """

    def __init__(
        self,
        in_features: int = 220,
        hidden: Sequence[int] = PAPER_HEAD_HIDDEN,
        n_params: int = 5,
        *,
        activation: str = "scaled_sigmoid",
        bounds: tuple[Sequence[float], Sequence[float]] | None = None,
        init_params: Sequence[float] | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"KineticHead activation must be one of {ACTIVATIONS}, got {activation!r}."
            )
        if not isinstance(n_params, int) or n_params <= 0:
            raise ValueError(f"KineticHead n_params must be a positive integer, got {n_params!r}.")
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(
                f"KineticHead in_features must be a positive integer, got {in_features!r}."
            )
        hidden = tuple(hidden)
        lower = upper = None
        if activation in BOUNDED_ACTIVATIONS:
            log = activation == "log_scaled_sigmoid"
            if bounds is None:
                if n_params != len(DEFAULT_UPPER):
                    raise ValueError(
                        f"KineticHead bounds must be given for n_params={n_params} "
                        f"(the defaults are for the {len(DEFAULT_UPPER)} 2TCM parameters)."
                    )
                bounds = (LOG_LOWER if log else DEFAULT_LOWER, DEFAULT_UPPER)
            if len(bounds) != 2:
                raise ValueError(f"KineticHead bounds must be (lower, upper), got {bounds!r}.")
            lower = _float_tuple("KineticHead lower bounds", bounds[0], n_params)
            upper = _float_tuple("KineticHead upper bounds", bounds[1], n_params)
            if not all(lo < hi for lo, hi in zip(lower, upper, strict=True)):
                raise ValueError(
                    f"KineticHead bounds need lower < upper for every parameter, got "
                    f"lower={lower}, upper={upper}."
                )
            if log and not all(lo > 0 for lo in lower):
                raise ValueError(
                    f"KineticHead activation 'log_scaled_sigmoid' needs lower bounds > 0, got "
                    f"{lower} (e.g. the defaults {LOG_LOWER})."
                )
        elif bounds is not None:
            raise ValueError(
                f"KineticHead bounds apply only to activation='scaled_sigmoid' or "
                f"'log_scaled_sigmoid', not {activation!r}."
            )
        self.in_features = in_features
        self.hidden = hidden
        self.n_params = n_params
        self.activation = activation
        self.lower = lower
        self.upper = upper

        layers, norms = [], []
        width = in_features
        for h in hidden:
            layers.append(nnx.Linear(width, h, dtype=dtype, rngs=rngs))
            norms.append(group_norm(h, dtype=dtype, rngs=rngs))
            width = h
        self.layers = nnx.List(layers)
        self.norms = nnx.List(norms)
        self.out = nnx.Linear(width, n_params, dtype=dtype, rngs=rngs)
        bias = _final_bias(activation, lower, upper, init_params, n_params)
        self.out.bias[...] = jnp.asarray(bias, self.out.bias[...].dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_features] -> [B, H, W, n_params] (last axis: fv, K1, k2, k3, k4)."""
        return self.bound(self.preactivations(x))

    def preactivations(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_features] -> [B, H, W, n_params]: the final layer's outputs z, unbounded.

        `loss.saturation_weight` penalises |z| beyond a margin (`losses.saturation_penalty`):
        where the sigmoid saturates, its gradient vanishes and the parameter can no longer move.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"KineticHead expects input [B, H, W, {self.in_features}], got {x.shape}."
            )
        h = x
        for layer, norm in zip(self.layers, self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(layer(h)), negative_slope=0.01)
        return self.out(h)

    def bound(self, z: jax.Array) -> jax.Array:
        """Pre-activations z [..., n_params] -> bounded outputs (`bound_outputs`)."""
        return bound_outputs(z, self.activation, self.lower, self.upper)


def bound_outputs(z: jax.Array, activation: str, lower=None, upper=None) -> jax.Array:
    """Map pre-activations z [..., P] to the output range of ``activation`` (module docstring).

    Args:
      z: [..., P] final-layer outputs.
      activation: ``'scaled_sigmoid'`` or ``'log_scaled_sigmoid'`` (need ``lower``, ``upper``:
        P numbers each; lower > 0 for the log scale), ``'hardsigmoid'`` or ``'none'``.

    Returns:
      [..., P], in float32 or wider for the sigmoids.
    """
    if activation == "none":
        return z
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    if activation == "hardsigmoid":
        return jax.nn.hard_sigmoid(z)
    if activation in BOUNDED_ACTIVATIONS:
        shape = (1,) * (z.ndim - 1) + (z.shape[-1],)
        lo = jnp.asarray(lower, z.dtype).reshape(shape)
        hi = jnp.asarray(upper, z.dtype).reshape(shape)
        if activation == "scaled_sigmoid":
            return lo + (hi - lo) * jax.nn.sigmoid(z)
        lo, hi = jnp.log(lo), jnp.log(hi)
        return jnp.exp(lo + (hi - lo) * jax.nn.sigmoid(z))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")


class EarlyFramesNet(nnx.Module):
    """Shared body of `KineticNet` and `DirectNet`: per-frame U-Net features → `KineticHead`.

    Args:
      backbone: the shared architecture (`Backbone`: frames, U-Net, head widths, curve inputs,
        dtype); default the paper's.
      n_out: outputs per voxel.
      activation, bounds, init_params: see `KineticHead`.
      rngs: NNX random streams.
    """

    def __init__(
        self,
        backbone: Backbone = PAPER_BACKBONE,
        *,
        n_out: int,
        activation: str = "scaled_sigmoid",
        bounds: tuple[Sequence[float], Sequence[float]] | None = None,
        init_params: Sequence[float] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(backbone, Backbone):
            raise ValueError(f"backbone must be a kinetix.models.Backbone, got {backbone!r}.")
        self.backbone = backbone
        self.features = FrameFeatureExtractor(
            backbone.features_per_frame,
            backbone.widths,
            backbone.residual,
            dtype=backbone.dtype,
            rngs=rngs,
        )
        self.head = KineticHead(
            backbone.head_inputs,
            backbone.head_hidden,
            n_out,
            activation=activation,
            bounds=bounds,
            init_params=init_params,
            dtype=backbone.dtype,
            rngs=rngs,
        )

    @property
    def n_early(self) -> int:
        """Input frames (``backbone.n_early``)."""
        return self.backbone.n_early

    @property
    def n_curve(self) -> int:
        """Extra per-example head inputs (``backbone.n_curve``)."""
        return self.backbone.n_curve

    def __call__(self, frames_early: jax.Array, curve: jax.Array | None = None) -> jax.Array:
        """[B, H, W, n_early] SUV frames (and [B, n_curve] ``curve``) -> [B, H, W, n_out]."""
        return self.from_preactivations(self.preactivations(frames_early, curve))

    def preactivations(self, frames_early: jax.Array, curve: jax.Array | None = None):
        """The head's unbounded final-layer outputs z [B, H, W, n_out] (same inputs as a call).

        ``net(f, c) == net.from_preactivations(net.preactivations(f, c))``.
        """
        return self.head.preactivations(self._head_inputs(frames_early, curve))

    def from_preactivations(self, z: jax.Array) -> jax.Array:
        """Pre-activations [..., n_out] -> the network's outputs (the head's bounding)."""
        return self.head.bound(z)

    def _head_inputs(self, frames_early: jax.Array, curve: jax.Array | None) -> jax.Array:
        """U-Net features [B, H, W, n_early·F] (+ the tiled curve, [B, H, W, n_curve])."""
        if frames_early.ndim != 4 or frames_early.shape[-1] != self.n_early:
            raise ValueError(
                f"{type(self).__name__} expects the {self.n_early} early frames as "
                f"[B, H, W, {self.n_early}], got shape {frames_early.shape}."
            )
        feats = self.features(frames_early)
        if self.n_curve == 0:
            if curve is not None:
                raise ValueError(
                    f"{type(self).__name__} was built without curve inputs (n_curve = 0) but "
                    "was given a curve."
                )
            return feats
        b = frames_early.shape[0]
        if curve is None or curve.shape != (b, self.n_curve):
            got = None if curve is None else curve.shape
            raise ValueError(
                f"{type(self).__name__} needs a curve of shape [{b}, {self.n_curve}] "
                f"(n_curve = {self.n_curve}), got {got}."
            )
        tiled = jnp.broadcast_to(
            curve.astype(feats.dtype)[:, None, None, :], (*feats.shape[:3], self.n_curve)
        )
        return jnp.concatenate([feats, tiled], axis=-1)


class KineticNet(EarlyFramesNet):
    """Paper's network: early frames [B, H, W, n_early] → 2TCM parameters [B, H, W, 5].

    Output last axis: (fv, K1 [mL/min/mL], k2, k3, k4 [1/min]), bounded by ``activation``.
    The architecture is ``backbone`` (default: the paper's sizes); the other arguments are the
    head's own (``activation``, ``bounds``, ``init_params``: see `KineticHead`), with kinetix's
    scaled-sigmoid bounds by default.

    ``parameterization``: ``'rates'`` (the paper) bounds the head's outputs as the rates
    themselves; ``'macro'`` (kinetix option) has the head output (fv, K1, Vd, E, k4) within
    ``bounds`` (default `MACRO_LOWER`, `MACRO_UPPER`; scaled sigmoid only) and converts them
    with `kk.rates_from_macro`; ``'uncoupled'`` (kinetix option) has it output
    (fv, K1v = (1 − fv)·K1, k2, k3, k4) within the rate ``bounds``, converted with
    `kk.rates_from_uncoupled`, so that the tissue term and its gradient do not vanish as fv → 1.
    The outputs are rates in every case, and ``init_params`` are rates.
    """

    def __init__(
        self,
        backbone: Backbone = PAPER_BACKBONE,
        *,
        activation: str = "scaled_sigmoid",
        bounds: tuple[Sequence[float], Sequence[float]] | None = None,
        init_params: Sequence[float] | None = None,
        parameterization: str = "rates",
        rngs: nnx.Rngs,
    ) -> None:
        if activation == "none":
            raise ValueError("KineticNet activation must bound the parameters, not 'none'.")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"KineticNet parameterization must be one of {PARAMETERIZATIONS}, got "
                f"{parameterization!r}."
            )
        if parameterization == "macro":
            if activation != "scaled_sigmoid":
                raise ValueError(
                    "KineticNet parameterization 'macro' needs activation 'scaled_sigmoid' (Vd "
                    "must stay above 0)."
                )
            bounds = (MACRO_LOWER, MACRO_UPPER) if bounds is None else bounds
            if float(bounds[0][2]) <= 0:
                raise ValueError(f"KineticNet macro bounds need a lower Vd > 0, got {bounds[0]}.")
        to_outputs = _CONVERSIONS[parameterization][0]
        if to_outputs is not None and init_params is not None:
            init_params = to_outputs(init_params)
        self.parameterization = parameterization
        super().__init__(
            backbone,
            n_out=len(PARAM_NAMES),
            activation=activation,
            bounds=bounds,
            init_params=init_params,
            rngs=rngs,
        )

    def from_preactivations(self, z: jax.Array) -> jax.Array:
        """Pre-activations [..., 5] -> rates (fv, K1, k2, k3, k4), through the macro or uncoupled
        outputs with ``parameterization = 'macro'`` / ``'uncoupled'``."""
        out = super().from_preactivations(z)
        to_rates = _CONVERSIONS[self.parameterization][1]
        return out if to_rates is None else to_rates(out)


def params_to_frames(
    params: jax.Array,
    inp,
    schedule,
    decay_constant: float = kk.F18_DECAY_CONSTANT,
    point_samples: bool = False,
    blood=None,
) -> jax.Array:
    """PET frames of the 2TCM with per-voxel parameters, one input function per batch element.

    Args:
      params: [B, H, W, 5] (fv, K1, k2, k3, k4); K1 mL/min/mL, k2..k4 1/min.
      inp: plasma input-function pytree with a leading batch axis B on every leaf (e.g.
        ``kk.FengInput(feng_params_B7)`` or a `kk.SampledInput` with [B, K] times and values),
        activity in SUV, time in minutes.
      schedule: `kk.FrameSchedule` with T frames (minutes), static.
      decay_constant: λ in 1/min, a Python float (default F-18); ignored with point_samples.
      point_samples: False (kinetix): decay-corrected frame values, `kk.pet_frames`. True
        (authors' code): C_PET sampled at the frame start times, no decay, `kk.tissue_curve`.
      blood: optional whole-blood input, batched like ``inp``; None: whole blood = plasma.

    Returns:
      [B, H, W, T] frame values in SUV.
    """
    if params.ndim != 4 or params.shape[-1] != len(PARAM_NAMES):
        raise ValueError(f"params must have shape [B, H, W, 5], got {params.shape}.")
    if point_samples:
        t = np.asarray(schedule.start)

        def one(p, i, bl):
            return kk.tissue_curve(p, i, t, blood=bl)

    else:
        lam = float(decay_constant)

        def one(p, i, bl):
            return kk.pet_frames(p, i, schedule, decay_constant=lam, blood=bl)

    return jax.vmap(one)(params, inp, blood)
