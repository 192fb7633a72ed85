"""Figures of a training run: the loss curve read from the run's `metrics.jsonl`."""

import json
import math
import pathlib

import numpy as np
from matplotlib.figure import Figure

from kinetix.figures.common import save


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


def _loss_series(records: list[dict]) -> dict[str, np.ndarray]:
    """{"loss" / "val_loss": [N, 2] (step, value)} of the finite positive values, by step."""
    series = {}
    for key in ("loss", "val_loss"):
        pts = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[key] > 0
        ]
        if pts:
            series[key] = np.asarray(sorted(pts), np.float64)
    return series


def plot_loss_curve(path, metrics_jsonl) -> bool:
    """Training loss and validation loss against step, log y; False if there is nothing to plot.

    Args:
      path: PNG file to write.
      metrics_jsonl: the run's `metrics.jsonl` (one {"step", "loss", "val_loss"?, ...} per line).
    """
    metrics_jsonl = pathlib.Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        return False
    series = _loss_series(read_metrics_jsonl(metrics_jsonl))
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
    save(fig, path)
    return True
