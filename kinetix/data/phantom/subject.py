"""One simulated subject: frames, noise and truth (`simulate_subject`, `iter_subjects`).

See `kinetix.data.phantom` for the pipeline and its conventions.
"""

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import kinetix.kinetics as kk
from kinetix.data.phantom import recon
from kinetix.data.phantom.anatomy import draw_anatomy, thorax_labels
from kinetix.data.phantom.config import REFERENCE_DOSE_PER_KG, SimulationConfig
from kinetix.data.phantom.tissues import draw_input, draw_subject_kinetics


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
