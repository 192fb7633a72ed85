"""Exact, stable convolutions of exponentials (the arithmetic under every kinetic closed form).

Everything kinetix integrates is a sum of terms (a + b·s)·e^{μ s} (a Feng input, one linear
segment of a sampled input, each decay-weighted) convolved with a tissue kernel e^{−β t} and
possibly integrated once more in time. With ⊗ the causal convolution on [0, s],

    E[z_0, …, z_{n−1}](s) = (e^{z_0·} ⊗ … ⊗ e^{z_{n−1}·})(s)

is the divided difference of z ↦ e^{z s} at the nodes (Hermite–Genocchi), repeated nodes
included (s·e^{μ s} = E[μ, μ]; ∫0^s f = (f ⊗ 1)(s) = one more node at 0). `kernels` returns
the six such functions the input functions need, for nodes μ ≤ 0 (an input exponent, decay
included) and −β ≤ 0 (a tissue eigenvalue plus decay):

    Y0 = E[μ, −β]          (e^{μ·} ⊗ e^{−β·})(s)
    Y1 = E[μ, μ, −β]       (s·e^{μ s} ⊗ e^{−β·})(s)
    I0 = E[0, μ, −β]       ∫0^s Y0
    I1 = E[0, μ, μ, −β]    ∫0^s Y1
    H0 = E[0, −β]          ∫0^s e^{−β u} du
    D  = e^{−β s}

Numerics: every formula factors out the largest exponential (so nothing overflows, also in
float32), uses φ-functions φ1(x) = (e^x − 1)/x, φ2(x) = (e^x − 1 − x)/x² and
ψ(x) = ∫0^1 v e^{x v} dv with series near 0, and for the three- and four-node cases divides by
the full node spread only when that spread is ≥ 1 (in units of 1/s); closer nodes use a Taylor
series of the divided difference about the centre (complete homogeneous symmetric polynomials).
All branches are evaluated on safe arguments, so values and gradients stay finite at coincident
nodes (k4 = 0, k3 = 0, equal eigenvalues, λ = 0).

Frame integrals need only I0 and I1 at the frame edges; `conv_integral_tables` and
`conv_integrals` compute exactly those at a fraction of the cost (see the comment above them):
the parts that depend only on the input exponent and the time are tabulated once for all voxels.
"""

import math

import jax
import jax.numpy as jnp

_SERIES_X = 0.5  # |x| below which φ-functions use their Taylor series
_SPREAD = 1.0  # node spread (dimensionless, max|z|·s) below which 3-/4-node terms use Taylor


def _n_terms(dtype) -> int:
    """Series length that reaches the dtype's precision for |x| ≤ 0.5."""
    return 16 if jnp.finfo(dtype).bits > 32 else 9


def _series(x, coef):
    """Σ_k coef[k]·x^k by Horner."""
    out = jnp.full_like(x, coef[-1])
    for c in coef[-2::-1]:
        out = out * x + c
    return out


def _phi_family(x):
    """(φ1, φ2, ψ) at x, stable for all real x ≤ ~0 and smooth (finite gradients) at 0."""
    n = _n_terms(x.dtype)
    small = jnp.abs(x) < _SERIES_X
    xs = jnp.where(small, x, 0.0)
    xb = jnp.where(small, -1.0, x)
    em1 = jnp.expm1(xb)
    phi1_b = em1 / xb
    phi2_b = (em1 - xb) / (xb * xb)
    psi_b = ((xb - 1.0) * em1 + xb) / (xb * xb)
    phi1_s = _series(xs, [1.0 / math.factorial(k + 1) for k in range(n)])
    phi2_s = _series(xs, [1.0 / math.factorial(k + 2) for k in range(n)])
    psi_s = _series(xs, [1.0 / (math.factorial(k) * (k + 2)) for k in range(n)])
    return (
        jnp.where(small, phi1_s, phi1_b),
        jnp.where(small, phi2_s, phi2_b),
        jnp.where(small, psi_s, psi_b),
    )


def phi1(x):
    """φ1(x) = (e^x − 1)/x, with φ1(0) = 1."""
    return _phi_family(jnp.asarray(x, dtype=jnp.result_type(x, 1.0)))[0]


