"""Voxelwise 2TCM fitting (kinetix.kinetics.fit) against independent references.

References: `scipy.optimize.least_squares` (bounded, TRF) on the same model (`kk.pet_frames`
through a NumPy wrapper, Jacobian by `jax.jacfwd`) from the same starts; `jax.jacfwd` of
`kk.pet_frames` for the structured Jacobian; NumPy central differences and `np.linalg.inv` for
the standard errors; the true parameters of noise-free curves.

Compilation dominates the cost of this file, so the float64 fits share one compiled program
(one batch: noisy curves followed by noise-free ones; both models run on it, the model being a
runtime argument) and the float32 checks share another (under `jax.jit`). The fits with an input
delay compile a per-voxel program of their own (~40 s on 2 cores): marked slow.
"""

import functools

import jax
import numpy as np
import pytest
from scipy.optimize import least_squares

import kinetix.kinetics as kk
from kinetix.kinetics import fit_solver

LAM = kk.F18_DECAY_CONSTANT
SCHED = kk.PAPER_SCHEDULE
WINDOW = (0.0, 35.0)  # the first 22 frames
N_EARLY = 22
# Feng's FDG input scaled to plasma SUV (peak ≈ 5). Float32 tests use their own copy: JAX
# reuses a closed-over NumPy constant converted under jax_enable_x64 after it is switched off.
INPUT = kk.FengInput(np.asarray(kk.FENG_FDG) * np.array([0.05, 0.05, 0.05, 1, 1, 1, 1]))
INPUT32 = kk.FengInput(np.array(INPUT.params))
N_NOISY = 100  # curves compared with scipy
N_DRAWN = 1000  # noisy curves drawn (seeded); the first N_NOISY are fitted
N_STARTS = 3
MAX_STEPS = 200
LOWER = np.asarray(kk.DEFAULT_BOUNDS.lower)
UPPER = np.asarray(kk.DEFAULT_BOUNDS.upper)

# (fv, K1, k2, k3, k4), identifiable from 0–35 min of noise-free frames.
CLEAN = np.array(
    [
        [0.05, 0.10, 0.15, 0.05, 0.010],
        [0.10, 0.50, 0.80, 0.10, 0.020],
        [0.03, 0.20, 0.30, 0.20, 0.005],
        [0.30, 1.20, 1.30, 0.02, 0.010],
    ]
)
# Edges of the model and of the box.
EDGES = np.array(
    [
        [0.05, 0.10, 0.15, 0.05, 0.0],  # k4 = 0 (irreversible)
        [0.05, 0.10, 0.15, 0.0, 0.02],  # k3 = 0 (k4 has no effect)
        [0.0, 0.20, 0.30, 0.10, 0.01],  # fv = 0
        [0.20, 2.0, 2.0, 0.10, 0.0],  # K1, k2 on their upper bounds
        [0.05, 0.30, 0.40, 0.2, 0.5],  # k4 on its upper bound
    ]
)
TRUE = np.concatenate([CLEAN, EDGES])
# XCAT FDG tissues (shared/reference/KINETICS.md): fv, K1, k2, k3 (k4 drawn separately).
TISSUES = np.array(
    [
        [0.029, 0.047, 0.325, 0.084],
        [0.151, 0.114, 0.291, 0.036],
        [0.165, 1.256, 1.329, 0.020],
        [0.545, 0.196, 1.022, 0.149],
        [0.019, 0.131, 0.199, 0.344],
        [0.25, 1.207, 1.909, 0.008],
        [0.02, 0.16, 0.2, 0.06],
        [0.251, 0.214, 0.201, 0.4],
    ]
)


def frames_of(params, inp=INPUT, schedule=SCHED):
    """kk.pet_frames under a fresh jax.jit (op by op it costs seconds; a fresh jit object per
    call because cached executables do not survive a change of jax_enable_x64)."""
    return np.asarray(jax.jit(lambda p: kk.pet_frames(p, inp, schedule))(params))


