"""The plasma input past 35 min from the first 35 minutes (docs: notes/late_input_doc.md).

A 35-minute protocol has blood (or an image-derived input) only up to `t_cut` = 35 min, while
the frames of 35–65 min and the Patlak x-axis need Cp(t) up to `t_end` = 65 min.
`complete_input` keeps the measured samples with t ≤ t_cut and appends samples on a grid of
(t_cut, t_end] from one of `LATE_INPUTS`:

- "measured": the curve as given; it must reach t_end (within 1 %).
- "fit": Feng model 2 fitted to the samples up to t_cut (`kinetix.kinetics.input_fit`,
  relative weights) and extrapolated.
- "population": a population shape (`PopulationInput`, learnt by `learn_population` from a
  training cohort's curves), aligned at the subject's peak.

Either model is scaled to the mean of the measured samples of the last 5 min before t_cut (at
least the last 3 samples), so the curve continues where the measurement ends.

Both model routes take an optional late sample (t, value), e.g. one venous sample at 60 min:
the extrapolation is then multiplied by e^{b (t − t_cut)} with b chosen so that it passes
through that sample (continuous at t_cut). Whole blood past t_cut is the plasma times the
whole-blood/plasma ratio of the last measured samples. Times in minutes, activities in SUV (any
unit works: every operation is linear in the activity).
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kinetix.kinetics.input_fit import MIN_SAMPLES, fit_feng
from kinetix.kinetics.input_function import FengParams

LATE_INPUTS = ("measured", "fit", "population")

COVER_TOL = 0.01
"""A curve "reaches" time T when its last sample is at ≥ (1 − COVER_TOL)·T."""

SPLICE_MIN = 5.0
"""The model is scaled to the measured samples of the last SPLICE_MIN minutes up to t_cut (the
splice window); the whole-blood/plasma ratio past t_cut is taken from the same samples."""

SPLICE_SAMPLES = 3
"""The splice window holds at least this many of the last samples."""

NORM_WINDOW = (20.0, 35.0)
"""Each training curve is divided by its mean over this window (min) before the median."""

BOLUS_GRID = (5.0, 0.05)
"""The population grid: every 0.05 min up to 5 min, then every 0.5 min."""

TAIL_SLOPE_MIN = 10.0
"""Past its last grid time a population shape decays log-linearly at the slope of its last
TAIL_SLOPE_MIN minutes."""

_PAD = 32  # fit_feng inputs are padded to a multiple of this (one compile per size bucket)


# ------------------------------------------------------------------------------ curves ---
def _curve(times, values, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (times [K], values [K]) of a sampled curve."""
    t = np.asarray(times, np.float64)
    y = np.asarray(values, np.float64)
    if t.ndim != 1 or y.shape != t.shape or t.size < 2:
        raise ValueError(
            f"{what} must be two 1-D arrays of equal length >= 2, got {t.shape} and {y.shape}."
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what} must be finite.")
    if np.any(np.diff(t) <= 0) or t[0] < 0:
        raise ValueError(f"{what} times must be strictly increasing and >= 0 min.")
    return t, y


def _sampled(t: np.ndarray, y: np.ndarray, x) -> np.ndarray:
    """The piecewise-linear curve at x: 0 before the first sample, held after the last."""
    x = np.asarray(x, np.float64)
    return np.where(x < t[0], 0.0, np.interp(x, t, y))


