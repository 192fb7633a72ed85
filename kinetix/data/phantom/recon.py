"""Image formation for the simulator: PSF, noise models, parallel-beam projector, MLEM / OSEM.

Used by `kinetix.data.phantom`:

- **PSF**: a Gaussian of the given FWHM integrated over each pixel (`psf_kernel`), so that
  blurring a piecewise-constant image and sampling at pixel centres is exact. Applied as a
  separable matrix product along the two image axes (zero outside the field of view).
- **Image-domain noise** (`image_noise`): Gaussian noise with the decay- and duration-aware
  std σ_m = s·√(C_m·e^{−λ t_m}/Δ_m)·e^{λ t_m}, PSF-correlated, std exactly σ_m in a uniform region.
- **Projection-domain noise** (`projection_noise`): a dense parallel-beam system matrix
  (`parallel_beam_system`, built once per geometry in NumPy by sub-pixel splatting with linear
  interpolation onto detector bins),
  Poisson sampling of the sinogram with a uniform randoms + scatter background, and an MLEM
  (`mlem`) or OSEM (`osem`) reconstruction with the background in the forward model. No
  attenuation: the data are as if attenuation-corrected perfectly, with the stated count levels
  being the detected events.

Conventions: images `[H, W]` are flattened row-major to `[P = H·W]`; sinograms are `[R]` with
R = n_angles·n_bins, angle-major (row = angle·n_bins + bin). Every column of the system matrix
for a pixel inside the circular field of view sums to 1 (each emitted-and-detected count lands
in exactly one bin), pixels outside it have empty columns and are never reconstructed. All
reconstruction functions broadcast over leading batch axes and are pure JAX (jit-safe).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.kinetics.frames import FrameSchedule

_EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# PSF
# ------------------------------------------------------------------------------------------------
def psf_kernel(fwhm_px: float, radius: int | None = None) -> np.ndarray:
    """1-D Gaussian PSF integrated over unit pixels: g_k = Φ((k+½)/σ) − Φ((k−½)/σ).

    Args:
      fwhm_px: full width at half maximum in pixels (≥ 0; 0 gives the identity kernel).
      radius: half-width of the kernel in pixels; default ⌈4σ⌉ + 1.

    Returns:
      [2·radius + 1] float64 weights summing to 1 (offsets −radius..radius).
    """
    if not fwhm_px >= 0:
        raise ValueError(f"fwhm_px must be >= 0, got {fwhm_px}.")
    sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    if radius is None:
        radius = int(math.ceil(4.0 * sigma)) + 1
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    if sigma == 0:
        return (k == 0).astype(np.float64)
    cdf = lambda x: 0.5 * (1.0 + np.array([math.erf(v / (sigma * math.sqrt(2.0))) for v in x]))
    g = cdf(k + 0.5) - cdf(k - 0.5)
    return g / g.sum()


@functools.lru_cache(maxsize=16)
def _blur_matrix_cached(n: int, fwhm_px: float) -> np.ndarray:
    g = psf_kernel(fwhm_px)
    r = (g.size - 1) // 2
    m = np.zeros((n, n), np.float64)
    for off, w in zip(range(-r, r + 1), g, strict=True):
        m += w * np.eye(n, k=off)
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


def blur_matrix(n: int, fwhm_px: float) -> np.ndarray:
    """[n, n] matrix B with (B @ x)_i = Σ_k g_k x_{i+k} (zero outside 0..n−1); see `psf_kernel`."""
    return _blur_matrix_cached(int(n), float(fwhm_px))


def blur(images, fwhm_px: float):
    """Blur images along their first two axes with the pixel-integrated Gaussian PSF.

    Args:
      images: [H, W, ...] (any trailing axes, e.g. slices and frames).
      fwhm_px: PSF FWHM in pixels.

    Returns:
      [H, W, ...] blurred images (same dtype family, float32 by default).
    """
    images = jnp.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"blur needs images with at least 2 axes [H, W, ...], got {images.shape}.")
    bh = jnp.asarray(blur_matrix(images.shape[0], fwhm_px))
    bw = jnp.asarray(blur_matrix(images.shape[1], fwhm_px))
    out = jnp.tensordot(bh, images, axes=(1, 0))  # [H, W, ...]
    out = jnp.tensordot(bw, jnp.moveaxis(out, 1, 0), axes=(1, 0))  # [W, H, ...]
    return jnp.moveaxis(out, 0, 1)


def noise_variance_factor(fwhm_px: float) -> float:
    """Σ_ij (g_i g_j)² : variance of unit white noise after `blur` (2-D, away from edges)."""
    g = psf_kernel(fwhm_px)
    return float(np.sum(g**2) ** 2)


# ------------------------------------------------------------------------------------------------
# Projector
# ------------------------------------------------------------------------------------------------
def fov_mask(size: int) -> np.ndarray:
    """[size, size] bool: pixel centres inside the inscribed circle (the scanner's FOV)."""
    c = (np.arange(size) - (size - 1) / 2.0) ** 2
    return (c[:, None] + c[None, :]) <= (size / 2.0) ** 2


@functools.lru_cache(maxsize=4)
def _system_cached(size: int, n_angles: int, oversample: int) -> np.ndarray:
    n_bins = size
    n_pix = size * size
    centre = (size - 1) / 2.0
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5  # sub-pixel offsets in (−½, ½)
    x = (ii.reshape(-1, 1, 1) - centre) + sub.reshape(1, -1, 1)  # [P, ov, 1], axis 0 = x
    y = (jj.reshape(-1, 1, 1) - centre) + sub.reshape(1, 1, -1)  # [P, 1, ov], axis 1 = y
    x, y = np.broadcast_arrays(x, y)
    x = x.reshape(n_pix, -1)
    y = y.reshape(n_pix, -1)
    inside = fov_mask(size).reshape(-1)
    pix = np.broadcast_to(np.arange(n_pix)[:, None], x.shape)
    w_sub = 1.0 / (oversample * oversample * n_angles)
    system = np.zeros((n_angles, n_bins, n_pix), np.float64)
    for a in range(n_angles):
        theta = np.pi * a / n_angles
        s = x * math.cos(theta) + y * math.sin(theta) + (n_bins - 1) / 2.0  # bin coordinate
        lo = np.floor(s).astype(np.int64)
        frac = s - lo
        for b, w in ((lo, 1.0 - frac), (lo + 1, frac)):
            ok = (b >= 0) & (b < n_bins)
            flat = b[ok] * n_pix + pix[ok]
            system[a] += np.bincount(flat, weights=w[ok] * w_sub, minlength=n_bins * n_pix).reshape(
                n_bins, n_pix
            )
    system[:, :, ~inside] = 0.0
    # Sub-samples near the FOV edge may fall off the outer bins: renormalise each column to 1.
    col = system.sum(axis=(0, 1))
    system[:, :, inside] /= col[inside]
    out = system.reshape(n_angles * n_bins, n_pix).astype(np.float32)
    out.setflags(write=False)
    return out


def parallel_beam_system(size: int, n_angles: int, oversample: int = 4) -> np.ndarray:
    """Dense parallel-beam system matrix for a `size`×`size` image.

    Angles θ_a = π·a/n_angles, `size` detector bins of one pixel width centred on the image
    centre; bin coordinate s = x·cos θ + y·sin θ with x along image axis 0 and y along axis 1.
    Each pixel is split into oversample² points, each spread linearly onto the two nearest bins.

    Args:
      size: image matrix (pixels per side).
      n_angles: number of projection angles over [0, π).
      oversample: sub-samples per pixel side.

    Returns:
      [n_angles·size, size²] float32, read-only; columns sum to 1 inside `fov_mask(size)`, 0
      outside. Memory: 4·n_angles·size³ bytes (64 MiB at 64² with 64 angles). Cached.
    """
    if size < 4 or n_angles < 1 or oversample < 1:
        raise ValueError(
            f"parallel_beam_system needs size >= 4, n_angles >= 1, oversample >= 1; got {size}, "
            f"{n_angles}, {oversample}."
        )
    return _system_cached(int(size), int(n_angles), int(oversample))


# ------------------------------------------------------------------------------------------------
# Reconstruction
# ------------------------------------------------------------------------------------------------
def _flatten_batch(sinogram, background):
    sinogram = jnp.asarray(sinogram, jnp.result_type(jnp.asarray(sinogram).dtype, jnp.float32))
    lead = sinogram.shape[:-1]
    y = sinogram.reshape(-1, sinogram.shape[-1])  # [B, R]
    b = jnp.broadcast_to(jnp.asarray(background, y.dtype), sinogram.shape).reshape(y.shape)
    return y, b, lead


def _initial_image(y, b, sens, init, lead):
    if init is not None:
        return jnp.asarray(init, y.dtype).reshape(y.shape[0], -1)
    net = jnp.maximum(jnp.sum(y - b, axis=-1, keepdims=True), 0.0)  # [B, 1] true counts
    support = (sens > 0).astype(y.dtype)[None, :]  # [1, P]
    return net / jnp.sum(sens) * support


def _em_update(x, y, b, system, sens):
    """One EM update x ← x / sens · Aᵀ(y / (A x + b)); x [B, P], y, b [B, R]."""
    expected = x @ system.T + b
    ratio = jnp.where(expected > 0, y / jnp.maximum(expected, _EPS), 0.0)
    back = ratio @ system
    pos = sens > 0
    return jnp.where(pos[None, :], x * back / jnp.where(pos, sens, 1.0)[None, :], 0.0)


def mlem(sinogram, system, background, n_iter: int, init=None):
    """Maximum-likelihood EM reconstruction (Shepp & Vardi 1982) with an additive background.

        x ← x / (Aᵀ1) · Aᵀ( y / (A x + b) )

    Args:
      sinogram: [..., R] measured counts (Poisson, non-negative).
      system: [R, P] system matrix A (e.g. `parallel_beam_system`).
      background: [..., R] or broadcastable: expected randoms + scatter counts b per bin.
      n_iter: number of iterations (≥ 0).
      init: optional [..., P] positive starting image; default a uniform image on the pixels
        with non-zero sensitivity that preserves Σ(y − b).

    Returns:
      [..., P] image in counts per pixel (same units as A's columns: expected detected counts).
    """
    if int(n_iter) < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}.")
    system = jnp.asarray(system)
    y, b, lead = _flatten_batch(sinogram, background)
    if y.shape[-1] != system.shape[0]:
        raise ValueError(
            f"sinogram has {y.shape[-1]} bins but the system matrix has {system.shape[0]} rows."
        )
    system = system.astype(y.dtype)
    sens = jnp.sum(system, axis=0)  # [P]
    x0 = _initial_image(y, b, sens, init, lead)
    x = jax.lax.fori_loop(0, int(n_iter), lambda _, x: _em_update(x, y, b, system, sens), x0)
    return x.reshape(lead + (system.shape[1],))


