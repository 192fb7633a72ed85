"""Two-tissue compartment model (2TCM): closed form, tissue curves and exact PET frames.

    dC1/dt = K1·Cp − (k2 + k3)·C1 + k4·C2,   dC2/dt = k3·C1 − k4·C2,   C_T = C1 + C2
    C_T = a·(Cp ⊗ e^{−α1 t}) + b·(Cp ⊗ e^{−α2 t})
    C_PET = (1 − fv)·C_T + fv·C_WB

(docs/conventions.md, "Two-tissue model"; Liang et al. 2023, Eqs. 1–6). Frames are the exact
decay-weighted frame integrals times each frame's decay-correction factor (Eq. 7 and the BIDS
convention):

    x_m = f_m/Δ_m · ∫_{t_s}^{t_e} C_PET(τ)·e^{−λτ} dτ

computed in closed form through the input function's `conv` (no time grid): O(frames) per voxel
for a Feng input, O(samples + frames) for a sampled one.

Parameters are `[..., 5]` = (fv, K1, k2, k3, k4): fv dimensionless, K1 mL/min/mL, k2..k4 1/min.
Functions broadcast over the leading axes (one voxel is the `[5]` case) and are safe under `jit`,
`grad` and `vmap`, including k4 = 0, k3 = 0 and equal eigenvalues (k3 = 0, k2 = k4).
"""

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.kinetics.frames import F18_DECAY_CONSTANT, FrameSchedule

PARAM_NAMES = ("fv", "K1", "k2", "k3", "k4")


def _check_params(params):
    """Shape check always; value checks only on concrete (non-traced) arrays."""
    shape = jnp.shape(params)
    if len(shape) == 0 or shape[-1] != 5:
        raise ValueError(
            f"params must have a last axis of 5 (fv, K1, k2, k3, k4), got shape {shape}."
        )
    if not isinstance(params, jax.core.Tracer):
        arr = np.asarray(params)
        if np.any(arr < 0):
            bad = PARAM_NAMES[int(np.argmax(np.any(arr.reshape(-1, 5) < 0, axis=0)))]
            raise ValueError(f"2TCM parameters must be non-negative; {bad} has negative values.")
        if np.any(arr[..., 0] > 1):
            raise ValueError("2TCM blood fraction fv must lie in [0, 1].")


def ki_from_rates(K1, k2, k3):
    """Net influx rate Ki = K1·k3/(k2 + k3) (mL/min/mL); 0 where k2 + k3 = 0."""
    den = k2 + k3
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, K1 * k3 / safe, 0.0)


def rates_from_macro(macro):
    """2TCM rates from the "macro" parameterisation, on the last axis (one voxel or a batch).

    (fv, K1, Vd, E, k4) -> (fv, K1, k2, k3, k4) with k2 = K1·(1 − E)/Vd and k3 = K1·E/Vd, i.e.
    Vd = K1/(k2 + k3) (mL/mL, the reversible compartment's distribution volume) and
    E = k3/(k2 + k3) (unitless, so that Ki = K1·E). The late frames depend on Vd and Ki almost
    linearly, which a network can find more easily than (k2, k3). Vd must be > 0.

    Args:
      macro: [..., 5] (fv, K1 mL/min/mL, Vd mL/mL, E, k4 1/min).

    Returns:
      [..., 5] (fv, K1 mL/min/mL, k2, k3, k4 1/min).
    """
    macro = jnp.asarray(macro)
    fv, K1, vd, e, k4 = (macro[..., i] for i in range(5))
    flow = K1 / vd  # k2 + k3
    return jnp.stack([fv, K1, flow * (1.0 - e), flow * e, k4], axis=-1)


def macro_from_rates(params):
    """Inverse of `rates_from_macro`: (fv, K1, k2, k3, k4) -> (fv, K1, Vd, E, k4), [..., 5].

    Needs K1 > 0 and k2 + k3 > 0 (Vd and E are undefined otherwise: NaN there).
    """
    params = jnp.asarray(params)
    fv, K1, k2, k3, k4 = (params[..., i] for i in range(5))
    den = k2 + k3
    return jnp.stack([fv, K1, K1 / den, k3 / den, k4], axis=-1)


