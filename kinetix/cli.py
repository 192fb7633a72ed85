"""The one convention of kinetix's commands (``python -m kinetix.<command>``).

Each command module defines its flags on its own `absl.flags.FlagValues` (so several commands can
be imported into one process, and no command touches the global ``FLAGS``), then makes one
library call. `run` parses, checks the required flags, calls the command and turns bad input into
one sentence on stderr, ``<prog>: error: <what is wrong, with which file, flag or key>``, with
exit status 2. ``--help`` prints the usage line and the flags. Commands are callable from Python
as ``cli(argv) -> exit status``; `main_entry` runs one as a program under `absl.app`.
"""

import logging as std_logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")

ERRORS = (flags.Error, ValueError, OSError)
"""Exceptions that mean bad input (a bad flag, file, key or value): one sentence, exit 2."""

FAILURES = (FloatingPointError,)
"""Exceptions that mean the computation failed (e.g. training diverged): one sentence, exit 1."""


def define_plausibility_flag(fv: flags.FlagValues) -> None:
    """``--[no]check_plausibility`` (default on): the flag of every command that reads a scan."""
    flags.DEFINE_bool(
        "check_plausibility",
        True,
        "Refuse image and blood values outside the plausible FDG ranges (docs/conventions.md, "
        "'Plausibility checks'); --nocheck_plausibility proceeds and records them as warnings.",
        flag_values=fv,
    )


LATE_INPUT_CHOICES = ("measured", "fit", "population")
"""`--late_input` values (`kinetix.data.late_input.LATE_INPUTS`; the library checks them too)."""


def define_input_flags(fv: flags.FlagValues, late: bool = True) -> None:
    """The input-function flags of the commands that read a scan: ``--recording``,
    ``--idif_mask``, ``--idif_label`` and, with ``late``, ``--late_input``, ``--late_sample``,
    ``--population`` (docs/input.md)."""
    flags.DEFINE_string(
        "recording",
        None,
        "The blood recording next to --pet to read, e.g. autosampler (the label of its "
        "*_recording-<label>_blood.tsv); default: the only one, or manual among several "
        "(excludes --blood and --idif_mask).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "idif_mask",
        None,
        "Take the blood from the image: a vessel mask or label image (BIDS dseg) on the PET's "
        "grid; no blood file is read (excludes --blood).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "idif_label",
        None,
        "The label of --idif_mask to use, a number or a name of its dseg.tsv (e.g. aorta).",
        flag_values=fv,
    )
    if not late:
        return
    flags.DEFINE_enum(
        "late_input",
        "measured",
        list(LATE_INPUT_CHOICES),
        "Cp after 35 min: 'measured' (the blood must cover the scan), 'fit' (a Feng model fitted "
        "to 0-35 min) or 'population' (the training cohort's shape scaled to 0-35 min).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "late_sample",
        None,
        "One late venous plasma sample for fit/population, TIME UNIT,VALUE UNIT, e.g. "
        "60min,5.2kBq/mL.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "population",
        None,
        "Population input JSON for --late_input population (default: the run's "
        "population_input.json).",
        flag_values=fv,
    )


def _config_file(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in argv (``--config X`` or ``--config=X``), if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """``fv(argv)`` with config-file faults as one sentence (ml_collections gives several
    lines for a missing file and a KeyError traceback for an override of an unknown key)."""
    path = _config_file(argv[1:]) if "config" in fv else None
    if path is not None and not pathlib.Path(path).is_file():
        raise ValueError(f"--config {path}: no such file.")
    try:
        return fv(list(argv))
    except (KeyError, AttributeError) as err:
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = str(err).strip("\"'")
        raise ValueError(
            f"the config has no key {unknown!r} (overrides given: {', '.join(overrides)})."
        ) from None
    except flags.Error as err:
        raise ValueError(" ".join(line.strip() for line in str(err).splitlines())) from None


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter of orbax and grain (their warnings and errors still show)."""

    def filter(self, record):
        noisy = any(name in record.pathname for name in ("orbax", "grain"))
        return record.levelno >= std_logging.WARNING or not noisy


def run(
    prog: str,
    usage: str,
    define: Callable[[flags.FlagValues, Sequence[str]], None],
    main: Callable[[flags.FlagValues], int | None],
    argv: Sequence[str],
    required: Sequence[str] = (),
) -> int:
    """Parses `argv` with the command's own flags and runs it; returns the exit status.

    Args:
      prog: the command, e.g. "kinetix.predict" (the prefix of every message).
      usage: the usage line after ``python -m <prog>``.
      define: defines the command's flags on the `FlagValues` it is given, for this argv
        (`ml_collections` config flags read their ``--config.x=y`` overrides from it).
      main: the command body, given the parsed flags; returns None or an exit status.
      argv: the full argument list (argv[0] is the program name).
      required: flags that must be given.

    Returns:
      0 on success (or `main`'s status), 2 on bad input, 1 when the computation failed (e.g.
      training diverged); one sentence on stderr in both cases.
    """
    fv = flags.FlagValues()
    define(fv, list(argv))
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(f"usage: python -m {prog} {usage}\n")
        print(fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = _parse(fv, argv)
        if len(rest) > 1:
            args = " ".join(repr(a) for a in rest[1:])
            raise ValueError(f"unexpected arguments {args} (all options are --flags).")
        for name in required:
            if fv[name].value is None:
                raise ValueError(f"--{name} is required.")
        return main(fv) or 0
    except ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except FAILURES as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1


def main_entry(cli: Callable[[Sequence[str]], int]) -> None:
    """Runs ``cli(sys.argv)`` as a program under `absl.app` (absl logging set up) and exits."""

    def parse_absl_defaults(argv):
        flags.FLAGS(argv[:1])  # absl's own flags keep their defaults; the command parses argv
        return argv

    def main(argv):
        std_logging.getLogger("jax").setLevel(std_logging.WARNING)
        absl_logging.get_absl_handler().addFilter(_QuietLibraries())
        sys.exit(cli(argv))

    app.run(main, flags_parser=parse_absl_defaults)
