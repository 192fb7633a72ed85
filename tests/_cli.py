"""Helpers for tests that run `python -m kinetix.train` in subprocesses (not a test module).

Every subprocess runs in its own session (process group) with its output in a log file; waits
are bounded, and on any failure or timeout the groups started here are killed by their ids.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from kinetix.training import provenance

REPO = pathlib.Path(__file__).resolve().parents[1]
"""Repository root: the subprocesses' cwd, so that `configs` imports and --config resolves."""

SMOKE = "configs/smoke.py"


def cache_dir(tmp_path_factory) -> pathlib.Path:
    """The compilation cache shared by the subprocesses of one pytest session."""
    return tmp_path_factory.getbasetemp() / "kinetix-jax-cache"


def free_port() -> int:
    """A TCP port on the loopback interface that is free now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def override_args(overrides: dict) -> list[str]:
    """{"a.b": value} -> ["--config.a.b=value", ...] as kinetix.train's flags read them."""
    return [f"--config.{k}={provenance.format_override(v)}" for k, v in overrides.items()]


def apply_overrides(config, overrides: dict):
    """Sets {"a.b": value} fields on a ConfigDict in place (the in-process twin of the flags)."""
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return config


CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR", "KINETIX_MULTIPROCESS")
"""Inherited variables that would make jax.distributed or kinetix.train see a cluster."""


def env(devices: int | None = None, cache_dir=None, **extra: str) -> dict:
    """This process's environment (XLA_FLAGS included) on CPU for a kinetix.train subprocess.

    Args:
      devices: fake CPU devices (XLA_FLAGS); None keeps this process's XLA_FLAGS.
      cache_dir: a persistent JAX compilation cache shared by the runs (as the launchers set
        one). Every executable is cached, however quick to compile: a later run then skips
        the many small compiles of model initialisation (~8 s on 2 cores). It changes no
        result (the same program gives the same binary).
      **extra: more variables.
    """
    out = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    out["JAX_PLATFORMS"] = "cpu"
    out.update(extra)
    if devices is not None:
        out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache_dir is not None:
        out["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return out


def start_train(args: list[str], log: pathlib.Path, environ: dict) -> subprocess.Popen:
    """Starts `python -m kinetix.train ARGS` in a new session, output to `log`."""
    return start([sys.executable, "-m", "kinetix.train", *args], log, environ)


def start(cmd: list[str], log: pathlib.Path, environ: dict) -> subprocess.Popen:
    """Starts `cmd` in the repository root in a new session, stdout and stderr to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=environ,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def kill(procs) -> None:
    """SIGKILL the process groups of `procs` that are still running, then reap them."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


GRACE_S = 30.0
"""Seconds the other processes get to exit after one failed (`wait_all(check=False)`)."""


def tail(log: pathlib.Path, n: int = 3000) -> str:
    """The last `n` bytes of a log, as text."""
    try:
        return log.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def wait_all(procs: dict, logs: dict, timeout_s: float, check: bool = True) -> dict:
    """Waits until every process has exited; kills them all on an error or the deadline.

    Args:
      procs: {name: Popen}.
      logs: {name: log path} (their tails go into failure messages).
      timeout_s: deadline for all of them together (seconds).
      check: fail as soon as one exits non-zero. False: return the exit codes instead, giving
        the others `GRACE_S` more to exit (a peer of a crashed process may hang in a
        collective) before killing them (code -9).

    Returns:
      {name: exit code}.
    """
    deadline = time.monotonic() + timeout_s
    grace_end = None
    try:
        while True:
            codes = {k: p.poll() for k, p in procs.items()}
            failed = [k for k, c in codes.items() if c not in (None, 0)]
            if failed and check:
                name = failed[0]
                raise AssertionError(f"{name!r} exited with {codes[name]}:\n{tail(logs[name])}")
            if all(c is not None for c in codes.values()):
                return codes
            now = time.monotonic()
            if failed and grace_end is None:
                grace_end = now + GRACE_S
            if grace_end is not None and now > grace_end:
                break  # the others are killed below
            if now > deadline:
                late = [k for k, c in codes.items() if c is None]
                raise AssertionError(
                    f"{late} did not finish in {timeout_s:.0f} s:\n"
                    + "\n".join(f"--- {k}:\n{tail(logs[k])}" for k in late)
                )
            time.sleep(0.2)
    finally:
        kill(procs.values())
    return {k: p.poll() for k, p in procs.items()}


def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl records without the timing field `steps_per_sec`."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "steps_per_sec"} for ln in lines]


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the checkpoint directories in workdir/checkpoints, ascending."""
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
