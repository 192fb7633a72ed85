"""BIDS-PET writers: one subject's scan, `participants.tsv`, `dataset_description.json`, maps.

Writes the layout that `kinetix.data.bids.read.read_subject` reads (see the `kinetix.data.bids`
module docstring; `pet_sidecar` and `blood_sidecar` build its JSON sidecars), plus the NIfTI /
JSON / TSV helpers that `kinetix.data.bids.truth` reuses. Import these
names from `kinetix.data.bids`.
"""

import glob
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from kinetix.data.bids.derivatives import (
    BIDS_VERSION,
    check_output_root,
    generated_by,
    sidecar_path,
)
from kinetix.data.bids.study import Study, _is_number, load_nifti
from kinetix.kinetics.frames import FrameSchedule


# ------------------------------------------------------------------------------------------------
# Output directories
# ------------------------------------------------------------------------------------------------
def check_writable_dir(directory, what: str = "output directory") -> pathlib.Path:
    """Checks, before any computation, that files can be written in `directory`; changes nothing.

    An existing directory must accept a new file (a temporary file is created and removed). A
    missing one is not created here: its nearest existing ancestor must be a directory that
    accepts a new subdirectory (a temporary one is created and removed), so that a run that fails
    later leaves no empty directory behind.

    Args:
      directory: the output directory.
      what: how the sentence names it, e.g. "--out directory".

    Returns:
      `directory` as a `pathlib.Path`.

    Raises:
      PermissionError: the directory (or the ancestor it would be created in) is not writable.
      OSError: it exists and is not a directory, or an ancestor is a file, or another OS error.
    """
    directory = pathlib.Path(directory)
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        if probe == directory:
            raise NotADirectoryError(f"The {what} {directory} exists and is not a directory.")
        raise NotADirectoryError(
            f"The {what} {directory} cannot be created: {probe} is not a directory."
        )
    try:
        if probe == directory:
            fd, name = tempfile.mkstemp(prefix=".kinetix-write-test-", dir=directory)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".kinetix-write-test-", dir=probe))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = "" if probe == directory else f" (it would be created in {probe})"
        kind = PermissionError if isinstance(err, PermissionError) else OSError
        raise kind(f"The {what} {directory} is not writable{where}: {reason}.") from err
    return directory


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------
def _subject_label(subject: str) -> str:
    label = subject[len("sub-") :] if subject.startswith("sub-") else subject
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"subject must look like 'sub-01' (alphanumeric label), got {subject!r}.")
    return "sub-" + label


