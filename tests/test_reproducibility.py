"""Reproducibility: same seed, re-evaluation only, provenance → command line, device count.

One module fixture runs ``python -m kinetix.train`` on the smoke config (4 steps, global batch
4, no validation subjects, no evaluation) and one simulated cohort, in two phases of
overlapping subprocesses (2 cores) sharing a persistent compilation cache, as the launchers do:

1. ``dev1`` and ``dev2``: 1 and 2 CPU devices (``--xla_force_host_platform_device_count``);
2. ``again``: ``dev2``'s command in another workdir (it loads ``dev2``'s compiled programs from
   the cache), and ``reeval``: ``dev2``'s recorded argv and environment from its
   provenance.json plus ``--config.train.num_steps=0 --config.eval.run_after_training=True``.

Same seed, config and device count give bit-identical metrics and parameters (``dev2`` vs
``again``). Changing the device count changes only the order of floating-point reductions: a
single process reads the same grain stream, so every step sees the same global batch of 4
slices in the same order; with D devices each device sums the loss and gradient terms of its
4/D slices and XLA all-reduces the D partial sums, so the sums are associated differently
(float32 rounding, a few ulps), which 4 Adam steps carry into the metrics and parameters at the
1e-6 relative level. Nothing else (initialisation, RNG, data, learning rate) depends on it.
"""

import json
import os
import shlex
import time

import _cli
import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from kinetix import inference, training
from kinetix.training import provenance

TIMEOUT_S = 300  # per phase (~30 s each alone on 2 cores)


def _overrides(root) -> dict:
    return {
        "data.root": str(root),
        "data.batch_size": 4,
        "data.val_fraction": 0.0,
        "train.num_steps": 4,
        "eval.run_after_training": False,
    }


