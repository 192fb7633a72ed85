"""The figures of an evaluation report: which slices and ROIs get a figure, and writing them all.

`figure_quota` and `pick_slices` choose the slices whose Ki maps are drawn; `tumour_roi` and
`organ_roi` the two ROIs of the TAC / Patlak figure; `write_figures` draws every figure of the
report (`kinetix.figures.ki`, `kinetix.figures.training`) and returns their paths and captions.
The numbers drawn are computed by the caller (`kinetix.evaluation`): this module only chooses
and draws.
"""

import pathlib

import numpy as np

from kinetix.figures import ki as ki_figures
from kinetix.figures.training import plot_loss_curve

ORGAN_PREFERENCE = ("liver", "myocardium", "muscle", "soft_tissue")
"""Organ ROI of the TAC / Patlak figure: the first of these labels present in the slice."""


# ----------------------------------------------------------------------------------------------
# Which slices, which ROIs
# ----------------------------------------------------------------------------------------------
def figure_quota(n_subjects: int, max_figures: int) -> list[int]:
    """Ki-map figures per subject: `max_figures` shared out, the first subjects get the rest."""
    return [max_figures // n_subjects + (i < max_figures % n_subjects) for i in range(n_subjects)]


def pick_slices(n_slices: int, labels, tumour_ids, count: int) -> list[int]:
    """Slices with the most tumour voxels (ties: nearest the middle), else the middle ones.

    Args:
      n_slices: Z of the subject.
      labels: [X, Y, Z] truth labels, or None.
      tumour_ids: tumour label ids.
      count: slices wanted.

    Returns:
      Up to `count` slice indices, ascending.
    """
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


def organ_roi(labels2d, label_names: dict, mask) -> tuple[str, np.ndarray]:
    """(name, [H, W] bool) of the first `ORGAN_PREFERENCE` organ with ≥ 4 voxels, else the body."""
    if labels2d is not None:
        ids = {name: i for i, name in label_names.items()}
        for name in ORGAN_PREFERENCE:
            if name in ids and np.count_nonzero(labels2d == ids[name]) >= 4:
                return name.replace("_", " "), labels2d == ids[name]
    return "body", mask > 0


def tumour_roi(candidates: list[dict], label_names: dict, ref_ki, mask) -> tuple[str, np.ndarray]:
    """(name, [H, W] bool) of the TAC figure's tumour ROI.

    Args:
      candidates: the slice's tumour ROIs ({"label", "roi", "n_tumour"}, as
        `kinetix.evaluation.tables.tumour_rois` gives them); the largest is taken (ties: a
        malignant one).
      label_names: {label id: name}.
      ref_ki: [H, W] reference Ki, for the fallback.
      mask: [H, W] body mask.

    Returns:
      The chosen tumour ROI, or without candidates the 3×3 square around the hottest reference
      Ki voxel in the body.
    """
    if candidates:
        name = lambda r: label_names.get(r["label"], "")  # noqa: E731
        best = max(candidates, key=lambda r: (r["n_tumour"], "malignant" in name(r)))
        return label_names.get(best["label"], "tumour").replace("_", " "), best["roi"]
    masked = np.where(mask > 0, ref_ki, -np.inf)
    cy, cx = np.unravel_index(int(np.argmax(masked)), masked.shape)
    roi = np.zeros(mask.shape, bool)
    roi[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = True
    return "hottest Ki 3x3", roi


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _figure(path: str, caption: str) -> dict:
    return {"path": f"figures/{path}", "caption": caption}


def _ki_map_figures(fig_dir, examples, labels: dict) -> list[dict]:
    out = []
    for ex in examples:
        # Every Ki route of the example, in the order of `labels`.
        maps = {label: ex["ki"][m] for m, label in labels.items() if m in ex["ki"]}
        name = f"ki_maps_{ex['subject']}_z{ex['slice']:02d}.png"
        ki_figures.plot_ki_maps(
            fig_dir / name,
            maps,
            reference=labels["reference"],
            title=f"Ki (mL/min/mL), {ex['subject']} slice {ex['slice']}",
        )
        caption = (
            f"Ki maps, {ex['subject']} slice {ex['slice']}: one colour scale [0, max(reference)]; "
            "second row method - reference on a symmetric scale."
        )
        out.append(_figure(name, caption))
    return out


def _tac_figure(fig_dir, examples, labels: dict, schedule, n_early: int, roi_curves) -> list:
    if not examples:
        return []
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
    t_name, t_roi = tumour_roi(
        ex["tumour_rois"], ex["label_names"], ex["ki"]["reference"], ex["mask"]
    )
    o_name, o_roi = organ_roi(ex["labels"], ex["label_names"], ex["mask"])
    roi_data = []
    for label, roi in ((t_name, t_roi), (o_name, o_roi)):
        d = roi_curves(ex, roi)
        d["name"] = f"{label} ({int(roi.sum())} voxels)"
        roi_data.append(d)
    ki_figures.plot_tac_patlak(
        fig_dir / "tac_patlak.png",
        schedule,
        n_early,
        roi_data,
        labels=labels,
        title=f"{ex['subject']} slice {ex['slice']}",
    )
    caption = "ROI-mean TACs (measured vs predicted frames) and Patlak plots with the fitted lines."
    return [_figure("tac_patlak.png", caption)]


def _bland_altman_figures(fig_dir, rois: list[dict], ba: dict, labels: dict) -> list[dict]:
    out = []
    for ref_name in ("reference", "truth"):
        key = f"vs_{ref_name}"
        if not rois or key not in ba:
            continue
        pairs = {
            labels[m]: (
                np.array([r["ki"][m] for r in rois]),
                np.array([r["ki"][ref_name] for r in rois]),
                ba[key][m]["roi_mean"],
            )
            for m in ba[key]
        }
        name = f"bland_altman_{key}.png"
        ki_figures.plot_bland_altman(
            fig_dir / name,
            pairs,
            reference=labels[ref_name],
            title=f"Tumour ROI mean Ki vs {labels[ref_name]} ({len(rois)} ROIs)",
        )
        out.append(_figure(name, f"Bland-Altman of ROI-mean Ki against the {labels[ref_name]}."))
    return out


def _tissue_figure(fig_dir, tissue_params) -> list[dict]:
    if not tissue_params or not ki_figures.plot_tissue_params(
        fig_dir / "tissue_params.png",
        tissue_params,
        title="2TCM parameters per tissue: the kinetic network against the truth",
    ):
        return []
    caption = (
        "Mean 2TCM parameter per tissue, the kinetic network against the simulation's truth "
        "(log axes; the grey line is identity)."
    )
    return [_figure("tissue_params.png", caption)]


def write_figures(
    fig_dir,
    *,
    examples: list[dict],
    rois: list[dict],
    bland_altman: dict,
    boxes: dict,
    slice_subjects,
    subjects,
    labels: dict,
    schedule,
    n_early: int,
    roi_curves,
    metrics_jsonl,
    tissue_params=None,
) -> list[dict]:
    """Draws every figure of the report into `fig_dir`.

    Args:
      fig_dir: output directory (created).
      examples: the kept slices: {"subject", "slice", "ki": {route: [H, W]}, "mask",
        "labels" ([H, W] or None), "label_names", "tumour_ids", "tumour_rois", ...}.
      rois: tumour ROI records with "ki": {route: ROI-mean Ki}.
      bland_altman: {"vs_reference" / "vs_truth": {route: {"roi_mean": stats}}}.
      boxes: {method label: {metric: [N] per-slice values}} of the per-subject box plot.
      slice_subjects: [N] subject of each slice; subjects: their order on the axis.
      labels: {route: display name}, in drawing order ("reference" among them).
      schedule, n_early: the frame schedule (min) and the number of measured frames.
      roi_curves: (example, roi [H, W] bool) -> `plot_tac_patlak`'s ROI dict (without "name").
      metrics_jsonl: the run's metrics.jsonl (the loss curve; skipped when absent).
      tissue_params: the per-tissue 2TCM parameter table (metrics.json "tissues" → "params").

    Returns:
      [{"path": "figures/<name>.png", "caption"}] in report order.
    """
    fig_dir = pathlib.Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = _ki_map_figures(fig_dir, examples, labels)
    figures += _tac_figure(fig_dir, examples, labels, schedule, n_early, roi_curves)
    figures += _bland_altman_figures(fig_dir, rois, bland_altman, labels)
    figures += _tissue_figure(fig_dir, tissue_params)
    ki_figures.plot_per_subject(
        fig_dir / "per_subject_ki.png",
        boxes,
        slice_subjects,
        subjects,
        title="Ki vs 65-min reference, per slice",
    )
    caption = "Per-slice Ki metrics by subject and method (boxes: quartiles)."
    figures.append(_figure("per_subject_ki.png", caption))
    if plot_loss_curve(fig_dir / "loss.png", metrics_jsonl):
        figures.append(_figure("loss.png", "Training loss (log scale)."))
    return figures
