"""2TCM frames and their exact Jacobian for the voxelwise fits (`kinetix.kinetics.fit`).

The frames x = f/Δ·[(1 − fv)·(a·I(α1) + b·I(α2)) + fv·B] (docs/conventions.md, "Two-tissue
model") are linear in fv and, through the weights a, b, in K1, and depend on k2, k3, k4 only
through the eigenvalues α1, α2: one forward-mode derivative of the input's frame integrals I in
the two rates gives every column, batched over voxels in one call.
"""

import jax
import jax.numpy as jnp

from kinetix.kinetics.compartment import eigen_decomposition
from kinetix.kinetics.frames import F18_DECAY_CONSTANT


def _lift(x, ndim):
    """Prepend unit axes so `x` has rank `ndim` (explicit broadcasting, rank-promotion safe)."""
    return jnp.reshape(x, (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))


def _eigen(rates):
    """[..., 4] (K1, k2, k3, k4) -> [..., 4] (α1, α2, a, b) of `eigen_decomposition`."""
    return jnp.stack(eigen_decomposition(*(rates[..., i] for i in range(4))), axis=-1)


def frames_and_jacobian(
    params, inp, schedule, *, delay=None, blood=None, decay_constant=F18_DECAY_CONSTANT
):
    """2TCM frames (as `kk.pet_frames`) and their exact Jacobian, cheaper than `jax.jacfwd`.

    x = f/Δ·[(1 − fv)·(a·I(α1) + b·I(α2)) + fv·B] (I the input's frame integrals of the
    impulse response terms, B the blood's) is linear in fv and, through a and b, in K1, and
    depends on k2, k3, k4 only through the eigenvalues α1, α2. So the Jacobian needs one
    forward-mode derivative of I(β) in β (a unit tangent suffices: each I depends on its own β
    only) and the small Jacobian of `eigen_decomposition`. Batched over the leading axes in
    one call: 2.4× the time of `kk.pet_frames`, against 7.5× for forward mode in the five
    parameters and 34× for `jax.vmap(jax.jacfwd(...))` of one voxel (6000 voxels, 22 frames,
    float32, 2 CPU cores).
    With `delay`, plasma and blood are shifted (`inp.shift`) and one more derivative gives
    ∂x/∂delay; the inputs then differ per voxel, so that path is vmapped.

    Args:
      params: [..., 5] (fv, K1, k2, k3, k4).
      inp: plasma input (unbatched).
      schedule: static `FrameSchedule` (min), T frames.
      delay: optional [...] input delay (min).
      blood: whole-blood input for the fv term (None: whole blood = plasma).
      decay_constant: λ (1/min).

    Returns:
      (x [..., T], jac [..., T, 5], or [..., T, 6] with ∂x/∂delay last when `delay` is given).
    """
    lam = float(decay_constant)
    params = jnp.asarray(params)
    if params.ndim == 0 or params.shape[-1] != 5:
        raise ValueError(
            f"params must have a last axis of 5 (fv, K1, k2, k3, k4), got shape {params.shape}."
        )
    params = params.astype(jnp.result_type(params.dtype, jnp.float32))
    if delay is None:
        return _frames_and_jacobian(params, None, inp, blood, schedule, lam)
    delay = jnp.broadcast_to(jnp.asarray(delay, params.dtype), params.shape[:-1])
    out = jax.vmap(lambda p, d: _frames_and_jacobian(p, d, inp, blood, schedule, lam))(
        params.reshape(-1, 5), delay.reshape(-1)
    )
    return jax.tree.map(lambda v: v.reshape(params.shape[:-1] + v.shape[1:]), out)


def _frames_and_jacobian(params, delay, inp, blood, schedule, lam):
    """`frames_and_jacobian` for params [..., 5] (delay None) or [5] (scalar delay)."""
    edges, i_start, i_end = schedule.edges()
    dtype = params.dtype
    nd = params.ndim  # rank of x
    t_edges = jnp.asarray(edges, dtype)
    scale = _lift(jnp.asarray(schedule.decay_factors(lam) / schedule.duration, dtype), nd)
    fv, rates = params[..., :1], params[..., 1:]  # [..., 1], [..., 4]
    e = _eigen(rates)
    basis = jnp.eye(4, dtype=dtype)
    de = jnp.stack(
        [
            jax.jvp(_eigen, (rates,), (jnp.broadcast_to(basis[i], rates.shape),))[1]
            for i in range(4)
        ],
        axis=-1,
    )  # [..., 4 outputs, 4 rates]
    beta = e[..., :2] + lam
    ones = jnp.ones_like(beta)
    bsrc = inp if blood is None else blood
    zero = jnp.zeros((), dtype)
    if delay is None:
        integ, d_integ = jax.jvp(lambda b: inp.conv_integral(b, t_edges, lam), (beta,), (ones,))
        y_blood, _ = bsrc.conv(zero, t_edges, lam)
    else:
        b_shifted = bsrc.shift(delay)

        def integrals(b, d):
            return inp.shift(d).conv_integral(b, t_edges, lam)

        integ, d_integ = jax.jvp(integrals, (beta, delay), (ones, zero))
        _, dd_integ = jax.jvp(lambda d: integrals(beta, d), (delay,), (1.0 + zero,))
        # Blood: Y(t) = ∫ C_b(s − Δt)·e^{−λs} ds, so by parts ∂Y/∂Δt = −C_b(t − Δt)·e^{−λt} − λ·Y
        # up to a constant that cancels in the frame differences (exact, jumps included; the
        # forward-mode derivative of `SampledInput.conv` in its sample times is not reliable).
        y_blood, _ = b_shifted.conv(zero, t_edges, lam)
        dd_blood = -b_shifted(t_edges) * jnp.exp(-lam * t_edges) - lam * y_blood
    per_rate = integ[..., i_end] - integ[..., i_start]  # [..., 2, T]
    d_rate = d_integ[..., i_end] - d_integ[..., i_start]
    cb = _lift(y_blood[i_end] - y_blood[i_start], nd)  # [T]
    wa, wb = e[..., 2:3], e[..., 3:4]  # [..., 1]
    tissue = wa * per_rate[..., 0, :] + wb * per_rate[..., 1, :]  # [..., T]
    # ∂tissue/∂(K1, k2, k3, k4): through the weights a, b and through α1, α2.
    d_tissue = (
        per_rate[..., 0, :, None] * de[..., None, 2, :]
        + per_rate[..., 1, :, None] * de[..., None, 3, :]
        + (wa * d_rate[..., 0, :])[..., None] * de[..., None, 0, :]
        + (wb * d_rate[..., 1, :])[..., None] * de[..., None, 1, :]
    )  # [..., T, 4]
    x = scale * ((1.0 - fv) * tissue + fv * cb)
    cols = [(scale * (cb - tissue))[..., None], (scale * (1.0 - fv))[..., None] * d_tissue]
    if delay is not None:
        dd_rate = dd_integ[..., i_end] - dd_integ[..., i_start]
        dd_tissue = wa * dd_rate[..., 0, :] + wb * dd_rate[..., 1, :]
        dd_cb = dd_blood[i_end] - dd_blood[i_start]
        cols.append((scale * ((1.0 - fv) * dd_tissue + fv * dd_cb))[..., None])
    return x, jnp.concatenate(cols, axis=-1)
