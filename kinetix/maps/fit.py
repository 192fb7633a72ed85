"""Voxelwise 2TCM fits of whole volumes and batches (`kk.fit_2tcm` in fixed-size chunks).

`volume_fit` fits every voxel of a mask, chunk by chunk (the last chunk padded with copies of a
real voxel, so one compilation serves the volume and the padding never slows the vmapped solver
down; a mask smaller than a chunk is fitted in the next power of two), and returns parameter,
Ki, standard-error, residual and convergence maps. `fitted_frames` evaluates the fitted model on
any schedule (e.g. a fit of 0–35 min extrapolated to 65 min), with each voxel's fitted input
delay applied. Time in minutes, activity in the input's units.
"""

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import kinetix.kinetics as kk

DEFAULT_FIT_CHUNK = 4096
"""Voxels per jitted fit call (memory grows with it; results do not depend on it)."""

DEFAULT_WEIGHTS = "duration"
"""Frame weights of the fits (`kk.frame_weights`): proportional to the frame duration."""

MAP_KEYS = ("params", "stderr", "ki", "ki_stderr", "delay", "delay_stderr", "wrss", "converged")
"""The maps `volume_fit` returns."""


def fitted_frames(params, delay, inp, schedule: kk.FrameSchedule, blood=None, decay_constant=None):
    """Frames of fitted 2TCM parameters on ``schedule``, each voxel's input delayed by its delay.

    Args:
      params: [N, 5] (fv, K1, k2, k3, k4).
      delay: [N] input delays (min; 0 where none was fitted).
      inp: the plasma input of the fit (unbatched).
      schedule: the frames to evaluate (min), e.g. the whole scan.
      blood: the whole-blood input of the fit, or None (whole blood = plasma).
      decay_constant: λ (1/min); default F-18.

    Returns:
      [N, T] frame values in the input's units.
    """
    lam = kk.F18_DECAY_CONSTANT if decay_constant is None else float(decay_constant)

    def one(p, d):
        b = None if blood is None else blood.shift(d)
        return kk.pet_frames(p, inp.shift(d), schedule, lam, blood=b)

    return jax.vmap(one)(jnp.asarray(params), jnp.asarray(delay))


def volume_fit(
    frames: np.ndarray,
    inp,
    schedule: kk.FrameSchedule,
    mask: np.ndarray,
    *,
    blood=None,
    model: str = "2tcm",
    window: tuple[float, float] | None = None,
    fit_delay: bool = False,
    weights: str = DEFAULT_WEIGHTS,
    n_starts: int = 2,
    max_steps: int = 100,
    chunk_voxels: int = DEFAULT_FIT_CHUNK,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Voxelwise 2TCM fit of the voxels of a mask, in fixed-size chunks.

    Args:
      frames: [X, Y, Z, T] (or any [..., T]) decay-corrected frames, e.g. SUV.
      inp: the plasma input (unbatched `kk.SampledInput` or `kk.FengInput`), same units.
      schedule: the T-frame schedule (min).
      mask: bool array of the frames' leading shape: the voxels to fit.
      blood: whole-blood input for the fv term (None: whole blood = plasma).
      model, window, fit_delay, weights, n_starts, max_steps: as in `kk.fit_2tcm` (window in
        min: only frames wholly inside it are fitted).
      chunk_voxels: voxels per jitted call.
      progress: show a tqdm progress bar (stderr).

    Returns:
      {key: map} for `MAP_KEYS`, leading shape of ``mask``: "params" and "stderr" [..., 5]
      (fv, K1, k2, k3, k4), "ki", "ki_stderr", "delay", "delay_stderr", "wrss" float32,
      "converged" bool; 0 (False) outside the mask.

    Raises:
      ValueError: bad chunk_voxels, a mask of another shape, or `kk.fit_2tcm`'s errors.
    """
    frames = np.asarray(frames)
    mask = np.asarray(mask, bool)
    if mask.shape != frames.shape[:-1]:
        raise ValueError(
            f"mask has shape {mask.shape}; the frames' voxels are {frames.shape[:-1]}."
        )
    if isinstance(chunk_voxels, bool) or int(chunk_voxels) != chunk_voxels or chunk_voxels < 1:
        raise ValueError(f"chunk_voxels must be a positive integer, got {chunk_voxels!r}.")
    flat = frames.reshape(-1, frames.shape[-1])
    vox = np.flatnonzero(mask.ravel())
    n = flat.shape[0]
    out = {
        "params": np.zeros((n, 5), np.float32),
        "stderr": np.zeros((n, 5), np.float32),
        "converged": np.zeros(n, bool),
        **{k: np.zeros(n, np.float32) for k in MAP_KEYS[2:-1]},
    }
    # A power of two up to chunk_voxels: few distinct shapes (compilations) over many calls.
    size = int(min(chunk_voxels, 1 << max(int(vox.size) - 1, 0).bit_length()))
    options = dict(
        blood=blood,
        model=model,
        weights=weights,
        window=window,
        fit_delay=bool(fit_delay),
        n_starts=int(n_starts),
        max_steps=int(max_steps),
    )
    with tqdm(total=int(vox.size), unit="vox", disable=not progress, desc="2TCM fit") as bar:
        for start in range(0, vox.size, size):
            rows = vox[start : start + size]
            block = flat[np.concatenate([rows, np.full(size - rows.size, rows[0])])]
            res = kk.fit_2tcm(np.asarray(block, np.float32), inp, schedule, **options)
            res = jax.device_get(res._asdict())
            for key in MAP_KEYS:
                out[key][rows] = np.asarray(res[key])[: rows.size]
            bar.update(rows.size)
    lead = mask.shape
    return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}
