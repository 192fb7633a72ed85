"""The one convention of kinetix's commands (``python -m kinetix.<command>``).

Each command module defines its flags on its own `absl.flags.FlagValues` (so several commands can
be imported into one process, and no command touches the global ``FLAGS``), then makes one
library call. `run` parses, checks the required flags, calls the command and turns bad input into
one sentence on stderr, ``<prog>: error: <what is wrong, with which file, flag or key>``, with
exit status 2. ``--help`` prints the usage line and the flags. Commands are callable from Python
as ``cli(argv) -> exit status``; `main_entry` runs one as a program under `absl.app`.
"""

import logging as std_logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")

ERRORS = (flags.Error, ValueError, OSError)
"""Exceptions that mean bad input (a bad flag, file, key or value): one sentence, exit 2."""


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
      0 on success (or `main`'s status), 2 on bad input (one sentence on stderr).
    """
    fv = flags.FlagValues()
    define(fv, list(argv))
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(f"usage: python -m {prog} {usage}\n")
        print(fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = fv(list(argv))
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
