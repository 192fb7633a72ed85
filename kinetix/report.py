"""Figures and the markdown report of an evaluation (kinetix.evaluate).

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by the Agg
canvas on `savefig`), so nothing here touches pyplot's global state or needs a display:

- `plot_ki_maps`: Ki maps side by side on one colour scale [0, max(reference)], and below them
  each method minus the reference on one symmetric scale;
- `plot_tac_patlak`: ROI-mean time-activity curves (measured vs predicted frames) and Patlak
  plots with the fitted lines, one column per ROI;
- `plot_bland_altman`: one Bland–Altman panel per method (bias and 95 % limits of agreement);
- `plot_per_subject`: per-slice metric distributions by subject and method (paper Figs. 9–11);
- `plot_loss_curve`: training (and validation) loss from `workdir/metrics.jsonl`, log y.

`format_text_tables` and `markdown_report` turn the `metrics.json` dict of
`kinetix.evaluate.evaluate_run` into a fixed-width text table and `report.md`.
"""

import json
import math
import pathlib

import numpy as np
from matplotlib.figure import Figure

TABLE_METRICS = ("ssim", "psnr", "nrmse", "nmi")
"""Metrics of the printed comparison table (the authors' four)."""

METRIC_TITLES = {
    "ssim": "SSIM",
    "psnr": "PSNR (dB)",
    "nrmse": "NRMSE",
    "nmi": "NMI",
    "ms_ssim": "MS-SSIM",
}

_DIGITS = {"ssim": 4, "psnr": 2, "nrmse": 4, "nmi": 4, "ms_ssim": 4}

