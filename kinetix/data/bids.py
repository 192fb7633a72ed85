"""BIDS-PET reading, validation and writing (the only place where seconds become minutes).

Layout (see shared/design/ARCHITECTURE.md, "BIDS-PET files")::

    ROOT/dataset_description.json
    ROOT/participants.tsv (+ .json)                      participant_id, weight (kg), ...
    ROOT/sub-XX/pet/sub-XX_pet.nii.gz                    4-D float32 [X, Y, Z, T], Bq/mL
    ROOT/sub-XX/pet/sub-XX_pet.json                      frame times (s), dose, units, ...
    ROOT/sub-XX/pet/sub-XX_recording-manual_blood.tsv    time (s), plasma_radioactivity,
                                                         whole_blood_radioactivity (Bq/mL)
    ROOT/sub-XX/pet/sub-XX_recording-manual_blood.json   column descriptions and units
    ROOT/derivatives/truth/sub-XX/ ...                   simulator ground truth (`write_truth`)

Conversions done by `read_subject` (and nowhere else in kinetix):

* Times: BIDS seconds -> minutes (frame schedule, blood sample times).
* Activity: image and blood values -> SUV (g/mL) = Bq/mL × body weight [g] / dose [Bq]. The
  dose `InjectedRadioactivity` was measured at `InjectionStart` (s after `TimeZero`); it is
  decay-corrected to the image's decay-correction reference `ImageDecayCorrectionTime` (s after
  `TimeZero`, default 0): dose_ref = dose · exp(−λ·(ImageDecayCorrectionTime − InjectionStart)),
  with λ from `TracerRadionuclide`. This SUV equals "image decay-corrected to TimeZero × weight /
  dose at TimeZero", which is what kinetix's frame model (`kk.pet_frames`) assumes, so any
  reference time works. Blood radioactivities are taken as decay-corrected to the same reference
  as the image and are scaled by the same `suv_factor`.
* Images must be decay-corrected (`ImageDecayCorrected: true`); otherwise reading fails.

Validation failures raise `BidsError` (a `ValueError`) with one sentence that names the file and
the key or column at fault.
"""

import dataclasses
import glob
import importlib.metadata
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from kinetix.kinetics.frames import F18_DECAY_CONSTANT, F18_HALF_LIFE_MIN, FrameSchedule

IMAGE_UNITS = {
    "Bq/mL": 1.0,
    "Bq/ml": 1.0,
    "kBq/mL": 1e3,
    "kBq/ml": 1e3,
    "MBq/mL": 1e6,
    "MBq/ml": 1e6,
}
"""Accepted activity-concentration units (image `Units`, blood columns) -> factor to Bq/mL."""

DOSE_UNITS = {
    "Bq": 1.0,
    "kBq": 1e3,
    "MBq": 1e6,
    "GBq": 1e9,
    "uCi": 3.7e4,
    "µCi": 3.7e4,
    "mCi": 3.7e7,
}
"""Accepted `InjectedRadioactivityUnits` -> factor to Bq."""

HALF_LIFE_MIN = {
    "F18": F18_HALF_LIFE_MIN,
    "C11": 20.364,
    "N13": 9.965,
    "O15": 2.0373,
    "Ga68": 67.71,
}
"""Half-lives (min) of the accepted `TracerRadionuclide` values (also as "18F", "F-18", ...)."""

MAX_FRAME_START_S = 1e5
"""Frame start times above this (s) look like clock times (hhmmss) or milliseconds."""

MAX_SCAN_S = 24 * 3600.0
"""Scans (or blood curves) longer than 24 h are taken as a units mistake."""

BLOOD_COVER_RTOL = 0.01
"""The last blood sample may end this fraction of the scan end time before the last frame ends."""

MAX_BODY_WEIGHT_KG = 1000.0
"""`BodyWeight` above this is taken as grams given where kg are expected."""

_TIME_TOL_S = 1e-6  # frame overlap tolerance (s), well inside FrameSchedule's 1e-9 min
_CANONICAL_PARAMS = ("fv", "K1", "k2", "k3", "k4")


class BidsError(ValueError):
    """A BIDS-PET file is missing, malformed or inconsistent (message names file and key)."""


