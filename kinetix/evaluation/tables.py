"""Tables and statistics of the evaluation: which methods each table compares, summaries.

`TABLES` and `table_methods` (the comparisons of metrics.json, their rows derived from the
available Ki routes and predictions), tumour ROIs (`tumour_rois`) and Bland–Altman agreement
(`bland_altman`, `bland_altman_groups`), per-slice metric summaries (`summarize`,
`summarize_table`), per-tissue means and biases against the simulation's truth
(`add_label_sums`, `tissue_bias`), strict-JSON conversion (`as_json`) and the per-slice CSV.
"""

import csv
import dataclasses
import math
import pathlib

import numpy as np

from kinetix.evaluation import metrics as km

HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "nrmse": False, "nmi": True, "ms_ssim": True}
"""Direction of improvement of each metric in `metrics.METRIC_NAMES`."""

ROI_MIN_SIDE = 3
"""Tumour ROIs cover at least this square (voxels) around the tumour centroid."""

LOA_Z = 1.96
"""Bland–Altman limits of agreement: bias ± LOA_Z · SD."""


# ----------------------------------------------------------------------------------------------
# The comparisons
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One comparison of metrics.json.

    Attributes:
      kind: "ki" (rows are Ki routes) or "suv" (rows are predictions' last frames).
      reference: the name metrics.json gives the reference.
      ref_map: the key of the reference map among the batch's Ki (or SUV) maps.
      baseline: the row the relative changes refer to (None: none).
      needs_truth: the table exists only when the cohort has a ground truth.
      rows: extra rows before the predictions (SUV tables).
      needs_route: the table exists only when this Ki route is evaluated (its reference).
    """

    kind: str
    reference: str
    ref_map: str
    baseline: str | None
    needs_truth: bool = False
    rows: tuple[str, ...] = ()
    needs_route: str | None = None


TABLES = {
    "ki_vs_reference": TableSpec("ki", "reference", "reference", "baseline"),
    "ki_vs_truth": TableSpec("ki", "truth", "truth", "baseline", needs_truth=True),
    "ki_vs_fit65": TableSpec(
        "ki", "fit65_rates", "fit65_rates", "baseline", needs_route="fit65_rates"
    ),
    "suv_last_frame": TableSpec("suv", "measured", "measured", None),
    "suv_last_frame_vs_truth": TableSpec(
        "suv", "noisefree", "truth", "measured", needs_truth=True, rows=("measured",)
    ),
}
"""The comparisons, in report order."""


def table_methods(routes, predictions, has_truth: bool) -> dict[str, list[str]]:
    """{table: rows} of the comparisons that can be made.

    Args:
      routes: the available Ki routes (`routes.available_routes`), in order.
      predictions: names of the available predictions ("proposed", maybe "direct").
      has_truth: whether the cohort has a ground truth.

    Returns:
      Ki tables: every available route but the table's reference; SUV tables: `rows`, then
      every prediction's last frame.
    """
    out = {}
    for name, spec in TABLES.items():
        if spec.needs_truth and not has_truth:
            continue
        if spec.needs_route and all(r.name != spec.needs_route for r in routes):
            continue
        if spec.kind == "ki":
            out[name] = [r.name for r in routes if r.name != spec.ref_map]
        else:
            out[name] = [*spec.rows, *predictions]
    return out


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


ROI_NOTE = (
    "Tumour ROIs (2-D adaptation of the paper's 10x10x10-voxel ROI): every 8-connected region "
    "of a tumour label of the truth label map in a slice, united with the 3x3 square centred "
    "on its centroid (so a one-voxel nodule gives a 3x3 ROI); ROI value = mean Ki over the ROI "
    "voxels of the masked Ki map. All ROIs of all evaluated slices are pooled."
)


# ----------------------------------------------------------------------------------------------
# Per tissue
# ----------------------------------------------------------------------------------------------
TISSUE_NOTE = (
    "Per tissue label of the simulation, over the evaluation mask of the held-out slices: the "
    "mean of the late frames (those after the network's input frames, 35-65 min in the "
    "paper's schedule; SUV: measured, predicted by each network, and the noise-free truth) "
    "and of each Ki map (mL/min/mL), with the bias of the mean against the truth in %. "
    "Partial volume (PSF) mixes neighbouring tissues into each label's voxels."
)


def add_label_sums(sums: dict, labels: np.ndarray, mask: np.ndarray, maps: dict) -> None:
    """Add one slice's per-label voxel counts and sums of each map to ``sums``, in place.

    Args:
      sums: {label: {"n": voxels, name: sum}}, accumulated over slices (start with {}).
      labels: [H, W] non-negative integer tissue labels.
      mask: [H, W] evaluation mask; voxels with mask > 0 count.
      maps: {name: [H, W] values} (e.g. mean late-frame SUV per method, or Ki in mL/min/mL).
    """
    inside = np.asarray(mask) > 0
    lab = np.asarray(labels)[inside].astype(np.int64)
    if lab.size == 0:
        return
    if lab.min() < 0:
        raise ValueError("Tissue labels must be non-negative integers.")
    counts = np.bincount(lab)
    totals = {
        name: np.bincount(lab, weights=np.asarray(m, np.float64)[inside], minlength=counts.size)
        for name, m in maps.items()
    }
    for i in np.nonzero(counts)[0]:
        entry = sums.setdefault(int(i), {"n": 0})
        entry["n"] += int(counts[i])
        for name, t in totals.items():
            entry[name] = entry.get(name, 0.0) + float(t[i])


def tissue_bias(sums: dict, label_names: dict, reference: str = "truth") -> dict:
    """Per tissue: the mean of every map over its voxels, and each method's bias in %.

    Args:
      sums: `add_label_sums`'s accumulator.
      label_names: {label: name}; labels without a name are called by their number.
      reference: the map the biases refer to.

    Returns:
      {tissue name: {"n_voxels", "mean": {name: mean}, "bias_pct": {method: 100 · (mean /
      reference mean − 1)}}} in label order; a bias is NaN where the reference mean is 0.
    """
    out = {}
    for i in sorted(sums):
        entry = sums[i]
        n = entry["n"]
        means = {k: v / n for k, v in entry.items() if k != "n"}
        ref = means[reference]
        bias = {
            k: 100.0 * (v / ref - 1.0) if ref != 0 else math.nan
            for k, v in means.items()
            if k != reference
        }
        out[str(label_names.get(i, i))] = {"n_voxels": n, "mean": means, "bias_pct": bias}
    return out


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
# Metrics files
# ----------------------------------------------------------------------------------------------
def as_json(obj):
    """NumPy → Python; non-finite floats → None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return as_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def write_per_slice_csv(path, per_slice: dict, subj, slc) -> None:
    """per_slice.csv: one row per table, method and slice (subject [N], slice [N] ids)."""
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
