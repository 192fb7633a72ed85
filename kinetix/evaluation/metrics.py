"""Image-quality metrics for 2-D slices, reproducing the paper authors' evaluation (JAX).

Liang et al. (2023) score every 2-D test slice of a Ki (or SUV) map with scikit-image
(`skimage.metrics`): `structural_similarity` with its defaults, `peak_signal_noise_ratio`,
`normalized_root_mse` (reported as "RMSE") and `normalized_mutual_information` with 100 bins,
after clipping prediction and reference to [0, max(reference slice)] and with
data_range = max(reference slice) (docs/conventions.md, "Evaluation metrics").

This module re-implements those functions in JAX so that they run under `jax.jit` and
`jax.vmap` (over slices) and give scikit-image's values (checked in tests/test_metrics.py to
1e-5 absolute for SSIM / NRMSE / NMI and 1e-4 dB for PSNR, in float32 and float64):

- `ssim`: scikit-image defaults: 7×7 uniform window, sample covariance (N/(N−1)), K1 = 0.01,
  K2 = 0.03, `scipy.ndimage.uniform_filter` borders (mode 'reflect' = NumPy 'symmetric' padding)
  and the mean over the interior only (a (7−1)/2 = 3-pixel border is cropped). Window variances
  are computed two-pass (centred on the window mean), which keeps float32 results within ~1e-6
  of scikit-image in float64, where the one-pass E[x²] − E[x]² form loses ~1e-4 on flat regions.
- `psnr`, `nrmse` (Euclidean normalisation), `nmi` (joint histogram with NumPy's bin edges and
  last-bin-closed rule, as `np.histogramdd` inside scikit-image).
- `ms_ssim`: multi-scale SSIM (Wang, Simoncelli & Bovik 2003) with the same 7×7 box window,
  not part of the authors' evaluation (an extra).
- `slice_metrics` / `batch_slice_metrics`: the authors' per-slice convention.
- `relative_change`: percent change of a method against a baseline for tables.

Public functions check their static arguments in Python (ValueError with one sentence), then
call a private `jax.jit`-compiled core (compiled once per shape and static options, so eager
calls are cheap; inlined when the caller is itself jitted or vmapped).

All images are 2-D `[H, W]` in any unit (SUV, Ki in 1/min); `data_range` is in the same unit.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of MS-SSIM, finest scale first (Wang, Simoncelli & Bovik 2003)."""

SSIM_WIN_SIZE = 7
"""scikit-image's default SSIM window side (uniform window)."""

NMI_BINS = 100
"""Bins per axis of the joint histogram in the authors' NMI."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_float_pair(name_a: str, a, name_b: str, b, ndim: int | None = 2):
    """Checks shapes and promotes both arrays to one floating dtype (ints -> default float)."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"`{name_a}` {a.shape} and `{name_b}` {b.shape} must have the same shape.")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"`{name_a}` must be a {ndim}-D array, got shape {a.shape}.")
    dtype = jnp.result_type(a, b)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return a.astype(dtype), b.astype(dtype)


def _check_data_range(data_range) -> None:
    """Rejects a concrete non-positive data range (a traced one cannot be checked)."""
    if isinstance(data_range, (int, float, np.number)) and not data_range > 0:
        raise ValueError(f"`data_range` must be positive, got {data_range}.")


def _mean2(a: jax.Array) -> jax.Array:
    """Mean over the last two axes, row means first (shorter float32 summation chains)."""
    return jnp.mean(jnp.mean(a, axis=-1), axis=-1)


def _mean_all(a: jax.Array) -> jax.Array:
    """Mean of all elements, as row means then their mean (see `_mean2`)."""
    return _mean2(a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1))


def _safe_sqrt(a: jax.Array) -> jax.Array:
    """sqrt with a zero (not infinite) derivative at 0."""
    pos = a > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, a, 1.0)), 0.0)


