"""BIDS-PET vocabulary shared by the readers and writers of `kinetix.data.bids`.

Unit and radionuclide tables, `BidsError`, the in-memory `Study`, and the small JSON / TSV parsers
and validators that `read`, `write` and `truth` build on. Import these names from
`kinetix.data.bids`, which re-exports the public ones.
"""

import dataclasses
import json
import math
import pathlib
import re
import zlib
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from kinetix.data.bids import nifti
from kinetix.kinetics.frames import F18_DECAY_CONSTANT, F18_HALF_LIFE_MIN, FrameSchedule
from kinetix.kinetics.input_function import SampledInput

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
      warnings: sentences on values outside the plausible FDG ranges that were accepted because
        the study was read with `check_plausibility=False` (`kinetix.data.bids.plausibility`).
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
    warnings: tuple[str, ...] = ()

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
        return SampledInput(self.plasma_times, self.plasma)

    def blood_input(self):
        """The whole-blood curve as `kk.SampledInput` (min, SUV), or None when not measured."""
        if self.whole_blood is None:
            return None
        return SampledInput(self.plasma_times, self.whole_blood)


# ------------------------------------------------------------------------------------------------
# NIfTI files
# ------------------------------------------------------------------------------------------------
NIFTI_READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, ImageFileError, *nifti.READ_ERRORS)
"""What nibabel and `nifti.read_voxels` raise on a truncated, corrupt or unreadable file:
`EOFError` (a truncated .nii.gz), `zlib.error` and `nifti.READ_ERRORS` (corrupt compressed data),
`OSError` (gzip CRC errors, a truncated .nii, permissions), `ValueError` and `ImageFileError` (a
header that is not NIfTI)."""


def _nifti_error(path: pathlib.Path, what: str, err: BaseException) -> BidsError:
    detail = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, PermissionError):
        return BidsError(f"The {what} {path} cannot be read: permission denied.")
    return BidsError(
        f"The {what} {path} is truncated or corrupt and cannot be read as NIfTI ({detail})."
    )


def open_nifti(path, what: str = "NIfTI image"):
    """The nibabel image of `path` with its header read (voxels are decoded later, lazily).

    Args:
      path: a `.nii.gz` or `.nii` file.
      what: what the file is, for the sentence (e.g. "PET image", "truth file").

    Raises:
      BidsError: the file does not exist, or its header cannot be read (one sentence naming it).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise BidsError(f"The {what} {path} does not exist.")
    try:
        return nib.load(path)
    except NIFTI_READ_ERRORS as err:
        raise _nifti_error(path, what, err) from err


def nifti_data(img, path, what: str = "NIfTI image", dtype=np.float32) -> np.ndarray:
    """The voxels of an image from `open_nifti` as `dtype` (scaling applied for floats).

    Floats are `img.get_fdata(dtype=dtype)`'s values bit for bit, in a new array the caller may
    modify in place: single-file NIfTI images are decoded by `nifti.read_voxels` (one allocation,
    a faster inflate), anything it does not handle by nibabel.

    Raises:
      BidsError: the data cannot be decoded (a truncated or corrupt file), naming `path`.
    """
    try:
        if np.issubdtype(np.dtype(dtype), np.floating):
            data = nifti.read_voxels(img, dtype)
            if data is None:
                data = img.get_fdata(dtype=dtype, caching="unchanged")
            return data
        return np.asarray(img.dataobj, dtype=dtype)
    except NIFTI_READ_ERRORS as err:
        raise _nifti_error(pathlib.Path(path), what, err) from err


def load_nifti(path, what: str = "NIfTI image", dtype=np.float32):
    """(voxels as `dtype`, nibabel image) of a NIfTI file; every read failure is one sentence.

    Args:
      path: a `.nii.gz` or `.nii` file.
      what: what the file is, for the sentence (e.g. "PET image", "truth file").
      dtype: the voxels' NumPy type (float types get the header's scaling).

    Raises:
      BidsError: the file is missing, truncated, corrupt or unreadable (names it).
    """
    img = open_nifti(path, what)
    return nifti_data(img, path, what, dtype), img


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
