"""Train a kinetix model: `python -m kinetix.train --config configs/demo.py [--workdir W]`.

Thin absl entry point (flax examples style): flags → `kinetix.training.train_and_evaluate`.
Rerunning the same command on the same workdir resumes from its latest checkpoint; with
`--config.train.num_steps=0` it only re-evaluates. Override any field with `--config.x.y=value`.
"""

import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
    """Define the command's flags (at run time, so importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a configs/*.py file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
    flags.mark_flags_as_required(["config"])


class _QuietLibraries(std_logging.Filter):
    """Drop INFO chatter of orbax / grain (warnings and errors still show)."""

    def filter(self, record):
        noisy = any(name in record.pathname for name in ("orbax", "grain"))
        return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import jax

    jax.config.parse_flags_with_absl()
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = FLAGS.config
    from kinetix import training

    if config.train.multiprocess or os.environ.get("KINETIX_MULTIPROCESS") == "1":
        jax.distributed.initialize()
    else:
        training.configure_host_devices(config)

    workdir = pathlib.Path(FLAGS.workdir or f"runs/{config.name}")
    logging.info(
        "JAX %s on %s; process %d/%d; workdir %s",
        jax.__version__,
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    try:
        result = training.train_and_evaluate(
            config,
            workdir,
            provenance_kw={
                "config_file": config_flags.get_config_filename(FLAGS["config"]),
                "overrides": config_flags.get_override_values(FLAGS["config"]),
            },
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kinetix.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    table = result.get("eval", {}).get("table")
    if table and jax.process_index() == 0:
        print(table)


if __name__ == "__main__":
    define_flags()
    app.run(main)
