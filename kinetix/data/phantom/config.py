"""Settings of the built-in thorax simulator (`kinetix.data.phantom`): `SimulationConfig`.

The matrix, field of view, slice placement, frame schedule, noise model and the ranges the
subject draws come from; see `kinetix.data.phantom` for the simulation itself. Units: lengths in
mm, time in minutes.
"""

import dataclasses

import numpy as np

import kinetix.kinetics as kk

REFERENCE_DOSE_PER_KG = 4.25
"""MBq/kg at which `counts_per_slice` and `noise_scale` hold; other subjects scale by it."""


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
