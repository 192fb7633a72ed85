"""Figures of Ki maps and their agreement: maps, TAC / Patlak plots, Bland–Altman, tissues, boxes.

- `plot_ki_maps`: Ki maps side by side on one colour scale [0, max(reference)], and below them
  each method minus the reference on one symmetric scale;
- `plot_tac_patlak`: ROI-mean time-activity curves (measured vs predicted frames) and Patlak
  plots with the fitted lines, one column per ROI;
- `plot_bland_altman`: one Bland–Altman panel per method (bias and 95 % limits of agreement);
- `plot_tissue_params`: per tissue, the true mean 2TCM parameter against the network's;
- `plot_per_subject`: per-slice metric distributions by subject and method (paper Figs. 9–11).

Every function takes plain arrays and dicts (Ki in mL/min/mL, SUV in g/mL, time in minutes) and
writes one PNG.
"""

import math

import numpy as np
from matplotlib.figure import Figure

from kinetix.figures.common import COLOURS, METRIC_TITLES, save


def _draw_map_pair(ax, ax2, label, image, diff, vmax, dmax):
    """One column of `plot_ki_maps`: the map on top, its difference to the reference below (or,
    for the reference, a legend text); returns the two images (the second may be None)."""
    im = ax.imshow(np.asarray(image).T, origin="lower", cmap="magma", vmin=0, vmax=vmax)
    ax.set_title(label, fontsize=8)
    ax.set_axis_off()
    ax2.set_axis_off()
    if diff is None:
        ax2.text(
            0.5,
            0.5,
            "difference maps:\nmethod - reference",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax2.transAxes,
        )
        return im, None
    dm = ax2.imshow(diff.T, origin="lower", cmap="RdBu_r", vmin=-dmax, vmax=dmax)
    ax2.set_title(f"{label} - ref.", fontsize=8)
    return im, dm


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
        im, d = _draw_map_pair(axes[0, j], axes[1, j], k, maps[k], diffs.get(k), vmax, dmax)
        dm = d if d is not None else dm
    fig.colorbar(im, ax=axes[0, :].tolist(), fraction=0.025, pad=0.01, label="Ki (mL/min/mL)")
    if dm is not None:
        fig.colorbar(dm, ax=axes[1, :].tolist(), fraction=0.025, pad=0.01, label="difference")
    fig.suptitle(f"{title}  [scale 0-{vmax:.3g}]", fontsize=10)
    save(fig, path)


CURVE_STYLES = {
    "measured": dict(marker="o", ls="-", lw=0.8, color="black", ms=3.5),
    "proposed": dict(marker="s", ls="--", lw=1.2, color="tab:green", ms=3.5, mfc="none"),
    "direct": dict(marker="^", ls=":", lw=1.2, color="tab:purple", ms=3.5, mfc="none"),
}
"""Line styles of the TAC / Patlak figure's curves (other predictions: grey, default style)."""

CURVE_NAMES = {
    "measured": "measured",
    "proposed": "kinetix prediction",
    "direct": "direct net prediction",
}
"""Legend names of the TAC / Patlak figure's curves."""

FIT_COLOURS = {
    "reference": "black",
    "baseline": "tab:orange",
    "proposed": "tab:green",
    "direct": "tab:purple",
}
"""Colours of the Patlak lines by Ki route (others: grey)."""


def _style(key: str) -> dict:
    return dict(CURVE_STYLES.get(key, {"color": "grey", "marker": "x", "ls": "-."}))


def _draw_tacs(ax, roi: dict, schedule, n_early: int) -> None:
    """The TAC panel of one ROI: measured curve, predicted curves (late frames marked)."""
    mid = np.asarray(schedule.mid)
    t_cut = float(schedule.start[n_early])
    for key, curve in roi["curves"].items():
        curve = np.asarray(curve)
        st = _style(key)
        if key != "measured":  # the whole predicted curve thin, the used late frames marked
            ax.plot(mid, curve, color=st["color"], lw=0.6, alpha=0.6)
            curve, sel = curve[n_early:], slice(n_early, None)
        else:
            sel = slice(None)
        ax.plot(mid[sel], curve, label=CURVE_NAMES.get(key, key), **st)
    ax.axvline(t_cut, color="grey", lw=0.8, ls=":")
    ax.axvspan(t_cut, float(schedule.end[-1]), color="grey", alpha=0.08)
    ax.set_xlabel("time (min, frame mid); shaded: predicted frames")
    ax.set_ylabel("SUV (g/mL)")
    ax.set_title(f"TAC: {roi['name']}", fontsize=9)
    ax.legend(fontsize=7)


