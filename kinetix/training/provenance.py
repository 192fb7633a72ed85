"""Run provenance: what ran, from which code, with which config, on what .

At the start of a run process 0 writes two files into the workdir::

    config.json       the resolved config (`config.to_json_best_effort()`), pretty JSON
    provenance.json   git SHA + dirty flag, argv, UTC time, hostname, Python and package
                      versions, JAX devices and process layout, JAX/XLA environment variables,
                      seed, config, command-line overrides, and the rebuilt command line

`command_line(provenance)` rebuilds ``python -m kinetix.train --config FILE --workdir DIR
--config.a.b=value ...`` from a provenance dict alone. Collecting never fails: anything that
cannot be determined is recorded as None (or an error string).
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

PACKAGES = (
    "kinetix",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "scipy",
    "nibabel",
    "ml-collections",
    "absl-py",
    "chex",
)
"""Distributions whose versions are recorded (None when not installed)."""

ENV_PREFIXES = ("JAX_", "XLA_", "TF_CPP_", "CUDA_VISIBLE_DEVICES", "NVIDIA_", "TPU_")
"""Environment variables recorded: those starting with one of these."""

ENTRY_MODULE = "kinetix.train"
"""The module `command_line` runs."""

_SOURCE_DIR = pathlib.Path(__file__).resolve().parent


def _run_git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_SOURCE_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    """Git state of the kinetix source tree (not of the current directory).

    Returns:
      {"sha": 40-hex or None, "dirty": bool or None (uncommitted changes to tracked files),
      "untracked": number of untracked, non-ignored files or None, "root": path or None}.
      All None when kinetix is not imported from a git checkout (e.g. an installed wheel).
    """
    sha = _run_git("rev-parse", "HEAD")
    if not sha:
        return {"sha": None, "dirty": None, "untracked": None, "root": None}
    status = _run_git("status", "--porcelain", "--untracked-files=normal")
    lines = [] if status is None else [line for line in status.splitlines() if line]
    return {
        "sha": sha,
        "dirty": None if status is None else any(not ln.startswith("??") for ln in lines),
        "untracked": None if status is None else sum(ln.startswith("??") for ln in lines),
        "root": _run_git("rev-parse", "--show-toplevel"),
    }


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """{distribution: version or None} via `importlib.metadata`."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jax_info() -> dict:
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        return {
            "backend": jax.default_backend(),
            "platform": devices[0].platform if devices else None,
            "device_kind": kinds[0] if len(kinds) == 1 else kinds,
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "x64": bool(jax.config.jax_enable_x64),
        }
    except Exception as err:  # never fail a run for provenance
        return {"error": f"{type(err).__name__}: {err}"}


def _environment_info() -> str | None:
    try:
        import jax

        return jax.print_environment_info(return_string=True)
    except Exception as err:  # nvidia-smi and friends may be missing or slow
        return f"unavailable ({type(err).__name__}: {err})"


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if hasattr(config, "to_dict"):
        return json.loads(json.dumps(config.to_dict(), default=repr))
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=repr))
    raise ValueError(
        f"config must be an ml_collections.ConfigDict or a mapping, got {type(config)}."
    )


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in argv (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr))


def collect(
    config,
    argv: Sequence[str] | None = None,
    overrides: Mapping | None = None,
    extra: Mapping | None = None,
    *,
    config_file: str | None = None,
    workdir: str | None = None,
) -> dict:
    """Everything needed to say what ran and to run it again.

    Args:
      config: the resolved `ml_collections.ConfigDict` (or a mapping).
      argv: the command line (default `sys.argv`).
      overrides: flat {"section.field": value} of ``--config.section.field=value`` flags, e.g.
        `config_flags.get_override_values(FLAGS["config"])`.
      extra: more JSON-able entries to record under "extra".
      config_file: the ``--config`` file (default: parsed from argv).
      workdir: the run's workdir (default: parsed from argv).

    Returns:
      A JSON-able dict with keys: time_utc, hostname, argv, config_file, workdir, command,
      git, python, platform, packages, jax, environment, jax_environment_info, seed, config,
      overrides, extra.
    """
    argv = list(sys.argv if argv is None else argv)
    cfg = _config_dict(config)
    seed = None
    if cfg is not None and "seed" in cfg:
        seed = cfg["seed"]
    prov = {
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "argv": argv,
        "config_file": config_file if config_file is not None else _flag_value(argv, "config"),
        "workdir": str(workdir) if workdir is not None else _flag_value(argv, "workdir"),
        "git": git_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "jax": _jax_info(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "jax_environment_info": _environment_info(),
        "seed": seed,
        "config": cfg,
        "overrides": _jsonable(dict(overrides or {})),
        "extra": _jsonable(dict(extra or {})),
    }
    prov["command"] = command_line(prov)
    return prov


def _is_process_zero() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # no backend: a single process
        return True


def write(workdir, config, **kw) -> dict | None:
    """Writes ``workdir/config.json`` and ``workdir/provenance.json`` (process 0 only).

    Args:
      workdir: the run directory (created if missing).
      config: the resolved config.
      **kw: passed to `collect` (argv, overrides, extra, config_file); `workdir` is recorded.

    Returns:
      The provenance dict on process 0, None on the others (which write nothing).
    """
    if not _is_process_zero():
        return None
    workdir = pathlib.Path(workdir)
    kw.setdefault("workdir", str(workdir))
    prov = collect(config, **kw)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(prov["config"], indent=2) + "\n")
    (workdir / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return prov


def format_override(value) -> str:
    """A config override value as ml_collections' ``--config.x=`` flag parser reads it."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    return str(value)


def command_line(provenance: Mapping) -> str:
    """Rebuilds the training command from a provenance dict.

    Uses the recorded ``config_file``, ``workdir`` and ``overrides``; when no config file was
    recorded, falls back to the recorded argv.

    Returns:
      ``python -m kinetix.train --config FILE [--workdir DIR] [--config.a.b=V ...]``, shell
      quoted.
    """
    config_file = provenance.get("config_file")
    if not config_file:
        argv = list(provenance.get("argv") or [])
        if not argv:
            raise ValueError("The provenance has neither 'config_file' nor 'argv'.")
        return shlex.join(["python", "-m", ENTRY_MODULE, *argv[1:]])
    parts = ["python", "-m", ENTRY_MODULE, f"--config={config_file}"]
    if provenance.get("workdir"):
        parts.append(f"--workdir={provenance['workdir']}")
    for key, value in sorted((provenance.get("overrides") or {}).items()):
        parts.append(f"--config.{key}={format_override(value)}")
    return shlex.join(parts)