def osem(sinogram, system, background, n_iter: int, n_subsets: int, n_angles: int, init=None):
    """Ordered-subsets EM (Hudson & Larkin 1994): MLEM updates on interleaved angle subsets.

    Subset k holds angles a with a mod n_subsets = k; one iteration visits every subset once.
    With n_subsets = 1 this is `mlem`.

    Args:
      sinogram: [..., R] counts, R = n_angles·n_bins, angle-major.
      system: [R, P] system matrix.
      background: [..., R] (or broadcastable) background counts per bin.
      n_iter: full iterations (≥ 0).
      n_subsets: number of subsets; must divide n_angles.
      n_angles: projection angles in the sinogram.
      init: optional [..., P] starting image.

    Returns:
      [..., P] image (counts per pixel).
    """
    n_iter, n_subsets, n_angles = int(n_iter), int(n_subsets), int(n_angles)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}.")
    if n_subsets < 1 or n_angles % n_subsets:
        raise ValueError(f"n_subsets = {n_subsets} must be >= 1 and divide n_angles = {n_angles}.")
    system = jnp.asarray(system)
    y, b, lead = _flatten_batch(sinogram, background)
    n_rays, n_pix = system.shape
    if y.shape[-1] != n_rays or n_rays % n_angles:
        raise ValueError(
            f"sinogram has {y.shape[-1]} bins and the system matrix {n_rays} rows; both must be "
            f"n_angles·n_bins with n_angles = {n_angles}."
        )
    n_bins = n_rays // n_angles
    per = n_angles // n_subsets

    def split(v):  # [..., R] -> [S, ..., R / S] (angle a = j·S + k goes to subset k)
        v = v.reshape(v.shape[:-1] + (per, n_subsets, n_bins))
        v = jnp.moveaxis(v, -2, 0)
        return v.reshape(v.shape[:-2] + (per * n_bins,))

    system = system.astype(y.dtype)
    a_sub = split(system.T)  # [S, P, R/S]
    a_sub = jnp.swapaxes(a_sub, 1, 2)  # [S, R/S, P]
    y_sub, b_sub = split(y), split(b)  # [S, B, R/S]
    sens_sub = jnp.sum(a_sub, axis=1)  # [S, P]
    x0 = _initial_image(y, b, jnp.sum(system, axis=0), init, lead)

    def one_iter(_, x):
        def body(x, sub):
            a, yy, bb, ss = sub
            return _em_update(x, yy, bb, a, ss), None

        x, _ = jax.lax.scan(body, x, (a_sub, y_sub, b_sub, sens_sub))
        return x

    x = jax.lax.fori_loop(0, n_iter, one_iter, x0)
    return x.reshape(lead + (n_pix,))