def _draw_patlak(ax, roi: dict, n_early: int, labels: dict) -> None:
    """The Patlak panel of one ROI: the points of every curve in a fit, and the fitted lines."""
    x, cp = np.asarray(roi["x"]), np.asarray(roi["cp"])
    idx_all = sorted({i for f in roi["fits"].values() for i in f["idx"]})
    for key, curve in roi["curves"].items():
        idx = [i for i in idx_all if key == "measured" or i >= n_early]
        y = np.asarray(curve)[idx] / cp[idx]
        st = _style(key)
        st["ls"] = "none"
        ax.plot(x[idx], y, label=CURVE_NAMES.get(key, key), **st)
    for name, f in roi["fits"].items():
        xs = x[f["idx"]]
        xx = np.array([xs.min(), xs.max()])
        ax.plot(
            xx,
            f["ki"] * xx + f["v0"],
            color=FIT_COLOURS.get(name, "grey"),
            lw=1.2,
            label=f"{labels.get(name, name)}: Ki={f['ki']:.4f}",
        )
    ax.set_xlabel("x = int Cp / Cp (min)")
    ax.set_ylabel("y = C / Cp (mL/mL)")
    ax.set_title(f"Patlak: {roi['name']}", fontsize=9)
    ax.legend(fontsize=6.5)


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
    fig = Figure(figsize=(5.2 * len(rois), 7.5), layout="constrained")
    axes = fig.subplots(2, len(rois), squeeze=False)
    for j, roi in enumerate(rois):
        _draw_tacs(axes[0, j], roi, schedule, n_early)
        _draw_patlak(axes[1, j], roi, n_early, labels)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def plot_bland_altman(path, pairs: dict, reference: str, title: str = "") -> None:
    """One Bland–Altman panel per method: difference vs mean with bias and limits.

    Args:
      path: PNG file to write.
      pairs: {method label: (method values [N], reference values [N], stats)} with stats the
        dict of `kinetix.evaluation.tables.bland_altman`.
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
    save(fig, path)


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


def _draw_tissue_panel(ax, name: str, pts: list, skipped: list) -> None:
    """One parameter's panel: true against network's mean per tissue (log axes), and the
    tissues that cannot be drawn listed as text."""
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
                f"{q[0].replace('_', ' ')} ({_fmt_mean(q[1])} / {_fmt_mean(q[2])})" for q in skipped
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


def plot_tissue_params(path, per_param: dict, title: str = "") -> bool:
    """One log–log panel per 2TCM parameter: each tissue's true mean against the network's.

    Args:
      path: PNG file to write.
      per_param: {parameter: {tissue: {"mean": {"truth", "proposed"}, ...}}} (metrics.json
        "tissues" → "params", `kinetix.evaluation.tables.tissue_bias` per parameter).
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
        _draw_tissue_panel(ax, name, pts, skipped)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
    return True


def _draw_boxes(ax, values, subject_ids, subjects, k: int, n_methods: int, width: float):
    """The boxes of method number k: one per subject with finite values, offset within its group."""
    vals = np.asarray(values, np.float64)
    data, pos = [], []
    for i, s in enumerate(subjects):
        v = vals[subject_ids == s]
        v = v[np.isfinite(v)]
        if v.size:
            data.append(v)
            pos.append(i + (k - (n_methods - 1) / 2) * width)
    if not data:
        return
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
        patch.set_facecolor(COLOURS[k % len(COLOURS)])
        patch.set_alpha(0.6)


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
            values = per_method[method][metric]
            _draw_boxes(ax, values, subject_ids, subjects, k, len(methods), width)
            ax.plot([], [], color=COLOURS[k % len(COLOURS)], lw=6, alpha=0.6, label=method)
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
    save(fig, path)
