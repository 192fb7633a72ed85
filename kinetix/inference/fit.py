"""Voxelwise 2TCM maps of a BIDS-PET scan, read from disk and written back (`kinetix.fit`).

`fit_study` is what `python -m kinetix.fit` does: read the study (`kinetix.data.bids`, with its
plausibility checks), mask the body (`kinetix.maps.volume_mask`, rule "filled" on the fitted
frames, as `kinetix.parametric`), fit the 2TCM to every voxel's frames inside the window
(`kinetix.maps.volume_fit`: bounded weighted least squares, `kk.fit_2tcm`), and write, on the
image's grid, one NIfTI map per quantity with a JSON sidecar ("Description", "Units" as a
string, "Sources" as BIDS URIs), into the BIDS-Derivatives dataset `--out` (docs/bids.md; `<m>`
is the model, `2tcm` or `2tcmirreversible`):

    pet/<prefix>_km-<m>_<fv|K1|k2|k3|k4>.nii.gz    fitted rates (fv mL/mL, K1 mL/min/mL, k 1/min)
    pet/<prefix>_km-<m>_desc-stderr_<P>.nii.gz     their standard errors (+inf: not identifiable)
    pet/<prefix>_km-<m>_Ki.nii.gz (+ desc-stderr)  Ki = K1·k3/(k2 + k3) (mL/min/mL) and its SE
    pet/<prefix>_km-<m>_delay.nii.gz (+ stderr)    the fitted input delay (min), --fit_delay
    pet/<prefix>_km-<m>_wrss.nii.gz                weighted residual sum of squares (SUV²)
    pet/<prefix>_km-<m>_desc-converged_mask.nii.gz 1 where the solver converged
    anat/<prefix>_desc-fit_mask.nii.gz             the fitted voxels (body mask)
    pet/<prefix>_km-<m>_fit.json                   model, window, weights, bounds, convergence,
                                                   warnings

Every map is 0 outside the mask. `<prefix>` is the scan's entities (the image name without
`_pet.nii.gz`).
"""

import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np
from absl import logging

import kinetix.kinetics as kk
from kinetix import maps
from kinetix.data import bids
from kinetix.data.bids import derivatives as der
from kinetix.data.bids.write import check_command_outputs
from kinetix.inference import late
from kinetix.inference.patlak import DEFAULT_MASK_RULE, DEFAULT_MASK_THRESHOLD, output_stem

_PROG = "kinetix.fit"

UNITS = {"fv": "mL/mL", "K1": "mL/min/mL", "k2": "1/min", "k3": "1/min", "k4": "1/min"}
"""Units of the fitted rates (BIDS-style strings)."""

AT_BOUND_WARNING = 0.25
"""A fitted parameter that sits at its upper bound in more than this fraction of the voxels is
reported (the box may be too tight, or the data do not determine it). Lower bounds are 0, which
fv, k3 and k4 legitimately reach (no blood, no trapping, FDG's k4 ≈ 0)."""

CONVERGED_WARNING = 0.9
"""Fewer converged voxels than this fraction is reported."""


def parse_window(window) -> tuple[float, float] | None:
    """(start, end) in minutes from None, "START,END" or a pair; checked start < end, start ≥ 0."""
    if window is None:
        return None
    if isinstance(window, str):
        window = window.split(",")
    try:
        start, end = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"--window must be START,END in minutes, got {window!r}.") from None
    if not (0 <= start < end):
        raise ValueError(f"--window must satisfy 0 <= START < END (minutes), got {start},{end}.")
    return start, end


MASK_DESC = "fit"
"""`desc-` of the body mask of `kinetix.fit` (`anat/<prefix>_desc-fit_mask`)."""


