"""The one-page preview of a simulated subject (`write_preview`), a visual check of a cohort.

`kinetix.data.phantom.cohort.simulate_cohort` writes one per subject to
``derivatives/preview/sub-XX_preview.png``. Plain matplotlib (`Figure`, Agg canvas, no display);
activities in SUV (g/mL), time in minutes.
"""

import pathlib
from collections.abc import Mapping

import numpy as np
from matplotlib import colors, ticker
from matplotlib.figure import Figure

PREVIEW_EARLY_MIN = 1.25
"""The preview shows the frame whose mid-time is nearest to this (min) as the early frame."""

_TAC_TISSUES = ("blood_pool", "myocardium", "liver", "lung", "muscle")

_LABEL_COLOURS = {
    "background": "#000000", "soft_tissue": "#e9c39b", "muscle": "#b5524b", "lung": "#9ecae1",
    "liver": "#8c510a", "myocardium": "#e7298a", "blood_pool": "#d62728", "aorta": "#ff7f0e",
    "bone": "#f7f7f7", "marrow": "#fdd835", "nodule_benign": "#66bd63",
    "nodule_malignant": "#7b3294",
}  # fmt: skip


def _image(ax, fig, data, title, cmap, norm, unit):
    """Axial slice [X, Y] in radiological view: patient right on the left, anterior on top."""
    im = ax.imshow(data.T, origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=8, va="center")
    ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="w", fontsize=8, va="center", ha="right")
    ax.text(0.5, 0.98, "A", transform=ax.transAxes, color="w", fontsize=8, va="top", ha="center")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(unit, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


def _log_scale(ax, which: str) -> None:
    """Log scale on axis `which` ("x"/"y") with plain labels 0.1, 1, 10 (mathtext is slow)."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _body_box(body: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """A square (x, y) crop around the body of an [X, Y] mask, `margin` pixels wider."""
    if not body.any():
        return slice(None), slice(None)
    box = []
    for axis in (1, 0):
        idx = np.nonzero(body.any(axis=axis))[0]
        box.append([int(idx[0]) - margin, int(idx[-1]) + 1 + margin])
    side = max(hi - lo for lo, hi in box)
    out = []
    for (lo, hi), n in zip(box, body.shape, strict=True):
        side_n = min(side, n)
        lo = min(max(0, lo - (side_n - (hi - lo)) // 2), n - side_n)
        out.append(slice(lo, lo + side_n))
    return tuple(out)


def _upper(values, q=99.0) -> float:
    values = np.asarray(values)
    top = float(np.percentile(values, q)) if values.size else 0.0
    return top if top > 0 else 1.0


def _frame_panels(fig, axes, subj: dict, where: tuple, body: np.ndarray) -> None:
    """The early (~`PREVIEW_EARLY_MIN`) and the last noisy frame of the slice `where` (SUV)."""
    sched = subj["schedule"]
    early = int(np.argmin(np.abs(sched.mid - PREVIEW_EARLY_MIN)))
    late = sched.n_frames - 1
    for ax, k in zip(axes, (early, late), strict=True):
        img = subj["frames"][where + (k,)]
        _image(
            ax, fig, img,
            f"Noisy frame {k + 1}: {sched.start[k]:.3g}–{sched.end[k]:.3g} min",
            "inferno", colors.Normalize(0.0, _upper(img[body])), "SUV (g/mL)",
        )  # fmt: skip


def _ki_panel(fig, ax, ki: np.ndarray, body: np.ndarray) -> None:
    """The true Ki slice [X, Y] (mL/min/mL) on a √ colour scale up to its maximum in `body`."""
    top_ki = _upper(ki[body], 100)
    norm = colors.PowerNorm(0.5, 0.0, top_ki)  # √ scale: shows tumours and tissue
    cb = _image(ax, fig, ki, "True Ki (√ colour scale)", "viridis", norm, "Ki (mL/min/mL)")
    cb.set_ticks(np.linspace(0.0, 1.0, 6) ** 2 * top_ki)
    cb.ax.yaxis.set_major_formatter("{x:.2g}")


def _label_panel(fig, ax, label_slice: np.ndarray, labels: Mapping[str, int]) -> None:
    """The label slice [X, Y], one colour per label, named on the colour bar."""
    names = [""] * (max(labels.values()) + 1)
    for name, index in labels.items():
        names[index] = name
    cmap = colors.ListedColormap([_LABEL_COLOURS.get(n, "#808080") for n in names])
    norm = colors.BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    im = ax.imshow(label_slice.T, origin="lower", cmap=cmap, norm=norm)
    ax.set_title("Labels", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, ticks=np.arange(len(names)))
    cb.ax.set_yticklabels([n.replace("_", " ") for n in names], fontsize=7)


def _blood_panel(ax, subj: dict) -> None:
    """Input functions: log activity over the scan, linear inset over the bolus."""
    t, cp = subj["plasma"]
    _, wb = subj["whole_blood"]
    end = float(subj["schedule"].end[-1])
    inset = ax.inset_axes([0.45, 0.42, 0.52, 0.52])
    for ax_, lw in ((ax, 1.6), (inset, 1.2)):
        ax_.plot(t, cp, color="C3", lw=lw, label="plasma (input)")
        ax_.plot(t, wb, color="C0", lw=lw, label="whole blood")
    inset.set_xlim(0.0, 4.0)
    inset.set_ylim(0.0, 1.08 * float(cp.max()))
    inset.tick_params(labelsize=7)
    inset.set_xlabel("time (min)", fontsize=7)
    inset.set_title("first 4 min (linear)", fontsize=8)
    keep = (t > 0) & (cp > 0)
    _log_scale(ax, "y")
    ax.set_xlim(0.0, end)
    ax.set_ylim(0.5 * float(wb[keep & (t <= end)].min()), 3.0 * float(cp.max()))
    ax.set_xlabel("time after injection (min)")
    ax.set_ylabel("activity (SUV, g/mL)")
    ax.set_title("Blood curves (sampled, Feng model 2)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.5)


def _tissue_curves(subj: dict, labels: Mapping[str, int]) -> list[tuple[str, np.ndarray]]:
    """(name, [X, Y, Z] mask) of the plotted tissues, plus the nodules of the highest-Ki kind."""
    label_map = subj["labels"]
    curves = [(n.replace("_", " "), label_map == labels[n]) for n in _TAC_TISSUES]
    tumours = sorted(subj["tumours"], key=lambda d: -d["ki"])
    if tumours:
        kind = "malignant" if tumours[0]["malignant"] else "benign"
        curves.append((f"{kind} nodules", label_map == labels[f"nodule_{kind}"]))
    return curves


def _tissue_panel(ax, subj: dict, labels: Mapping[str, int]) -> None:
    """Tissue curves: mean over each label in the whole volume (log-log)."""
    sched, mid = subj["schedule"], subj["schedule"].mid
    for i, (name, mask) in enumerate(_tissue_curves(subj, labels)):
        if not mask.any():
            continue
        color = f"C{i}"
        ax.plot(mid, subj["noisefree"][mask].mean(axis=0), color=color, lw=1.5, label=name)
        ax.plot(mid, subj["frames"][mask].mean(axis=0), "o", color=color, ms=3, alpha=0.7)
    if sched.n_frames > 22:  # the paper's split: 22 measured frames (0–35 min), then predicted
        split = float(sched.end[21])
        ax.axvline(split, color="0.4", ls="--", lw=1)
        ax.text(split * 1.03, 0.97, f"{split:.0f} min", transform=ax.get_xaxis_transform(),
                fontsize=8, va="top")  # fmt: skip
    _log_scale(ax, "x")
    _log_scale(ax, "y")
    arrived = np.nonzero(np.asarray(subj["blood_input"](sched.end)) > 0)[0]
    ax.set_xlim(0.7 * float(mid[arrived[0] if arrived.size else 0]), 1.2 * float(sched.end[-1]))
    ax.set_ylim(0.05, None)
    ax.set_xlabel("frame mid-time (min, log)")
    ax.set_ylabel("mean activity (SUV, g/mL)")
    ax.set_title("Tissue curves (lines: noise-free, dots: noisy frames)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both", lw=0.5)


def _preview_title(subj: dict, title: str, s: int) -> str:
    """The figure title: noise, weight, dose, the SUV factor and which slice (0-based `s`)."""
    z = float(subj["affine"][2, 3] + subj["affine"][2, 2] * s)
    return (
        f"{title}: {subj['noise']} noise, {subj['weight_kg']:.0f} kg, {subj['dose_mbq']:.0f} MBq "
        f"(1 SUV = {subj['suv_factor'] / 1e3:.2f} kBq/mL); images: slice {s + 1} of "
        f"{subj['labels'].shape[2]} (z = {z:.0f} mm)"
    )


def write_preview(path, subj: dict, title: str, labels: Mapping[str, int]) -> pathlib.Path:
    """Saves a one-page PNG summary of a simulated subject (matplotlib Agg, no display).

    Panels: an early (~1.25 min) and the last noisy frame of the middle slice (SUV), the true
    Ki map, the label map, the plasma / whole-blood curves (log activity, inset: first 4 min)
    and mean tissue curves over the whole volume (noisy frames as dots, noise-free as lines).

    Args:
      path: output `.png` (parent directories are created).
      subj: a `kinetix.data.phantom.simulate_subject` result.
      title: figure title (e.g. the subject id).
      labels: label name -> value in ``subj["labels"]`` (`kinetix.data.phantom.LABELS`).

    Returns:
      `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    label_map = subj["labels"]
    s = label_map.shape[2] // 2
    where = _body_box(label_map[..., s] > 0) + (s,)  # the cropped middle slice
    body = label_map[where] > 0

    fig = Figure(figsize=(15, 8.0))  # a fixed layout: "constrained" doubles the drawing time
    top = fig.add_gridspec(1, 4, left=0.03, right=0.925, bottom=0.52, top=0.92, wspace=0.32)
    low = fig.add_gridspec(1, 2, left=0.05, right=0.985, bottom=0.075, top=0.44, wspace=0.16)
    axes = [fig.add_subplot(top[0, i]) for i in range(4)]
    _frame_panels(fig, axes[:2], subj, where, body)
    _ki_panel(fig, axes[2], subj["ki_true"][where], body)
    _label_panel(fig, axes[3], label_map[where], labels)
    _blood_panel(fig.add_subplot(low[0, 0]), subj)
    _tissue_panel(fig.add_subplot(low[0, 1]), subj, labels)
    fig.suptitle(_preview_title(subj, title, s), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path
