"""Plausibility of a study's values for FDG: the image's SUV, the blood curves and Ki maps.

A BIDS sidecar can be wrong in ways that parse (a `Units` of kBq/mL over data in Bq/mL, a blood
curve of three samples, a curve that starts at 10 min) and the numbers that follow are wrong by
a factor of 1000 or by tens of percent without any other sign. The checks here compare a study
with broad ranges for FDG in humans, stated as module constants with their reasons
(docs/conventions.md, "Plausibility checks"):

- Hard checks (`blood_faults`, `image_faults`) find data that no analysis can use: non-finite or
  clearly negative blood values, a blood curve without a positive value, an image without a
  positive voxel. `read_subject` always refuses them.
- Soft checks (`blood_problems`, `image_problems`) find values outside the ranges of FDG scans
  that a user may legitimately have (another tracer, a phantom, an animal, a sparse protocol).
  `read_subject(check_plausibility=True)` refuses them with `ImplausibleError`; with
  `check_plausibility=False` (`--nocheck_plausibility`) they are logged as warnings and kept in
  `Study.warnings`.
- `ki_problems` looks at a computed Ki map: the commands log its findings as warnings and record
  them in the map's JSON sidecar ("Warnings"); Ki never stops a run.

Every finding is one sentence that names the file, column or key at fault. All functions are
NumPy only and take kinetix units (minutes, SUV, 1/min).
"""

import numpy as np

from kinetix.data.bids.study import BidsError
from kinetix.kinetics.frames import FrameSchedule
from kinetix.maps.mask import weighted_frames

PROCEED = (
    "; if these values are right (another tracer, a phantom, an animal), pass "
    "--nocheck_plausibility (check_plausibility=False) to proceed"
)
"""The end of every soft finding: how to proceed (docs/conventions.md, "Plausibility checks")."""

# ------------------------------------------------------------------------------------------------
# Bounds (docs/conventions.md, "Plausibility checks")
# ------------------------------------------------------------------------------------------------
IMAGE_LATE_FRACTION = 0.5
"""The image is judged on the duration-weighted mean of the frames whose mid-time lies in the
second half of the scan (mid >= this × scan end): there FDG's tissue SUV changes slowly and the
bolus no longer dominates."""

IMAGE_BODY_FRACTION = 0.05
"""Body voxels: late mean above this fraction of the volume's 99th percentile (the rule of the
"threshold" body mask, `kinetix.maps.mask`)."""

IMAGE_MEDIAN_SUV = (0.02, 100.0)
"""Plausible median SUV of the body voxels in the late frames. FDG body SUVs 30–65 min after
injection are about 0.3–3 (lung 0.3–0.6, muscle and fat 0.5–1, liver 2–3); the range leaves a
factor 15 or more either way, so that a unit mistake of 1000 (kBq/mL stated over Bq/mL data, or
the reverse, or a dose in the wrong unit) is refused while unusual but genuine studies pass."""

IMAGE_ROBUST_MAX_SUV = (0.1, 1000.0)
"""Plausible 99th percentile of the late mean over the whole volume (its robust maximum). FDG
hot spots (bladder, myocardium, tumours) reach SUV 5–50; 1000 is out of reach, and a maximum
below 0.1 means activity 1000 times too low."""

BLOOD_NEGATIVE_RTOL = 0.05
"""Blood values may be negative down to this fraction of the curve's peak (background-subtracted
counts near zero scatter around it); anything more negative is a data error (hard)."""

BLOOD_MIN_SAMPLES = 6
"""Fewest samples of a blood curve: two or three samples over an hour cannot describe a bolus
and its washout, and the Patlak integral built on them is wrong by tens of percent."""

BLOOD_FIRST_SAMPLE_MAX_MIN = 1.0
"""Latest first sample (min after the injection, `InjectionStart`, usually TimeZero). The FDG
bolus reaches the arteries within about 1 min and peaks then; kinetix takes the curve as 0
before its first sample, so a later start misses the bolus (Feng's FDG input: 8 % of the 60-min
integral missing at 2 min, 30 % at 10 min)."""

