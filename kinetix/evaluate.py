"""Held-out evaluation: Ki maps by several routes, the authors' per-slice metrics, tumour ROIs.

    python -m kinetix.evaluate --workdir W [--data BIDS] [--ablation_workdir W2] [--out DIR]

For every slice of the held-out subjects, Patlak Ki maps (`kk.patlak`, TPCCLIB convention:
∫0^{t_mid} Cp / frame-mean Cp, frames chosen by mid-time) are computed from

- **reference**: the measured 65-min scan, frames with mid-time ≥ t* (16–28 for the paper's
  schedule and t* = 9 min);
- **baseline**: the measured first 35 min, mid-time in [t*, 35] (frames 16–22);
- **proposed**: measured frames 16–22 followed by the predicted frames 23–28 (the prediction
  replaces every frame ≥ `n_early`);
- **proposed_late**: the authors' variant, Patlak on the predicted frames 23–28 only
  (t* = start of frame `n_early` + 1, i.e. 35 min);
- **direct**: the "without model" ablation spliced like *proposed* (when `ablation_fn` is given);
- **truth**: the simulator's voxel-level Ki (`derivatives/truth`), when every subject has one.

Every Ki (and SUV) map is multiplied by the body mask of the batch (Ki outside the body is 0)
before any metric. Metrics follow the authors' code (kinetix.metrics.batch_slice_metrics): per
2-D slice, both images clipped to [0, max(reference slice)], data_range = max(reference slice),
scikit-image SSIM defaults, PSNR, NRMSE (Euclidean), NMI with 100 bins, plus MS-SSIM; slices with
NaN metrics (e.g. an all-zero reference slice) are skipped and counted. Means over slices sit
beside their relative change against the baseline (kinetix.metrics.relative_change).
SUV metrics use the last frame (predicted vs measured frame 28) with the same conventions.

Tumour ROIs (the paper's 10×10×10-voxel ROI adapted to 2-D slices): every 8-connected region of
a tumour label (label name containing "nodule", "tumo" or "lesion") in a slice of the truth
label map, united with the 3×3 square centred on the region's centroid, so that a one-voxel
nodule still gives a 3×3 ROI. Bland–Altman statistics (bias, 95 % limits of agreement
bias ± 1.96·SD, SD with ddof = 1) compare each method's ROI-mean Ki against the reference (and
against the truth), plus a voxel-level variant over all ROI voxels (closer to the paper's plot).

Outputs under `out_dir` (default `workdir/eval`, overwritten): `metrics.json`, `report.md`,
`per_slice.csv` and `figures/*.png` (see kinetix.report).
"""

import csv
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np
from absl import logging

import kinetix.kinetics as kk
from kinetix import metrics as km
from kinetix import report
from kinetix.data import bids, pipeline

METHOD_LABELS = {
    "reference": "65-min Patlak (reference)",
    "baseline": "30-min Patlak (baseline)",
    "proposed": "kinetix: meas. 9-35 + pred. 35-65",
    "proposed_late": "pred. 35-65 only (authors)",
    "direct": "direct net (no model)",
    "truth": "true Ki",
    "measured": "measured frame",
    "noisefree": "noise-free frame (truth)",
}
"""Display names of the methods (tables and figures)."""

HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "nrmse": False, "nmi": True, "ms_ssim": True}
"""Direction of improvement of each metric in `kinetix.metrics.METRIC_NAMES`."""

TUMOUR_NAME_PARTS = ("nodule", "tumo", "lesion")
"""A truth label whose name contains one of these is a tumour."""

ORGAN_PREFERENCE = ("liver", "myocardium", "muscle", "soft_tissue")
"""Organ ROI of the TAC / Patlak figure: the first of these labels present in the slice."""

ROI_MIN_SIDE = 3
"""Tumour ROIs cover at least this square (voxels) around the tumour centroid."""

LOA_Z = 1.96
"""Bland–Altman limits of agreement: bias ± LOA_Z · SD."""


# ----------------------------------------------------------------------------------------------
# Ki maps
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

    def frame_numbers(self) -> dict[str, list[int]]:
        """1-based frame numbers entering each fit (as the paper counts frames)."""
        out = {k: [int(i) + 1 for i in self.schedule.select(*w)] for k, w in self.windows().items()}
        out["proposed_measured"] = [i for i in out["proposed"] if i <= self.n_early]
        out["proposed_predicted"] = [i for i in out["proposed"] if i > self.n_early]
        return out


@functools.partial(jax.jit, static_argnames=("schedule",))
def patlak_coordinates(plasma_times, plasma, *, schedule):
    """Patlak abscissa and frame-mean plasma of a batch of inputs (`kk.patlak_x`, vmapped).

    Args:
      plasma_times: [B, K] input sample times (min).
      plasma: [B, K] plasma input (SUV), piecewise linear (`kk.SampledInput`).
      schedule: static T-frame schedule (min).

    Returns:
      (x [B, T] in min: ∫0^{t_mid} Cp / frame-mean Cp, cp [B, T] frame-mean Cp in SUV).
    """
    return jax.vmap(lambda t, p: kk.patlak_x(kk.SampledInput(t, p), schedule))(plasma_times, plasma)


