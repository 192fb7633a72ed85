"""Tests for kinetix.evaluation.metrics against scikit-image, closed forms and a NumPy MS-SSIM.

Tolerances (absolute): float32 SSIM / NRMSE / NMI / MS-SSIM 1e-5, PSNR 1e-4 dB, against
scikit-image run in float64 on the same (float32-rounded) data (NMI: against scikit-image on the
float32 arrays, whose bin edges are float32 too); float64 (x64 fixture) 1e-9 and 1e-7 dB.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.ndimage import gaussian_filter, uniform_filter
from skimage import metrics as skm

from kinetix.evaluation import metrics as km

F32_ATOL = 1e-5
F32_PSNR_ATOL = 1e-4  # dB
F64_ATOL = 1e-9
F64_PSNR_ATOL = 1e-7  # dB


def _pair(kind, shape, seed=0):
    """A (ref, pred) pair of float64 NumPy images [H, W] of a given kind."""
    rng = np.random.default_rng(seed)
    h, w = shape
    if kind == "random":
        return rng.random(shape), rng.random(shape)
    if kind == "blobs":
        ref = gaussian_filter(rng.random(shape), 3.0)
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        return ref, ref + 0.05 * rng.standard_normal(shape)
    if kind == "piecewise":
        ref = np.zeros(shape)
        ref[h // 4 : 3 * h // 4, 2 : w // 2] = 1.0
        ref[h // 2 :, w // 3 :] = 0.6
        return ref, 0.9 * ref  # flat regions stay exactly flat in pred
    if kind == "quantised":  # many values exactly on histogram bin edges (min 0, max 1)
        ref = np.round(rng.random(shape) * 20) / 20
        return ref, np.round(ref * 10 + rng.integers(-1, 2, shape)) / 10
    if kind == "ki":  # Ki-like: zero background, warm organ, hot spot, noisy prediction
        ref = np.zeros(shape)
        ref[2 : h - 3, 4 : w - 5] = 0.02
        ref[h // 3 : h // 2, w // 3 : w // 2] = 0.05
        return ref, ref + 0.004 * rng.standard_normal(shape)
    raise AssertionError(kind)


KINDS = ("random", "blobs", "piecewise", "quantised", "ki")
SHAPES = ((32, 32), (37, 64))


def _np_ms_ssim(ref, pred, data_range, weights=km.MS_SSIM_WEIGHTS, n_scales=None):
    """Independent MS-SSIM: scipy uniform_filter CS maps, skimage SSIM at the last scale."""
    weights = np.asarray(weights[:n_scales], dtype=np.float64)
    weights = weights / weights.sum()
    c2 = (0.03 * data_range) ** 2
    value = 1.0
    x, y = np.asarray(ref, np.float64), np.asarray(pred, np.float64)
    for j, wj in enumerate(weights):
        if j == len(weights) - 1:
            stat = skm.structural_similarity(x, y, data_range=data_range)
        else:
            ux, uy = uniform_filter(x, 7), uniform_filter(y, 7)
            norm = 49 / 48
            vx = norm * (uniform_filter(x * x, 7) - ux * ux)
            vy = norm * (uniform_filter(y * y, 7) - uy * uy)
            vxy = norm * (uniform_filter(x * y, 7) - ux * uy)
            stat = ((2 * vxy + c2) / (vx + vy + c2))[3:-3, 3:-3].mean()
            h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        value *= max(stat, 0.0) ** wj
    return value


def _np_slice_metrics(ref, pred):
    """The authors' convention written with NumPy + scikit-image (float64)."""
    ref = np.asarray(ref, np.float64)
    pred = np.asarray(pred, np.float64)
    dr = ref.max()
    r, p = np.clip(ref, 0, dr), np.clip(pred, 0, dr)
    return {
        "ssim": skm.structural_similarity(r, p, data_range=dr),
        "psnr": skm.peak_signal_noise_ratio(r, p, data_range=dr),
        "nrmse": skm.normalized_root_mse(r, p),
        "nmi": skm.normalized_mutual_information(r, p, bins=100),
        "ms_ssim": _np_ms_ssim(r, p, dr, n_scales=km.ms_ssim_num_scales(ref.shape)),
    }