def _dd_taylor(ws, center):
    """Divided difference of e^w at dimensionless nodes `ws` (all close to `center`).

    e^{c}·Σ_k h_k(w − c)/(n − 1 + k)!, h_k the complete homogeneous symmetric polynomials
    (Newton's identity k·h_k = Σ_i p_i·h_{k−i}, p_i the power sums).
    """
    n = len(ws)
    ys = [w - center for w in ws]
    n_terms = _n_terms(center.dtype)
    powers = [jnp.ones_like(center) for _ in ys]
    p = []
    for _ in range(n_terms):
        powers = [pw * y for pw, y in zip(powers, ys, strict=True)]
        p.append(sum(powers))
    h = [jnp.ones_like(center)]
    for k in range(1, n_terms + 1):
        h.append(sum(p[i - 1] * h[k - i] for i in range(1, k + 1)) / k)
    total = sum(hk / math.factorial(n - 1 + k) for k, hk in enumerate(h))
    return jnp.exp(center) * total


def kernels(mu, beta, s, order: int = 1, recursion: bool = False):
    """Exact convolution kernels for one exponential input term (see module docstring).

    Args:
      mu: input exponent μ ≤ 0 (1/min), e.g. a Feng rate minus the decay constant.
      beta: tissue rate β ≥ 0 (1/min), an eigenvalue of the 2TCM plus the decay constant.
      s: time since the term started, s ≥ 0 (min). All three broadcast together.
      order: 0 computes only the e^{μ s} terms (Y0, I0); 1 also the s·e^{μ s} terms (Y1, I1).
      recursion: also return H0 and D (needed by the sampled-input recursion).

    Returns:
      dict with Y0, I0 (min, min²), Y1, I1 (min², min³) when order = 1, and H0 (min), D
      (dimensionless) when recursion is set; arrays of the broadcast shape.
    """
    dtype = jnp.result_type(mu, beta, s, 1.0)
    mu, beta, s = (jnp.asarray(v, dtype) for v in (mu, beta, s))
    # Voxel-independent pieces (μ and s usually do not depend on the voxel): no β broadcast.
    mu, s = jnp.broadcast_arrays(mu, s)
    a = -mu * s  # ≥ 0: distance of node μ from 0, dimensionless
    phi1_a, _, psi_a = _phi_family(a * -1.0)
    g0 = s * phi1_a  # E[0, μ]
    g1 = s * s * psi_a  # E[0, μ, μ]
    mu, beta, s, a, g0, g1 = jnp.broadcast_arrays(mu, beta, s, a, g0, g1)

    b = beta * s  # ≥ 0: distance of node −β from 0
    d = mu + beta
    # Factor out the larger exponential. The side is chosen once and both the peak and the sign
    # of x follow it, so each side is one analytic formula, valid through d = 0: the choice at
    # an exact tie (k4 = 0, β = −μ) cannot bias gradients (jnp.maximum splits the tie's gradient
    # and jnp.abs flips it, which made dY/dμ, dY/dβ wrong exactly at d = 0).
    mu_top = d >= 0  # node μ is the larger one
    x = jnp.where(mu_top, -d, d) * s  # ≤ 0
    e_peak = jnp.exp(jnp.where(mu_top, mu, -beta) * s)
    phi1_x, phi2_x, psi_x = _phi_family(x)
    phi1_b = _phi_family(-b)[0]
    y0 = s * e_peak * phi1_x
    h0 = s * phi1_b

    spread = jnp.maximum(a, b)
    far = spread >= _SPREAD
    use_mu = far & (a >= b)
    use_beta = far & (a < b)
    den_mu = jnp.where(use_mu, -mu, 1.0)
    den_beta = jnp.where(use_beta, beta, 1.0)
    ws = jnp.where(far, 0.0, -a)
    wb = jnp.where(far, 0.0, -b)
    centre = 0.5 * jnp.minimum(ws, wb)
    zero = jnp.zeros_like(ws)

    i0_mu = (h0 - y0) / den_mu
    i0_t = s * s * _dd_taylor([zero, ws, wb], centre)
    i0 = jnp.where(use_mu, i0_mu, jnp.where(use_beta, (g0 - y0) / den_beta, i0_t))
    out = dict(Y0=y0, I0=i0)
    if order >= 1:
        # E[μ, μ, −β] = e^{μs}·s²·φ2(x) (μ on top) or e^{−βs}·s²·ψ(x) (−β on top).
        y1 = s * s * e_peak * jnp.where(mu_top, phi2_x, psi_x)
        i1_t = s * s * s * _dd_taylor([zero, ws, ws, wb], centre)
        i1_mu = (i0_mu - y1) / den_mu
        out["Y1"] = y1
        out["I1"] = jnp.where(use_mu, i1_mu, jnp.where(use_beta, (g1 - y1) / den_beta, i1_t))
    if recursion:
        out["H0"] = h0
        out["D"] = jnp.exp(-b)
    return out


