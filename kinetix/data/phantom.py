"""Built-in simulator of realistic 2-D dynamic FDG PET thorax cohorts with ground truth.

One subject = `cfg.slices` axial 2-D slices through an analytic (ellipse-based) thorax, the 2TCM
parameters of every voxel, a Feng-type plasma input with its whole-blood curve, noise-free and
noisy frames on `cfg.schedule`, and the true voxel-level Ki. Everything is deterministic for a
given seed: anatomy, kinetics and the input function are drawn with a NumPy `Generator`, the
noise with `jax.random` keys, both derived from (seed, subject index).

Pipeline (`simulate_subject`):

1. Anatomy (`draw_anatomy`, `thorax_labels`): body ellipse (size scales with body weight), chest
   wall muscle band under subcutaneous fat, paraspinal muscles, two lungs, heart (myocardium
   ring around the left-ventricle blood pool), descending aorta, vertebral body (cortical bone +
   marrow) with its posterior element, the liver dome in the lower slices and 1–4 lung nodules
   (benign or malignant, spheres, drawn inside the lungs). `slice_position` ∈ [0, 1] runs from
   the lung apex (0) to the upper abdomen (1); a subject's slices are evenly spaced in
   `cfg.slice_range`, so they differ consistently (apex, heart, liver dome).
   Tissue fraction: 1 in every body voxel except lung parenchyma (≈ 0.2–0.3 tissue, the rest
   air, denser posteriorly); 0 outside the body.
2. Kinetics (`draw_subject_kinetics`): per-tissue nominal (fv, K1, k2, k3, k4) in `TISSUES`,
   per-subject lognormal variation, ±10 % smooth within-organ variation (a low-frequency 3-D
   random field, consistent across slices), clipped to `PARAM_BOUNDS`. Blood (LV cavity,
   aorta) has fv = 1. Nodules get their own draws (malignant Ki 0.02–0.08 /min, benign
   0.003–0.012 /min).
3. Input (`draw_input`): Feng model-2 plasma curve in SUV around `kk.FENG_FDG`, whole blood
   from the KMAP ratio Cp/C_WB = 0.386·e^{−0.191 t} + 1.165, sampled on a nonuniform grid
   (0–70 min, fine around the bolus) as a `kk.SampledInput`.
4. Frames: voxel value = tissue fraction × `kk.pet_frames(params, plasma, schedule, blood=wb)`
   (air contributes nothing). `noisefree` is that (true voxel activity, no blur);
   `noisefree_psf` is blurred by the Gaussian PSF (`psf_fwhm_mm`), the expectation of `frames`.
5. Noise (`kinetix.data.recon`), scaled with the subject's injected MBq/kg: `"image"`
   (`recon.image_noise`: Gaussian, σ ∝ √(C/Δ)), `"projection"` (`recon.projection_noise`:
   Poisson sinograms with randoms + scatter, OSEM, PSF post-filter) or `"none"`.

Count levels (projection noise, 20 M prompts per slice over the scan): a 300-s late frame gets
≈ 1.0 M (0.5–2.0 M by slice), less than the 1.5–1.8 M quoted with 20 M in KINETICS.md: in a
thorax slice the activity falls with the blood curve after the first minutes (a brain slice's
rises), so the late frames hold ≈ 5 % of the scan's counts each, not 8 %.

True Ki (ARCHITECTURE.md): ki_true = (1 − fv)·K1·k3/(k2 + k3)·fraction, the uptake that Patlak
on the noise-free voxel curve estimates up to Patlak's own bias (k4 > 0, early t*).

Units: time in minutes, activity in SUV (g/mL), lengths in mm. Arrays are `[X, Y, Z(, T)]` in
RAS voxel order: axis 0 runs from the patient's right to left, axis 1 from posterior to
anterior, axis 2 (slices) from inferior to superior; `affine` maps voxel indices to mm.
"""

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import kinetix.kinetics as kk
from kinetix.data import recon

LABELS = {
    "background": 0,
    "soft_tissue": 1,
    "muscle": 2,
    "lung": 3,
    "liver": 4,
    "myocardium": 5,
    "blood_pool": 6,
    "aorta": 7,
    "bone": 8,
    "marrow": 9,
    "nodule_benign": 10,
    "nodule_malignant": 11,
}
"""Label ids of the tissue map. `blood_pool` is the left-ventricle cavity."""

TISSUES = {
    # name: (fv, K1, k2, k3, k4). Source: the XCAT table of shared/reference/KINETICS.md, with
    # the changes noted; with the default input these give late (60 min) SUVs of about
    # soft 0.8, muscle 1.1, lung tissue 2.6 (voxel ≈ 0.6), liver 2.8, marrow 1.8, myocardium 4.
    "soft_tissue": (0.029, 0.047, 0.325, 0.015, 0.0),  # XCAT k3 0.084 gives SUV 2.4: too hot
    "muscle": (0.019, 0.035, 0.15, 0.015, 0.0),  # resting muscle; XCAT (Ki 0.083) gives SUV 19
    "lung": (0.151, 0.114, 0.291, 0.025, 0.0),  # tissue level (× fraction); XCAT k3 0.036
    "liver": (0.165, 1.256, 1.329, 0.008, 0.010),  # XCAT k3 0.020, k4 0 give SUV 5.3
    "myocardium": (0.25, 0.196, 1.022, 0.149, 0.0),  # XCAT vB 0.545 includes spill-over
    "blood_pool": (1.0, 0.047, 0.325, 0.015, 0.0),  # fv = 1: rates are irrelevant
    "aorta": (1.0, 0.047, 0.325, 0.015, 0.0),
    "bone": (0.02, 0.02, 0.2, 0.01, 0.0),  # cortical bone
    "marrow": (0.05, 0.10, 0.25, 0.012, 0.005),  # XCAT bone/marrow (Ki 0.037) gives SUV 9
}
"""Nominal per-tissue 2TCM parameters (fv, K1 mL/min/mL, k2, k3, k4 1/min)."""