# ------------------------------------------------------------------------------------------------
# Study
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Study:
    """One subject's dynamic PET scan and blood curves, in kinetix units (SUV, minutes).

    Attributes:
      frames: [X, Y, Z, T] float32 decay-corrected activity in SUV (g/mL).
      schedule: frame schedule (minutes from TimeZero), `T` frames.
      plasma_times: [K] float32 plasma sample times (min), strictly increasing, >= 0.
      plasma: [K] float32 plasma activity (SUV): the input function.
      whole_blood: [K] float32 whole-blood activity (SUV) at `plasma_times`, or None.
      suv_factor: multiply Bq/mL by this to get SUV (g/Bq: body weight [g] / dose [Bq]).
      affine: [4, 4] voxel-to-world (mm) affine of the image.
      header: the image's NIfTI header (to write maps on the same grid, see `write_map`).
      subject: e.g. "sub-01" (the file name stem when it has no `sub-` entity).
      pet_path: the `*_pet.nii.gz` read, or None for an in-memory study.
      sidecar: the `*_pet.json` contents.
      decay_constant: decay constant of the tracer's radionuclide (1/min).
      blood_path: the blood TSV read, or None.
    """

    frames: np.ndarray
    schedule: FrameSchedule
    plasma_times: np.ndarray
    plasma: np.ndarray
    whole_blood: np.ndarray | None
    suv_factor: float
    affine: np.ndarray
    header: nib.Nifti1Header
    subject: str
    pet_path: pathlib.Path | None = None
    sidecar: dict = dataclasses.field(default_factory=dict)
    decay_constant: float = F18_DECAY_CONSTANT
    blood_path: pathlib.Path | None = None

    def __post_init__(self):
        frames = np.asarray(self.frames, dtype=np.float32)
        if frames.ndim != 4 or frames.shape[-1] != self.schedule.n_frames:
            raise ValueError(
                f"Study frames must be [X, Y, Z, T] with T = {self.schedule.n_frames} frames, "
                f"got shape {frames.shape}."
            )
        times = np.asarray(self.plasma_times, dtype=np.float32)
        plasma = np.asarray(self.plasma, dtype=np.float32)
        if times.ndim != 1 or plasma.shape != times.shape:
            raise ValueError(
                f"Study plasma_times and plasma must be 1-D of equal length, got {times.shape} "
                f"and {plasma.shape}."
            )
        blood = self.whole_blood
        if blood is not None:
            blood = np.asarray(blood, dtype=np.float32)
            if blood.shape != times.shape:
                raise ValueError(
                    f"Study whole_blood must match plasma_times {times.shape}, got {blood.shape}."
                )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Study affine must be [4, 4], got {affine.shape}.")
        for name, value in (
            ("frames", frames),
            ("plasma_times", times),
            ("plasma", plasma),
            ("whole_blood", blood),
            ("affine", affine),
        ):
            object.__setattr__(self, name, value)

    def plasma_input(self):
        """The plasma curve as `kk.SampledInput(plasma_times [min], plasma [SUV])`."""
        from kinetix.kinetics.input_function import SampledInput

        return SampledInput(self.plasma_times, self.plasma)

    def blood_input(self):
        """The whole-blood curve as `kk.SampledInput` (min, SUV), or None when not measured."""
        if self.whole_blood is None:
            return None
        from kinetix.kinetics.input_function import SampledInput

        return SampledInput(self.plasma_times, self.whole_blood)