def noisy_curves(n, seed):
    """[n, 5] parameters and [n, 28] frames with image-domain noise σ = 0.3·√(C·e^{λt}/Δ)."""
    rng = np.random.default_rng(seed)
    rates = TISSUES[rng.integers(0, len(TISSUES), n)] * np.exp(0.25 * rng.standard_normal((n, 4)))
    k4 = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.02, n), 0.0)
    params = np.concatenate([rates, k4[:, None]], axis=1)
    params[:, 0] = np.clip(params[:, 0], 0.0, 0.9)
    params[:, 1:4] = np.clip(params[:, 1:4], 0.005, 1.9)
    clean = frames_of(params)
    sd = 0.3 * np.sqrt(np.maximum(clean, 0.0) * np.exp(LAM * SCHED.mid) / SCHED.duration)
    return params, clean + sd * rng.standard_normal(clean.shape)


@functools.cache
def model_and_jacobian64():
    """p [5] -> (∂x/∂p [22, 5], x [22]): kk.pet_frames on the first 22 frames and its
    jax.jacfwd, one compiled program shared by the float64 tests (call with x64 enabled)."""

    def model(p):
        x = kk.pet_frames(p, INPUT, SCHED[:N_EARLY])
        return x, x

    return jax.jit(jax.jacfwd(model, has_aux=True))


def with_x64(fn):
    """Run fn() with float64 enabled (restored afterwards); for module-scoped fixtures."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return fn()
    finally:
        jax.config.update("jax_enable_x64", prev)


def to_numpy(res):
    return jax.tree.map(np.asarray, res)


def fit_both_models(n_noisy):
    """Both models fitted in float64 to `n_noisy` noisy curves followed by the noise-free ones,
    and the starts they used (`kk.fit_starts`, what `fit_2tcm` calls)."""

    def run():
        params, noisy = noisy_curves(N_DRAWN, seed=0)
        frames = np.concatenate([noisy[:n_noisy], frames_of(TRUE)])
        kw = dict(window=WINDOW, weights="duration_decay", n_starts=N_STARTS, max_steps=MAX_STEPS)
        rev = to_numpy(kk.fit_2tcm(frames, INPUT, SCHED, **kw))
        irr = to_numpy(kk.fit_2tcm(frames, INPUT, SCHED, model="2tcm_irreversible", **kw))
        starts = np.asarray(kk.fit_starts(frames, INPUT, SCHED, window=WINDOW, n_starts=N_STARTS))
        return dict(frames=frames, rev=rev, irr=irr, starts=starts)

    return with_x64(run)


@pytest.fixture(scope="module")
def fits64():
    return fit_both_models(N_NOISY)


def take(res, rows):
    return jax.tree.map(lambda v: v[rows], res)


# ------------------------------------------------------------------------ recovery, edges ---
def test_noise_free_parameters_recovered_float64(fits64):
    """Identifiable parameters return to 1e-6 (relative, 1e-8 absolute); Ki to 1e-7."""
    res = take(fits64["rev"], slice(N_NOISY, N_NOISY + len(CLEAN)))
    assert res.converged.all()
    np.testing.assert_allclose(res.params, CLEAN, rtol=1e-6, atol=1e-8)
    ki = CLEAN[:, 1] * CLEAN[:, 3] / (CLEAN[:, 2] + CLEAN[:, 3])
    np.testing.assert_allclose(res.ki, ki, rtol=1e-7)
    clean = fits64["frames"][N_NOISY : N_NOISY + len(CLEAN), :N_EARLY]
    assert np.all(res.wrss <= 1e-14 * np.sum(clean**2, axis=1))


def test_edges_finite_and_sensible_float64(fits64):
    """k4 = 0, k3 = 0, fv = 0 and parameters on the bounds: everything finite (SEs may be
    +inf, never NaN), the curve fitted exactly, the identifiable parameters recovered."""
    res = take(fits64["rev"], slice(N_NOISY + len(CLEAN), None))
    for name, value in res._asdict().items():
        assert not np.any(np.isnan(value)), name
        if name != "stderr":
            assert np.all(np.isfinite(value)), name
    assert res.converged.all()
    assert np.all((res.params >= LOWER) & (res.params <= UPPER))
    frames = fits64["frames"][N_NOISY + len(CLEAN) :, :N_EARLY]
    assert np.all(res.wrss <= 1e-12 * np.sum(frames**2, axis=1))
    ki = EDGES[:, 1] * EDGES[:, 3] / (EDGES[:, 2] + EDGES[:, 3])
    np.testing.assert_allclose(res.ki, ki, rtol=1e-5, atol=1e-9)
    # fv, K1, k2 are identifiable in every edge case; k3 and k4 where k3 > 0.
    np.testing.assert_allclose(res.params[:, :3], EDGES[:, :3], rtol=1e-5, atol=1e-8)
    has_k3 = EDGES[:, 3] > 0
    np.testing.assert_allclose(res.params[has_k3, 3:], EDGES[has_k3, 3:], rtol=1e-4, atol=1e-7)


def test_irreversible_model_float64(fits64):
    """k4 is 0 with SE 0 everywhere; the noise-free irreversible curve comes back; noisy fits
    converge with finite values."""
    irr = fits64["irr"]
    assert np.all(irr.params[:, 4] == 0.0) and np.all(irr.stderr[:, 4] == 0.0)
    row = N_NOISY + len(CLEAN)  # EDGES[0]: k4 = 0
    np.testing.assert_allclose(irr.params[row], EDGES[0], rtol=1e-6, atol=1e-9)
    assert irr.converged[:N_NOISY].mean() >= 0.95
    assert np.all(np.isfinite(irr.wrss)) and np.all(np.isfinite(irr.ki))


# --------------------------------------------------------------------------- vs scipy -------
def scipy_costs(frames, starts):
    """Best weighted cost over the starts of scipy's bounded TRF on the same model (float64)."""
    w = np.sqrt(kk.frame_weights(SCHED, "duration_decay")[:N_EARLY])
    model_jac = model_and_jacobian64()
    margin = 1e-3 * (UPPER - LOWER)  # the solver's starts are moved inside the box too
    best = np.full(len(frames), np.inf)
    for i, y in enumerate(frames[:, :N_EARLY]):
        for p0 in np.clip(starts[i], LOWER + margin, UPPER - margin):
            cache = {}

            def res(p, y=y, cache=cache):
                jac, x = jax.device_get(model_jac(p))
                cache.update(p=p.copy(), jac=jac)
                return w * (x - y)

            def jac(p, cache=cache):
                if not np.array_equal(cache["p"], p):
                    res(p)
                return w[:, None] * cache["jac"]

            sol = least_squares(res, p0, jac=jac, bounds=(LOWER, UPPER), method="trf")
            best[i] = min(best[i], 2.0 * sol.cost)
    return best