TABLE_TITLES = {
    "ki_vs_reference": "Ki against the 65-min Patlak reference",
    "ki_vs_truth": "Ki against the true Ki (simulation)",
    "suv_last_frame": "SUV of the last frame against the measured last frame",
    "suv_last_frame_vs_truth": "SUV of the last frame against the noise-free truth (simulation)",
}

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _save(fig: Figure, path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_ki_maps(path, maps: dict, reference: str, title: str = "") -> None:
    """Ki maps on one colour scale with difference maps below.

    Args:
      path: PNG file to write.
      maps: {label: [H, W] Ki (mL/min/mL)}, the reference among them; drawn in this order.
      reference: the label of the reference map; colour scale [0, max(reference)].
      title: figure title.
    """
    if reference not in maps:
        raise ValueError(f"reference {reference!r} is not one of the maps {list(maps)}.")
    labels = list(maps)
    n = len(labels)
    ref = np.asarray(maps[reference], np.float64)
    vmax = float(np.max(ref)) if np.isfinite(ref).any() and np.max(ref) > 0 else 1.0
    diffs = {k: np.asarray(maps[k], np.float64) - ref for k in labels if k != reference}
    dmax = max((float(np.nanmax(np.abs(d))) for d in diffs.values()), default=0.0)
    dmax = dmax if dmax > 0 else 1.0
    fig = Figure(figsize=(2.6 * n + 1.2, 5.8))  # manual layout: constrained is 3x slower here
    axes = fig.subplots(2, n, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.93, bottom=0.02, top=0.88, wspace=0.06, hspace=0.18)
    im = dm = None
    for j, k in enumerate(labels):
        ax = axes[0, j]
        im = ax.imshow(np.asarray(maps[k]).T, origin="lower", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(k, fontsize=8)
        ax.set_axis_off()
        ax2 = axes[1, j]
        ax2.set_axis_off()
        if k in diffs:
            dm = ax2.imshow(diffs[k].T, origin="lower", cmap="RdBu_r", vmin=-dmax, vmax=dmax)
            ax2.set_title(f"{k} - ref.", fontsize=8)
        else:
            ax2.text(
                0.5,
                0.5,
                "difference maps:\nmethod - reference",
                ha="center",
                va="center",
                fontsize=8,
                transform=ax2.transAxes,
            )
    fig.colorbar(im, ax=axes[0, :].tolist(), fraction=0.025, pad=0.01, label="Ki (mL/min/mL)")
    if dm is not None:
        fig.colorbar(dm, ax=axes[1, :].tolist(), fraction=0.025, pad=0.01, label="difference")
    fig.suptitle(f"{title}  [scale 0-{vmax:.3g}]", fontsize=10)
    _save(fig, path)


def plot_tac_patlak(path, schedule, n_early: int, rois: list, labels: dict, title: str = ""):
    """TACs (top) and Patlak plots (bottom) of ROI means, one column per ROI.

    Args:
      path: PNG file to write.
      schedule: the `kk.FrameSchedule` (min).
      n_early: frames ≥ n_early are predicted.
      rois: list of {"name": str, "x": [T] Patlak abscissa (min), "cp": [T] frame-mean plasma,
        "curves": {"measured"/"proposed"/"direct": [T] ROI-mean SUV, the predictions as the
        networks output them}, "fits": {method: {"ki", "v0", "idx": frame indices of the fit}}}.
        Predicted curves are drawn in full (thin) and their frames ≥ n_early marked.
      labels: display names of methods and curves.
      title: figure title.
    """
    mid = np.asarray(schedule.mid)
    t_cut = float(schedule.start[n_early])
    fig = Figure(figsize=(5.2 * len(rois), 7.5), layout="constrained")
    axes = fig.subplots(2, len(rois), squeeze=False)
    styles = {
        "measured": dict(marker="o", ls="-", lw=0.8, color="black", ms=3.5),
        "proposed": dict(marker="s", ls="--", lw=1.2, color="tab:green", ms=3.5, mfc="none"),
        "direct": dict(marker="^", ls=":", lw=1.2, color="tab:purple", ms=3.5, mfc="none"),
    }
    names = {
        "measured": "measured",
        "proposed": "kinetix prediction",
        "direct": "direct net prediction",
    }
    fit_colours = {
        "reference": "black",
        "baseline": "tab:orange",
        "proposed": "tab:green",
        "direct": "tab:purple",
    }
    for j, roi in enumerate(rois):
        ax = axes[0, j]
        for key, curve in roi["curves"].items():
            curve = np.asarray(curve)
            st = dict(styles.get(key, {}))
            if key != "measured":  # the whole predicted curve thin, the used late frames marked
                ax.plot(mid, curve, color=st["color"], lw=0.6, alpha=0.6)
                curve, sel = curve[n_early:], slice(n_early, None)
            else:
                sel = slice(None)
            ax.plot(mid[sel], curve, label=names.get(key, key), **st)
        ax.axvline(t_cut, color="grey", lw=0.8, ls=":")
        ax.axvspan(t_cut, float(schedule.end[-1]), color="grey", alpha=0.08)
        ax.set_xlabel("time (min, frame mid); shaded: predicted frames")
        ax.set_ylabel("SUV (g/mL)")
        ax.set_title(f"TAC: {roi['name']}", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        x, cp = np.asarray(roi["x"]), np.asarray(roi["cp"])
        idx_all = sorted({i for f in roi["fits"].values() for i in f["idx"]})
        for key, curve in roi["curves"].items():
            idx = [i for i in idx_all if key == "measured" or i >= n_early]
            y = np.asarray(curve)[idx] / cp[idx]
            st = dict(styles.get(key, {}))
            st["ls"] = "none"
            ax.plot(x[idx], y, label=names.get(key, key), **st)
        for name, f in roi["fits"].items():
            xs = x[f["idx"]]
            xx = np.array([xs.min(), xs.max()])
            ax.plot(
                xx,
                f["ki"] * xx + f["v0"],
                color=fit_colours.get(name, "grey"),
                lw=1.2,
                label=f"{labels.get(name, name)}: Ki={f['ki']:.4f}",
            )
        ax.set_xlabel("x = int Cp / Cp (min)")
        ax.set_ylabel("y = C / Cp (mL/mL)")
        ax.set_title(f"Patlak: {roi['name']}", fontsize=9)
        ax.legend(fontsize=6.5)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_bland_altman(path, pairs: dict, reference: str, title: str = "") -> None:
    """One Bland–Altman panel per method: difference vs mean with bias and limits.

    Args:
      path: PNG file to write.
      pairs: {method label: (method values [N], reference values [N], stats)} with stats the
        dict of `kinetix.evaluate.bland_altman`.
      reference: label of the reference (axis text).
      title: figure title.
    """
    n = len(pairs)
    fig = Figure(figsize=(3.6 * max(n, 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    for ax, (label, (a, b, st)) in zip(axes, pairs.items(), strict=False):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        ax.scatter((a + b) / 2, a - b, s=12, alpha=0.7)
        for value, ls in ((st["bias"], "-"), (st["loa_low"], "--"), (st["loa_high"], "--")):
            if value is not None and math.isfinite(value):
                ax.axhline(value, color="tab:red", ls=ls, lw=1)
        ax.axhline(0.0, color="grey", lw=0.6)
        fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"  # noqa: E731
        ax.set_title(
            f"{label}\nbias {fmt(st['bias'])}, LoA [{fmt(st['loa_low'])}, {fmt(st['loa_high'])}]",
            fontsize=8,
        )
        ax.set_xlabel("mean of method and ref. Ki (mL/min/mL)", fontsize=8)
        ax.set_ylabel(f"method - {reference}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _fmt_mean(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2g}"


def tissue_param_panels(per_param: dict) -> dict:
    """What `plot_tissue_params` draws: {parameter: (points, listed)}, each a list of
    (tissue, true mean, network's mean). Points have both means > 0 (log axes); listed are the
    others, except tissues whose true means are all zero (no tracer kinetics: the background),
    which are left out.
    """

    def drawable(v):
        return v is not None and math.isfinite(v) and v > 0

    def zero_truth(e):
        return e["mean"]["truth"] is not None and e["mean"]["truth"] == 0

    tissues_all = {t for tissues in per_param.values() for t in tissues}
    no_kinetics = {
        t for t in tissues_all if all(zero_truth(ts[t]) for ts in per_param.values() if t in ts)
    }
    panels = {}
    for name, tissues in per_param.items():
        pts, skipped = [], []
        for tissue, e in tissues.items():
            if tissue in no_kinetics:
                continue
            t, p = e["mean"]["truth"], e["mean"]["proposed"]
            (pts if drawable(t) and drawable(p) else skipped).append((tissue, t, p))
        panels[name] = (pts, skipped)
    return panels


def plot_tissue_params(path, per_param: dict, title: str = "") -> bool:
    """One log–log panel per 2TCM parameter: each tissue's true mean against the network's.

    Args:
      path: PNG file to write.
      per_param: {parameter: {tissue: {"mean": {"truth", "proposed"}, ...}}} (metrics.json
        "tissues" → "params", `kinetix.evaluate.tissue_bias` per parameter).
      title: figure title.

    Returns:
      False (and nothing written) when no parameter has a tissue with both means positive.
      Which tissues are drawn, listed in the panel (a mean ≤ 0, e.g. k4 of an irreversible
      simulation) or left out (the background): `tissue_param_panels`.
    """
    panels = tissue_param_panels(per_param)
    if not any(pts for pts, _ in panels.values()):
        return False
    n = len(panels)
    fig = Figure(figsize=(3.2 * n, 3.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, (pts, skipped)) in zip(axes, panels.items(), strict=True):
        if pts:
            t = np.array([q[1] for q in pts])
            p = np.array([q[2] for q in pts])
            lo, hi = min(t.min(), p.min()) / 1.5, max(t.max(), p.max()) * 1.5
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
            ax.scatter(t, p, s=14)
            for tissue, x, y in pts:
                ax.annotate(tissue.replace("_", " "), (x, y), fontsize=5, alpha=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        if skipped:
            ax.text(
                0.02,
                0.98,
                "not drawn (true / network's mean ≤ 0): "
                + ", ".join(
                    f"{q[0].replace('_', ' ')} ({_fmt_mean(q[1])} / {_fmt_mean(q[2])})"
                    for q in skipped
                ),
                transform=ax.transAxes,
                fontsize=5,
                va="top",
                wrap=True,
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("true mean", fontsize=8)
        ax.set_ylabel("kinetic network's mean", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def plot_per_subject(
    path, per_method: dict, subject_ids, subjects, title: str = "", metrics=("nmi", "psnr", "ssim")
) -> None:
    """Box plots of per-slice metrics by subject (groups) and method (colours).

    Args:
      path: PNG file to write.
      per_method: {method label: {metric: [N] per-slice values}}.
      subject_ids: [N] subject name of each slice.
      subjects: subject order on the x axis.
      title: figure title.
      metrics: metrics drawn, one panel each.
    """
    subject_ids = np.asarray(subject_ids)
    methods = list(per_method)
    fig = Figure(
        figsize=(
            max(6.0, 1.1 * len(subjects) * max(len(methods), 1) * 0.45 + 2),
            3.2 * len(metrics),
        ),
        layout="constrained",
    )
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(methods), 1)
    for ax, metric in zip(axes, metrics, strict=True):
        for k, method in enumerate(methods):
            vals = np.asarray(per_method[method][metric], np.float64)
            data, pos = [], []
            for i, s in enumerate(subjects):
                v = vals[subject_ids == s]
                v = v[np.isfinite(v)]
                if v.size:
                    data.append(v)
                    pos.append(i + (k - (len(methods) - 1) / 2) * width)
            if data:
                bp = ax.boxplot(
                    data,
                    positions=pos,
                    widths=width * 0.9,
                    patch_artist=True,
                    showfliers=False,
                    manage_ticks=False,
                    medianprops={"color": "black"},
                )
                for patch in bp["boxes"]:
                    patch.set_facecolor(_COLOURS[k % len(_COLOURS)])
                    patch.set_alpha(0.6)
            ax.plot([], [], color=_COLOURS[k % len(_COLOURS)], lw=6, alpha=0.6, label=method)
        ax.set_xticks(range(len(subjects)), subjects, fontsize=7, rotation=30)
        ax.set_ylabel(METRIC_TITLES.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside upper center",
        fontsize=7,
        ncol=min(len(methods), 3),
    )
    _save(fig, path)


def read_metrics_jsonl(path) -> list[dict]:
    """The records of a `metrics.jsonl` file (lines that are not JSON objects are skipped)."""
    records = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def plot_loss_curve(path, metrics_jsonl) -> bool:
    """Training loss and validation loss against step, log y; False if there is nothing to plot.

    Args:
      path: PNG file to write.
      metrics_jsonl: the run's `metrics.jsonl` (one {"step", "loss", "val_loss"?, ...} per line).
    """
    metrics_jsonl = pathlib.Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        return False
    recs = read_metrics_jsonl(metrics_jsonl)
    series = {}
    for key in ("loss", "val_loss"):
        pts = [
            (r["step"], r[key])
            for r in recs
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[key] > 0
        ]
        if pts:
            series[key] = np.asarray(sorted(pts), np.float64)
    if not series:
        return False
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for key, pts in series.items():
        ax.plot(
            pts[:, 0],
            pts[:, 1],
            marker="o" if len(pts) < 30 else None,
            ms=3,
            label={"loss": "training loss", "val_loss": "validation loss"}[key],
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Training loss", fontsize=10)
    _save(fig, path)
    return True


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
    """The Ki comparison table(s) printed at the end of training / by `kinetix.evaluate`."""
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


LATE_FRAME_LABELS = {
    "measured": "measured",
    "proposed": "kinetix (predicted)",
    "direct": "direct net (predicted)",
}
"""Display names of the late-frame columns of the per-tissue table."""


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