def rates_from_uncoupled(uncoupled, eps: float = 1e-6):
    """2TCM rates from the "uncoupled" parameterisation, on the last axis.

    (fv, K1v, k2, k3, k4) -> (fv, K1, k2, k3, k4) with K1 = K1v/(1 − fv), i.e. K1v = (1 − fv)·K1
    is the tissue's influx per mL of *voxel*. The frames are fv·Cb + (1 − fv)·C_T(K1, …) and
    C_T is linear in K1, so they equal fv·Cb + C_T(K1v, …): the tissue term no longer shrinks
    as fv → 1, nor does its gradient (with the rates themselves, a head that drives fv towards 1
    early in training loses the gradient of every tissue rate, the collapse measured in
    benchmarks/README.md). 1 − fv is floored at ``eps`` (K1 is then large but finite).

    Args:
      uncoupled: [..., 5] (fv, K1v mL/min/mL of voxel, k2, k3, k4 1/min).

    Returns:
      [..., 5] (fv, K1 mL/min/mL, k2, k3, k4 1/min).
    """
    uncoupled = jnp.asarray(uncoupled)
    fv, k1v = uncoupled[..., 0], uncoupled[..., 1]
    return uncoupled.at[..., 1].set(k1v / jnp.maximum(1.0 - fv, eps))


def uncoupled_from_rates(params):
    """Inverse of `rates_from_uncoupled`: (fv, K1, k2, k3, k4) -> (fv, (1 − fv)·K1, k2, k3, k4)."""
    params = jnp.asarray(params)
    return params.at[..., 1].set((1.0 - params[..., 0]) * params[..., 1])


def eigen_decomposition(K1, k2, k3, k4):
    """2TCM impulse response h(t) = a·e^{−α1 t} + b·e^{−α2 t}, stable in every limit.

    α1 ≤ α2 are the roots of α² − (k2 + k3 + k4)α + k2·k4; α1 uses the product form
    2·k2·k4/(S + √D) (no cancellation when k4 → 0) and the discriminant is evaluated as the
    sum of squares (k2 − k4 + k3)² + 4·k3·k4 ≥ 0. The weights b = K1·(k2 − α1)/(α2 − α1) and
    a = K1 − b stay in [0, K1]; at α1 = α2 they are arbitrary (both terms coincide) and are
    taken as K1/2 each. √D has a zero (finite) gradient at D = 0.

    Returns:
      (alpha1, alpha2, a, b) with the broadcast shape of the inputs.
    """
    s = k2 + k3 + k4
    disc = (k2 - k4 + k3) ** 2 + 4.0 * k3 * k4
    pos = disc > 0
    gap = jnp.where(pos, jnp.sqrt(jnp.where(pos, disc, 1.0)), 0.0)
    den = s + gap
    alpha1 = jnp.where(den > 0, 2.0 * k2 * k4 / jnp.where(den > 0, den, 1.0), 0.0)
    alpha2 = s - alpha1
    frac = jnp.where(gap > 0, (k2 - alpha1) / jnp.where(gap > 0, gap, 1.0), 0.5)
    # Not jnp.clip: at k3 = 0 frac sits exactly on a bound, where clip halves the gradient.
    b = K1 * jnp.where(frac > 1.0, 1.0, jnp.where(frac < 0.0, 0.0, frac))
    return alpha1, alpha2, K1 - b, b


def _split(params):
    p = jnp.asarray(params)
    p = p.astype(jnp.result_type(p.dtype, jnp.float32))
    return tuple(p[..., i] for i in range(5))


