"""Figure of the 9600-step kinetic-vs-direct comparison (issue #5, target 2).

    python benchmarks/plot_long_run.py [--results A.json [B.json ...]] [--out FIG.png]

Reads the results JSONs written for benchmarks/README.md, section "9600 steps" (Ki SSIM of each
evaluated checkpoint pair, and both runs' validation losses; one JSON per pair of runs, naming
its "seed", its "runs" and optionally a "label" for its row, by default "seed S") and writes a
PNG (default: beside the first JSON) with one row per JSON and three panels against the training
step: the proposed Ki's SSIM against the 65-min reference (measured 9–35 + predicted 35–65 min,
the paper's route), the predicted-frames-only Ki's SSIM against the true Ki (the authors'
route), and the validation loss. The learning-rate decay is marked. Plotting only; nothing is
computed.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT = [
    RESULTS / "demo_long9600_cpu_2026-11-27.json",  # seed 0
    RESULTS / "demo_long9600_s1_cpu_2026-11-27.json",
    RESULTS / "demo_long9600_s2_cpu_2026-11-27.json",
    RESULTS / "demo_long9600_s2b_cpu_2026-11-28.json",  # seed 2 again, on another VM
]
COLOURS = {"kinetic": "tab:blue", "direct": "tab:orange"}


def plot_seed(axes, data, decay: int) -> None:
    """One row: the three panels of one results JSON."""
    snaps = sorted(data["snapshots"].items(), key=lambda kv: int(kv[0]))
    steps = [int(s) for s, _ in snaps]

    def series(table, method):
        return [row[table][method]["ssim"] for _, row in snaps]

    who = data.get("label", f"seed {data['seed']}")
    panels = [  # (axis, table, (kinetic, direct) methods, (level method, its label), title)
        (axes[0], "ki_vs_reference", ("proposed", "direct"), ("baseline", "30-min Patlak"),
         f"{who}: Ki SSIM vs 65-min reference\n(measured 9–35 + predicted 35–65 min)"),
        (axes[1], "ki_vs_truth", ("proposed_late", "direct_late"), ("reference", "65-min Patlak"),
         f"{who}: Ki SSIM vs true Ki\n(predicted 35–65 min only, the authors' route)"),
    ]  # fmt: skip
    for ax, table, (ours, theirs), (other, label), title in panels:
        for name, method in (("kinetic", ours), ("direct", theirs)):
            ax.plot(steps, series(table, method), "o-", color=COLOURS[name], label=name)
        level = snaps[0][1][table][other]["ssim"]
        ax.axhline(level, color="grey", ls=":", label=f"{label} ({level:.3f})")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("SSIM")
    later = []  # losses after each run's first evaluation, which sets the upper limit
    for name, run in data["runs"].items():
        val = data["val_loss"][run]
        steps_v, loss_v = [x["step"] for x in val], [x["val_loss"] for x in val]
        axes[2].plot(steps_v, loss_v, ".-", color=COLOURS[name], label=name)
        later += loss_v[1:]
    axes[2].set_title(
        f"{who}: validation loss\n(the first point may be off the scale)", fontsize=10
    )
    if later:
        axes[2].set_ylim(top=1.05 * max(later))
    for ax in axes:
        ax.axvline(decay, color="k", lw=0.8, ls="--")
        ax.set_xlim(0, 10000)
        ax.legend(fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=pathlib.Path, nargs="+", default=DEFAULT)
    ap.add_argument("--out", type=pathlib.Path, help="PNG path (default: beside the first JSON)")
    ap.add_argument("--decay", type=int, default=6400, help="step of the learning-rate decay")
    args = ap.parse_args()
    rows = len(args.results)
    fig, axes = plt.subplots(
        rows, 3, figsize=(14, 4 * rows), constrained_layout=True, squeeze=False
    )
    for row, path in zip(axes, args.results, strict=True):
        plot_seed(row, json.loads(path.read_text()), args.decay)
    for ax in axes[-1]:
        ax.set_xlabel("training step (learning rate ÷ 10 at the dashed line)")
    fig.suptitle("Kinetic network against the direct ablation, demo settings", fontsize=11)
    out = args.out or args.results[0].with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
