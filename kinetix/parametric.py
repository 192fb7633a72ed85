"""Voxelwise Patlak Ki and V0 maps of a BIDS-PET scan (library function + thin CLI).

    python -m kinetix.parametric --pet sub-01_pet.nii.gz [--blood sub-01_..._blood.tsv] \\
        --tstar 9 [--tend 35] [--method ols|perpendicular] --out DIR [--overwrite] \\
        [--chunk_voxels 65536] [--mask_threshold 0.02]

writes `DIR/<stem>_Ki.nii.gz` (1/min = mL/min/mL), `DIR/<stem>_V0.nii.gz` (mL/mL),
`DIR/<stem>_mask.nii.gz` (1 inside the body mask) on the image's grid (affine and header kept),
and `DIR/<stem>_Ki.json` (method, t*, t_end, frames used, conventions, version). `<stem>` is the
image name without `_pet.nii.gz`, e.g. `sub-01` or `sub-01_ses-1`.

Pipeline (`patlak_maps`, reusable on in-memory `Study` objects):
1. Fit frames: those whose mid-time lies in [t*, t_end] (`FrameSchedule.select`, TPCCLIB's rule).
2. Body mask, NumPy only (scipy is a test-only dependency): voxels whose mean SUV over the fit
   frames exceeds `mask_threshold` × the robust maximum (the 99.5th percentile of that mean
   image); isolated voxels (no 6-neighbour in the mask) are dropped; then holes are filled slice
   by slice: a voxel is added when it lies between mask voxels both along its x row and along
   its y column of the same axial slice (fills lungs, bowel gas, cold lesions; it may also fill
   air in deep concavities such as between the arms and the trunk, which only costs fit time).
   `mask_threshold=0` fits every voxel.
3. Patlak (`kk.patlak`, `decay_constant=0`: x = ∫0^{t_mid} Cp / frame-mean Cp, the TPCCLIB
   convention) on the mask voxels only, in chunks of a fixed number of voxels (the last chunk is
   zero-padded, so the jitted fit compiles once); host gathering of the next chunk overlaps the
   fit of the current one. Memory beyond the study itself: a few [X, Y, Z] float32 maps plus
   two chunks. Voxels outside the mask are 0.

The CLI parses its own `absl.flags.FlagValues` (not the global `FLAGS`), so importing this module
next to other kinetix entry points with flags of the same names (`--pet`, `--out`) is safe. Bad
input ends the command with one sentence `kinetix.parametric: error: ...` and exit status 2.
"""

import concurrent.futures
import glob
import importlib.metadata
import json
import logging as std_logging
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import kinetix.kinetics as kk
from kinetix.data import bids

DEFAULT_CHUNK_VOXELS = 1 << 16
"""Voxels per jitted Patlak call (~3.4 MB of float32 input for 13 fit frames)."""

DEFAULT_MASK_THRESHOLD = 0.02
"""Body mask: fraction of the robust maximum of the mean fit-frame SUV."""

ROBUST_MAX_PERCENTILE = 99.5
"""Percentile of the mean fit-frame image taken as its robust maximum."""

CONVENTIONS = (
    "Patlak plot y = C_m/Cp_m against x = (integral of Cp from injection to the frame mid-time) "
    "/ Cp_m, with Cp_m the plain frame mean of the piecewise-linear plasma curve (TPCCLIB "
    "imgki/patlak conventions, no decay weighting of Cp); frames enter when their mid-time lies "
    "in [t*, t_end]; images decay-corrected to injection, activity in SUV (Ki and V0 do not "
    "depend on the activity unit)."
)

_PROG = "kinetix.parametric"


# ------------------------------------------------------------------------------------------------
# Library
# ------------------------------------------------------------------------------------------------
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