def output_paths(
    pet_path, out_dir, fit_delay: bool = False, model: str = "2tcm"
) -> dict[str, pathlib.Path]:
    """{name: path} of every map `fit_study` writes in the derivative dataset `out_dir`
    (docs/bids.md): `<prefix>_km-<model>_<param>.nii.gz`, `..._desc-stderr_<param>`,
    `_km-<model>_Ki`, `_wrss`, `_desc-converged_mask`, `anat/<prefix>_desc-body_mask` and the
    summary `<prefix>_km-<model>_fit.json`. Each map's sidecar: `derivatives.sidecar_path(path)`."""
    prefix = output_stem(pet_path)
    km = der.label(model)
    names = list(kk.PARAM_NAMES) + (["delay"] if fit_delay else [])
    paths = {}
    for p in [*names, "Ki"]:
        paths[p] = der.map_path(out_dir, prefix, p, model=km)
        paths[f"{p}_stderr"] = der.map_path(out_dir, prefix, p, model=km, desc="stderr")
    paths["wrss"] = der.map_path(out_dir, prefix, "wrss", model=km)
    paths["converged"] = der.map_path(out_dir, prefix, "mask", model=km, desc="converged")
    paths["mask"] = der.image_path(out_dir, prefix, "mask", desc=MASK_DESC, datatype="anat")
    paths["summary"] = paths["Ki"].with_name(paths["Ki"].name.replace("_Ki.nii.gz", "_fit.json"))
    return paths