def _box_mean(xp: jax.Array, win: int, h: int, w: int) -> jax.Array:
    """Mean over win×win windows of a padded array [..., h+win-1, w+win-1] -> [..., h, w]."""
    rows = sum(xp[..., dy : dy + h, :] for dy in range(win))
    return sum(rows[..., :, dx : dx + w] for dx in range(win)) / (win * win)


def _box_sum_adjoint(g: jax.Array, win: int) -> jax.Array:
    """Adjoint of the valid win×win box sum: [..., h, w] -> [..., h+win-1, w+win-1]."""
    pad = [(0, 0)] * (g.ndim - 2) + [(win - 1, win - 1)] * 2
    h, w = g.shape[-2:]
    return _box_mean(jnp.pad(g, pad), win, h + win - 1, w + win - 1) * (win * win)


def _loop_rows(win: int, body, init):
    """fori_loop over window rows dy (a loop over rows, columns unrolled by `body`, compiles
    several times faster than win² unrolled offsets)."""
    return jax.lax.fori_loop(0, win, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _window_moments(xp, yp, win: int):
    """Window means and centred second moments, two-pass (accurate in float32).

    Args:
      xp, yp: [..., h+win-1, w+win-1] padded images.
      win: window side.

    Returns:
      (ux, uy, sxx, syy, sxy), each [..., h, w]: window means and Σ_o (x_o − ux)²,
      Σ_o (y_o − uy)², Σ_o (x_o − ux)(y_o − uy) over the win×win window of each output pixel.
      (The one-pass E[x²] − E[x]² loses ~1e-4 of SSIM in float32 on flat bright regions.)
    """
    h, w = xp.shape[-2] - win + 1, xp.shape[-1] - win + 1
    ux = _box_mean(xp, win, h, w)
    uy = _box_mean(yp, win, h, w)
    row_axis = xp.ndim - 2

    def add_row(dy, sums):
        x_rows = jax.lax.dynamic_slice_in_dim(xp, dy, h, axis=row_axis)
        y_rows = jax.lax.dynamic_slice_in_dim(yp, dy, h, axis=row_axis)
        sxx, syy, sxy = sums
        for dx in range(win):
            a = x_rows[..., dx : dx + w] - ux
            b = y_rows[..., dx : dx + w] - uy
            sxx, syy, sxy = sxx + a * a, syy + b * b, sxy + a * b
        return sxx, syy, sxy

    zeros = jnp.zeros_like(ux)
    return (ux, uy, *_loop_rows(win, add_row, (zeros, zeros, zeros)))


def _window_moments_fwd(xp, yp, win):
    out = _window_moments(xp, yp, win)
    return out, (xp, yp, out[0], out[1])


def _window_moments_bwd(win, residuals, cotangents):
    # d sxx[c]/d x[p] = 2 (x[p] − ux[c]) and d sxy[c]/d x[p] = y[p] − uy[c] for p in window c
    # (the terms through ux vanish since Σ_o (x_o − ux) = 0); computed two-pass as well.
    xp, yp, ux, uy = residuals
    g_ux, g_uy, g_xx, g_yy, g_xy = cotangents
    pad = [(0, 0)] * (xp.ndim - 2) + [(win - 1, win - 1)] * 2
    g_xx, g_yy, g_xy, uxp, uyp = (jnp.pad(a, pad) for a in (g_xx, g_yy, g_xy, ux, uy))
    hp, wp = xp.shape[-2:]
    row_axis = xp.ndim - 2

    def add_row(dy, grads):
        start = win - 1 - dy
        rows = [
            jax.lax.dynamic_slice_in_dim(a, start, hp, axis=row_axis)
            for a in (g_xx, g_yy, g_xy, uxp, uyp)
        ]
        gx, gy = grads
        for dx in range(win):
            cxx, cyy, cxy, mx, my = (a[..., win - 1 - dx : win - 1 - dx + wp] for a in rows)
            dx_, dy_ = xp - mx, yp - my
            gx = gx + 2.0 * cxx * dx_ + cxy * dy_
            gy = gy + 2.0 * cyy * dy_ + cxy * dx_
        return gx, gy

    gx = _box_sum_adjoint(g_ux, win) / (win * win)
    gy = _box_sum_adjoint(g_uy, win) / (win * win)
    return _loop_rows(win, add_row, (gx, gy))


_window_moments.defvjp(_window_moments_fwd, _window_moments_bwd)


def _ssim_maps(ref, pred, data_range, win_size: int, k1: float, k2: float):
    """Luminance and contrast-structure maps of SSIM, as scikit-image computes them.

    Args:
      ref, pred: [H, W] images of one floating dtype.
      data_range: scalar, same unit as the images.
      win_size: odd window side (uniform window).
      k1, k2: SSIM constants.

    Returns:
      (lum, cs), each [H, W]: lum = (2·μx·μy + C1)/(μx² + μy² + C1) and
      cs = (2·σxy + C2)/(σx² + σy² + C2), with sample (co)variances over the window; the SSIM
      map is lum·cs. Borders use scipy.ndimage's 'reflect' extension.
    """
    h, w = ref.shape[-2:]
    r = (win_size - 1) // 2
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    pad = [(0, 0)] * (ref.ndim - 2) + [(r, r), (r, r)]
    xp = jnp.pad(ref, pad, mode="symmetric")  # scipy.ndimage mode='reflect'
    yp = jnp.pad(pred, pad, mode="symmetric")
    ux, uy, sxx, syy, sxy = _window_moments(xp, yp, win_size)
    vx = sxx * (cov_norm / n)
    vy = syy * (cov_norm / n)
    vxy = sxy * (cov_norm / n)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    lum = (2.0 * ux * uy + c1) / (ux * ux + uy * uy + c1)
    cs = (2.0 * vxy + c2) / (vx + vy + c2)
    return lum, cs


def _check_window(shape, win_size: int) -> None:
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"`win_size` must be a positive odd integer, got {win_size}.")
    if min(shape) < win_size:
        raise ValueError(
            f"Images of shape {tuple(shape)} are smaller than the {win_size}×{win_size} "
            "SSIM window."
        )


