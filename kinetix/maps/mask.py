"""Body-mask rules: which voxels a Ki map, a loss or a metric counts.

Two named rules (`MASK_RULES`), both NumPy only:

- ``"threshold"`` (training, evaluation and `kinetix.predict`, so a prediction is masked as the
  network was trained): the duration-weighted time average of the frames (`time_average`) above
  ``threshold`` × the subject's reference level, the `MASK_PERCENTILE` (99th) percentile of its
  whole time-averaged volume (robust to a few hot voxels such as the bladder, the same for every
  slice of a subject). It assumes the body fills more than ~1 % of the field of view.
- ``"filled"`` (the default of `kinetix.parametric`): the plain mean over the Patlak fit frames
  (`mean_image`) above ``threshold`` × its `ROBUST_MAX_PERCENTILE` (99.5th) percentile; isolated
  voxels (no 6-neighbour in the mask) dropped; holes filled slice by slice: a voxel is added when
  it lies between mask voxels both along its x row and along its y column of the same axial slice
  (fills lungs, bowel gas, cold lesions; it may also fill air in deep concavities such as between
  the arms and the trunk, which only costs fit time). ``threshold = 0`` selects every voxel.

`volume_mask` applies either rule to a whole [X, Y, Z, T] study by name. docs/conventions.md,
"Body mask".
"""

from collections.abc import Sequence

import numpy as np

from kinetix.kinetics.frames import FrameSchedule

MASK_PERCENTILE = 99.0
"""Rule "threshold": percentile of a subject's time-averaged volume used as its reference level."""

ROBUST_MAX_PERCENTILE = 99.5
"""Rule "filled": percentile of the mean fit-frame image taken as its robust maximum."""

MASK_RULE_DESCRIPTIONS = {
    "threshold": "duration-weighted time-average SUV > MaskThreshold x its 99th percentile",
    "filled": "mean fit-frame SUV > MaskThreshold x robust max, despeckled, holes filled "
    "in-plane (x and y)",
}
"""One line per rule, for sidecars and reports."""

MASK_RULES = tuple(MASK_RULE_DESCRIPTIONS)
"""The named body-mask rules (module docstring)."""


def weighted_frames(frames, weights) -> np.ndarray:
    """Σ_t frames[..., t] · weights[t] in float32.

    A Fortran-ordered volume (what NIfTI decodes to: the frame axis slowest) is summed as one
    matrix-vector product over its contiguous memory, ~25× faster than `frames @ weights` on a
    256×256×71×28 scan; the summation order differs, so results agree to ~1e-7 relative.

    Args:
      frames: [..., T] values.
      weights: [T] weights.

    Returns:
      [...] float32.
    """
    a = np.asarray(frames, np.float32)
    w = np.asarray(weights, np.float32)
    if a.ndim >= 2 and a.flags.f_contiguous and not a.flags.c_contiguous:
        flat = a.reshape(-1, a.shape[-1], order="F")  # a view: [X·Y·Z, T]
        return (flat @ w).reshape(a.shape[:-1], order="F")
    return a @ w


def time_average(frames: np.ndarray, schedule: FrameSchedule) -> np.ndarray:
    """Duration-weighted mean over frames: Σ_m x_m Δ_m / Σ_m Δ_m.

    Args:
      frames: [..., T] frame values (SUV).
      schedule: the `T`-frame schedule (min).

    Returns:
      [...] float32 time-averaged SUV (the scan's mean activity).
    """
    return weighted_frames(frames, schedule.duration / np.sum(schedule.duration))


def threshold_mask(mean_suv: np.ndarray, reference: float, threshold: float) -> np.ndarray:
    """Rule "threshold": 1 where the time-averaged SUV exceeds `threshold` × `reference`, else 0.

    `reference` is the `MASK_PERCENTILE` (99th) percentile of the subject's whole time-averaged
    volume (`reference_level`); the time average weights frames by duration, so the many short
    early frames do not dominate.

    Args:
      mean_suv: [...] time-averaged SUV (`time_average`).
      reference: the subject's reference level (SUV).
      threshold: fraction of `reference` (e.g. 0.05).

    Returns:
      [...] float32 0/1 mask.
    """
    return (np.asarray(mean_suv) > threshold * reference).astype(np.float32)