def check_outputs_free(paths, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raises FileExistsError naming the first existing path and ``flag`` (a command's
    ``--overwrite``, or ``overwrite=True`` for the library), unless ``overwrite``; call it on
    every output before anything is computed or written.

    Args:
      paths: the output paths (an iterable of str / Path).
      overwrite: existing outputs may be replaced.
      flag: how the caller names the setting that allows replacing them.
    """
    if overwrite:
        return
    for path in paths:
        if pathlib.Path(path).exists():
            raise FileExistsError(f"{path} already exists; pass {flag} to replace it.")


def check_command_outputs(out_root, files, overwrite: bool) -> pathlib.Path:
    """What a command checks of its `--out` before reading its input: none of `files` (nor the
    JSON sidecar of each NIfTI among them) exists unless `overwrite`, `out_root` holds no raw
    BIDS dataset (`derivatives.check_output_root`) and it can be written (`check_writable_dir`).

    Returns:
      `out_root` as a path.

    Raises:
      FileExistsError, ValueError, OSError: one sentence naming the file or directory.
    """
    files = list(files)
    sidecars = [sidecar_path(p) for p in files if p.name.endswith((".nii.gz", ".nii"))]
    check_outputs_free(list(dict.fromkeys([*files, *sidecars])), overwrite)
    check_output_root(out_root)
    return check_writable_dir(out_root, "output directory (--out)")


def _check_free(paths: Sequence[pathlib.Path], overwrite: bool) -> None:
    check_outputs_free(paths, overwrite, "overwrite=True")


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    value = float(value)
    return "n/a" if math.isnan(value) else repr(value)


def _write_tsv(path: pathlib.Path, columns: Mapping[str, Sequence]) -> None:
    names = list(columns)
    n_rows = {len(v) for v in columns.values()}
    if len(n_rows) != 1:
        raise ValueError(f"All columns written to {path} must have the same length.")
    lines = ["\t".join(names)]
    for i in range(n_rows.pop()):
        lines.append("\t".join(_format_cell(columns[n][i]) for n in names))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _descrip(text: str) -> bytes:
    return text.encode("ascii", "replace")[:79]


def _save_nifti(
    path: pathlib.Path,
    data: np.ndarray,
    affine: np.ndarray,
    dtype,
    description: str,
    header: nib.Nifti1Header | None = None,
    intent: str = "none",
    intent_name: str = "",
) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    hdr = img.header
    hdr.set_data_dtype(dtype)
    if header is None:
        hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = _descrip(description)
    hdr.set_intent(intent, name=intent_name[:15])
    hdr["cal_min"] = 0.0
    hdr["cal_max"] = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _check_affine(affine) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite [4, 4] array, got shape {affine.shape}.")
    return affine


def _check_frames(frames_bqml, schedule: FrameSchedule) -> np.ndarray:
    """`frames_bqml` as a finite float32 [X, Y, Z, T] array with T = `schedule.n_frames`."""
    frames = np.asarray(frames_bqml, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != schedule.n_frames:
        raise ValueError(
            f"frames_bqml must be [X, Y, Z, T] with T = {schedule.n_frames} frames, got shape "
            f"{frames.shape}."
        )
    if not np.all(np.isfinite(frames)):
        raise ValueError("frames_bqml has non-finite values.")
    return frames


def _check_blood(
    plasma_times_min, plasma_bqml, whole_blood_bqml
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(times [K] min, plasma [K] Bq/mL, whole blood [K] Bq/mL or None) as float64 arrays."""
    times = np.asarray(plasma_times_min, dtype=np.float64)
    plasma = np.asarray(plasma_bqml, dtype=np.float64)
    if times.ndim != 1 or plasma.shape != times.shape:
        raise ValueError(
            f"plasma_times_min and plasma_bqml must be 1-D of equal length, got {times.shape} "
            f"and {plasma.shape}."
        )
    if whole_blood_bqml is None:
        return times, plasma, None
    whole = np.asarray(whole_blood_bqml, dtype=np.float64)
    if whole.shape != times.shape:
        raise ValueError(
            f"whole_blood_bqml must match plasma_times_min {times.shape}, got {whole.shape}."
        )
    return times, plasma, whole


def _check_positive(name: str, value) -> None:
    """Raises ValueError naming `name` unless `value` is a positive finite number."""
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def _subject_paths(root, sub: str) -> dict[str, pathlib.Path]:
    """{"pet", "json", "blood_tsv", "blood_json"} paths of subject `sub` ("sub-01") under `root`."""
    pet_dir = pathlib.Path(root) / sub / "pet"
    return {
        "pet": pet_dir / f"{sub}_pet.nii.gz",
        "json": pet_dir / f"{sub}_pet.json",
        "blood_tsv": pet_dir / f"{sub}_recording-manual_blood.tsv",
        "blood_json": pet_dir / f"{sub}_recording-manual_blood.json",
    }


def pet_sidecar(
    schedule: FrameSchedule,
    injected_mbq: float,
    body_weight_kg: float,
    extra_sidecar: Mapping | None = None,
) -> dict:
    """The `_pet.json` sidecar that `write_subject` writes for a simulated FDG scan.

    Args:
      schedule: T frames (min); written as `FrameTimesStart` / `FrameDuration` in seconds
        rounded to 1 µs, with `DecayCorrectionFactor` = `schedule.decay_factors()` (F-18).
      injected_mbq: injected dose (MBq) at injection.
      body_weight_kg: body weight (kg).
      extra_sidecar: keys added to (or replacing) the defaults.

    Returns:
      The sidecar as a JSON-serialisable dict (TimeZero = injection = scan start).
    """
    start_s = np.round(schedule.start * 60.0, 6)
    dur_s = np.round(np.round(schedule.end * 60.0, 6) - start_s, 6)
    sidecar = {
        "Manufacturer": "kinetix",
        "ManufacturersModelName": "simulation",
        "Units": "Bq/mL",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
        "TracerMolecularWeight": 181.15,  # [18F]FDG, C6H11(18F)O5
        "TracerMolecularWeightUnits": "g/mol",
        "BodyPart": "CHEST",
        "ModeOfAdministration": "bolus",
        "InjectedRadioactivity": float(injected_mbq),
        "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a",
        "SpecificRadioactivityUnits": "n/a",
        "BodyWeight": float(body_weight_kg),
        "TimeZero": "00:00:00",
        "ScanStart": 0,
        "InjectionStart": 0,
        "FrameTimesStart": [float(x) for x in start_s],
        "FrameDuration": [float(x) for x in dur_s],
        "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "DecayCorrectionFactor": [float(x) for x in schedule.decay_factors()],
        "ReconMethodName": "none (simulated)",
        "ReconMethodParameterLabels": ["none"],
        "ReconMethodParameterUnits": ["none"],
        "ReconMethodParameterValues": [0],
        "ReconFilterType": "none",
        "ReconFilterSize": 0,
        "AttenuationCorrection": "none (simulated)",
    }
    sidecar.update(dict(extra_sidecar or {}))
    return sidecar


def _blood_columns(times_min, plasma_bqml, whole_blood_bqml=None) -> dict[str, np.ndarray]:
    """`_blood.tsv` columns: time [K] (s), plasma [K] and, if given, whole blood [K] (Bq/mL)."""
    columns = {"time": np.asarray(times_min) * 60.0, "plasma_radioactivity": plasma_bqml}
    if whole_blood_bqml is not None:
        columns["whole_blood_radioactivity"] = whole_blood_bqml
    return columns


def blood_sidecar(whole_blood: bool) -> dict:
    """The `_blood.json` sidecar: plasma (and whole blood if `whole_blood`) in Bq/mL, time in s."""
    desc = {
        "PlasmaAvail": True,
        "WholeBloodAvail": whole_blood,
        "MetaboliteAvail": False,
        "DispersionCorrected": False,
        "time": {
            "Description": "Time in relation to TimeZero defined in the _pet.json",
            "Units": "s",
        },
        "plasma_radioactivity": {
            "Description": "Radioactivity in plasma (the input function), decay-corrected to "
            "TimeZero",
            "Units": "Bq/mL",
        },
    }
    if whole_blood:
        desc["whole_blood_radioactivity"] = {
            "Description": "Radioactivity in whole blood, decay-corrected to TimeZero",
            "Units": "Bq/mL",
        }
    return desc


def write_subject(
    root,
    subject: str,
    frames_bqml,
    schedule: FrameSchedule,
    plasma_times_min,
    plasma_bqml,
    whole_blood_bqml,
    injected_mbq: float,
    body_weight_kg: float,
    affine,
    extra_sidecar: Mapping | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes one subject's FDG scan in the BIDS-PET layout that `read_subject` reads.

    Files: `sub-XX/pet/sub-XX_pet.nii.gz` (float32), `sub-XX_pet.json` (`pet_sidecar`),
    `sub-XX_recording-manual_blood.tsv` and `.json` (`blood_sidecar`). The image is taken as
    decay-corrected to TimeZero = injection (`InjectionStart = ScanStart =
    ImageDecayCorrectionTime = 0`); `DecayCorrectionFactor` is `schedule.decay_factors()` (F-18).

    Args:
      root: BIDS root directory (created if needed).
      subject: "sub-01" or "01".
      frames_bqml: [X, Y, Z, T] decay-corrected activity (Bq/mL), finite.
      schedule: T frames (min); written as seconds rounded to 1 µs.
      plasma_times_min: [K] blood sample times (min).
      plasma_bqml: [K] plasma activity (Bq/mL).
      whole_blood_bqml: [K] whole-blood activity (Bq/mL), or None.
      injected_mbq: injected dose (MBq) at injection.
      body_weight_kg: body weight (kg).
      affine: [4, 4] voxel-to-world (mm).
      extra_sidecar: keys added to (or replacing) the `_pet.json` defaults.
      overwrite: replace existing files; otherwise an existing file raises FileExistsError.

    Returns:
      The path of the written `_pet.nii.gz`.
    """
    sub = _subject_label(subject)
    frames = _check_frames(frames_bqml, schedule)
    times, plasma, whole = _check_blood(plasma_times_min, plasma_bqml, whole_blood_bqml)
    _check_positive("injected_mbq", injected_mbq)
    _check_positive("body_weight_kg", body_weight_kg)
    affine = _check_affine(affine)
    paths = _subject_paths(root, sub)
    _check_free(list(paths.values()), overwrite)

    sidecar = pet_sidecar(schedule, injected_mbq, body_weight_kg, extra_sidecar)
    description = "kinetix PET Bq/mL decay-corrected to TimeZero"
    _save_nifti(paths["pet"], frames, affine, np.float32, description)
    _write_json(paths["json"], sidecar)
    _write_tsv(paths["blood_tsv"], _blood_columns(times, plasma, whole))
    _write_json(paths["blood_json"], blood_sidecar(whole is not None))
    return paths["pet"]


_PARTICIPANT_COLUMNS = {
    "participant_id": {"Description": "Participant identifier"},
    "weight": {"Description": "Body weight", "Units": "kg"},
    "age": {"Description": "Age", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female", "O": "other"}},
    "split": {"Description": "kinetix data split (train, val or test)"},
}


def write_participants(
    root, rows: Sequence[Mapping[str, object]], overwrite: bool = False
) -> pathlib.Path:
    """Writes `participants.tsv` (+ `participants.json` for the known columns).

    Args:
      root: BIDS root directory.
      rows: one mapping per subject; `participant_id` ("sub-01") is required, `weight` is kg;
        columns are the union of keys (participant_id first), missing cells 'n/a'.
      overwrite: replace existing files.

    Returns:
      The path of `participants.tsv`.
    """
    root = pathlib.Path(root)
    if not rows:
        raise ValueError("rows must hold at least one participant.")
    names = ["participant_id"]
    for row in rows:
        if "participant_id" not in row:
            raise ValueError(f"Every row needs a 'participant_id', got keys {sorted(row)}.")
        names.extend(k for k in row if k not in names)
    tsv, js = root / "participants.tsv", root / "participants.json"
    _check_free([tsv, js], overwrite)
    _write_tsv(tsv, {name: [row.get(name) for row in rows] for name in names})
    _write_json(js, {n: _PARTICIPANT_COLUMNS[n] for n in names if n in _PARTICIPANT_COLUMNS})
    return tsv


def write_dataset_description(
    root,
    name: str = "kinetix simulated FDG cohort",
    overwrite: bool = False,
    *,
    authors: Sequence[str] = ("kinetix developers",),
    license: str = "CC0-1.0",
) -> pathlib.Path:
    """Writes `dataset_description.json` of a raw BIDS dataset; returns its path.

    Args:
      root: the dataset root.
      name: `Name`.
      overwrite: replace an existing file.
      authors: `Authors` (who made the data).
      license: `License`, an SPDX identifier (the simulated data are free of rights: CC0).
    """
    path = pathlib.Path(root) / "dataset_description.json"
    _check_free([path], overwrite)
    _write_json(
        path,
        {
            "Name": name,
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": license,
            "Authors": list(authors),
            "GeneratedBy": generated_by("python -m kinetix.simulate"),
        },
    )
    return path


def _like_to_header(like) -> tuple[nib.Nifti1Header, np.ndarray]:
    if isinstance(like, Study):
        header, affine = like.header, like.affine
    elif hasattr(like, "header") and hasattr(like, "affine"):
        header, affine = like.header, like.affine
    elif isinstance(like, tuple) and len(like) == 2:
        header, affine = like
    else:
        raise ValueError(
            "like must be a Study, a nibabel image or a (header, affine) tuple, got "
            f"{type(like).__name__}."
        )
    return nib.Nifti1Header.from_header(header), _check_affine(affine)


def write_map(
    path,
    data,
    like,
    *,
    description: str | None = None,
    intent_name: str = "",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a 3-D map or 4-D series on the grid of `like`, keeping its affine and header.

    The header is copied (voxel sizes, units, qform/sform codes, orientation); the data type is
    set to float32, `descrip` to `description`, the intent to NIFTI "estimate" (named
    `intent_name`, e.g. "Ki") for 3-D maps and "none" for 4-D series, and the display range
    (`cal_min/max`) is reset.

    Args:
      path: output `.nii.gz` (parent directories are created).
      data: [X, Y, Z] or [X, Y, Z, T] values (any units; say which in `description`).
      like: a `Study`, a nibabel image, or a (header, affine) tuple on the same [X, Y, Z] grid.
      description: NIfTI `descrip` (at most 79 ASCII characters are kept).
      intent_name: NIfTI intent name for 3-D maps (at most 15 characters).
      overwrite: replace an existing file; otherwise raise FileExistsError.

    Returns:
      `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    header, affine = _like_to_header(like)
    data = np.asarray(data, dtype=np.float32)
    grid = tuple(header.get_data_shape()[:3])
    if data.ndim not in (3, 4) or data.shape[:3] != grid:
        raise ValueError(
            f"data must be [X, Y, Z] or [X, Y, Z, T] on the grid {grid} of `like`, got shape "
            f"{data.shape}."
        )
    _check_free([path], overwrite)
    _save_nifti(
        path,
        data,
        affine,
        np.float32,
        description or "kinetix map",
        header=header,
        intent="estimate" if data.ndim == 3 else "none",
        intent_name=intent_name if data.ndim == 3 else "",
    )
    return path


FRAME_KEYS = ("FrameTimesStart", "FrameDuration", "DecayCorrectionFactor")
"""The per-frame lists of a PET sidecar (`cut_scan` keeps their first entries)."""


def cut_scan(pet_path, n_frames: int, *, drop_blood: bool = True) -> pathlib.Path:
    """Cuts a BIDS-PET scan in place to its first `n_frames` frames, as a shorter protocol
    (e.g. 22 frames: 0–35 min) would have acquired it; with `drop_blood`, also removes the
    blood recordings next to it (a clinic without arterial sampling).

    Args:
      pet_path: a `*_pet.nii.gz` with its `.json` sidecar.
      n_frames: frames to keep (1 ≤ n_frames ≤ the scan's frames).
      drop_blood: delete the `*_recording-*_blood.tsv` / `.json` of the same entities.

    Returns:
      `pet_path`.

    Raises:
      BidsError: the scan cannot be read; ValueError: `n_frames` out of range.
    """
    pet_path = pathlib.Path(pet_path)
    data, img = load_nifti(pet_path, "PET image")
    n = int(img.shape[3]) if len(img.shape) == 4 else 1
    if not 1 <= int(n_frames) <= n:
        raise ValueError(f"n_frames must lie in [1, {n}] for {pet_path}, got {n_frames}.")
    stem = pet_path.name[: -len(".nii.gz")] if pet_path.name.endswith(".gz") else pet_path.stem
    side_path = pet_path.with_name(stem + ".json")
    sidecar = json.loads(side_path.read_text())
    for key in FRAME_KEYS:
        if isinstance(sidecar.get(key), list):
            sidecar[key] = sidecar[key][: int(n_frames)]
    nib.save(nib.Nifti1Image(data[..., : int(n_frames)], img.affine, img.header), pet_path)
    _write_json(side_path, sidecar)
    if drop_blood:
        prefix = stem[: -len("_pet")] if stem.endswith("_pet") else stem
        for path in pet_path.parent.glob(f"{glob.escape(prefix)}_recording-*_blood.*"):
            path.unlink()
    return pet_path
