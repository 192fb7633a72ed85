"""Evaluate a trained run on held-out subjects: Ki by every route, per-slice metrics, a report.

    python -m kinetix.evaluate --workdir W [--data BIDS] [--ablation_workdir W2] [--out DIR]
                               [--step N] [--overwrite] [--late_input fit|population]
                               [--late_sample_min 60] [--entities ses-followup]

Flags, then `kinetix.evaluation.evaluate_workdir` (see there, and `kinetix.evaluation.run`, for
what is computed). Writes `metrics.json`, `report.md`, `per_slice.csv` and `figures/*.png` under
`--out` (default `W/eval`, or `W/eval-step<N>` with `--step`) and prints the Ki comparison table.
"""

import pathlib

from absl import flags

from kinetix import cli as cli_lib
from kinetix import evaluation

PROG = "kinetix.evaluate"
USAGE = "--workdir W [--data BIDS] [--ablation_workdir W2] [--out DIR] [--step N] [flags]"


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    flags.DEFINE_string(
        "workdir", None, "Trained run directory (config.json + checkpoints).", flag_values=fv
    )
    flags.DEFINE_string(
        "data", None, "BIDS-PET root to evaluate (default: the run's test split).", flag_values=fv
    )
    flags.DEFINE_string(
        "entities",
        None,
        "BIDS entities that choose each subject's scan, e.g. ses-followup,trc-18FFDG (default: "
        "the run's config.data.entities; --entities= for none).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "ablation_workdir", None, "Trained direct (no-model) run to compare.", flag_values=fv
    )
    flags.DEFINE_string(
        "out",
        None,
        "Output directory (default: <workdir>/eval, or <workdir>/eval-step<N>).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "step",
        None,
        "Evaluate the checkpoints of this training step (run and ablation; keep them with "
        "--config.train.keep_checkpoint_steps); default: the latest.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace an existing evaluation in the output directory.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "late_input",
        None,
        list(cli_lib.LATE_INPUT_CHOICES),
        "Evaluate a 35-min protocol: Cp after 35 min by 'fit' or 'population' (default: the "
        "run's config.eval.late_input, 'measured').",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "late_sample_min",
        None,
        "With --late_input fit/population: one late plasma sample at this time (min), read off "
        "the measured curve (0: none).",
        flag_values=fv,
    )


def main(fv: flags.FlagValues) -> None:
    """Evaluates, then prints the comparison table and the report's path."""
    result = evaluation.evaluate_workdir(
        fv.workdir,
        data=fv.data,
        ablation_workdir=fv.ablation_workdir,
        out=fv.out,
        overwrite=fv.overwrite,
        step=fv.step,
        late_input=fv.late_input,
        late_sample_min=fv.late_sample_min,
        entities=fv.entities,
    )
    print(result["table"])
    print(f"\nReport: {pathlib.Path(result['out_dir']) / 'report.md'}")


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("workdir",))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