SUBJECT_LOG_SD = np.array([0.2, 0.2, 0.15, 0.25, 0.3])
"""Per-subject lognormal spread of (fv, K1, k2, k3, k4) around the nominal values."""

MYOCARDIUM_K3_LOG_SD = 0.6
"""Myocardial glucose use varies a lot between (fasting) patients."""

FIELD_LOG_SD = 0.1
"""Within-organ variation: parameters × exp(0.1·field), field a unit-variance smooth field."""

PARAM_BOUNDS = np.array([1.0, 2.0, 3.0, 1.0, 0.2])
"""Upper bounds of (fv, K1, k2, k3, k4); lower bounds are 0 (fv, k4) and 1e-4 (rates)."""

FENG_SUV_SCALE = 2.0 / 11.2344
"""SUV per FENG_FDG unit: scales Feng's tail (A2, A3) so that nominal plasma at 60 min is 2.0 SUV
(whole blood ≈ 1.7 SUV, typical of the mediastinal blood pool at 1 h)."""

BOLUS_GAIN = 3.0
"""Extra factor on Feng's A1 (the bolus term): Feng's curve peaks at only ≈ 9× its 60-min value,
a modern bolus injection at 30–50×. With it the nominal peak is ≈ 45 SUV (≈ 30–80 drawn)."""

REFERENCE_DOSE_PER_KG = 4.25
"""MBq/kg at which `counts_per_slice` and `noise_scale` hold; other subjects scale by it."""


