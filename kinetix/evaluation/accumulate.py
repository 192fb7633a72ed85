"""One batch of held-out slices, and what the evaluation keeps of it.

`batch_maps` turns a batch of `kinetix.data.pipeline.eval_batches` into `BatchMaps`: the
networks' predictions, every available route's Ki map and the last-frame SUV maps, all masked.
Four accumulators are fed batch by batch, one per concern:

- `SliceScores`: the per-slice image metrics of every table;
- `TissueSums`: per-tissue sums of late-frame SUV, Ki and 2TCM parameters (with a truth);
- `TumourRois`: the tumour ROIs and their Ki (with a truth);
- `FigureExamples`: the slices kept for the figures.

Frames and SUV in g/mL, Ki in mL/min/mL, time in minutes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kinetix.evaluation import metrics as km
from kinetix.evaluation import routes as kr
from kinetix.evaluation.tables import TABLES, add_label_sums, tumour_rois
from kinetix.figures.evaluation import figure_quota, pick_slices
from kinetix.kinetics import PARAM_NAMES

_batch_metrics = jax.jit(km.batch_slice_metrics)


# ----------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BatchMaps:
    """The maps of one batch of B slices (NumPy).

    Attributes:
      subjects, slices: [B] subject name and z index of each slice.
      valid: [B] bool, False for padding.
      mask: [B, H, W] float32 body mask.
      measured: [B, H, W, T] measured frames.
      predictions: {"proposed" (, "direct"): [B, H, W, T] predicted frames}.
      params: [B, H, W, 5] the proposed network's 2TCM maps (fv, K1, k2, k3, k4), or None.
      x, cp: [B, T] float64 Patlak coordinates (min, SUV).
      ki: {route: [B, H, W] masked Ki}, in route order.
      suv: {"measured", prediction names (, "truth"): [B, H, W] masked last frame}.
      truth: per slice, the subject's truth (`truth.load_truth`), or None.
    """

    subjects: list
    slices: list
    valid: np.ndarray
    mask: np.ndarray
    measured: np.ndarray
    predictions: dict
    params: np.ndarray | None
    x: np.ndarray
    cp: np.ndarray
    ki: dict
    suv: dict
    truth: list | None

    def indices(self) -> list[int]:
        """Positions of the valid slices."""
        return [int(b) for b in np.nonzero(self.valid)[0]]


def check_prediction(out, shape, name) -> np.ndarray:
    """The predicted frames [B, H, W, T] of a predictor's output dict (float32)."""
    if not isinstance(out, dict) or "frames" not in out:
        raise ValueError(f"{name} must return a dict with a 'frames' array.")
    frames = np.asarray(out["frames"], np.float32)
    if frames.shape != shape:
        raise ValueError(
            f"{name} returned frames of shape {frames.shape}; expected {shape} = [B, H, W, T], "
            "all frames of the schedule."
        )
    return frames


def check_params(out, shape, name) -> np.ndarray | None:
    """The prediction's 2TCM parameter maps [B, H, W, 5] (fv, K1, k2, k3, k4), or None."""
    params = out.get("params")
    if params is None:
        return None
    params = np.asarray(params, np.float64)
    if params.shape != (*shape, len(PARAM_NAMES)):
        raise ValueError(
            f"{name} returned params of shape {params.shape}; expected "
            f"{(*shape, len(PARAM_NAMES))} = [B, H, W, 5] ({', '.join(PARAM_NAMES)}) or None."
        )
    return params


def _predict(batch, predictors: dict, shape) -> tuple[dict, dict]:
    """({name: frames}, {name: parameter maps, for the predictors that give them})."""
    predictions, params = {}, {}
    for name, (label, fn) in predictors.items():
        raw = fn(batch)
        predictions[name] = check_prediction(raw, shape, label)
        p = check_params(raw, shape[:3], label)
        if p is not None:
            params[name] = p
    return predictions, params


def _truth_slices(truth: list | None, zs: list[int], key: str) -> np.ndarray | None:
    """[B, H, W] slices of one truth map (None without a truth)."""
    if truth is None:
        return None
    return np.stack([t[key][:, :, z] for t, z in zip(truth, zs, strict=True)])


