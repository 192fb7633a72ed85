"""kinetix.models: Flax NNX networks (U-Net features → 2TCM parameters, or late frames directly).

The architecture both networks share is one frozen `Backbone` (frames, U-Net, head widths, curve
inputs, dtype); `KineticNet` and `DirectNet` take it plus their own head options::

    net = KineticNet(Backbone(widths=(16, 32), head_hidden=(16,)), rngs=nnx.Rngs(0))

`build_model` builds either from a config section (``config.model`` of ``configs/default.py``).
Use them functionally in training code::

    model = build_model(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)          # once
    params = nnx.merge(graphdef, state)(x)      # inside a pure jitted step

The only NNX state is `nnx.Param` (GroupNorm, no BatchNorm), so there are no batch statistics
to thread through the step.
"""

from flax import nnx

from kinetix.models.backbone import (
    PAPER_BACKBONE,
    PAPER_HEAD_HIDDEN,
    Backbone,
    config_value,
)
from kinetix.models.direct_net import PAPER_N_LATE, DirectNet
from kinetix.models.kinetic_net import (
    ACTIVATIONS,
    BOUNDED_ACTIVATIONS,
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    LOG_LOWER,
    MACRO_LOWER,
    MACRO_UPPER,
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
    "PAPER_BACKBONE",
    "PAPER_HEAD_HIDDEN",
    "PAPER_N_LATE",
    "PARAMETERIZATIONS",
    "PAPER_WIDTHS",
    "PARAM_NAMES",
    "Backbone",
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


def _tuple_or_none(value):
    return None if value is None else tuple(value)


def _kinetic_bounds(config, activation: str, parameterization: str):
    """``(lower, upper)`` of the kinetic head from the config's bounds fields (None: unbounded).

    The head's outputs are the rates, or (fv, K1, Vd, E, k4) with their own bounds
    (``macro_bounds_*``); the log scale has its own positive lower bounds (``log_bounds_lower``).
    A field set to None takes the module default.
    """
    if activation not in BOUNDED_ACTIVATIONS:
        return None
    if parameterization == "macro":
        keys, default = ("macro_bounds_lower", "macro_bounds_upper"), (MACRO_LOWER, MACRO_UPPER)
    elif activation == "log_scaled_sigmoid":
        keys, default = ("log_bounds_lower", "bounds_upper"), (LOG_LOWER, DEFAULT_UPPER)
    else:
        keys, default = ("bounds_lower", "bounds_upper"), (DEFAULT_LOWER, DEFAULT_UPPER)
    values = (config_value(config, key) for key in keys)
    return tuple(d if v is None else tuple(v) for v, d in zip(values, default, strict=True))


def build_model(config, rngs: nnx.Rngs | int) -> EarlyFramesNet:
    """Build a `KineticNet` or `DirectNet` from a config section (any object with attributes).

    Every field is read as ``config.<field>`` (``configs/default.py`` sets them all); a missing
    field is a ValueError naming it. Fields:
      kind: ``'kinetic'`` (U-Net + bounded 2TCM head) or ``'direct'`` ("without model" ablation).
      n_early, features_per_frame, widths, residual, head_hidden, curve_frames, dtype: the
        `Backbone` (`Backbone.from_config`; ``curve_frames`` is its ``n_curve``).
      activation: kinetic only, ``'scaled_sigmoid'``, ``'log_scaled_sigmoid'`` (the same bounds
        on a log scale, see `KineticHead`) or ``'hardsigmoid'`` (authors').
      bounds_lower, bounds_upper: kinetic + a scaled sigmoid only: 5 numbers each for
        (fv, K1, k2, k3, k4) in (1, mL/min/mL, 1/min, 1/min, 1/min); None means
        `DEFAULT_LOWER`, `DEFAULT_UPPER`.
      log_bounds_lower: kinetic + ``'log_scaled_sigmoid'`` only: its lower bounds (all > 0),
        used instead of ``bounds_lower``; None means `LOG_LOWER`.
      parameterization: kinetic only, ``'rates'`` (the paper), ``'macro'`` (the head outputs
        (fv, K1, Vd, E, k4)) or ``'uncoupled'`` (fv, (1 − fv)·K1, k2, k3, k4 within the rate
        bounds); see `KineticNet`.
      macro_bounds_lower, macro_bounds_upper: kinetic + macro only: 5 numbers each for
        (fv, K1, Vd, E, k4); None means `MACRO_LOWER`, `MACRO_UPPER`.
      init_params: kinetic only, the 5 rates the final bias maps to (None: mid-range, zero
        bias); the direct ablation ignores it (zero final bias).
      n_late: direct only and optional: predicted late frames (absent: `PAPER_N_LATE` = 6).

    Args:
      config: e.g. ``config.model`` of an `ml_collections.ConfigDict`, or any namespace.
      rngs: `nnx.Rngs` or an integer seed.

    Returns:
      The model (an `EarlyFramesNet`): [B, H, W, n_early] -> [B, H, W, 5] or [B, H, W, n_late].
    """
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    kind = config_value(config, "kind")
    if kind not in KINDS:
        raise ValueError(f"Model config field 'kind' must be one of {KINDS}, got {kind!r}.")
    backbone = Backbone.from_config(config)
    if kind == "direct":
        n_late = int(getattr(config, "n_late", PAPER_N_LATE))
        return DirectNet(backbone, n_late=n_late, rngs=rngs)
    activation = config_value(config, "activation")
    parameterization = config_value(config, "parameterization")
    return KineticNet(
        backbone,
        activation=activation,
        bounds=_kinetic_bounds(config, activation, parameterization),
        init_params=_tuple_or_none(config_value(config, "init_params")),
        parameterization=parameterization,
        rngs=rngs,
    )
