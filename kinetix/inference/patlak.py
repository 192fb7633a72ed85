"""Voxelwise Patlak Ki and V0 maps of a BIDS-PET scan, read from disk and written back.

`patlak_study` is what `python -m kinetix.parametric` does: read the study (`kinetix.data.bids`),
choose the fit frames (mid-time in [t*, t_end], TPCCLIB's rule), mask the body
(`kinetix.maps.volume_mask`, rule "filled" by default), fit Patlak in chunks inside the mask
(`kinetix.maps.volume_patlak`), and write, into the BIDS-Derivatives dataset `--out`
(docs/bids.md), `pet/<prefix>_km-patlak_Ki.nii.gz` (1/min = mL/min/mL),
`pet/<prefix>_km-patlak_V0.nii.gz` (mL/mL) and `anat/<prefix>_desc-patlak_mask.nii.gz` (1 inside
the body mask) on the image's grid (affine and header kept), each with a JSON sidecar; the Ki
map's holds the method, t*, t_end, frames used, conventions, version and "Warnings" (a Ki map
or inputs outside the plausible FDG ranges, docs/conventions.md, "Plausibility checks").
`<prefix>` is the scan's entities, the image name without `_pet.nii.gz` (e.g. `sub-01` or
`sub-01_ses-1`). `patlak_maps` does the same on an in-memory `Study`.
"""

import concurrent.futures
import glob
import json
import pathlib
import time

import nibabel as nib
import numpy as np
from absl import logging

import kinetix.kinetics as kk
from kinetix import maps
from kinetix.data import bids
from kinetix.data.bids import derivatives as der
from kinetix.data.bids.write import check_command_outputs
from kinetix.inference import late

DEFAULT_MASK_THRESHOLD = 0.02
"""Body mask (rule "filled"): fraction of the robust maximum of the mean fit-frame SUV."""

DEFAULT_MASK_RULE = "filled"
"""`kinetix.maps.mask` rule of `kinetix.parametric` (fills the lungs in-plane)."""

CONVENTIONS = (
    "Patlak plot y = C_m/Cp_m against x = (integral of Cp from injection to the frame mid-time) "
    "/ Cp_m, with Cp_m the plain frame mean of the piecewise-linear plasma curve (TPCCLIB "
    "imgki/patlak conventions, no decay weighting of Cp); frames enter when their mid-time lies "
    "in [t*, t_end]; images decay-corrected to injection, activity in SUV (Ki and V0 do not "
    "depend on the activity unit)."
)

_PROG = "kinetix.parametric"