def tissue_curve(params, inp, t, blood=None):
    """C_PET(t) = (1 − fv)·C_T(t) + fv·C_WB(t) at times t, no decay.

    Args:
      params: [..., 5] (fv, K1, k2, k3, k4).
      inp: plasma input (`FengInput` or `SampledInput`, unbatched).
      t: [N] times (min).
      blood: whole-blood input; None means whole blood = plasma.

    Returns:
      [..., N] activity in the input's units.
    """
    _check_params(params)
    fv, K1, k2, k3, k4 = _split(params)
    a1, a2, wa, wb = eigen_decomposition(K1, k2, k3, k4)
    t = jnp.atleast_1d(jnp.asarray(t, fv.dtype))
    y, _ = inp.conv(jnp.stack([a1, a2], axis=-1), t, 0.0)  # [..., 2, N]
    ct = wa[..., None] * y[..., 0, :] + wb[..., None] * y[..., 1, :]
    cb = (inp if blood is None else blood)(t)  # [N]
    cb = jnp.reshape(cb, (1,) * (ct.ndim - 1) + cb.shape)
    return (1.0 - fv)[..., None] * ct + fv[..., None] * cb


def _frame_operator(schedule: FrameSchedule, decay_constant: float):
    """Static pieces of the frame integral: edges [E], start/end indices [T], f_m/Δ_m [T]."""
    if decay_constant < 0:
        raise ValueError(f"decay_constant must be >= 0, got {decay_constant}.")
    edges, i_start, i_end = schedule.edges()
    scale = schedule.decay_factors(decay_constant) / schedule.duration
    return edges, i_start, i_end, scale


def blood_frames(inp, schedule: FrameSchedule, decay_constant: float = F18_DECAY_CONSTANT):
    """[T] frame values of an input curve itself, made like the images (f_m/Δ_m·∫ C e^{−λτ})."""
    edges, i_start, i_end, scale = _frame_operator(schedule, float(decay_constant))
    y, _ = inp.conv(0.0, edges, float(decay_constant))  # ∫0^t C e^{-λτ}
    return jnp.asarray(scale, y.dtype) * (y[i_end] - y[i_start])


def pet_frames(
    params, inp, schedule: FrameSchedule, decay_constant: float = F18_DECAY_CONSTANT, blood=None
):
    """Decay-corrected PET frame values of the 2TCM, exact for the input's representation.

    x_m = f_m/Δ_m·∫_{t_s}^{t_e} C_PET(τ) e^{−λτ} dτ, with f_m the decay-correction factor; for
    a constant C_PET this returns C_PET, and with λ = 0 the plain frame mean.

    Args:
      params: [..., 5] (fv, K1, k2, k3, k4) in (1, mL/min/mL, 1/min, 1/min, 1/min).
      inp: plasma input (unbatched; vmap to pair a batch of inputs with a batch of params).
      schedule: static `FrameSchedule` (min).
      decay_constant: λ (1/min); default F-18. Use 0 for no decay weighting.
      blood: whole-blood input for the fv term; None means whole blood = plasma (the paper).

    Returns:
      [..., T] frame values in the input's units.
    """
    _check_params(params)
    edges, i_start, i_end, scale = _frame_operator(schedule, float(decay_constant))
    lam = float(decay_constant)
    fv, K1, k2, k3, k4 = _split(params)
    a1, a2, wa, wb = eigen_decomposition(K1, k2, k3, k4)
    beta = jnp.stack([a1, a2], axis=-1) + lam  # [..., 2]
    integ = inp.conv_integral(beta, jnp.asarray(edges, fv.dtype), lam)  # [..., 2, E]
    per_rate = integ[..., i_end] - integ[..., i_start]  # [..., 2, T]
    tissue = wa[..., None] * per_rate[..., 0, :] + wb[..., None] * per_rate[..., 1, :]
    src = inp if blood is None else blood
    yb, _ = src.conv(jnp.zeros((), fv.dtype), jnp.asarray(edges, fv.dtype), lam)  # [E]
    cb = yb[i_end] - yb[i_start]
    cb = jnp.reshape(cb, (1,) * (tissue.ndim - 1) + cb.shape)
    total = (1.0 - fv)[..., None] * tissue + fv[..., None] * cb
    return (
        jnp.reshape(jnp.asarray(scale, total.dtype), (1,) * (total.ndim - 1) + scale.shape) * total
    )
