"""The Ki routes of the evaluation: a registry, one entry per way of getting a Ki map.

A route says which frames its Patlak fit uses and in which window:

- **measured**: the measured scan only (the 65-min reference, the 30-min baseline);
- **spliced**: the measured frames before `n_early` followed by a network's predicted frames
  (`kinetix.maps.splice`), the paper's proposed method;
- **predicted**: a network's predicted frames only (the authors' variant);
- **rates**: no Patlak: Ki = (1 − fv)·K1·k3/(k2 + k3) of a prediction's 2TCM parameters (the
  voxel-level uptake Patlak estimates), e.g. of a voxelwise 2TCM fit;
- **truth**: no fit, the simulator's voxel-level Ki (`derivatives/truth`).

The windows are those of `KiWindows` (frames chosen by mid-time, minutes). A route that uses a
prediction names it: "proposed" is the evaluated network's (`predict_fn`), "direct" the
"without model" ablation's (`ablation_fn`); a route is evaluated when its prediction (and, for
the truth, the truth) is available; "fit35" and "fit65" are voxelwise 2TCM fits of the measured
frames of 0–35 and 0–65 min (`kinetix.evaluation.fits`, with ``config.eval.fit_2tcm``). Adding a
route is one `register(Route(...))`: the Ki maps,
the tables, the per-tissue and ROI statistics, the figures and the report follow from the
registry. Time in minutes, Ki in mL/min/mL.
"""

import dataclasses
import functools
from collections.abc import Collection, Mapping

import jax
import numpy as np

import kinetix.kinetics as kk
from kinetix import maps

MEASURED, SPLICED, PREDICTED, RATES, TRUTH = "measured", "spliced", "predicted", "rates", "truth"
"""What a route fits: the measured frames, measured + predicted frames, predicted frames only,
or nothing (Ki from a prediction's 2TCM rates, or the true Ki)."""

FRAME_KINDS = (MEASURED, SPLICED, PREDICTED, RATES, TRUTH)

PREDICTION_LABELS = {
    "proposed": "kinetix (predicted)",
    "direct": "direct net (predicted)",
    "fit35": "2TCM fit 0-35 (extrapolated)",
    "fit65": "2TCM fit 0-65",
}
"""The predictions a route can use: "proposed" (`predict_fn`, the evaluated network), "direct"
(`ablation_fn`, the "without model" ablation), "fit35" / "fit65" (voxelwise 2TCM fits of the
measured frames of 0–35 / 0–65 min), with their display names."""


