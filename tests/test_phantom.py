"""Tests for the thorax simulator (kinetix.data.phantom) and its image operators (recon).

References are independent of the simulator: a scipy ODE solve of the 2TCM with the analytic
Feng input, closed-form projections of a Gaussian, the Gaussian-PSF variance, the stated noise
formula, Patlak (kk.patlak) on the noise-free voxel curves, and MLEM's textbook properties.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import kinetix.kinetics as kk
from kinetix.data import phantom as ph
from kinetix.data.phantom import recon, tissues
from kinetix.data.phantom import subject as subject_module

# Tiny cohort settings: 32×32 (15.6 mm pixels), 2 slices through the heart level.
CFG = ph.SimulationConfig(size=32, slices=2, slice_range=(0.45, 0.6))


@pytest.fixture(scope="module")
def subject():
    return ph.simulate_subject(11, CFG, 0)


# ------------------------------------------------------------------------------------------------
# Configuration, determinism, bookkeeping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise="fbp"),
        dict(size=8),
        dict(recon_subsets=5),
        dict(slice_range=(0.8, 0.2)),
        dict(background_fraction=1.0),
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="SimulationConfig"):
        ph.SimulationConfig(**kwargs)


@pytest.mark.parametrize("seed", [-1, 1.5, "7"])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        ph.simulate_subject(seed, CFG)


def test_default_config_geometry():
    cfg = ph.SimulationConfig()
    np.testing.assert_allclose(cfg.pixel_mm, 500.0 / 64)
    aff = cfg.affine()
    # Voxel (31.5, 31.5, k) is the transaxial centre; z grows with the slice index.
    np.testing.assert_allclose(aff @ [31.5, 31.5, 0, 1], [0, 0, cfg.z_mm(0.95), 1], atol=1e-9)
    assert np.all(np.diff(cfg.z_mm(cfg.slice_positions)) > 0)
    np.testing.assert_allclose(aff[2, 2], np.diff(cfg.z_mm(cfg.slice_positions))[0])


def test_deterministic_for_a_seed(subject):
    again = ph.simulate_subject(11, CFG, 0)
    for name in ("frames", "noisefree", "params", "labels", "ki_true", "fraction"):
        np.testing.assert_array_equal(again[name], subject[name])
    np.testing.assert_array_equal(again["plasma"][1], subject["plasma"][1])
    assert again["tumours"] == subject["tumours"]
    # A jax key gives the same cohort whenever it is the same key.
    k1 = ph.simulate_subject(jax.random.key(5), CFG, 1)
    k2 = ph.simulate_subject(jax.random.key(5), CFG, 1)
    np.testing.assert_array_equal(k1["frames"], k2["frames"])


def test_seeds_and_subjects_differ(subject):
    rng = np.random.default_rng
    a = ph.draw_anatomy(rng([11, 0]), ph.SimulationConfig(), 70.0)
    b = ph.draw_anatomy(rng([12, 0]), ph.SimulationConfig(), 70.0)
    la, _ = ph.thorax_labels(a, ph.SimulationConfig(), 0.5)
    lb, _ = ph.thorax_labels(b, ph.SimulationConfig(), 0.5)
    assert np.mean(la != lb) > 0.02
    other = ph.simulate_subject(11, CFG, 1)
    assert not np.array_equal(other["labels"], subject["labels"])
    assert other["weight_kg"] != subject["weight_kg"]


def test_subject_bookkeeping(subject):
    s = subject
    shape = (32, 32, 2)
    assert s["frames"].shape == s["noisefree"].shape == shape + (28,)
    assert s["frames"].dtype == np.float32
    assert s["params"].shape == shape + (5,)
    assert s["labels"].shape == s["ki_true"].shape == shape
    assert 50 <= s["weight_kg"] <= 90 and 200 <= s["dose_mbq"] <= 410
    np.testing.assert_allclose(s["suv_factor"], s["dose_mbq"] * 1e6 / (s["weight_kg"] * 1e3))
    np.testing.assert_array_equal(s["affine"], CFG.affine())
    assert np.all(np.isfinite(s["frames"]))


def test_iter_subjects_matches_simulate_subject():
    cfg = dataclasses.replace(CFG, noise="none")
    subjects = list(ph.iter_subjects(3, cfg, 2, start=4))
    assert [s["subject_index"] for s in subjects] == [4, 5]
    np.testing.assert_array_equal(subjects[1]["frames"], ph.simulate_subject(3, cfg, 5)["frames"])


def test_frames_compile_once_per_config():
    cfg = dataclasses.replace(CFG, noise="none")
    ph.simulate_subject(0, cfg, 0)
    before = subject_module._noisefree_frames._cache_size()
    for i in range(1, 4):
        ph.simulate_subject(0, cfg, i)
    assert subject_module._noisefree_frames._cache_size() == before


# ------------------------------------------------------------------------------------------------
# Anatomy and parameters
# ------------------------------------------------------------------------------------------------
ORGANS = ("soft_tissue", "muscle", "lung", "myocardium", "blood_pool", "aorta", "bone", "marrow")


@pytest.mark.parametrize("seed", range(6))
def test_anatomy_has_every_organ(seed):
    cfg = ph.SimulationConfig()
    rng = np.random.default_rng(seed)
    anat = ph.draw_anatomy(rng, cfg, rng.uniform(50, 90))
    mid, frac = ph.thorax_labels(anat, cfg, 0.55)  # heart level
    for name in ORGANS:
        assert np.sum(mid == ph.LABELS[name]) >= 2, name
    low, _ = ph.thorax_labels(anat, cfg, 0.95)  # below the dome
    assert np.sum(low == ph.LABELS["liver"]) > 50
    assert np.sum(ph.thorax_labels(anat, cfg, 0.1)[0] == ph.LABELS["liver"]) == 0
    # Lung parenchyma is mostly air, every other body voxel is tissue, outside is empty.
    lung = frac[mid == ph.LABELS["lung"]]
    assert 0.1 <= lung.min() and lung.max() <= 0.45 and 0.17 < lung.mean() < 0.33
    body = (mid > 0) & (mid != ph.LABELS["lung"])
    assert np.all(frac[body] == 1.0) and np.all(frac[mid == 0] == 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_nodules_lie_inside_the_lungs(seed):
    cfg = ph.SimulationConfig()
    rng = np.random.default_rng(seed)
    anat = ph.draw_anatomy(rng, cfg, 70.0)
    assert cfg.nodules_range[0] <= len(anat.nodules) <= cfg.nodules_range[1]
    no_nodules = dataclasses.replace(anat, nodules=())
    labels = np.stack([ph.thorax_labels(anat, cfg, p)[0] for p in cfg.slice_positions], -1)
    base = np.stack([ph.thorax_labels(no_nodules, cfg, p)[0] for p in cfg.slice_positions], -1)
    nod = ph.nodule_map(anat, cfg, labels)
    for n in range(len(anat.nodules)):
        voxels = nod == n + 1
        assert voxels.sum() >= 1  # shows on the slice that cuts it
        assert np.all(base[voxels] == ph.LABELS["lung"])  # replaces lung only
    is_nodule = labels >= ph.LABELS["nodule_benign"]
    np.testing.assert_array_equal(is_nodule, nod > 0)


def test_parameters_within_bounds(subject):
    p, lab = subject["params"], subject["labels"]
    assert np.all(p >= 0)
    assert np.all(p <= ph.PARAM_BOUNDS)
    blood = (lab == ph.LABELS["blood_pool"]) | (lab == ph.LABELS["aorta"])
    assert blood.any()
    np.testing.assert_array_equal(p[..., 0][blood], 1.0)
    np.testing.assert_array_equal(p[lab == 0], 0.0)
    body = lab > 0
    assert np.all(p[..., 1:4][body] > 0)


def test_tumour_kinetics_are_drawn_by_class():
    rng = np.random.default_rng(0)
    mal = np.array([tissues._draw_nodule_params(rng, True) for _ in range(200)])
    ben = np.array([tissues._draw_nodule_params(rng, False) for _ in range(200)])
    ki = lambda q: q[:, 1] * q[:, 3] / (q[:, 2] + q[:, 3])
    assert 0.02 - 1e-9 <= ki(mal).min() and ki(mal).max() <= 0.08 + 1e-9
    assert ki(ben).max() <= 0.012 + 1e-9 and ki(ben).min() >= 0.003 - 1e-9
    assert np.all(mal <= ph.PARAM_BOUNDS) and np.all(ben <= ph.PARAM_BOUNDS)


def test_ki_true_definition(subject):
    p = subject["params"]
    ki = kk.ki_from_rates(p[..., 1], p[..., 2], p[..., 3])
    expected = (1.0 - p[..., 0]) * np.asarray(ki) * subject["fraction"]
    np.testing.assert_allclose(subject["ki_true"], expected, rtol=1e-5, atol=1e-9)
    # Blood has no uptake; a nodule or the myocardium has the most.
    lab = subject["labels"]
    assert np.all(subject["ki_true"][lab == ph.LABELS["aorta"]] == 0)
    assert subject["ki_true"][lab == ph.LABELS["myocardium"]].mean() > 0.005


# ------------------------------------------------------------------------------------------------
# Input function and frames
# ------------------------------------------------------------------------------------------------
def _feng(p, t):
    """Feng model 2 (written out again, independently of the library)."""
    a1, a2, a3, l1, l2, l3, tau = p
    s = np.maximum(t - tau, 0.0)
    c = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return np.where(t > tau, c, 0.0)


def _ratio(t):
    return 0.386 * np.exp(-0.191 * t) + 1.165


@pytest.mark.parametrize("seed", range(5))
def test_input_function_levels(seed):
    blood = ph.draw_input(np.random.default_rng(seed))
    t = blood.times
    assert t[0] == 0 and t[-1] >= 70 and np.all(np.diff(t) > 0) and t.size == 150
    np.testing.assert_allclose(blood.plasma, _feng(blood.feng, t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blood.whole_blood, blood.plasma / _ratio(t), rtol=1e-12)
    fine = np.linspace(0, 70, 70001)
    cp = _feng(blood.feng, fine)
    assert 25 < cp.max() < 110  # SUV at the bolus peak
    assert 1.0 < _feng(blood.feng, np.array([60.0]))[0] / _ratio(60.0) < 2.8  # late whole blood
    assert 0.3 <= blood.feng[6] <= 1.2
    # The library's FengInput sees the same curve.
    np.testing.assert_allclose(
        np.asarray(blood.plasma_input()(fine[::1000])), cp[::1000], rtol=2e-5, atol=1e-5
    )
    # The grid resolves the bolus: linear interpolation is within 1 % of the peak everywhere.
    interp = np.interp(fine, t, blood.whole_blood)
    assert np.max(np.abs(interp - cp / _ratio(fine))) < 0.01 * cp.max()


def _ode_frames(theta, fraction, feng, schedule, lam):
    """Reference frames of voxels: scipy ODE of the 2TCM with analytic plasma and blood.

    theta [..., 5] (fv, K1, k2, k3, k4) and fraction [...] -> [..., T] decay-corrected frames,
    float64; all voxels are integrated together (independent states of one linear ODE).
    """
    theta = np.asarray(theta, np.float64)
    batch = theta.shape[:-1]
    fv, k1, k2, k3, k4 = np.reshape(theta, (-1, 5)).T
    n = fv.size
    tau = float(feng[6])

    def rhs(t, y):
        cp = float(_feng(feng, np.array(t)))
        c1, c2 = y[:n], y[n : 2 * n]
        pet = (1 - fv) * (c1 + c2) + fv * cp / _ratio(t)
        return np.concatenate(
            [k1 * cp - (k2 + k3) * c1 + k4 * c2, k3 * c1 - k4 * c2, pet * math.exp(-lam * t)]
        )

    edges = np.unique(np.concatenate([schedule.start, schedule.end]))
    sol = integrate.solve_ivp(
        rhs, (tau, edges[-1]), np.zeros(3 * n), method="DOP853", rtol=1e-10, atol=1e-12,
        dense_output=True, max_step=0.05,
    )  # fmt: skip
    cum = np.stack([sol.sol(e)[2 * n :] if e > tau else np.zeros(n) for e in edges])  # [E, n]
    i0, i1 = np.searchsorted(edges, schedule.start), np.searchsorted(edges, schedule.end)
    # Decay correction to time zero: Δ / ∫_frame e^{−λt} dt.
    f = lam / (np.exp(-lam * schedule.start) - np.exp(-lam * schedule.end))
    frames = ((cum[i1] - cum[i0]) * f[:, None]).T  # [n, T]
    return np.asarray(fraction, np.float64)[..., None] * np.reshape(frames, batch + (-1,))


def _patlak_ols(frames, feng, schedule, t_star):
    """Patlak Ki by NumPy least squares, written out independently of kk.patlak.

    frames [N, T]; frames with mid-time >= t_star; x = ∫0^{t_mid} Cp / frame-mean Cp and
    y = frame / frame-mean Cp, the Cp integrals by scipy quad of the analytic Feng curve.
    Returns [N] Ki (1/min).
    """
    tau = float(feng[6])

    def cp_integral(a, b):
        if b <= tau:
            return 0.0
        f = lambda t: float(_feng(feng, np.array(t)))  # noqa: E731
        return integrate.quad(f, max(a, tau), b, limit=200, epsabs=1e-13, epsrel=1e-12)[0]

    mid = 0.5 * (schedule.start + schedule.end)
    sel = np.nonzero(mid >= t_star)[0]
    cp_mean = np.array([cp_integral(schedule.start[i], schedule.end[i]) for i in sel])
    cp_mean /= schedule.end[sel] - schedule.start[sel]
    x = np.array([cp_integral(0.0, mid[i]) for i in sel]) / cp_mean
    design = np.stack([x, np.ones_like(x)], axis=1)  # [n, 2]
    coef = np.linalg.lstsq(design, (frames[:, sel] / cp_mean).T, rcond=None)[0]
    return coef[0]


def test_noisefree_frames_match_an_ode_solution(subject):
    lab = subject["labels"]
    lam = CFG.decay_constant
    names = ("soft_tissue", "lung", "myocardium", "aorta", "muscle")
    for name in names:
        idx = tuple(np.argwhere(lab == ph.LABELS[name])[0])
        ref = _ode_frames(
            subject["params"][idx], subject["fraction"][idx], subject["feng"], CFG.schedule, lam
        )
        got = subject["noisefree"][idx]
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-4 * ref.max(), err_msg=name)


def test_patlak_recovers_true_ki_where_the_model_is_irreversible(subject):
    """Patlak (t* = 9 min, 65 min) on the noise-free, unblurred voxel curves with the plasma input.

    1. Every tissue voxel with k4 = 0 and tissue fraction 1 (soft tissue, muscle, myocardium,
       bone, tumours; blood, fv = 1, has true Ki 0 and no relative bias, and its frames are
       checked in `test_noisefree_frames_match_an_ode_solution`): Patlak's own relative bias b
       is computed independently, from the voxel's frames by a scipy ODE solve with the analytic
       plasma and whole-blood curves (float64) and a NumPy least-squares Patlak fit. The
       simulator's Patlak Ki must equal ki_true·(1 + b) within 0.1 % of ki_true: the two routes
       agree to ≈ 3e-5 (float32 frames and fit; interpolation of the sampled whole blood), while
       b itself spans −11 % (slow tissue) to +0.5 %, and a simulator that used the plasma as the
       whole-blood curve would miss by 0.1–1 %.
    2. Where exchange is fast (k2 + k3 > 0.5 /min: myocardium, tumours) Patlak's bias is below
       2 %, so Patlak recovers ki_true itself within 2 %.
    3. For slow, low-uptake tissue (muscle: k2 + k3 ≈ 0.2–0.35 /min) the bias is negative and
       above −25 % at t* = 9 min.
    """
    s = subject
    fit = jax.jit(lambda frames, inp: kk.patlak(frames, inp, CFG.schedule, t_star=9.0)[0])
    ki = np.asarray(fit(s["noisefree"], s["plasma_input"]))
    p = s["params"]

    tissue = (p[..., 4] == 0) & (s["fraction"] == 1) & (s["ki_true"] > 0)
    assert tissue.sum() >= 100 and len(np.unique(s["labels"][tissue])) >= 4
    frames = _ode_frames(
        p[tissue], s["fraction"][tissue], s["feng"], CFG.schedule, CFG.decay_constant
    )
    truth = s["ki_true"][tissue].astype(np.float64)
    bias = _patlak_ols(frames, s["feng"], CFG.schedule, 9.0) / truth - 1.0
    assert bias.min() < -0.05  # the comparison is not trivial: Patlak is biased here
    # ki = ki_true·(1 + b) ± 0.1 % of ki_true, i.e. ki / ki_true = 1 + b ± 1e-3.
    np.testing.assert_allclose(ki[tissue] / truth, 1.0 + bias, rtol=0, atol=1e-3)

    sel = (p[..., 4] == 0) & (s["fraction"] == 1) & (p[..., 2] + p[..., 3] > 0.5)
    sel &= s["ki_true"] > 0.005
    assert sel.sum() >= 5
    np.testing.assert_allclose(ki[sel], s["ki_true"][sel], rtol=0.02)
    slow = (s["labels"] == ph.LABELS["muscle"]) & (p[..., 4] == 0)
    rel = ki[slow] / s["ki_true"][slow] - 1
    assert np.all((rel < 0) & (rel > -0.25))


def test_psf_blur_is_the_expectation_of_the_noise(subject):
    np.testing.assert_allclose(
        subject["noisefree_psf"],
        np.asarray(recon.blur(subject["noisefree"], CFG.fwhm_px)),
        rtol=1e-5,
        atol=1e-6,
    )
    resid = subject["frames"] - subject["noisefree_psf"]
    late = resid[..., -6:][subject["labels"] > 0]
    assert abs(late.mean()) < 3 * late.std() / math.sqrt(late.size)


# ------------------------------------------------------------------------------------------------
# PSF and noise
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fwhm", [0.7, 2.0, 3.5])
def test_psf_kernel_is_a_pixel_integrated_gaussian(fwhm):
    g = recon.psf_kernel(fwhm)
    k = np.arange(g.size) - g.size // 2
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    ref = stats.norm.cdf(k + 0.5, scale=sigma) - stats.norm.cdf(k - 0.5, scale=sigma)
    np.testing.assert_allclose(g, ref / ref.sum(), atol=1e-12)
    np.testing.assert_allclose(g.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sum(g * k), 0.0, atol=1e-12)
    if fwhm >= 2.0:  # well sampled: Gaussian ⊗ unit box has variance σ² + 1/12
        np.testing.assert_allclose(np.sum(g * k**2), sigma**2 + 1 / 12, rtol=2e-3)
    img = np.zeros((21, 21))
    img[10, 10] = 1.0
    out = np.asarray(recon.blur(img, fwhm))
    r = (g.size - 1) // 2
    np.testing.assert_allclose(out[10 - r : 11 + r, 10 - r : 11 + r], np.outer(g, g), atol=1e-7)
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("level", [0.5, 4.0])
def test_image_noise_matches_the_model(level):
    """Std of (noisy − clean) in a uniform image equals σ_m = s·√(C e^{−λt}/Δ)·e^{λt}."""
    sched = kk.PAPER_SCHEDULE
    lam, s, fwhm = kk.F18_DECAY_CONSTANT, 0.5, 2.0
    clean = jnp.full((48, 48, 4, sched.n_frames), level, jnp.float32)
    noisy = recon.image_noise(jax.random.key(0), clean, sched, s, fwhm, lam)
    resid = np.asarray(noisy - clean)[6:-6, 6:-6]  # away from the zero-padded edge
    measured = resid.reshape(-1, sched.n_frames).std(axis=0)
    model = s * np.sqrt(level * np.exp(-lam * sched.mid) / sched.duration) * np.exp(lam * sched.mid)
    np.testing.assert_allclose(measured, model, rtol=0.08)
    np.testing.assert_allclose(np.mean(measured / model), 1.0, rtol=0.02)
    # Correlation of neighbours is the PSF's: Σ g_k g_{k+1} / Σ g_k².
    g = recon.psf_kernel(fwhm)
    rho = np.sum(g[1:] * g[:-1]) / np.sum(g**2)
    r = resid / resid.std(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(np.mean(r[1:] * r[:-1]), rho, atol=0.02)


# ------------------------------------------------------------------------------------------------
# Projector and reconstruction
# ------------------------------------------------------------------------------------------------
def test_projector_matches_closed_form_projection_of_a_gaussian():
    n, n_angles, sigma = 32, 16, 2.5
    system = recon.parallel_beam_system(n, n_angles)
    c = np.arange(n) - (n - 1) / 2
    x0, y0 = 3.0, -2.0
    img = np.exp(-((c[:, None] - x0) ** 2 + (c[None, :] - y0) ** 2) / (2 * sigma**2))
    sino = (system @ img.ravel()).reshape(n_angles, n) * n_angles
    # Line integrals of a Gaussian; the pixel box and the linear spread onto bins add
    # variance 1/12 + 1/6 along s (a pixel-driven projector).
    eff = math.sqrt(sigma**2 + 1 / 12 + 1 / 6)
    theta = np.pi * np.arange(n_angles) / n_angles
    s0 = x0 * np.cos(theta) + y0 * np.sin(theta)
    ref = (
        sigma**2
        / eff
        * np.sqrt(2 * np.pi)
        * np.exp(-((c[None, :] - s0[:, None]) ** 2) / (2 * eff**2))
    )
    np.testing.assert_allclose(sino, ref, atol=0.01 * ref.max())
    inside = recon.fov_mask(n).ravel()
    np.testing.assert_allclose(system.sum(axis=0)[inside], 1.0, rtol=1e-5)
    assert np.all(system[:, ~inside] == 0)


def _disc_phantom(n=24):
    c = np.arange(n) - (n - 1) / 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    hot = (c[:, None] - 4) ** 2 + (c[None, :] - 4) ** 2 <= 1.5**2
    img = np.where(r2 <= 8.0**2, 10.0, 0.0) + np.where(hot, 20.0, 0.0)
    return img.ravel(), r2.ravel()


def test_mlem_converges_on_noise_free_data(x64):
    n, n_angles = 24, 24
    system = jnp.asarray(recon.parallel_beam_system(n, n_angles), jnp.float64)
    truth, r2 = _disc_phantom(n)
    background = 0.2 * float(np.mean(system @ truth))
    sino = system @ truth + background
    x = recon.mlem(sino, system, background, 0)
    step = jax.jit(lambda x: recon.mlem(sino, system, background, 1, init=x))
    errors, logliks = [], []
    for _ in range(40):
        x = step(x)
        errors.append(float(jnp.linalg.norm(x - truth) / np.linalg.norm(truth)))
        logliks.append(float(recon.poisson_loglik(sino, system @ x + background)))
    assert np.all(np.diff(errors) < 0)
    assert np.all(np.diff(logliks) > 0)
    x = recon.mlem(sino, system, background, 400, init=x)
    centre = r2 <= 2.5**2  # middle of the warm disc, away from the hot spot
    np.testing.assert_allclose(np.asarray(x)[centre].mean(), 10.0, rtol=0.02)
    np.testing.assert_allclose(np.asarray(x)[centre], 10.0, rtol=0.1)
    np.testing.assert_allclose(float(jnp.sum(x)), truth.sum(), rtol=1e-3)


def test_osem_with_one_subset_is_mlem_and_subsets_agree():
    n, n_angles = 16, 16
    system = jnp.asarray(recon.parallel_beam_system(n, n_angles))
    truth, _ = _disc_phantom(n)
    sino = jnp.stack([system @ truth, 2 * (system @ truth)]) + 1.0  # a batch of two
    a = recon.mlem(sino, system, 1.0, 5)
    b = recon.osem(sino, system, 1.0, 5, 1, n_angles)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(a[1]),
        2 * np.asarray(recon.mlem(sino[0] - 0.5, system, 0.5, 5)),
        rtol=1e-4,
        atol=1e-5,
    )
    c = recon.osem(sino, system, 1.0, 20, 4, n_angles)
    d = recon.mlem(sino, system, 1.0, 80)
    np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=0.05, atol=0.02 * truth.max())
    with pytest.raises(ValueError, match="divide"):
        recon.osem(sino, system, 1.0, 1, 3, n_angles)


def test_projection_noise_counts_and_bias():
    cfg = dataclasses.replace(CFG, noise="projection")
    s = ph.simulate_subject(2, cfg, 0)
    prompts = s["prompts"]  # [S, T]
    dose_ratio = s["dose_mbq"] / s["weight_kg"] / ph.REFERENCE_DOSE_PER_KG
    np.testing.assert_allclose(prompts.sum(axis=1).mean(), 20e6 * dose_ratio, rtol=1e-3)
    # Frame counts follow activity × duration × decay: ∫ e^{−λτ} = Δ/f (independent of recon).
    sched = cfg.schedule
    weight = sched.duration / kk.decay_correction_factors(sched, cfg.decay_constant)
    inside = recon.fov_mask(cfg.size)[..., None, None]
    activity = np.sum(np.where(inside, s["noisefree"], 0), axis=(0, 1)) * weight  # [S, T]
    expected = activity / activity.sum(axis=1).mean() * 20e6 * dose_ratio
    big = expected > 1e5
    np.testing.assert_allclose(prompts[big], expected[big], rtol=0.01)
    # KINETICS.md quotes 1.5–1.8 M for a 300-s late frame beside the 20 M total; thorax
    # activity falls with the blood, so the last frame gets less (kinetix.data.phantom's
    # docstring). Check the order of magnitude only: the total above is the anchor.
    late = prompts[:, -1]
    assert np.all((late > 0.3e6) & (late < 2.5e6))
    # OSEM + PSF post-filter is nearly unbiased over a large region in the late frames.
    body = s["labels"] > 0
    for f in (-1, -3):
        np.testing.assert_allclose(
            s["frames"][..., f][body].mean(), s["noisefree_psf"][..., f][body].mean(), rtol=0.05
        )
