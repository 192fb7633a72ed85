"""Patlak graphical analysis: coordinates and voxelwise fits (OLS, perpendicular, weighted).

    y_m = C_m / Cp_m = Ki · x_m + V0,   x_m = ∫0^{t_mid,m} Cp / Cp_m,   for frames with t ≥ t*

Conventions (TPCCLIB's; docs/conventions.md, "Patlak"):
- the integral runs from t = 0 (injection) to the frame **mid-time**;
- Cp_m is the **frame mean** of the plasma curve (with `decay_constant` > 0 it is instead made
  exactly like a decay-corrected image frame, f_m/Δ_m·∫ Cp e^{−λτ}; the difference is ~1e-4);
- frames enter the fit when their **mid-time** lies in [t*, t_end] (decided at trace time from
  the static schedule, so `jax.jit(lambda v: patlak(v, inp, sched, 9.0))` works);
- `method="perpendicular"` is total least squares (TPCCLIB's image Patlak, `llsqperp`),
  `"ols"` ordinary least squares (scipy `linregress`). Both centre the data first, so float32
  stays accurate; optional per-frame `weights` give weighted fits.
Ki and V0 are NaN only where a voxel's own frames are NaN.
"""

import jax.numpy as jnp
import numpy as np

from kinetix.kinetics.compartment import blood_frames
from kinetix.kinetics.frames import FrameSchedule

METHODS = ("ols", "perpendicular")


def patlak_x(inp, schedule: FrameSchedule, decay_constant: float = 0.0):
    """Patlak abscissa for every frame.

    Args:
      inp: plasma input (unbatched).
      schedule: frame schedule (min).
      decay_constant: 0 for the plain frame mean of Cp (TPCCLIB); λ for image-like frames.

    Returns:
      (x [T] in min, cp [T] frame value of Cp). x is 0 where the frame's Cp is 0.
    """
    cp = blood_frames(inp, schedule, decay_constant)
    integral = inp.integral(jnp.asarray(schedule.mid, cp.dtype))
    pos = cp > 0
    x = jnp.where(pos, integral / jnp.where(pos, cp, 1.0), 0.0)
    return x, cp


def _validate(frames_shape, schedule, t_star, t_end, method, weights):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if len(frames_shape) == 0 or frames_shape[-1] != schedule.n_frames:
        raise ValueError(
            f"frames have {frames_shape[-1] if frames_shape else 0} time points but the schedule "
            f"has {schedule.n_frames} frames."
        )
    idx = schedule.select(float(t_star), None if t_end is None else float(t_end))
    if weights is not None:
        wshape = jnp.shape(weights)
        if len(wshape) == 0 or wshape[-1] != schedule.n_frames:
            raise ValueError(
                f"weights must have a last axis of {schedule.n_frames} frames, got shape {wshape}."
            )
        if not hasattr(weights, "aval") and np.any(np.asarray(weights)[..., idx] < 0):
            raise ValueError("weights must be non-negative.")
    return idx


def fit_line(x, y, weights=None, method="ols"):
    """Line fit y ≈ slope·x + intercept over the last axis, centred for accuracy.

    Args:
      x: [..., N] abscissae (broadcast against y).
      y: [..., N] ordinates.
      weights: optional [..., N] non-negative weights.
      method: "ols" or "perpendicular" (total least squares).

    Returns:
      (slope, intercept), each [...].
    """
    dtype = jnp.result_type(x, y, 1.0)
    x = jnp.asarray(x, dtype)
    y = jnp.asarray(y, dtype)
    x, y = jnp.broadcast_arrays(x, y)
    w = (
        jnp.ones_like(y)
        if weights is None
        else jnp.broadcast_to(jnp.asarray(weights, dtype), y.shape)
    )
    sw = jnp.sum(w, axis=-1, keepdims=True)
    xm = jnp.sum(w * x, axis=-1, keepdims=True) / sw
    ym = jnp.sum(w * y, axis=-1, keepdims=True) / sw
    dx, dy = x - xm, y - ym
    sxx = jnp.sum(w * dx * dx, axis=-1)
    sxy = jnp.sum(w * dx * dy, axis=-1)
    if method == "ols":
        slope = sxy / sxx
    elif method == "perpendicular":
        syy = jnp.sum(w * dy * dy, axis=-1)
        diff = sxx - syy
        root = jnp.sqrt(diff * diff + 4.0 * sxy * sxy)
        # Two algebraically equal roots; pick the one without cancellation.
        den1 = diff + root  # ≥ 0; small only when syy > sxx and sxy ≈ 0
        a = 2.0 * sxy / jnp.where(den1 > 0, den1, 1.0)
        b = (root - diff) / (2.0 * jnp.where(sxy != 0, sxy, 1.0))
        slope = jnp.where(diff >= 0, jnp.where(den1 > 0, a, 0.0), b)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    intercept = ym[..., 0] - slope * xm[..., 0]
    return slope, intercept


def patlak(
    frames,
    inp,
    schedule: FrameSchedule,
    t_star: float,
    t_end: float | None = None,
    method: str = "ols",
    weights=None,
    decay_constant: float = 0.0,
):
    """Voxelwise Patlak Ki and V0.

    Args:
      frames: [..., T] decay-corrected frame values (same units as the input).
      inp: plasma input (unbatched).
      schedule: static `FrameSchedule` with T frames (min).
      t_star: start of the linear phase (min); frames with mid-time ≥ t_star enter the fit.
      t_end: optional end (min); frames with mid-time ≤ t_end. Default: all remaining frames.
      method: "ols" or "perpendicular".
      weights: optional [..., T] per-frame weights (only selected frames matter).
      decay_constant: see `patlak_x`.

    Returns:
      (ki [...] in 1/min, v0 [...] in mL/mL).

    Raises:
      ValueError: bad method, frame count that disagrees with the schedule, t_star past the last
        frame, fewer than 2 frames in the window, negative weights.
    """
    idx = _validate(jnp.shape(frames), schedule, t_star, t_end, method, weights)
    x, cp = patlak_x(inp, schedule, decay_constant)
    frames = jnp.asarray(frames)
    dtype = jnp.result_type(frames.dtype, x.dtype)
    xs = jnp.asarray(x[idx], dtype)
    cps = jnp.asarray(cp[idx], dtype)
    y = frames[..., idx].astype(dtype) / jnp.reshape(cps, (1,) * (frames.ndim - 1) + cps.shape)
    xs = jnp.reshape(xs, (1,) * (frames.ndim - 1) + xs.shape)
    w = None if weights is None else jnp.asarray(weights)[..., idx]
    return fit_line(xs, y, w, method)
