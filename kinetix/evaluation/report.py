"""The evaluation's text: the printed comparison table, `report.md` and the conventions.

`format_text_tables` and `markdown_report` turn the `metrics.json` dict of
`kinetix.evaluation.evaluate_run` into a fixed-width text table and `report.md`;
`conventions` states every convention of the evaluation in sentences (metrics.json and the
report), one per registered Ki route among them.
"""

import math

from kinetix.evaluation.routes import PREDICTION_LABELS, KiWindows
from kinetix.figures.common import METRIC_TITLES

TABLE_METRICS = ("ssim", "psnr", "nrmse", "nmi")
"""Metrics of the printed comparison table (the authors' four)."""

_DIGITS = {"ssim": 4, "psnr": 2, "nrmse": 4, "nmi": 4, "ms_ssim": 4}

TABLE_TITLES = {
    "ki_vs_reference": "Ki against the 65-min Patlak reference",
    "ki_vs_truth": "Ki against the true Ki (simulation)",
    "ki_vs_fit65": "Ki against the 2TCM fit of the whole scan (a second reference)",
    "suv_last_frame": "SUV of the last frame against the measured last frame",
    "suv_last_frame_vs_truth": "SUV of the last frame against the noise-free truth (simulation)",
}

LATE_FRAME_LABELS = {"measured": "measured", **PREDICTION_LABELS}
"""Display names of the late-frame columns of the per-tissue table."""


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _num(value, metric: str) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{_DIGITS.get(metric, 4)}f}"


