"""Bounded, weighted least-squares fit of Feng model 2 to the early samples of an input function.

A 35-minute protocol measures the plasma input only up to 35 min, while the frames of 35–65 min
and the Patlak plot need it to 65 min. `fit_feng` fits `FengInput` (Feng et al. 1993, model 2)
to the samples with t ≤ `t_end` so that the closed form can be evaluated past them
(`kinetix.data.late_input` splices the extrapolation onto the measured curve). The solver is
`kinetix.kinetics.fit_solver.least_squares` (bounded Levenberg–Marquardt, many problems at
once), from `n_starts` starts per curve, the lowest cost kept.

Each curve is fitted in its own units: values divided by the curve's peak L (largest fitted
sample) and the delay written as τ = u·t_peak (t_peak: the time of that sample), so one fixed box
serves every curve and every activity unit:

    θ = (A1/L, A2/L, A3/L, λ1, λ2, λ3, u)
    lower = (0, 0, 0, −60, −0.5, −0.04, 0)     upper = (500, 5, 5, −0.5, −0.04, −1e−4, 1)

A1/L in 1/min, λ in 1/min. The three rates live in disjoint intervals (λ1 < λ2 < λ3 always,
so A3 is the slowest, tail term), the amplitudes are non-negative and 0 ≤ τ ≤ t_peak.

Weights: by default relative, w_k = 1/max(y_k, 0.02·L)², so every sample counts by its relative
misfit and the few large bolus samples do not outweigh the tail that governs the extrapolation
(samples below 2 % of the peak, on the rising edge, get the weight of 2 % of the peak). Any
non-negative weights [..., K] may be given instead; w = 0 drops a sample.

Everything is pure JAX, safe under `jax.jit` and `jax.vmap` (the Python checks run only on
concrete arrays). Measurements behind the choices (weights, starts, bounds):
notes/late_input_doc.md, to be merged into docs/conventions.md.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.kinetics import fit_solver
from kinetix.kinetics.input_function import FENG_FDG, FengInput

FENG_LOWER = (0.0, 0.0, 0.0, -60.0, -0.5, -0.04, 0.0)
FENG_UPPER = (500.0, 5.0, 5.0, -0.5, -0.04, -1e-4, 1.0)
"""Box of the normalised parameters (A1/L, A2/L, A3/L, λ1, λ2, λ3, τ/t_peak); see the module."""

REL_FLOOR = 0.02
"""Relative weights use max(y, REL_FLOOR·peak) (the rising edge is not weighted by 1/0²)."""

MIN_SAMPLES = 8
"""Fitted samples a curve needs: the 7 parameters + 1."""

STUCK = 1e-3
"""A3/L or λ3 closer than this fraction of its box width to a bound: the tail is not fitted."""

MAX_RMSE = 0.2
"""Default largest relative weighted RMS residual (`FengFitResult.rmse`) of a converged fit."""

N_STARTS_MAX = 4
_TOL = {32: 1e-6, 64: 1e-10}  # ftol = xtol = gtol by dtype bits (as kk.fit_2tcm)
_START_MARGIN = 1e-3  # starts are moved this fraction of the box inside the bounds
_ONSET = 0.05  # τ starts at the last sample before the first one above this fraction of the peak


def _fdg_peak() -> float:
    """Peak of `FENG_FDG` (≈ 103.4 at s ≈ 0.29 min), in NumPy at import."""
    a1, a2, a3, l1, l2, l3, _ = (float(v) for v in FENG_FDG)
    s = np.linspace(0.0, 1.0, 100001)
    cp = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return float(cp.max())


_FDG_PEAK = _fdg_peak()


class FengFitResult(NamedTuple):
    """Feng fits of a batch of curves; every field has the curves' leading shape [...].

    Attributes:
      params: [..., 7] (A1, A2, A3, λ1, λ2, λ3, τ) in `FengParams` order and the data's units
        (A1 in activity/min, A2 and A3 in activity, λ in 1/min, τ in min); NaN where the curve
        has no positive finite peak or fewer than 8 fitted samples.
      converged: [...] bool: the solver stopped on a tolerance with finite values, A3 and λ3 are
        not stuck on a bound (within 1e-3 of the box width) and rmse ≤ `max_rmse`.
      rmse: [...] √(Σ w (f − y)² / Σ w y²) over the fitted samples: the weighted RMS residual
        relative to the weighted RMS of the data (dimensionless; with the default relative
        weights ≈ the typical relative misfit, e.g. 0.03 for 3 % noise).
      n_steps: [...] int32 solver iterations of the kept start.
    """

    params: jax.Array
    converged: jax.Array
    rmse: jax.Array
    n_steps: jax.Array


# ------------------------------------------------------------------------------- one curve ---
def _line(x, y, w):
    """Weighted least-squares line y ≈ c + m·x over the samples with w > 0: (c, m, ok)."""
    sw = jnp.sum(w)
    safe = jnp.where(sw > 0, sw, 1.0)
    mx, my = jnp.sum(w * x) / safe, jnp.sum(w * y) / safe
    sxx = jnp.sum(w * (x - mx) ** 2)
    m = jnp.sum(w * (x - mx) * (y - my)) / jnp.where(sxx > 0, sxx, 1.0)
    return my - m * mx, m, (sw > 0) & (sxx > 0)


def _prepare(t, y, w, t_end):
    """Per curve: normalised data, solver weights, peak L, peak time and the fitted mask.

    Args:
      t, y: [K] times (min) and values; w: [K] weights or None (relative); t_end: scalar.

    Returns:
      (t0 [K], yn [K], sw [K], L, t_peak, fitted [K], valid): t0 and yn are 0 outside the fitted
      samples, sw = √(w/mean w) there and 0 elsewhere, valid = a positive peak and ≥ 8 samples.
    """
    fitted = jnp.isfinite(t) & jnp.isfinite(y) & (t <= t_end)
    if w is not None:
        fitted &= jnp.isfinite(w) & (w > 0)
    y_fit = jnp.where(fitted, y, -jnp.inf)
    i_pk = jnp.argmax(y_fit)
    peak = y_fit[i_pk]
    valid = (peak > 0) & jnp.isfinite(peak) & (jnp.sum(fitted) >= MIN_SAMPLES)
    level = jnp.where(valid, peak, 1.0)
    t0 = jnp.where(fitted, t, 0.0)
    yn = jnp.where(fitted, y / level, 0.0)
    if w is None:
        w = 1.0 / jnp.maximum(yn, REL_FLOOR) ** 2
    w = jnp.where(fitted, w, 0.0)
    w_mean = jnp.sum(w) / jnp.maximum(jnp.sum(fitted), 1)
    sw = jnp.sqrt(w / jnp.where(w_mean > 0, w_mean, 1.0))
    return t0, yn, sw, level, jnp.where(valid, t0[i_pk], 0.0), fitted, valid


def _model_and_jacobian(theta, t, t_peak):
    """Feng model 2 in the normalised parameters θ [7] at times t [K], and ∂f/∂θ [K, 7].

    f = (a1 s − a2 − a3)e^{λ1 s} + a2 e^{λ2 s} + a3 e^{λ3 s} for s = t − u·t_peak > 0, else 0
    (the formula of `FengInput`, written out with its derivatives: smaller to compile than
    `jax.jacfwd` through it).
    """
    a1, a2, a3, l1, l2, l3, u = (theta[i] for i in range(7))
    on = t > u * t_peak
    s = jnp.maximum(t - u * t_peak, 0.0)
    e1, e2, e3 = jnp.exp(l1 * s), jnp.exp(l2 * s), jnp.exp(l3 * s)
    lin = a1 * s - a2 - a3
    f = lin * e1 + a2 * e2 + a3 * e3
    dfds = (a1 + l1 * lin) * e1 + a2 * l2 * e2 + a3 * l3 * e3
    cols = [s * e1, e2 - e1, e3 - e1, s * lin * e1, a2 * s * e2, a3 * s * e3, -t_peak * dfds]
    jac = jnp.stack(cols, axis=-1)
    return jnp.where(on, f, 0.0), jnp.where(on[:, None], jac, 0.0)


def _starts(t, yn, fitted, t_peak, t_end, n_starts):
    """[n_starts, 7] normalised starts of one curve, moved inside the box.

    1. `FENG_FDG`'s rates, its amplitudes scaled to the curve: A1 by the peak, A2 and A3 by the
       ratio of the curve's late level (mean over t ≥ t_end/2) to Feng's at the same delays.
    2. Exponential peeling: λ3, A3 from a line through log y over t ≥ t_end/2; λ2, A2 from a
       line through log(y − A3·e^{λ3 s}) between t_peak + 1 min and t_end/2; λ1 from Feng.
    3. Start 2 with a bolus twice as sharp (λ1 × 2, A1 × 2).
    4. Start 1 with the slow rates λ2, λ3 halved (a flatter tail).
    τ starts at the last sample before the first one above 5 % of the peak (0 if none).
    """
    dtype = yn.dtype
    fdg = jnp.asarray(np.asarray(FENG_FDG, np.float64), dtype)
    fdg_peak = jnp.asarray(_FDG_PEAK, dtype)
    above = fitted & (yn > _ONSET)
    first = jnp.argmax(above)
    tau0 = jnp.where(first > 0, t[jnp.maximum(first - 1, 0)], 0.0)
    tau0 = jnp.minimum(tau0, 0.9 * t_peak)
    u0 = jnp.where(t_peak > 0, tau0 / jnp.where(t_peak > 0, t_peak, 1.0), 0.5)
    s = jnp.maximum(t - tau0, 0.0)
    late = fitted & (t >= 0.5 * t_end) & (yn > 0)
    n_late = jnp.maximum(jnp.sum(late), 1)
    fdg_at = FengInput(fdg.at[6].set(0.0))(s) / fdg_peak
    ratio = jnp.sum(jnp.where(late, yn, 0.0)) / jnp.maximum(
        jnp.sum(jnp.where(late, fdg_at, 0.0)), 1e-6 * n_late
    )
    ratio = jnp.where(jnp.sum(late) > 0, ratio, 1.0)
    a1 = fdg[0] / fdg_peak
    s1 = jnp.stack(
        [a1, ratio * fdg[1] / fdg_peak, ratio * fdg[2] / fdg_peak, fdg[3], fdg[4], fdg[5], u0]
    )

    log_y = jnp.log(jnp.where(late, yn, 1.0))
    c3, m3, ok3 = _line(s, log_y, late.astype(dtype))
    l3 = jnp.where(ok3, jnp.clip(m3, -0.035, -2e-4), fdg[5])
    a3 = jnp.where(ok3, jnp.exp(c3), s1[2])
    rest = yn - a3 * jnp.exp(l3 * s)
    mid = fitted & (t >= t_peak + 1.0) & (t < 0.5 * t_end) & (rest > 0.01)
    c2, m2, ok2 = _line(s, jnp.log(jnp.where(mid, rest, 1.0)), mid.astype(dtype))
    l2 = jnp.where(ok2, jnp.clip(m2, -0.45, -0.045), fdg[4])
    a2 = jnp.where(ok2, jnp.exp(c2), s1[1])
    s2 = jnp.stack([a1, a2, a3, fdg[3], l2, l3, u0])
    s3 = s2.at[0].multiply(2.0).at[3].multiply(2.0)
    s4 = s1.at[4].multiply(0.5).at[5].multiply(0.5)
    starts = jnp.stack([s1, s2, s3, s4][:n_starts])
    lo, hi = jnp.asarray(FENG_LOWER, dtype), jnp.asarray(FENG_UPPER, dtype)
    margin = _START_MARGIN * (hi - lo)
    return jnp.clip(starts, (lo + margin)[None, :], (hi - margin)[None, :])


# -------------------------------------------------------------------------------- the batch ---
def _fit_flat(t, y, w, t_end, *, n_starts, max_steps, tol, max_rmse):
    """`fit_feng` on flat arrays: t, y [N, K], w [N, K] or None, t_end scalar -> fields [N]."""
    n_curves = t.shape[0]
    dtype = y.dtype
    t_end = jnp.asarray(t_end, dtype)
    if w is None:
        prep = jax.vmap(lambda a, b: _prepare(a, b, None, t_end))(t, y)
    else:
        prep = jax.vmap(lambda a, b, c: _prepare(a, b, c, t_end))(t, y, w)
    t0, yn, sw, level, t_peak, fitted, valid = prep
    starts = jax.vmap(lambda a, b, c, d: _starts(a, b, c, d, t_end, n_starts))(
        t0, yn, fitted, t_peak
    )  # [N, S, 7]

    def rep(v):
        return jnp.repeat(v, n_starts, axis=0)

    t_r, y_r, sw_r, pk_r = rep(t0), rep(yn), rep(sw), rep(t_peak)

    def residual_one(theta, tt, yy, ss, pk):
        f, jac = _model_and_jacobian(theta, tt, pk)
        return ss * (f - yy), ss[:, None] * jac

    def residuals(theta):  # [N·S, 7] -> [N·S, K], [N·S, K, 7]
        return jax.vmap(residual_one)(theta, t_r, y_r, sw_r, pk_r)

    sol = fit_solver.best_of_starts(
        residuals, starts, FENG_LOWER, FENG_UPPER, max_steps=max_steps, tol=tol
    )

    theta = sol.p  # [N, 7]
    scale = jnp.concatenate(
        [jnp.broadcast_to(level[:, None], (n_curves, 3)), jnp.ones((n_curves, 4), dtype)], axis=1
    )
    params = theta * scale
    params = params.at[:, 6].set(theta[:, 6] * t_peak)
    norm = jnp.sum(sw * sw * yn * yn, axis=1)
    rmse = jnp.sqrt(sol.cost / jnp.where(norm > 0, norm, 1.0))
    lo, hi = jnp.asarray(FENG_LOWER, dtype), jnp.asarray(FENG_UPPER, dtype)
    room = jnp.minimum(theta - lo[None, :], hi[None, :] - theta) / (hi - lo)[None, :]
    stuck = (room[:, 2] < STUCK) | (room[:, 5] < STUCK)
    finite = jnp.isfinite(sol.cost) & jnp.all(jnp.isfinite(params), axis=1)
    converged = valid & finite & jnp.isin(sol.status, jnp.asarray(fit_solver.CONVERGED))
    converged &= ~stuck & (rmse <= max_rmse)
    params = jnp.where(valid[:, None], params, jnp.nan)
    rmse = jnp.where(valid, rmse, jnp.nan)
    return FengFitResult(params, converged, rmse, sol.n_steps)


_fit_jit = jax.jit(_fit_flat, static_argnames=("n_starts", "max_steps", "tol", "max_rmse"))


def fit_feng(
    times,
    values,
    *,
    t_end: float = 35.0,
    weights=None,
    max_steps: int = 200,
    n_starts: int = 3,
    tol: float | None = None,
    max_rmse: float = MAX_RMSE,
) -> FengFitResult:
    """Fit Feng model 2 to the samples with t ≤ t_end of one curve or a batch of curves.

    Minimises Σ_k w_k·(Cp(t_k; θ) − y_k)² over the samples with t_k ≤ t_end (finite, w_k > 0)
    inside the box of the module docstring, from `n_starts` starts (see `_starts`), keeping the
    lowest cost. Samples past t_end, NaN samples and samples of weight 0 are ignored, so curves
    with different numbers of early samples can share one batch of equal length K. Safe under
    `jax.jit` / `jax.vmap`; compiled once per (batch shape, dtype, weights given or not,
    n_starts, max_steps, tol).

    Args:
      times: [..., K] sample times (min), increasing (NaN allowed: such samples are ignored).
      values: [..., K] plasma values (any activity unit; the result is in the same unit).
      t_end: last fitted time (min).
      weights: None (relative: 1/max(y, 0.02·peak)²) or non-negative [K] / [..., K] weights.
      max_steps: solver iterations per start.
      n_starts: 1 to 4 starts per curve.
      tol: ftol = xtol = gtol of the solver; default 1e-6 in float32, 1e-10 in float64.
      max_rmse: a fit with a larger relative RMS residual is not `converged`.

    Returns:
      `FengFitResult` with the leading shape [...] of the curves, in their float dtype.

    Raises:
      ValueError: times and values of different shapes, bad weights, n_starts or max_steps.
    """
    shape = jnp.shape(values)
    if jnp.shape(times) != shape or len(shape) == 0:
        raise ValueError(
            f"times and values must have the same shape [..., K], got {jnp.shape(times)} "
            f"and {shape}."
        )
    if not 1 <= n_starts <= N_STARTS_MAX:
        raise ValueError(f"n_starts must be 1 to {N_STARTS_MAX}, got {n_starts}.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    dtype = jnp.result_type(jnp.asarray(values).dtype, jnp.float32)
    y = jnp.asarray(values, dtype).reshape(-1, shape[-1])
    t = jnp.broadcast_to(jnp.asarray(times, dtype), shape).reshape(y.shape)
    w = None
    if weights is not None:
        wshape = jnp.shape(weights)
        if wshape not in (shape[-1:], shape):
            raise ValueError(f"weights must have shape {shape[-1:]} or {shape}, got {wshape}.")
        if not isinstance(weights, jax.core.Tracer) and np.any(np.asarray(weights) < 0):
            raise ValueError("weights must be non-negative.")
        w = jnp.broadcast_to(jnp.asarray(weights, dtype), shape).reshape(y.shape)
    if tol is None:
        tol = _TOL[jnp.finfo(dtype).bits]
    res = _fit_jit(
        t,
        y,
        w,
        jnp.asarray(t_end, dtype),
        n_starts=int(n_starts),
        max_steps=int(max_steps),
        tol=float(tol),
        max_rmse=float(max_rmse),
    )
    return jax.tree.map(lambda v: v.reshape(shape[:-1] + v.shape[1:]), res)
