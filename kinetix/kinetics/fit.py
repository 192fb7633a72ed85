"""Voxelwise weighted, bounded nonlinear least-squares fits of the 2TCM (docs/conventions.md,
"Voxelwise 2TCM fitting").

For each voxel's decay-corrected frames y_m (m in the fitted frames) and weights w_m:

    minimise  Σ_m w_m·(y_m − x_m(θ))²   over  lower ≤ θ ≤ upper

with x_m = `kk.pet_frames` (exact, decay-weighted frames of C_PET = (1 − fv)·C_T + fv·C_WB),
θ = (fv, K1, k2, k3, k4) for `model="2tcm"`, (fv, K1, k2, k3) with k4 = 0 for
`"2tcm_irreversible"`, plus an input delay Δt (min) with `fit_delay=True` (plasma and whole
blood both shifted, C_p(t − Δt)). Per voxel the result holds the parameters,
Ki = K1·k3/(k2 + k3), standard errors from the Jacobian, the weighted residual sum of squares
and a convergence flag (`FitResult`).

Pieces: `frame_weights` (the peers' weighting schemes), `fit_starts` (starts from each voxel's
Patlak plot), `kinetix.kinetics.fit_jacobian.frames_and_jacobian` (the frames and their exact
Jacobian in one batched pass) and `kinetix.kinetics.fit_solver` (a bounded Levenberg–Marquardt
for many small problems at once, and the standard errors). Measurements behind the choices
(starts, solver, speed against scipy): benchmarks/README.md, "`fit.py`".
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.kinetics import fit_solver
from kinetix.kinetics.compartment import ki_from_rates
from kinetix.kinetics.fit_jacobian import frames_and_jacobian
from kinetix.kinetics.frames import F18_DECAY_CONSTANT, FrameSchedule
from kinetix.kinetics.patlak import fit_line, patlak_x

FIT_MODELS = ("2tcm", "2tcm_irreversible")
WEIGHT_KINDS = ("none", "duration", "duration_decay")


class FitBounds(NamedTuple):
    """Box constraints: `lower` and `upper` for (fv, K1, k2, k3, k4), `delay` (min, max) in min."""

    lower: tuple
    upper: tuple
    delay: tuple


DEFAULT_BOUNDS = FitBounds(
    lower=(0.0, 0.0, 0.0, 0.0, 0.0),
    upper=(1.0, 2.0, 2.0, 2.0, 0.5),
    delay=(-0.5, 0.5),
)
"""KMAP's 2TCM fit box (vb ≤ 1; K1, k2, k3 ≤ 2 /min; k4 ≤ 0.5 /min; all ≥ 0) and kinfitr's
`inpshift` range (±0.5 min). It holds every tissue of the XCAT FDG table (largest: liver
K1 1.256, spleen k2 1.909; shared/reference/KINETICS.md)."""

PATLAK_START_MIN = 10.0
"""Frames with mid-time ≥ this (min) give the Patlak plot that seeds the starts."""

START_TURNOVER = (0.3, 1.0, 0.1, 3.0)
"""k2 + k3 (1/min) of the successive starts (see `fit_starts`): the order in which they are used."""

START_FV = 0.05
START_K4 = 0.01
START_MARGIN = 1e-3
"""Starts are moved at least this fraction of the box inside the bounds (the solver works
strictly inside the box)."""


class FitResult(NamedTuple):
    """Voxelwise 2TCM fit; every field has the leading shape [...] of the frames.

    Attributes:
      params: [..., 5] (fv, K1 mL/min/mL, k2, k3, k4 1/min); k4 = 0 for the irreversible model.
      ki: [...] K1·k3/(k2 + k3) (mL/min/mL), the tissue's net influx; (1 − fv)·ki per mL of voxel.
      delay: [...] fitted input delay (min); 0 when not fitted.
      stderr: [..., 5] standard errors of `params` (0 for a parameter held fixed, +inf where not
        identifiable; see docs/conventions.md).
      ki_stderr: [...] standard error of `ki` (delta method, same rules).
      delay_stderr: [...] standard error of `delay` (0 when not fitted).
      wrss: [...] weighted residual sum of squares Σ w·(y − x)² over the fitted frames.
      converged: [...] bool: the solver stopped on a tolerance (not on `max_steps`, not stalled)
        with finite values.
      n_steps: [...] int32 solver iterations of the kept start.
    """

    params: jax.Array
    ki: jax.Array
    delay: jax.Array
    stderr: jax.Array
    ki_stderr: jax.Array
    delay_stderr: jax.Array
    wrss: jax.Array
    converged: jax.Array
    n_steps: jax.Array


def frame_weights(
    schedule: FrameSchedule, kind: str = "duration", decay_constant: float = F18_DECAY_CONSTANT
) -> np.ndarray:
    """Per-frame least-squares weights as peers use them, normalised to mean 1.

    - "none": w = 1.
    - "duration": w ∝ Δ_m (kinfitr `weights_create` method 7).
    - "duration_decay": w ∝ Δ_m·e^{−λ t_mid,m} (kinfitr method 5; Yaqub et al. 2006): the
      inverse variance of a decay-corrected frame when the counts are Poisson and the activity
      is roughly constant.

    Args:
      schedule: frame schedule (min).
      kind: one of `WEIGHT_KINDS`.
      decay_constant: λ (1/min) for "duration_decay".

    Returns:
      [T] float64 weights with mean 1.
    """
    if kind == "none":
        w = np.ones(schedule.n_frames)
    elif kind == "duration":
        w = schedule.duration.copy()
    elif kind == "duration_decay":
        if decay_constant < 0:
            raise ValueError(f"decay_constant must be >= 0, got {decay_constant}.")
        w = schedule.duration * np.exp(-float(decay_constant) * schedule.mid)
    else:
        raise ValueError(f"weights kind must be one of {WEIGHT_KINDS}, got {kind!r}.")
    return w / np.mean(w)


# ------------------------------------------------------------------------------ arguments ---
def _select(schedule: FrameSchedule, window, frames_mask) -> np.ndarray:
    """Indices of the fitted frames: inside `window` (whole frame) and in `frames_mask`."""
    keep = np.ones(schedule.n_frames, bool)
    if window is not None:
        start, end = (float(v) for v in window)
        if not end > start:
            raise ValueError(f"window must be (start, end) with end > start, got {window}.")
        keep &= (schedule.start >= start - 1e-6) & (schedule.end <= end + 1e-6)
        if not keep.any():
            raise ValueError(
                f"window {start:g}–{end:g} min holds no whole frame of the schedule "
                f"({schedule.start[0]:g}–{schedule.end[-1]:g} min)."
            )
    if frames_mask is not None:
        mask = np.asarray(frames_mask)
        if mask.shape != (schedule.n_frames,) or mask.dtype != bool:
            raise ValueError(
                f"frames_mask must be a bool array of {schedule.n_frames} frames, got "
                f"{mask.dtype} {mask.shape}."
            )
        keep &= mask
    return np.nonzero(keep)[0]


def _bounds(fit_delay, bounds):
    """(lo, hi) tuples of the solver's 5 (+1 delay) parameters, validated."""
    lower = np.asarray(bounds.lower, np.float64)
    upper = np.asarray(bounds.upper, np.float64)
    delay = np.asarray(bounds.delay, np.float64)
    if lower.shape != (5,) or upper.shape != (5,) or delay.shape != (2,):
        raise ValueError("bounds must hold 5 lower, 5 upper values and a (min, max) delay.")
    if np.any(lower < 0) or upper[0] > 1 or np.any(upper <= lower) or delay[1] <= delay[0]:
        raise ValueError("bounds must satisfy 0 <= lower < upper, fv <= 1 and delay min < max.")
    if fit_delay:
        lower, upper = np.append(lower, delay[0]), np.append(upper, delay[1])
    return tuple(lower.tolist()), tuple(upper.tolist())