BLOOD_PEAK_MAX_MIN = 5.0
"""Latest time (min after the injection) of a curve's maximum: a bolus peaks within 1–2 min; a
short infusion by a few minutes. A maximum later than this is a spike, a clock error or not a
bolus study."""

BLOOD_GAP_MIN = 2.0
"""Sampling gaps (min) up to this are always accepted; see `BLOOD_GAP_RATIO`."""

BLOOD_GAP_RATIO = 1.0
"""A gap after a sample at time t (before the scan's end) may be at most max(`BLOOD_GAP_MIN`,
this × t): dense while the curve changes fast, sparser later (a usual manual protocol at 5, 10,
15, 20, 30, 45, 60 min passes; samples at 0, 30, 60 min do not), so that linear interpolation
integrates the curve over every frame to a few percent."""

BLOOD_LATE_FROM_MIN = 10.0
"""The blood level is judged from this time (min; or from half the scan when it is shorter) to
the end of the scan, after the bolus."""

BLOOD_LATE_SUV = (0.05, 100.0)
"""Plausible median SUV of the plasma (and whole-blood) curve after `BLOOD_LATE_FROM_MIN`.
Arterial FDG plasma is about SUV 1–6 from 10 min to an hour; the range leaves a factor 15 or
more either way, so that a blood sidecar with the wrong unit (factor 1000) is refused."""

KI_MEDIAN = (1e-4, 0.1)
"""Plausible median Patlak Ki (1/min) of the body voxels for FDG: muscle, fat and lung
0.001–0.005, liver 0.005–0.01, brain grey matter 0.03–0.05, so a body median outside 1e-4–0.1
means a unit mismatch between image and blood (factor 1000) or a broken input (warning only)."""

KI_ROBUST_RANGE = (-0.05, 1.0)
"""Plausible 1st and 99th percentiles of Ki (1/min) in the body: noise gives a few slightly
negative voxels and tumours or myocardium reach about 0.1–0.2, never 1 (warning only)."""


class ImplausibleError(BidsError):
    """Values outside the plausible ranges for FDG (`check_plausibility=False` proceeds)."""


def refusal(problem: str) -> ImplausibleError:
    """The error for a soft finding (a sentence ending in "."), saying how to proceed."""
    return ImplausibleError(problem.rstrip(".") + PROCEED + ".")


# ------------------------------------------------------------------------------------------------
# Blood
# ------------------------------------------------------------------------------------------------
def blood_faults(times_min, values, column: str, path) -> list[str]:
    """Hard faults of one blood curve (refused whatever `check_plausibility` says).

    Args:
      times_min: [K] sample times (min).
      values: [K] activity (any unit; SUV inside kinetix).
      column: the TSV column the values come from (named in the sentence).
      path: the blood TSV (named in the sentence).

    Returns:
      Sentences (empty when the curve is usable): non-finite values, no positive value, values
      below −`BLOOD_NEGATIVE_RTOL` × peak.
    """
    times = np.asarray(times_min, np.float64)
    values = np.asarray(values, np.float64)
    where = f"{path} column '{column}'"
    if not np.all(np.isfinite(values)):
        i = int(np.nonzero(~np.isfinite(values))[0][0])
        return [f"{where} has a non-finite value ({values[i]}) at {times[i] * 60:.6g} s."]
    peak = float(np.max(values)) if values.size else 0.0
    if peak <= 0:
        return [
            f"{where} has no positive value (maximum {peak + 0.0:.6g}); a blood curve must show "
            "the tracer (is it negated or empty?)."
        ]
    i = int(np.argmin(values))
    if values[i] < -BLOOD_NEGATIVE_RTOL * peak:
        return [
            f"{where} is {values[i]:.6g} at {times[i] * 60:.6g} s, below −{BLOOD_NEGATIVE_RTOL:g} "
            f"× its peak {peak:.6g}; blood activity cannot be negative."
        ]
    return []


