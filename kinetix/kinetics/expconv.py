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
"""

import math

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
    x = -jnp.abs(d) * s
    e_peak = jnp.exp(jnp.maximum(mu, -beta) * s)  # the larger of the two exponentials
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
        y1 = s * s * e_peak * jnp.where(d > 0, phi2_x, psi_x)
        i1_t = s * s * s * _dd_taylor([zero, ws, ws, wb], centre)
        i1_mu = (i0_mu - y1) / den_mu
        out["Y1"] = y1
        out["I1"] = jnp.where(use_mu, i1_mu, jnp.where(use_beta, (g1 - y1) / den_beta, i1_t))
    if recursion:
        out["H0"] = h0
        out["D"] = jnp.exp(-b)
    return out