def check_cost_against_scipy(fits):
    frames, starts = fits["frames"][: -len(TRUE)], fits["starts"][: -len(TRUE)]
    ref = with_x64(lambda: scipy_costs(frames, starts))
    ours = fits["rev"].wrss[: len(frames)]
    ok = ours <= ref * (1 + 1e-6)
    assert ok.mean() >= 0.99, (ok.mean(), np.max((ours - ref) / ref))


def test_cost_no_worse_than_scipy_100_curves(fits64):
    """The weighted cost is within 1e-6 (relative) of scipy's or lower for >= 99 % of 100
    noisy curves, both from the same 3 starts, best start kept (benchmarks/fit.py measures the
    agreement on thousands of voxels)."""
    check_cost_against_scipy(fits64)


# ------------------------------------------------------------------- standard errors -------
def test_standard_errors_match_finite_differences(x64, fits64):
    """SE = √diag(s²·(JᵀWJ)⁻¹), s² = wrss/(n − 5), with J by NumPy central differences of
    kk.pet_frames (h = 1e-6·p), for noisy fits with every parameter well inside the box; Ki's
    SE by the delta method. Agreement 1e-4 relative."""
    res = fits64["rev"]
    inside = np.all(
        (res.params[:N_NOISY] > LOWER + 0.01) & (res.params[:N_NOISY] < UPPER - 0.01), axis=1
    )
    rows = np.nonzero(inside)[0][:5]
    assert rows.size == 5
    w = kk.frame_weights(SCHED, "duration_decay")[:N_EARLY]
    model_jac = model_and_jacobian64()

    def model(p):
        return np.asarray(model_jac(p)[1])

    for i in rows:
        p = res.params[i].astype(np.float64)
        jac = np.empty((N_EARLY, 5))
        for k in range(5):
            h = 1e-6 * p[k]
            dp = np.zeros(5)
            dp[k] = h
            jac[:, k] = (model(p + dp) - model(p - dp)) / (2 * h)
        cov = res.wrss[i] / (N_EARLY - 5) * np.linalg.inv(jac.T @ (w[:, None] * jac))
        np.testing.assert_allclose(res.stderr[i], np.sqrt(np.diag(cov)), rtol=1e-4)
        k1, k2, k3 = p[1], p[2], p[3]
        grad = np.array(
            [0.0, k3 / (k2 + k3), -k1 * k3 / (k2 + k3) ** 2, k1 * k2 / (k2 + k3) ** 2, 0]
        )
        np.testing.assert_allclose(res.ki_stderr[i], np.sqrt(grad @ cov @ grad), rtol=1e-4)