def _gap_problem(times: np.ndarray, scan_end_min: float, where: str) -> list[str]:
    inside = times[:-1] < scan_end_min
    gaps = np.diff(times)[inside]
    allowed = np.maximum(BLOOD_GAP_MIN, BLOOD_GAP_RATIO * times[:-1][inside])
    bad = np.nonzero(gaps > allowed)[0]
    if not bad.size:
        return []
    k = int(bad[0])
    return [
        f"{where} has no sample between {times[k] * 60:.6g} s and {times[k + 1] * 60:.6g} s, a "
        f"gap longer than the {allowed[k]:.3g} min allowed there (the larger of "
        f"{BLOOD_GAP_MIN:g} min and {BLOOD_GAP_RATIO:g} × the time of the sample before it), too "
        "sparse to integrate the curve over the frames."
    ]


def _late_median(times: np.ndarray, values: np.ndarray, scan_end_min: float) -> float:
    """Median of the piecewise-linear curve over [min(10 min, end/2), end] (201 points)."""
    start = min(BLOOD_LATE_FROM_MIN, 0.5 * scan_end_min)
    grid = np.linspace(start, scan_end_min, 201)
    return float(np.median(np.interp(grid, times, values)))


def blood_problems(
    times_min,
    values_suv,
    column: str,
    path,
    scan_end_min: float,
    units_hint: str = "",
    injection_min: float = 0.0,
) -> list[str]:
    """Soft problems of one blood curve (in SUV), compared with the bounds above.

    Args:
      times_min: [K] sample times (min), increasing.
      values_suv: [K] activity (SUV) at those times (`blood_faults` found nothing).
      column: the TSV column (named in the sentence).
      path: the blood TSV (named in the sentence).
      scan_end_min: end of the last frame (min).
      units_hint: where the column's unit and the SUV factor come from, for the level sentence.
      injection_min: the injection's time (min after TimeZero, `InjectionStart`): the first
        sample and the peak are judged from it (a negative value counts as 0).

    Returns:
      Sentences (see `refusal`): too few samples, a late first sample, a late
      peak, a gap too long, a late level outside `BLOOD_LATE_SUV`.
    """
    times = np.asarray(times_min, np.float64)
    values = np.asarray(values_suv, np.float64)
    where = f"{path} column '{column}'"
    out = []
    if times.size < BLOOD_MIN_SAMPLES:
        out.append(
            f"{where} has {times.size} samples, fewer than the {BLOOD_MIN_SAMPLES} needed to "
            f"describe the bolus and its washout."
        )
    t_inj = max(float(injection_min), 0.0)
    if times[0] > t_inj + BLOOD_FIRST_SAMPLE_MAX_MIN:
        out.append(
            f"{where} starts at {times[0] * 60:.6g} s, more than "
            f"{BLOOD_FIRST_SAMPLE_MAX_MIN * 60:g} s after the injection at {t_inj * 60:g} s, so it "
            "misses the bolus (taken as 0 before the first sample)."
        )
    t_peak = float(times[int(np.argmax(values))])
    if t_peak > t_inj + BLOOD_PEAK_MAX_MIN:
        out.append(
            f"{where} peaks at {t_peak * 60:.6g} s, more than {BLOOD_PEAK_MAX_MIN * 60:g} s after "
            f"the injection at {t_inj * 60:g} s, later than a bolus peaks (a spike or a time "
            "error?)."
        )
    out += _gap_problem(times, scan_end_min, where)
    lo, hi = BLOOD_LATE_SUV
    level = _late_median(times, values, scan_end_min)
    if not lo <= level <= hi:
        start = min(BLOOD_LATE_FROM_MIN, 0.5 * scan_end_min)
        out.append(
            f"{where} has a median of SUV {level:.3g} from {start:g} to {scan_end_min:g} min, "
            f"outside the plausible FDG range {lo:g}–{hi:g} (a factor of 1000 points to a wrong "
            f"unit{units_hint})."
        )
    return out


# ------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------
def image_faults(frames, path) -> list[str]:
    """Hard faults of an image: no positive voxel value anywhere (e.g. an all-zero image)."""
    frames = np.asarray(frames)
    if not np.any(frames > 0):
        peak = float(np.max(frames)) if frames.size else 0.0
        return [
            f"{path} has no positive voxel value (maximum {peak:.6g}); an image without "
            "activity cannot be analysed."
        ]
    return []


