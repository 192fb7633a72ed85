"""Train a kinetix model: ``python -m kinetix.train --config configs/demo.py [--workdir W]``.

Thin entry point (flax examples style): flags, then `kinetix.experiment.train_and_evaluate`.
Rerunning the same command on the same workdir resumes from its latest checkpoint; with
``--config.train.num_steps=0`` it only re-evaluates. Override any field with
``--config.x.y=value``.
"""

import os
import pathlib

import jax
from absl import flags, logging
from ml_collections import config_flags

from kinetix import cli as cli_lib
from kinetix import experiment, training

PROG = "kinetix.train"
USAGE = "--config configs/X.py [--workdir W] [--config.section.field=value ...]"


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to a configs/*.py file.",
        flag_values=fv,
        lock_config=True,
        sys_argv=list(argv),
    )
    flags.DEFINE_string(
        "workdir", None, "Run directory (default: runs/<config name>).", flag_values=fv
    )


def main(fv: flags.FlagValues) -> None:
    jax.config.parse_flags_with_absl()
    config = fv.config
    if config.train.multiprocess or os.environ.get("KINETIX_MULTIPROCESS") == "1":
        jax.distributed.initialize()
    else:
        training.configure_host_devices(config)
    workdir = pathlib.Path(fv.workdir or f"runs/{config.name}")
    logging.info(
        "JAX %s on %s; process %d/%d; workdir %s",
        jax.__version__,
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    result = experiment.train_and_evaluate(
        config,
        workdir,
        provenance_kw={
            "config_file": config_flags.get_config_filename(fv["config"]),
            "overrides": config_flags.get_override_values(fv["config"]),
        },
    )
    table = result.get("eval", {}).get("table")
    if table and jax.process_index() == 0:
        print(table)


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("config",))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