# ------------------------------------------------------------------------------------------------
# Small readers and validators
# ------------------------------------------------------------------------------------------------
def _nifti_stem(path: pathlib.Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    raise BidsError(f"{path} is not a NIfTI file (expected a name ending in .nii.gz or .nii).")


def _subject_from_name(stem: str) -> str:
    match = re.match(r"(sub-[A-Za-z0-9]+)", stem)
    return match.group(1) if match else stem


def _load_json(path: pathlib.Path, what: str) -> dict:
    if not path.is_file():
        raise BidsError(f"The {what} {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BidsError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise BidsError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _require(sidecar: Mapping, key: str, path: pathlib.Path):
    if key not in sidecar or sidecar[key] is None:
        raise BidsError(f"{path} lacks the required key '{key}'.")
    return sidecar[key]


def _is_number(value) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _number(value, key: str, path: pathlib.Path, *, positive: bool = False) -> float:
    if not _is_number(value):
        raise BidsError(f"{path} key '{key}' must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise BidsError(f"{path} key '{key}' must be positive, got {value!r}.")
    return float(value)


def _number_list(value, key: str, path: pathlib.Path, unit: str = " (seconds)") -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise BidsError(
            f"{path} key '{key}' must be a non-empty list of numbers{unit}, got "
            f"{str(value)[:40]!r}."
        )
    bad = [i for i, v in enumerate(value) if not _is_number(v)]
    if bad:
        raise BidsError(
            f"{path} key '{key}' must list finite numbers{unit}, but entry {bad[0]} is "
            f"{value[bad[0]]!r}."
        )
    return np.asarray(value, dtype=np.float64)


def _bool(value, key: str, path: pathlib.Path) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BidsError(f"{path} key '{key}' must be true or false, got {value!r}.")


def _unit(value, table: Mapping[str, float], key: str, path: pathlib.Path) -> float:
    if not isinstance(value, str) or value.strip() not in table:
        raise BidsError(
            f"{path} key '{key}' has unknown units {value!r} (kinetix accepts "
            f"{', '.join(sorted(set(table)))})."
        )
    return table[value.strip()]


def _half_life_min(value, key: str, path: pathlib.Path) -> float:
    if isinstance(value, str):
        compact = re.sub(r"[^A-Za-z0-9]", "", value)
        match = re.fullmatch(r"([A-Za-z]{1,2})(\d{1,3})|(\d{1,3})([A-Za-z]{1,2})", compact)
        if match:
            element = (match.group(1) or match.group(4)).capitalize()
            mass = match.group(2) or match.group(3)
            if element + mass in HALF_LIFE_MIN:
                return HALF_LIFE_MIN[element + mass]
    raise BidsError(
        f"{path} key '{key}' names an unknown radionuclide {value!r} (kinetix knows "
        f"{', '.join(HALF_LIFE_MIN)})."
    )


def _read_tsv(path: pathlib.Path) -> dict[str, list[str]]:
    """Columns of a tab-separated file with a header row, as lists of strings."""
    if not path.is_file():
        raise BidsError(f"The table {path} does not exist.")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise BidsError(f"{path} is empty (expected a header row of column names).")
    names = [n.strip() for n in lines[0].split("\t")]
    columns: dict[str, list[str]] = {n: [] for n in names}
    for i, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(names):
            raise BidsError(
                f"{path} line {i} has {len(cells)} tab-separated cells but the header has "
                f"{len(names)}."
            )
        for name, cell in zip(names, cells, strict=True):
            columns[name].append(cell.strip())
    return columns


def _float_column(cells: Sequence[str], column: str, path: pathlib.Path) -> np.ndarray:
    """Floats, with BIDS 'n/a' (or empty) as NaN."""
    out = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        if cell.lower() in ("n/a", "na", "nan", ""):
            out[i] = np.nan
            continue
        try:
            out[i] = float(cell)
        except ValueError as err:
            raise BidsError(
                f"{path} column '{column}' row {i + 1} is not a number: {cell!r}."
            ) from err
    return out


def _cell_value(cell: str):
    if cell.lower() in ("n/a", ""):
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


# ------------------------------------------------------------------------------------------------
# Dataset-level readers
# ------------------------------------------------------------------------------------------------
def find_subjects(root) -> list[pathlib.Path]:
    """All PET images of a BIDS dataset, sorted.

    Matches `sub-*/pet/*_pet.nii[.gz]` and `sub-*/ses-*/pet/*_pet.nii[.gz]` under `root`.

    Raises:
      BidsError: if `root` does not exist or holds no PET images.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise BidsError(f"The BIDS root {root} does not exist or is not a directory.")
    found = set()
    for pattern in ("sub-*/pet/*_pet.nii.gz", "sub-*/ses-*/pet/*_pet.nii.gz"):
        found.update(root.glob(pattern))
        found.update(root.glob(pattern[: -len(".gz")]))
    if not found:
        raise BidsError(f"The BIDS root {root} holds no sub-*/pet/*_pet.nii.gz images.")
    return sorted(found)


def read_participants(root) -> dict[str, dict]:
    """`participants.tsv` of a BIDS root as {participant_id: {column: value}}.

    Values are floats where they parse as numbers, None for 'n/a', strings otherwise. BIDS puts
    body weight in the `weight` column (kg).

    Raises:
      BidsError: if the file is missing or lacks the `participant_id` column.
    """
    path = pathlib.Path(root) / "participants.tsv"
    columns = _read_tsv(path)
    if "participant_id" not in columns:
        raise BidsError(f"{path} lacks the required column 'participant_id'.")
    ids = columns["participant_id"]
    return {
        pid: {name: _cell_value(cells[i]) for name, cells in columns.items()}
        for i, pid in enumerate(ids)
    }


def _find_participants(pet_path: pathlib.Path) -> pathlib.Path | None:
    """participants.tsv of the dataset holding `sub-XX/[ses-YY/]pet/<image>`, if any."""
    for parent in list(pet_path.parents)[1:4]:
        if (parent / "participants.tsv").is_file():
            return parent / "participants.tsv"
        if (parent / "dataset_description.json").is_file():
            return None  # the dataset root, without participants.tsv
    return None


def _body_weight_kg(
    sidecar: Mapping, sidecar_path: pathlib.Path, pet_path: pathlib.Path, subject: str
) -> float:
    if sidecar.get("BodyWeight") is not None:
        weight = _number(sidecar["BodyWeight"], "BodyWeight", sidecar_path, positive=True)
        where, key = sidecar_path, "BodyWeight"
    else:
        participants = _find_participants(pet_path)
        row = read_participants(participants.parent).get(subject) if participants else None
        value = None
        if row is not None:
            value = row.get("weight", row.get("BodyWeight"))
        if value is None:
            where = (
                f"{participants} has no 'weight'"
                if participants
                else "no participants.tsv with a 'weight' column was found"
            )
            raise BidsError(
                f"{sidecar_path} lacks the required key 'BodyWeight' (kg) and {where} for "
                f"{subject}."
            )
        weight = _number(value, "weight", participants, positive=True)
        where, key = participants, "weight"
    if weight > MAX_BODY_WEIGHT_KG:
        raise BidsError(
            f"{where} key '{key}' is {weight}, which looks like grams; BIDS body weight is in kg."
        )
    return weight


# ------------------------------------------------------------------------------------------------
# Subject reader
# ------------------------------------------------------------------------------------------------
def _suv_factor(
    sidecar: Mapping, path: pathlib.Path, pet_path: pathlib.Path, subject: str
) -> tuple[float, float, float]:
    """(SUV factor [g/Bq], image unit -> Bq/mL factor, decay constant [1/min]) from a sidecar.

    The dose is decay-corrected from `InjectionStart` to `ImageDecayCorrectionTime` (module
    docstring); both default to 0 s after TimeZero.
    """

    def req(key):
        return _require(sidecar, key, path)

    if not _bool(req("ImageDecayCorrected"), "ImageDecayCorrected", path):
        raise BidsError(
            f"{path} key 'ImageDecayCorrected' is false; kinetix expects images decay-corrected "
            "to TimeZero (apply DecayCorrectionFactor first)."
        )
    image_scale = _unit(req("Units"), IMAGE_UNITS, "Units", path)
    dose = _number(req("InjectedRadioactivity"), "InjectedRadioactivity", path, positive=True)
    units = req("InjectedRadioactivityUnits")
    dose_bq = dose * _unit(units, DOSE_UNITS, "InjectedRadioactivityUnits", path)
    decay_constant = math.log(2.0) / _half_life_min(
        req("TracerRadionuclide"), "TracerRadionuclide", path
    )
    t_inj = _number(sidecar.get("InjectionStart", 0.0), "InjectionStart", path)
    t_ref = _number(sidecar.get("ImageDecayCorrectionTime", 0.0), "ImageDecayCorrectionTime", path)
    dose_ref_bq = dose_bq * math.exp(-decay_constant * (t_ref - t_inj) / 60.0)
    weight_kg = _body_weight_kg(sidecar, path, pet_path, subject)
    return weight_kg * 1000.0 / dose_ref_bq, image_scale, decay_constant


def _read_schedule(
    sidecar: Mapping, path: pathlib.Path, n_frames: int, pet_path: pathlib.Path
) -> FrameSchedule:
    start = _number_list(_require(sidecar, "FrameTimesStart", path), "FrameTimesStart", path)
    dur = _number_list(_require(sidecar, "FrameDuration", path), "FrameDuration", path)
    if start.size != dur.size:
        raise BidsError(
            f"{path} key 'FrameDuration' has {dur.size} entries but 'FrameTimesStart' has "
            f"{start.size}."
        )
    if start.size != n_frames:
        raise BidsError(
            f"{path} keys 'FrameTimesStart'/'FrameDuration' list {start.size} frames but "
            f"{pet_path.name} has {n_frames} (its 4th dimension)."
        )
    if np.any(dur <= 0):
        i = int(np.nonzero(dur <= 0)[0][0])
        raise BidsError(f"{path} key 'FrameDuration' entry {i} is {dur[i]} s, not positive.")
    if np.max(np.abs(start)) > MAX_FRAME_START_S:
        raise BidsError(
            f"{path} key 'FrameTimesStart' has values up to {np.max(np.abs(start)):.6g}, which "
            "look like clock times or milliseconds; BIDS wants seconds from TimeZero."
        )
    end = start + dur
    if end[-1] > MAX_SCAN_S:
        raise BidsError(
            f"{path} keys 'FrameTimesStart'/'FrameDuration' describe a scan ending at "
            f"{end[-1]:.6g} s (over 24 h); frame times and durations must be in seconds."
        )
    if start[0] < 0:
        raise BidsError(
            f"{path} key 'FrameTimesStart' starts at {start[0]} s, before TimeZero; kinetix "
            "needs frame times >= 0."
        )
    bad = np.nonzero(start[1:] < end[:-1] - _TIME_TOL_S)[0]
    if bad.size:
        i = int(bad[0])
        raise BidsError(
            f"{path} keys 'FrameTimesStart'/'FrameDuration' are not increasing or overlap: "
            f"frame {i + 1} starts at {start[i + 1]} s before frame {i} ends at {end[i]} s."
        )
    try:
        return FrameSchedule.from_seconds(start, dur)
    except ValueError as err:
        raise BidsError(f"{path} keys 'FrameTimesStart'/'FrameDuration': {err}") from err


def _find_blood(pet_path: pathlib.Path) -> pathlib.Path:
    stem = _nifti_stem(pet_path)
    prefix = stem[: -len("_pet")] if stem.endswith("_pet") else stem
    pattern = f"{glob.escape(prefix)}_recording-*_blood.tsv"
    found = sorted(pet_path.parent.glob(pattern))
    if len(found) > 1:
        manual = [p for p in found if "_recording-manual_" in p.name]
        found = manual if len(manual) == 1 else found
    if len(found) == 1:
        return found[0]
    if not found:
        raise BidsError(
            f"No blood file {pattern} lies next to {pet_path}; pass blood_path explicitly."
        )
    raise BidsError(
        f"Several blood files match {pattern} next to {pet_path} "
        f"({', '.join(p.name for p in found)}); pass blood_path explicitly."
    )


def _blood_units(column: str, meta: Mapping, meta_path: pathlib.Path) -> float:
    entry = meta.get(column)
    if not isinstance(entry, Mapping) or entry.get("Units") is None:
        return 1.0  # no description: Bq/mL, as kinetix writes
    return _unit(entry["Units"], IMAGE_UNITS, f"{column}.Units", meta_path)


def _read_blood(blood_path: pathlib.Path, scan_end_s: float):
    """(times [K] s, plasma [K] Bq/mL, whole blood [K] Bq/mL or None), validated."""
    columns = _read_tsv(blood_path)
    for column in ("time", "plasma_radioactivity"):
        if column not in columns:
            raise BidsError(f"{blood_path} lacks the required column '{column}'.")
    meta_path = blood_path.with_name(blood_path.name[: -len(".tsv")] + ".json")
    meta = _load_json(meta_path, "blood sidecar") if meta_path.is_file() else {}
    time_meta = meta.get("time")
    if isinstance(time_meta, Mapping) and time_meta.get("Units") not in (None, "s"):
        raise BidsError(
            f"{meta_path} key 'time.Units' is {time_meta.get('Units')!r}; kinetix reads blood "
            "times in seconds ('s') as BIDS specifies."
        )
    times = _float_column(columns["time"], "time", blood_path)
    if times.size < 2 or not np.all(np.isfinite(times)):
        raise BidsError(f"{blood_path} column 'time' needs at least 2 finite sample times (s).")
    if np.any(np.diff(times) <= 0):
        i = int(np.nonzero(np.diff(times) <= 0)[0][0])
        raise BidsError(
            f"{blood_path} column 'time' is not strictly increasing (sample {i + 2} at "
            f"{times[i + 1]} s follows {times[i]} s)."
        )
    if times[0] < 0:
        raise BidsError(
            f"{blood_path} column 'time' starts at {times[0]} s, before TimeZero; kinetix "
            "needs blood times >= 0."
        )
    if times[-1] > MAX_SCAN_S:
        raise BidsError(
            f"{blood_path} column 'time' reaches {times[-1]:.6g}, over 24 h in seconds; blood "
            "times must be seconds from TimeZero, not clock times or milliseconds."
        )
    plasma = _float_column(columns["plasma_radioactivity"], "plasma_radioactivity", blood_path)
    plasma = plasma * _blood_units("plasma_radioactivity", meta, meta_path)
    keep = ~np.isnan(plasma)  # BIDS 'n/a': rows where only whole blood was measured
    if np.count_nonzero(keep) < 2 or not np.all(np.isfinite(plasma[keep])):
        raise BidsError(
            f"{blood_path} column 'plasma_radioactivity' needs at least 2 finite values."
        )
    t_plasma = times[keep]
    if t_plasma[-1] < scan_end_s * (1.0 - BLOOD_COVER_RTOL):
        raise BidsError(
            f"{blood_path} column 'time' ends with plasma at {t_plasma[-1]:.6g} s, before the "
            f"scan ends at {scan_end_s:.6g} s (were blood times written in minutes?)."
        )
    whole = None
    if "whole_blood_radioactivity" in columns:
        wb = _float_column(
            columns["whole_blood_radioactivity"], "whole_blood_radioactivity", blood_path
        )
        wb = wb * _blood_units("whole_blood_radioactivity", meta, meta_path)
        ok = np.isfinite(wb)
        if np.count_nonzero(ok) >= 2:
            # Whole blood missing at some plasma rows: linear interpolation in time.
            whole = np.where(ok[keep], wb[keep], np.interp(t_plasma, times[ok], wb[ok]))
    return t_plasma, plasma[keep], whole


def read_subject(pet_path, blood_path=None) -> Study:
    """Reads and validates one BIDS-PET scan, converted to SUV and minutes.

    Args:
      pet_path: a `*_pet.nii.gz` (or `.nii`); its sidecar is the same stem with `.json`.
      blood_path: the blood TSV; default: the `*_recording-*_blood.tsv` next to the image with
        the same entities (`recording-manual` preferred when several exist). Its optional
        `.json` gives column units (default Bq/mL; times must be seconds).

    Returns:
      A `Study`: frames [X, Y, Z, T] (SUV), schedule (min), plasma/whole blood (min, SUV).

    Raises:
      BidsError: on a missing file or key, unknown units, inconsistent frame counts, a non-4-D
        image, non-finite voxels, non-decay-corrected images, frame or blood times that are not
        increasing or look like clock times / minutes, or blood that ends before the scan.
    """
    pet_path = pathlib.Path(pet_path)
    if not pet_path.is_file():
        raise BidsError(f"The PET image {pet_path} does not exist.")
    stem = _nifti_stem(pet_path)
    subject = _subject_from_name(stem)
    sidecar_path = pet_path.with_name(stem + ".json")
    sidecar = _load_json(sidecar_path, "PET sidecar")

    try:
        img = nib.load(pet_path)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise BidsError(f"{pet_path} cannot be read as NIfTI ({err}).") from err
    if len(img.shape) != 4:
        raise BidsError(
            f"{pet_path} is {len(img.shape)}-D with shape {tuple(img.shape)}; kinetix needs a "
            "4-D dynamic image [X, Y, Z, T]."
        )

    # Sidecar keys, cheapest first.
    schedule = _read_schedule(sidecar, sidecar_path, int(img.shape[3]), pet_path)
    suv_factor, image_scale, decay_constant = _suv_factor(sidecar, sidecar_path, pet_path, subject)

    if "DecayCorrectionFactor" in sidecar:
        factors = _number_list(
            sidecar["DecayCorrectionFactor"], "DecayCorrectionFactor", sidecar_path, unit=""
        )
        if factors.size != schedule.n_frames:
            raise BidsError(
                f"{sidecar_path} key 'DecayCorrectionFactor' has {factors.size} entries for "
                f"{schedule.n_frames} frames."
            )

    blood_path = _find_blood(pet_path) if blood_path is None else pathlib.Path(blood_path)
    t_s, plasma_bqml, whole_bqml = _read_blood(blood_path, float(schedule.end[-1]) * 60.0)

    data = img.get_fdata(dtype=np.float32, caching="unchanged")  # scaling applied
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    if n_nan or n_inf:
        raise BidsError(
            f"{pet_path} has {n_nan + n_inf} non-finite voxel values ({n_nan} NaN, {n_inf} "
            "infinite); kinetix needs finite images."
        )
    frames = data * np.float32(image_scale * suv_factor)  # [X, Y, Z, T] SUV

    return Study(
        frames=frames,
        schedule=schedule,
        plasma_times=t_s / 60.0,
        plasma=plasma_bqml * suv_factor,
        whole_blood=None if whole_bqml is None else whole_bqml * suv_factor,
        suv_factor=suv_factor,
        affine=np.asarray(img.affine, dtype=np.float64),
        header=img.header.copy(),
        subject=subject,
        pet_path=pet_path,
        sidecar=sidecar,
        decay_constant=decay_constant,
        blood_path=blood_path,
    )


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------
def _subject_label(subject: str) -> str:
    label = subject[len("sub-") :] if subject.startswith("sub-") else subject
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"subject must look like 'sub-01' (alphanumeric label), got {subject!r}.")
    return "sub-" + label


def _check_free(paths: Sequence[pathlib.Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")


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


def _kinetix_version() -> str:
    try:
        return importlib.metadata.version("kinetix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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

    Files: `sub-XX/pet/sub-XX_pet.nii.gz` (float32), `sub-XX_pet.json`,
    `sub-XX_recording-manual_blood.tsv` and `.json`. The image is taken as decay-corrected to
    TimeZero = injection (`InjectionStart = ScanStart = ImageDecayCorrectionTime = 0`);
    `DecayCorrectionFactor` is `schedule.decay_factors()` (F-18).

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
    frames = np.asarray(frames_bqml, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != schedule.n_frames:
        raise ValueError(
            f"frames_bqml must be [X, Y, Z, T] with T = {schedule.n_frames} frames, got shape "
            f"{frames.shape}."
        )
    if not np.all(np.isfinite(frames)):
        raise ValueError("frames_bqml has non-finite values.")
    times = np.asarray(plasma_times_min, dtype=np.float64)
    plasma = np.asarray(plasma_bqml, dtype=np.float64)
    if times.ndim != 1 or plasma.shape != times.shape:
        raise ValueError(
            f"plasma_times_min and plasma_bqml must be 1-D of equal length, got {times.shape} "
            f"and {plasma.shape}."
        )
    whole = None
    if whole_blood_bqml is not None:
        whole = np.asarray(whole_blood_bqml, dtype=np.float64)
        if whole.shape != times.shape:
            raise ValueError(
                f"whole_blood_bqml must match plasma_times_min {times.shape}, got {whole.shape}."
            )
    if not (_is_number(injected_mbq) and injected_mbq > 0):
        raise ValueError(f"injected_mbq must be a positive number, got {injected_mbq!r}.")
    if not (_is_number(body_weight_kg) and body_weight_kg > 0):
        raise ValueError(f"body_weight_kg must be a positive number, got {body_weight_kg!r}.")
    affine = _check_affine(affine)

    pet_dir = pathlib.Path(root) / sub / "pet"
    pet_path = pet_dir / f"{sub}_pet.nii.gz"
    json_path = pet_dir / f"{sub}_pet.json"
    blood_tsv = pet_dir / f"{sub}_recording-manual_blood.tsv"
    blood_json = pet_dir / f"{sub}_recording-manual_blood.json"
    _check_free([pet_path, json_path, blood_tsv, blood_json], overwrite)

    start_s = np.round(schedule.start * 60.0, 6)
    dur_s = np.round(np.round(schedule.end * 60.0, 6) - start_s, 6)
    sidecar = {
        "Manufacturer": "kinetix",
        "ManufacturersModelName": "simulation",
        "Units": "Bq/mL",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
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

    _save_nifti(
        pet_path, frames, affine, np.float32, "kinetix PET Bq/mL decay-corrected to TimeZero"
    )
    _write_json(json_path, sidecar)
    blood_columns = {"time": times * 60.0, "plasma_radioactivity": plasma}
    if whole is not None:
        blood_columns["whole_blood_radioactivity"] = whole
    _write_tsv(blood_tsv, blood_columns)
    desc = {
        "PlasmaAvail": True,
        "WholeBloodAvail": whole is not None,
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
    if whole is not None:
        desc["whole_blood_radioactivity"] = {
            "Description": "Radioactivity in whole blood, decay-corrected to TimeZero",
            "Units": "Bq/mL",
        }
    _write_json(blood_json, desc)
    return pet_path


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
    root, name: str = "kinetix simulated FDG cohort", overwrite: bool = False
) -> pathlib.Path:
    """Writes `dataset_description.json` of a raw BIDS dataset; returns its path."""
    path = pathlib.Path(root) / "dataset_description.json"
    _check_free([path], overwrite)
    _write_json(
        path,
        {
            "Name": name,
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "kinetix", "Version": _kinetix_version()}],
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


# ------------------------------------------------------------------------------------------------
# Ground truth (simulator derivatives)
# ------------------------------------------------------------------------------------------------
def truth_paths(root, subject: str, param_names: Sequence[str] = _CANONICAL_PARAMS) -> dict:
    """File names of the simulator's ground truth under `root/derivatives/truth/sub-XX/`.

    Returns a dict: "noisefree" -> `sub-XX_desc-noisefree_pet.nii.gz` (noise-free frames,
    Bq/mL [X, Y, Z, T]); "params" -> {name: `sub-XX_param-<name>_map.nii.gz`} (fv unitless,
    K1 mL/min/mL, k2..k4 1/min; tissue-level rates); "ki" -> `sub-XX_Ki.nii.gz` (voxel-level Ki,
    mL/min/mL); "labels" -> `sub-XX_dseg.nii.gz` (int32 label map); "label_table" ->
    `sub-XX_dseg.tsv` (columns `index`, `name`).
    """
    sub = _subject_label(subject)
    base = pathlib.Path(root) / "derivatives" / "truth" / sub
    return {
        "dir": base,
        "noisefree": base / f"{sub}_desc-noisefree_pet.nii.gz",
        "params": {n: base / f"{sub}_param-{n}_map.nii.gz" for n in param_names},
        "ki": base / f"{sub}_Ki.nii.gz",
        "labels": base / f"{sub}_dseg.nii.gz",
        "label_table": base / f"{sub}_dseg.tsv",
    }


def write_truth(
    root,
    subject: str,
    noisefree_bqml,
    param_maps: Mapping[str, np.ndarray],
    ki,
    labels,
    affine,
    label_names: Mapping[int, str],
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the simulator's ground truth to `root/derivatives/truth/sub-XX/` (see `truth_paths`).

    Also writes `derivatives/truth/dataset_description.json` (a derivative dataset) if missing.

    Args:
      root: BIDS root directory.
      subject: "sub-01" or "01".
      noisefree_bqml: [X, Y, Z, T] noise-free decay-corrected frames (Bq/mL).
      param_maps: {name: [X, Y, Z]} parameter maps, e.g. fv, K1, k2, k3, k4 (names alphanumeric).
      ki: [X, Y, Z] true voxel-level Ki (mL/min/mL).
      labels: [X, Y, Z] integer label map.
      affine: [4, 4] voxel-to-world (mm).
      label_names: {label: name} for every label value present in `labels`.
      overwrite: replace existing files; otherwise an existing file raises FileExistsError.

    Returns:
      The subject's truth directory.
    """
    noisefree = np.asarray(noisefree_bqml, dtype=np.float32)
    if noisefree.ndim != 4:
        raise ValueError(f"noisefree_bqml must be [X, Y, Z, T], got shape {noisefree.shape}.")
    grid = noisefree.shape[:3]
    maps = {}
    for name, value in param_maps.items():
        if not re.fullmatch(r"[A-Za-z0-9]+", str(name)):
            raise ValueError(
                f"param_maps name {name!r} must be alphanumeric (used in a file name)."
            )
        maps[str(name)] = np.asarray(value, dtype=np.float32)
    arrays = {**{f"param_maps[{n!r}]": v for n, v in maps.items()}, "ki": np.asarray(ki)}
    labels = np.asarray(labels)
    arrays["labels"] = labels
    for name, value in arrays.items():
        if value.shape != grid:
            raise ValueError(f"{name} must have the grid shape {grid}, got {value.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}.")
    missing = sorted(set(np.unique(labels).tolist()) - {int(k) for k in label_names})
    if missing:
        raise ValueError(f"label_names lacks names for the label values {missing}.")
    affine = _check_affine(affine)

    paths = truth_paths(root, subject, list(maps))
    _check_free(
        [paths["noisefree"], *paths["params"].values(), paths["ki"], paths["labels"]]
        + [paths["label_table"]],
        overwrite,
    )
    desc_path = pathlib.Path(root) / "derivatives" / "truth" / "dataset_description.json"
    if not desc_path.exists():
        _write_json(
            desc_path,
            {
                "Name": "kinetix simulator ground truth",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "kinetix", "Version": _kinetix_version()}],
            },
        )
    _save_nifti(paths["noisefree"], noisefree, affine, np.float32, "noise-free PET Bq/mL")
    units = {"fv": "unitless", "K1": "mL/min/mL"}
    for name, value in maps.items():
        unit = units.get(name, "1/min")
        _save_nifti(
            paths["params"][name],
            value,
            affine,
            np.float32,
            f"true {name} ({unit})",
            intent="estimate",
            intent_name=name,
        )
    _save_nifti(
        paths["ki"],
        np.asarray(ki, dtype=np.float32),
        affine,
        np.float32,
        "true voxel-level Patlak Ki (mL/min/mL)",
        intent="estimate",
        intent_name="Ki",
    )
    _save_nifti(
        paths["labels"],
        labels.astype(np.int32),
        affine,
        np.int32,
        "tissue labels, see dseg.tsv",
        intent="label",
    )
    keys = sorted(int(k) for k in label_names)
    _write_tsv(
        paths["label_table"],
        {"index": keys, "name": [str(label_names[k]) for k in keys]},
    )
    return paths["dir"]


def read_truth(root, subject: str) -> dict:
    """Reads what `write_truth` wrote.

    Returns:
      {"noisefree": [X, Y, Z, T] float32 Bq/mL, "params": {name: [X, Y, Z] float32} (fv, K1,
      k2, k3, k4 first, then others sorted), "ki": [X, Y, Z] float32, "labels": [X, Y, Z]
      int32, "label_names": {int: str}, "affine": [4, 4]}.

    Raises:
      BidsError: if a truth file is missing.
    """
    paths = truth_paths(root, subject, ())
    base, sub = paths["dir"], paths["dir"].name
    if not base.is_dir():
        raise BidsError(f"The truth directory {base} does not exist.")
    prefix, suffix = f"{sub}_param-", "_map.nii.gz"
    found = {p.name[len(prefix) : -len(suffix)]: p for p in base.glob(f"{prefix}*{suffix}")}
    order = [n for n in _CANONICAL_PARAMS if n in found] + sorted(
        n for n in found if n not in _CANONICAL_PARAMS
    )

    def load(path: pathlib.Path, dtype):
        if not path.is_file():
            raise BidsError(f"The truth file {path} does not exist.")
        img = nib.load(path)
        return np.asarray(img.dataobj, dtype=dtype), img.affine

    noisefree, affine = load(paths["noisefree"], np.float32)
    table = _read_tsv(paths["label_table"])
    for column in ("index", "name"):
        if column not in table:
            raise BidsError(f"{paths['label_table']} lacks the required column '{column}'.")
    return {
        "noisefree": noisefree,
        "params": {n: load(found[n], np.float32)[0] for n in order},
        "ki": load(paths["ki"], np.float32)[0],
        "labels": load(paths["labels"], np.int32)[0],
        "label_names": {
            int(i): name for i, name in zip(table["index"], table["name"], strict=True)
        },
        "affine": np.asarray(affine, dtype=np.float64),
    }
