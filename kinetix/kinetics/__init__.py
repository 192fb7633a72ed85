"""kinetix.kinetics: the exact, differentiable kinetics core (pure JAX, no Flax, no I/O).

Time in minutes, rates in 1/min, arrays time-last. Everything here is safe under `jax.jit`,
`jax.grad` and `jax.vmap`. The public contract (docs/architecture.md, docs/conventions.md):

    import kinetix.kinetics as kk
    sched = kk.PAPER_SCHEDULE
    frames = kk.pet_frames(params, kk.FengInput(kk.FENG_FDG), sched)   # [..., 28]
    ki, v0 = kk.patlak(frames, kk.FengInput(kk.FENG_FDG), sched, t_star=9.0)
    res = kk.fit_2tcm(frames, kk.FengInput(kk.FENG_FDG), sched, window=(0, 35))  # 2TCM fits
"""

from kinetix.kinetics.compartment import (
    PARAM_NAMES,
    blood_frames,
    eigen_decomposition,
    ki_from_rates,
    macro_from_rates,
    pet_frames,
    rates_from_macro,
    rates_from_uncoupled,
    tissue_curve,
    uncoupled_from_rates,
)
from kinetix.kinetics.fit import (
    DEFAULT_BOUNDS,
    FIT_MODELS,
    WEIGHT_KINDS,
    FitBounds,
    FitResult,
    fit_2tcm,
    fit_starts,
    frame_weights,
)
from kinetix.kinetics.fit_jacobian import frames_and_jacobian
from kinetix.kinetics.frames import (
    F18_DECAY_CONSTANT,
    F18_HALF_LIFE_MIN,
    N_EARLY_FRAMES,
    PAPER_SCHEDULE,
    FrameSchedule,
    decay_correction_factors,
)
from kinetix.kinetics.input_fit import FengFitResult, fit_feng
from kinetix.kinetics.input_function import FENG_FDG, FengInput, FengParams, SampledInput
from kinetix.kinetics.patlak import METHODS, fit_line, patlak, patlak_x

__all__ = [
    "DEFAULT_BOUNDS",
    "F18_DECAY_CONSTANT",
    "F18_HALF_LIFE_MIN",
    "FENG_FDG",
    "FIT_MODELS",
    "METHODS",
    "N_EARLY_FRAMES",
    "PAPER_SCHEDULE",
    "PARAM_NAMES",
    "WEIGHT_KINDS",
    "FengFitResult",
    "FengInput",
    "FengParams",
    "FitBounds",
    "FitResult",
    "FrameSchedule",
    "SampledInput",
    "blood_frames",
    "decay_correction_factors",
    "eigen_decomposition",
    "fit_2tcm",
    "fit_feng",
    "fit_line",
    "fit_starts",
    "frame_weights",
    "frames_and_jacobian",
    "ki_from_rates",
    "macro_from_rates",
    "patlak",
    "patlak_x",
    "pet_frames",
    "rates_from_macro",
    "rates_from_uncoupled",
    "tissue_curve",
    "uncoupled_from_rates",
]
