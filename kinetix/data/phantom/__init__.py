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
5. Noise (`kinetix.data.phantom.recon`), scaled with the subject's injected MBq/kg: `"image"`
   (`recon.image_noise`: Gaussian, σ ∝ √(C/Δ)), `"projection"` (`recon.projection_noise`:
   Poisson sinograms with randoms + scatter, OSEM, PSF post-filter) or `"none"`.

Count levels (projection noise): the scale is the scan's total, 20 M prompts per slice at the
reference dose (docs/conventions.md, "Simulator"), honoured exactly. The per-frame figures quoted
beside it there (1.5–1.8 M in a 300-s late frame) then come out lower for the late frames: at the
reference dose the ten 300-s frames get ≈ 1.6–1.7 M (15–20 min) falling to ≈ 1.35 M (35–40 min) and
≈ 1.15 M (60–65 min), because in a thorax slice the activity falls with the blood curve (a brain
slice's rises), so each 35–65-min frame holds ≈ 6 % of the scan's counts, not 8 %. Both figures
cannot hold for thorax kinetics; the total is kept as the anchor (it sets the noise of the whole
scan), and `counts_per_slice` ≈ 27e6 puts the 35–65-min frames at ≈ 1.6–1.8 M for anyone who prefers
that anchor.

True Ki (docs/conventions.md, "Simulator"): ki_true = (1 − fv)·K1·k3/(k2 + k3)·fraction, the uptake
that Patlak on the noise-free voxel curve estimates up to Patlak's own bias (k4 > 0, early t*).

Units: time in minutes, activity in SUV (g/mL), lengths in mm. Arrays are `[X, Y, Z(, T)]` in
RAS voxel order: axis 0 runs from the patient's right to left, axis 1 from posterior to
anterior, axis 2 (slices) from inferior to superior; `affine` maps voxel indices to mm.
"""

from kinetix.data.phantom.anatomy import (
    FIELD_LOG_SD,
    LABELS,
    Anatomy,
    Nodule,
    SmoothField,
    draw_anatomy,
    nodule_map,
    thorax_labels,
    voxel_coords,
)
from kinetix.data.phantom.config import REFERENCE_DOSE_PER_KG, SimulationConfig
from kinetix.data.phantom.subject import iter_subjects, simulate_subject
from kinetix.data.phantom.tissues import (
    BOLUS_GAIN,
    FENG_SUV_SCALE,
    MYOCARDIUM_K3_LOG_SD,
    PARAM_BOUNDS,
    SUBJECT_LOG_SD,
    TISSUES,
    BloodCurves,
    draw_input,
    draw_subject_kinetics,
    feng_curve,
    kmap_plasma_to_blood_ratio,
)

__all__ = [
    "BOLUS_GAIN",
    "FENG_SUV_SCALE",
    "FIELD_LOG_SD",
    "LABELS",
    "MYOCARDIUM_K3_LOG_SD",
    "PARAM_BOUNDS",
    "REFERENCE_DOSE_PER_KG",
    "SUBJECT_LOG_SD",
    "TISSUES",
    "Anatomy",
    "BloodCurves",
    "Nodule",
    "SimulationConfig",
    "SmoothField",
    "draw_anatomy",
    "draw_input",
    "draw_subject_kinetics",
    "feng_curve",
    "iter_subjects",
    "kmap_plasma_to_blood_ratio",
    "nodule_map",
    "simulate_subject",
    "thorax_labels",
    "voxel_coords",
]
