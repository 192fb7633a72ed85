"""kinetix.models: Flax NNX networks (U-Net features → 2TCM parameters, or late frames directly).

Use them functionally in training code::

    model = build_model(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)          # once
    params = nnx.merge(graphdef, state)(x)      # inside a pure jitted step

The only NNX state is `nnx.Param` (GroupNorm, no BatchNorm), so there are no batch statistics
to thread through the step.
"""

import jax.numpy as jnp
from flax import nnx

from kinetix.models.direct_net import DirectNet
from kinetix.models.kinetic_net import (
    ACTIVATIONS,
    BOUNDED_ACTIVATIONS,
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    LOG_LOWER,
    MACRO_LOWER,
    MACRO_UPPER,
    PAPER_HEAD_HIDDEN,
    PARAM_NAMES,
    PARAMETERIZATIONS,
    EarlyFramesNet,
    KineticHead,
    KineticNet,
    bound_outputs,
    params_to_frames,
)
from kinetix.models.unet import (
    PAPER_WIDTHS,
    DoubleConv,
    Down,
    FrameFeatureExtractor,
    UNet,
    Up,
    apply_per_frame,
)

KINDS = ("kinetic", "direct")

__all__ = [
    "ACTIVATIONS",
    "BOUNDED_ACTIVATIONS",
    "DEFAULT_LOWER",
    "DEFAULT_UPPER",
    "KINDS",
    "LOG_LOWER",
    "MACRO_LOWER",
    "MACRO_UPPER",
    "PAPER_HEAD_HIDDEN",
    "PARAMETERIZATIONS",
    "PAPER_WIDTHS",
    "PARAM_NAMES",
    "DirectNet",
    "DoubleConv",
    "Down",
    "EarlyFramesNet",
    "FrameFeatureExtractor",
    "KineticHead",
    "KineticNet",
    "UNet",
    "Up",
    "apply_per_frame",
    "bound_outputs",
    "build_model",
    "params_to_frames",
]

_MISSING = object()


def _get(config, name, default=_MISSING):
    value = getattr(config, name, default)
    if value is _MISSING:
        raise ValueError(f"Model config is missing the required field {name!r}.")
    return value


def _dtype_or_none(value):
    return None if value is None else jnp.dtype(value)


def _tuple_or_none(value):
    return None if value is None else tuple(value)


def build_model(config, rngs: nnx.Rngs | int) -> EarlyFramesNet:
    """Build a `KineticNet` or `DirectNet` from a config section (any object with attributes).

    Fields read (an absent optional field takes the default shown):
      kind: ``'kinetic'`` (U-Net + bounded 2TCM head) or ``'direct'`` ("without model" ablation).
      widths: U-Net widths, multiples of 16 (default (64, 128, 256, 512, 1024)).
      residual: residual DoubleConv blocks (default True; the authors' code: False).
      features_per_frame: U-Net features per frame (default 10).
      n_early: input frames (default 22).
      head_hidden: hidden widths of the pointwise head (default (256, 128, 128, 64)).
      activation: kinetic only, ``'scaled_sigmoid'`` (default), ``'log_scaled_sigmoid'`` (the
        same bounds on a log scale, see `KineticHead`) or ``'hardsigmoid'`` (authors').
      bounds_lower, bounds_upper: kinetic + a scaled sigmoid only: 5 numbers each for
        (fv, K1, k2, k3, k4) in (1, mL/min/mL, 1/min, 1/min, 1/min); default
        `DEFAULT_LOWER` = 0 and `DEFAULT_UPPER` = (1, 2, 3, 1, 0.2). None means the default.
      log_bounds_lower: kinetic + ``'log_scaled_sigmoid'`` only: its lower bounds (all > 0),
        used instead of ``bounds_lower``; default `LOG_LOWER`.
      parameterization: kinetic only, ``'rates'`` (default, the paper), ``'macro'`` (the
        head outputs (fv, K1, Vd, E, k4)) or ``'uncoupled'`` (fv, (1 − fv)·K1, k2, k3, k4 within
        the rate bounds); see `KineticNet`.
      macro_bounds_lower, macro_bounds_upper: kinetic + macro only: 5 numbers each for
        (fv, K1, Vd, E, k4); default `MACRO_LOWER`, `MACRO_UPPER`.
      init_params: kinetic only, the 5 parameter values the final bias maps to (default None:
        mid-range, zero bias); the direct ablation ignores it (zero final bias).
      n_late: direct only, predicted late frames (default 6).
      curve_frames: extra head inputs per example (default 0, the paper; kinetix training gives
        the subject's plasma input as one mean per frame, so it is 0 or the frame count).
      dtype: computation dtype name or dtype, e.g. ``'bfloat16'`` (default None: float32).

    Args:
      config: e.g. ``config.model`` of an `ml_collections.ConfigDict`, or any namespace.
      rngs: `nnx.Rngs` or an integer seed.

    Returns:
      The model (an `EarlyFramesNet`): [B, H, W, n_early] -> [B, H, W, 5] or [B, H, W, n_late].
    """
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    kind = _get(config, "kind")
    if kind not in KINDS:
        raise ValueError(f"Model config field 'kind' must be one of {KINDS}, got {kind!r}.")
    common = dict(
        n_early=int(_get(config, "n_early", 22)),
        features_per_frame=int(_get(config, "features_per_frame", 10)),
        widths=tuple(_get(config, "widths", PAPER_WIDTHS)),
        residual=bool(_get(config, "residual", True)),
        head_hidden=tuple(_get(config, "head_hidden", PAPER_HEAD_HIDDEN)),
        n_curve=int(_get(config, "curve_frames", 0)),
        dtype=_dtype_or_none(_get(config, "dtype", None)),
        rngs=rngs,
    )
    if kind == "direct":
        return DirectNet(n_late=int(_get(config, "n_late", 6)), **common)
    common["init_params"] = _tuple_or_none(_get(config, "init_params", None))
    activation = _get(config, "activation", "scaled_sigmoid")
    parameterization = _get(config, "parameterization", "rates")
    bounds = None
    if activation in BOUNDED_ACTIVATIONS:
        # The head's outputs are the rates, or (fv, K1, Vd, E, k4) with their own bounds; the
        # log scale has its own (positive) lower bounds.
        macro = parameterization == "macro"
        prefix = "macro_bounds" if macro else "bounds"
        default = (MACRO_LOWER, MACRO_UPPER) if macro else (DEFAULT_LOWER, DEFAULT_UPPER)
        if activation == "log_scaled_sigmoid" and not macro:
            lower = _get(config, "log_bounds_lower", None)
            default = (LOG_LOWER, DEFAULT_UPPER)
        else:
            lower = _get(config, f"{prefix}_lower", None)
        upper = _get(config, f"{prefix}_upper", None)
        bounds = (
            default[0] if lower is None else tuple(lower),
            default[1] if upper is None else tuple(upper),
        )
    return KineticNet(
        activation=activation, bounds=bounds, parameterization=parameterization, **common
    )