# -- Running integrals only (frame integrals): voxel-independent tables + a cheap per-rate part --
#
# Frame integrals need only I0 = E[0, μ, −β] and I1 = E[0, μ, μ, −β] at the frame edges. With
# Q_p = E[0, μ, …, μ](s) (μ repeated p times; Q_1 = ∫0^s e^{μu} du, Q_2 = ∫0^s u·e^{μu} du),
# H = E[0, −β](s) and d = μ + β (the gap between the nodes μ and −β), two exact identities hold:
#
#   far:   I0 = (Q_1 − H)/d,          I1 = (Q_2 − I0)/d       (partial fractions)
#   near:  I1 = Σ_k (−d)^k Q_{k+3},   I0 = Q_2 − d·I1         (Taylor series in the node −β at μ)
#
# The Q_p depend only on the input exponent and the time, so they are tabulated once for all
# voxels; per rate and time only H (one exp, shared by the input's exponents) and a short
# polynomial in d remain. The ratios Q_{p+1}/Q_p decrease with p, so with r = Q_2/Q_3 (1/min)
# the series converges at least like (|d|/r)^k, and r/|d| also bounds the cancellation of the
# partial fractions (relative error ≈ ε·r/|d| for I0, ε·(r/|d|)² for I1). The series is used
# where |d| < δ·r, partial fractions elsewhere: n terms with δ^n ≲ ε, far-side error ≲ ε/δ².

_NEAR = {32: (0.25, 13), 64: (0.05, 12)}  # dtype bits -> (δ, series terms n): δ^n ≲ ε
_FORWARD_M = 32.0  # |μs| from which the moments J_k use the forward recurrence
_BACKWARD_DEPTH = 96  # start index of the backward recurrence (errors damp below it)


def near_parameters(dtype) -> tuple[float, int]:
    """(δ, series terms n) of `conv_integrals` for a float dtype (see the comment above)."""
    return _NEAR[64 if jnp.finfo(dtype).bits > 32 else 32]


def _moments(m, n: int):
    """J_k(m) = ∫0^1 v^k e^{m v} dv for k = 0..n−1 at m ≤ 0 (dimensionless): [n, ...].

    Forward recurrence J_k = (k·J_{k−1} − e^m)/(−m) for |m| ≥ `_FORWARD_M` (> n, so k·J_{k−1}
    dominates e^m and little cancels); otherwise the backward recurrence
    J_{k−1} = (e^m − m·J_k)/k from J_96 = 0 (all terms positive; the start error shrinks by
    |m|/k per step while k > |m|, ≤ 1/3 at first). Both are `lax.scan`s: a small program (XLA
    compiles every fused kernel separately, and unrolled recurrences make dozens).
    """
    fwd = m <= -_FORWARD_M
    mf = jnp.where(fwd, m, -1.0)
    mb = jnp.where(fwd, 0.0, m)
    ef, eb = jnp.exp(mf), jnp.exp(mb)

    def up(j_prev, k):
        j_k = (k * j_prev - ef) / -mf
        return j_k, j_k

    def down(j_k, k):
        j_prev = (eb - mb * j_k) / k
        return j_prev, j_prev

    j0 = jnp.expm1(mf) / mf
    _, forward = jax.lax.scan(up, j0, jnp.arange(1, n, dtype=m.dtype))
    forward = jnp.concatenate([j0[None], forward])
    _, backward = jax.lax.scan(
        down, jnp.zeros_like(m), jnp.arange(_BACKWARD_DEPTH, 0, -1.0, dtype=m.dtype)
    )
    return jnp.where(fwd, forward, backward[::-1][:n])