def _sig(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _pct(value) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "+inf%" if value > 0 else "-inf%"
    return f"{value:+.2f}%"


def _cell(entry: dict, metric: str, with_change: bool) -> str:
    text = _num(entry[metric]["mean"], metric)
    if with_change:
        change = entry.get("relative_change_pct", {}).get(metric)
        text += f" ({_pct(change)})"
    return text


def _table_rows(metrics: dict, table: str, metric_names, markdown: bool):
    tab = metrics["tables"][table]
    labels = metrics["labels"]
    baseline = tab.get("baseline")
    rows = []
    for method, entry in tab["methods"].items():
        change = baseline is not None and method != baseline and "relative_change_pct" in entry
        name = labels.get(method, method)
        if method == baseline:
            name += " *"
        rows.append([name] + [_cell(entry, m, change) for m in metric_names])
    return rows


def format_text_table(metrics: dict, table: str, metric_names=TABLE_METRICS) -> str:
    """A fixed-width text table of one comparison: methods × metrics, mean over slices.

    Cells read "mean (±x.xx% vs baseline)"; the baseline row is marked with *.
    """
    tab = metrics["tables"][table]
    ref = metrics["labels"].get(tab["reference"], tab["reference"])
    n = max((e[metric_names[0]]["n"] for e in tab["methods"].values()), default=0)
    head = ["method"] + [METRIC_TITLES[m] for m in metric_names]
    rows = _table_rows(metrics, table, metric_names, markdown=False)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    base = tab.get("baseline")
    note = (
        f"mean over {n} slices; (% change vs {metrics['labels'].get(base, base)}, marked *)"
        if base
        else f"mean over {n} slices"
    )
    body = [line(r) for r in rows]
    out = [f"{TABLE_TITLES.get(table, table)} [reference: {ref}]", note, line(head)]
    out.append("-" * max(len(x) for x in [out[-1], *body]))
    out.extend(body)
    return "\n".join(out)


def format_text_tables(metrics: dict) -> str:
    """The Ki comparison table(s) printed at the end of training and by `kinetix.evaluate`."""
    parts = [format_text_table(metrics, "ki_vs_reference")]
    if "ki_vs_truth" in metrics["tables"]:
        parts.append(format_text_table(metrics, "ki_vs_truth"))
    return "\n\n".join(parts)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _md_comparison(metrics: dict, table: str) -> str:
    names = ("ssim", "psnr", "nrmse", "nmi", "ms_ssim")
    tab = metrics["tables"][table]
    rows = _table_rows(metrics, table, names, markdown=True)
    for row, entry in zip(rows, tab["methods"].values(), strict=True):
        e = entry["ssim"]
        row.append(f"{e['n']} ({e['n_nan']} skipped)")
    head = ["method"] + [METRIC_TITLES[m] for m in names] + ["slices"]
    ref = metrics["labels"].get(tab["reference"], tab["reference"])
    base = tab.get("baseline")
    text = f"Reference: **{ref}**. Mean over slices"
    if base:
        text += f"; in parentheses the relative change against the {metrics['labels'][base]} (*)"
    return text + ".\n\n" + _md_table(head, rows)


def _md_per_subject(metrics: dict, table: str) -> str:
    names = TABLE_METRICS
    labels = metrics["labels"]
    per = metrics["per_subject"][table]
    methods = list(metrics["tables"][table]["methods"])
    head = ["subject", "slices", "method"] + [METRIC_TITLES[m] for m in names]
    rows = []
    for subject, entry in per.items():
        for k, method in enumerate(methods):
            rows.append(
                [
                    subject if k == 0 else "",
                    str(entry["n_slices"]) if k == 0 else "",
                    labels.get(method, method),
                ]
                + [_num(entry[method][m], m) for m in names]
            )
    return _md_table(head, rows)


def _md_bland_altman(metrics: dict) -> str:
    ba = metrics["bland_altman"]
    labels = metrics["labels"]
    parts = [ba["note"], "", f"Tumour ROIs: {ba['n_rois']}."]
    for key in ("vs_reference", "vs_truth"):
        if key not in ba:
            continue
        ref = labels[key[3:]]
        head = [
            "method",
            "ROIs",
            "bias",
            "95 % LoA (ROI means)",
            "voxels",
            "bias (voxels)",
            "95 % LoA (voxels)",
        ]
        rows = []
        for method, st in ba[key].items():
            r, v = st["roi_mean"], st["voxel"]
            rows.append(
                [
                    labels.get(method, method),
                    str(r["n"]),
                    _sig(r["bias"]),
                    f"[{_sig(r['loa_low'])}, {_sig(r['loa_high'])}]",
                    str(v["n"]),
                    _sig(v["bias"]),
                    f"[{_sig(v['loa_low'])}, {_sig(v['loa_high'])}]",
                ]
            )
        parts += [
            "",
            f"Against the **{ref}** (Ki in mL/min/mL; difference = method - reference):",
            "",
            _md_table(head, rows),
        ]
    return "\n".join(parts)


def _md_tissue_table(per_tissue: dict, labels: dict, unit: str) -> str:
    """One per-tissue table: tissue, voxels, true mean, then each method's mean (bias %)."""
    methods = list(next(iter(per_tissue.values()))["bias_pct"])
    head = ["tissue", "voxels", f"truth ({unit})"] + [labels.get(m, m) for m in methods]
    rows = []
    for name, e in per_tissue.items():
        cells = [name, str(e["n_voxels"]), _sig(e["mean"]["truth"])]
        for m in methods:
            bias = e["bias_pct"][m]
            pct = "" if bias is None or not math.isfinite(bias) else f" ({bias:+.1f} %)"
            cells.append(_sig(e["mean"][m]) + pct)
        rows.append(cells)
    return _md_table(head, rows)


def _md_param_table(per_param: dict) -> str:
    """Per tissue: each 2TCM parameter's true mean → the kinetic network's mean (bias %)."""
    names = list(per_param)
    tissues = list(next(iter(per_param.values())))
    head = ["tissue", "voxels"] + [f"{n}: truth → kinetix" for n in names]
    rows = []
    for tissue in tissues:
        cells = [tissue, str(per_param[names[0]][tissue]["n_voxels"])]
        for n in names:
            e = per_param[n][tissue]
            bias = e["bias_pct"]["proposed"]
            pct = "" if bias is None or not math.isfinite(bias) else f" ({bias:+.0f} %)"
            cells.append(f"{_sig(e['mean']['truth'])} → {_sig(e['mean']['proposed'])}{pct}")
        rows.append(cells)
    return _md_table(head, rows)


def _md_tissues(metrics: dict) -> str:
    t = metrics.get("tissues", {})
    parts = [t.get("note", "")]
    if t.get("late_frames"):
        parts += ["", "Late frames, mean SUV (bias against the noise-free truth):", ""]
        parts.append(_md_tissue_table(t["late_frames"], LATE_FRAME_LABELS, "SUV"))
    if t.get("ki"):
        parts += ["", "Ki, mean mL/min/mL (bias against the true Ki):", ""]
        parts.append(_md_tissue_table(t["ki"], metrics["labels"], "mL/min/mL"))
    if t.get("params"):
        parts += [
            "",
            "2TCM parameters of the kinetic network, mean per tissue (fv unitless, K1 mL/min/mL, "
            "k2–k4 1/min; bias against the true mean; none where the true mean is 0). Late "
            "frames can fit well with non-physiological parameters, so read these before "
            "reading the parameter maps:",
            "",
        ]
        parts.append(_md_param_table(t["params"]))
    return "\n".join(parts)


def _checkpoint_line(run: dict) -> str:
    """Which training steps were evaluated (older metrics.json files do not say)."""
    step, ablation = run.get("checkpoint_step"), run.get("ablation_checkpoint_step")
    text = "not recorded" if step is None else f"step {step}"
    return text if ablation is None else f"{text} (direct ablation: step {ablation})"


def _md_late_input(metrics: dict) -> str:
    """The late-input section: what was done and each subject's error of ∫Cp after t_cut."""
    late = metrics["late_input"]
    errors = late["auc_error"]
    rows = [[s, f"{100 * e:+.2f}"] for s, e in errors["per_subject"].items()]
    span = f"{late['t_cut_min']:g}-{late['t_end_min']:g} min"
    return "\n".join(
        [
            late["note"],
            "",
            f"Median |AUC error| {100 * errors['median_abs']:.2f} %, largest "
            f"{100 * errors['max_abs']:.2f} %.",
            "",
            _md_table(["subject", f"AUC error of Cp over {span} (%)"], rows),
        ]
    )


def markdown_report(metrics: dict) -> str:
    """`report.md`: run summary, comparison tables, per-subject table, Bland–Altman, figures,
    conventions."""
    run = metrics["run"]
    frames = run["frames"]
    lines = [
        f"# kinetix evaluation: {run['config']}",
        "",
        f"- workdir: `{run['workdir']}`",
        f"- subjects ({len(run['subjects'])}): {', '.join(run['subjects'])}",
        f"- slices evaluated: {run['n_slices']}",
        f"- frames: reference {frames['reference'][0]}-{frames['reference'][-1]}, baseline "
        f"{frames['baseline'][0]}-{frames['baseline'][-1]}, proposed = measured "
        f"{frames['proposed_measured'][0]}-{frames['proposed_measured'][-1]} + predicted "
        f"{frames['proposed_predicted'][0]}-{frames['proposed_predicted'][-1]}",
        f"- Patlak fit: {run['patlak_method']}, t* = {run['t_star_min']:g} min",
        f"- ground truth: {run['truth']}",
        f"- direct (no-model) ablation: {'yes' if run['direct_ablation'] else 'not given'}",
        f"- checkpoint: {_checkpoint_line(run)}",
        f"- evaluation time: {run['seconds']} s",
        "",
    ]
    if "late_input" in metrics:
        lines += ["## Late input (a 35-minute protocol)", "", _md_late_input(metrics), ""]
    for table in metrics["tables"]:
        lines += [f"## {TABLE_TITLES.get(table, table)}", "", _md_comparison(metrics, table), ""]
    lines += [
        "## Per subject (Ki against the 65-min reference)",
        "",
        _md_per_subject(metrics, "ki_vs_reference"),
        "",
    ]
    if "ki_vs_truth" in metrics["per_subject"]:
        lines += [
            "## Per subject (Ki against the true Ki)",
            "",
            _md_per_subject(metrics, "ki_vs_truth"),
            "",
        ]
    lines += ["## Tumour ROIs: Bland-Altman", "", _md_bland_altman(metrics), ""]
    if metrics.get("tissues", {}).get("late_frames"):
        lines += ["## Per tissue (against the simulation's truth)", "", _md_tissues(metrics), ""]
    lines += ["## Figures", ""]
    for fig in metrics["figures"]:
        lines += [f"![{fig['caption']}]({fig['path']})", "", f"*{fig['caption']}*", ""]
    lines += ["## Conventions", ""]
    lines += [f"- **{k}**: {v}" for k, v in metrics["conventions"].items()]
    lines += ["", "Full numbers: `metrics.json`; per-slice values: `per_slice.csv`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------------
METRIC_CONVENTIONS = {
    "per_slice": "Every metric is computed per 2-D axial slice and averaged over slices "
    "(kinetix.evaluation.metrics.batch_slice_metrics); slices whose metric is NaN (e.g. an "
    "all-zero reference slice, max <= 0) are skipped and counted as n_nan.",
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
}
"""The conventions of the image metrics (the same for every evaluation)."""


def conventions(windows: KiWindows, mask_threshold: float, roi_note: str, routes) -> dict:
    """The exact evaluation conventions, as sentences (metrics.json and report.md).

    Args:
      windows: the Patlak fit windows.
      mask_threshold: the body-mask threshold (fraction of the 99th percentile).
      roi_note: how the tumour ROIs were made (or why there are none).
      routes: the registered Ki routes; each contributes its `Route.describe` sentence.

    Returns:
      {topic: sentence}: metrics, mask, Patlak, one per route, SUV, ROIs, Bland-Altman, JSON.
    """
    s = windows.schedule
    return {
        **METRIC_CONVENTIONS,
        "mask": "Ki and SUV maps (every method, the reference and the truth) are multiplied by "
        "the body mask before metrics: Ki outside the body is 0. Body mask = duration-weighted "
        f"mean SUV above {mask_threshold:g} x the subject's 99th percentile "
        '(kinetix.maps.mask, rule "threshold").',
        "patlak": "Patlak convention of TPCCLIB: x = integral of Cp from 0 to the frame "
        "mid-time / frame-mean Cp, y = frame value / frame-mean Cp; frames enter a fit when "
        f"their mid-time lies in the window; {windows.method} line fit per voxel; plasma "
        "input = the subject's sampled plasma curve (piecewise linear).",
        **{route.name: route.describe(windows) for route in routes},
        "suv": f"SUV metrics on the last frame ({s.n_frames}, {s.start[-1]:g}-{s.end[-1]:g} min):"
        " predicted vs measured (and vs the noise-free truth when simulated), same conventions.",
        "rois": roi_note,
        "bland_altman": "Bland-Altman: difference = method - reference, bias = mean "
        "difference, 95 % limits of agreement = bias +- 1.96 SD (ddof = 1); per ROI mean Ki "
        "(primary) and pooled ROI voxels (paper-style).",
        "json": "Non-finite numbers (e.g. PSNR = +inf) are written as null in metrics.json; "
        "n_inf and n_nan count them.",
    }