# ------------------------------------------------------------------ scikit-image equivalence


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_match_skimage_float32(kind, shape):
    ref, pred = _pair(kind, shape)
    ref32, pred32 = ref.astype(np.float32), pred.astype(np.float32)
    r64, p64 = ref32.astype(np.float64), pred32.astype(np.float64)
    dr = float(r64.max() - r64.min())

    mean, smap = km.ssim(ref32, pred32, dr, full=True)
    sk_mean, sk_map = skm.structural_similarity(r64, p64, data_range=dr, full=True)
    assert mean.dtype == jnp.float32 and smap.shape == shape
    np.testing.assert_allclose(mean, sk_mean, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(smap, sk_map, rtol=0, atol=F32_ATOL)  # borders included
    np.testing.assert_allclose(
        km.psnr(ref32, pred32, dr),
        skm.peak_signal_noise_ratio(r64, p64, data_range=dr),
        rtol=0,
        atol=F32_PSNR_ATOL,
    )
    np.testing.assert_allclose(
        km.nrmse(ref32, pred32), skm.normalized_root_mse(r64, p64), rtol=0, atol=F32_ATOL
    )
    np.testing.assert_allclose(
        km.nmi(ref32, pred32),
        skm.normalized_mutual_information(ref32, pred32, bins=100),
        rtol=0,
        atol=F32_ATOL,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_match_skimage_float64(kind, x64):
    ref, pred = _pair(kind, (37, 64), seed=1)
    dr = float(ref.max() - ref.min())
    mean, smap = km.ssim(ref, pred, dr, full=True)
    sk_mean, sk_map = skm.structural_similarity(ref, pred, data_range=dr, full=True)
    assert mean.dtype == jnp.float64
    np.testing.assert_allclose(mean, sk_mean, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(smap, sk_map, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(
        km.psnr(ref, pred, dr),
        skm.peak_signal_noise_ratio(ref, pred, data_range=dr),
        rtol=0,
        atol=F64_PSNR_ATOL,
    )
    np.testing.assert_allclose(
        km.nrmse(ref, pred), skm.normalized_root_mse(ref, pred), rtol=0, atol=F64_ATOL
    )
    np.testing.assert_allclose(
        km.nmi(ref, pred),
        skm.normalized_mutual_information(ref, pred, bins=100),
        rtol=0,
        atol=F64_ATOL,
    )


def test_ssim_float32_is_accurate_where_one_pass_variance_cancels():
    # Flat bright regions (offset 100 on range 0.05): E[x²] − E[x]² in float32 fails here
    # (skimage itself in float32 is off by ~1); the two-pass window variance is not.
    ref, pred = _pair("ki", (32, 32), seed=2)
    ref32, pred32 = (ref + 100).astype(np.float32), (pred + 100).astype(np.float32)
    expected = skm.structural_similarity(
        ref32.astype(np.float64), pred32.astype(np.float64), data_range=0.05
    )
    np.testing.assert_allclose(km.ssim(ref32, pred32, 0.05), expected, rtol=0, atol=F32_ATOL)


def test_nmi_constant_image_uses_numpy_half_unit_range():
    rng = np.random.default_rng(3)
    ref = np.full((16, 16), 2.5, np.float32)
    pred = rng.random((16, 16)).astype(np.float32)
    expected = skm.normalized_mutual_information(ref, pred, bins=100)
    np.testing.assert_allclose(km.nmi(ref, pred), expected, rtol=0, atol=F32_ATOL)
    assert np.isnan(km.nmi(ref, ref))  # both constant: 0/0 (skimage: nan with a warning)


# ------------------------------------------------------------------ closed forms


def test_closed_forms():
    a = np.array([[0.0, 1.0], [0.0, 1.0]])
    b = np.array([[0.0, 0.0], [1.0, 1.0]])
    # Independent binary images: H(A) = H(B) = ln 2, H(A,B) = ln 4 -> NMI = 1.
    np.testing.assert_allclose(km.nmi(a, b, bins=2), 1.0, rtol=1e-6)
    # Identical non-constant images: (H + H)/H = 2.
    x = np.random.default_rng(4).random((20, 24)).astype(np.float32)
    np.testing.assert_allclose(km.nmi(x, x), 2.0, rtol=1e-6)
    np.testing.assert_allclose(km.ssim(x, x, 1.0), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(km.ms_ssim(x, x, 1.0), 1.0, rtol=0, atol=1e-6)
    # Constant offset 0.1 on data range 1: MSE = 0.01 -> 20 dB.
    np.testing.assert_allclose(km.psnr(x, x + 0.1, 1.0), 20.0, rtol=0, atol=1e-4)
    assert km.psnr(x, x, 1.0) == np.inf
    # pred = 1.1 ref -> NRMSE = 0.1.
    np.testing.assert_allclose(km.nrmse(x + 1, 1.1 * (x + 1)), 0.1, rtol=1e-5)


def test_ssim_gradient_matches_finite_differences(x64):
    ref, pred = _pair("blobs", (12, 14), seed=5)
    check_grads(lambda p: km.ssim(ref, p, 1.0), (pred,), order=1, modes=("rev",), atol=1e-6)


# ------------------------------------------------------------------ MS-SSIM


def test_ms_ssim_num_scales():
    assert km.ms_ssim_num_scales((256, 256)) == 5
    assert km.ms_ssim_num_scales((112, 300)) == 5
    assert km.ms_ssim_num_scales((111, 300)) == 4
    assert km.ms_ssim_num_scales((64, 64)) == 4
    assert km.ms_ssim_num_scales((37, 64)) == 3
    assert km.ms_ssim_num_scales((7, 7)) == 1


@pytest.mark.parametrize("shape", [(64, 64), (37, 64), (120, 128)])
def test_ms_ssim_matches_numpy_reference(shape):
    ref, pred = _pair("blobs", shape, seed=6)
    ref32, pred32 = ref.astype(np.float32), pred.astype(np.float32)
    n = km.ms_ssim_num_scales(shape)
    expected = _np_ms_ssim(ref32, pred32, 1.0, n_scales=n)
    np.testing.assert_allclose(km.ms_ssim(ref32, pred32, 1.0), expected, rtol=0, atol=F32_ATOL)


def test_ms_ssim_identities():
    ref, _ = _pair("blobs", (64, 64), seed=7)
    noise = np.random.default_rng(7).standard_normal(ref.shape)
    ref = ref.astype(np.float32)
    values = [
        float(km.ms_ssim(ref, (ref + s * noise).astype(np.float32), 1.0)) for s in (0.01, 0.05, 0.2)
    ]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    pred = (ref + 0.05 * noise).astype(np.float32)
    np.testing.assert_allclose(km.ms_ssim(pred, ref, 1.0), values[1], rtol=0, atol=1e-6)
    # One scale: MS-SSIM is SSIM (positive here).
    np.testing.assert_allclose(
        km.ms_ssim(ref, pred, 1.0, weights=(1.0,)), km.ssim(ref, pred, 1.0), rtol=0, atol=1e-6
    )


# ------------------------------------------------------------------ transformations


def test_jit_and_vmap_equal_eager():
    pairs = [_pair(k, (37, 64), seed=8) for k in ("blobs", "quantised", "ki")]
    ref = np.stack([p[0] for p in pairs]).astype(np.float32)
    pred = np.stack([p[1] for p in pairs]).astype(np.float32)
    dr = ref.max(axis=(1, 2))

    def all_metrics(r, p, d):
        return {
            "ssim": km.ssim(r, p, d),
            "psnr": km.psnr(r, p, d),
            "ms_ssim": km.ms_ssim(r, p, d),
            "nrmse": km.nrmse(r, p),
            "nmi": km.nmi(r, p),
        }

    eager = [all_metrics(ref[i], pred[i], float(dr[i])) for i in range(len(ref))]
    jitted = [jax.jit(all_metrics)(ref[i], pred[i], dr[i]) for i in range(len(ref))]
    vmapped = jax.jit(jax.vmap(all_metrics))(ref, pred, dr)
    for name in eager[0]:
        expected = np.array([e[name] for e in eager])
        np.testing.assert_allclose([j[name] for j in jitted], expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(vmapped[name], expected, rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------ the authors' convention


def _ki_batch():
    """Four Ki-like slices [4, 37, 64] with negative reference voxels and pred outside range."""
    slices = []
    for seed in range(4):
        ref, pred = _pair("ki", (37, 64), seed=seed)
        ref = ref - 0.003 * (np.arange(ref.size).reshape(ref.shape) % 7 == 0)  # a few negatives
        pred = pred + 0.03 * (np.arange(pred.size).reshape(pred.shape) % 11 == 0)  # > max(ref)
        slices.append((ref, pred))
    ref = np.stack([s[0] for s in slices]).astype(np.float32)
    pred = np.stack([s[1] for s in slices]).astype(np.float32)
    return ref, pred


def test_slice_metrics_follow_authors_convention():
    ref, pred = _ki_batch()
    assert (ref < 0).any() and (pred < 0).any() and (pred > ref.max()).any()
    out = km.batch_slice_metrics(ref, pred)
    assert set(out) == set(km.METRIC_NAMES)
    for i in range(len(ref)):
        expected = _np_slice_metrics(ref[i], pred[i])
        single = km.slice_metrics(ref[i], pred[i])
        for name, value in expected.items():
            atol = F32_PSNR_ATOL if name == "psnr" else F32_ATOL
            np.testing.assert_allclose(out[name][i], value, rtol=0, atol=atol, err_msg=name)
            np.testing.assert_allclose(single[name], value, rtol=0, atol=atol, err_msg=name)


def test_degenerate_and_masked_slices_are_nan_only_there():
    ref, pred = _ki_batch()
    good = km.batch_slice_metrics(ref, pred)
    ref[1] = 0.0  # max(ref) == 0
    ref[2] = -0.01  # max(ref) < 0
    out = km.batch_slice_metrics(ref, pred)
    masked = km.batch_slice_metrics(ref, pred, mask=np.array([True, True, True, False]))
    for name in km.METRIC_NAMES:
        np.testing.assert_array_equal(np.isnan(out[name]), [False, True, True, False])
        np.testing.assert_array_equal(np.isnan(masked[name]), [False, True, True, True])
        np.testing.assert_allclose(
            np.asarray(out[name])[[0, 3]], np.asarray(good[name])[[0, 3]], rtol=0, atol=1e-6
        )


def test_gradients_are_finite():
    ref, pred = _ki_batch()
    ref, pred = ref[:3, :28, :28], pred[:3, :28, :28]  # 3 MS-SSIM scales, smaller program
    ref[1] = 0.0

    def total(p, r):
        out = km.batch_slice_metrics(r, p)
        return sum(jnp.sum(jnp.where(jnp.isfinite(v), v, 0.0)) for v in out.values())

    grad_fn = jax.jit(jax.grad(total))
    grad = grad_fn(pred, ref)
    assert np.isfinite(grad).all()
    assert np.abs(grad[0]).max() > 0 and np.all(grad[1] == 0)
    # Identical images (PSNR = inf, NRMSE = 0) still give finite gradients.
    grad_same = grad_fn(np.clip(ref, 0, None), ref)
    assert np.isfinite(grad_same).all()


# ------------------------------------------------------------------ arguments and tables


def test_invalid_arguments_raise():
    x = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        km.ssim(x, x[:15], 1.0)
    with pytest.raises(ValueError, match="2-D"):
        km.ssim(x[None], x[None], 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        km.ssim(x[:6], x[:6], 1.0)
    with pytest.raises(ValueError, match="data_range"):
        km.psnr(x, x, 0.0)
    with pytest.raises(ValueError, match="bins"):
        km.nmi(x, x, bins=0)
    with pytest.raises(ValueError, match="mask"):
        km.batch_slice_metrics(x[None], x[None], mask=np.ones(2, bool))


def test_relative_change():
    ssim_change = km.relative_change(0.80, 0.78, higher_is_better=True)
    np.testing.assert_allclose(ssim_change.percent, 100 * 0.02 / 0.78, rtol=1e-12)
    assert ssim_change.improved
    rmse_change = km.relative_change(0.10, 0.12, higher_is_better=False)
    np.testing.assert_allclose(rmse_change.percent, -100 / 6, rtol=1e-12)
    assert rmse_change.improved
    worse = km.relative_change([20.0, 1.0], [22.0, 0.0], higher_is_better=True)
    np.testing.assert_allclose(worse.percent, [-100 / 11, np.nan], rtol=1e-12)
    np.testing.assert_array_equal(worse.improved, [False, False])