# ----------------------------------------------------------------------------------------------
# Fit windows
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KiWindows:
    """The Patlak fit windows of the evaluation (minutes; frames chosen by mid-time).

    Attributes:
      schedule: the cohort's frame schedule (T frames).
      n_early: measured frames the model sees; frames ≥ n_early are predicted.
      t_star: start of the linear phase (min), e.g. 9.
      baseline_t_end: end of the baseline window (min), e.g. 35.
      method: "ols" or "perpendicular".
    """

    schedule: kk.FrameSchedule
    n_early: int
    t_star: float
    baseline_t_end: float
    method: str

    def __post_init__(self):
        t = self.schedule.n_frames
        if not 2 <= self.n_early <= t - 2:
            raise ValueError(
                f"config.model.n_early = {self.n_early} must leave at least 2 measured and 2 "
                f"predicted frames of the {t}-frame schedule."
            )
        if self.method not in kk.METHODS:
            raise ValueError(
                f"config.eval.method must be one of {kk.METHODS}, got {self.method!r}."
            )
        for name, (t0, t1) in self.windows().items():
            try:
                self.schedule.select(t0, t1)
            except ValueError as err:
                raise ValueError(f"The {name} Patlak window [{t0}, {t1}] min: {err}") from err

    @property
    def late_t_star(self) -> float:
        """Start (min) of the first predicted frame: the authors' predicted-only window."""
        return float(self.schedule.start[self.n_early])

    def windows(self) -> dict[str, tuple[float, float | None]]:
        """{name: (t_star, t_end)} of the fits (t_end None = to the end of the scan)."""
        return {
            "reference": (float(self.t_star), None),
            "baseline": (float(self.t_star), float(self.baseline_t_end)),
            "proposed": (float(self.t_star), None),
            "proposed_late": (self.late_t_star, None),
        }

    def indices(self, window: str) -> tuple[int, ...]:
        """0-based indices of the frames in one window (a tuple: a static jit argument)."""
        windows = self.windows()
        if window not in windows:
            raise ValueError(f"window must be one of {list(windows)}, got {window!r}.")
        return tuple(int(i) for i in self.schedule.select(*windows[window]))

    def frame_numbers(self) -> dict[str, list[int]]:
        """1-based frame numbers entering each fit (as the paper counts frames)."""
        out = {k: [i + 1 for i in self.indices(k)] for k in self.windows()}
        out["proposed_measured"] = [i for i in out["proposed"] if i <= self.n_early]
        out["proposed_predicted"] = [i for i in out["proposed"] if i > self.n_early]
        return out

    def note_fields(self) -> dict:
        """The values a route's `note` may name: t_star, baseline_t_end, late_t_star (min),
        first_predicted (1-based frame number) and span[window] ("frames a-b")."""
        span = {
            k: f"frames {v[0]}-{v[-1]}" if v else "no frames"
            for k, v in self.frame_numbers().items()
        }
        return {
            "t_star": self.t_star,
            "baseline_t_end": self.baseline_t_end,
            "late_t_star": self.late_t_star,
            "first_predicted": self.n_early + 1,
            "span": span,
        }


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Route:
    """One way of getting a Ki map.

    Attributes:
      name: key in metrics.json, per_slice.csv and the per-tissue / ROI tables.
      label: display name (tables, figures).
      frames: MEASURED, SPLICED, PREDICTED or TRUTH (see the module docstring).
      window: the `KiWindows.windows()` entry of its Patlak fit (None for TRUTH).
      prediction: the prediction it uses ("proposed" or "direct"; None for MEASURED and TRUTH).
      note: one sentence for the report's conventions, formatted with
        `KiWindows.note_fields()` (empty: a generic sentence).
      full_input: the route stands for the full-hour scan, so it keeps the measured input up to
        the scan end when the evaluation completes the input past the early frames
        (``config.eval.late_input``); every other route uses the completed input.
    """

    name: str
    label: str
    frames: str
    window: str | None = None
    prediction: str | None = None
    note: str = ""
    full_input: bool = False

    def __post_init__(self):
        if self.frames not in FRAME_KINDS:
            raise ValueError(f"Route {self.name}: frames must be one of {FRAME_KINDS}.")
        uses_prediction = self.frames in (SPLICED, PREDICTED, RATES)
        if uses_prediction != (self.prediction in PREDICTION_LABELS):
            raise ValueError(
                f"Route {self.name}: a {self.frames} route needs "
                f"{'a' if uses_prediction else 'no'} prediction from {list(PREDICTION_LABELS)}."
            )
        if (self.frames in (TRUTH, RATES)) != (self.window is None):
            raise ValueError(
                f"Route {self.name}: Patlak routes need a window; truth and rates routes none."
            )

    @property
    def needs(self) -> str | None:
        """ "ablation" (the direct network's prediction), "truth", or None."""
        if self.frames == TRUTH:
            return "truth"
        return "ablation" if self.prediction == "direct" else None

    def available(self, predictions: Collection[str], has_truth: bool) -> bool:
        """Whether the route can be evaluated given the predictions at hand and the truth."""
        if self.frames == TRUTH:
            return has_truth
        return self.prediction is None or self.prediction in predictions

    def describe(self, windows: KiWindows) -> str:
        """The conventions sentence of this route."""
        fields = windows.note_fields()
        if self.note:
            return self.note.format(**fields)
        if self.frames == TRUTH:
            return f"{self.label}: read from the ground truth."
        if self.frames == RATES:
            return f"{self.label}: (1 - fv)·K1·k3/(k2 + k3) of the {self.prediction} parameters."
        return (
            f"{self.label}: Patlak on the {self.frames} frames "
            f"({fields['span'][self.window]}, {self.window} window)."
        )


ROUTES: dict[str, Route] = {}
"""The registered routes, by name, in display order."""


def register(route: Route) -> Route:
    """Adds a route to `ROUTES` (its name must be new); returns it."""
    if route.name in ROUTES:
        raise ValueError(f"A Ki route named {route.name!r} is already registered.")
    ROUTES[route.name] = route
    return route