def late_mean(frames, schedule: FrameSchedule) -> np.ndarray:
    """Duration-weighted mean [X, Y, Z] of the frames with mid-time >= `IMAGE_LATE_FRACTION` ×
    scan end (always at least the last frame); frames [X, Y, Z, T] in SUV."""
    late = schedule.mid >= IMAGE_LATE_FRACTION * float(schedule.end[-1])
    late[-1] = True
    w = np.where(late, schedule.duration, 0.0)
    return weighted_frames(frames, w / np.sum(w))


def image_levels(frames, schedule: FrameSchedule) -> tuple[float, float]:
    """(median SUV of the body voxels, 99th percentile of the volume) of `late_mean`."""
    mean = late_mean(frames, schedule)
    robust_max = float(np.percentile(mean, 99.0))
    body = mean > IMAGE_BODY_FRACTION * robust_max
    median = float(np.median(mean[body])) if np.any(body) else robust_max
    return median, robust_max


def image_problems(frames_suv, schedule: FrameSchedule, path, units_hint: str = "") -> list[str]:
    """Soft problems of an image in SUV: body median or robust maximum outside the bounds.

    Args:
      frames_suv: [X, Y, Z, T] SUV (`image_faults` found nothing).
      schedule: its frames (min).
      path: the image (named in the sentence).
      units_hint: where the unit and the SUV factor come from (keys of the sidecar).

    Returns:
      Sentences (see `refusal`).
    """
    median, robust_max = image_levels(frames_suv, schedule)
    out = []
    for name, value, (lo, hi) in (
        ("median SUV of the body", median, IMAGE_MEDIAN_SUV),
        ("99th-percentile SUV", robust_max, IMAGE_ROBUST_MAX_SUV),
    ):
        if not lo <= value <= hi:
            out.append(
                f"{path} has a {name} of {value:.3g} in its late frames, outside the plausible "
                f"FDG range {lo:g}–{hi:g} (a factor of 1000 points to a wrong unit{units_hint})"
                f"."
            )
            break  # one sentence: the second level says the same
    return out


# ------------------------------------------------------------------------------------------------
# Ki
# ------------------------------------------------------------------------------------------------
def ki_levels(ki, mask) -> tuple[float, float, float] | None:
    """(median, 1st percentile, 99th percentile) of Ki inside the mask, or None if it is empty."""
    values = np.asarray(ki, np.float64)[np.asarray(mask, bool)]
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    p1, median, p99 = np.percentile(values, [1.0, 50.0, 99.0])
    return float(median), float(p1), float(p99)


def ki_problems(ki, mask, what: str) -> list[str]:
    """Findings on a Ki map (1/min) inside its body mask, for warnings and sidecars.

    Args:
      ki: [X, Y, Z] Ki (1/min).
      mask: [X, Y, Z] body mask (bool or 0/1).
      what: the map, e.g. "sub-01_Ki.nii.gz" (named in the sentence).

    Returns:
      Sentences: an empty mask, non-finite values, a median outside `KI_MEDIAN`, 1st/99th
      percentiles outside `KI_ROBUST_RANGE`.
    """
    mask = np.asarray(mask, bool)
    ki = np.asarray(ki, np.float64)
    if not np.any(mask):
        return [f"{what}: the body mask is empty, so the Ki map is 0 everywhere."]
    out = []
    n_bad = int(np.count_nonzero(~np.isfinite(ki[mask])))
    if n_bad:
        out.append(f"{what}: {n_bad} body voxels have a non-finite Ki.")
    levels = ki_levels(ki, mask)
    if levels is None:
        return out
    median, p1, p99 = levels
    lo, hi = KI_MEDIAN
    if not lo <= median <= hi:
        out.append(
            f"{what}: the median Ki of the body is {median:.3g}/min, outside the plausible FDG "
            f"range {lo:g}–{hi:g}/min (check the image and blood units and the blood curve)."
        )
    lo, hi = KI_ROBUST_RANGE
    if p1 < lo or p99 > hi:
        out.append(
            f"{what}: the 1st–99th percentiles of Ki in the body are {p1:.3g}–{p99:.3g}/min, "
            f"outside the plausible FDG range {lo:g}–{hi:g}/min."
        )
    return out