@functools.partial(jax.jit, static_argnames=("idx", "method"))
def batch_ki(frames, x, cp, *, idx, method):
    """Voxelwise Patlak Ki of a batch of slices, each with its own input's coordinates.

    The same computation as `kk.patlak` (its `patlak_x` and `fit_line`), with the abscissa
    computed once per batch by `patlak_coordinates` and shared by every fit window.

    Args:
      frames: [B, H, W, T] decay-corrected frames (SUV).
      x: [B, T] Patlak abscissa (min).
      cp: [B, T] frame-mean plasma (SUV).
      idx: static tuple of the frame indices in the fit (`FrameSchedule.select`).
      method: static "ols" or "perpendicular".

    Returns:
      [B, H, W] Ki (mL/min/mL).
    """
    sel = np.asarray(idx)
    xs = x[:, sel][:, None, None, :]  # [B, 1, 1, N]
    y = frames[..., sel] / cp[:, sel][:, None, None, :]  # [B, H, W, N]
    return kk.fit_line(xs, y, method=method)[0]


def splice(measured: np.ndarray, predicted: np.ndarray, n_early: int) -> np.ndarray:
    """Measured frames [..., :n_early] followed by predicted frames [..., n_early:] ([..., T])."""
    return np.concatenate([measured[..., :n_early], predicted[..., n_early:]], axis=-1)


_batch_metrics = jax.jit(km.batch_slice_metrics)


