"""Plasma (and whole-blood) input functions with exact values, integrals and convolutions.

Two representations, both JAX pytrees (so a batch of subjects carries a batch of inputs that
`jax.vmap` maps together with the parameters):

- `FengInput`: Feng et al. 1993 model 2 (a sum of e^{λ s} and s·e^{λ s} terms, s = t − τ).
  Every quantity is a closed form: O(1) per time point, no time grid.
- `SampledInput`: piecewise linear through samples, 0 before the first sample and held at the
  last value after the last one. Convolutions use the exact recursion over samples
  (O(samples) per voxel), not a fine grid; frame integrals (`conv_integral`) run it once over
  the samples and the frame edges merged.

Both expose `__call__(t)`, `integral(t)` and `conv(beta, t, decay_constant)`, the decay-weighted
convolution with e^{−β t} and its running time integral, and `conv_integral(beta, t,
decay_constant)`, that running integral alone, which `kinetix.kinetics.compartment` turns into
frames. Time in minutes; values in whatever activity unit the caller uses (SUV in kinetix).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.kinetics.expconv import conv_integral_tables, conv_integrals, exp_integral, kernels


class FengParams(NamedTuple):
    """Feng 1993 model 2: Cp(t) = (A1·s − A2 − A3)e^{λ1 s} + A2 e^{λ2 s} + A3 e^{λ3 s}, s = t − τ.

    A1 in activity/min, A2 and A3 in activity, λ1..λ3 in 1/min (negative), τ (delay) in min.
    """

    A1: float
    A2: float
    A3: float
    lambda1: float
    lambda2: float
    lambda3: float
    tau: float


FENG_FDG = FengParams(
    A1=851.1225,
    A2=21.8798,
    A3=20.8113,
    lambda1=-4.1339,
    lambda2=-0.1191,
    lambda3=-0.0104,
    tau=0.7340,
)
"""Feng's FDG input (docs/conventions.md, "Input functions") and the TPCCLIB fixture (µCi/mL, min).
Cp(τ) = 0; peak ≈ 103.4 at s ≈ 0.29 min. A2 pairs with λ2 and A3 with λ3."""


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _lift(x, ndim):
    """Prepend unit axes so `x` has rank `ndim` (explicit broadcasting, rank-promotion safe)."""
    return jnp.reshape(x, (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))


def _flat_time(t):
    t = jnp.asarray(t)
    return t.reshape(-1), t.shape


@jax.tree_util.register_pytree_node_class
class FengInput:
    """Feng model-2 plasma input (see `FengParams`). `params`: FengParams or array [..., 7]."""

    def __init__(self, params=FENG_FDG):
        if isinstance(params, FengParams):
            params = np.asarray(params, dtype=np.float64)
        if _is_concrete(params):
            arr = np.asarray(params)
            if arr.shape[-1:] != (7,):
                raise ValueError(f"FengInput params must have last axis 7, got shape {arr.shape}.")
            rates = arr[..., 3:6]
            if np.any(rates >= 0):
                raise ValueError("FengInput rates lambda1..lambda3 must be negative (1/min).")
            if np.any(arr[..., 6] < 0):
                raise ValueError("FengInput delay tau must be >= 0 min.")
        self.params = params

    def tree_flatten(self):
        return (self.params,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.params = children[0]
        return obj

    def __repr__(self):
        return f"FengInput(params={self.params!r})"

    def shift(self, delay):
        """This input delayed by `delay` minutes: Cp_new(t) = Cp(t − delay), 0 before τ + delay.

        A pure time shift (the Feng delay τ becomes τ + delay), differentiable in `delay` and
        safe under `jit` / `vmap` (a traced delay is not validated). `delay` > 0 moves the curve
        later; τ + delay may be negative (the whole curve then starts before time zero).

        Args:
          delay: scalar shift (min), concrete or traced.

        Returns:
          A new `FengInput`.
        """
        p = jnp.asarray(self.params)
        delay = jnp.asarray(delay)
        p = p.astype(jnp.result_type(p.dtype, delay.dtype, jnp.float32))
        return type(self).tree_unflatten(None, (p.at[..., 6].add(delay.astype(p.dtype)),))

    def _terms(self):
        """(a [3], b [3], μ [3], τ): Cp = Σ (a_j + b_j s) e^{μ_j s}."""
        p = jnp.asarray(self.params)
        p = p.astype(jnp.result_type(p.dtype, jnp.float32))
        a1, a2, a3, l1, l2, l3, tau = (p[..., i] for i in range(7))
        a = jnp.stack([-a2 - a3, a2, a3], axis=-1)
        b = jnp.stack([a1, jnp.zeros_like(a1), jnp.zeros_like(a1)], axis=-1)
        mu = jnp.stack([l1, l2, l3], axis=-1)
        return a, b, mu, tau

    def __call__(self, t):
        """Cp(t) for t (min) of any shape; 0 for t ≤ τ."""
        a, b, mu, tau = self._terms()
        t = jnp.asarray(t, a.dtype)
        s = jnp.maximum(t - tau, 0.0)[..., None]
        a, b, mu = (_lift(v, s.ndim) for v in (a, b, mu))
        val = jnp.sum((a + b * s) * jnp.exp(mu * s), axis=-1)
        return jnp.where(t > tau, val, 0.0)

    def integral(self, t):
        """∫0^t Cp(u) du for t (min) of any shape."""
        y, _ = self.conv(0.0, t, 0.0)
        return y

    def conv(self, beta, t, decay_constant=0.0):
        """Decay-weighted convolution with e^{−β t} and its running integral.

        With g(u) = Cp(u)·e^{−λ u}:  Y(t) = (g ⊗ e^{−β·})(t) and I(t) = ∫0^t Y.

        Args:
          beta: rates β ≥ 0 (1/min), any shape B.
          t: times (min), any shape S.
          decay_constant: λ ≥ 0 (1/min), a Python float.

        Returns:
          (Y, I), each of shape B + S.
        """
        a, b, mu, tau = self._terms()
        beta = jnp.asarray(beta, a.dtype)
        tf, tshape = _flat_time(jnp.asarray(t, a.dtype))
        lam = decay_constant
        s = jnp.maximum(tf - tau, 0.0)  # [N]
        # e^{μ s} terms for all three exponents; the s·e^{μ s} term exists only for λ1.
        k = kernels(mu - lam, beta[..., None, None], s[:, None], order=0)  # B + [N, 3]
        k1 = kernels(mu[..., :1] - lam, beta[..., None, None], s[:, None], order=1)  # B + [N, 1]
        nd = k["Y0"].ndim
        a, b = _lift(a, nd), _lift(b[..., :1], nd)
        y = jnp.sum(a * k["Y0"], axis=-1) + (b * k1["Y1"])[..., 0]
        i = jnp.sum(a * k["I0"], axis=-1) + (b * k1["I1"])[..., 0]
        scale = jnp.exp(-lam * tau)
        shape = beta.shape + tshape
        return (scale * y).reshape(shape), (scale * i).reshape(shape)

    def conv_integral(self, beta, t, decay_constant=0.0):
        """The running integral I of `conv` alone (what frame integrals need), much cheaper.

        Equal to `conv(beta, t, decay_constant)[1]` to a few ulp. What depends only on the input
        and the times is tabulated once (`expconv.conv_integral_tables`), so per rate and time
        there remain one exponential and a short polynomial per input exponent
        (`expconv.conv_integrals`).

        Args:
          beta: rates β ≥ 0 (1/min), any shape B.
          t: times (min), any shape S.
          decay_constant: λ ≥ 0 (1/min), a Python float.

        Returns:
          I of shape B + S (activity·min²).
        """
        a, b, mu, tau = self._terms()
        beta = jnp.asarray(beta, a.dtype)
        tf, tshape = _flat_time(jnp.asarray(t, a.dtype))
        s = jnp.maximum(tf - tau, 0.0)  # [N]
        mu = mu - decay_constant  # [3]
        q, radius = conv_integral_tables(mu, s[:, None])  # [N, 3, n + 2], [N, 3]
        rates = beta.reshape(-1)  # [M], M = size of B

        def at_time(_, xs):  # one time point, all rates at once (table entries are scalars)
            s_n, q_n, r_n = xs
            h = exp_integral(rates, s_n)  # [M]: shared by the three exponents
            i0, i1 = conv_integrals(q_n[0], r_n[0], mu[0], rates, h, order=1)
            total = a[0] * i0 + b[0] * i1  # the (A1·s − A2 − A3)·e^{λ1 s} term
            for j in (1, 2):
                total = total + a[j] * conv_integrals(q_n[j], r_n[j], mu[j], rates, h)
            return None, total

        # A loop over the times keeps the tables out of XLA's loop over the rates (fused into
        # it, they would be recomputed for every rate); LLVM vectorises a flat [M] loop reliably.
        _, total = jax.lax.scan(at_time, None, (s, q, radius))  # [N, M]
        scale = jnp.exp(-decay_constant * tau)
        return (scale * total.T).reshape(beta.shape + tshape)


@jax.tree_util.register_pytree_node_class
class SampledInput:
    """Piecewise-linear input through (times [K] min, values [K]); 0 before the first sample,
    held at the last value after the last sample.
    """

    def __init__(self, times, values):
        if _is_concrete(times) and _is_concrete(values):
            t = np.asarray(times, dtype=np.float64)
            v = np.asarray(values, dtype=np.float64)
            if t.ndim != 1 or v.ndim != 1:
                raise ValueError(
                    f"SampledInput times and values must be 1-D, got {t.shape} and {v.shape}."
                )
            if t.size != v.size:
                raise ValueError(
                    f"SampledInput has {t.size} times but {v.size} values; they must match."
                )
            if t.size < 2:
                raise ValueError("SampledInput needs at least 2 samples.")
            if not (np.all(np.isfinite(t)) and np.all(np.isfinite(v))):
                raise ValueError("SampledInput times and values must be finite.")
            if np.any(np.diff(t) <= 0):
                raise ValueError("SampledInput times must be strictly increasing.")
            if t[0] < 0:
                raise ValueError("SampledInput times must be >= 0 min (time zero = injection).")
        self.times = times
        self.values = values

    def tree_flatten(self):
        return (self.times, self.values), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.times, obj.values = children
        return obj

    def __repr__(self):
        return f"SampledInput(n={jnp.shape(self.times)[-1]})"

    def shift(self, delay):
        """This input delayed by `delay` minutes: Cp_new(t) = Cp(t − delay), 0 before the first
        (shifted) sample and held after the last.

        A pure time shift (the sample times move by `delay`), safe under `jit` / `vmap` (a
        traced delay is not validated). `delay` > 0 moves the curve later; shifted sample times
        may be negative (the curve then starts before time zero). Derivatives in `delay` are
        exact through `conv` and `conv_integral`, also at query times that coincide with a
        shifted sample.

        Args:
          delay: scalar shift (min), concrete or traced.

        Returns:
          A new `SampledInput`.
        """
        values = jnp.asarray(self.values)
        delay = jnp.asarray(delay)
        dtype = jnp.result_type(values.dtype, delay.dtype, jnp.float32)
        times = jnp.asarray(self.times, dtype) + delay.astype(dtype)
        return type(self).tree_unflatten(None, (times, values.astype(dtype)))

    def _arrays(self):
        dtype = jnp.result_type(jnp.asarray(self.values).dtype, jnp.float32)
        return jnp.asarray(self.times, dtype), jnp.asarray(self.values, dtype)

    def __call__(self, t):
        """Cp(t): linear interpolation, 0 before the first sample, last value after the last."""
        tk, vk = self._arrays()
        t = jnp.asarray(t, tk.dtype)
        return jnp.where(t < tk[0], 0.0, jnp.interp(t, tk, vk))

    def integral(self, t):
        """∫0^t Cp(u) du (exact for the piecewise-linear curve)."""
        y, _ = self.conv(0.0, t, 0.0)
        return y

    def conv(self, beta, t, decay_constant=0.0):
        """As `FengInput.conv`, by the exact recursion over the samples (O(K) per rate)."""
        tk, vk = self._arrays()
        beta = jnp.asarray(beta, tk.dtype)
        tf, tshape = _flat_time(jnp.asarray(t, tk.dtype))
        lam = decay_constant
        n_k = tk.shape[0]

        h = tk[1:] - tk[:-1]  # [K-1]
        slope = (vk[1:] - vk[:-1]) / h
        weight = jnp.exp(-lam * tk)  # e^{-λ t_k}: decay at each segment start

        # Every segment's contribution at once (B + [K-1]), then the linear recurrence
        # Y_{k+1} = D_k·Y_k + b_k by a parallel associative scan (all factors D_k ≤ 1, so no
        # overflow) and the running integral by a cumulative sum.
        seg = kernels(-lam, beta[..., None], h, recursion=True)  # B + [K-1]
        nd = seg["Y0"].ndim
        p_k, q_k, w_k = (_lift(v, nd) for v in (vk[:-1], slope, weight[:-1]))
        b = w_k * (p_k * seg["Y0"] + q_k * seg["Y1"])
        c = w_k * (p_k * seg["I0"] + q_k * seg["I1"])

        def combine(left, right):
            return left[0] * right[0], right[0] * left[1] + right[1]

        _, y_after = jax.lax.associative_scan(combine, (seg["D"], b), axis=-1)
        zero = jnp.zeros(beta.shape + (1,), y_after.dtype)
        y_knots = jnp.concatenate([zero, y_after], axis=-1)  # B + [K]
        i_after = jnp.cumsum(y_knots[..., :-1] * seg["H0"] + c, axis=-1)
        i_knots = jnp.concatenate([zero, i_after], axis=-1)

        idx = jnp.clip(jnp.searchsorted(tk, tf, side="right") - 1, 0, n_k - 1)  # [N]
        # Offset into the sample's segment; not a clamp (`maximum` would split the derivative
        # in the sample time where a query time equals it), queries before the first sample are
        # masked below.
        u = jnp.where(tf < tk[0], 0.0, tf - tk[idx])
        q_t = jnp.concatenate([slope, jnp.zeros((1,), slope.dtype)])[idx]  # 0 after the last
        k = kernels(-lam, beta[..., None], u, recursion=True)  # B + [N]
        nd = k["Y0"].ndim
        p_t, q_t, w_t = (_lift(v, nd) for v in (vk[idx], q_t, weight[idx]))
        y0 = jnp.take(y_knots, idx, axis=-1)  # B + [N]
        i0 = jnp.take(i_knots, idx, axis=-1)
        y = k["D"] * y0 + w_t * (p_t * k["Y0"] + q_t * k["Y1"])
        i = i0 + y0 * k["H0"] + w_t * (p_t * k["I0"] + q_t * k["I1"])
        before = _lift(tf < tk[0], nd)
        y = jnp.where(before, 0.0, y)
        i = jnp.where(before, 0.0, i)
        shape = beta.shape + tshape
        return y.reshape(shape), i.reshape(shape)

    def _merged_segments(self, tf, decay_constant):
        """The piecewise-linear, decay-weighted input on the knots and the query times merged.

        Voxel-independent. Returns (h [J], a [J], b [J], positions [N]): on merged segment j
        (start g_j, length h_j, J = K + N − 1) the input is g(g_j + u) = (a_j + b_j·u)·e^{−λu},
        a_j = e^{−λ g_j}·Cp(g_j+) and b_j = e^{−λ g_j}·slope; query n sits at merged point
        `positions[n]`. Before the first sample Cp = 0 (a jump at the first sample is kept).
        """
        tk, vk = self._arrays()
        n_k = tk.shape[0]
        every = jnp.concatenate([tk, tf])  # [K + N]
        order = jnp.argsort(every, stable=True)
        grid = every[order]
        positions = jnp.argsort(order)[n_k:]  # where each query landed
        h = grid[1:] - grid[:-1]  # [J] (0 where a query sits on a knot)
        start = grid[:-1]
        seg = jnp.searchsorted(tk, start, side="right") - 1  # original segment, −1 before tk[0]
        slope = (vk[1:] - vk[:-1]) / (tk[1:] - tk[:-1])
        slope = jnp.concatenate([slope, jnp.zeros((1,), slope.dtype)])  # held after the last
        inside = seg >= 0
        i = jnp.maximum(seg, 0)
        q = jnp.where(inside, slope[i], 0.0)
        p = jnp.where(inside, vk[i] + q * (start - tk[i]), 0.0)
        w = jnp.exp(-decay_constant * start)
        return h, w * p, w * q, positions

    def conv_integral(self, beta, t, decay_constant=0.0):
        """The running integral I of `conv` alone (what frame integrals need), much cheaper.

        Equal to `conv(beta, t, decay_constant)[1]` to rounding (tests: 1e-12 relative in
        float64, 2e-6 of the curve's maximum in float32). The knots and the query times are
        merged into one voxel-independent grid, and one `lax.scan` over its segments carries
        (Y, I) for all rates at once: per rate and segment one expm1 (`expconv.exp_integral`)
        and a short polynomial (`expconv.conv_integrals` with tables tabulated once per grid),
        with Y0 = Q1 − β·I0 and Y1 = Q2 − β·I1 (the ODE Y' = g − βY integrated over the
        segment) instead of separate kernels for Y. Arguments and result as
        `FengInput.conv_integral`: I of shape B + S for rates B and times S.
        """
        tk, _ = self._arrays()
        beta = jnp.asarray(beta, tk.dtype)
        tf, tshape = _flat_time(jnp.asarray(t, tk.dtype))
        mu = jnp.asarray(-decay_constant, tk.dtype)
        h, a, b, positions = self._merged_segments(tf, decay_constant)
        q, radius = conv_integral_tables(mu, h)  # [J, n + 2], [J]
        rates = beta.reshape(-1)  # [M]

        def segment(carry, xs):  # all rates across one merged segment
            y, i = carry
            h_j, a_j, b_j, q_j, r_j = xs
            e = exp_integral(rates, h_j)  # H = ∫0^h e^{−βu} du
            i0, i1 = conv_integrals(q_j, r_j, mu, rates, e, order=1)
            y0 = q_j[0] - rates * i0  # E[μ, −β](h)
            y1 = q_j[1] - rates * i1  # E[μ, μ, −β](h)
            i = i + y * e + a_j * i0 + b_j * i1
            y = (1.0 - rates * e) * y + a_j * y0 + b_j * y1  # e^{−βh}·Y + the segment's input
            return (y, i), i

        zero = jnp.zeros_like(rates)
        # A loop over segments keeps the tables out of XLA's loop over the rates (see
        # FengInput.conv_integral) and costs O(K + N) per rate. The body is rematerialised in
        # the backward pass: saving its ~35 intermediates per segment ([J, M] each) made the
        # gradient 15× slower than the forward; recomputing costs one more cheap forward.
        body = jax.checkpoint(segment, policy=jax.checkpoint_policies.nothing_saveable)
        _, i_after = jax.lax.scan(body, (zero, zero), (h, a, b, q, radius))  # [J, M]
        i_grid = jnp.concatenate([zero[None], i_after])  # [K + N, M]
        # Rows picked by a one-hot product: a gather's gradient is a scatter-add, which XLA
        # constant-folds slowly when the times are constants (exact: one nonzero per row).
        pick = (positions[:, None] == jnp.arange(i_grid.shape[0])[None, :]).astype(i_grid.dtype)
        out = jnp.matmul(pick, i_grid, precision=jax.lax.Precision.HIGHEST)  # [N, M]
        return out.T.reshape(beta.shape + tshape)