def batch_maps(batch, cohort, predictors: dict, routes, windows, truth_cache) -> BatchMaps | None:
    """The maps of one batch, or None when it holds no valid slice.

    Args:
      batch: a batch of `kinetix.data.pipeline.eval_batches`.
      cohort: the cohort (subject names).
      predictors: {prediction name: (argument name for errors, fn)}, fn: batch -> {"frames":
        [B, H, W, T], "params": [B, H, W, 5] or None}.
      routes: the available Ki routes.
      windows: the fit windows (`routes.KiWindows`).
      truth_cache: a `truth.TruthCache`, or None without a truth.
    """
    valid = np.asarray(batch["valid"]) > 0
    if not valid.any():
        return None
    measured = np.asarray(batch["frames"], np.float32)
    mask = np.asarray(batch["mask"], np.float32)
    predictions, params = _predict(batch, predictors, measured.shape)
    x, cp = kr.patlak_coordinates(batch["plasma_times"], batch["plasma"], schedule=windows.schedule)
    reference_xcp = None
    if "reference_plasma" in batch:  # the input was completed past the early frames
        reference_xcp = kr.patlak_coordinates(
            batch["reference_plasma_times"], batch["reference_plasma"], schedule=windows.schedule
        )
    names = [cohort.subjects[int(i)] for i in batch["subject"]]
    zs = [int(z) for z in batch["slice"]]
    truth = None if truth_cache is None else truth_cache.batch(names)
    truth_ki = _truth_slices(truth, zs, "ki")
    ki = kr.batch_ki(
        routes, windows, measured, predictions, x, cp, mask, truth_ki, params, reference_xcp
    )
    suv = {"measured": measured[..., -1] * mask}
    suv.update({name: p[..., -1] * mask for name, p in predictions.items()})
    if truth is not None:
        suv["truth"] = _truth_slices(truth, zs, "last_frame_suv") * mask
    return BatchMaps(
        names,
        zs,
        valid,
        mask,
        measured,
        predictions,
        params.get("proposed"),
        np.asarray(x, np.float64),
        np.asarray(cp, np.float64),
        ki,
        suv,
        truth,
    )


# ----------------------------------------------------------------------------------------------
# Accumulators
# ----------------------------------------------------------------------------------------------
class SliceScores:
    """Per-slice metrics of every table ({table: rows}, `tables.table_methods`)."""

    def __init__(self, tables: dict[str, list[str]]):
        self.tables = tables
        self._values = {
            t: {m: {k: [] for k in km.METRIC_NAMES} for m in methods}
            for t, methods in tables.items()
        }
        self.subjects: list[str] = []
        self.slices: list[int] = []

    def add(self, maps: BatchMaps) -> None:
        valid = jnp.asarray(maps.valid)
        for table, methods in self.tables.items():
            spec = TABLES[table]
            source = maps.ki if spec.kind == "ki" else maps.suv
            for method in methods:
                vals = _batch_metrics(source[spec.ref_map], source[method], valid)
                for k in km.METRIC_NAMES:
                    self._values[table][method][k].append(np.asarray(vals[k])[maps.valid])
        self.subjects.extend(s for s, v in zip(maps.subjects, maps.valid, strict=True) if v)
        self.slices.extend(z for z, v in zip(maps.slices, maps.valid, strict=True) if v)

    def per_slice(self) -> dict:
        """{table: {method: {metric: [N] values}}} over every valid slice, in batch order."""
        return {
            t: {m: {k: np.concatenate(v) for k, v in ms.items()} for m, ms in tab.items()}
            for t, tab in self._values.items()
        }


