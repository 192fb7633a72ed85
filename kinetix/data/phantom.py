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

Count levels (projection noise): the scale is the scan's total, 20 M prompts per slice at the
reference dose (KINETICS.md), honoured exactly. The per-frame figures quoted beside it there
(1.5–1.8 M in a 300-s late frame) then come out lower for the late frames: at the reference
dose the ten 300-s frames get ≈ 1.6–1.7 M (15–20 min) falling to ≈ 1.35 M (35–40 min) and
≈ 1.15 M (60–65 min), because in a thorax slice the activity falls with the blood curve (a brain
slice's rises), so each 35–65-min frame holds ≈ 6 % of the scan's counts, not 8 %. Both
figures cannot hold for thorax kinetics; the total is kept as the anchor (it sets the noise of
the whole scan), and `counts_per_slice` ≈ 27e6 puts the 35–65-min frames at ≈ 1.6–1.8 M for
anyone who prefers that anchor.

True Ki (ARCHITECTURE.md): ki_true = (1 − fv)·K1·k3/(k2 + k3)·fraction, the uptake that Patlak
on the noise-free voxel curve estimates up to Patlak's own bias (k4 > 0, early t*).

Units: time in minutes, activity in SUV (g/mL), lengths in mm. Arrays are `[X, Y, Z(, T)]` in
RAS voxel order: axis 0 runs from the patient's right to left, axis 1 from posterior to
anterior, axis 2 (slices) from inferior to superior; `affine` maps voxel indices to mm.
"""

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import kinetix.kinetics as kk
from kinetix.data import recon

# The simulator's building blocks live in phantom_config, phantom_anatomy and phantom_kinetics;
# they are re-exported here, so `kinetix.data.phantom` stays the one import of the simulator.
from kinetix.data.phantom_anatomy import (  # noqa: F401
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
from kinetix.data.phantom_config import REFERENCE_DOSE_PER_KG, SimulationConfig
from kinetix.data.phantom_kinetics import (  # noqa: F401
    BOLUS_GAIN,
    FENG_SUV_SCALE,
    MYOCARDIUM_K3_LOG_SD,
    PARAM_BOUNDS,
    SUBJECT_LOG_SD,
    TISSUES,
    BloodCurves,
    _draw_nodule_params,
    draw_input,
    draw_subject_kinetics,
    feng_curve,
    kmap_plasma_to_blood_ratio,
)


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
    seed_or_key,
    cfg: SimulationConfig = SimulationConfig(),  # noqa: B008 (a frozen dataclass)
    subject_index: int = 0,
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