def poisson_loglik(sinogram, expected):
    """Poisson log-likelihood Σ y·log ȳ − ȳ (without the log y! term) over the last axis.

    Args:
      sinogram: [..., R] counts y.
      expected: [..., R] expected counts ȳ = A x + b (≥ 0).

    Returns:
      [...] log-likelihood.
    """
    y = jnp.asarray(sinogram)
    ybar = jnp.asarray(expected)
    term = jnp.where(y > 0, y * jnp.log(jnp.maximum(ybar, _EPS)), 0.0)
    return jnp.sum(term - ybar, axis=-1)


# ------------------------------------------------------------------------------------------------
# Noise models
# ------------------------------------------------------------------------------------------------
def image_noise_sigma(clean, schedule: FrameSchedule, noise_scale, decay_constant: float):
    """σ_m = s·√(C_m·e^{−λ t_m}/Δ_m)·e^{λ t_m}, t_m the mid-time and Δ_m the duration (min).

    Args:
      clean: [..., T] noise-free decay-corrected frame values C (SUV; negatives count as 0).
      schedule: frame schedule with T frames.
      noise_scale: s (√(SUV·min)).
      decay_constant: λ (1/min).

    Returns:
      [..., T] noise std (SUV).
    """
    lam = float(decay_constant)
    gain = np.exp(lam * schedule.mid) / schedule.duration  # e^{−λt}/Δ · (e^{λt})²
    gain = jnp.asarray(gain, jnp.result_type(jnp.asarray(clean).dtype, jnp.float32))
    gain = jnp.reshape(gain, (1,) * (jnp.ndim(clean) - 1) + gain.shape)
    return noise_scale * jnp.sqrt(jnp.maximum(clean, 0.0) * gain)