def kmap_plasma_to_blood_ratio(t):
    """Cp/C_WB = 0.386·e^{−0.191 t} + 1.165 (KMAP), t in min (any shape)."""
    return 0.386 * np.exp(-0.191 * np.asarray(t, np.float64)) + 1.165


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Static settings of a simulated cohort (hashable, usable as a jit static argument).

    Attributes:
      size: image matrix (pixels per side).
      fov_mm: transaxial field of view (mm); pixel size = fov_mm / size (7.8 mm at 64).
      slices: slices per subject.
      slice_range: (first, last) slice position in [0, 1] (0 = lung apex, 1 = upper abdomen).
      thorax_length_mm: apex-to-abdomen distance covered by slice positions 0..1.
      schedule: frame schedule (min).
      decay_constant: λ (1/min) for decay weighting and count rates.
      noise: "image", "projection" or "none".
      noise_scale: s of the image-domain model σ_m = s·√(C_m e^{λ t_m}/Δ_m) (√(SUV·min)); the
        std of the final (PSF-smoothed) noise in a uniform region at REFERENCE_DOSE_PER_KG.
        Calibration (64², 8 subjects, per-slice skimage metrics of 30-min vs 65-min Patlak Ki,
        clipped to [0, max ref]): s = 0.5 gives PSNR ≈ 23.7 dB (SSIM ≈ 0.78), near the paper's
        ≈ 22 dB; s = 0.25 ≈ 27.3 dB; projection noise at 20 M counts ≈ 28.3 dB (SSIM ≈ 0.86).
      counts_per_slice: prompts per slice over the whole scan at REFERENCE_DOSE_PER_KG, mean
        over a subject's slices (projection noise).
      background_fraction: randoms + scatter fraction of the prompts (uniform on the sinogram).
      psf_fwhm_mm: Gaussian PSF FWHM (mm).
      n_angles: projection angles (default: `size`).
      recon_iterations, recon_subsets: OSEM iterations and subsets (subsets divide n_angles;
        1 subset is MLEM).
      weight_kg_range: body weight, uniform (kg).
      dose_per_kg_range: injected MBq/kg, uniform; the dose is clipped to `dose_mbq_range`.
      dose_mbq_range: injected activity limits (MBq).
      nodules_range: (min, max) lung nodules per subject.
      malignant_probability: probability that a nodule is malignant.
      input_end_min, input_samples: sampling grid of the blood curves (0..end, K samples).
    """

    size: int = 64
    fov_mm: float = 500.0
    slices: int = 8
    slice_range: tuple[float, float] = (0.1, 0.95)
    thorax_length_mm: float = 240.0
    schedule: kk.FrameSchedule = kk.PAPER_SCHEDULE
    decay_constant: float = kk.F18_DECAY_CONSTANT
    noise: str = "image"
    noise_scale: float = 0.5
    counts_per_slice: float = 20e6
    background_fraction: float = 0.2
    psf_fwhm_mm: float = 5.5
    n_angles: int | None = None
    recon_iterations: int = 4
    recon_subsets: int = 16
    weight_kg_range: tuple[float, float] = (50.0, 90.0)
    dose_per_kg_range: tuple[float, float] = (3.5, 5.0)
    dose_mbq_range: tuple[float, float] = (200.0, 410.0)
    nodules_range: tuple[int, int] = (1, 4)
    malignant_probability: float = 0.5
    input_end_min: float = 70.0
    input_samples: int = 150

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SimulationConfig: {msg}")

        if self.size < 16:
            bad(f"size must be >= 16 pixels, got {self.size}.")
        if self.slices < 1:
            bad(f"slices must be >= 1, got {self.slices}.")
        lo, hi = self.slice_range
        if not 0.0 <= lo <= hi <= 1.0:
            bad(f"slice_range must satisfy 0 <= first <= last <= 1, got {self.slice_range}.")
        if self.noise not in ("image", "projection", "none"):
            bad(f"noise must be 'image', 'projection' or 'none', got {self.noise!r}.")
        if self.noise_scale < 0 or self.counts_per_slice <= 0:
            bad("noise_scale must be >= 0 and counts_per_slice > 0.")
        if not 0.0 <= self.background_fraction < 1.0:
            bad(f"background_fraction must lie in [0, 1), got {self.background_fraction}.")
        if self.psf_fwhm_mm < 0 or self.fov_mm <= 0 or self.thorax_length_mm <= 0:
            bad("psf_fwhm_mm must be >= 0 and fov_mm, thorax_length_mm > 0.")
        if self.angles % self.recon_subsets or self.recon_iterations < 0:
            bad(
                f"recon_subsets = {self.recon_subsets} must divide n_angles = {self.angles} "
                "and recon_iterations must be >= 0."
            )
        n0, n1 = self.nodules_range
        if not 0 <= n0 <= n1:
            bad(f"nodules_range must satisfy 0 <= min <= max, got {self.nodules_range}.")
        if self.input_end_min < float(self.schedule.end[-1]) or self.input_samples < 16:
            bad("the blood sampling grid must cover the scan and have >= 16 samples.")

    @property
    def pixel_mm(self) -> float:
        """Pixel size (mm)."""
        return self.fov_mm / self.size

    @property
    def angles(self) -> int:
        return self.size if self.n_angles is None else int(self.n_angles)

    @property
    def fwhm_px(self) -> float:
        """PSF FWHM in pixels."""
        return self.psf_fwhm_mm / self.pixel_mm

    @property
    def slice_positions(self) -> np.ndarray:
        """[S] slice positions, index 0 the most inferior (z increases with the index)."""
        lo, hi = self.slice_range
        return np.linspace(hi, lo, self.slices) if self.slices > 1 else np.array([0.5 * (lo + hi)])

    @property
    def slice_spacing_mm(self) -> float:
        """Distance between neighbouring slices (mm); the slice thickness in the affine."""
        if self.slices == 1:
            return self.pixel_mm
        lo, hi = self.slice_range
        return max((hi - lo) * self.thorax_length_mm / (self.slices - 1), 1e-3)

    def z_mm(self, slice_position) -> np.ndarray:
        """Axial coordinate (mm, superior positive) of a slice position."""
        return -np.asarray(slice_position, np.float64) * self.thorax_length_mm

    def affine(self) -> np.ndarray:
        """[4, 4] voxel-to-RAS (mm) affine of the [X, Y, Z] arrays, centred transaxially."""
        c = (self.size - 1) / 2.0
        aff = np.diag([self.pixel_mm, self.pixel_mm, self.slice_spacing_mm, 1.0])
        z0 = float(self.z_mm(self.slice_positions[0]))
        aff[:3, 3] = [-c * self.pixel_mm, -c * self.pixel_mm, z0]
        return aff


# ------------------------------------------------------------------------------------------------
# Smooth random fields
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SmoothField:
    """Unit-variance low-frequency 3-D random field f(r) = √(2/K)·Σ_k cos(ω_k·r + φ_k).

    Attributes:
      omega: [K, 3] wave vectors (rad/mm), wavelengths between 60 and 250 mm.
      phase: [K] phases (rad).
    """

    omega: np.ndarray
    phase: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_modes: int = 16) -> "SmoothField":
        direction = rng.normal(size=(n_modes, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(60.0, 250.0, size=(n_modes, 1))
        return cls(2.0 * np.pi * direction / wavelength, rng.uniform(0, 2 * np.pi, n_modes))

    def __call__(self, coords: np.ndarray) -> np.ndarray:
        """Field at coords [..., 3] (mm) -> [...], clipped to ±2.5."""
        arg = coords @ self.omega.T + self.phase
        value = math.sqrt(2.0 / self.phase.size) * np.sum(np.cos(arg), axis=-1)
        return np.clip(value, -2.5, 2.5)


# ------------------------------------------------------------------------------------------------
# Anatomy
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Nodule:
    """A spherical lung nodule: centre (x, y, z) in mm (RAS), radius in mm."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    malignant: bool


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Subject-level geometry (mm; body-frame x to the patient's left, y anterior)."""

    a: float  # body lateral semi-axis
    b: float  # body antero-posterior semi-axis
    centre: tuple[float, float]
    rotation: float  # rad
    fat_mm: float
    muscle_mm: float
    lung_u: tuple[float, float]  # right, left lung centre |x| / a
    lung_v: float
    lung_axes: tuple[float, float]  # semi-axes / (a, b)
    dome: float  # slice position where the liver dome starts
    heart_centre: tuple[float, float]  # / (a, b)
    heart_axes: tuple[float, float]  # mm
    heart_angle: float
    heart_range: tuple[float, float]  # slice positions
    wall_mm: float
    aorta: tuple[float, float, float]  # x, y (mm, body frame), radius
    spine: tuple[float, float, float]  # x, y, radius
    lung_fraction: float
    lung_field: SmoothField
    nodules: tuple[Nodule, ...] = ()


def _pixel_grid(cfg: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(cfg.size) - (cfg.size - 1) / 2.0) * cfg.pixel_mm
    return np.meshgrid(c, c, indexing="ij")  # x along axis 0, y along axis 1


def voxel_coords(cfg: SimulationConfig) -> np.ndarray:
    """[X, Y, S, 3] voxel centres (mm, RAS) of a subject's slices."""
    x, y = _pixel_grid(cfg)
    z = cfg.z_mm(cfg.slice_positions)
    shape = (cfg.size, cfg.size, cfg.slices)
    return np.stack(
        [np.broadcast_to(x[..., None], shape), np.broadcast_to(y[..., None], shape),
         np.broadcast_to(z[None, None, :], shape)], axis=-1,
    )  # fmt: skip


def _ellipse(x, y, x0, y0, ra, rb, angle=0.0):
    if ra <= 0 or rb <= 0:
        return np.zeros(np.shape(x), bool)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
    return (u / ra) ** 2 + (v / rb) ** 2 <= 1.0


def _ramp(x, lo, width):
    return float(np.clip((x - lo) / width, 0.0, 1.0))


def draw_anatomy(rng: np.random.Generator, cfg: SimulationConfig, weight_kg: float) -> Anatomy:
    """Draw one subject's thorax geometry (body size scales with √(weight/70 kg)).

    Nodules are placed inside the lungs of a randomly chosen slice (their sphere fully inside
    the lung there) without overlapping each other; they show on every slice that cuts them.
    """
    size_scale = math.sqrt(weight_kg / 70.0)
    a = rng.uniform(150.0, 175.0) * size_scale
    b = a * rng.uniform(0.62, 0.74)
    dome = rng.uniform(0.62, 0.75)
    spine_r = rng.uniform(17.0, 21.0)
    anat = Anatomy(
        a=a,
        b=b,
        centre=(rng.uniform(-10, 10), rng.uniform(-10, 10)),
        rotation=rng.uniform(-0.06, 0.06),
        fat_mm=rng.uniform(6.0, 14.0) * size_scale**2,
        muscle_mm=rng.uniform(10.0, 18.0),
        lung_u=(rng.uniform(0.40, 0.46), rng.uniform(0.40, 0.46)),
        lung_v=rng.uniform(-0.05, 0.08),
        lung_axes=(rng.uniform(0.28, 0.33), rng.uniform(0.58, 0.66)),
        dome=dome,
        heart_centre=(rng.uniform(0.08, 0.16), rng.uniform(0.15, 0.28)),
        heart_axes=(rng.uniform(50.0, 62.0), rng.uniform(40.0, 50.0)),
        heart_angle=rng.uniform(0.35, 0.7),
        heart_range=(dome - rng.uniform(0.33, 0.42), dome + rng.uniform(0.06, 0.12)),
        wall_mm=rng.uniform(10.0, 13.0),
        aorta=(0.17 * a, -0.40 * b, rng.uniform(11.0, 14.0)),
        spine=(0.0, -0.58 * b, spine_r),
        lung_fraction=rng.uniform(0.2, 0.3),
        lung_field=SmoothField.draw(rng),
    )
    return dataclasses.replace(anat, nodules=_place_nodules(rng, cfg, anat))


def _place_nodules(rng, cfg, anat) -> tuple[Nodule, ...]:
    n = int(rng.integers(cfg.nodules_range[0], cfg.nodules_range[1] + 1))
    x, y = _pixel_grid(cfg)
    positions = cfg.slice_positions
    lungs = [thorax_labels(anat, cfg, p)[0] == LABELS["lung"] for p in positions]
    nodules = []
    for _ in range(n):
        radius = max(rng.uniform(6.0, 22.0), cfg.pixel_mm)
        malignant = bool(rng.random() < cfg.malignant_probability)
        order = rng.permutation(len(positions))
        for r in (radius, cfg.pixel_mm):
            placed = None
            for k in order:
                ok = lungs[k].copy()
                for nod in nodules:  # keep a gap of one pixel to earlier nodules
                    gap = nod.radius_mm + r + cfg.pixel_mm
                    ok &= (x - nod.centre_mm[0]) ** 2 + (y - nod.centre_mm[1]) ** 2 > gap**2
                # the disc of radius r around a candidate centre must be all lung
                rp = int(math.ceil(r / cfg.pixel_mm))
                pad = np.pad(lungs[k], rp)
                for di in range(-rp, rp + 1):
                    for dj in range(-rp, rp + 1):
                        if (di * di + dj * dj) * cfg.pixel_mm**2 <= r * r:
                            ok &= pad[rp + di : rp + di + cfg.size, rp + dj : rp + dj + cfg.size]
                cand = np.argwhere(ok)
                if len(cand):
                    i, j = cand[rng.integers(len(cand))]
                    jitter = rng.uniform(-0.25, 0.25, 2) * cfg.pixel_mm
                    z = float(cfg.z_mm(positions[k])) + rng.uniform(-0.3, 0.3) * r
                    placed = Nodule((x[i, j] + jitter[0], y[i, j] + jitter[1], z), r, malignant)
                    break
            if placed is not None:
                nodules.append(placed)
                break
    return tuple(nodules)


def _nodule_index(anat: Anatomy, cfg: SimulationConfig, slice_position: float) -> np.ndarray:
    """[X, Y] int: 1 + index of the nodule whose sphere covers the pixel, else 0."""
    x, y = _pixel_grid(cfg)
    z = float(cfg.z_mm(slice_position))
    out = np.zeros(x.shape, np.int32)
    for n, nod in enumerate(anat.nodules):
        r2 = nod.radius_mm**2 - (z - nod.centre_mm[2]) ** 2
        if r2 > 0:
            inside = (x - nod.centre_mm[0]) ** 2 + (y - nod.centre_mm[1]) ** 2 <= r2
            out[inside] = n + 1
    return out


def thorax_labels(
    anatomy: Anatomy, cfg: SimulationConfig, slice_position: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue labels and tissue fractions of one axial slice.

    Args:
      anatomy: subject geometry from `draw_anatomy`.
      cfg: simulation config (matrix, pixel size).
      slice_position: 0 (lung apex) .. 1 (upper abdomen, below the liver dome).

    Returns:
      labels: [X, Y] int32 ids of `LABELS`.
      fraction: [X, Y] float32 tissue fraction: 1 in the body, ≈ 0.2–0.3 in lung parenchyma
        (smooth variation, denser posteriorly), 0 outside the body.
    """
    p = float(slice_position)
    an = anatomy
    x, y = _pixel_grid(cfg)
    x, y = x - an.centre[0], y - an.centre[1]
    c, s = math.cos(an.rotation), math.sin(an.rotation)
    xb, yb = x * c + y * s, -x * s + y * c  # body frame
    a = an.a * (1.0 + 0.04 * math.sin(math.pi * p))
    b = an.b * (1.0 + 0.04 * math.sin(math.pi * p))
    lab = np.zeros(x.shape, np.int32)
    lab[_ellipse(xb, yb, 0, 0, a, b)] = LABELS["soft_tissue"]
    body = lab > 0
    d_in = an.fat_mm
    d_out = an.fat_mm + an.muscle_mm
    outer = _ellipse(xb, yb, 0, 0, a - d_in, b - d_in)
    lab[outer & ~_ellipse(xb, yb, 0, 0, a - d_out, b - d_out)] = LABELS["muscle"]
    cavity = _ellipse(xb, yb, 0, 0, a - d_out - 5.0, b - d_out - 5.0)
    sx, sy, sr = an.spine
    for side in (-1, 1):  # paraspinal muscles
        lab[_ellipse(xb, yb, side * (sr + 20.0), sy - 8.0, 22.0, 18.0) & body] = LABELS["muscle"]

    apex = 0.45 + 0.55 * math.sqrt(_ramp(p, 0.0, 0.4))
    base = (1.0 - 0.8 * _ramp(p, an.dome, 0.25), 1.0 - 0.75 * _ramp(p, an.dome + 0.08, 0.25))
    lung = np.zeros(x.shape, bool)
    for side, u, sc in ((-1, an.lung_u[0], base[0]), (1, an.lung_u[1], base[1])):
        ra, rb = an.lung_axes[0] * a * apex * sc, an.lung_axes[1] * b * apex * sc
        lung |= _ellipse(xb, yb, side * u * a, an.lung_v * b, ra, rb)
    lab[lung & cavity] = LABELS["lung"]

    rho = math.sqrt(_ramp(p, an.dome, 0.22))
    liver = _ellipse(xb, yb, -0.28 * a, 0.0, 0.6 * a * rho, 0.8 * b * rho, 0.2)
    lab[liver & cavity] = LABELS["liver"]

    h0, h1 = an.heart_range
    if h0 < p < h1:
        prof = math.sqrt(max(0.0, 1.0 - ((p - 0.5 * (h0 + h1)) / (0.5 * (h1 - h0))) ** 2))
        hx, hy = an.heart_centre[0] * a, an.heart_centre[1] * b
        ra, rb = an.heart_axes[0] * prof, an.heart_axes[1] * prof
        lab[_ellipse(xb, yb, hx, hy, ra, rb, an.heart_angle) & cavity] = LABELS["myocardium"]
        w = an.wall_mm
        inner = _ellipse(xb, yb, hx + 4.0, hy - 2.0, ra - w, rb - w, an.heart_angle)
        lab[inner & cavity] = LABELS["blood_pool"]

    ax, ay, ar = an.aorta
    lab[_ellipse(xb, yb, ax, ay, ar, ar)] = LABELS["aorta"]
    lab[_ellipse(xb, yb, sx, sy, sr, sr) | _ellipse(xb, yb, sx, sy - sr - 12.0, 14.0, 12.0)] = (
        LABELS["bone"]
    )
    lab[_ellipse(xb, yb, sx, sy, sr - 5.0, sr - 5.0)] = LABELS["marrow"]
    lab[~body] = LABELS["background"]

    nod = _nodule_index(anatomy, cfg, p)
    for n, nodule in enumerate(anatomy.nodules):
        kind = "nodule_malignant" if nodule.malignant else "nodule_benign"
        lab[(nod == n + 1) & (lab == LABELS["lung"])] = LABELS[kind]

    frac = body.astype(np.float32)
    is_lung = lab == LABELS["lung"]
    if np.any(is_lung):
        z = float(cfg.z_mm(p))
        coords = np.stack([x + an.centre[0], y + an.centre[1], np.full(x.shape, z)], axis=-1)
        field = anatomy.lung_field(coords[is_lung])
        gravity = 1.0 - 0.15 * np.clip(yb[is_lung] / b, -1.0, 1.0)  # supine: posterior denser
        lf = an.lung_fraction * gravity * np.exp(FIELD_LOG_SD * field)
        frac[is_lung] = np.clip(lf, 0.1, 0.45)
    return lab, frac


def nodule_map(anatomy: Anatomy, cfg: SimulationConfig, labels: np.ndarray) -> np.ndarray:
    """[X, Y, S] int: 1 + nodule index on voxels labelled as a nodule, else 0."""
    idx = np.stack([_nodule_index(anatomy, cfg, p) for p in cfg.slice_positions], axis=-1)
    is_nod = (labels == LABELS["nodule_benign"]) | (labels == LABELS["nodule_malignant"])
    return np.where(is_nod, idx, 0).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Kinetics
# ------------------------------------------------------------------------------------------------
def _clip_params(p: np.ndarray) -> np.ndarray:
    lower = np.array([0.0, 1e-4, 1e-4, 1e-4, 0.0])
    return np.clip(p, lower, PARAM_BOUNDS)


def _draw_nodule_params(rng: np.random.Generator, malignant: bool) -> np.ndarray:
    if malignant:
        k1, k2 = rng.uniform(0.10, 0.30), rng.uniform(0.20, 0.60)
        ki = math.exp(rng.uniform(math.log(0.02), math.log(0.08)))
        fv, k4 = rng.uniform(0.05, 0.25), rng.choice([0.0, rng.uniform(0.0, 0.005)])
    else:
        k1, k2 = rng.uniform(0.08, 0.20), rng.uniform(0.30, 0.80)
        ki = math.exp(rng.uniform(math.log(0.003), math.log(0.012)))
        fv, k4 = rng.uniform(0.05, 0.20), rng.uniform(0.0, 0.01)
    ki = min(ki, 0.5 * k1)
    k3 = ki * k2 / (k1 - ki)  # so that K1·k3/(k2 + k3) = Ki
    return np.array([fv, k1, k2, k3, k4])


def draw_subject_kinetics(
    rng: np.random.Generator, anatomy: Anatomy, cfg: SimulationConfig, labels: np.ndarray
) -> tuple[np.ndarray, list[dict]]:
    """Per-voxel 2TCM parameters of one subject.

    Args:
      rng: NumPy generator.
      anatomy: subject geometry (for nodules).
      cfg: simulation config.
      labels: [X, Y, S] label map of the subject's slices.

    Returns:
      params: [X, Y, S, 5] float32 (fv, K1, k2, k3, k4), tissue-level (not × fraction); 0
        outside the body; within `PARAM_BOUNDS`.
      tumours: one dict per nodule: index (1-based), malignant, label, centre_mm, radius_mm,
        params (5 floats), ki (K1·k3/(k2+k3)), slices (indices where it shows), n_voxels.
    """
    params = np.zeros(labels.shape + (5,), np.float64)
    for name, nominal in TISSUES.items():
        sd = SUBJECT_LOG_SD.copy()
        if name == "myocardium":
            sd[3] = MYOCARDIUM_K3_LOG_SD
        theta = np.asarray(nominal) * np.exp(sd * rng.normal(size=5))
        if nominal[0] == 1.0:
            theta[0] = 1.0
        params[labels == LABELS[name]] = theta
    nod = nodule_map(anatomy, cfg, labels)
    tumours = []
    for n, nodule in enumerate(anatomy.nodules):
        theta = _draw_nodule_params(rng, nodule.malignant)
        mask = nod == n + 1
        params[mask] = theta
        tumours.append(
            dict(
                index=n + 1,
                malignant=nodule.malignant,
                label=LABELS["nodule_malignant" if nodule.malignant else "nodule_benign"],
                centre_mm=tuple(float(v) for v in nodule.centre_mm),
                radius_mm=float(nodule.radius_mm),
                params=tuple(float(v) for v in theta),
                ki=float(theta[1] * theta[3] / (theta[2] + theta[3])),
                slices=[int(k) for k in np.nonzero(mask.any(axis=(0, 1)))[0]],
                n_voxels=int(mask.sum()),
            )
        )
    coords = voxel_coords(cfg)
    blood = (labels == LABELS["blood_pool"]) | (labels == LABELS["aorta"])
    for i in range(5):
        mod = np.exp(FIELD_LOG_SD * SmoothField.draw(rng)(coords))
        params[..., i] *= np.where(blood, 1.0, mod)
    params = np.where((labels > 0)[..., None], _clip_params(params), 0.0)
    return params.astype(np.float32), tumours


# ------------------------------------------------------------------------------------------------
# Input function
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BloodCurves:
    """A subject's input: Feng parameters and plasma / whole-blood samples (SUV, minutes).

    Attributes:
      feng: [7] (A1, A2, A3, λ1, λ2, λ3, τ) in SUV/min, SUV, SUV, 1/min ×3, min.
      times: [K] sample times (min), 0..input_end_min, dense around the bolus.
      plasma: [K] Cp (SUV) from the Feng formula.
      whole_blood: [K] C_WB = Cp / (0.386·e^{−0.191 t} + 1.165) (SUV).
    """

    feng: np.ndarray
    times: np.ndarray
    plasma: np.ndarray
    whole_blood: np.ndarray

    def plasma_input(self) -> kk.FengInput:
        return kk.FengInput(self.feng)

    def blood_input(self) -> kk.SampledInput:
        return kk.SampledInput(self.times, self.whole_blood)


def feng_curve(feng: np.ndarray, t) -> np.ndarray:
    """Feng model 2 in float64 NumPy (same formula and pairing as kk.FengInput)."""
    a1, a2, a3, l1, l2, l3, tau = (float(v) for v in feng)
    s = np.maximum(np.asarray(t, np.float64) - tau, 0.0)
    val = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return np.where(s > 0, val, 0.0)


def draw_input(rng: np.random.Generator, cfg: SimulationConfig = SimulationConfig()) -> BloodCurves:
    """Draw a subject's plasma input around `kk.FENG_FDG`, in SUV.

    Amplitudes × U(0.8, 1.2) (A1 also × BOLUS_GAIN), rates × U(0.85, 1.15), delay τ ~ U(0.3, 1.2)
    min, all × FENG_SUV_SCALE. Late (60 min) plasma ≈ 1.4–2.7 SUV, whole blood ≈ 1.2–2.3 SUV,
    peak ≈ 30–80 SUV.
    """
    base = np.asarray(kk.FENG_FDG, np.float64)
    amp = base[:3] * rng.uniform(0.8, 1.2, 3) * FENG_SUV_SCALE
    amp[0] *= BOLUS_GAIN
    rates = base[3:6] * rng.uniform(0.85, 1.15, 3)
    feng = np.concatenate([amp, rates, [rng.uniform(0.3, 1.2)]])
    tau = feng[6]
    times = np.concatenate(
        [[0.0, tau], tau + np.geomspace(0.01, cfg.input_end_min - tau, cfg.input_samples - 2)]
    )
    plasma = feng_curve(feng, times)
    return BloodCurves(feng, times, plasma, plasma / kmap_plasma_to_blood_ratio(times))


# ------------------------------------------------------------------------------------------------
# Frames and noise
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("schedule", "decay_constant", "fwhm_px"))
def _noisefree_frames(params, fraction, index, feng, wb_t, wb_v, schedule, decay_constant, fwhm_px):
    """[X, Y, S, T] true voxel frames and their PSF-blurred version (SUV).

    Only the voxels listed in `index` [M] (flat indices of the body, padded with repeats to a
    fixed length so one compilation serves every subject) go through the 2TCM.
    """
    shape = fraction.shape
    p = jnp.reshape(params, (-1, 5))[index]  # [M, 5]
    f = jnp.reshape(fraction, (-1,))[index]
    blood = kk.SampledInput(wb_t, wb_v)
    tissue = kk.pet_frames(p, kk.FengInput(feng), schedule, decay_constant, blood=blood)  # [M, T]
    frames = jnp.zeros((math.prod(shape), schedule.n_frames), tissue.dtype)
    frames = frames.at[index].set(f[:, None] * tissue)
    frames = jnp.reshape(frames, shape + (schedule.n_frames,))
    return frames, recon.blur(frames, fwhm_px)


def _body_index(fraction: np.ndarray) -> np.ndarray:
    """Flat indices of voxels with tissue, padded by repetition to half the volume (or all)."""
    idx = np.flatnonzero(fraction > 0).astype(np.int32)
    n = fraction.size
    cap = n if idx.size > n // 2 else n // 2
    if idx.size == 0:
        idx = np.zeros(1, np.int32)
    return np.resize(idx, cap)


_image_noise_jit = jax.jit(
    recon.image_noise, static_argnames=("schedule", "fwhm_px", "decay_constant")
)
_projection_noise_jit = jax.jit(
    recon.projection_noise,
    static_argnames=(
        "schedule", "n_angles", "n_iter", "n_subsets", "background_fraction", "fwhm_px",
        "decay_constant",
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Subjects
# ------------------------------------------------------------------------------------------------
def _subject_rngs(seed_or_key, subject_index: int):
    if subject_index < 0:
        raise ValueError(f"subject_index must be >= 0, got {subject_index}.")
    if isinstance(seed_or_key, bool) or not isinstance(seed_or_key, (int, np.integer, jax.Array)):
        raise ValueError(
            f"seed_or_key must be an int seed or a jax.random key, got {seed_or_key!r}."
        )
    if isinstance(seed_or_key, (int, np.integer)):
        seed = int(seed_or_key)
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}.")
        key = jax.random.fold_in(jax.random.key(seed), subject_index)
        return np.random.default_rng([seed, subject_index]), key
    key = jax.random.fold_in(seed_or_key, subject_index)
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist()), key


def simulate_subject(
    seed_or_key, cfg: SimulationConfig = SimulationConfig(), subject_index: int = 0
):
    """Simulate one subject: anatomy, kinetics, input, noise-free and noisy frames, truth.

    Args:
      seed_or_key: non-negative int seed or a jax.random key (the cohort's).
      cfg: simulation config.
      subject_index: subject number (folded into the seed: subjects are independent).

    Returns:
      dict with NumPy arrays (X = Y = cfg.size, S = cfg.slices, T = frames):
        frames [X, Y, S, T] float32: noisy decay-corrected frames (SUV).
        noisefree [X, Y, S, T]: true voxel frames, no PSF (Patlak on them gives ki_true).
        noisefree_psf [X, Y, S, T]: PSF-blurred noise-free frames (the expectation of frames).
        params [X, Y, S, 5]: tissue-level (fv, K1, k2, k3, k4); ki_true [X, Y, S] (1/min);
        fraction [X, Y, S]; labels [X, Y, S] int32 (`LABELS`).
        plasma, whole_blood: (times [K] min, values [K] SUV); blood: `BloodCurves`;
        feng [7] (SUV units); plasma_input (kk.FengInput), blood_input (kk.SampledInput).
        dose_mbq, weight_kg, suv_factor (Bq/mL per SUV = dose [Bq] / weight [g]).
        affine [4, 4] (mm), pixel_mm, slice_spacing_mm, slice_positions [S], schedule.
        tumours: list of dicts (see `draw_subject_kinetics`).
        noise, noise_scale (image noise s after the dose scaling), prompts [S, T] (projection
        noise: counts per slice and frame; else None).
    """
    rng, key = _subject_rngs(seed_or_key, int(subject_index))
    weight = rng.uniform(*cfg.weight_kg_range)
    dose = float(np.clip(weight * rng.uniform(*cfg.dose_per_kg_range), *cfg.dose_mbq_range))
    dose_ratio = (dose / weight) / REFERENCE_DOSE_PER_KG
    anatomy = draw_anatomy(rng, cfg, weight)
    per_slice = [thorax_labels(anatomy, cfg, p) for p in cfg.slice_positions]
    labels = np.stack([lab for lab, _ in per_slice], axis=-1)
    fraction = np.stack([f for _, f in per_slice], axis=-1)
    params, tumours = draw_subject_kinetics(rng, anatomy, cfg, labels)
    blood = draw_input(rng, cfg)

    noisefree, noisefree_psf = _noisefree_frames(
        params, fraction, _body_index(fraction), np.float32(blood.feng), np.float32(blood.times),
        np.float32(blood.whole_blood), cfg.schedule, float(cfg.decay_constant), float(cfg.fwhm_px),
    )  # fmt: skip
    noise_scale = cfg.noise_scale / math.sqrt(dose_ratio)
    prompts = None
    if cfg.noise == "image":
        frames = _image_noise_jit(
            key, noisefree_psf, cfg.schedule, noise_scale, cfg.fwhm_px, cfg.decay_constant
        )
    elif cfg.noise == "projection":
        system = jnp.asarray(recon.parallel_beam_system(cfg.size, cfg.angles))
        frames, prompts = _projection_noise_jit(
            key, noisefree, cfg.schedule, cfg.counts_per_slice * dose_ratio, system,
            n_angles=cfg.angles, n_iter=cfg.recon_iterations, n_subsets=cfg.recon_subsets,
            background_fraction=cfg.background_fraction, fwhm_px=cfg.fwhm_px,
            decay_constant=cfg.decay_constant,
        )  # fmt: skip
        prompts = np.asarray(prompts)
    else:
        frames = noisefree_psf

    fv, k1, k2, k3 = (params[..., i].astype(np.float64) for i in range(4))
    ki = np.where(k2 + k3 > 0, k1 * k3 / np.where(k2 + k3 > 0, k2 + k3, 1.0), 0.0)
    ki_true = ((1.0 - fv) * ki * fraction).astype(np.float32)
    return dict(
        frames=np.asarray(frames, np.float32),
        noisefree=np.asarray(noisefree, np.float32),
        noisefree_psf=np.asarray(noisefree_psf, np.float32),
        params=params,
        ki_true=ki_true,
        fraction=fraction,
        labels=labels,
        plasma=(blood.times, blood.plasma),
        whole_blood=(blood.times, blood.whole_blood),
        blood=blood,
        feng=blood.feng,
        plasma_input=blood.plasma_input(),
        blood_input=blood.blood_input(),
        dose_mbq=dose,
        weight_kg=float(weight),
        suv_factor=dose * 1e6 / (weight * 1e3),
        affine=cfg.affine(),
        pixel_mm=cfg.pixel_mm,
        slice_spacing_mm=cfg.slice_spacing_mm,
        slice_positions=cfg.slice_positions,
        schedule=cfg.schedule,
        tumours=tumours,
        noise=cfg.noise,
        noise_scale=float(noise_scale),
        prompts=prompts,
        subject_index=int(subject_index),
    )


def iter_subjects(
    seed_or_key, cfg: SimulationConfig, n_subjects: int, start: int = 0
) -> Iterator[dict]:
    """Yield `simulate_subject(seed, cfg, i)` for i = start .. start + n_subjects − 1.

    A generator, so a caller can wrap it in a progress bar:
    `for subj in tqdm(iter_subjects(seed, cfg, n), total=n): ...`.
    """
    if n_subjects < 0:
        raise ValueError(f"n_subjects must be >= 0, got {n_subjects}.")
    for i in range(start, start + n_subjects):
        yield simulate_subject(seed_or_key, cfg, i)