def repeated_node_integrals(mu, s, n: int):
    """Q_p = E[0, μ, …, μ](s) (μ repeated p times) for p = 1..n: voxel-independent tables.

    Q_p(s) = ∫0^s u^{p−1}/(p−1)!·e^{μu} du = s^p·J_{p−1}(μs)/(p−1)!.

    Args:
      mu: input exponent μ ≤ 0 (1/min).
      s: time since the term started, s ≥ 0 (min); broadcasts with `mu`.
      n: number of orders (static).

    Returns:
      [..., n] array, entry p − 1 in min^p.
    """
    dtype = jnp.result_type(mu, s, 1.0)
    mu, s = jnp.broadcast_arrays(jnp.asarray(mu, dtype), jnp.asarray(s, dtype))
    if n > _FORWARD_M:
        raise ValueError(f"repeated_node_integrals supports n <= {_FORWARD_M:.0f}, got {n}.")
    moments = _moments(mu * s, n)  # [n, ...]
    order = jnp.arange(1, n + 1, dtype=dtype).reshape((n,) + (1,) * s.ndim)  # p
    factor = jnp.cumprod(s[None] / jnp.maximum(order - 1.0, 1.0), axis=0)  # s^p/(p − 1)!
    return jnp.moveaxis(factor * moments, 0, -1)


def exp_integral(beta, s):
    """H = E[0, −β](s) = ∫0^s e^{−βu} du = (1 − e^{−βs})/β (min), with H = s at β = 0.

    Args:
      beta: rate β ≥ 0 (1/min); s: time ≥ 0 (min); they broadcast together.
    """
    b = beta * s
    small = b < _SERIES_X
    bs = jnp.where(small, b, 0.0)
    bb = jnp.where(small, 1.0, b)
    n = _n_terms(b.dtype)
    series = _series(-bs, [1.0 / math.factorial(k + 1) for k in range(n)])
    return s * jnp.where(small, series, -jnp.expm1(-bb) / bb)


def conv_integral_tables(mu, s):
    """Voxel-independent tables of `conv_integrals` for one input exponent μ at times s.

    Args:
      mu: input exponent μ ≤ 0 (1/min).
      s: time since the term started, s ≥ 0 (min); broadcasts with `mu`.

    Returns:
      (q, radius): q [..., n + 2] = `repeated_node_integrals(μ, s, n + 2)` (n series terms of
      the dtype) and radius [...] = Q_2/Q_3 (1/min), the convergence radius of the
      series in d (+inf at s = 0; no gradient).
    """
    dtype = jnp.result_type(mu, s, 1.0)
    q = repeated_node_integrals(mu, s, near_parameters(dtype)[1] + 2)
    pos = q[..., 2] > 0
    radius = jnp.where(pos, q[..., 1] / jnp.where(pos, q[..., 2], 1.0), jnp.inf)
    return q, jax.lax.stop_gradient(radius)


def conv_integrals(q, radius, mu, beta, h, order: int = 0):
    """I0 = E[0, μ, −β](s) and (order 1) I1 = E[0, μ, μ, −β](s) from `conv_integral_tables`.

    Per element: one comparison, an n-term Horner polynomial in d = μ + β and one or two
    partial fractions; no transcendental (H = E[0, −β](s) comes in, shared by all exponents).

    Args:
      q, radius: `conv_integral_tables(μ, s)`, [..., n + 2] and [...].
      mu: input exponent μ ≤ 0 (1/min); beta: tissue rate β ≥ 0 (1/min); h: H = E[0, −β](s)
        (min), `exp_integral(β, s)`. All broadcast with radius.
      order: 0 returns I0 only; 1 returns (I0, I1).

    Returns:
      I0 (min²), or (I0, I1) (min², min³); arrays of the broadcast shape.
    """
    delta, n = near_parameters(q.dtype)
    d = mu + beta
    near = jnp.abs(d) < delta * radius
    x = -jnp.where(near, d, 0.0)
    taylor = q[..., n + 1]
    for k in range(n, 1, -1):  # Horner: Q_3 + x·(Q_4 + x·(… + x·Q_{n+2}))
        taylor = taylor * x + q[..., k]
    inv_d = 1.0 / jnp.where(near, 1.0, d)
    i0 = jnp.where(near, q[..., 1] + x * taylor, (q[..., 0] - h) * inv_d)
    if order == 0:
        return i0
    return i0, jnp.where(near, taylor, (q[..., 1] - i0) * inv_d)