def patlak_maps(
    study: bids.Study,
    t_star: float,
    t_end: float | None = None,
    method: str = "ols",
    chunk_voxels: int = maps.DEFAULT_CHUNK_VOXELS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    *,
    mask_rule: str = DEFAULT_MASK_RULE,
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
      mask_threshold: the body-mask rule's threshold, in [0, 1); 0 fits every voxel.
      mask_rule: a `kinetix.maps.MASK_RULES` name ("filled": the mean of the fit frames).
      progress: show a tqdm progress bar (stderr).

    Returns:
      (ki [X, Y, Z] float32 in 1/min, v0 [X, Y, Z] float32 in mL/mL, mask [X, Y, Z] bool).
      Ki and V0 are 0 outside the mask.

    Raises:
      ValueError: bad method, t_star / t_end, chunk_voxels, mask rule or mask_threshold.
    """
    if method not in kk.METHODS:
        raise ValueError(f"method must be one of {kk.METHODS}, got {method!r}.")
    fit = maps.fit_frames(study.schedule, t_star, t_end)
    if not (0.0 <= mask_threshold < 1.0):
        raise ValueError(f"mask_threshold must lie in [0, 1), got {mask_threshold}.")
    mask = maps.volume_mask(study.frames, study.schedule, mask_rule, mask_threshold, fit)
    ki, v0 = maps.volume_patlak(
        study.frames,
        study.plasma_input(),
        study.schedule,
        fit,
        mask,
        method,
        chunk_voxels,
        progress=progress,
    )
    return ki, v0, mask


def output_stem(pet_path) -> str:
    """`<prefix>` of an image `<prefix>_pet.nii[.gz]`, e.g. `sub-01_ses-1` (the scan's entities;
    `kinetix.data.bids.derivatives.scan_prefix`).

    Raises:
      ValueError: the name does not end in .nii.gz or .nii.
    """
    try:
        return der.scan_prefix(pet_path)
    except ValueError:
        raise ValueError(
            f"--pet {pet_path} is not a NIfTI file (expected .nii.gz or .nii)."
        ) from None


MODEL = "patlak"
"""The `km-` label of Patlak maps."""

MASK_DESC = "patlak"
"""`desc-` of the body mask of `kinetix.parametric` (`anat/<prefix>_desc-patlak_mask`)."""


def output_paths(pet_path, out_dir) -> dict[str, pathlib.Path]:
    """{"ki", "v0", "mask", "json", "v0_json", "mask_json"}: the maps and sidecars of
    `patlak_study` in the derivative dataset `out_dir` (docs/bids.md)."""
    prefix = output_stem(pet_path)
    ki = der.map_path(out_dir, prefix, "Ki", model=MODEL)
    v0 = der.map_path(out_dir, prefix, "V0", model=MODEL)
    mask = der.image_path(out_dir, prefix, "mask", desc=MASK_DESC, datatype="anat")
    return {
        "ki": ki,
        "v0": v0,
        "mask": mask,
        "json": der.sidecar_path(ki),
        "v0_json": der.sidecar_path(v0),
        "mask_json": der.sidecar_path(mask),
    }


def _warm_up(pet, blood, t_star, t_end, method: str, chunk_voxels: int) -> None:
    """Best effort: compiles the chunk fit while `run` reads (decompresses) the image.

    Peeks at the sidecar's frame times, the plasma row count of the blood TSV and the NIfTI
    header, i.e. at the shapes `patlak_maps` will use. Errors are left to `bids.read_subject`
    to report; a wrong peek only costs an unused compilation.
    """
    try:
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
        inp = kk.SampledInput(np.arange(n, dtype=np.float32), np.zeros(n, np.float32))
        maps.warm_up(inp, sched, fit, nib.load(pet).shape[:3], method, chunk_voxels)
    except Exception as err:  # noqa: BLE001 - an optimisation only
        logging.debug("%s: no warm-up compilation (%s)", _PROG, err)


def _check_study_args(method: str, mask_threshold: float) -> None:
    """Checks the arguments `patlak_study` validates before reading anything."""
    if method not in kk.METHODS:
        raise ValueError(f"method must be one of {kk.METHODS}, got {method!r}.")
    if not (0.0 <= mask_threshold < 1.0):
        raise ValueError(f"mask_threshold must lie in [0, 1), got {mask_threshold}.")


def _submit_map_writes(pool, paths, study, ki, v0, mask, description: str, overwrite: bool):
    """Starts writing the Ki, V0 and mask maps on `study`'s grid; returns the futures."""
    outputs = (
        ("ki", ki, f"{description} Ki (1/min)", "Ki"),
        ("v0", v0, f"{description} V0 (mL/mL)", "V0"),
        ("mask", mask.astype(np.float32), "Patlak body mask (1 inside)", "mask"),
    )
    return [
        pool.submit(
            bids.write_map,
            paths[key],
            data,
            study,
            description=text,
            intent_name=intent,
            overwrite=overwrite,
        )
        for key, data, text, intent in outputs
    ]


def patlak_sidecar(
    study: bids.Study,
    fit,
    method: str,
    t_star: float,
    t_end: float | None,
    mask: np.ndarray,
    mask_threshold: float,
    mask_rule: str,
    warnings=(),
    links=None,
) -> dict:
    """The Ki map's JSON sidecar of `patlak_study`: sources, fit window, conventions, mask.

    Args:
      study: the study that was fitted (its `pet_path`, `blood_path` and schedule, min).
      fit: [F] indices of the fitted frames.
      method, t_star, t_end, mask_threshold, mask_rule: as in `patlak_maps` (min).
      mask: [X, Y, Z] bool body mask.
      warnings: sentences on implausible inputs accepted and on the Ki map (`ki_warnings`).
      links: the output dataset's links (`derivatives.open_outputs`): `Sources` become BIDS
        URIs; None: file URIs.

    Returns:
      A JSON-serialisable dict (`Units` a string).
    """
    sched = study.schedule
    return {
        "Description": "Voxelwise Patlak graphical analysis (kinetix.parametric).",
        "Sources": [der.bids_uri(p, links or {}) for p in (study.pet_path, study.blood_path) if p],
        "Method": method,
        "TStar": float(t_star),
        "TEnd": float(sched.end[-1]) if t_end is None else float(t_end),
        "TimeUnits": "min",
        "FramesUsed": [int(i) for i in fit],
        "FrameMidTimesUsed": [round(float(sched.mid[i]), 6) for i in fit],
        "Conventions": CONVENTIONS,
        "InputFunction": "plasma_radioactivity column of the blood TSV, piecewise linear",
        "Units": "mL/min/mL",
        "Mask": {
            "MaskThreshold": float(mask_threshold),
            "RobustMaxPercentile": maps.ROBUST_MAX_PERCENTILE,
            "Voxels": int(np.count_nonzero(mask)),
            "RuleName": mask_rule,
            "Rule": maps.MASK_RULE_DESCRIPTIONS[mask_rule] + "; Ki = V0 = 0 outside",
        },
        "Warnings": list(warnings),
        "SoftwareName": "kinetix",
        "SoftwareVersion": der.kinetix_version(),
    }


def write_v0_mask_sidecars(paths: dict, ki_sidecar: dict, command: str) -> None:
    """The sidecars of the V0 map and the body mask, beside the Ki map's (`ki_sidecar`)."""
    der.write_sidecar(
        paths["v0"],
        {
            "Description": f"Patlak intercept V0 of the fit that gave the Ki map ({command})",
            "Units": "mL/mL",
            "Sources": ki_sidecar["Sources"],
        },
    )
    der.write_sidecar(
        paths["mask"],
        {
            "Description": f"Body mask of {command}: the voxels fitted (1 inside; maps are 0 "
            "outside)",
            "Type": "ROI",
            "Sources": ki_sidecar["Sources"][:1],
            "SpatialReference": ki_sidecar["Sources"][0],
        },
    )


def ki_warnings(study: bids.Study, ki: np.ndarray, mask: np.ndarray, name: str) -> list[str]:
    """Findings to record with a Ki map; those on Ki are logged as warnings.

    Args:
      study: the study read (its `warnings`: implausible inputs accepted with
        `check_plausibility=False`).
      ki: [X, Y, Z] Ki (1/min).
      mask: [X, Y, Z] body mask.
      name: the Ki map's file name (named in the sentences).

    Returns:
      `study.warnings` followed by `kinetix.data.bids.ki_problems` (Ki outside the plausible FDG
      ranges of docs/conventions.md, "Plausibility checks").
    """
    problems = bids.ki_problems(ki, mask, name)
    for problem in problems:  # the study's own were logged when it was read
        logging.warning("%s: %s", _PROG, problem)
    return list(study.warnings) + problems


def patlak_study(
    pet,
    out,
    t_star: float,
    t_end: float | None = None,
    method: str = "ols",
    blood=None,
    overwrite: bool = False,
    chunk_voxels: int = maps.DEFAULT_CHUNK_VOXELS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    mask_rule: str = DEFAULT_MASK_RULE,
    progress: bool = False,
    check_plausibility: bool = True,
    idif_mask=None,
    idif_label=None,
    late_input: str = "measured",
    late_sample=None,
    population=None,
    recording: str | None = None,
) -> dict[str, pathlib.Path]:
    """Reads a BIDS-PET scan, computes `patlak_maps` and writes the maps and sidecar.

    Args:
      pet: `*_pet.nii.gz`; its `.json` sidecar is read automatically.
      out: output directory (created when the maps are written; checked writable first).
      t_star, t_end, method, chunk_voxels, mask_threshold, progress: as in `patlak_maps`.
      blood: blood TSV; default the `*_recording-*_blood.tsv` next to the image.
      overwrite: replace existing outputs; otherwise an existing output raises FileExistsError
        before anything is read.
      check_plausibility: refuse image and blood values outside the plausible FDG ranges
        (`bids.read_subject`); False proceeds and records them in the sidecar's "Warnings".
      idif_mask, idif_label: take the blood from the image (`kinetix.data.idif`); the IDIF is
        written beside the maps as `pet/<prefix>_recording-IDIF_blood.tsv` (+ .json).
      late_input, late_sample, population: how Cp after 35 min is obtained when the blood
        ends there and the scan does not (`kinetix.inference.late.read_study`).
      recording: the blood recording next to `pet` to read (e.g. "autosampler"; default: the
        only one, or "manual" among several; `bids.find_blood`); excludes `blood` and
        `idif_mask`.

    Returns:
      `output_paths(pet, out)`; the sidecar is `patlak_sidecar`, whose "Warnings" also lists a
      Ki map outside the plausible FDG ranges (`ki_warnings`, logged as warnings too).

    Raises:
      ValueError, OSError: bad arguments, an unreadable, truncated or implausible input, an
        existing output (without `overwrite`) or an output directory that is not writable;
        nothing is written then.
    """
    _check_study_args(method, mask_threshold)
    paths = output_paths(pet, out)
    check_command_outputs(out, [*paths.values(), *late.idif_paths(pet, out, idif_mask)], overwrite)
    t0 = time.perf_counter()
    population = late.load_population(late_input, population)
    plain = idif_mask is None and late_input == "measured"  # the blood file's samples as read
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        if plain:
            warm = pool.submit(_warm_up, pet, blood, t_star, t_end, method, chunk_voxels)
        study, input_used, idif_result = late.read_study(
            pet,
            blood=blood,
            idif_mask=idif_mask,
            idif_label=idif_label,
            late=late_input,
            late_sample=late_sample,
            population=population,
            check_plausibility=check_plausibility,
            recording=recording,
        )
        fit = maps.fit_frames(study.schedule, t_star, t_end)  # the window, before mask and fit
        t1 = time.perf_counter()
        if plain:
            warm.result()
        ki, v0, mask = patlak_maps(
            study,
            t_star,
            t_end,
            method,
            chunk_voxels,
            mask_threshold,
            mask_rule=mask_rule,
            progress=progress,
        )
        t2 = time.perf_counter()
        links = der.open_outputs(out, "kinetix.parametric", [study.pet_path, study.blood_path])
        descr = f"Patlak {method} t*={t_star:g} min"
        for done in _submit_map_writes(pool, paths, study, ki, v0, mask, descr, overwrite):
            done.result()
    warnings = ki_warnings(study, ki, mask, paths["ki"].name)
    sidecar = patlak_sidecar(
        study, fit, method, t_star, t_end, mask, mask_threshold, mask_rule, warnings, links
    )
    sidecar["InputFunction"] = input_used
    paths["json"].write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
    write_v0_mask_sidecars(paths, sidecar, "kinetix.parametric")
    if idif_result is not None:
        blood_paths = late.write_idif_blood(idif_result, study, out, overwrite)
        paths.update(zip(("idif_tsv", "idif_json"), blood_paths, strict=True))
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
