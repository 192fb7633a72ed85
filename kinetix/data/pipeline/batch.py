"""The one batch builder: a subject -> the network's input (training, evaluation, prediction).

Training and evaluation read examples through `Cohort.slice` (which calls `input_curves` and
`slice_example`); prediction reads a whole volume through `volume_batches`, which calls the same
two functions. So the network sees the same frames and the same input curves for a subject
whichever path built them: in particular the plasma and whole-blood curves are always reduced to
`input_points` samples *jointly* (`compress_curve` on both, then `pad_curve`), never plasma alone
with whole blood interpolated onto its samples.

Keys, shapes and dtypes are the batch table of `kinetix.data.pipeline` (`BATCH_KEYS`).
"""

from collections.abc import Iterator, Sequence

import numpy as np

from kinetix.data.bids import Study
from kinetix.data.pipeline.curves import compress_curve, pad_curve

BATCH_KEYS = (
    "frames",
    "mask",
    "plasma_times",
    "plasma",
    "whole_blood",
    "subject",
    "slice",
    "valid",
)
"""Every key of an example and of a batch (see the `kinetix.data.pipeline` table)."""

REFERENCE_KEYS = ("reference_plasma_times", "reference_plasma", "reference_whole_blood")
"""Extra keys of the examples of a cohort whose input is completed past the early frames
(`Cohort.with_input`): the measured input curves, [K] f32 (min, SUV, SUV), that the evaluation's
full-scan reference routes fit."""


