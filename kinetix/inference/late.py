"""The input function of one scan for the commands: blood from a file or from the image (IDIF),
completed past the early frames (the late input) for a 35-minute protocol.

    study, provenance, idif_result = read_study(pet, idif_mask=m, idif_label="aorta",
                                                late="population", population=pop,
                                                t_cut=35.0, t_end=65.0)

`kinetix.predict`, `kinetix.parametric` and `kinetix.fit` read their study with `read_study`; the
evaluation completes a cohort's inputs with `complete_fn`. docs/input.md describes the methods.
"""

import math
import pathlib
import re

import numpy as np

from kinetix.data import bids, idif, late_input
from kinetix.data.bids import derivatives as der
from kinetix.training import population as population_lib

LATE_INPUTS = late_input.LATE_INPUTS
"""How Cp(t) past the early frames is obtained: "measured", "fit" or "population"."""

TIME_UNITS = {"s": 1.0 / 60.0, "min": 1.0}
"""Units accepted for the late sample's time -> minutes."""

EARLY_END_MIN = 35.0
"""The end of the early frames of the paper's protocol (min): the default `t_cut`."""

_SHORT = "the scan ends within the early frames: the measured input is used as it is"

_SAMPLE = re.compile(r"^\s*([0-9.eE+-]+)\s*([A-Za-z]+)\s*,\s*([0-9.eE+-]+)\s*([A-Za-zµ/]+)\s*$")


def parse_late_sample(text) -> tuple[float, float] | None:
    """A late venous sample written with its units, e.g. "60min,5.2kBq/mL" or "3600s,5200Bq/mL".

    Returns:
      (time [min], activity [Bq/mL]), or None for None or "".

    Raises:
      ValueError: a malformed text or unknown units (one sentence with the accepted ones).
    """
    if text is None or str(text).strip() == "":
        return None
    match = _SAMPLE.match(str(text))
    units = ", ".join(bids.IMAGE_UNITS)
    if match is None:
        raise ValueError(
            f"--late_sample {text!r} must read TIME UNIT,VALUE UNIT, e.g. 60min,5.2kBq/mL "
            f"(time in s or min; activity in {units})."
        )
    t, t_unit, value, v_unit = match.groups()
    if t_unit not in TIME_UNITS or v_unit not in bids.IMAGE_UNITS:
        raise ValueError(
            f"--late_sample {text!r} has unknown units; time in s or min, activity in {units}."
        )
    try:
        t_min, bqml = float(t) * TIME_UNITS[t_unit], float(value) * bids.IMAGE_UNITS[v_unit]
    except ValueError:
        raise ValueError(f"--late_sample {text!r}: {t!r} or {value!r} is not a number.") from None
    if not (math.isfinite(t_min) and math.isfinite(bqml)):
        raise ValueError(f"--late_sample {text!r} must be finite.")
    return t_min, bqml


def load_population(late: str, population=None, workdir=None):
    """The `PopulationInput` the "population" late input needs (None for the other choices).

    Args:
      late: one of `LATE_INPUTS`.
      population: a population JSON (`PopulationInput.to_json`), or None.
      workdir: a trained run whose population input (`POPULATION_FILE`) is used when
        `population` is None.

    Raises:
      ValueError: `late` is unknown, or "population" has neither file (one sentence).
    """
    if late not in LATE_INPUTS:
        raise ValueError(f"--late_input must be one of {', '.join(LATE_INPUTS)}, got {late!r}.")
    if late != "population":
        return None
    if population is not None:
        return late_input.PopulationInput.from_json(population)
    found = None if workdir is None else population_lib.run_population(workdir)
    if found is None:
        where = f"{workdir} has no {population_lib.POPULATION_FILE}" if workdir else "no run"
        raise ValueError(
            f"--late_input population needs a population input and {where}: pass --population "
            "FILE (a population_input.json of a trained run) or use --late_input fit."
        )
    return found