def _file_times(directory) -> dict:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def _snapshot(work) -> dict:
    """What a re-evaluation must leave alone; plants an old eval/report.md it must replace."""
    steps = _cli.checkpoint_steps(work)
    report = work / "eval" / "report.md"  # stands for an earlier evaluation's report
    report.parent.mkdir(exist_ok=True)
    report.write_text("stale report\n")
    old = time.time() - 3600
    os.utime(report, (old, old))
    return {
        "metrics": (work / "metrics.jsonl").read_bytes(),
        "run_files": {n: (work / n).read_bytes() for n in ("config.json", "provenance.json")},
        "steps": steps,
        "checkpoint_files": _file_times(work / "checkpoints"),
        "report_mtime_ns": report.stat().st_mtime_ns,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four runs (module docstring); the parameters are restored while phase 2 runs."""
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort

    base = tmp_path_factory.mktemp("repro")
    root = base / "cohort"
    simulate_cohort(root, 4, 0, SimulationConfig(size=16, slices=2, noise="image"), progress=False)
    overrides = _overrides(root)
    cache = _cli.cache_dir(tmp_path_factory)
    work = {name: base / name for name in ("dev1", "dev2", "again")}
    logs = {name: base / f"{name}.log" for name in ("dev1", "dev2", "again", "reeval")}

    def args(name):
        flags_ = ["--config", _cli.SMOKE, "--workdir", str(work[name])]
        return flags_ + _cli.override_args(overrides)

    procs = {
        name: _cli.start_train(args(name), logs[name], _cli.env(devices, cache))
        for name, devices in (("dev1", 1), ("dev2", 2))
    }
    _cli.wait_all(procs, logs, TIMEOUT_S)

    prov = json.loads((work["dev2"] / "provenance.json").read_text())
    before = _snapshot(work["dev2"])
    reeval = [*prov["argv"][1:], "--config.train.num_steps=0"]
    reeval.append("--config.eval.run_after_training=True")
    procs = {
        "again": _cli.start_train(args("again"), logs["again"], _cli.env(2, cache)),
        "reeval": _cli.start_train(reeval, logs["reeval"], _cli.env(**prov["environment"])),
    }
    try:  # meanwhile (reeval only reads the checkpoints)
        params = {name: _params(work[name]) for name in ("dev1", "dev2")}
    except BaseException:
        _cli.kill(procs.values())
        raise
    _cli.wait_all(procs, logs, TIMEOUT_S)
    params["again"] = _params(work["again"])
    return {
        "overrides": overrides,
        "work": work,
        "logs": logs,
        "prov": prov,
        "before": before,
        "params": params,
    }


def _params(workdir):
    """Final parameters of a run (restored on this process's 4 devices, fetched to the host)."""
    config = training.load_config(workdir)
    return jax.device_get(inference.restore_params(config, workdir)[1])


def test_same_seed_config_and_devices_are_bit_identical(runs):
    first, again = runs["work"]["dev2"], runs["work"]["again"]
    assert json.loads((again / "config.json").read_text()) == runs["prov"]["config"]
    metrics_first, metrics_again = _cli.read_metrics(first), _cli.read_metrics(again)
    assert [m["step"] for m in metrics_first] == [2, 4]
    assert metrics_first[0]["loss"] != metrics_first[1]["loss"]  # it trained
    assert metrics_first == metrics_again  # every float, bit for bit (JSON keeps float32 exactly)
    assert _cli.checkpoint_steps(first) == _cli.checkpoint_steps(again)
    jax.tree.map(np.testing.assert_array_equal, runs["params"]["dev2"], runs["params"]["again"])


def _parse_command(argv: list[str]):
    """(config, workdir) that kinetix.train's own flags make of `argv` (without the program)."""
    full = ["kinetix.train", *argv]
    fv = flags.FlagValues()
    # the override flags (--config.a.b) are declared from the argv given here
    config_flags.DEFINE_config_file("config", None, "", fv, lock_config=True, sys_argv=full)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(full)
    return fv.config, fv.workdir


def test_provenance_rebuilds_the_command_line(runs, monkeypatch):
    prov = runs["prov"]
    argv = shlex.split(provenance.command_line(prov))
    assert argv[:3] == ["python", "-m", "kinetix.train"]
    assert f"--workdir={runs['work']['dev2']}" in argv
    given = {
        a.split("=", 1)[0].removeprefix("--config."): a.split("=", 1)[1]
        for a in argv[3:]
        if a.startswith("--config.")
    }
    assert given == {k: provenance.format_override(v) for k, v in runs["overrides"].items()}
    monkeypatch.chdir(_cli.REPO)  # the recorded --config path is relative to the repository
    config, workdir = _parse_command(argv[3:])
    assert workdir == str(runs["work"]["dev2"])
    assert json.loads(config.to_json_best_effort()) == prov["config"]


def test_zero_steps_on_a_finished_workdir_only_reevaluates(runs):
    """provenance.json's argv and environment + num_steps=0 train nothing and re-evaluate."""
    work, before = runs["work"]["dev2"], runs["before"]
    log = runs["logs"]["reeval"].read_text(errors="replace")
    assert "Resumed from step 4" in log
    assert "Compiling the first step" not in log  # no train step ran
    assert (work / "metrics.jsonl").read_bytes() == before["metrics"]
    assert _cli.checkpoint_steps(work) == before["steps"]
    assert _file_times(work / "checkpoints") == before["checkpoint_files"]
    report = work / "eval" / "report.md"
    assert report.stat().st_mtime_ns > before["report_mtime_ns"]
    assert report.read_text() != "stale report\n"
    assert (work / "eval" / "metrics.json").is_file()
    # config.json / provenance.json keep describing the training run (not num_steps=0)
    for name, content in before["run_files"].items():
        assert (work / name).read_bytes() == content, name
    assert "evaluation only" in log


def test_device_count_changes_only_the_reduction_order(runs):
    work = runs["work"]
    for name in ("dev1", "dev2"):
        assert json.loads((work[name] / "config.json").read_text())["data"]["batch_size"] == 4
    assert json.loads((work["dev1"] / "provenance.json").read_text())["jax"]["device_count"] == 1
    assert runs["prov"]["jax"]["device_count"] == 2  # dev2's, before the re-evaluation
    one, two = _cli.read_metrics(work["dev1"]), _cli.read_metrics(work["dev2"])
    assert [m.keys() for m in one] == [m.keys() for m in two]
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"]
        assert a["learning_rate"] == b["learning_rate"]  # no reduction: exact
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{b['step']} {key}")
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        runs["params"]["dev1"],
        runs["params"]["dev2"],
    )
