"""The architecture options that `KineticNet` and `DirectNet` share, as one frozen config object.

Both networks are the same body (`EarlyFramesNet`): a per-frame U-Net feature extractor and a
pointwise head. `Backbone` holds the options of that body; the networks add only their own
(the kinetic head's activation, bounds and parameterisation; the direct head's late-frame count).
A new backbone option is one field here (validated in `Backbone.__post_init__`), its use in
`EarlyFramesNet` or `kinetix.models.unet`, and its default in ``configs/default.py``.

The defaults are the paper's network (Liang et al. 2023): 22 input frames, 10 U-Net features per
frame, widths 64–1024, residual blocks (the paper text), head 256→128→128→64, no curve inputs,
float32 computation.
"""

import dataclasses
import operator

import jax.numpy as jnp

import kinetix.kinetics as kk
from kinetix.models.unet import PAPER_WIDTHS, _check_width

PAPER_HEAD_HIDDEN = (256, 128, 128, 64)
"""Hidden widths of the paper's pointwise network."""

CONFIG_KEYS = {"n_curve": "curve_frames"}
"""`Backbone` field -> its key in a model config section, where the two names differ."""

_MISSING = object()


def config_value(config, name: str):
    """``config.<name>`` of a model config section; ValueError naming the field if it is absent."""
    value = getattr(config, name, _MISSING)
    if value is _MISSING:
        raise ValueError(f"Model config is missing the required field {name!r}.")
    return value


def _count(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools and non-integers rejected)."""
    try:
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or isinstance(value, bool) or n < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"Backbone {name} must be {what}, got {value!r}.")
    return n


def _widths(name: str, value, min_len: int) -> tuple[int, ...]:
    """``value`` as a tuple of at least ``min_len`` positive multiples of 16."""
    try:
        widths = tuple(value)
    except TypeError:
        raise ValueError(f"Backbone {name} must be a sequence of widths, got {value!r}.") from None
    if len(widths) < min_len:
        raise ValueError(f"Backbone {name} needs at least {min_len} entries, got {widths!r}.")
    return tuple(_check_width(f"Backbone {name} entry ({name}={widths!r})", w) for w in widths)


def _dtype(value) -> jnp.dtype | None:
    """None or a floating dtype (from a name such as ``'bfloat16'`` or a dtype)."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Backbone dtype must be None or a floating dtype such as 'float32' or 'bfloat16', "
            f"got {value!r}."
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Shared architecture of `KineticNet` and `DirectNet` (frozen, hashable, validated).

    Sequences are stored as tuples and ``dtype`` as a `jnp.dtype` (or None), so
    ``Backbone(widths=[16, 32], dtype='float32')`` is a valid, hashable config.

    Attributes:
      n_early: input frames T_in (paper: 22, 0–35 min).
      features_per_frame: U-Net output features per frame F (paper: 10).
      widths: U-Net channel widths per level, top to bottom: at least two positive multiples of
        16 (paper: 64, 128, 256, 512, 1024). Input H, W must divide by ``2 ** (len(widths) - 1)``.
      residual: residual `DoubleConv` blocks (paper text) or not (authors' code).
      head_hidden: hidden widths of the pointwise head, positive multiples of 16 (may be empty).
      n_curve: extra per-example head inputs C (default 0, the paper): a vector [B, C], the same
        for every voxel of an example, joined to the U-Net features before the head (kinetix
        gives the subject's plasma input, one mean per frame: `kinetix.training.curve_features`
        in kinetix/training/step.py). Config key: ``curve_frames``.
      dtype: computation dtype (None: float32 from the parameters); parameters stay float32.
    """

    n_early: int = kk.N_EARLY_FRAMES
    features_per_frame: int = 10
    widths: tuple[int, ...] = PAPER_WIDTHS
    residual: bool = True
    head_hidden: tuple[int, ...] = PAPER_HEAD_HIDDEN
    n_curve: int = 0
    dtype: jnp.dtype | None = None

    def __post_init__(self) -> None:
        if self.residual not in (True, False):
            raise ValueError(f"Backbone residual must be True or False, got {self.residual!r}.")
        normalised = dict(
            n_early=_count("n_early", self.n_early, 1),
            features_per_frame=_count("features_per_frame", self.features_per_frame, 1),
            widths=_widths("widths", self.widths, 2),
            residual=bool(self.residual),
            head_hidden=_widths("head_hidden", self.head_hidden, 0),
            n_curve=_count("n_curve", self.n_curve, 0),
            dtype=_dtype(self.dtype),
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config) -> "Backbone":
        """The backbone of a model config section (e.g. ``config.model``, any object with
        attributes): one key per field, named as the field except `CONFIG_KEYS`.

        Raises:
          ValueError: a key is missing, or a value is invalid.
        """
        return cls(
            **{
                f.name: config_value(config, CONFIG_KEYS.get(f.name, f.name))
                for f in dataclasses.fields(cls)
            }
        )

    @property
    def head_inputs(self) -> int:
        """Channels the head sees per voxel: ``n_early · features_per_frame + n_curve``."""
        return self.n_early * self.features_per_frame + self.n_curve


PAPER_BACKBONE = Backbone()
"""The paper's backbone (the defaults)."""