def reference_level(mean_suv: np.ndarray) -> float:
    """Rule "threshold"'s reference: the `MASK_PERCENTILE` percentile of a time-averaged volume."""
    return float(np.percentile(mean_suv, MASK_PERCENTILE))


def mean_image(frames: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    """Mean over the frames `idx` of a [X, Y, Z, T] series -> [X, Y, Z] float32 (same units).

    Accumulates frame by frame into an array laid out like one frame (each frame is contiguous
    in NIfTI's Fortran order; a C-order accumulator would be ~10× slower), so the only temporary
    is one [X, Y, Z] array.
    """
    acc = np.zeros_like(frames[..., 0], dtype=np.float32)
    for i in idx:
        acc += frames[..., int(i)]
    acc /= np.float32(len(idx))
    return acc


def _between(mask: np.ndarray, axis: int) -> np.ndarray:
    """Voxels lying between two mask voxels (inclusive) along `axis`."""
    fwd = np.logical_or.accumulate(mask, axis=axis)
    rev = np.flip(np.logical_or.accumulate(np.flip(mask, axis=axis), axis=axis), axis=axis)
    return fwd & rev


def _neighbour_count_positive(mask: np.ndarray) -> np.ndarray:
    """True where at least one of the 6 face neighbours is in `mask` (edges padded with False)."""
    padded = np.pad(mask, 1)
    c = padded[1:-1, 1:-1, 1:-1]
    out = np.zeros_like(c)
    for axis in range(3):
        for shift in (-1, 1):
            out |= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def filled_mask(mean_img: np.ndarray, threshold: float) -> np.ndarray:
    """Rule "filled": the body mask of a mean image (module docstring).

    Args:
      mean_img: [X, Y, Z] mean activity over the fit frames (any units).
      threshold: fraction in [0, 1) of the robust maximum (99.5th percentile); 0 selects all
        voxels.

    Returns:
      [X, Y, Z] bool.
    """
    mean_img = np.asarray(mean_img)
    if mean_img.ndim != 3:
        raise ValueError(f"mean_img must be [X, Y, Z], got shape {mean_img.shape}.")
    if not (0.0 <= threshold < 1.0):
        raise ValueError(f"mask_threshold must lie in [0, 1), got {threshold}.")
    if threshold == 0.0:
        return np.ones(mean_img.shape, bool)
    robust = float(np.percentile(mean_img, ROBUST_MAX_PERCENTILE))
    if robust <= 0.0:
        robust = float(np.max(mean_img))
    if robust <= 0.0:
        return np.zeros(mean_img.shape, bool)
    mask = mean_img > np.float32(threshold * robust)
    mask &= _neighbour_count_positive(mask)
    mask |= _between(mask, 0) & _between(mask, 1)
    return mask


def volume_mask(
    frames: np.ndarray,
    schedule: FrameSchedule,
    rule: str,
    threshold: float,
    fit: Sequence[int] | None = None,
) -> np.ndarray:
    """The body mask of a study by rule name.

    Args:
      frames: [X, Y, Z, T] frame values (SUV) on `schedule`.
      schedule: the T-frame schedule (min).
      rule: one of `MASK_RULES`.
      threshold: the rule's fraction of its reference level, in [0, 1).
      fit: rule "filled": the frame indices whose mean is thresholded (the Patlak fit frames);
        default every frame.

    Returns:
      [X, Y, Z] bool.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"The body-mask rule must be one of {MASK_RULES}, got {rule!r}.")
    if rule == "filled":
        idx = range(frames.shape[-1]) if fit is None else fit
        return filled_mask(mean_image(frames, idx), threshold)
    mean = time_average(frames, schedule)
    return threshold_mask(mean, reference_level(mean), threshold) > 0
