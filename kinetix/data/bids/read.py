"""BIDS-PET readers: dataset discovery, `participants.tsv` and one subject's scan (`read_subject`).

`read_subject` is the only place where kinetix turns BIDS seconds and Bq/mL into minutes and SUV
(see the `kinetix.data.bids` module docstring for the conversions). Import these names from
`kinetix.data.bids`.
"""

import math
import pathlib
from collections.abc import Callable, Mapping

import numpy as np
from absl import logging

from kinetix.data.bids import entities, plausibility
from kinetix.data.bids.study import (
    DOSE_UNITS,
    IMAGE_UNITS,
    BidsError,
    Study,
    _bool,
    _cell_value,
    _float_column,
    _half_life_min,
    _load_json,
    _nifti_stem,
    _number,
    _number_list,
    _read_tsv,
    _require,
    _subject_from_name,
    _unit,
    nifti_data,
    open_nifti,
)
from kinetix.kinetics.frames import FrameSchedule

MAX_FRAME_START_S = 1e5
"""Frame start times above this (s) look like clock times (hhmmss) or milliseconds."""

MAX_SCAN_S = 24 * 3600.0
"""Scans (or blood curves) longer than 24 h are taken as a units mistake."""

BLOOD_COVER_RTOL = 0.01
"""The last blood sample may end this fraction of the scan end time before the last frame ends."""

MAX_BODY_WEIGHT_KG = 1000.0
"""`BodyWeight` above this is taken as grams given where kg are expected."""

_TIME_TOL_S = 1e-6  # frame overlap tolerance (s), well inside FrameSchedule's 1e-9 min


