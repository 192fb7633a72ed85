"""Box-constrained Levenberg–Marquardt for many small least-squares problems, and standard errors.

The residual function is called on the whole batch of problems at once inside one
`lax.while_loop` that runs until every problem has stopped (stopped ones are frozen); the
per-problem algebra (P ≤ 6 parameters) works on lists of [B] arrays, so XLA fuses it into a few
loops over the batch. Used by `kinetix.kinetics.fit` (docs/conventions.md, "Voxelwise 2TCM
fitting"); nothing here knows about kinetics.

The method is Levenberg–Marquardt inside the box with the affine scaling of Coleman & Li (1996),
the scaling of scipy's `least_squares(method="trf")` (Branch, Coleman & Li 1999): a parameter
whose gradient pushes it towards a bound has its step scaled by the square root of its relative
distance to that bound, with the matching diagonal term, and no step goes more than
θ = max(0.995, 1 − scaled gradient) of the way to a bound; where that cuts a parameter's step,
the others are solved again with it held. Iterates approach an optimum on a bound geometrically
but never sit on it, so a parameter whose derivative vanishes there (k3 at k2 = k4 = 0, k4 at
k3 = 0 in the 2TCM) does not trap the fit in a corner as plain projection onto the box did. On
top: Jacobi (column-norm) scaling, the damping started at 1e-5 of the largest diagonal entry and
updated by Nielsen's rule (Madsen, Nielsen & Tingleff 2004, Alg. 3.16), the damped normal
equations solved by an unrolled Cholesky factorisation (no LAPACK call per problem), and
scipy's termination tests: a relative cost decrease below `ftol` on an accepted, well-predicted
step, a relative step below `xtol`, or a scaled gradient below `gtol`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# `LMResult.status` codes.
RUNNING, FTOL, XTOL, GTOL, MAX_STEPS, STALLED, NOT_FINITE = range(7)
CONVERGED = (FTOL, XTOL, GTOL)
_LAMBDA0 = 1e-5  # initial damping, relative to the largest diagonal entry (measured best)
_LAMBDA_MAX = 1e16  # damping beyond this: no step decreases the cost (stalled)
_THETA = 0.995  # fraction of the way to a bound a step may go (scipy's TRF)


class LMResult(NamedTuple):
    """Solves, leading axis B: `p` [B, P], `cost` = r·r, `status` (codes above), `n_steps`
    (steps after the start), and the residuals `r` [B, T] and Jacobian `jac` [B, T, P] at p."""

    p: jax.Array
    cost: jax.Array
    status: jax.Array
    n_steps: jax.Array
    r: jax.Array
    jac: jax.Array


# The algebra below works on lists of [B] arrays (one per parameter or pair of parameters):
# every operation is then elementwise over the batch, which XLA fuses into a few loops. The
# same code written for one problem and vmapped (tiny [P, P] matrices, slices, stacks) ran
# about 3× slower on CPU.


def _normal_equations(jac, res):
    """g_i = Σ_t J_ti r_t and h_ij = Σ_t J_ti J_tj (i ≤ j) as lists of [B] arrays."""
    n_par = jac.shape[-1]
    cols = [jac[..., i] for i in range(n_par)]  # [B, T] each
    g = [jnp.sum(c * res, axis=-1) for c in cols]
    h = {(i, j): jnp.sum(cols[i] * cols[j], axis=-1) for i in range(n_par) for j in range(i, n_par)}
    return g, h


def _scaling(g, h, p, lo, hi):
    """Per parameter: column norm ‖J_i‖ (1 where 0), Coleman–Li distance and step scale.

    v_i is the distance to the bound the gradient pushes towards, as a fraction of the box (1
    when it pushes nowhere), dv_i = ±1/(hi_i − lo_i) its derivative; the step in parameter i is
    scale_i = √v_i·x_i times the solved variable, x_i = 1/‖J_i‖ (Jacobi scaling).
    """
    norm, v, dv, xs = [], [], [], []
    for i in range(len(g)):
        n_i = jnp.sqrt(h[i, i])
        n_i = jnp.where(n_i > 0, n_i, 1.0)
        width = hi[i] - lo[i]
        down, up = g[i] > 0, g[i] < 0
        v_i = jnp.where(down, (p[i] - lo[i]) / width, jnp.where(up, (hi[i] - p[i]) / width, 1.0))
        norm.append(n_i)
        v.append(jnp.maximum(v_i, 0.0))
        dv.append(jnp.where(down, 1.0 / width, jnp.where(up, -1.0 / width, 0.0)))
        xs.append(1.0 / n_i)  # Jacobi scaling (scipy's x_scale="jac")
    scale = [jnp.sqrt(v[i]) * xs[i] for i in range(len(g))]
    return norm, v, dv, xs, scale


def cholesky_solve(a, b):
    """x = a⁻¹ b for a small symmetric positive definite matrix, unrolled (P static).

    Args:
      a: dict {(i, j): [B]} of the entries with i ≥ j (lower triangle).
      b: list of P arrays [B].

    Pivots are floored at the dtype's tiny value, so a singular matrix gives a huge but finite
    solution instead of NaN (the damping keeps `a` positive definite in practice).
    """
    n = len(b)
    tiny = jnp.finfo(b[0].dtype).tiny
    low = {}
    for j in range(n):
        d = a[j, j] - sum(low[j, k] * low[j, k] for k in range(j))
        low[j, j] = jnp.sqrt(jnp.maximum(d, tiny))
        for i in range(j + 1, n):
            low[i, j] = (a[i, j] - sum(low[i, k] * low[j, k] for k in range(j))) / low[j, j]
    z = []
    for i in range(n):
        z.append((b[i] - sum(low[i, k] * z[k] for k in range(i))) / low[i, i])
    x = [None] * n
    for i in reversed(range(n)):
        x[i] = (z[i] - sum(low[k, i] * x[k] for k in range(i + 1, n))) / low[i, i]
    return x


def _cosine(g, norm, v, r_norm):
    """max_i |g_i|·√v_i/(‖J_i‖·‖r‖): the gradient test and the cut-back θ (scale-free)."""
    terms = [jnp.abs(g[i]) * jnp.sqrt(v[i]) / norm[i] for i in range(len(g))]
    return jnp.max(jnp.stack(terms), axis=0) / r_norm


def _propose(p, g, h, r_norm, lam, lo, hi):
    """The damped, scaled step from p, each parameter kept strictly inside the box.

    `lam` < 0 starts the damping at `_LAMBDA0` times the largest diagonal entry of the scaled
    normal matrix (Madsen, Nielsen & Tingleff 2004, Eq. 3.14).

    Returns (step, predicted cost decrease of that step, damping used), over the batch.
    """
    n_par = len(g)
    norm, v, dv, xs, scale = _scaling(g, h, p, lo, hi)
    cl = [g[i] * dv[i] * xs[i] * xs[i] for i in range(n_par)]  # ≥ 0 (Coleman–Li term)
    a = {(i, j): h[j, i] * scale[i] * scale[j] for i in range(n_par) for j in range(i + 1)}
    diag = jnp.max(jnp.stack([a[i, i] + cl[i] for i in range(n_par)]), axis=0)
    lam = jnp.where(lam < 0, _LAMBDA0 * diag, lam)
    for i in range(n_par):
        a[i, i] = a[i, i] + cl[i] + lam
    rhs = [-scale[i] * g[i] for i in range(n_par)]
    s_hat = cholesky_solve(a, rhs)
    # At most θ of the way to a bound in each parameter (θ → 1 as the scaled gradient → 0).
    # Where that cuts a parameter's step, the others are solved again with it held at its cut
    # step (the first solve assumed it moves on): without this, steps along a bound were
    # mostly rejected and the damping oscillated (hundreds of iterations in flat valleys).
    theta = jnp.maximum(_THETA, 1.0 - _cosine(g, norm, v, r_norm))
    safe = [jnp.where(scale[i] > 0, scale[i], 1.0) for i in range(n_par)]
    lo_s = [-theta * (p[i] - lo[i]) / safe[i] for i in range(n_par)]
    hi_s = [theta * (hi[i] - p[i]) / safe[i] for i in range(n_par)]
    cut = [(s_hat[i] < lo_s[i]) | (s_hat[i] > hi_s[i]) for i in range(n_par)]
    held = [jnp.clip(s_hat[i], lo_s[i], hi_s[i]) for i in range(n_par)]
    a2 = {}
    for i in range(n_par):
        for j in range(i + 1):
            both = ~cut[i] & ~cut[j]
            a2[i, j] = jnp.where(both, a[i, j], 1.0 if i == j else 0.0)
            if i == j:
                a2[i, i] = jnp.where(cut[i], 1.0, a[i, i])
    rhs2 = []
    for i in range(n_par):
        coupling = sum(
            jnp.where(cut[j], a[max(i, j), min(i, j)] * held[j], 0.0)
            for j in range(n_par)
            if j != i
        )
        rhs2.append(jnp.where(cut[i], held[i], rhs[i] - coupling))
    s_hat = cholesky_solve(a2, rhs2)
    step = []
    for i in range(n_par):
        s_hat[i] = jnp.clip(s_hat[i], lo_s[i], hi_s[i])
        step.append(scale[i] * s_hat[i])
    # Model decrease with the Coleman–Li term: −(2 gᵀδ + δᵀHδ + ŝᵀ·diag(cl)·ŝ).
    quad = sum(
        (1.0 if i == j else 2.0) * step[i] * h[i, j] * step[j]
        for i in range(n_par)
        for j in range(i, n_par)
    )
    pred = -(2.0 * sum(g[i] * step[i] for i in range(n_par)) + quad)
    pred = pred - sum(cl[i] * s_hat[i] * s_hat[i] for i in range(n_par))
    return step, pred, lam


def least_squares(fun, p0, lo, hi, *, max_steps, ftol, xtol, gtol):
    """Minimise r_b(p_b)·r_b(p_b) over lo < p_b < hi for a batch of problems b.

    The residual function is called on the whole batch; the loop runs until every problem has
    stopped, stopped problems frozen. `fun` appears once in the loop body (iteration 0
    evaluates the start), which keeps the compiled program small.

    Args:
      fun: p [B, P] -> (r [B, T], J [B, T, P]), residuals and their Jacobian.
      p0: [B, P] starts, strictly inside the box.
      lo, hi: [P] finite bounds, lo < hi (static sequences of floats).
      max_steps: iteration limit, the evaluation of the start included (one residual +
        Jacobian evaluation each).
      ftol: stop when an accepted step with a good model fit (ρ > 0.25) lowers the cost by
        less than ftol·cost.
      xtol: stop when a step is below xtol·(|p| + xtol·(hi − lo)) in every parameter.
      gtol: stop when max_i |g_i|·scale_i/‖r‖ ≤ gtol: the cosine between the residual and each
        Jacobian column, times √(relative distance to the bound the gradient points at).

    Returns:
      `LMResult` with leading axis B at the end point of each problem; `status` says why it
      stopped (`FTOL`, `XTOL`, `GTOL`: converged).
    """
    r_shape, j_shape = jax.eval_shape(fun, p0)
    dtype = r_shape.dtype
    n_batch, n_par = p0.shape
    lo = [float(v) for v in lo]
    hi = [float(v) for v in hi]
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    n_pairs = n_par * (n_par + 1) // 2
    pairs = [(i, j) for i in range(n_par) for j in range(i, n_par)]

    def cond(state):
        return jnp.any(state[-1] == RUNNING)

    def body(state):
        k, p, r, jac, g, h, cost, lam, nu, status = state
        first = k == 0
        p_l = [p[:, i] for i in range(n_par)]
        g_l = [g[:, i] for i in range(n_par)]
        h_d = {pair: h[:, m] for m, pair in enumerate(pairs)}
        r_norm = jnp.sqrt(jnp.maximum(cost, tiny))
        step, pred, lam = _propose(p_l, g_l, h_d, r_norm, lam, lo, hi)
        step = jnp.where(first[:, None], 0.0, jnp.stack(step, axis=-1))
        p_new = p + step
        r_new, jac_new = fun(p_new)

        cost_new = jnp.sum(r_new * r_new, axis=-1)
        actual = cost - cost_new
        finite = jnp.isfinite(cost_new) & jnp.all(jnp.isfinite(jac_new), axis=(-2, -1))
        ok = finite & ((actual > 0) | first)
        rho = actual / jnp.where(pred > 0, pred, jnp.inf)
        lam_acc = lam * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        lam_acc = jnp.where(first, -1.0, jnp.maximum(lam_acc, 10.0 * eps))
        lam = jnp.where(ok, lam_acc, lam * nu)
        nu = jnp.where(ok, 2.0, 2.0 * nu)
        g_new, h_new = _normal_equations(jac_new, r_new)
        g_new = jnp.stack(g_new, axis=-1)
        h_new = jnp.stack([h_new[pair] for pair in pairs], axis=-1)

        def pick(a, b):
            return jnp.where(jnp.reshape(ok, (-1,) + (1,) * (a.ndim - 1)), a, b)

        p, r, jac, g, h = (
            pick(a, b) for a, b in ((p_new, p), (r_new, r), (jac_new, jac), (g_new, g), (h_new, h))
        )
        cost_old, cost = cost, jnp.where(ok, cost_new, cost)

        # Termination: scipy's tests; the gradient test (scaled as the step, as a cosine
        # between the residual and each column, so scale-free) at the current point.
        norm, v, _, _, _ = _scaling(
            [g[:, i] for i in range(n_par)],
            {pair: h[:, m] for m, pair in enumerate(pairs)},
            [p[:, i] for i in range(n_par)],
            lo,
            hi,
        )
        g_l = [g[:, i] for i in range(n_par)]
        cosine = _cosine(g_l, norm, v, jnp.sqrt(jnp.maximum(cost, tiny)))
        typical = xtol * (jnp.asarray(hi, dtype) - jnp.asarray(lo, dtype))[None, :]
        small_step = jnp.all(jnp.abs(step) <= xtol * (jnp.abs(p) + typical), axis=-1)
        new_status = jnp.select(
            [
                first & ~finite,
                (cost == 0) | (cosine <= gtol),
                ~first & ok & (actual <= ftol * cost_old) & (rho > 0.25),
                ~first & small_step,
                lam > _LAMBDA_MAX,
                k + 1 >= max_steps,
            ],
            [NOT_FINITE, GTOL, FTOL, XTOL, STALLED, MAX_STEPS],
            RUNNING,
        )
        new = (k + 1, p, r, jac, g, h, cost, lam, nu, new_status)
        running = status == RUNNING
        return jax.tree.map(
            lambda a, b: jnp.where(jnp.reshape(running, (-1,) + (1,) * (a.ndim - 1)), a, b),
            new,
            state,
        )

    init = (
        jnp.zeros(n_batch, jnp.int32),
        p0,
        jnp.zeros(r_shape.shape, dtype),
        jnp.zeros(j_shape.shape, dtype),
        jnp.zeros((n_batch, n_par), dtype),
        jnp.zeros((n_batch, n_pairs), dtype),
        jnp.full(n_batch, jnp.inf, dtype),
        jnp.full(n_batch, -1.0, dtype),
        jnp.full(n_batch, 2.0, dtype),
        jnp.full(n_batch, RUNNING, jnp.int32),
    )
    k, p, r, jac, _, _, cost, _, _, status = jax.lax.while_loop(cond, body, init)
    return LMResult(p, cost, status, k - 1, r, jac)


def best_of_starts(fun, starts, lo, hi, *, max_steps, tol):
    """`least_squares` from several starts per problem, keeping each problem's lowest finite
    cost.

    Args:
      fun: p [N·S, P] -> (r, J), as `least_squares` (rows ordered problem-major: the S starts
        of problem 0 first).
      starts: [N, S, P] starts, strictly inside the box.
      lo, hi: [P] bounds, as `least_squares`.
      max_steps: iteration limit per start.
      tol: ftol = xtol = gtol.

    Returns:
      `LMResult` with leading axis N: each problem's best start's end point.
    """
    n, n_starts, n_params = starts.shape
    sols = least_squares(
        fun,
        starts.reshape(n * n_starts, n_params),
        lo,
        hi,
        max_steps=max_steps,
        ftol=tol,
        xtol=tol,
        gtol=tol,
    )
    sols = jax.tree.map(lambda v: v.reshape((n, n_starts) + v.shape[1:]), sols)
    best = jnp.argmin(jnp.where(jnp.isfinite(sols.cost), sols.cost, jnp.inf), axis=1)
    return jax.tree.map(lambda v: jax.vmap(lambda a, i: a[i])(v, best), sols)


def linear_stderr(jac_w, s2, directions, null_tol=1e-4):
    """Standard errors of linear combinations cᵀp from a weighted Jacobian (one problem).

    Cov(p) = s²·(JᵀWJ)⁻¹ with J_w = √W·J, computed by the SVD of J_w with unit-norm columns
    (Jacobi scaling). Singular values below max(T, P)·ε·σ_max (NumPy's `pinv`/`lstsq` rule) span
    the null space; a combination with more than `null_tol` of its squared (scaled, normalised)
    direction in that null space is not identifiable and gets +inf. Zero directions give 0.

    Args:
      jac_w: [T, P] weighted Jacobian √w·∂f/∂p.
      s2: residual variance estimate (wrss/(T − P)).
      directions: [K, P] the c vectors (e.g. the identity for the parameters themselves).
      null_tol: see above.

    Returns:
      [K] standard errors (+inf where not identifiable).
    """
    n_obs, n_par = jac_w.shape
    d = jnp.sqrt(jnp.sum(jac_w * jac_w, axis=0))
    d = jnp.where(d > 0, d, 1.0)
    _, sv, vt = jnp.linalg.svd(jac_w / d[None, :], full_matrices=False)  # [P], [P, P]
    eps = jnp.finfo(jac_w.dtype).eps
    keep = sv > max(n_obs, n_par) * eps * sv[0]
    c = directions / d[None, :]  # directions in scaled coordinates, [K, P]
    proj = jnp.sum(c[:, None, :] * vt[None, :, :], axis=-1)  # [K, P] along the singular vectors
    c2 = jnp.sum(c * c, axis=1)
    null_share = jnp.sum(jnp.where(keep, 0.0, proj * proj), axis=1) / jnp.where(c2 > 0, c2, 1.0)
    inv_sv = jnp.where(keep, 1.0 / jnp.where(keep, sv, 1.0), 0.0)
    var = s2 * jnp.sum((proj * inv_sv[None, :]) ** 2, axis=1)
    return jnp.where(null_share > null_tol, jnp.inf, jnp.sqrt(var))