# --------------------------------------------------------------------------------------------
# Single-image metrics (scikit-image equivalents)
# --------------------------------------------------------------------------------------------


def ssim(
    ref,
    pred,
    data_range,
    *,
    win_size: int = SSIM_WIN_SIZE,
    k1: float = 0.01,
    k2: float = 0.03,
    full: bool = False,
):
    """Mean structural similarity of two 2-D images, as scikit-image computes it.

    Equals `skimage.metrics.structural_similarity(ref, pred, data_range=data_range)` with its
    defaults (uniform 7×7 window, `use_sample_covariance=True`, K1 = 0.01, K2 = 0.03,
    `gaussian_weights=False`): local means and sample (co)variances (normalised by N − 1,
    N = win_size²) over the window, SSIM map
    (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)) with C1 = (K1·L)², C2 = (K2·L)²,
    L = data_range, averaged over the interior (a (win_size − 1)/2-pixel border is cropped).
    Symmetric in its two images. Works under jit, vmap and grad.

    Args:
      ref: [H, W] reference image (H, W ≥ win_size).
      pred: [H, W] test image, same unit as `ref`.
      data_range: scalar > 0, the images' dynamic range (same unit); may be traced.
      win_size: odd side of the uniform window (static).
      k1, k2: SSIM constants (static).
      full: also return the full SSIM map (static).

    Returns:
      Scalar mean SSIM (dimensionless, ≤ 1); with `full=True`, `(mean, map)` where map is
      [H, W], borders included (computed with scipy.ndimage 'reflect' extension, as skimage).
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred)
    _check_window(ref.shape, win_size)
    _check_data_range(data_range)
    mean, smap = _ssim_impl(ref, pred, data_range, win_size, k1, k2)
    return (mean, smap) if full else mean


@functools.partial(jax.jit, static_argnames=("win_size", "k1", "k2"))
def _ssim_impl(ref, pred, data_range, win_size, k1, k2):
    lum, cs = _ssim_maps(ref, pred, data_range, win_size, k1, k2)
    smap = lum * cs
    r = (win_size - 1) // 2
    h, w = smap.shape
    return _mean2(smap[r : h - r, r : w - r]), smap


def psnr(ref, pred, data_range):
    """Peak signal-to-noise ratio in dB, as `skimage.metrics.peak_signal_noise_ratio`.

    PSNR = 10·log10(L² / MSE), MSE = mean((ref − pred)²), L = data_range (the skimage call
    passes `data_range` explicitly, as the authors did). Identical images give +inf (skimage: inf
    with a divide-by-zero warning); the gradient there is 0, not NaN.

    Args:
      ref: [...] reference image (any shape).
      pred: [...] test image, same shape and unit.
      data_range: scalar > 0, same unit as the images; may be traced.

    Returns:
      Scalar PSNR in dB.
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred, ndim=None)
    _check_data_range(data_range)
    return _psnr_impl(ref, pred, data_range)