def read_study(
    pet,
    *,
    blood=None,
    idif_mask=None,
    idif_label=None,
    late: str = "measured",
    late_sample=None,
    population=None,
    t_cut: float = EARLY_END_MIN,
    t_end: float | None = None,
    check_plausibility: bool = True,
    recording: str | None = None,
):
    """One scan with its input function up to `t_end`, as a command needs it.

    Args:
      pet: the `*_pet.nii.gz`.
      blood: a blood TSV (default: the one next to `pet`); excludes `idif_mask`.
      idif_mask: a vessel mask or label image (`kinetix.data.idif.read_mask`): the blood is
        taken from the image (`kinetix.data.idif`) and no blood file is read.
      idif_label: the label of `idif_mask` to use (number, digits or name), or None for a mask.
      late: how Cp(t) after `t_cut` is obtained (`LATE_INPUTS`): "measured" needs the blood up
        to `t_end`; "fit" and "population" need it up to `t_cut` only.
      late_sample: (time [min], activity [Bq/mL]) of one late venous sample, its text
        (`parse_late_sample`) or None; for "fit" and "population".
      population: the `PopulationInput` of "population" (`load_population`).
      t_cut: the end of the early frames (min): the blood of "fit" and "population" must
        reach it.
      t_end: the time the input must reach (min), e.g. 65; None: the scan's end (nothing is
        completed when that is not after `t_cut`).
      check_plausibility: as `kinetix.data.bids.read_subject`.
      recording: the blood recording next to `pet` to read, e.g. "autosampler"
        (`kinetix.data.bids.find_blood`); excludes `blood` and `idif_mask`.

    Returns:
      (study with the completed curves, provenance: a JSON-able dict for output sidecars,
      the `IdifResult` or None).

    Raises:
      ValueError: (one sentence, before any computation) conflicting arguments, blood that
        ends too early for the choice, a late sample outside (t_cut, t_end], a late fit that
        does not converge.
    """
    if late not in LATE_INPUTS:
        raise ValueError(f"--late_input must be one of {', '.join(LATE_INPUTS)}, got {late!r}.")
    if blood is not None and idif_mask is not None:
        raise ValueError("--blood and --idif_mask exclude each other: pass one input function.")
    if recording is not None and (blood is not None or idif_mask is not None):
        other = "--blood" if blood is not None else "--idif_mask"
        raise ValueError(
            f"--recording and {other} exclude each other: --recording chooses among the blood "
            "files next to --pet."
        )
    if idif_label is not None and idif_mask is None:
        raise ValueError("--idif_label needs --idif_mask (the label image it selects from).")
    if late_sample is not None and late == "measured":
        raise ValueError("--late_sample needs --late_input fit or population.")
    if isinstance(late_sample, str):
        late_sample = parse_late_sample(late_sample)
    if isinstance(idif_label, str) and idif_label.strip().isdigit():
        idif_label = int(idif_label)
    # "measured": the scan's own end here (a 22-frame file ends at 35 min); `complete_study`
    # then names the time the route needs and the --late_input choices.
    until = None
    if late != "measured":
        until = float(t_cut) if t_end is None else min(float(t_cut), float(t_end))
    idif_result = None
    if idif_mask is not None:
        study, idif_result = idif.study_with_idif(
            pet, idif_mask, idif_label, blood_until=until, check_plausibility=check_plausibility
        )
        source = {"InputFunction": "image-derived", **idif_result.description}
    else:
        study = bids.read_subject(
            pet,
            blood,
            blood_until=until,
            check_plausibility=check_plausibility,
            recording=recording,
        )
        source = {"InputFunction": "blood file", "BloodFile": str(study.blood_path)}
    if t_end is None:
        t_end = float(study.schedule.end[-1])
        if t_end <= t_cut and late != "measured":  # the scan ends within the early frames
            info = {"method": "measured", "note": _SHORT}
            return study, {**source, "LateInput": info}, idif_result
    sample = None
    if late_sample is not None:
        sample = (float(late_sample[0]), float(late_sample[1]) * study.suv_factor)
    study, info = late_input.complete_study(
        study, late, t_cut=t_cut, t_end=t_end, population=population, late_sample=sample
    )
    return study, {**source, "LateInput": info}, idif_result


def complete_fn(late: str, *, t_cut: float, t_end: float, population=None, sample_time=None):
    """Study -> Study: the evaluation's completion of a cohort's inputs
    (`Cohort.with_input`), with a late venous sample at `sample_time` (min) read off the
    measured plasma when given."""

    def complete(study):
        sample = None
        if sample_time:
            t = float(sample_time)
            sample = (t, float(np.interp(t, study.plasma_times, study.plasma)))
        # complete_study keeps the samples up to t_cut only (a 35-min protocol's blood).
        done, _ = late_input.complete_study(
            study, late, t_cut=t_cut, t_end=t_end, population=population, late_sample=sample
        )
        return done

    return complete


def idif_paths(pet, out_dir, idif_mask=True) -> list[pathlib.Path]:
    """The IDIF blood TSV and JSON that `write_idif_blood` writes for the scan `pet` in the
    derivative dataset `out_dir` (`pet/<prefix>_recording-IDIF_blood.tsv`; [] without
    `idif_mask`): known before the scan is read, so a command checks them with its other
    outputs."""
    if idif_mask is None:
        return []
    path = der.blood_path(out_dir, der.scan_prefix(pet), "IDIF")
    return [path, der.sidecar_path(path)]


def write_idif_blood(idif_result, study, out_dir, overwrite: bool = False) -> list[pathlib.Path]:
    """Writes the IDIF as `idif_paths(study.pet_path, out_dir)` (TSV + JSON); returns them."""
    path = idif_paths(study.pet_path, out_dir)[0]
    links = der.output_links(out_dir, [study.pet_path])  # the maps' dataset, made first
    return idif.write_blood(
        path,
        idif_result,
        study.suv_factor,
        sources=[der.bids_uri(study.pet_path, links)],
        overwrite=overwrite,
    )