def input_curves(study: Study, input_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subject's input curves with exactly `input_points` samples: the network's curve input.

    Plasma and whole blood share their sample times, so they are reduced together: one set of
    kept samples (`compress_curve` on both curves, only when the study has more than K samples),
    then padded to K samples (`pad_curve`, exact).

    Args:
      study: the subject's `Study` (plasma_times [N] min, plasma [N] SUV, whole_blood [N] SUV
        or None).
      input_points: K, samples per curve (>= 2).

    Returns:
      (times [K] f32 min, plasma [K] f32 SUV, whole_blood [K] f32 SUV); whole blood is the plasma
      when the study has none.
    """
    input_points = int(input_points)
    if input_points < 2:
        raise ValueError(f"input_points must be >= 2, got {input_points}.")
    blood = study.plasma if study.whole_blood is None else study.whole_blood
    t, v = compress_curve(study.plasma_times, np.stack([study.plasma, blood]), input_points)
    t, v = pad_curve(t, v, input_points)
    return t.astype(np.float32), v[0].astype(np.float32), v[1].astype(np.float32)


def slice_example(
    frames: np.ndarray,
    mask: np.ndarray,
    curves: tuple[np.ndarray, np.ndarray, np.ndarray],
    subject_index: int,
    z: int,
    valid: float = 1.0,
) -> dict:
    """One example (a batch entry without B) from one slice and the subject's curves.

    Args:
      frames: [H, W, T] slice frames (SUV).
      mask: [H, W] body mask (1 inside); it weights only the loss, not the network's output.
      curves: (times [K] min, plasma [K] SUV, whole_blood [K] SUV), from `input_curves`.
      subject_index: the `subject` field (index into the cohort's subjects).
      z: the `slice` field (z index of the slice).
      valid: 1 for a real example, 0 for padding.

    Returns:
      dict with frames [H, W, T] f32, mask [H, W] f32, plasma_times [K] f32, plasma [K] f32,
      whole_blood [K] f32, subject i32, slice i32, valid f32.
    """
    times, plasma, blood = curves
    return {
        "frames": np.ascontiguousarray(frames, dtype=np.float32),
        "mask": np.asarray(mask, dtype=np.float32),
        "plasma_times": times,
        "plasma": plasma,
        "whole_blood": blood,
        "subject": np.int32(subject_index),
        "slice": np.int32(z),
        "valid": np.float32(valid),
    }


def stack_examples(examples: Sequence[dict]) -> dict:
    """A batch from examples: every `BATCH_KEYS` field (and the `REFERENCE_KEYS` that every
    example has) stacked along a new leading axis B."""
    if not examples:
        raise ValueError("stack_examples needs at least one example.")
    keys = BATCH_KEYS + tuple(k for k in REFERENCE_KEYS if all(k in ex for ex in examples))
    return {k: np.stack([ex[k] for ex in examples]) for k in keys}


def _padded_slice(frames_z: np.ndarray, multiple: int, n_frames: int) -> np.ndarray:
    """[X, Y, T_e] -> [X', Y', n_frames]: zeros beyond X, Y (up to the multiple) and T_e."""
    x, y, t = frames_z.shape
    pad = ((0, (-x) % multiple), (0, (-y) % multiple), (0, n_frames - t))
    return np.pad(np.asarray(frames_z, np.float32), pad)


def volume_batches(
    study: Study,
    n_early: int,
    n_frames: int,
    input_points: int,
    batch_slices: int,
    multiple: int = 1,
    *,
    subject_index: int = 0,
) -> Iterator[tuple[list[int], dict]]:
    """Fixed-shape batches over every z slice of a study: the network input at prediction.

    Each slice's first `n_early` frames, zero-padded in x and y up to a multiple of `multiple`
    (the U-Net's size multiple) and with zeros for frames n_early..n_frames−1 (the network reads
    only the early ones), plus the subject's `input_curves`, made into an example by
    `slice_example`, as `Cohort.slice` does for training. The last batch is filled to
    `batch_slices` by repeating its last slice (``valid`` = 0), so every batch has one shape (one
    compilation). The mask is 1 on the image and 0 on the x/y padding (it weights only a loss).

    Args:
      study: the subject's `Study`: frames [X, Y, Z, T] (SUV) with T >= n_early.
      n_early: early frames the network reads (the first ones of the study).
      n_frames: T of the batch (the trained schedule's frame count, >= n_early).
      input_points: K, samples per input curve.
      batch_slices: B, slices per batch (>= 1).
      multiple: x and y are padded up to a multiple of this (>= 1).
      subject_index: the `subject` field of every example.

    Yields:
      (zs, batch): zs the real z indices of the batch (at most B, in order), batch a dict as in
      the `kinetix.data.pipeline` table with B examples: frames [B, X', Y', n_frames] f32
      (crop [:, :X, :Y] for the image), mask [B, X', Y'], plasma_times / plasma / whole_blood
      [B, K], subject [B] i32, slice [B] i32, valid [B] f32.
    """
    n_early, n_frames = int(n_early), int(n_frames)
    batch_slices, multiple = int(batch_slices), int(multiple)
    t_study = study.frames.shape[-1]
    if not 1 <= n_early <= min(t_study, n_frames):
        raise ValueError(
            f"n_early must be in [1, min(study frames {t_study}, n_frames {n_frames})], got "
            f"{n_early}."
        )
    if batch_slices < 1 or multiple < 1:
        raise ValueError(
            f"batch_slices and multiple must be >= 1, got {batch_slices} and {multiple}."
        )
    curves = input_curves(study, input_points)  # validates input_points before the first yield
    return _volume_generator(
        study, n_early, n_frames, curves, batch_slices, multiple, int(subject_index)
    )


def _volume_generator(study, n_early, n_frames, curves, batch_slices, multiple, subject_index):
    nx, ny, nz = study.frames.shape[:3]
    mask = _padded_slice(np.ones((nx, ny, 1), np.float32), multiple, 1)[..., 0]
    for z0 in range(0, nz, batch_slices):
        zs = list(range(z0, min(z0 + batch_slices, nz)))
        fill = [zs[-1]] * (batch_slices - len(zs))
        examples = [
            slice_example(
                _padded_slice(study.frames[:, :, z, :n_early], multiple, n_frames),
                mask,
                curves,
                subject_index,
                z,
                valid=float(i < len(zs)),
            )
            for i, z in enumerate(zs + fill)
        ]
        yield zs, stack_examples(examples)