def unregister(name: str) -> None:
    """Removes a route from `ROUTES` (e.g. a test's temporary route)."""
    del ROUTES[name]


for _route in (
    Route(
        "reference",
        "65-min Patlak (reference)",
        MEASURED,
        "reference",
        note="Reference = 65-min Patlak on the measured frames with mid-time >= {t_star:g} min "
        "({span[reference]}).",
        full_input=True,
    ),
    Route(
        "baseline",
        "30-min Patlak (baseline)",
        MEASURED,
        "baseline",
        note="Baseline = 30-min Patlak on the measured frames with mid-time in "
        "[{t_star:g}, {baseline_t_end:g}] min ({span[baseline]}).",
    ),
    Route(
        "proposed",
        "kinetix: meas. 9-35 + pred. 35-65",
        SPLICED,
        "proposed",
        "proposed",
        note="Proposed = Patlak ({span[proposed]}) on measured {span[proposed_measured]} "
        "followed by predicted {span[proposed_predicted]} (the prediction replaces every frame "
        ">= {first_predicted}).",
    ),
    Route(
        "proposed_late",
        "pred. 35-65 only (authors)",
        PREDICTED,
        "proposed_late",
        "proposed",
        note="Authors' variant = Patlak on the predicted frames only ({span[proposed_late]}, "
        "t* = {late_t_star:g} min).",
    ),
    Route(
        "direct",
        "direct net (no model)",
        SPLICED,
        "proposed",
        "direct",
        note="Direct ablation = the no-model network's late frames spliced like the proposed "
        "method, then the same Patlak fit.",
    ),
    Route(
        "direct_late",
        "direct, pred. 35-65 only",
        PREDICTED,
        "proposed_late",
        "direct",
        note="Direct ablation, authors' variant = Patlak on the no-model network's predicted "
        "frames only ({span[proposed_late]}), as for the kinetic network.",
    ),
    Route(
        "fit35_rates",
        "2TCM fit 0-35, Ki from rates",
        RATES,
        prediction="fit35",
        note="2TCM fit 0-35 = a bounded weighted least-squares 2TCM fit of each voxel's measured "
        "frames up to {late_t_star:g} min (kinetix.maps.volume_fit); Ki = (1 - fv)·K1·k3/(k2 "
        "+ k3).",
    ),
    Route(
        "fit35",
        "2TCM fit 0-35 extrap. + Patlak",
        SPLICED,
        "proposed",
        "fit35",
        note="2TCM fit extrapolated = the 0-35 min fit's frames replace every frame >= "
        "{first_predicted}, then the proposed method's Patlak fit ({span[proposed]}).",
    ),
    Route(
        "fit65_rates",
        "2TCM fit 0-65, Ki from rates",
        RATES,
        prediction="fit65",
        note="2TCM fit 0-65 = the same fit of every measured frame: a second reference, as a "
        "kinetic modeller with the full scan would compute Ki.",
        full_input=True,
    ),
    Route(
        "truth",
        "true Ki",
        TRUTH,
        note="True Ki = the simulator's voxel-level Ki (derivatives/truth), compared against the "
        "reference as an extra row and used as a second reference.",
    ),
):
    register(_route)

OTHER_LABELS = {"measured": "measured frame", "noisefree": "noise-free frame (truth)"}
"""Display names of the SUV tables' non-route rows and references."""


def method_labels() -> dict[str, str]:
    """{name: display name} of every registered route, then `OTHER_LABELS` (metrics.json)."""
    return {**{r.name: r.label for r in ROUTES.values()}, **OTHER_LABELS}


def available_routes(predictions: Collection[str], has_truth: bool) -> list[Route]:
    """The registered routes that can be evaluated, in registry order."""
    return [r for r in ROUTES.values() if r.available(predictions, has_truth)]


# ----------------------------------------------------------------------------------------------
# Ki maps of a batch
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("schedule",))
def patlak_coordinates(plasma_times, plasma, *, schedule):
    """Patlak abscissa and frame-mean plasma of a batch's sampled inputs (jitted).

    Args:
      plasma_times: [B, K] input sample times (min).
      plasma: [B, K] plasma input (SUV), piecewise linear (`kk.SampledInput`).
      schedule: static T-frame schedule (min).

    Returns:
      (x [B, T] in min, cp [B, T] frame-mean Cp in SUV): `kinetix.maps.patlak_coordinates`.
    """
    return maps.patlak_coordinates(kk.SampledInput(plasma_times, plasma), schedule)