def fit_maps(
    study: bids.Study,
    *,
    window=None,
    model: str = "2tcm",
    fit_delay: bool = False,
    weights: str = maps.DEFAULT_WEIGHTS,
    mask_rule: str = DEFAULT_MASK_RULE,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    n_starts: int = 2,
    max_steps: int = 100,
    chunk_voxels: int = maps.DEFAULT_FIT_CHUNK,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Voxelwise 2TCM fit of a study inside its body mask.

    Args:
      study: a `kinetix.data.bids.Study` (frames SUV, schedule min, plasma and whole blood).
      window: (start, end) in min or None (the whole scan): frames wholly inside are fitted.
      model, fit_delay, weights, n_starts, max_steps: as in `kk.fit_2tcm`.
      mask_rule, mask_threshold: the body mask (`kinetix.maps.volume_mask`) on the fitted frames.
      chunk_voxels: voxels per jitted call.
      progress: a tqdm progress bar.

    Returns:
      (maps of `kinetix.maps.volume_fit` [X, Y, Z, ...], mask [X, Y, Z] bool, fitted frame
      indices).
    """
    window = parse_window(window)
    sched = study.schedule
    if window is None:
        fit = np.arange(sched.n_frames)
    else:
        fit = np.flatnonzero((sched.start >= window[0] - 1e-6) & (sched.end <= window[1] + 1e-6))
        if fit.size == 0:
            raise ValueError(
                f"--window {window[0]:g},{window[1]:g} min holds no whole frame of the scan "
                f"(0–{sched.end[-1]:g} min)."
            )
    mask = maps.volume_mask(study.frames, sched, mask_rule, mask_threshold, fit)
    result = maps.volume_fit(
        study.frames,
        study.plasma_input(),
        sched,
        mask,
        blood=study.blood_input(),
        model=model,
        window=window,
        fit_delay=fit_delay,
        weights=weights,
        n_starts=n_starts,
        max_steps=max_steps,
        chunk_voxels=chunk_voxels,
        progress=progress,
    )
    return result, mask, fit


def _map_arrays(result: dict, mask: np.ndarray, fit_delay: bool) -> dict[str, np.ndarray]:
    arrays = {}
    for i, p in enumerate(kk.PARAM_NAMES):
        arrays[p] = result["params"][..., i]
        arrays[f"{p}_stderr"] = result["stderr"][..., i]
    if fit_delay:
        arrays["delay"], arrays["delay_stderr"] = result["delay"], result["delay_stderr"]
    arrays["Ki"], arrays["Ki_stderr"] = result["ki"], result["ki_stderr"]
    arrays["wrss"] = result["wrss"]
    arrays["converged"] = result["converged"].astype(np.float32)
    arrays["mask"] = mask.astype(np.float32)
    return arrays


def _describe(key: str) -> tuple[str, str]:
    """(description, units) of one output map."""
    base = key.removesuffix("_stderr")
    units = {"Ki": "mL/min/mL", "delay": "min", **UNITS}.get(base, "")
    if key.endswith("_stderr"):
        return f"Standard error of the fitted {base} (inf: not identifiable)", units
    if key == "wrss":
        return "Weighted residual sum of squares of the fit", "SUV^2"
    if key == "converged":
        return "1 where the least-squares solver converged", "1"
    if key == "mask":
        return "Body mask: the fitted voxels (1 inside)", "1"
    if key == "Ki":
        return "Net influx rate Ki = K1*k3/(k2+k3) of the fitted 2TCM", units
    if key == "delay":
        return "Fitted input delay (Cp(t - delay))", units
    return f"Fitted 2TCM parameter {key}", units


def _warnings(result: dict, mask: np.ndarray, model: str, fit_delay: bool, ki_name: str):
    """Findings on the fit: parameters at a bound, poor convergence, Ki outside FDG ranges."""
    found = list(bids.ki_problems(result["ki"], mask, ki_name))
    inside = mask.astype(bool)
    n = int(inside.sum())
    if not n:
        return found
    conv = float(result["converged"][inside].mean())
    if conv < CONVERGED_WARNING:
        found.append(f"only {100 * conv:.0f} % of the voxels converged (max_steps may be low).")
    lower, upper = kk.DEFAULT_BOUNDS.lower, kk.DEFAULT_BOUNDS.upper
    free = kk.PARAM_NAMES if model == "2tcm" else kk.PARAM_NAMES[:4]
    for i, p in enumerate(free):
        v = result["params"][..., i][inside]
        at = float(np.mean(v >= upper[i] - 1e-4 * (upper[i] - lower[i])))
        if at > AT_BOUND_WARNING:
            found.append(
                f"{p} sits at its upper bound ({upper[i]:g}) in {100 * at:.0f} % of the voxels: "
                "the data do not determine it there."
            )
    return found


def fit_study(
    pet,
    out,
    *,
    blood=None,
    window: Sequence[float] | str | None = None,
    model: str = "2tcm",
    fit_delay: bool = False,
    weights: str = maps.DEFAULT_WEIGHTS,
    overwrite: bool = False,
    chunk_voxels: int = maps.DEFAULT_FIT_CHUNK,
    mask_rule: str = DEFAULT_MASK_RULE,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    n_starts: int = 2,
    max_steps: int = 100,
    progress: bool = False,
    check_plausibility: bool = True,
    idif_mask=None,
    idif_label=None,
    recording: str | None = None,
) -> dict[str, pathlib.Path]:
    """Reads a BIDS-PET scan, fits the 2TCM to every body voxel and writes the maps.

    Args:
      pet: `*_pet.nii.gz` (its `.json` sidecar is read automatically).
      out: output directory (checked writable before anything is read).
      blood: blood TSV; default the `*_recording-*_blood.tsv` next to the image.
      window, model, fit_delay, weights, n_starts, max_steps, mask_rule, mask_threshold,
        chunk_voxels, progress: as in `fit_maps`.
      overwrite: replace existing outputs; otherwise an existing one raises FileExistsError
        before anything is read.
      check_plausibility: refuse implausible image and blood values (`bids.read_subject`).
      idif_mask, idif_label: take the blood from the image (`kinetix.data.idif`); the IDIF is
        written beside the maps as `pet/<prefix>_recording-IDIF_blood.tsv` (+ .json).
      recording: the blood recording next to `pet` to read (e.g. "autosampler"; default: the
        only one, or "manual" among several; `bids.find_blood`); excludes `blood` and
        `idif_mask`.

    Returns:
      `output_paths(pet, out, fit_delay)` (each map's sidecar beside it; with `idif_mask` also
      "idif_tsv" and "idif_json").

    Raises:
      ValueError, OSError: bad arguments, unreadable or implausible inputs, an existing output
        or an output directory that is not writable; all before anything is computed.
    """
    if model not in kk.FIT_MODELS:
        raise ValueError(f"--model must be one of {kk.FIT_MODELS}, got {model!r}.")
    if mask_rule not in maps.MASK_RULES:
        raise ValueError(f"--mask_rule must be one of {maps.MASK_RULES}, got {mask_rule!r}.")
    window = parse_window(window)
    paths = output_paths(pet, out, fit_delay, model)
    check_command_outputs(out, [*paths.values(), *late.idif_paths(pet, out, idif_mask)], overwrite)
    t0 = time.perf_counter()
    study, input_used, idif_result = late.read_study(
        pet,
        blood=blood,
        idif_mask=idif_mask,
        idif_label=idif_label,
        check_plausibility=check_plausibility,
        recording=recording,
    )
    result, mask, fit = fit_maps(
        study,
        window=window,
        model=model,
        fit_delay=fit_delay,
        weights=weights,
        mask_rule=mask_rule,
        mask_threshold=mask_threshold,
        n_starts=n_starts,
        max_steps=max_steps,
        chunk_voxels=chunk_voxels,
        progress=progress,
    )
    t1 = time.perf_counter()
    links = der.open_outputs(out, "kinetix.fit", [study.pet_path, study.blood_path])
    idif_files = late.idif_paths(pet, out, idif_mask)
    blood_source = study.blood_path or (idif_files[0] if idif_files else None)
    sources = [der.bids_uri(p, links) for p in (study.pet_path, blood_source) if p]
    for key, data in _map_arrays(result, mask, fit_delay).items():
        description, units = _describe(key)
        bids.write_map(
            paths[key],
            data,
            study,
            description=description[:79],
            intent_name=key[:15],
            overwrite=overwrite,
        )
        meta = {"Description": description, "Units": units, "Sources": sources}
        if key == "mask":
            meta = {"Description": description, "Type": "ROI", "Sources": sources[:1]}
            meta["SpatialReference"] = sources[0]
        der.write_sidecar(paths[key], meta)
    warnings = list(study.warnings) + _warnings(result, mask, model, fit_delay, paths["Ki"].name)
    for w in warnings[len(study.warnings) :]:
        logging.warning("%s: %s", _PROG, w)
    inside = mask.astype(bool)
    summary = {
        "Description": "Voxelwise 2TCM fit (kinetix.fit): bounded weighted least squares.",
        "Sources": sources,
        "InputFunction": input_used,
        "Model": model,
        "FitDelay": bool(fit_delay),
        "Window": None if window is None else list(window),
        "TimeUnits": "min",
        "FramesUsed": [int(i) for i in fit],
        "Weights": weights,
        "Bounds": kk.DEFAULT_BOUNDS._asdict(),
        "Starts": int(n_starts),
        "MaxSteps": int(max_steps),
        "Voxels": int(inside.sum()),
        "ConvergedFraction": float(result["converged"][inside].mean()) if inside.any() else None,
        "Mask": {"RuleName": mask_rule, "MaskThreshold": float(mask_threshold)},
        "Conventions": "docs/conventions.md, 'Voxelwise 2TCM fitting'",
        "Warnings": warnings,
        "SoftwareName": "kinetix",
        "SoftwareVersion": der.kinetix_version(),
    }
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    logging.info(
        "%s: %d voxels fitted in %.1f s (%.0f %% converged) -> %s",
        _PROG,
        summary["Voxels"],
        t1 - t0,
        100 * (summary["ConvergedFraction"] or 0),
        out,
    )
    if idif_result is not None:
        blood_paths = late.write_idif_blood(idif_result, study, out, overwrite)
        paths.update(zip(("idif_tsv", "idif_json"), blood_paths, strict=True))
    return paths