@jax.jit
def _psnr_impl(ref, pred, data_range):
    mse = _mean_all(jnp.square(ref - pred))
    pos = mse > 0
    safe = jnp.where(pos, mse, 1.0)
    value = 20.0 * jnp.log10(jnp.asarray(data_range, ref.dtype)) - 10.0 * jnp.log10(safe)
    return jnp.where(pos, value, jnp.inf)


def nrmse(ref, pred):
    """Normalised root-mean-square error, `skimage.metrics.normalized_root_mse` default.

    With skimage's default 'euclidean' normalisation, NRMSE = ‖ref − pred‖₂ / ‖ref‖₂ (the paper
    calls it "RMSE"; relative changes of NRMSE and RMSE coincide). `ref` ≡ 0 gives inf (NaN if
    also pred ≡ 0), as skimage's division by zero; gradients stay finite.

    Args:
      ref: [...] reference image (any shape).
      pred: [...] test image, same shape and unit.

    Returns:
      Scalar NRMSE (dimensionless).
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred, ndim=None)
    return _nrmse_impl(ref, pred)


@jax.jit
def _nrmse_impl(ref, pred):
    num = _safe_sqrt(_mean_all(jnp.square(ref - pred)))
    den = _safe_sqrt(_mean_all(jnp.square(ref)))
    pos = den > 0
    ratio = num / jnp.where(pos, den, 1.0)
    return jnp.where(pos, ratio, jnp.where(num > 0, jnp.inf, jnp.nan))


def _bin_edges(values: jax.Array, bins: int) -> jax.Array:
    """`np.histogramdd` edges for one axis: np.linspace(min, max, bins+1) in the data dtype.

    Like NumPy's `_get_outer_edges`, a constant sample uses [v − 0.5, v + 0.5].
    """
    lo = jnp.min(values)
    hi = jnp.max(values)
    flat = lo == hi
    lo, hi = jnp.where(flat, lo - 0.5, lo), jnp.where(flat, hi + 0.5, hi)
    step = (hi - lo) / bins
    edges = jnp.arange(bins + 1, dtype=values.dtype) * step + lo  # NumPy linspace arithmetic
    return edges.at[-1].set(hi)


def _bin_index(values: jax.Array, edges: jax.Array) -> jax.Array:
    """np.histogramdd bin of each value: searchsorted(side='right') − 1, last bin closed."""
    idx = jnp.searchsorted(edges, values, side="right") - 1
    return jnp.where(values == edges[-1], idx - 1, idx)


def _entropy(p: jax.Array) -> jax.Array:
    """scipy.stats.entropy(p) for non-negative weights: −Σ q·ln q with q = p / Σp."""
    q = p / jnp.sum(p)
    return jnp.sum(jax.scipy.special.entr(q))


def nmi(ref, pred, bins: int = NMI_BINS):
    """Normalised mutual information, `skimage.metrics.normalized_mutual_information`.

    NMI = (H(A) + H(B)) / H(A, B) ∈ [1, 2] (Studholme et al. 1999), entropies in nats of a
    joint histogram with `bins`×`bins` bins spanning each image's own [min, max] range; bin
    edges, ties and the closed last bin follow `np.histogramdd` (as called by scikit-image with
    `density=True`, whose bin-width weights are kept). Values exactly on an edge can land in a
    neighbouring bin if the platform rounds `i·step + min` differently from NumPy (never when
    min = 0). Both images constant gives NaN (0/0, as skimage). NMI is piecewise constant in
    the pixel values: its gradient is 0 (inputs are wrapped in `stop_gradient`).

    Args:
      ref: [...] first image (any shape; skimage zero-pads unequal shapes, here shapes must
        match).
      pred: [...] second image, same shape.
      bins: number of bins per axis (static).

    Returns:
      Scalar NMI (dimensionless).
    """
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"`bins` must be a positive integer, got {bins!r}.")
    ref, pred = _as_float_pair("ref", ref, "pred", pred, ndim=None)
    return _nmi_impl(ref, pred, int(bins))


@functools.partial(jax.jit, static_argnames=("bins",))
def _nmi_impl(ref, pred, bins):
    a = jax.lax.stop_gradient(ref).reshape(-1)
    b = jax.lax.stop_gradient(pred).reshape(-1)
    edges_a = _bin_edges(a, bins)
    edges_b = _bin_edges(b, bins)
    flat_index = _bin_index(a, edges_a) * bins + _bin_index(b, edges_b)
    counts = jnp.zeros(bins * bins, jnp.int32).at[flat_index].add(1).reshape(bins, bins)
    # density=True divides each count by its bin area (equal up to rounding of the edges).
    widths_a = jnp.diff(edges_a)
    widths_b = jnp.diff(edges_b)
    hist = counts.astype(a.dtype) / widths_a[:, None] / widths_b[None, :]
    h_a = _entropy(jnp.sum(hist, axis=1))
    h_b = _entropy(jnp.sum(hist, axis=0))
    h_ab = _entropy(hist.reshape(-1))
    pos = h_ab > 0
    return jnp.where(pos, (h_a + h_b) / jnp.where(pos, h_ab, 1.0), jnp.nan)


# --------------------------------------------------------------------------------------------
# Multi-scale SSIM
# --------------------------------------------------------------------------------------------


def ms_ssim_num_scales(
    shape, n_weights: int = len(MS_SSIM_WEIGHTS), win_size: int = SSIM_WIN_SIZE
) -> int:
    """Number of MS-SSIM scales used for an image shape.

    The largest M ≤ n_weights such that the coarsest image, min(H, W) // 2^(M−1) pixels on its
    short side, still holds one win_size×win_size window: 5 for 256×256, 4 for 64×64
    (64 → 32 → 16 → 8), 3 for 37×64, 1 for 7×7 (then MS-SSIM is max(SSIM, 0)).

    Args:
      shape: (H, W) of the full-resolution image.
      n_weights: the number of scale weights available.
      win_size: SSIM window side.

    Returns:
      The number of scales M ≥ 1.
    """
    _check_window(shape, win_size)
    side = min(shape)
    m = 1
    while m < n_weights and side // 2**m >= win_size:
        m += 1
    return m


def _downsample2(x: jax.Array) -> jax.Array:
    """2×2 average pooling, stride 2; an odd last row/column is dropped. [H, W] -> [H//2, W//2]."""
    h, w = x.shape[-2:]
    x = x[..., : 2 * (h // 2), : 2 * (w // 2)]
    return x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def _safe_pow(base: jax.Array, exponent: float) -> jax.Array:
    """max(base, 0) ** exponent with finite gradients at and below 0."""
    pos = base > 0
    return jnp.where(pos, jnp.where(pos, base, 1.0) ** exponent, 0.0)


def ms_ssim(
    ref,
    pred,
    data_range,
    *,
    weights=MS_SSIM_WEIGHTS,
    win_size: int = SSIM_WIN_SIZE,
    k1: float = 0.01,
    k2: float = 0.03,
):
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) with scikit-image's SSIM window.

    MS-SSIM = SSIM_M^{w_M} · Π_{j<M} CS_j^{w_j}, where CS_j is the interior mean of the
    contrast-structure map (2σxy + C2)/(σx² + σy² + C2) at scale j and SSIM_M the interior mean
    SSIM at the coarsest scale (the convention of TensorFlow's `ssim_multiscale` and
    pytorch-msssim), all with the 7×7 uniform window and sample covariance of `ssim`. Scale j+1
    is a 2×2 average pooling of scale j (an odd last row/column is dropped). Negative CS/SSIM
    means are clipped to 0 (the product is then 0), as TensorFlow does.

    Scales: with the standard 5 weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) the coarsest
    scale of an image smaller than 112 pixels on its short side cannot hold the 7×7 window, so
    only the first M = `ms_ssim_num_scales(shape)` scales are used, with weights w_j / Σ_{i≤M} w_i
    (4 scales for 64×64, 5 for 256×256). Not part of the authors' evaluation.

    Args:
      ref: [H, W] reference image, H, W ≥ win_size.
      pred: [H, W] test image, same unit.
      data_range: scalar > 0 in the images' unit; may be traced (the same at every scale).
      weights: per-scale exponents, finest scale first (static).
      win_size: odd window side (static).
      k1, k2: SSIM constants (static).

    Returns:
      Scalar MS-SSIM in [0, 1] (1 for identical images). Symmetric in `ref` and `pred`.
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred)
    _check_data_range(data_range)
    weights = tuple(float(w) for w in weights)
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(
            f"`weights` must be a non-empty sequence of positive numbers, got {weights}."
        )
    _check_window(ref.shape, win_size)
    return _ms_ssim_impl(ref, pred, data_range, weights, win_size, k1, k2)