def _weights(weights, schedule, idx, decay_constant, batch_shape):
    """[..., n] weights of the fitted frames (numpy for a kind, else an array)."""
    if weights is None:
        weights = "none"
    if isinstance(weights, str):
        return frame_weights(schedule, weights, decay_constant)[idx]
    shape = jnp.shape(weights)
    if len(shape) == 0 or shape[-1] != schedule.n_frames:
        raise ValueError(
            f"weights must have a last axis of {schedule.n_frames} frames, got shape {shape}."
        )
    if len(shape) > 1 and shape[:-1] != batch_shape:
        raise ValueError(f"weights of shape {shape} do not match frames {batch_shape} + (T,).")
    if not isinstance(weights, jax.core.Tracer) and np.any(np.asarray(weights) < 0):
        raise ValueError("weights must be non-negative.")
    return jnp.asarray(weights)[..., idx]


# -------------------------------------------------------------------------------- starts -----
def _patlak_rows(schedule: FrameSchedule) -> np.ndarray:
    """Frames of a (sub-)schedule that seed the Patlak plot: mid ≥ 10 min, else the last half."""
    late = np.nonzero(schedule.mid >= PATLAK_START_MIN)[0]
    if late.size >= 3:
        return late
    n = schedule.n_frames
    return np.arange(n - max(2, n // 2), n)


def _starts_one(y, x_patlak, cp_patlak, reversible, n_starts, lo, hi):
    """[n_starts, 5] starts of one voxel from its Patlak slope and intercept (see `fit_starts`)."""
    ki, v0 = fit_line(x_patlak, y / cp_patlak)
    ki = jnp.clip(ki, 1e-4, 0.5)
    v0 = jnp.clip(v0, 0.02, 2.0)
    fv = jnp.minimum(START_FV, 0.5 * v0)
    k4 = jnp.where(reversible, START_K4, 0.0).astype(y.dtype)
    rows = []
    for s in START_TURNOVER[:n_starts]:
        k1 = (ki * s + (v0 - fv) * s * s) / (1.0 - fv)
        k3 = ki * s / ((1.0 - fv) * k1)
        rows.append(jnp.stack([fv, k1, s - k3, k3, k4]))
    margin = START_MARGIN * (hi - lo)
    inner = jnp.clip(jnp.stack(rows), (lo + margin)[None, :], (hi - margin)[None, :])
    return inner.at[:, 4].set(jnp.where(reversible, inner[:, 4], 0.0))


def fit_starts(
    frames,
    inp,
    schedule: FrameSchedule,
    *,
    model: str = "2tcm",
    window=None,
    frames_mask=None,
    n_starts: int = 3,
    bounds: FitBounds = DEFAULT_BOUNDS,
):
    """The starting parameters `fit_2tcm` uses, from each voxel's Patlak plot.

    A line through the Patlak plot of the fitted frames with mid-time ≥ 10 min (or the last
    half of them) gives a slope Ki_P and intercept V0. For an irreversible 2TCM,
    Ki_P ≈ (1 − fv)·K1·k3/S and V0 ≈ fv + (1 − fv)·K1·k2/S² with S = k2 + k3, so for a guessed
    fv (0.05, at most V0/2) and turnover S the start is K1 = (Ki_P·S + (V0 − fv)·S²)/(1 − fv),
    k3 = Ki_P·S/((1 − fv)·K1), k2 = S − k3, k4 = 0.01 (0 when irreversible). Start i uses
    S = `START_TURNOVER[i]`; all are moved 0.1 % of the box inside the bounds.

    Args:
      frames: [..., T] frame values.
      inp: plasma input (unbatched). schedule: static `FrameSchedule`, T frames.
      model, window, frames_mask, bounds: as `fit_2tcm`.
      n_starts: 1 to 4.

    Returns:
      [..., n_starts, 5] starting (fv, K1, k2, k3, k4).
    """
    if not 1 <= n_starts <= len(START_TURNOVER):
        raise ValueError(f"n_starts must be 1 to {len(START_TURNOVER)}, got {n_starts}.")
    _check_model(model)
    _bounds(False, bounds)
    idx = _select(schedule, window, frames_mask)
    frames = jnp.asarray(frames)
    dtype = jnp.result_type(frames.dtype, jnp.float32)
    y = frames[..., idx].astype(dtype)
    starts = _starts_jit(
        y.reshape(-1, idx.size),
        inp,
        model == "2tcm",
        sub=FrameSchedule(schedule.start[idx], schedule.end[idx]),
        n_starts=int(n_starts),
        lo=tuple(float(v) for v in bounds.lower),
        hi=tuple(float(v) for v in bounds.upper),
    )
    return starts.reshape(y.shape[:-1] + (n_starts, 5))


def _starts_flat(y, inp, reversible, *, sub, n_starts, lo, hi):
    """[N, n] frames of the fitted frames -> [N, n_starts, 5] starts (see `fit_starts`)."""
    rows = _patlak_rows(sub)
    x, cp = patlak_x(inp, sub)
    dtype = y.dtype
    lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
    x, cp = x[rows].astype(dtype), cp[rows].astype(dtype)
    return jax.vmap(lambda v: _starts_one(v[rows], x, cp, reversible, n_starts, lo, hi))(y)


_starts_jit = jax.jit(_starts_flat, static_argnames=("sub", "n_starts", "lo", "hi"))


def _check_model(model):
    if model not in FIT_MODELS:
        raise ValueError(f"model must be one of {FIT_MODELS}, got {model!r}.")


# --------------------------------------------------------------------------------- fitting ---
_TOL = {32: 1e-6, 64: 1e-10}  # ftol = xtol = gtol by dtype bits (see fit_solver.least_squares)


def _fit_flat(
    y, w, starts, reversible, inp, blood, *, sub, lam, lo, hi, fit_delay, n_starts, tol, max_steps
):
    """The fit of `fit_2tcm` on flat arrays (jitted as `_fit_jit`).

    Args:
      y, w: [N, n] frames and weights of the fitted frames.
      starts: optional [N, S, 5] starts (None: `_starts_flat`).
      reversible: bool scalar (runtime, so both models share one compiled program): False
        holds k4 at 0 (its Jacobian column zeroed, its standard error 0).
      inp, blood: inputs. The rest is static (see `fit_2tcm`); lo, hi hold 5 (+1 delay) bounds.

    Returns:
      `FitResult` with leading [N].
    """
    n_vox = y.shape[0]
    dtype = y.dtype
    n_par = 5 + int(fit_delay)
    reversible = jnp.asarray(reversible)
    free = jnp.ones(n_par, bool).at[4].set(reversible)  # [P]
    n_free = jnp.sum(free)
    finite = jnp.all(jnp.isfinite(y), axis=1) & jnp.all(jnp.isfinite(w), axis=1)  # [N]
    y = jnp.where(finite[:, None], y, 0.0)
    w = jnp.where(finite[:, None], w, 1.0)
    if starts is None:
        starts = _starts_flat(y, inp, reversible, sub=sub, n_starts=n_starts, lo=lo[:5], hi=hi[:5])
    starts = jnp.where(finite[:, None, None], starts.astype(dtype), 0.0)  # [N, S, 5]
    n_starts = starts.shape[1]
    w_mean = jnp.maximum(jnp.mean(w, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
    level = jnp.sqrt(jnp.mean(w * y * y, axis=1, keepdims=True) / w_mean)
    level = jnp.where(level > 0, level, 1.0)
    # The solver sees √(w/mean w)·(x − y)/level: scale-free tolerances; its cost times
    # mean(w)·level² is the weighted residual sum.
    sw = jnp.repeat(jnp.sqrt(w / w_mean) / level, n_starts, axis=0)  # [N·S, n]
    y_rep = jnp.repeat(y, n_starts, axis=0)

    def rates(theta):  # [..., P] -> (fv, K1, k2, k3, k4) with k4 = 0 when irreversible
        return theta[..., :5] * jnp.where(free[:5], 1.0, 0.0).astype(dtype)[None, :]

    def residuals(theta):  # [N·S, P] -> [N·S, n], [N·S, n, P]
        delay = theta[..., 5] if fit_delay else None
        x, jac = frames_and_jacobian(
            rates(theta), inp, sub, delay=delay, blood=blood, decay_constant=lam
        )
        return sw * (x - y_rep), sw[:, :, None] * jnp.where(free[None, None, :], jac, 0.0)

    lo_a, hi_a = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
    theta0 = starts  # [N, S, 5]
    if fit_delay:
        theta0 = jnp.concatenate([theta0, jnp.zeros(theta0.shape[:2] + (1,), dtype)], axis=2)
    margin = START_MARGIN * (hi_a - lo_a)
    sol = fit_solver.best_of_starts(
        residuals,
        jnp.clip(theta0, (lo_a + margin)[None, None, :], (hi_a - margin)[None, None, :]),
        lo,
        hi,
        max_steps=max_steps,
        tol=tol,
    )

    wrss = sol.cost * w_mean[:, 0] * level[:, 0] ** 2
    dof = jnp.sum(w > 0, axis=1) - n_free
    s2 = jnp.where(dof > 0, sol.cost / jnp.maximum(dof, 1), jnp.inf)  # the solver's scale
    p5 = rates(sol.p)
    ki = ki_from_rates(p5[:, 1], p5[:, 2], p5[:, 3])
    ki_grad = jax.vmap(jax.grad(lambda p: ki_from_rates(p[1], p[2], p[3])))(p5)  # [N, 5]
    ki_dir = jnp.concatenate([ki_grad, jnp.zeros((n_vox, n_par - 5), dtype)], axis=1)
    eye = jnp.broadcast_to(jnp.eye(n_par, dtype=dtype), (n_vox, n_par, n_par))
    directions = jnp.concatenate([eye, ki_dir[:, None, :]], axis=1)  # [N, P + 1, P]
    # Standard errors do not depend on the solver's scaling (s² and JᵀJ scale together); a
    # held k4 has a zero column (its own "null space", not touching the others) and SE 0.
    se = jax.vmap(fit_solver.linear_stderr)(sol.jac, s2, directions)  # [N, P + 1]
    se = jnp.where(jnp.concatenate([free, jnp.ones(1, bool)])[None, :], se, 0.0)
    converged = finite & jnp.isin(sol.status, jnp.asarray(fit_solver.CONVERGED))
    converged &= jnp.isfinite(wrss)
    zeros = jnp.zeros(n_vox, dtype)

    def valid(v):
        return jnp.where(jnp.reshape(finite, (-1,) + (1,) * (v.ndim - 1)), v, jnp.nan)

    return FitResult(
        params=valid(p5),
        ki=valid(ki),
        delay=valid(sol.p[:, 5]) if fit_delay else zeros,
        stderr=valid(se[:, :5]),
        ki_stderr=valid(se[:, -1]),
        delay_stderr=valid(se[:, 5]) if fit_delay else zeros,
        wrss=valid(wrss),
        converged=converged,
        n_steps=sol.n_steps,
    )


_fit_jit = jax.jit(
    _fit_flat,
    static_argnames=("sub", "lam", "lo", "hi", "fit_delay", "n_starts", "tol", "max_steps"),
)


def fit_2tcm(
    frames,
    inp,
    schedule: FrameSchedule,
    *,
    blood=None,
    model: str = "2tcm",
    weights=None,
    window=None,
    frames_mask=None,
    fit_delay: bool = False,
    n_starts: int = 3,
    max_steps: int = 100,
    bounds: FitBounds = DEFAULT_BOUNDS,
    starts=None,
    tol: float | None = None,
    decay_constant: float = F18_DECAY_CONSTANT,
) -> FitResult:
    """Weighted, bounded least-squares fit of the 2TCM to every voxel's frames.

    Minimises Σ_m w_m·(y_m − x_m(θ))² over the fitted frames, x = `kk.pet_frames` (exact frames
    of (1 − fv)·C_T + fv·C_WB), θ inside `bounds`, from `n_starts` Patlak-based starts
    (`fit_starts`), keeping the lowest cost. Safe under `jit`/`vmap` of the caller; compiled
    once per (schedule, frame selection, model, dtype, batch size). Cost: O(voxels × starts ×
    steps × frames); call it on chunks of a volume.

    Args:
      frames: [..., T] decay-corrected frame values (input units, e.g. SUV), any leading shape.
      inp: plasma input (unbatched `FengInput` or `SampledInput`).
      schedule: static `FrameSchedule` of the T frames (min).
      blood: whole-blood input for the fv term (None: whole blood = plasma).
      model: "2tcm" (fv, K1, k2, k3, k4 free) or "2tcm_irreversible" (k4 = 0).
      weights: None or "none" (uniform), "duration", "duration_decay" (`frame_weights`), or an
        array [T] or [..., T] of non-negative weights.
      window: optional (start, end) in min: fit only frames lying wholly inside it.
      frames_mask: optional static bool [T]: fit only these frames (combined with `window`).
      fit_delay: also fit an input delay Δt within `bounds.delay` (plasma and blood shifted).
      n_starts: starts per voxel, 1 to 4 (`fit_starts`).
      max_steps: solver iterations per start.
      bounds: `FitBounds` (default `DEFAULT_BOUNDS`).
      starts: optional [..., S, 5] own starts (fv, K1, k2, k3, k4) instead of `fit_starts`
        (clipped to the bounds; k4 ignored by the irreversible model; delay starts at 0).
      tol: ftol = xtol = gtol of the solver; default 1e-6 in float32, 1e-10 in float64.
      decay_constant: λ (1/min) of the frame model (and of "duration_decay" weights).

    Returns:
      `FitResult`, fields with the leading shape of `frames`, in its float dtype.

    Raises:
      ValueError: unknown model, frames whose last axis differs from the schedule, a window
        or mask leaving fewer frames than free parameters + 1, bad weights, bounds or n_starts.
    """
    _check_model(model)
    shape = jnp.shape(frames)
    if len(shape) == 0 or shape[-1] != schedule.n_frames:
        raise ValueError(
            f"frames have {shape[-1] if shape else 0} time points but the schedule has "
            f"{schedule.n_frames} frames."
        )
    if not 1 <= n_starts <= len(START_TURNOVER):
        raise ValueError(f"n_starts must be 1 to {len(START_TURNOVER)}, got {n_starts}.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    idx = _select(schedule, window, frames_mask)
    lo, hi = _bounds(fit_delay, bounds)
    n_free = 4 + (model == "2tcm") + int(fit_delay)
    if idx.size < n_free + 1:
        raise ValueError(
            f"only {idx.size} frame(s) are selected for the fit; {model} "
            f"{'with a delay ' if fit_delay else ''}needs at least {n_free + 1}."
        )
    batch = shape[:-1]
    w = _weights(weights, schedule, idx, decay_constant, batch)
    frames = jnp.asarray(frames)
    dtype = jnp.result_type(frames.dtype, jnp.float32)
    y = frames[..., idx].astype(dtype).reshape(-1, idx.size)
    w = jnp.broadcast_to(jnp.asarray(w, dtype), batch + (idx.size,)).reshape(y.shape)
    if tol is None:
        tol = _TOL[jnp.finfo(dtype).bits]
    if starts is not None:
        sshape = jnp.shape(starts)
        if len(sshape) < 2 or sshape[-1] != 5 or sshape[:-2] != batch:
            raise ValueError(
                f"starts must have shape {batch} + (S, 5) for frames {shape}, got {sshape}."
            )
        starts = jnp.asarray(starts, dtype).reshape((-1,) + sshape[-2:])
    res = _fit_jit(
        y,
        w,
        starts,
        jnp.asarray(model == "2tcm"),
        inp,
        blood,
        sub=FrameSchedule(schedule.start[idx], schedule.end[idx]),
        n_starts=int(n_starts),
        lam=float(decay_constant),
        lo=lo,
        hi=hi,
        fit_delay=bool(fit_delay),
        tol=float(tol),
        max_steps=int(max_steps),
    )
    return jax.tree.map(lambda v: v.reshape(batch + v.shape[1:]), res)