# ------------------------------------------------------------------------------------------------
# Dataset-level readers
# ------------------------------------------------------------------------------------------------
def find_subjects(root, filters=None) -> list[pathlib.Path]:
    """The PET images of a BIDS dataset that pass the entity `filters`, sorted.

    Matches `sub-*/pet/*_pet.nii[.gz]` and `sub-*/ses-*/pet/*_pet.nii[.gz]` under `root`; every
    name must be a BIDS name (`entities.parse_name`) whose `sub-` (and `ses-`) agree with its
    directories.

    Args:
      root: the dataset root.
      filters: the scans to keep: None (all), a mapping {entity key: label or list of labels},
        e.g. {"ses": "baseline", "trc": "18FFDG", "rec": "acdyn", "run": "1"}, or its text form
        "ses-baseline,trc-18FFDG" (`entities.parse_entities`). An image passes when it has,
        for every key, one of the allowed labels (run and other indices compare as numbers).

    Raises:
      BidsError: if `root` does not exist or holds no PET images, a name is not a BIDS name,
        a filter key is not a BIDS entity or a filter matches no image (the sentence lists the
        entity labels the images have).
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise BidsError(f"The BIDS root {root} does not exist or is not a directory.")
    wanted = entities.as_filters(filters)
    found = set()
    for pattern in ("sub-*/pet/*_pet.nii.gz", "sub-*/ses-*/pet/*_pet.nii.gz"):
        found.update(root.glob(pattern))
        found.update(root.glob(pattern[: -len(".gz")]))
    if not found:
        raise BidsError(f"The BIDS root {root} holds no sub-*/pet/*_pet.nii.gz images.")
    names = {path: _pet_name(path) for path in sorted(found)}
    if not wanted:
        return list(names)
    _check_filters(root, wanted, list(names.values()))
    kept = [path for path, name in names.items() if entities.matches(name.entities, wanted)]
    if not kept:
        raise BidsError(
            f"No PET image under {root} has {entities.describe_filters(wanted)} together; the "
            f"images there have {_labels_text(names.values())}."
        )
    return kept


def _pet_name(path: pathlib.Path) -> entities.BidsName:
    """The parsed name of `sub-XX/[ses-YY/]pet/<name>`, checked against its directories."""
    name = entities.parse_name(path.name)
    dirs = {d.split("-", 1)[0]: d.split("-", 1)[1] for d in path.parts[-4:-2] if "-" in d}
    for key in ("sub", "ses"):
        if key in dirs and name.entities.get(key) != dirs[key]:
            raise BidsError(
                f"{path} has {key}-{name.entities.get(key, '(none)')} in its name but lies in "
                f"{key}-{dirs[key]}; BIDS names carry their directories' sub- and ses- labels."
            )
    return name


def _label_order(label: str) -> tuple:
    """Sort key of labels: numbers first, by value (run-2 before run-10), then text."""
    return (0, int(label), label) if label.isdigit() else (1, 0, label)


def _labels_text(names, keys=None, limit: int = 12) -> str:
    """The entity labels of `names` as "ses-a, ses-b, trc-X" (`keys`: default all but sub)."""
    labels: dict[str, set[str]] = {}
    for name in names:
        for key, label in name.entities.items():
            if (keys is None and key != "sub") or (keys is not None and key in keys):
                labels.setdefault(key, set()).add(label)
    items = [
        f"{key}-{label}"
        for key in entities.ENTITY_ORDER
        for label in sorted(labels.get(key, ()), key=_label_order)
    ]
    if not items:
        return "no entities besides sub-" if keys is None else "none"
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _check_filters(root: pathlib.Path, wanted: Mapping, names: list) -> None:
    """A BidsError for the first filter key that is not an entity or that matches no image."""
    for key, allowed in wanted.items():
        if key not in entities.ENTITY_ORDER:
            raise BidsError(
                f"The filter key {key!r} is not a BIDS entity (such as ses, trc, rec, run); the "
                f"PET images under {root} have {_labels_text(names)}."
            )
        if not any(entities.matches(n.entities, {key: allowed}) for n in names):
            have = _labels_text(names, keys={key})
            what = f"only {have}" if have != "none" else f"no {key}- entity"
            raise BidsError(
                f"No PET image under {root} has {entities.describe_filters({key: allowed})} "
                f"(filter key {key!r}): they have {what}."
            )


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


def read_schedule(
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


DEFAULT_RECORDING = "manual"
"""The blood recording taken when several match a PET image and none is asked for: BIDS-PET
says "if the sampling method is unknown, then recording SHOULD be set as manual"."""


def _blood_candidates(pet_path: pathlib.Path) -> dict[str, list[tuple[int, pathlib.Path]]]:
    """{recording label: [(entity count, blood TSV)] next to `pet_path` that belong to it}, the
    most specific (most entities) first.

    For a BIDS name, a `*_recording-<label>_blood.tsv` belongs to the image when its other
    entities all have the image's labels (`entities.applies_to`: it may leave out `rec-` and
    others); for another name, when it is `<name without _pet>_recording-<label>_blood.tsv`.
    """
    pet = entities.try_parse_name(pet_path.name)
    prefix = _nifti_stem(pet_path).removesuffix("_pet") + "_"
    out: dict[str, list[tuple[int, pathlib.Path]]] = {}
    for path in sorted(pet_path.parent.glob("*_recording-*_blood.tsv")):
        if pet is not None:
            blood = entities.try_parse_name(path.name)
            if blood is None or not entities.applies_to(blood.entities, pet.entities):
                continue
        elif path.name.startswith(prefix):
            blood = entities.try_parse_name(path.name[len(prefix) :])
            if blood is None or set(blood.entities) != {"recording"}:
                continue
        else:
            continue
        if blood.suffix == "blood" and "recording" in blood.entities:
            out.setdefault(blood.entities["recording"], []).append((len(blood.entities), path))
    return {rec: sorted(found, key=lambda f: -f[0]) for rec, found in sorted(out.items())}


def _blood_pattern(pet_path: pathlib.Path) -> str:
    """The blood file name that `find_blood` looks for, with `*` for the recording."""
    pet = entities.try_parse_name(pet_path.name)
    if pet is None:
        return _nifti_stem(pet_path).removesuffix("_pet") + "_recording-*_blood.tsv"
    name = entities.format_entities(pet.entities) + "_recording-*_blood.tsv"
    return name if set(pet.entities) <= {"sub"} else f"{name} (or one without rec- or run-)"


def find_blood(pet_path, recording: str | None = None) -> pathlib.Path:
    """The blood TSV of a PET image: the `*_recording-<label>_blood.tsv` next to it whose
    entities match the image's.

    A blood file matches when each of its entities other than `recording-` has the image's
    label; it may leave some out (`rec-`: blood is not reconstructed), and then serves every
    image with the others (`entities.applies_to`). Of two files of one recording, the one with
    more entities is taken. For a name that is not a BIDS name, the blood file is
    `<name without _pet>_recording-<label>_blood.tsv`.

    Args:
      pet_path: a `*_pet.nii.gz` (or `.nii`).
      recording: the recording label to take, e.g. "manual" or "autosampler". None: the only
        recording, or `DEFAULT_RECORDING` ("manual") when there are several (logged).

    Raises:
      BidsError: no matching blood file, no file of `recording`, several recordings without
        `manual` and no `recording`, or two equally specific files of one recording (each
        sentence lists the recordings found and how to choose).
    """
    pet_path = pathlib.Path(pet_path)
    if recording is not None:
        entities.check_label("recording", recording, "recording")
    found = _blood_candidates(pet_path)
    listed = ", ".join(found) or "none"
    choose = (
        "choose one with recording= (--recording on the commands, config.data.recording in "
        "training) or pass the blood file (blood_path, --blood)"
    )
    if recording is not None:
        if recording not in found:
            raise BidsError(
                f"No blood file of recording-{recording} matches {pet_path} (recordings "
                f"found: {listed}); {choose}."
            )
        chosen = recording
    elif not found:
        raise BidsError(
            f"No blood file {_blood_pattern(pet_path)} lies next to {pet_path}; pass blood_path "
            "explicitly (--blood)."
        )
    elif len(found) == 1:
        chosen = next(iter(found))
    elif DEFAULT_RECORDING in found:
        chosen = DEFAULT_RECORDING
        logging.info(
            "%s has the blood recordings %s: taking %s (recording= or --recording takes another).",
            pet_path.name, listed, DEFAULT_RECORDING,
        )  # fmt: skip
    else:
        raise BidsError(
            f"{pet_path} has several blood recordings ({listed}) and none is "
            f"'{DEFAULT_RECORDING}'; {choose}."
        )
    (count, path), *others = found[chosen]
    if others and others[0][0] == count:
        raise BidsError(
            f"{path.name} and {others[0][1].name} both match {pet_path} as recording-{chosen}; "
            "pass blood_path explicitly (--blood)."
        )
    return path


def _blood_units(column: str, meta: Mapping, meta_path: pathlib.Path) -> float:
    entry = meta.get(column)
    if not isinstance(entry, Mapping) or entry.get("Units") is None:
        return 1.0  # no description: Bq/mL, as kinetix writes
    return _unit(entry["Units"], IMAGE_UNITS, f"{column}.Units", meta_path)


def _check_cover(
    last_s: float, scan_end_s: float, blood_until_s: float | None, where: str, hint: str = ""
) -> None:
    """Raises unless the last plasma time `last_s` (s) reaches the needed end within
    `BLOOD_COVER_RTOL`: `blood_until_s` when given, else the scan's end `scan_end_s`; `hint`
    ends the sentence."""
    if blood_until_s is None:
        if last_s < scan_end_s * (1.0 - BLOOD_COVER_RTOL):
            raise BidsError(
                f"{where} ends with plasma at {last_s:.6g} s, before the scan ends at "
                f"{scan_end_s:.6g} s{hint}."
            )
    elif last_s < blood_until_s * (1.0 - BLOOD_COVER_RTOL):
        raise BidsError(
            f"{where} ends with plasma at {last_s:.6g} s, before {blood_until_s:.6g} s "
            f"({blood_until_s / 60.0:.6g} min) that this route needs{hint}."
        )


def _read_blood(blood_path: pathlib.Path, scan_end_s: float, blood_until_s: float | None = None):
    """(times [K] s, plasma [K] Bq/mL, whole blood [K] Bq/mL or None), validated.

    The plasma must reach `blood_until_s` (s; default `scan_end_s`, the scan's end) within
    `BLOOD_COVER_RTOL`.
    """
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
    if np.any(np.isinf(plasma)):
        i = int(np.nonzero(np.isinf(plasma))[0][0])
        raise BidsError(
            f"{blood_path} column 'plasma_radioactivity' has a non-finite value ({plasma[i]}) "
            f"at {times[i]:.6g} s."
        )
    keep = ~np.isnan(plasma)  # BIDS 'n/a': rows where only whole blood was measured
    if np.count_nonzero(keep) < 2 or not np.all(np.isfinite(plasma[keep])):
        raise BidsError(
            f"{blood_path} column 'plasma_radioactivity' needs at least 2 finite values."
        )
    t_plasma = times[keep]
    _check_cover(
        t_plasma[-1],
        scan_end_s,
        blood_until_s,
        f"{blood_path} column 'time'",
        " (were blood times written in minutes?)",
    )
    whole = None
    if "whole_blood_radioactivity" in columns:
        wb = _float_column(
            columns["whole_blood_radioactivity"], "whole_blood_radioactivity", blood_path
        )
        wb = wb * _blood_units("whole_blood_radioactivity", meta, meta_path)
        if np.any(np.isinf(wb)):
            i = int(np.nonzero(np.isinf(wb))[0][0])
            raise BidsError(
                f"{blood_path} column 'whole_blood_radioactivity' has a non-finite value "
                f"({wb[i]}) at {times[i]:.6g} s."
            )
        ok = np.isfinite(wb)  # NaN: BIDS 'n/a'
        if np.count_nonzero(ok) >= 2:
            # Whole blood missing at some plasma rows: linear interpolation in time.
            whole = np.where(ok[keep], wb[keep], np.interp(t_plasma, times[ok], wb[ok]))
    return t_plasma, plasma[keep], whole


def _blood_checks(
    source,
    t_min: np.ndarray,
    curves_bqml: dict[str, np.ndarray | None],
    suv_factor: float,
    scan_end_min: float,
    injection_min: float,
    units_hint: str | None = None,
) -> list[str]:
    """Hard faults of the blood curves (raised here, with the Bq/mL values) and their soft
    problems (returned, judged in SUV from the injection at `injection_min`).

    Args:
      source: the blood TSV (a path), or a label naming where the curves come from (e.g. "The
        image-derived input of <pet>"); the sentences start with it.
      units_hint: where the level's units come from; default: the column's `Units` in the
        TSV's JSON sidecar (for a path) and the dose.
    """
    problems = []
    for column, values in curves_bqml.items():
        if values is None:
            continue
        faults = plausibility.blood_faults(t_min, values, column, source)
        if faults:
            raise BidsError(faults[0])
        hint = units_hint
        if hint is None:
            meta_name = pathlib.Path(source).name[: -len(".tsv")] + ".json"
            hint = f", see '{column}.Units' in {meta_name} (Bq/mL when absent) and the dose"
        problems += plausibility.blood_problems(
            t_min, values * suv_factor, column, source, scan_end_min, hint, injection_min
        )
    return problems


ImageInput = Callable[[np.ndarray, FrameSchedule, np.ndarray], tuple]
"""`read_subject(input_from_image=...)`: (frames [X, Y, Z, T] SUV float32, schedule, affine
[4, 4]) -> (times [K] min, plasma [K] SUV, whole blood [K] SUV or None)."""


def _blood_until_s(blood_until) -> float | None:
    """`blood_until` (min) as seconds, or None; a ValueError unless positive and finite."""
    if blood_until is None:
        return None
    if (
        isinstance(blood_until, bool)
        or not isinstance(blood_until, int | float | np.integer | np.floating)
        or not math.isfinite(float(blood_until))
        or blood_until <= 0
    ):
        raise ValueError(f"blood_until must be a positive number of minutes, got {blood_until!r}.")
    return float(blood_until) * 60.0


def _image_curves(
    input_from_image: ImageInput,
    frames: np.ndarray,
    schedule: FrameSchedule,
    affine: np.ndarray,
    label: str,
    blood_until_s: float | None,
):
    """(times [K] min, plasma [K] SUV, whole blood [K] SUV or None) from `input_from_image`.

    Checked like a blood file's columns: 1-D and of equal length, at least 2 finite times,
    strictly increasing from >= 0, reaching the scan's end or `blood_until_s`.
    """
    out = input_from_image(frames, schedule, affine)
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise ValueError(
            "input_from_image must return (times [K] min, plasma [K] SUV, whole blood [K] SUV "
            f"or None), got {type(out).__name__}."
        )
    times, plasma, whole = (None if a is None else np.asarray(a, np.float64) for a in out)
    if (
        times is None
        or plasma is None
        or times.ndim != 1
        or plasma.shape != times.shape
        or (whole is not None and whole.shape != times.shape)
    ):
        shapes = [None if a is None else a.shape for a in (times, plasma, whole)]
        raise BidsError(
            f"{label} has times, plasma and whole blood of shapes {shapes}; they must be 1-D of "
            "equal length."
        )
    if times.size < 2 or not np.all(np.isfinite(times)):
        raise BidsError(f"{label} needs at least 2 finite sample times (min).")
    if np.any(np.diff(times) <= 0) or times[0] < 0:
        raise BidsError(f"{label} has sample times that are negative or not strictly increasing.")
    scan_end_s = float(schedule.end[-1]) * 60.0
    _check_cover(float(times[-1]) * 60.0, scan_end_s, blood_until_s, label)
    return times, plasma, whole


def read_subject(
    pet_path,
    blood_path=None,
    *,
    check_plausibility: bool = True,
    blood_until: float | None = None,
    input_from_image: ImageInput | None = None,
    recording: str | None = None,
) -> Study:
    """Reads and validates one BIDS-PET scan, converted to SUV and minutes.

    Args:
      pet_path: a `*_pet.nii.gz` (or `.nii`); its sidecar is the same stem with `.json`.
      blood_path: the blood TSV; default: the `*_recording-<label>_blood.tsv` next to the image
        whose entities match the image's (`find_blood`: `recording`, else the only recording,
        else `recording-manual`). Its optional `.json` gives column units (default Bq/mL;
        times must be seconds).
      check_plausibility: refuse image and blood values outside the plausible ranges for FDG
        (`kinetix.data.bids.plausibility`; docs/conventions.md, "Plausibility checks"). False
        logs them as warnings and keeps them in `Study.warnings` instead (another tracer, a
        phantom, an animal). Non-finite, negative or empty blood curves and images without a
        positive voxel are refused either way.
      blood_until: the time (min) the plasma curve must reach (within `BLOOD_COVER_RTOL`);
        default the scan's end. A route that uses only the first 35 min passes 35 so that blood
        sampled to 35 min is accepted for a 65-min scan.
      input_from_image: take the blood curves from the image instead of a file (no blood file
        is looked for): called once the image is decoded as `input_from_image(frames [X, Y, Z,
        T] float32 SUV, schedule, affine [4, 4])` and returning (times [K] min, plasma [K] SUV,
        whole blood [K] SUV or None), e.g. `kinetix.data.idif.input_from_image(mask)`. The
        curves get the same checks as a blood file's (they must reach the scan's end or
        `blood_until`), named "The image-derived input of <pet>". `Study.blood_path` is then
        None.
      recording: the blood recording to read when `blood_path` is None, e.g. "autosampler"
        (`find_blood`); None: the only one, or "manual" when there are several.

    Returns:
      A `Study`: frames [X, Y, Z, T] (SUV), schedule (min), plasma/whole blood (min, SUV).

    Raises:
      ValueError: both `blood_path` and `input_from_image` given, `recording` with either of
        them, or a `blood_until` that is not a positive number.
      BidsError: on a missing file or key, unknown units, inconsistent frame counts, a non-4-D,
        truncated or corrupt image, non-finite voxels, non-decay-corrected images, frame or
        blood times that are not increasing or look like clock times / minutes, blood that ends
        before the scan (or `blood_until`), or non-finite, negative or empty blood curves.
      ImplausibleError: (a BidsError) with `check_plausibility`, values outside the plausible
        FDG ranges.
    """
    if blood_path is not None and input_from_image is not None:
        raise ValueError(
            "read_subject takes the blood from blood_path or from input_from_image, not both."
        )
    if recording is not None and (blood_path is not None or input_from_image is not None):
        raise ValueError(
            "read_subject's recording chooses among the blood files next to the image, so it "
            "excludes blood_path and input_from_image."
        )
    blood_until_s = _blood_until_s(blood_until)
    pet_path = pathlib.Path(pet_path)
    if not pet_path.is_file():
        raise BidsError(f"The PET image {pet_path} does not exist.")
    stem = _nifti_stem(pet_path)
    subject = _subject_from_name(stem)
    sidecar_path = pet_path.with_name(stem + ".json")
    sidecar = _load_json(sidecar_path, "PET sidecar")

    img = open_nifti(pet_path, "PET image")
    if len(img.shape) != 4:
        raise BidsError(
            f"{pet_path} is {len(img.shape)}-D with shape {tuple(img.shape)}; kinetix needs a "
            "4-D dynamic image [X, Y, Z, T]."
        )

    # Sidecar keys, cheapest first.
    schedule = read_schedule(sidecar, sidecar_path, int(img.shape[3]), pet_path)
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

    scan_end_min = float(schedule.end[-1])
    judge_end_min = scan_end_min if blood_until is None else min(scan_end_min, blood_until)
    t_inj = _number(sidecar.get("InjectionStart", 0.0), "InjectionStart", sidecar_path) / 60.0
    problems: list[str] = []
    if input_from_image is None:
        if blood_path is None:
            blood_path = find_blood(pet_path, recording)
        blood_path = pathlib.Path(blood_path)
        t_s, plasma_bqml, whole_bqml = _read_blood(blood_path, scan_end_min * 60.0, blood_until_s)
        curves = {"plasma_radioactivity": plasma_bqml, "whole_blood_radioactivity": whole_bqml}
        problems += _blood_checks(blood_path, t_s / 60.0, curves, suv_factor, judge_end_min, t_inj)
        if problems and check_plausibility:
            raise plausibility.refusal(problems[0])  # before decoding the image
        t_min = t_s / 60.0
        plasma = plasma_bqml * suv_factor
        whole = None if whole_bqml is None else whole_bqml * suv_factor

    data = nifti_data(img, pet_path, "PET image", np.float32)  # scaling applied, ours to modify
    # min and max propagate NaN: two passes without temporaries where the image is finite.
    if data.size and not np.isfinite([data.min(), data.max()]).all():
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        raise BidsError(
            f"{pet_path} has {n_nan + n_inf} non-finite voxel values ({n_nan} NaN, {n_inf} "
            "infinite); kinetix needs finite images."
        )
    faults = plausibility.image_faults(data, pet_path)  # in the file's units, before scaling
    if faults:
        raise BidsError(faults[0])
    frames = np.multiply(data, np.float32(image_scale * suv_factor), out=data)  # [X, Y, Z, T] SUV
    hint = f", see 'Units', 'InjectedRadioactivityUnits' and 'BodyWeight' in {sidecar_path.name}"
    problems += plausibility.image_problems(frames, schedule, pet_path, hint)
    if problems and check_plausibility:
        raise plausibility.refusal(problems[0])

    affine = np.asarray(img.affine, dtype=np.float64)
    if input_from_image is not None:
        # After the image's own checks: an image off by 1000 is named as such, not as its blood.
        label = f"The image-derived input of {pet_path}"
        t_min, plasma, whole = _image_curves(
            input_from_image, frames, schedule, affine, label, blood_until_s
        )
        curves = {
            "plasma_radioactivity": plasma / suv_factor,
            "whole_blood_radioactivity": None if whole is None else whole / suv_factor,
        }
        found = _blood_checks(label, t_min, curves, suv_factor, judge_end_min, t_inj, hint)
        if found and check_plausibility:
            raise plausibility.refusal(found[0])
        problems += found
    for problem in problems:
        logging.warning("%s", problem)

    return Study(
        frames=frames,
        schedule=schedule,
        plasma_times=t_min,
        plasma=plasma,
        whole_blood=whole,
        suv_factor=suv_factor,
        affine=affine,
        header=img.header.copy(),
        subject=subject,
        pet_path=pet_path,
        sidecar=sidecar,
        decay_constant=decay_constant,
        blood_path=blood_path,
        warnings=tuple(problems),
    )