def _integral(t: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    """∫_a^b of the piecewise-linear curve (`_sampled` semantics), exact."""
    inside = t[(t > a) & (t < b)]
    knots = np.concatenate([[a], inside, [b]])
    right = np.where(knots >= t[0], np.interp(knots, t, y), 0.0)  # value just after each knot
    left = np.where(knots > t[0], np.interp(knots, t, y), 0.0)  # value just before each knot
    return float(np.sum(0.5 * (right[:-1] + left[1:]) * np.diff(knots)))


def auc_error(t_true, cp_true, t_est, cp_est, t0: float = 35.0, t1: float = 65.0) -> float:
    """Relative error of ∫_{t0}^{t1} Cp of an estimated curve against the true one.

    Both curves are piecewise linear through their samples (0 before the first, held after the
    last, as `kk.SampledInput`); the integrals are exact for them.

    Args:
      t_true, cp_true: [K] true curve (min, any activity unit).
      t_est, cp_est: [L] estimated curve (same units).
      t0, t1: the interval (min).

    Returns:
      ∫ est / ∫ true − 1 (signed).
    """
    tt, yt = _curve(t_true, cp_true, "the true curve")
    te, ye = _curve(t_est, cp_est, "the estimated curve")
    true = _integral(tt, yt, float(t0), float(t1))
    if not true > 0:
        raise ValueError(f"the true curve has no positive area over {t0:g}–{t1:g} min.")
    return _integral(te, ye, float(t0), float(t1)) / true - 1.0


# -------------------------------------------------------------------------- population ---
@dataclasses.dataclass(frozen=True, eq=False)
class PopulationInput:
    """A population plasma shape learnt from a training cohort (`learn_population`).

    Attributes:
      times: [G] grid (min from injection for a subject whose peak is at `peak_time`), 0 to at
        least t_end, every 0.05 min up to 5 min and every 0.5 min after.
      plasma: [G] the median of the cohort's plasma curves, each aligned at its peak (moved to
        `peak_time`) and divided by its mean over `norm_window` (dimensionless).
      n_curves: number of training curves.
      peak_time: median peak time of the training curves (min).
      norm_window: (start, end) min of the per-curve normalisation.
    """

    times: np.ndarray
    plasma: np.ndarray
    n_curves: int
    peak_time: float
    norm_window: tuple[float, float] = NORM_WINDOW

    def __post_init__(self):
        t = np.asarray(self.times, np.float64)
        p = np.asarray(self.plasma, np.float64)
        if t.ndim != 1 or p.shape != t.shape or t.size < 2:
            raise ValueError(
                f"a population input needs 1-D times and plasma of equal length >= 2, got "
                f"{t.shape} and {p.shape}."
            )
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
            raise ValueError("a population input's times and plasma must be finite.")
        if np.any(np.diff(t) <= 0) or t[0] < 0 or np.any(p < 0) or not p[-1] > 0:
            raise ValueError(
                "a population input needs increasing times >= 0 and a non-negative plasma shape "
                "that is positive at its end."
            )
        window = tuple(float(v) for v in self.norm_window)
        if len(window) != 2 or not window[1] > window[0]:
            raise ValueError(f"norm_window must be (start, end) with end > start, got {window}.")
        if int(self.n_curves) < 1 or not math.isfinite(float(self.peak_time)):
            raise ValueError("a population input needs n_curves >= 1 and a finite peak_time.")
        object.__setattr__(self, "times", t)
        object.__setattr__(self, "plasma", p)
        object.__setattr__(self, "n_curves", int(self.n_curves))
        object.__setattr__(self, "peak_time", float(self.peak_time))
        object.__setattr__(self, "norm_window", window)

    def at(self, t) -> np.ndarray:
        """The shape at times t (min, any shape): linear on the grid, 0 before it, log-linear
        past its end at the slope of its last `TAIL_SLOPE_MIN` minutes."""
        t = np.asarray(t, np.float64)
        g, p = self.times, self.plasma
        j = int(np.searchsorted(g, g[-1] - TAIL_SLOPE_MIN, side="right")) - 1
        j = min(max(j, 0), g.size - 2)
        slope = 0.0
        if p[j] > 0:
            slope = math.log(p[-1] / p[j]) / (g[-1] - g[j])
        past = p[-1] * np.exp(slope * np.maximum(t - g[-1], 0.0))
        return np.where(t > g[-1], past, _sampled(g, p, t))

    def to_json(self, path) -> None:
        """Write the population as a small JSON file (times in min, the shape dimensionless)."""
        doc = {
            "Description": (
                "kinetix population plasma input: the median of a training cohort's plasma "
                "curves, each aligned at its peak (moved to PeakTime) and divided by its mean "
                "over NormalisationWindow."
            ),
            "Units": {"Time": "min", "Plasma": "1 (plasma / its mean over the window)"},
            "Alignment": "peak",
            "NCurves": self.n_curves,
            "PeakTime": self.peak_time,
            "NormalisationWindow": list(self.norm_window),
            "Time": [float(v) for v in self.times],
            "Plasma": [float(v) for v in self.plasma],
        }
        pathlib.Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def from_json(cls, path) -> "PopulationInput":
        """Read a file written by `to_json` (ValueError, one sentence, for a malformed one)."""
        path = pathlib.Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"population file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"population file {path} is not readable JSON ({err}).") from None
        if not isinstance(doc, dict):
            raise ValueError(f"population file {path} must hold a JSON object.")
        keys = ("Time", "Plasma", "NCurves", "PeakTime", "NormalisationWindow")
        missing = [k for k in keys if k not in doc]
        if missing:
            raise ValueError(f"population file {path} lacks the key(s) {', '.join(missing)}.")
        try:
            return cls(
                times=np.asarray(doc["Time"], np.float64),
                plasma=np.asarray(doc["Plasma"], np.float64),
                n_curves=int(doc["NCurves"]),
                peak_time=float(doc["PeakTime"]),
                norm_window=tuple(float(v) for v in doc["NormalisationWindow"]),
            )
        except (TypeError, ValueError) as err:
            msg = str(err).rstrip(".")
            raise ValueError(f"population file {path} is malformed: {msg}.") from None


def _population_grid(t_end: float) -> np.ndarray:
    edge, fine = BOLUS_GRID
    bolus = np.arange(int(round(edge / fine))) * fine
    late = edge + 0.5 * np.arange(int(math.floor((t_end - edge) / 0.5 + 1e-9)) + 1)
    grid = np.concatenate([bolus, late])
    grid = grid[grid < t_end - 1e-9]
    return np.append(grid, t_end)


def learn_population(
    curves: Sequence, *, t_end: float = 65.0, norm_window: tuple = NORM_WINDOW
) -> PopulationInput:
    """The population plasma shape of a training cohort.

    Each curve (piecewise linear, 0 before its first sample, held after its last) is divided by
    its mean over `norm_window` and moved in time so that its peak (largest sample) falls on
    the cohort's median peak time; the shape is the pointwise median on the grid.

    Args:
      curves: sequence of (times [K] min, plasma [K]) pairs (K may differ), each reaching t_end.
      t_end: last grid time (min).
      norm_window: (start, end) min of the per-curve normalisation.

    Returns:
      `PopulationInput`.

    Raises:
      ValueError: no curves, a malformed curve, one that ends before t_end (− 1 %) or has no
        positive mean over the window.
    """
    if len(curves) == 0:
        raise ValueError("learn_population needs at least one training curve.")
    w0, w1 = (float(v) for v in norm_window)
    if not (0 <= w0 < w1 <= t_end):
        raise ValueError(f"norm_window must satisfy 0 <= start < end <= t_end, got {norm_window}.")
    data, peaks = [], []
    for i, curve in enumerate(curves):
        t, y = _curve(curve[0], curve[1], f"training curve {i}")
        if t[-1] < (1.0 - COVER_TOL) * t_end:
            raise ValueError(
                f"training curve {i} ends at {t[-1]:g} min, before t_end = {t_end:g} min."
            )
        mean = _integral(t, y, w0, w1) / (w1 - w0)
        if not mean > 0:
            raise ValueError(
                f"training curve {i} has no positive mean over {w0:g}–{w1:g} min to normalise by."
            )
        data.append((t, y / mean))
        peaks.append(t[np.argmax(y)])
    peak_time = float(np.median(peaks))
    grid = _population_grid(float(t_end))
    aligned = [
        _sampled(t, y, grid + (pk - peak_time)) for (t, y), pk in zip(data, peaks, strict=True)
    ]
    shape = np.median(np.stack(aligned), axis=0)
    return PopulationInput(grid, shape, len(data), peak_time, (w0, w1))


# ---------------------------------------------------------------------------- complete ---
class CompletedInput(NamedTuple):
    """The input up to t_end: times [M] min, plasma [M], whole_blood [M] or None, and `info`,
    a JSON-able dict of how the part past t_cut was made (for output sidecars)."""

    times: np.ndarray
    plasma: np.ndarray
    whole_blood: np.ndarray | None
    info: dict


def _late_grid(t_cut: float, t_end: float, step: float) -> np.ndarray:
    """(t_cut, t_end] every `step` min, t_end included."""
    n = int(math.ceil((t_end - t_cut) / step - 1e-9))
    grid = t_cut + step * np.arange(1, n + 1)
    grid[-1] = t_end
    return grid


def _feng_np(params, t) -> np.ndarray:
    a1, a2, a3, l1, l2, l3, tau = (float(v) for v in params)
    s = np.maximum(np.asarray(t, np.float64) - tau, 0.0)
    val = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return np.where(s > 0, val, 0.0)


def _fit_route(t, y, t_cut):
    """Feng fit of the samples up to t_cut: (model callable, info dict)."""
    n = t.size
    if n < MIN_SAMPLES:
        raise ValueError(
            f"only {n} blood samples up to {t_cut:g} min; the Feng fit needs at least "
            f"{MIN_SAMPLES}."
        )
    size = _PAD * int(math.ceil(n / _PAD))
    pad = np.full(size - n, np.nan)
    res = fit_feng(np.concatenate([t, pad]), np.concatenate([y, pad]), t_end=t_cut)
    params = np.asarray(res.params, np.float64)
    rmse, steps = float(res.rmse), int(res.n_steps)
    if not bool(res.converged):
        raise ValueError(
            f"the Feng fit of the input did not converge (relative rms residual {rmse:.3g}, "
            f"{steps} steps, parameters {np.round(params, 4).tolist()}); pass --late_input "
            f"population or check the blood curve."
        )
    info = {
        "feng": dict(zip(FengParams._fields, params.tolist(), strict=True)),
        "converged": True,
        "rmse": rmse,
        "n_steps": steps,
        "weights": "relative: 1/max(Cp, 0.02 peak)^2",
    }
    return (lambda x: _feng_np(params, x)), info


def _population_route(t, y, population):
    """Population shape aligned at the subject's peak: (model, info)."""
    if population is None:
        raise ValueError(
            "the late input 'population' needs a population input (learn_population or "
            "PopulationInput.from_json)."
        )
    shift = float(t[np.argmax(y)]) - population.peak_time
    info = {"population_curves": population.n_curves, "shift_min": shift}
    return (lambda x: population.at(np.asarray(x, np.float64) - shift)), info


def complete_input(
    times,
    plasma,
    whole_blood,
    how: str,
    *,
    t_cut: float = 35.0,
    t_end: float = 65.0,
    population: PopulationInput | None = None,
    late_sample: tuple[float, float] | None = None,
    grid_step: float = 0.5,
) -> CompletedInput:
    """The plasma (and whole-blood) input up to t_end from the samples up to t_cut.

    "measured" returns the curve unchanged (it must reach t_end − 1 %). "fit" and "population"
    keep the samples with t ≤ t_cut and append the model's values on (t_cut, t_end] every
    `grid_step` min (t_end included):

    - the shape m(t): "fit": the Feng fit of the samples ≤ t_cut (`fit_feng`); "population":
      `population.at(t − (t_peak − population.peak_time))`, t_peak the time of the largest
      sample.
    - the splice: c = Σ y_k / Σ m(t_k) over the splice window, the samples of the last
      `SPLICE_MIN` = 5 min up to the last one (at least the last `SPLICE_SAMPLES` = 3).
    - with `late_sample` = (t_L, y_L): the appended values c·m(t) are multiplied by
      e^{b (t − t_cut)}, b = ln(y_L / (c·m(t_L))) / (t_L − t_cut): through the sample.

    Whole blood past t_cut: the plasma × Σ wb_k / Σ y_k over the splice window.

    Args:
      times: [K] sample times (min), strictly increasing, ≥ 0.
      plasma: [K] plasma (SUV). whole_blood: [K] whole blood (SUV) or None.
      how: one of `LATE_INPUTS`.
      t_cut: last time (min) of the measured curve that is used.
      t_end: time (min) the input must reach.
      population: the `PopulationInput` for "population".
      late_sample: optional (t_min, plasma) with t_cut < t_min ≤ t_end and plasma > 0.
      grid_step: spacing (min) of the appended samples.

    Returns:
      `CompletedInput` (float64 arrays; whole_blood None when not given).

    Raises:
      ValueError: see notes/late_input_doc.md (one sentence each).
    """
    if how not in LATE_INPUTS:
        raise ValueError(f"late input must be one of {LATE_INPUTS}, got {how!r}.")
    t, y = _curve(times, plasma, "the plasma curve")
    wb = None
    if whole_blood is not None:
        _, wb = _curve(times, whole_blood, "the whole-blood curve")
    t_cut, t_end, grid_step = float(t_cut), float(t_end), float(grid_step)
    if not (0 < t_cut < t_end) or not grid_step > 0:
        raise ValueError(
            f"need 0 < t_cut < t_end and grid_step > 0, got t_cut = {t_cut:g}, "
            f"t_end = {t_end:g}, grid_step = {grid_step:g}."
        )
    if how == "measured":
        if late_sample is not None:
            raise ValueError(
                "a late sample is only used by --late_input fit or population, not measured."
            )
        if t[-1] < (1.0 - COVER_TOL) * t_end:
            raise ValueError(
                f"the blood curve ends at {t[-1]:g} min, before the end of the scan at "
                f"{t_end:g} min; pass --late_input fit or population to complete it."
            )
        info = {"method": "measured", "t_end": t_end, "last_sample_min": float(t[-1])}
        return CompletedInput(t, y, wb, info)

    if t[-1] < (1.0 - COVER_TOL) * t_cut:
        raise ValueError(
            f"the blood curve ends at {t[-1]:g} min, before t_cut = {t_cut:g} min that the "
            f"late input {how!r} needs."
        )
    late = None
    if late_sample is not None:
        t_l, y_l = (float(v) for v in late_sample)
        if not (t_cut < t_l <= t_end and math.isfinite(y_l) and y_l > 0):
            raise ValueError(
                f"the late sample must lie in ({t_cut:g}, {t_end:g}] min with a positive "
                f"value, got ({t_l:g} min, {y_l:g})."
            )
        late = (t_l, y_l)
    keep = t <= t_cut + 1e-6
    t, y = t[keep], y[keep]
    wb = None if wb is None else wb[keep]
    last = t >= t[-1] - SPLICE_MIN
    last[-SPLICE_SAMPLES:] = True
    if how == "fit":
        shape, info = _fit_route(t, y, t_cut)
    else:
        shape, info = _population_route(t, y, population)
    at_last = float(np.sum(shape(t[last])))
    scale = float(np.sum(y[last])) / at_last if at_last > 0 else math.nan
    if not (math.isfinite(scale) and scale > 0):
        if how == "fit":
            raise ValueError(
                "the Feng fit of the input did not converge (it is not positive at the last "
                "samples); pass --late_input population or check the blood curve."
            )
        raise ValueError(
            f"the blood curve has no positive level in its last samples "
            f"({t[last][0]:g}–{t[-1]:g} min) to scale the population shape to."
        )
    info["scale"] = scale
    info["splice_window_min"] = [float(t[last][0]), float(t[-1])]

    def model(x):
        return scale * shape(x)

    grid = _late_grid(t_cut, t_end, grid_step)
    tail = model(grid)
    rate = 0.0
    if late is not None:
        at_late = float(model(np.array([late[0]]))[0])
        if not at_late > 0:
            raise ValueError(
                f"the {how} extrapolation is 0 at the late sample's {late[0]:g} min; check the "
                "blood curve."
            )
        rate = math.log(late[1] / at_late) / (late[0] - t_cut)
        tail = tail * np.exp(rate * (grid - t_cut))
    info = {
        "method": how,
        "t_cut": t_cut,
        "t_end": t_end,
        "grid_step": grid_step,
        "n_measured": int(t.size),
        **info,
        "late_sample": None if late is None else list(late),
        "tail_rate": rate,
    }
    out_wb = None
    if wb is not None:
        ratio = float(np.sum(wb[last]) / np.sum(y[last])) if np.sum(y[last]) > 0 else 1.0
        info["blood_plasma_ratio"] = ratio
        out_wb = np.concatenate([wb, ratio * tail])
    return CompletedInput(np.concatenate([t, grid]), np.concatenate([y, tail]), out_wb, info)


def complete_study(
    study,
    how: str,
    *,
    t_cut: float = 35.0,
    t_end: float = 65.0,
    population: PopulationInput | None = None,
    late_sample: tuple[float, float] | None = None,
):
    """`complete_input` on a `kinetix.data.bids.Study`: (the study with completed curves, info).

    The returned study is a `dataclasses.replace` of `study` (float32 curves, as every Study);
    a study without whole blood keeps `whole_blood = None`.
    """
    done = complete_input(
        study.plasma_times,
        study.plasma,
        study.whole_blood,
        how,
        t_cut=t_cut,
        t_end=t_end,
        population=population,
        late_sample=late_sample,
    )
    new = dataclasses.replace(
        study, plasma_times=done.times, plasma=done.plasma, whole_blood=done.whole_blood
    )
    return new, done.info
