"""Patlak maps on batches of slices and on whole volumes: the one implementation every caller uses.

- `patlak_coordinates` and `batch_patlak`: a batch of slices [B, H, W, T], each with its own
  input function (the training loss, the evaluation's Ki routes);
- `volume_patlak`: a whole study [X, Y, Z, T] inside a body mask, in fixed-size jitted chunks
  (`kinetix.predict`, `kinetix.parametric`).

Both follow `kk.patlak` (TPCCLIB's convention: x = ∫0^{t_mid} Cp / frame-mean Cp, frames chosen by
mid-time, no decay weighting of Cp; docs/conventions.md, "Patlak"). Where a frame's mean plasma is
0 its y = C/Cp is taken as 0 (no division by zero; a fit window never holds such a frame for a
real input, whose plasma is positive after the bolus).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import kinetix.kinetics as kk

DEFAULT_CHUNK_VOXELS = 1 << 16
"""Voxels per jitted `volume_patlak` call (~3.4 MB of float32 input for 13 fit frames)."""


def fit_frames(schedule: kk.FrameSchedule, t_star: float, t_end: float | None = None):
    """Indices [F] of the frames whose mid-time lies in [t_star, t_end] (min).

    Raises:
      ValueError: t_star or t_end not finite, t_star past the scan, fewer than 2 frames.
    """
    for name, value in (("t_star", t_star), ("t_end", t_end)):
        if value is None and name == "t_end":
            continue
        if not isinstance(value, int | float | np.floating | np.integer) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number of minutes, got {value!r}.")
    if t_star < 0:
        raise ValueError(f"t_star must be >= 0 min, got {t_star}.")
    return schedule.select(float(t_star), None if t_end is None else float(t_end))


def patlak_coordinates(inputs, schedule: kk.FrameSchedule, decay_constant: float = 0.0):
    """Patlak abscissa and frame-mean plasma of a batch of inputs (`kk.patlak_x`, vmapped).

    Args:
      inputs: a batched input function (e.g. `kk.SampledInput` with leaves [B, K]), SUV, min.
      schedule: the T-frame schedule (min), static.
      decay_constant: 0 (TPCCLIB's convention, the default) or λ for decay-weighted frame means.

    Returns:
      (x [B, T] in min: ∫0^{t_mid} Cp / frame-mean Cp, cp [B, T] frame-mean Cp in SUV).
    """
    return jax.vmap(lambda i: kk.patlak_x(i, schedule, decay_constant))(inputs)


def expand_batch(v, ndim):
    """[B, T] -> [B, 1, 1, T]: a per-example curve broadcast explicitly over H, W."""
    return jnp.reshape(v, (v.shape[0],) + (1,) * (ndim - 2) + (v.shape[-1],))


def patlak_y(frames, cp):
    """y = frames / Cp per frame (0 where Cp = 0); frames [B,H,W,T], cp [B,T] -> [B,H,W,T]."""
    cp = expand_batch(cp, frames.ndim)
    pos = cp > 0
    return jnp.where(pos, frames / jnp.where(pos, cp, 1.0), 0.0)


def batch_patlak(frames, x, cp, idx, method: str = "ols"):
    """Voxelwise Patlak of a batch of slices, each with its own input's coordinates.

    Args:
      frames: [B, H, W, T] decay-corrected frames (SUV).
      x: [B, T] Patlak abscissa (min), `patlak_coordinates`.
      cp: [B, T] frame-mean plasma (SUV).
      idx: the frame indices in the fit (static: a tuple or NumPy array, `fit_frames`).
      method: "ols" or "perpendicular" (static).

    Returns:
      (ki [B, H, W] in 1/min, v0 [B, H, W] in mL/mL).
    """
    idx = np.asarray(idx)
    y = patlak_y(frames[..., idx], cp[:, idx])
    return kk.fit_line(expand_batch(x[:, idx], frames.ndim), y, method=method)


def _fit(block, inp, schedule, method):
    """Patlak on a [F, C] frame-major block of voxels (every frame of `schedule` is fitted)."""
    ki, v0 = kk.patlak(block.T, inp, schedule, float(schedule.start[0]), method=method)
    return ki, v0


_fit_chunk = jax.jit(_fit, static_argnames=("schedule", "method"))


def _flat_view(frames: np.ndarray) -> tuple[np.ndarray, str]:
    """[X, Y, Z, T] -> ([N, T] view, memory order "F" or "C" of the voxel index)."""
    order = "F" if frames.flags.f_contiguous and not frames.flags.c_contiguous else "C"
    return frames.reshape(-1, frames.shape[-1], order=order), order


def chunk_size(grid: Sequence[int], chunk_voxels: int) -> int:
    """Voxels per jitted call: `chunk_voxels`, or the whole grid when smaller (so it is known
    before the mask, and `run` can compile while the image is still being read)."""
    return int(min(chunk_voxels, np.prod(grid)))


def _gather(flat: np.ndarray, rows: np.ndarray, fit: np.ndarray, size: int) -> np.ndarray:
    """[F, size] float32 block of the fit frames of voxels `rows`, zero-padded to `size`."""
    block = np.zeros((fit.size, size), np.float32)
    for j, f in enumerate(fit):
        np.take(flat[:, int(f)], rows, out=block[j, : rows.size], mode="clip")
    return block


def volume_patlak(
    frames: np.ndarray,
    inp,
    schedule: kk.FrameSchedule,
    fit: Sequence[int],
    mask: np.ndarray,
    method: str = "ols",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Voxelwise Patlak Ki and V0 of a volume, fitted inside a mask in fixed-size chunks.

    The mask voxels are fitted in chunks of `chunk_size` voxels (the last one zero-padded, so the
    jitted fit compiles once); host gathering of the next chunk overlaps the fit of the current
    one. Memory beyond the frames: a few [X, Y, Z] float32 maps plus two chunks.

    Args:
      frames: [X, Y, Z, T] decay-corrected frames (SUV), C or Fortran order.
      inp: the plasma input (`kk.SampledInput` or `kk.FengInput`), SUV, min.
      schedule: the T-frame schedule (min).
      fit: frame indices of the fit (`fit_frames`).
      mask: [X, Y, Z] bool, the voxels to fit (`kinetix.maps.mask`).
      method: "ols" or "perpendicular" (TPCCLIB's image Patlak).
      chunk_voxels: voxels per jitted call (memory / speed trade-off; results do not depend on it).
      progress: show a tqdm progress bar (stderr).

    Returns:
      (ki [X, Y, Z] float32 in 1/min, v0 [X, Y, Z] float32 in mL/mL), 0 outside the mask.

    Raises:
      ValueError: bad method or chunk_voxels.
    """
    if method not in kk.METHODS:
        raise ValueError(f"method must be one of {kk.METHODS}, got {method!r}.")
    if isinstance(chunk_voxels, bool) or not isinstance(chunk_voxels, int | np.integer):
        raise ValueError(f"chunk_voxels must be a positive integer, got {chunk_voxels!r}.")
    if chunk_voxels < 1:
        raise ValueError(f"chunk_voxels must be a positive integer, got {chunk_voxels}.")
    fit = np.asarray(fit)
    grid = frames.shape[:3]
    flat, order = _flat_view(frames)  # [N, T]
    vox = np.flatnonzero(np.asarray(mask).ravel(order=order))  # [M] mask voxels, increasing
    ki = np.zeros(flat.shape[0], np.float32)
    v0 = np.zeros(flat.shape[0], np.float32)
    if vox.size:
        size = chunk_size(grid, chunk_voxels)
        sub = schedule[fit]
        pending = None
        with tqdm(total=int(vox.size), unit="vox", disable=not progress, desc="Patlak") as bar:
            for start in [*range(0, vox.size, size), None]:
                result = None
                if start is not None:
                    rows = vox[start : start + size]
                    block = _gather(flat, rows, fit, size)
                    result = (rows, _fit_chunk(block, inp, schedule=sub, method=method))
                if pending is not None:
                    rows_p, (ki_c, v0_c) = pending
                    ki[rows_p] = np.asarray(ki_c)[: rows_p.size]
                    v0[rows_p] = np.asarray(v0_c)[: rows_p.size]
                    bar.update(rows_p.size)
                pending = result
    return ki.reshape(grid, order=order), v0.reshape(grid, order=order)


def warm_up(inp, schedule: kk.FrameSchedule, fit, grid, method: str, chunk_voxels: int) -> None:
    """Compiles `volume_patlak`'s chunk fit for these shapes (e.g. while the image is read)."""
    block = np.zeros((len(fit), chunk_size(grid, chunk_voxels)), np.float32)
    jax.block_until_ready(_fit_chunk(block, inp, schedule=schedule[np.asarray(fit)], method=method))


def splice(measured, predicted, n_early: int):
    """Measured frames [..., :n_early] followed by predicted frames [..., n_early:] ([..., T]).

    The series the proposed Ki is fitted on (and, with `loss.patlak_frames = 'splice'`, the
    training loss's Patlak term); NumPy in, NumPy out; JAX arrays (or tracers) in, JAX out.
    """
    xp = jnp if isinstance(measured, jax.Array) or isinstance(predicted, jax.Array) else np
    return xp.concatenate([measured[..., :n_early], predicted[..., n_early:]], axis=-1)