def body_mask(mean_img: np.ndarray, threshold: float = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Body mask from a mean image (module docstring, step 2).

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


def patlak_maps(
    study: bids.Study,
    t_star: float,
    t_end: float | None = None,
    method: str = "ols",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxelwise Patlak Ki and V0 maps of a study, computed inside a body mask.

    Args:
      study: a `kinetix.data.bids.Study` (frames [X, Y, Z, T] SUV, schedule in min, plasma).
      t_star: start of the linear phase (min): frames with mid-time >= t_star are fitted.
      t_end: optional end (min): frames with mid-time <= t_end; default the end of the scan.
      method: "ols" or "perpendicular" (TPCCLIB's image Patlak).
      chunk_voxels: voxels per jitted call (memory / speed trade-off; results do not depend on
        it).
      mask_threshold: body-mask threshold, see `body_mask`; 0 fits every voxel.
      progress: show a tqdm progress bar (stderr).

    Returns:
      (ki [X, Y, Z] float32 in 1/min, v0 [X, Y, Z] float32 in mL/mL, mask [X, Y, Z] bool).
      Ki and V0 are 0 outside the mask.

    Raises:
      ValueError: bad method, t_star / t_end, chunk_voxels or mask_threshold.
    """
    if method not in kk.METHODS:
        raise ValueError(f"method must be one of {kk.METHODS}, got {method!r}.")
    if isinstance(chunk_voxels, bool) or not isinstance(chunk_voxels, int | np.integer):
        raise ValueError(f"chunk_voxels must be a positive integer, got {chunk_voxels!r}.")
    if chunk_voxels < 1:
        raise ValueError(f"chunk_voxels must be a positive integer, got {chunk_voxels}.")
    fit = fit_frames(study.schedule, t_star, t_end)
    frames = study.frames
    grid = frames.shape[:3]

    mask = body_mask(mean_image(frames, fit), mask_threshold)
    flat, order = _flat_view(frames)  # [N, T]
    vox = np.flatnonzero(mask.ravel(order=order))  # [M] mask voxels, increasing
    ki = np.zeros(flat.shape[0], np.float32)
    v0 = np.zeros(flat.shape[0], np.float32)
    if vox.size:
        size = chunk_size(grid, chunk_voxels)
        sub = study.schedule[fit]
        inp = study.plasma_input()
        starts = range(0, vox.size, size)
        pending = None
        with tqdm(total=int(vox.size), unit="vox", disable=not progress, desc=_PROG) as bar:
            for start in [*starts, None]:
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
    return ki.reshape(grid, order=order), v0.reshape(grid, order=order), mask


def output_paths(pet_path, out_dir) -> dict[str, pathlib.Path]:
    """{"ki", "v0", "mask", "json"} output paths for an image `<stem>_pet.nii[.gz]`."""
    pet_path = pathlib.Path(pet_path)
    name = pet_path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        raise ValueError(f"--pet {pet_path} is not a NIfTI file (expected .nii.gz or .nii).")
    stem = stem[: -len("_pet")] if stem.endswith("_pet") else stem
    out = pathlib.Path(out_dir)
    return {
        "ki": out / f"{stem}_Ki.nii.gz",
        "v0": out / f"{stem}_V0.nii.gz",
        "mask": out / f"{stem}_mask.nii.gz",
        "json": out / f"{stem}_Ki.json",
    }


def _version() -> str:
    try:
        return importlib.metadata.version("kinetix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _warm_up(pet, blood, t_star, t_end, method: str, chunk_voxels: int) -> None:
    """Best effort: compiles the chunk fit while `run` reads (decompresses) the image.

    Peeks at the sidecar's frame times, the plasma row count of the blood TSV and the NIfTI
    header, i.e. at the shapes `patlak_maps` will use. Errors are left to `bids.read_subject`
    to report; a wrong peek only costs an unused compilation.
    """
    try:
        import nibabel as nib

        pet = pathlib.Path(pet)
        stem = pet.name[: -len(".gz")] if pet.name.endswith(".gz") else pet.name
        stem = stem[: -len(".nii")]
        side = json.loads(pet.with_name(stem + ".json").read_text())
        sched = kk.FrameSchedule.from_seconds(side["FrameTimesStart"], side["FrameDuration"])
        fit = sched.select(float(t_star), None if t_end is None else float(t_end))
        if blood is None:
            prefix = stem[: -len("_pet")] if stem.endswith("_pet") else stem
            found = sorted(pet.parent.glob(f"{glob.escape(prefix)}_recording-*_blood.tsv"))
            manual = [p for p in found if "_recording-manual_" in p.name]
            blood = (manual or found)[0]
        lines = [ln.split("\t") for ln in pathlib.Path(blood).read_text().splitlines() if ln]
        col = [c.strip() for c in lines[0]].index("plasma_radioactivity")
        n = sum(r[col].strip().lower() not in ("n/a", "na", "nan", "") for r in lines[1:])
        size = chunk_size(nib.load(pet).shape[:3], chunk_voxels)
        inp = kk.SampledInput(np.arange(n, dtype=np.float32), np.zeros(n, np.float32))
        block = np.zeros((fit.size, size), np.float32)
        jax.block_until_ready(_fit_chunk(block, inp, schedule=sched[fit], method=method))
    except Exception as err:  # noqa: BLE001 - an optimisation only
        logging.debug("%s: no warm-up compilation (%s)", _PROG, err)


def run(
    pet,
    out,
    t_star: float,
    t_end: float | None = None,
    method: str = "ols",
    blood=None,
    overwrite: bool = False,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    progress: bool = False,
) -> dict[str, pathlib.Path]:
    """Reads a BIDS-PET scan, computes `patlak_maps` and writes the maps and sidecar.

    Args:
      pet: `*_pet.nii.gz`; its `.json` sidecar is read automatically.
      out: output directory (created).
      t_star, t_end, method, chunk_voxels, mask_threshold, progress: as in `patlak_maps`.
      blood: blood TSV; default the `*_recording-*_blood.tsv` next to the image.
      overwrite: replace existing outputs; otherwise an existing output raises FileExistsError
        before anything is read.

    Returns:
      `output_paths(pet, out)`.
    """
    if method not in kk.METHODS:
        raise ValueError(f"method must be one of {kk.METHODS}, got {method!r}.")
    if not (0.0 <= mask_threshold < 1.0):
        raise ValueError(f"mask_threshold must lie in [0, 1), got {mask_threshold}.")
    paths = output_paths(pet, out)
    if not overwrite:
        for path in paths.values():
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --overwrite to replace it.")

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        warm = pool.submit(_warm_up, pet, blood, t_star, t_end, method, chunk_voxels)
        study = bids.read_subject(pet, blood)
        fit = fit_frames(study.schedule, t_star, t_end)  # validate before the mask and the fit
        t1 = time.perf_counter()
        warm.result()
        ki, v0, mask = patlak_maps(
            study, t_star, t_end, method, chunk_voxels, mask_threshold, progress=progress
        )
        t2 = time.perf_counter()
        descr = f"Patlak {method} t*={t_star:g} min"
        maps = (
            ("ki", ki, f"{descr} Ki (1/min)", "Ki"),
            ("v0", v0, f"{descr} V0 (mL/mL)", "V0"),
            ("mask", mask.astype(np.float32), "Patlak body mask (1 inside)", "mask"),
        )
        writes = [
            pool.submit(
                bids.write_map,
                paths[key],
                data,
                study,
                description=text,
                intent_name=intent,
                overwrite=overwrite,
            )
            for key, data, text, intent in maps
        ]
        for done in writes:
            done.result()
    sched = study.schedule
    sidecar = {
        "Description": "Voxelwise Patlak graphical analysis (kinetix.parametric).",
        "Sources": [str(study.pet_path), str(study.blood_path)],
        "Method": method,
        "TStar": float(t_star),
        "TEnd": float(sched.end[-1]) if t_end is None else float(t_end),
        "TimeUnits": "min",
        "FramesUsed": [int(i) for i in fit],
        "FrameMidTimesUsed": [round(float(sched.mid[i]), 6) for i in fit],
        "Conventions": CONVENTIONS,
        "InputFunction": "plasma_radioactivity column of the blood TSV, piecewise linear",
        "Units": {"Ki": "1/min (mL/min/mL)", "V0": "mL/mL"},
        "Mask": {
            "MaskThreshold": float(mask_threshold),
            "RobustMaxPercentile": ROBUST_MAX_PERCENTILE,
            "Voxels": int(np.count_nonzero(mask)),
            "Rule": "mean fit-frame SUV > MaskThreshold x robust max, despeckled, holes "
            "filled in-plane (x and y); Ki = V0 = 0 outside",
        },
        "SoftwareName": "kinetix",
        "SoftwareVersion": _version(),
    }
    paths["json"].write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
    logging.info(
        "%s: read %.2f s, fit %.2f s (%d mask voxels), write %.2f s -> %s",
        _PROG,
        t1 - t0,
        t2 - t1,
        sidecar["Mask"]["Voxels"],
        time.perf_counter() - t2,
        out,
    )
    return paths


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _flag_values() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "pet", None, "Dynamic PET image *_pet.nii.gz (sidecar read).", flag_values=fv
    )
    flags.DEFINE_string(
        "blood", None, "Blood TSV (default: the one next to --pet).", flag_values=fv
    )
    flags.DEFINE_float(
        "tstar", None, "Start of the Patlak fit (min, frame mid-times).", flag_values=fv
    )
    flags.DEFINE_float(
        "tend", None, "End of the Patlak fit (min); default scan end.", flag_values=fv
    )
    flags.DEFINE_enum("method", "ols", list(kk.METHODS), "Line fit.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)
    flags.DEFINE_integer(
        "chunk_voxels",
        DEFAULT_CHUNK_VOXELS,
        "Voxels per jitted fit.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "mask_threshold",
        DEFAULT_MASK_THRESHOLD,
        "Body mask: fraction of the robust maximum of the mean fit-frame image (0: all voxels).",
        flag_values=fv,
    )
    return fv


def cli(argv: Sequence[str]) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    fv = _flag_values()
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: python -m {_PROG} --pet X_pet.nii.gz --tstar MIN --out DIR [flags]\n")
        print(fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise ValueError(f"unexpected positional arguments {rest[1:]}.")
        for name in ("pet", "tstar", "out"):
            if fv[name].value is None:
                raise ValueError(f"--{name} is required.")
        run(
            fv.pet,
            fv.out,
            fv.tstar,
            fv.tend,
            fv.method,
            blood=fv.blood,
            overwrite=fv.overwrite,
            chunk_voxels=fv.chunk_voxels,
            mask_threshold=fv.mask_threshold,
            progress=True,
        )
    except (flags.Error, ValueError, OSError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _parse_absl_defaults(argv: list[str]) -> list[str]:
    flags.FLAGS(argv[:1])  # absl's own flags keep their defaults; ours are parsed in `cli`
    return argv


def _main(argv: list[str]) -> int:
    std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    return cli(argv)


if __name__ == "__main__":
    app.run(_main, flags_parser=_parse_absl_defaults)