@functools.partial(jax.jit, static_argnames=("weights", "win_size", "k1", "k2"))
def _ms_ssim_impl(ref, pred, data_range, weights, win_size, k1, k2):
    m = ms_ssim_num_scales(ref.shape, len(weights), win_size)
    total = math.fsum(weights[:m])
    r = (win_size - 1) // 2
    value = jnp.asarray(1.0, ref.dtype)
    x, y = ref, pred
    for j in range(m):
        lum, cs = _ssim_maps(x, y, data_range, win_size, k1, k2)
        h, w = cs.shape
        if j < m - 1:
            stat = _mean2(cs[r : h - r, r : w - r])
            x, y = _downsample2(x), _downsample2(y)
        else:
            stat = _mean2((lum * cs)[r : h - r, r : w - r])
        value = value * _safe_pow(stat, weights[j] / total)
    return value


# --------------------------------------------------------------------------------------------
# The authors' per-slice convention
# --------------------------------------------------------------------------------------------

METRIC_NAMES = ("ssim", "psnr", "nrmse", "nmi", "ms_ssim")
"""Keys of the dicts returned by `slice_metrics` and `batch_slice_metrics`."""


def slice_metrics(ref, pred) -> dict[str, jax.Array]:
    """Metrics of one 2-D slice with the authors' convention (Ki or SUV maps).

    Both images are clipped to [0, max(ref)] and data_range = max(ref) (this slice's maximum);
    then SSIM (skimage defaults), PSNR, NRMSE (Euclidean), NMI (100 bins) and MS-SSIM are
    computed on the clipped pair (see AUTHORS_CODE.md, "Evaluation").

    A degenerate slice, max(ref) ≤ 0 (or NaN), has no data range: every metric is NaN for it
    (callers skip NaN slices, e.g. with `jnp.nanmean`). Inside, such a slice is evaluated with a
    dummy data range of 1, so values and gradients of other slices in a vmapped batch stay
    finite. Identical clipped images give PSNR = +inf (as skimage); NMI is NaN if both clipped
    images are constant (skimage's 0/0). Gradients with respect to `pred` are finite.

    Args:
      ref: [H, W] reference slice (e.g. Ki in 1/min from the 65-min Patlak fit), H, W ≥ 7.
      pred: [H, W] predicted slice, same unit.

    Returns:
      {"ssim", "psnr" (dB), "nrmse", "nmi", "ms_ssim"} → scalars.
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred)
    _check_window(ref.shape, SSIM_WIN_SIZE)
    return _slice_metrics_impl(ref, pred)


@jax.jit
def _slice_metrics_impl(ref, pred):
    data_range = jnp.max(ref)
    valid = data_range > 0
    data_range = jnp.where(valid, data_range, 1.0)
    ref_c = jnp.clip(ref, 0.0, data_range)
    pred_c = jnp.clip(pred, 0.0, data_range)
    values = {
        "ssim": ssim(ref_c, pred_c, data_range),
        "psnr": psnr(ref_c, pred_c, data_range),
        "nrmse": nrmse(ref_c, pred_c),
        "nmi": nmi(ref_c, pred_c, NMI_BINS),
        "ms_ssim": ms_ssim(ref_c, pred_c, data_range),
    }
    return {k: jnp.where(valid, v, jnp.nan) for k, v in values.items()}


def batch_slice_metrics(ref, pred, mask=None) -> dict[str, jax.Array]:
    """`slice_metrics` for a batch of slices (jax.vmap over the first axis).

    The per-slice core is compiled once per slice shape; wrapping the call in `jax.jit` also
    works (e.g. `jax.jit(batch_slice_metrics)(ref, pred)`). Memory is O(B·H·W).

    Args:
      ref: [B, H, W] reference slices.
      pred: [B, H, W] predicted slices, same unit.
      mask: optional [B] booleans, False for slices to leave out (e.g. batch padding); they
        get NaN like degenerate slices.

    Returns:
      {"ssim", "psnr", "nrmse", "nmi", "ms_ssim"} → [B] arrays, NaN for degenerate or masked
      slices. Summaries over slices should skip NaN (`jnp.nanmean`).
    """
    ref, pred = _as_float_pair("ref", ref, "pred", pred, ndim=3)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != ref.shape[:1] or mask.dtype != jnp.bool_:
            raise ValueError(
                f"`mask` must be a boolean array of shape {ref.shape[:1]}, got "
                f"{mask.dtype}{list(mask.shape)}."
            )
    out = jax.vmap(slice_metrics)(ref, pred)
    if mask is not None:
        out = {k: jnp.where(mask, v, jnp.nan) for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


class RelativeChange(NamedTuple):
    """Percent change of a method against a baseline.

    Attributes:
      percent: 100·(method − baseline)/|baseline| (NaN where baseline = 0), signed as in the
        paper's tables (SSIM +2.27 %, PSNR +7.04 %, RMSE −16.3 %).
      improved: whether the change is in the good direction (percent > 0 when higher is
        better, < 0 otherwise).
    """

    percent: np.ndarray
    improved: np.ndarray


def relative_change(method, baseline, higher_is_better: bool) -> RelativeChange:
    """Percent change of a metric from a baseline to a method (host-side, NumPy).

    Pass summary values (e.g. means over slices with NaN slices skipped) or arrays of them.

    Args:
      method: scalar or [...] metric value(s) of the method.
      baseline: scalar or [...] metric value(s) of the baseline, broadcastable with `method`.
      higher_is_better: True for SSIM, PSNR, NMI, MS-SSIM; False for NRMSE.

    Returns:
      RelativeChange(percent, improved), float64 / bool NumPy arrays (0-d for scalars).
    """
    method = np.asarray(method, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    nonzero = baseline != 0
    percent = np.where(
        nonzero, 100.0 * (method - baseline) / np.where(nonzero, np.abs(baseline), 1.0), np.nan
    )
    improved = percent > 0 if higher_is_better else percent < 0
    return RelativeChange(percent=percent, improved=np.asarray(improved))