@functools.partial(jax.jit, static_argnames=("idx", "method"))
def _patlak_ki(frames, x, cp, *, idx, method):
    return maps.batch_patlak(frames, x, cp, idx, method)[0]


def route_frames(route: Route, measured, predictions: Mapping, n_early: int):
    """The frames [..., T] a route fits: measured, spliced or predicted (any leading shape).

    Args:
      route: a MEASURED, SPLICED or PREDICTED route.
      measured: [..., T] measured frames (SUV).
      predictions: {prediction name: [..., T] predicted frames (SUV)}.
      n_early: frames before this index are measured in a splice.
    """
    if route.frames == MEASURED:
        return measured
    pred = predictions[route.prediction]
    return maps.splice(measured, pred, n_early) if route.frames == SPLICED else pred


def rates_ki(params) -> np.ndarray:
    """Voxel-level Ki (1 − fv)·K1·k3/(k2 + k3) of 2TCM parameters [..., 5] (mL/min/mL)."""
    p = np.asarray(params, np.float64)
    return np.asarray((1.0 - p[..., 0]) * kk.ki_from_rates(p[..., 1], p[..., 2], p[..., 3]))


def batch_ki(
    routes,
    windows: KiWindows,
    measured,
    predictions: Mapping,
    x,
    cp,
    mask,
    truth_ki=None,
    params: Mapping | None = None,
    reference_xcp=None,
) -> dict[str, np.ndarray]:
    """Masked Ki maps of a batch of slices by every route.

    Args:
      routes: the routes to compute (`available_routes`).
      windows: the fit windows.
      measured: [B, H, W, T] measured frames (SUV).
      predictions: {name: [B, H, W, T] predicted frames (SUV)}.
      x, cp: [B, T] Patlak coordinates (`patlak_coordinates`).
      mask: [B, H, W] body mask (0 / 1).
      truth_ki: [B, H, W] true Ki, for a TRUTH route.
      params: {prediction name: [B, H, W, 5] 2TCM parameters}, for RATES routes.
      reference_xcp: (x, cp) [B, T] of the measured full-scan input, for the `full_input`
        routes when the protocol's input (x, cp) was completed from the early frames; None:
        (x, cp) for every route.

    Returns:
      {route name: [B, H, W] Ki × mask (mL/min/mL)}, in the order of `routes`.
    """
    out = {}
    for route in routes:
        if route.frames == TRUTH:
            out[route.name] = truth_ki * mask
            continue
        if route.frames == RATES:
            out[route.name] = (rates_ki(params[route.prediction]) * mask).astype(np.float32)
            continue
        frames = route_frames(route, measured, predictions, windows.n_early)
        idx = windows.indices(route.window)
        rx, rcp = reference_xcp if (route.full_input and reference_xcp is not None) else (x, cp)
        out[route.name] = np.asarray(_patlak_ki(frames, rx, rcp, idx=idx, method=windows.method))
        out[route.name] = out[route.name] * mask
    return out


def roi_fits(routes, windows: KiWindows, curves: Mapping, x, cp) -> dict[str, dict]:
    """Patlak line fits of ROI-mean curves by the measured and spliced routes (the TAC figure).

    Args:
      routes: candidate routes; those fitting measured or spliced frames whose prediction is in
        `curves` are fitted, in this order.
      windows: the fit windows.
      curves: {"measured": [T] ROI-mean SUV, prediction name: [T] ROI-mean predicted SUV}.
      x, cp: [T] Patlak coordinates of the slice's input (min, SUV).

    Returns:
      {route name: {"ki" (mL/min/mL), "v0" (mL/mL), "idx": frame indices of the fit}}.
    """
    fits = {}
    for route in routes:
        if route.frames not in (MEASURED, SPLICED):
            continue
        if route.prediction is not None and route.prediction not in curves:
            continue
        curve = route_frames(route, curves["measured"], curves, windows.n_early)
        idx = np.asarray(windows.indices(route.window))
        slope, icpt = kk.fit_line(x[idx], curve[idx] / cp[idx], method=windows.method)
        fits[route.name] = {"ki": float(slope), "v0": float(icpt), "idx": idx.tolist()}
    return fits
