"""Figures of the held-out evaluation (`kinetix.evaluate`): slice choice, ROIs, plots.

Which slices get a figure (`_pick_slices`), the organ and tumour ROIs of the TAC / Patlak
figure and their curves and line fits (`_roi_curves`), and `_write_figures`, which draws every
figure of the report with `kinetix.report`.
"""

import pathlib

import numpy as np

import kinetix.kinetics as kk
from kinetix import report
from kinetix.evaluate_ki import METHOD_LABELS, KiWindows, splice
from kinetix.evaluate_tables import tumour_rois

ORGAN_PREFERENCE = ("liver", "myocardium", "muscle", "soft_tissue")
"""Organ ROI of the TAC / Patlak figure: the first of these labels present in the slice."""


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


def _write_figures(
    fig_dir, examples, rois, ba, boxes, subj, subjects, windows, workdir, tissue_params=None
):
    """Draws every figure of the report; returns [{"path": relative path, "caption"}].

    ``tissue_params``: the per-tissue 2TCM parameter table (metrics.json "tissues" → "params"),
    drawn as true against predicted means when given."""
    schedule, n_early = windows.schedule, windows.n_early
    fig_dir = pathlib.Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for ex in examples:
        # Every Ki method of the example, in METHOD_LABELS' order.
        maps = {label: ex["ki"][m] for m, label in METHOD_LABELS.items() if m in ex["ki"]}
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
    if tissue_params and report.plot_tissue_params(
        fig_dir / "tissue_params.png",
        tissue_params,
        title="2TCM parameters per tissue: the kinetic network against the truth",
    ):
        figures.append(
            {
                "path": "figures/tissue_params.png",
                "caption": "Mean 2TCM parameter per tissue, the kinetic network against the "
                "simulation's truth (log axes; the grey line is identity).",
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