def test_linear_stderr_rule(x64):
    """Full rank: NumPy's inverse. A zero (non-identifiable) column: +inf for that parameter,
    the others as if it were absent; a combination that avoids it stays finite."""
    rng = np.random.default_rng(3)
    jac = rng.standard_normal((12, 4)) * np.array([1.0, 10.0, 0.1, 3.0])
    directions = np.concatenate([np.eye(4), [[1.0, -2.0, 0.0, 0.5]]])
    se = np.asarray(fit_solver.linear_stderr(jac, 0.7, directions))
    cov = 0.7 * np.linalg.inv(jac.T @ jac)
    np.testing.assert_allclose(se[:4], np.sqrt(np.diag(cov)), rtol=1e-10)
    np.testing.assert_allclose(se[4], np.sqrt(directions[4] @ cov @ directions[4]), rtol=1e-10)
    jac[:, 2] = 0.0
    se = np.asarray(fit_solver.linear_stderr(jac, 0.7, directions))
    keep = [0, 1, 3]
    cov = 0.7 * np.linalg.inv(jac[:, keep].T @ jac[:, keep])
    assert se[2] == np.inf
    np.testing.assert_allclose(se[keep], np.sqrt(np.diag(cov)), rtol=1e-10)
    c = directions[4, keep]
    np.testing.assert_allclose(se[4], np.sqrt(c @ cov @ c), rtol=1e-10)