def image_noise(key, clean, schedule: FrameSchedule, noise_scale, fwhm_px: float, decay_constant):
    """Image-domain noise: Gaussian, PSF-correlated, with std σ_m in a uniform region.

    White noise of std σ_m(C)/√(Σg²) (σ_m from `image_noise_sigma` at the local PSF-blurred value
    C, Σg² = `noise_variance_factor(fwhm_px)`) is blurred with the PSF and added to `clean`, so the
    final noise has std σ_m and the PSF's correlation. Values may become negative (no clipping).

    Args:
      key: jax.random key.
      clean: [X, Y, ..., T] PSF-blurred noise-free frames (SUV).
      schedule: frame schedule with T frames.
      noise_scale: s (√(SUV·min)).
      fwhm_px: PSF FWHM (pixels).
      decay_constant: λ (1/min).

    Returns:
      [X, Y, ..., T] noisy frames.
    """
    clean = jnp.asarray(clean)
    sigma = image_noise_sigma(clean, schedule, noise_scale, decay_constant)
    white = jax.random.normal(key, clean.shape, clean.dtype)
    scale = 1.0 / math.sqrt(noise_variance_factor(fwhm_px))
    return clean + blur(sigma * white * scale, fwhm_px)


def projection_noise(
    key,
    activity,
    schedule: FrameSchedule,
    total_counts,
    system,
    *,
    n_angles: int,
    n_iter: int,
    n_subsets: int,
    background_fraction: float,
    fwhm_px: float,
    decay_constant: float,
):
    """Projection-domain noise: Poisson sinograms with background, OSEM, PSF post-filter.

    Expected true counts of pixel j in frame m: κ·x_jm·Δ_m/f_m (x decay-corrected SUV, f_m the
    decay-correction factor, so Δ_m/f_m = ∫ e^{−λτ} dτ over the frame, min). κ is set so that the
    mean over slices of the scan's prompts, trues/(1 − background_fraction), is `total_counts`.
    Randoms + scatter: uniform over the sinogram, `background_fraction` of each frame's prompts,
    and known to the reconstruction. OSEM images (counts) are divided by κ·Δ_m/f_m (back to
    decay-corrected SUV) and blurred with the PSF. No attenuation (see the module docstring).

    Args:
      key: jax.random key.
      activity: [X, Y, S, T] true voxel frames (SUV, unblurred), X·Y = system columns.
      schedule: frame schedule with T frames.
      total_counts: mean prompts per slice over the scan.
      system: [R, X·Y] system matrix (`parallel_beam_system(X, n_angles)`).
      n_angles, n_iter, n_subsets: sinogram angles and OSEM settings (1 subset = MLEM).
      background_fraction: randoms + scatter fraction of the prompts, in [0, 1).
      fwhm_px: PSF FWHM of the post-filter (pixels).
      decay_constant: λ (1/min).

    Returns:
      (frames [X, Y, S, T] SUV, prompts [S, T] measured counts per slice and frame).
    """
    nx, ny, ns, nt = activity.shape
    weight = schedule.duration / schedule.decay_factors(decay_constant)  # [T] Δ/f (min)
    x = jnp.moveaxis(jnp.reshape(activity, (nx * ny, ns, nt)), 0, -1)  # [S, T, P]
    x = x * jnp.asarray(weight, x.dtype)[None, :, None]
    proj = x @ jnp.asarray(system, x.dtype).T  # [S, T, R]
    bgf = float(background_fraction)
    kappa = total_counts * (1.0 - bgf) / jnp.mean(jnp.sum(proj, axis=(1, 2)))
    trues = kappa * proj
    background = jnp.sum(trues, axis=-1, keepdims=True) * (bgf / (1.0 - bgf) / system.shape[0])
    counts = jax.random.poisson(key, trues + background).astype(x.dtype)  # [S, T, R]
    image = osem(counts, system, background, n_iter, n_subsets, n_angles)  # [S, T, P]
    image = image / (kappa * jnp.asarray(weight, image.dtype))[None, :, None]
    image = jnp.reshape(jnp.moveaxis(image, -1, 0), (nx, ny, ns, nt))
    return blur(image, fwhm_px), jnp.sum(counts, axis=-1)