# ----------------------------------------------------------------------------------------------
# Tumour ROIs and Bland–Altman
# ----------------------------------------------------------------------------------------------
def connected_components(region: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean image (as scipy.ndimage.label with a 3×3 block).

    Args:
      region: [H, W] booleans.

    Returns:
      (labels [H, W] int32, 0 outside and 1..n numbered in raster order of first voxel, n).
    """
    region = np.asarray(region, bool)
    if region.ndim != 2:
        raise ValueError(f"region must be a 2-D array, got shape {region.shape}.")
    out = np.zeros(region.shape, np.int32)
    h, w = region.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(region), strict=True):
        if out[y0, x0]:
            continue
        n += 1
        out[y0, x0] = n
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if region[yy, xx] and not out[yy, xx]:
                        out[yy, xx] = n
                        stack.append((yy, xx))
    return out, n


def tumour_rois(labels: np.ndarray, tumour_ids, min_side: int = ROI_MIN_SIDE) -> list[dict]:
    """Tumour ROIs of one 2-D label slice.

    Each 8-connected region of one tumour label becomes one ROI: the region united with the
    `min_side`×`min_side` square centred on its centroid (rounded half up, cut at the image
    border), so tiny nodules still give a `min_side`² ROI.

    Args:
      labels: [H, W] integer label slice.
      tumour_ids: label ids that are tumours.
      min_side: odd side of the minimum square (voxels).

    Returns:
      A list of {"label": id, "roi": [H, W] bool, "centre": (row, col), "n_tumour": voxels of
      the region}, ordered by label id, then by the region's first voxel in raster order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D slice, got shape {labels.shape}.")
    if min_side < 1 or min_side % 2 != 1:
        raise ValueError(f"min_side must be a positive odd integer, got {min_side}.")
    half = min_side // 2
    out = []
    for lid in sorted(int(i) for i in tumour_ids):
        comp, n = connected_components(labels == lid)
        for c in range(1, n + 1):
            region = comp == c
            rows, cols = np.nonzero(region)
            cy, cx = int(math.floor(rows.mean() + 0.5)), int(math.floor(cols.mean() + 0.5))
            roi = region.copy()
            roi[max(cy - half, 0) : cy + half + 1, max(cx - half, 0) : cx + half + 1] = True
            out.append({"label": lid, "roi": roi, "centre": (cy, cx), "n_tumour": int(rows.size)})
    return out


def bland_altman(method, reference) -> dict:
    """Bland–Altman agreement of paired measurements.

    Args:
      method: [N] values of the method (e.g. ROI-mean Ki, mL/min/mL).
      reference: [N] values of the reference, same unit.

    Returns:
      {"n", "bias" = mean(method − reference), "sd" (ddof = 1), "loa_low", "loa_high"
      (= bias ∓ 1.96·sd)}, floats (NaN when n < 2, bias NaN when n = 0).
    """
    a = np.asarray(method, np.float64).ravel()
    b = np.asarray(reference, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"method {a.shape} and reference {b.shape} must have the same length.")
    n = int(a.size)
    diff = a - b
    bias = float(np.mean(diff)) if n else math.nan
    sd = float(np.std(diff, ddof=1)) if n > 1 else math.nan
    return {
        "n": n,
        "bias": bias,
        "sd": sd,
        "loa_low": bias - LOA_Z * sd,
        "loa_high": bias + LOA_Z * sd,
    }


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------
def summarize(values) -> dict:
    """Summary of per-slice values, skipping NaN (degenerate slices).

    Returns:
      {"mean", "std", "median", "min", "max", "n" (non-NaN slices), "n_nan", "n_inf"}. The mean
      is ±inf when any slice is ±inf (e.g. PSNR of identical slices); std is over finite values.
    """
    v = np.asarray(values, np.float64).ravel()
    keep = v[~np.isnan(v)]
    finite = keep[np.isfinite(keep)]
    n_inf = int(keep.size - finite.size)
    out = {"n": int(keep.size), "n_nan": int(v.size - keep.size), "n_inf": n_inf}
    if keep.size == 0:
        return {**dict.fromkeys(("mean", "std", "median", "min", "max"), math.nan), **out}
    if n_inf:
        pos, neg = bool(np.any(keep == np.inf)), bool(np.any(keep == -np.inf))
        mean = math.nan if pos and neg else (math.inf if pos else -math.inf)
    else:
        mean = float(np.mean(finite))
    with np.errstate(invalid="ignore"):
        median = float(np.median(keep))
    return {
        "mean": mean,
        "std": float(np.std(finite)) if finite.size else math.nan,
        "median": median,
        "min": float(np.min(keep)),
        "max": float(np.max(keep)),
        **out,
    }


def _relative(method_mean: float, baseline_mean: float, metric: str) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = km.relative_change(method_mean, baseline_mean, HIGHER_IS_BETTER[metric])
    return float(rc.percent)


def summarize_table(per_slice: dict, baseline: str | None) -> dict:
    """{method: {metric: summary, "relative_change_pct": {metric: %}}} of one comparison.

    Args:
      per_slice: {method: {metric: [N] per-slice values}}.
      baseline: the method the relative changes refer to (None: no relative changes).
    """
    out = {}
    for method, vals in per_slice.items():
        out[method] = {m: summarize(v) for m, v in vals.items()}
    if baseline is not None and baseline in out:
        for method in out:
            out[method]["relative_change_pct"] = {
                m: _relative(out[method][m]["mean"], out[baseline][m]["mean"], m)
                for m in km.METRIC_NAMES
            }
    return out


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
def find_truth_root(cohort, subjects, truth_root=None) -> tuple[pathlib.Path | None, str]:
    """The BIDS root holding `derivatives/truth/<subject>` for every subject, if any.

    Args:
      cohort: the cohort (`root` attribute or the first study's `pet_path` locate the dataset).
      subjects: the evaluated subjects.
      truth_root: an explicit root (then every subject must have a truth directory).

    Returns:
      (root or None, a sentence explaining the outcome).
    """

    def missing(root):
        return [s for s in subjects if not bids.truth_paths(root, s)["dir"].is_dir()]

    if truth_root is not None:
        root = pathlib.Path(truth_root)
        lacking = missing(root)
        if lacking:
            raise ValueError(
                f"truth_root {root} has no derivatives/truth directory for "
                f"{', '.join(lacking[:5])}."
            )
        return root, f"true Ki read from {root}/derivatives/truth"
    candidates = []
    if getattr(cohort, "root", None):
        candidates.append(pathlib.Path(cohort.root))
    pet_path = getattr(cohort.study(subjects[0]), "pet_path", None)
    if pet_path is not None:
        candidates.extend(pathlib.Path(pet_path).resolve().parents)
    for root in candidates:
        if (root / "derivatives" / "truth").is_dir():
            lacking = missing(root)
            if lacking:
                return None, (
                    f"no true Ki: {root}/derivatives/truth lacks {', '.join(lacking[:5])}"
                )
            return root, f"true Ki read from {root}/derivatives/truth"
    return None, "no true Ki: the cohort has no derivatives/truth (not simulated)"


def _load_truth(root, subject, cohort, grid) -> dict:
    t = bids.read_truth(root, subject)
    if t["ki"].shape != tuple(grid):
        raise ValueError(
            f"The true Ki of {subject} has shape {t['ki'].shape} but its PET grid is {tuple(grid)}."
        )
    tumour_ids = [
        i
        for i, name in t["label_names"].items()
        if any(p in name.lower() for p in TUMOUR_NAME_PARTS)
    ]
    return {
        "ki": t["ki"],
        "labels": t["labels"],
        "label_names": t["label_names"],
        "tumour_ids": tumour_ids,
        "last_frame_suv": t["noisefree"][..., -1] * np.float32(cohort.study(subject).suv_factor),
    }


# ----------------------------------------------------------------------------------------------
# Figures: which slices, and what to keep of them
# ----------------------------------------------------------------------------------------------
def _figure_quota(n_subjects: int, max_figures: int) -> list[int]:
    return [max_figures // n_subjects + (i < max_figures % n_subjects) for i in range(n_subjects)]


def _pick_slices(n_slices: int, labels, tumour_ids, count: int) -> list[int]:
    """Slices with the most tumour voxels (ties: nearest the middle), else the middle ones."""
    if count <= 0:
        return []
    mid = (n_slices - 1) / 2
    area = (
        np.zeros(n_slices)
        if labels is None
        else np.isin(labels, tumour_ids).sum(axis=(0, 1)).astype(float)
    )
    order = sorted(range(n_slices), key=lambda z: (-area[z], abs(z - mid), z))
    return sorted(order[:count])


def _organ_roi(labels2d, label_names, mask):
    if labels2d is not None:
        ids = {name: i for i, name in label_names.items()}
        for name in ORGAN_PREFERENCE:
            if name in ids and np.count_nonzero(labels2d == ids[name]) >= 4:
                return name.replace("_", " "), labels2d == ids[name]
    return "body", mask > 0


def _tumour_roi(labels2d, tumour_ids, label_names, ref_ki, mask):
    if labels2d is not None:
        rois = tumour_rois(labels2d, tumour_ids)
        if rois:
            name = lambda r: label_names.get(r["label"], "")  # noqa: E731
            best = max(rois, key=lambda r: (r["n_tumour"], "malignant" in name(r)))
            return label_names.get(best["label"], "tumour").replace("_", " "), best["roi"]
    # No labels: the 3×3 square around the hottest reference Ki voxel in the body.
    masked = np.where(mask > 0, ref_ki, -np.inf)
    cy, cx = np.unravel_index(int(np.argmax(masked)), masked.shape)
    roi = np.zeros(mask.shape, bool)
    roi[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = True
    return "hottest Ki 3x3", roi


def _roi_curves(example, roi, windows: KiWindows) -> dict:
    """ROI-mean TACs, Patlak coordinates and line fits for the TAC / Patlak figure.

    Args:
      example: a kept figure slice (measured / predicted / direct frames [H, W, T], x, cp [T]).
      roi: [H, W] bool.
      windows: the fit windows.

    Returns:
      {"x", "cp", "curves": {name: [T] ROI-mean SUV as measured / predicted}, "fits": {method:
      {"ki", "v0", "idx"}}}; the proposed and direct fits use the spliced curves.
    """
    n = windows.n_early
    x, cp = example["x"], example["cp"]
    curves = {"measured": example["measured"][roi].mean(axis=0)}
    for key in ("proposed", "direct"):
        if example.get(key) is not None:
            curves[key] = example[key][roi].mean(axis=0)
    fits = {}
    for name, (t0, t1) in windows.windows().items():
        if name == "proposed_late":
            continue
        src = "measured" if name in ("reference", "baseline") else "proposed"
        curve = curves[src] if src == "measured" else splice(curves["measured"], curves[src], n)
        idx = windows.schedule.select(t0, t1)
        slope, icpt = kk.fit_line(x[idx], curve[idx] / cp[idx], method=windows.method)
        fits[name] = {"ki": float(slope), "v0": float(icpt), "idx": idx.tolist()}
    if "direct" in curves:
        idx = windows.schedule.select(*windows.windows()["proposed"])
        curve = splice(curves["measured"], curves["direct"], n)
        slope, icpt = kk.fit_line(x[idx], curve[idx] / cp[idx], method=windows.method)
        fits["direct"] = {"ki": float(slope), "v0": float(icpt), "idx": idx.tolist()}
    return {"x": x, "cp": cp, "curves": curves, "fits": fits}


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------
def _check_prediction(out, shape, name) -> np.ndarray:
    if not isinstance(out, dict) or "frames" not in out:
        raise ValueError(f"{name} must return a dict with a 'frames' array.")
    frames = np.asarray(out["frames"], np.float32)
    if frames.shape != shape:
        raise ValueError(
            f"{name} returned frames of shape {frames.shape}; expected {shape} = [B, H, W, T], "
            "all frames of the schedule."
        )
    return frames


def _config_value(config, path, default=None):
    node = config
    for part in path.split("."):
        if part not in node:
            if default is not None:
                return default
            raise ValueError(f"The config lacks the field config.{path}.")
        node = node[part]
    return node


def _as_json(obj):
    """NumPy → Python; non-finite floats → None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _as_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def conventions(windows: KiWindows, mask_threshold: float, roi_note: str) -> dict:
    """The exact evaluation conventions, as sentences (metrics.json and report.md)."""
    f = windows.frame_numbers()

    def span(nums):
        return f"frames {nums[0]}-{nums[-1]}" if nums else "no frames"

    s = windows.schedule
    return {
        "per_slice": "Every metric is computed per 2-D axial slice and averaged over slices "
        "(kinetix.metrics.batch_slice_metrics); slices whose metric is NaN (e.g. an all-zero "
        "reference slice, max <= 0) are skipped and counted as n_nan.",
        "clipping": "Reference and method slices are clipped to [0, max(reference slice)] "
        "and data_range = max(reference slice), as in the authors' code.",
        "ssim": "SSIM with scikit-image defaults: 7x7 uniform window, sample covariance "
        "(N-1), K1 = 0.01, K2 = 0.03, mean over the interior (3-pixel border cropped).",
        "psnr": "PSNR = 10 log10(data_range^2 / MSE) in dB; identical slices give +inf "
        "(counted as n_inf; the mean is then +inf).",
        "nrmse": "NRMSE = ||ref - pred||_2 / ||ref||_2 (scikit-image normalized_root_mse, "
        "'euclidean'); the paper calls it RMSE.",
        "nmi": "NMI = (H(A) + H(B)) / H(A, B) with a 100 x 100-bin joint histogram "
        "(scikit-image normalized_mutual_information, bins=100).",
        "ms_ssim": "MS-SSIM (extra, not in the authors' code): 7x7 uniform window, "
        "Wang et al. 2003 weights renormalised over the scales that fit the slice.",
        "mask": "Ki and SUV maps (every method, the reference and the truth) are multiplied by "
        "the body mask before metrics: Ki outside the body is 0. Body mask = duration-weighted "
        f"mean SUV above {mask_threshold:g} x the subject's 99th percentile "
        "(kinetix.data.pipeline.body_mask).",
        "patlak": "Patlak convention of TPCCLIB: x = integral of Cp from 0 to the frame "
        "mid-time / frame-mean Cp, y = frame value / frame-mean Cp; frames enter a fit when "
        f"their mid-time lies in the window; {windows.method} line fit per voxel; plasma "
        "input = the subject's sampled plasma curve (piecewise linear).",
        "reference": f"Reference = 65-min Patlak on the measured frames with mid-time >= "
        f"{windows.t_star:g} min ({span(f['reference'])}).",
        "baseline": f"Baseline = 30-min Patlak on the measured frames with mid-time in "
        f"[{windows.t_star:g}, {windows.baseline_t_end:g}] min ({span(f['baseline'])}).",
        "proposed": f"Proposed = Patlak ({span(f['proposed'])}) on measured "
        f"{span(f['proposed_measured'])} followed by predicted {span(f['proposed_predicted'])} "
        f"(the prediction replaces every frame >= {windows.n_early + 1}).",
        "proposed_late": "Authors' variant = Patlak on the predicted frames only "
        f"({span(f['proposed_late'])}, t* = {windows.late_t_star:g} min).",
        "direct": "Direct ablation = the no-model network's late frames spliced like the "
        "proposed method, then the same Patlak fit.",
        "truth": "True Ki = the simulator's voxel-level Ki (derivatives/truth), compared "
        "against the reference as an extra row and used as a second reference.",
        "suv": f"SUV metrics on the last frame ({s.n_frames}, {s.start[-1]:g}-{s.end[-1]:g} min):"
        " predicted vs measured (and vs the noise-free truth when simulated), same conventions.",
        "rois": roi_note,
        "bland_altman": "Bland-Altman: difference = method - reference, bias = mean "
        "difference, 95 % limits of agreement = bias +- 1.96 SD (ddof = 1); per ROI mean Ki "
        "(primary) and pooled ROI voxels (paper-style).",
        "json": "Non-finite numbers (e.g. PSNR = +inf) are written as null in metrics.json; "
        "n_inf and n_nan count them.",
    }


def bland_altman_groups(rois: list[dict], roi_voxels: dict, methods) -> dict:
    """Bland–Altman of every method against the reference and against the truth.

    Args:
      rois: ROI records with "ki": {method: ROI-mean Ki}.
      roi_voxels: {method: list of [n_voxels] Ki arrays, one per ROI, same order}.
      methods: the Ki maps available (including "reference" and maybe "truth").

    Returns:
      {"vs_reference": {method: {"roi_mean": stats, "voxel": stats}}, "vs_truth": ...}
      (empty without ROIs); stats as `bland_altman`.
    """
    ba = {}
    if not rois:
        return ba
    for ref_name in ("reference", "truth"):
        if ref_name not in methods:
            continue
        group = {}
        for m in methods:
            if m == ref_name:
                continue
            a = np.array([r["ki"][m] for r in rois])
            b = np.array([r["ki"][ref_name] for r in rois])
            va, vb = np.concatenate(roi_voxels[m]), np.concatenate(roi_voxels[ref_name])
            group[m] = {"roi_mean": bland_altman(a, b), "voxel": bland_altman(va, vb)}
        ba[f"vs_{ref_name}"] = group
    return ba


def _write_figures(fig_dir, examples, rois, ba, boxes, subj, subjects, windows, workdir):
    """Draws every figure of the report; returns [{"path": relative path, "caption"}]."""
    schedule, n_early = windows.schedule, windows.n_early
    fig_dir = pathlib.Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    map_order = ("reference", "baseline", "proposed", "proposed_late", "direct", "truth")
    for ex in examples:
        maps = {METHOD_LABELS[m]: ex["ki"][m] for m in map_order if m in ex["ki"]}
        name = f"ki_maps_{ex['subject']}_z{ex['slice']:02d}.png"
        report.plot_ki_maps(
            fig_dir / name,
            maps,
            reference=METHOD_LABELS["reference"],
            title=f"Ki (mL/min/mL), {ex['subject']} slice {ex['slice']}",
        )
        figures.append(
            {
                "path": f"figures/{name}",
                "caption": f"Ki maps, {ex['subject']} "
                f"slice {ex['slice']}: one colour scale [0, max(reference)]; second row "
                "method - reference on a symmetric scale.",
            }
        )
    if examples:
        ex = next(
            (
                e
                for e in examples
                if e["labels"] is not None
                and e["tumour_ids"]
                and np.isin(e["labels"], e["tumour_ids"]).any()
            ),
            examples[0],
        )
        t_name, t_roi = _tumour_roi(
            ex["labels"], ex["tumour_ids"], ex["label_names"], ex["ki"]["reference"], ex["mask"]
        )
        o_name, o_roi = _organ_roi(ex["labels"], ex["label_names"], ex["mask"])
        roi_data = []
        for label, roi in ((t_name, t_roi), (o_name, o_roi)):
            d = _roi_curves(ex, roi, windows)
            d["name"] = f"{label} ({int(roi.sum())} voxels)"
            roi_data.append(d)
        report.plot_tac_patlak(
            fig_dir / "tac_patlak.png",
            schedule,
            n_early,
            roi_data,
            labels=METHOD_LABELS,
            title=f"{ex['subject']} slice {ex['slice']}",
        )
        figures.append(
            {
                "path": "figures/tac_patlak.png",
                "caption": "ROI-mean TACs (measured "
                "vs predicted frames) and Patlak plots with the fitted lines.",
            }
        )
    if rois:
        for ref_name in ("reference", "truth"):
            key = f"vs_{ref_name}"
            if key not in ba:
                continue
            pairs = {
                METHOD_LABELS[m]: (
                    np.array([r["ki"][m] for r in rois]),
                    np.array([r["ki"][ref_name] for r in rois]),
                    ba[key][m]["roi_mean"],
                )
                for m in ba[key]
            }
            name = f"bland_altman_{key}.png"
            report.plot_bland_altman(
                fig_dir / name,
                pairs,
                reference=METHOD_LABELS[ref_name],
                title=f"Tumour ROI mean Ki vs {METHOD_LABELS[ref_name]} ({len(rois)} ROIs)",
            )
            figures.append(
                {
                    "path": f"figures/{name}",
                    "caption": f"Bland-Altman of ROI-mean "
                    f"Ki against the {METHOD_LABELS[ref_name]}.",
                }
            )
    report.plot_per_subject(
        fig_dir / "per_subject_ki.png",
        boxes,
        subj,
        subjects,
        title="Ki vs 65-min reference, per slice",
    )
    figures.append(
        {
            "path": "figures/per_subject_ki.png",
            "caption": "Per-slice Ki metrics by subject and method (boxes: quartiles).",
        }
    )
    if report.plot_loss_curve(fig_dir / "loss.png", workdir / "metrics.jsonl"):
        figures.append({"path": "figures/loss.png", "caption": "Training loss (log scale)."})
    return figures


ROI_NOTE = (
    "Tumour ROIs (2-D adaptation of the paper's 10x10x10-voxel ROI): every 8-connected region "
    "of a tumour label of the truth label map in a slice, united with the 3x3 square centred "
    "on its centroid (so a one-voxel nodule gives a 3x3 ROI); ROI value = mean Ki over the ROI "
    "voxels of the masked Ki map. All ROIs of all evaluated slices are pooled."
)


def evaluate_run(
    config,
    workdir,
    cohort,
    subjects,
    predict_fn,
    *,
    ablation_fn=None,
    out_dir=None,
    truth_root=None,
) -> dict:
    """Evaluates a trained model on held-out subjects and writes metrics, figures and a report.

    Args:
      config: the run's ConfigDict; uses model.n_early, kinetics.t_star, eval.method,
        eval.baseline_t_end, eval.max_figures, train.eval_batch_size, data.input_points,
        data.mask_threshold, name.
      workdir: the run directory (its metrics.jsonl gives the loss curve).
      cohort: a `kinetix.data.pipeline.Cohort` (`subjects`, `schedule`, `study`, `n_slices`).
      subjects: names of the subjects to evaluate.
      predict_fn: numpy batch (pipeline.eval_batches) -> {"frames": [B, H, W, T] predicted
        frames (SUV), "params": [B, H, W, 5] or None}. Frames ≥ n_early are used.
      ablation_fn: same for the direct "without model" network, or None.
      out_dir: output directory (default workdir/eval); existing files are replaced.
      truth_root: BIDS root with derivatives/truth (default: found from the cohort).

    Returns:
      {"metrics": everything written to metrics.json (NumPy-free), "table": fixed-width text
      table of the Ki comparison (and vs truth when available), "per_subject": {table: {subject:
      {method: {metric: mean}}}}, "out_dir": path}.
    """
    t_start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / "eval"
    subjects = list(subjects)
    if not subjects:
        raise ValueError("subjects is empty: there are no held-out subjects to evaluate.")
    schedule = cohort.schedule
    windows = KiWindows(
        schedule=schedule,
        n_early=int(_config_value(config, "model.n_early")),
        t_star=float(_config_value(config, "kinetics.t_star")),
        baseline_t_end=float(_config_value(config, "eval.baseline_t_end")),
        method=str(_config_value(config, "eval.method")),
    )
    batch_size = int(_config_value(config, "train.eval_batch_size"))
    input_points = int(_config_value(config, "data.input_points"))
    mask_threshold = float(_config_value(config, "data.mask_threshold"))
    max_figures = int(_config_value(config, "eval.max_figures"))
    n_early = windows.n_early

    root, truth_note = find_truth_root(cohort, subjects, truth_root)
    has_truth = root is not None
    has_direct = ablation_fn is not None
    logging.info("Evaluating %d subjects (%s).", len(subjects), truth_note)

    ki_methods = ["baseline", "proposed", "proposed_late"] + ["direct"] * has_direct
    tables = {"ki_vs_reference": ki_methods + ["truth"] * has_truth}
    if has_truth:
        tables["ki_vs_truth"] = ["reference", *ki_methods]
    tables["suv_last_frame"] = ["proposed"] + ["direct"] * has_direct
    if has_truth:
        tables["suv_last_frame_vs_truth"] = ["measured", "proposed"] + ["direct"] * has_direct
    acc = {t: {m: {k: [] for k in km.METRIC_NAMES} for m in ms} for t, ms in tables.items()}
    ids = {"subject": [], "slice": []}
    rois: list[dict] = []
    roi_voxels: dict[str, list[np.ndarray]] = {}
    quota = dict(zip(subjects, _figure_quota(len(subjects), max(max_figures, 0)), strict=True))
    wanted: dict[str, list[int]] = {}
    examples: list[dict] = []
    truth_cache: dict[str, dict] = {}
    fit = {
        name: functools.partial(
            batch_ki, idx=tuple(int(i) for i in schedule.select(*w)), method=windows.method
        )
        for name, w in windows.windows().items()
    }
    batches = pipeline.eval_batches(
        cohort, subjects, batch_size, input_points=input_points, mask_threshold=mask_threshold
    )
    for batch in batches:
        valid = np.asarray(batch["valid"]) > 0
        if not valid.any():
            continue
        measured = np.asarray(batch["frames"], np.float32)
        mask = np.asarray(batch["mask"], np.float32)
        times, plasma = batch["plasma_times"], batch["plasma"]
        pred = _check_prediction(predict_fn(batch), measured.shape, "predict_fn")
        proposed = splice(measured, pred, n_early)
        frames = {"reference": measured, "baseline": measured, "proposed": proposed}
        frames["proposed_late"] = pred
        direct = direct_raw = None
        if has_direct:
            direct_raw = _check_prediction(ablation_fn(batch), measured.shape, "ablation_fn")
            direct = splice(measured, direct_raw, n_early)
        x, cp = patlak_coordinates(times, plasma, schedule=schedule)
        ki = {
            name: np.asarray(fit[name](frames[name], x, cp)) * mask
            for name in ("reference", "baseline", "proposed", "proposed_late")
        }
        if has_direct:
            ki["direct"] = np.asarray(fit["proposed"](direct, x, cp)) * mask
        x, cp = np.asarray(x, np.float64), np.asarray(cp, np.float64)
        names = [cohort.subjects[int(i)] for i in batch["subject"]]
        zs = [int(z) for z in batch["slice"]]
        suv = {"measured": measured[..., -1] * mask, "proposed": pred[..., -1] * mask}
        if has_direct:
            suv["direct"] = direct[..., -1] * mask
        truth_slices = None
        if has_truth:
            for s in set(names) - set(truth_cache):
                truth_cache[s] = _load_truth(root, s, cohort, cohort.study(s).frames.shape[:3])
            for s in set(truth_cache) - set(names):
                del truth_cache[s]
            truth_slices = [truth_cache[s] for s in names]
            ki["truth"] = (
                np.stack([t["ki"][:, :, z] for t, z in zip(truth_slices, zs, strict=True)]) * mask
            )
            suv["truth"] = (
                np.stack(
                    [t["last_frame_suv"][:, :, z] for t, z in zip(truth_slices, zs, strict=True)]
                )
                * mask
            )

        def score(ref, pred_maps, _valid=valid):
            return {
                k: np.asarray(v)
                for k, v in _batch_metrics(ref, pred_maps, jax.numpy.asarray(_valid)).items()
            }

        for table, methods in tables.items():
            for method in methods:
                if table.startswith("ki_vs_"):
                    ref = ki[table[len("ki_vs_") :]]
                    vals = score(ref, ki[method])
                else:
                    ref = suv["truth"] if table.endswith("vs_truth") else suv["measured"]
                    vals = score(ref, suv[method])
                for k in km.METRIC_NAMES:
                    acc[table][method][k].append(vals[k][valid])
        ids["subject"].extend(s for s, v in zip(names, valid, strict=True) if v)
        ids["slice"].extend(z for z, v in zip(zs, valid, strict=True) if v)

        for b in np.nonzero(valid)[0]:
            s, z = names[b], zs[b]
            tr = truth_slices[b] if truth_slices is not None else None
            labels2d = tr["labels"][:, :, z] if tr is not None else None
            if tr is not None:
                for r in tumour_rois(labels2d, tr["tumour_ids"]):
                    roi = r["roi"]
                    rois.append(
                        {
                            "subject": s,
                            "slice": z,
                            "label": r["label"],
                            "label_name": tr["label_names"].get(r["label"], str(r["label"])),
                            "centre": list(r["centre"]),
                            "n_voxels": int(roi.sum()),
                            "n_tumour_voxels": r["n_tumour"],
                            "ki": {m: float(ki[m][b][roi].mean()) for m in ki},
                        }
                    )
                    for m in ki:
                        roi_voxels.setdefault(m, []).append(ki[m][b][roi].astype(np.float64))
            if s not in wanted:
                n_z = cohort.n_slices(s)
                wanted[s] = _pick_slices(
                    n_z,
                    tr["labels"] if tr is not None else None,
                    tr["tumour_ids"] if tr is not None else [],
                    min(quota[s], n_z),
                )
            if z in wanted[s]:
                examples.append(
                    {
                        "subject": s,
                        "slice": z,
                        "ki": {m: ki[m][b].copy() for m in ki},
                        "mask": mask[b].copy(),
                        "labels": None if labels2d is None else labels2d.copy(),
                        "label_names": {} if tr is None else tr["label_names"],
                        "tumour_ids": [] if tr is None else tr["tumour_ids"],
                        "measured": measured[b].copy(),
                        "proposed": pred[b].copy(),
                        "direct": None if direct_raw is None else direct_raw[b].copy(),
                        "x": x[b],
                        "cp": cp[b],
                    }
                )

    per_slice = {
        t: {m: {k: np.concatenate(v) for k, v in ms.items()} for m, ms in tab.items()}
        for t, tab in acc.items()
    }
    subj = np.asarray(ids["subject"])
    slc = np.asarray(ids["slice"], np.int64)
    baselines = {
        "ki_vs_reference": "baseline",
        "ki_vs_truth": "baseline",
        "suv_last_frame": None,
        "suv_last_frame_vs_truth": "measured",
    }
    summary = {t: summarize_table(per_slice[t], baselines[t]) for t in per_slice}
    per_subject = {
        t: {
            s: {
                m: {k: summarize(v[subj == s])["mean"] for k, v in vals.items()}
                for m, vals in per_slice[t].items()
            }
            for s in subjects
        }
        for t in per_slice
    }

    ba = bland_altman_groups(rois, roi_voxels, list(ki))
    ba_note = ROI_NOTE if has_truth else "No tumour ROIs: the cohort has no truth label map."
    boxes = {
        METHOD_LABELS[m]: per_slice["ki_vs_reference"][m]
        for m in tables["ki_vs_reference"]
        if m != "truth"
    }
    figures = _write_figures(
        out_dir / "figures", examples, rois, ba, boxes, subj, subjects, windows, workdir
    )

    frames_used = windows.frame_numbers()
    result_metrics = {
        "run": {
            "config": str(_config_value(config, "name", "unnamed")),
            "workdir": str(workdir),
            "subjects": subjects,
            "n_slices": int(slc.size),
            "n_early": n_early,
            "t_star_min": windows.t_star,
            "baseline_t_end_min": windows.baseline_t_end,
            "late_t_star_min": windows.late_t_star,
            "patlak_method": windows.method,
            "frames": frames_used,
            "truth": truth_note,
            "direct_ablation": has_direct,
            "seconds": None,
        },
        "conventions": conventions(windows, mask_threshold, ba_note),
        "labels": {m: METHOD_LABELS[m] for m in METHOD_LABELS},
        "tables": {
            t: {
                "reference": {
                    "ki_vs_reference": "reference",
                    "ki_vs_truth": "truth",
                    "suv_last_frame": "measured",
                    "suv_last_frame_vs_truth": "noisefree",
                }[t],
                "baseline": baselines[t],
                "methods": summary[t],
            }
            for t in summary
        },
        "per_subject": {
            t: {s: {"n_slices": int(np.sum(subj == s)), **per_subject[t][s]} for s in subjects}
            for t in per_subject
        },
        "bland_altman": {"note": ba_note, "n_rois": len(rois), **ba, "rois": rois},
        "figures": figures,
    }
    result_metrics["run"]["seconds"] = round(time.perf_counter() - t_start, 2)
    result_metrics = _as_json(result_metrics)
    table = report.format_text_tables(result_metrics)
    (out_dir / "metrics.json").write_text(json.dumps(result_metrics, indent=1, allow_nan=False))
    (out_dir / "report.md").write_text(report.markdown_report(result_metrics))
    _write_per_slice_csv(out_dir / "per_slice.csv", per_slice, subj, slc)
    logging.info("Evaluation written to %s (%.1f s).", out_dir, time.perf_counter() - t_start)
    return {
        "metrics": result_metrics,
        "table": table,
        "per_subject": result_metrics["per_subject"],
        "out_dir": str(out_dir),
    }


def _write_per_slice_csv(path, per_slice, subj, slc) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "method", "subject", "slice", *km.METRIC_NAMES])
        for table, methods in per_slice.items():
            for method, vals in methods.items():
                for i in range(subj.size):
                    w.writerow(
                        [table, method, subj[i], int(slc[i])]
                        + [repr(float(vals[k][i])) for k in km.METRIC_NAMES]
                    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def run_cli(workdir, data=None, ablation_workdir=None, out=None, overwrite=False) -> dict:
    """What `python -m kinetix.evaluate` does, callable (raises ValueError / OSError).

    Args:
      workdir: a trained run directory (config.json + checkpoints).
      data: a BIDS root to evaluate on (all its subjects); default: the run's test split.
      ablation_workdir: a trained direct ("without model") run evaluated beside it.
      out: output directory (default workdir/eval).
      overwrite: replace an existing metrics.json in `out`.

    Returns:
      `evaluate_run`'s result.
    """
    from kinetix import training

    workdir = pathlib.Path(workdir)
    for name, path in (("workdir", workdir), ("ablation_workdir", ablation_workdir)):
        if path is None:
            continue
        path = pathlib.Path(path)
        if not path.is_dir():
            raise ValueError(f"--{name} {path} does not exist.")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--{name} {path} has no config.json: it is not a kinetix training workdir."
            )
        if not (path / "checkpoints").is_dir():
            raise ValueError(
                f"--{name} {path} has no checkpoints: training has not saved a step yet."
            )
    if data is not None and not pathlib.Path(data).is_dir():
        raise ValueError(f"--data {data} does not exist.")
    out_dir = pathlib.Path(out) if out else workdir / "eval"
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ValueError(
            f"{out_dir / 'metrics.json'} exists; pass --overwrite or choose another --out."
        )
    config, predict_fn, cohort, splits = training.load_for_inference(workdir, data)
    subjects = list(cohort.subjects) if data else list(splits.get("test", []))
    if not subjects:
        raise ValueError(f"{workdir} has no test subjects (splits.json); pass --data BIDS.")
    ablation_fn = None
    if ablation_workdir is not None:
        abl_data = data or config.data.root or str(workdir / "data")
        abl_config, ablation_fn, _, _ = training.load_for_inference(ablation_workdir, abl_data)
        if abl_config.model.kind != "direct":
            logging.warning(
                "--ablation_workdir %s holds a %r model, not 'direct'.",
                ablation_workdir,
                abl_config.model.kind,
            )
    return evaluate_run(
        config, workdir, cohort, subjects, predict_fn, ablation_fn=ablation_fn, out_dir=out_dir
    )


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "Trained run directory (config.json + checkpoints).")
    flags.DEFINE_string("data", None, "BIDS-PET root to evaluate (default: the run's test split).")
    flags.DEFINE_string("ablation_workdir", None, "Trained direct (no-model) run to compare.")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing evaluation in the output directory.")
    return flags.FLAGS


def main(argv):
    """absl entry point: prints the comparison table, or one error sentence and exits 2."""
    flags_ = _FLAGS
    if len(argv) > 1:
        print(f"kinetix.evaluate: error: unexpected arguments {argv[1:]}.", file=sys.stderr)
        sys.exit(2)
    if not flags_.workdir:
        print("kinetix.evaluate: error: --workdir is required.", file=sys.stderr)
        sys.exit(2)
    try:
        result = run_cli(
            flags_.workdir, flags_.data, flags_.ablation_workdir, flags_.out, flags_.overwrite
        )
    except (ValueError, OSError) as err:
        print(f"kinetix.evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["table"])
    print(f"\nReport: {pathlib.Path(result['out_dir']) / 'report.md'}")


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()
    jax.config.parse_flags_with_absl()
    app.run(main)