# -------------------------------------------------------------------- Jacobian, shifts ------
def test_frames_and_jacobian_match_jacfwd(x64):
    """The structured Jacobian equals jax.jacfwd of kk.pet_frames (1e-10 of the largest entry),
    also at k4 = 0, k3 = 0, equal eigenvalues and on the bounds, with and without a separate
    whole-blood curve; frames equal pet_frames (first 22 frames)."""
    params = np.concatenate([TRUE, [[0.0, 0.3, 0.2, 0.0, 0.2]]])  # k3 = 0, k2 = k4
    x, jac = jax.jit(lambda p: kk.frames_and_jacobian(p, INPUT, SCHED[:N_EARLY]))(params)
    model_jac = model_and_jacobian64()
    for p, x_p, jac_p in zip(params, np.asarray(x), np.asarray(jac), strict=True):
        ref_jac, ref_x = model_jac(p)
        np.testing.assert_allclose(x_p, ref_x, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(jac_p, ref_jac, rtol=0, atol=1e-10 * np.abs(ref_jac).max())
    # A separate whole-blood curve enters only the frames and the fv column; the frames are
    # linear in fv, so ∂x/∂fv = x(fv = 1) − x(fv = 0) exactly.
    blood = kk.FengInput(np.asarray(INPUT.params) * np.array([0.8, 0.8, 0.9, 1, 1, 1, 1]))
    sub = SCHED[:N_EARLY]
    x_b, jac_b = jax.jit(lambda p: kk.frames_and_jacobian(p, INPUT, sub, blood=blood))(params)
    frames = jax.jit(lambda p: kk.pet_frames(p, INPUT, sub, blood=blood))
    np.testing.assert_allclose(x_b, frames(params), rtol=1e-12, atol=1e-14)
    fv0, fv1 = params.copy(), params.copy()
    fv0[:, 0], fv1[:, 0] = 0.0, 1.0
    d_fv = np.asarray(frames(fv1)) - np.asarray(frames(fv0))
    np.testing.assert_allclose(jac_b[..., 0], d_fv, rtol=0, atol=1e-12 * np.abs(d_fv).max())
    np.testing.assert_allclose(jac_b[..., 1:], jac[..., 1:], rtol=1e-13, atol=1e-15)


def test_input_shift(x64):
    """shift(d) is Cp(t − d) for both input kinds (0 before the shifted start), also traced."""
    t = np.linspace(0.0, 10.0, 201)
    times = np.array([0.0, 0.5, 1.0, 1.5, 3.0, 10.0])
    sampled = kk.SampledInput(times, np.array([0.0, 0.0, 5.0, 3.0, 1.5, 0.8]))
    for inp in (INPUT, sampled):
        for d in (0.3, -0.2):
            np.testing.assert_allclose(inp.shift(d)(t), inp(t - d), rtol=1e-12, atol=1e-12)
        traced = jax.jit(lambda d, inp=inp: inp.shift(d)(t))(0.3)
        np.testing.assert_allclose(traced, inp(t - 0.3), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- delay, float32, jit ----
@pytest.mark.slow
def test_delay_recovered():
    """Frames made with a sampled input shifted by Δt (−0.3 to 0.4 min) give Δt back to 2e-3
    min and Ki to 1e-3 relative (float32, noise-free; whole blood = plasma, both shifted); the
    delay column of the Jacobian matches a central difference (1e-3 of its largest entry)."""
    times = np.concatenate([np.linspace(0.0, 3.0, 31), np.linspace(3.5, 65.0, 40)])
    cp = kk.SampledInput(times, np.asarray(INPUT32(times)))
    delays = np.array([0.4, -0.3, 0.15, 0.0])
    model = jax.jit(jax.vmap(lambda p, d: kk.pet_frames(p, cp.shift(d), SCHED)))
    frames = np.asarray(model(CLEAN, delays))
    res = to_numpy(kk.fit_2tcm(frames.astype(np.float32), cp, SCHED, fit_delay=True))
    assert res.converged.all()
    np.testing.assert_allclose(res.delay, delays, atol=2e-3)
    ki = CLEAN[:, 1] * CLEAN[:, 3] / (CLEAN[:, 2] + CLEAN[:, 3])
    np.testing.assert_allclose(res.ki, ki, rtol=1e-3)
    assert np.all(np.isfinite(res.delay_stderr))
    _, jac = jax.jit(lambda p, d: kk.frames_and_jacobian(p, cp, SCHED, delay=d))(CLEAN, delays)
    h = 1e-3
    fd = (np.asarray(model(CLEAN, delays + h)) - np.asarray(model(CLEAN, delays - h))) / (2 * h)
    np.testing.assert_allclose(jac[..., 5], fd, rtol=0, atol=1e-3 * np.abs(fd).max())


def test_float32_under_jit_and_window_uses_only_its_frames():
    """float32 under jax.jit: noise-free identifiable curves come back to 2e-3 (relative) and
    edge cases stay finite; with window 0–35 min, replacing the later frames (even by NaN)
    changes nothing."""
    frames = frames_of(TRUE, inp=INPUT32).astype(np.float32)
    fit = jax.jit(lambda f: kk.fit_2tcm(f, INPUT32, SCHED, window=WINDOW, n_starts=N_STARTS))
    res = to_numpy(fit(frames))
    assert res.params.dtype == np.float32
    for name, value in res._asdict().items():
        assert not np.any(np.isnan(value)), name
    assert res.converged[: len(CLEAN)].all()
    np.testing.assert_allclose(res.params[: len(CLEAN)], CLEAN, rtol=2e-3, atol=1e-5)
    ki = TRUE[:, 1] * TRUE[:, 3] / (TRUE[:, 2] + TRUE[:, 3])
    np.testing.assert_allclose(res.ki, ki, rtol=2e-3, atol=1e-6)
    changed = frames.copy()
    changed[:, N_EARLY:] = np.nan
    changed[0, N_EARLY:] = 1e6
    again = to_numpy(fit(changed))
    for a, b in zip(res, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_vmap_matches_batch():
    """jax.vmap over a leading axis gives what the batched call gives (float32)."""
    frames = frames_of(CLEAN, inp=INPUT32).astype(np.float32)
    batched = kk.fit_2tcm(frames, INPUT32, SCHED, window=WINDOW, n_starts=1)
    mapped = jax.vmap(lambda f: kk.fit_2tcm(f, INPUT32, SCHED, window=WINDOW, n_starts=1))(frames)
    np.testing.assert_allclose(mapped.params, batched.params, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(mapped.converged, batched.converged)


# ------------------------------------------------------------------------------ weights -----
def test_frame_weights():
    w = kk.frame_weights(SCHED, "duration")
    np.testing.assert_allclose(w, SCHED.duration / SCHED.duration.mean(), rtol=1e-14)
    w = kk.frame_weights(SCHED, "duration_decay", decay_constant=LAM)
    ref = SCHED.duration * np.exp(-LAM * SCHED.mid)
    np.testing.assert_allclose(w, ref / ref.mean(), rtol=1e-14)
    np.testing.assert_array_equal(kk.frame_weights(SCHED, "none"), np.ones(SCHED.n_frames))


def test_starts_follow_the_patlak_plot(fits64):
    """For an irreversible curve the starts have the Patlak slope (frames from 10 min) as
    (1 − fv)·Ki and the documented turnovers k2 + k3 (unless moved inside the box)."""
    row = N_NOISY + len(CLEAN)  # EDGES[0]: k4 = 0
    frames, starts = fits64["frames"][row], fits64["starts"][row]
    sub = SCHED[:N_EARLY]
    patlak = jax.jit(lambda f: kk.patlak(f, INPUT, sub, t_star=10.0))
    slope, _ = with_x64(lambda: patlak(frames[:N_EARLY]))
    assert np.all((starts > LOWER) & (starts < UPPER))
    fv, k1, k2, k3 = (starts[:2, i] for i in range(4))  # the third start is clipped (k2 < 0.002)
    np.testing.assert_allclose((1 - fv) * k1 * k3 / (k2 + k3), slope, rtol=1e-10)
    np.testing.assert_allclose(k2 + k3, [0.3, 1.0], rtol=1e-10)


# ------------------------------------------------------------------------- bad arguments ----
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="3tcm"), "model must be one of"),
        (dict(window=(70.0, 80.0)), "holds no whole frame"),
        (dict(window=(10.0, 5.0)), "end > start"),
        (dict(window=(0.0, 0.6)), "needs at least 6"),
        (dict(n_starts=0), "n_starts must be"),
        (dict(weights="counts"), "weights kind must be one of"),
        (dict(weights=-np.ones(28)), "non-negative"),
        (dict(weights=np.ones(27)), "last axis of 28"),
        (dict(frames_mask=np.ones(28)), "frames_mask must be a bool array"),
        (dict(bounds=kk.FitBounds((0,) * 5, (1, 2, 2, 2, 0), (-0.5, 0.5))), "bounds must"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    frames = np.ones((2, 28), np.float32)
    with pytest.raises(ValueError, match=match):
        kk.fit_2tcm(frames, INPUT32, SCHED, **kwargs)


def test_wrong_frame_count_raises():
    with pytest.raises(ValueError, match="27 time points but the schedule has 28"):
        kk.fit_2tcm(np.ones((2, 27)), INPUT32, SCHED)
