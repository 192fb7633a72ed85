"""Figure of the 9600-step kinetic-vs-direct comparison (issue #5, target 2).

    python benchmarks/plot_long_run.py [--results results/demo_long9600_cpu_2026-11-27.json]

Reads the results JSON written for benchmarks/README.md, section "9600 steps" (Ki SSIM of each
evaluated checkpoint pair, and both runs' validation losses) and writes a PNG beside it, with
three panels against the training step: the proposed Ki's SSIM against the 65-min reference
(measured 9–35 + predicted 35–65 min, the paper's route), the predicted-frames-only Ki's SSIM
against the true Ki (the authors' route), and the validation loss. The learning-rate decay is
marked. Plotting only; nothing is computed.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT = pathlib.Path(__file__).parent / "results" / "demo_long9600_cpu_2026-11-27.json"
RUNS = {"kinetic": "kinetic-9600-s0", "direct": "dirnone-9600-s0"}
COLOURS = {"kinetic": "tab:blue", "direct": "tab:orange"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=pathlib.Path, default=DEFAULT)
    ap.add_argument("--decay", type=int, default=6400, help="step of the learning-rate decay")
    args = ap.parse_args()
    data = json.loads(args.results.read_text())
    snaps = sorted(data["snapshots"].items(), key=lambda kv: int(kv[0]))
    steps = [int(s) for s, _ in snaps]

    def series(table, method):
        return [row[table][method]["ssim"] for _, row in snaps]

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    panels = [  # (axis, table, (kinetic, direct) methods, (level method, its label), title)
        (axes[0], "ki_vs_reference", ("proposed", "direct"), ("baseline", "30-min Patlak"),
         "Ki SSIM vs 65-min reference\n(measured 9–35 + predicted 35–65 min)"),
        (axes[1], "ki_vs_truth", ("proposed_late", "direct_late"), ("reference", "65-min Patlak"),
         "Ki SSIM vs true Ki\n(predicted 35–65 min only, the authors' route)"),
    ]  # fmt: skip
    for ax, table, (ours, theirs), (other, label), title in panels:
        for name, method in (("kinetic", ours), ("direct", theirs)):
            ax.plot(steps, series(table, method), "o-", color=COLOURS[name], label=name)
        level = snaps[0][1][table][other]["ssim"]
        ax.axhline(level, color="grey", ls=":", label=f"{label} ({level:.3f})")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("SSIM")
    for name, run in RUNS.items():
        val = data["val_loss"][run]
        steps_v, loss_v = [x["step"] for x in val], [x["val_loss"] for x in val]
        axes[2].plot(steps_v, loss_v, ".-", color=COLOURS[name], label=name)
    axes[2].set_title("validation loss", fontsize=10)
    axes[2].set_ylim(top=min(0.06, axes[2].get_ylim()[1]))
    for ax in axes:
        ax.axvline(args.decay, color="k", lw=0.8, ls="--")
        ax.set_xlabel("training step (learning rate ÷ 10 at the dashed line)")
        ax.legend(fontsize=8)
    fig.suptitle("Kinetic network against the direct ablation, seed 0, demo settings", fontsize=11)
    out = args.results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