class TissueSums:
    """Per-tissue sums (`tables.add_label_sums`) of late-frame SUV, Ki and 2TCM parameters."""

    def __init__(self, n_early: int):
        self.n_early = n_early
        self.sums: dict[str, dict] = {"late_frames": {}, "ki": {}}
        self.params: dict[str, dict] = {}  # 2TCM parameter -> sums
        self.label_names: dict[int, str] = {}

    def add(self, maps: BatchMaps) -> None:
        if maps.truth is None:
            return
        n = self.n_early
        for b in maps.indices():
            tr, z, mask = maps.truth[b], maps.slices[b], maps.mask[b]
            labels = tr["labels"][:, :, z]
            late = {
                "truth": tr["late_suv"][:, :, z],
                "measured": maps.measured[b, ..., n:].mean(-1),
            }
            late.update({k: p[b, ..., n:].mean(-1) for k, p in maps.predictions.items()})
            add_label_sums(self.sums["late_frames"], labels, mask, late)
            add_label_sums(self.sums["ki"], labels, mask, {m: ki[b] for m, ki in maps.ki.items()})
            if maps.params is not None:
                for i, name in enumerate(PARAM_NAMES):
                    if name in tr["params"]:
                        pair = {
                            "truth": tr["params"][name][:, :, z],
                            "proposed": maps.params[b, ..., i],
                        }
                        add_label_sums(self.params.setdefault(name, {}), labels, mask, pair)
            self.label_names.update(tr["label_names"])


class TumourRois:
    """Every tumour ROI of the evaluated slices (`tables.tumour_rois`) with each route's Ki."""

    def __init__(self):
        self.rois: list[dict] = []
        self.voxels: dict[str, list[np.ndarray]] = {}  # route -> per ROI, its voxels' Ki

    def add(self, maps: BatchMaps) -> None:
        if maps.truth is None:
            return
        for b in maps.indices():
            tr, z = maps.truth[b], maps.slices[b]
            for r in tumour_rois(tr["labels"][:, :, z], tr["tumour_ids"]):
                roi = r["roi"]
                self.rois.append(
                    {
                        "subject": maps.subjects[b],
                        "slice": z,
                        "label": r["label"],
                        "label_name": tr["label_names"].get(r["label"], str(r["label"])),
                        "centre": list(r["centre"]),
                        "n_voxels": int(roi.sum()),
                        "n_tumour_voxels": r["n_tumour"],
                        "ki": {m: float(ki[b][roi].mean()) for m, ki in maps.ki.items()},
                    }
                )
                for m, ki in maps.ki.items():
                    self.voxels.setdefault(m, []).append(ki[b][roi].astype(np.float64))


class FigureExamples:
    """The slices drawn in the report: `max_figures` shared among the subjects (`figure_quota`),
    per subject the slices of `pick_slices` (most tumour voxels, else the middle ones)."""

    def __init__(self, cohort, subjects, max_figures: int):
        self.cohort = cohort
        quota = figure_quota(len(subjects), max(max_figures, 0))
        self.quota = dict(zip(subjects, quota, strict=True))
        self.wanted: dict[str, list[int]] = {}
        self.examples: list[dict] = []

    def add(self, maps: BatchMaps) -> None:
        for b in maps.indices():
            s, z = maps.subjects[b], maps.slices[b]
            tr = maps.truth[b] if maps.truth is not None else None
            if s not in self.wanted:
                n_z = self.cohort.n_slices(s)
                labels = tr["labels"] if tr is not None else None
                ids = tr["tumour_ids"] if tr is not None else []
                self.wanted[s] = pick_slices(n_z, labels, ids, min(self.quota[s], n_z))
            if z in self.wanted[s]:
                self.examples.append(_example(maps, b, tr))


def _example(maps: BatchMaps, b: int, tr: dict | None) -> dict:
    """What the figures need of slice b: its Ki maps, mask, labels, frames and input."""
    z = maps.slices[b]
    labels = None if tr is None else tr["labels"][:, :, z].copy()
    return {
        "subject": maps.subjects[b],
        "slice": z,
        "ki": {m: ki[b].copy() for m, ki in maps.ki.items()},
        "mask": maps.mask[b].copy(),
        "labels": labels,
        "label_names": {} if tr is None else tr["label_names"],
        "tumour_ids": [] if tr is None else tr["tumour_ids"],
        "tumour_rois": [] if tr is None else tumour_rois(labels, tr["tumour_ids"]),
        "measured": maps.measured[b].copy(),
        "predictions": {k: p[b].copy() for k, p in maps.predictions.items()},
        "x": maps.x[b],
        "cp": maps.cp[b],
    }
