"""Runs that survive faults: safe reruns, the workdir lock, divergence, damaged checkpoints,
checkpoint settings checked at inference, optional truth derivatives, command-line sentences.

One small run (smoke config, 4 steps, checkpoints at 1, 2 and 4) is trained once per module and
copied for each fault, so every test starts from the same finished run.
"""

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from kinetix import evaluation, experiment, inference
from kinetix import train as train_cmd
from kinetix.training import checkpoint, rerun
from kinetix.training.config import load_config
from kinetix.training.lock import LOCK_NAME


@pytest.fixture(scope="module")
def cohort_root(tiny_cohort):
    return tiny_cohort


def config_for(root, **train):
    config = smoke.get_config()
    config.data.root = str(root)
    config.eval.run_after_training = False
    config.train.checkpoint_every_steps = 2
    config.train.log_every_steps = 1
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


@pytest.fixture(scope="module")
def trained(cohort_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base") / "run"
    experiment.train_and_evaluate(config_for(cohort_root, num_steps=4), workdir)
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def snapshot(workdir):
    """Every file of the workdir with its bytes (what a refused rerun must leave alone)."""
    return {
        p.relative_to(workdir): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# -- reruns ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: setattr(c, "seed", 1), "seed"),
        (lambda c: setattr(c.model, "activation", "hardsigmoid"), "model.activation"),
        (lambda c: setattr(c.data, "test_fraction", 0.5), "data.test_fraction"),
        (lambda c: setattr(c.loss, "lambda_patlak", 1.0), "loss.lambda_patlak"),
    ],
)
def test_a_rerun_that_changes_the_run_is_refused_before_anything_changes(
    cohort_root, run_copy, change, key
):
    before = snapshot(run_copy)
    config = config_for(cohort_root, num_steps=6)
    change(config)
    with pytest.raises(ValueError, match=rf"other settings \({key} "):
        experiment.train_and_evaluate(config, run_copy)
    assert snapshot(run_copy) == before


def test_rerun_rules_name_every_difference_and_allow_the_resumable_ones(cohort_root):
    saved = config_for(cohort_root, num_steps=4)
    new = config_for(cohort_root, num_steps=9)
    new.optim.learning_rate = 1e-5
    new.eval.max_figures = saved.eval.max_figures + 2
    allowed = rerun.check_rerun(saved, new)
    assert [k for k, _, _ in allowed] == [
        "eval.max_figures",
        "optim.learning_rate",
        "train.num_steps",
    ]
    size = saved.data.sim_size
    new.seed, new.data.sim_size = 3, 2 * size
    with pytest.raises(ValueError, match=rf"data.sim_size {size} → {2 * size}, seed 0 → 3"):
        rerun.check_rerun(saved, new)


# -- the workdir lock ----------------------------------------------------------------------------
HOLD = """
import sys
from kinetix.training.lock import workdir_lock
with workdir_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_killed_holder_frees_it(
    cohort_root, run_copy
):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_copy)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_copy)
        with pytest.raises(ValueError, match=rf"in use by test holder \(process {holder.pid} "):
            experiment.train_and_evaluate(config_for(cohort_root, num_steps=4), run_copy)
        assert snapshot(run_copy) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock
        holder.wait(timeout=30)
    # Nothing left to train (step 4 of 4): the rerun takes the lock and only checks.
    result = experiment.train_and_evaluate(config_for(cohort_root, num_steps=4), run_copy)
    assert result["final_step"] == 4


# -- divergence ----------------------------------------------------------------------------------
def test_divergence_writes_no_non_finite_checkpoint_and_the_advised_rerun_works(
    cohort_root, run_copy
):
    wild = config_for(cohort_root, num_steps=10)
    wild.optim.learning_rate = 1e38  # Adam steps ~ lr: the parameters overflow within 2 steps
    with pytest.raises(FloatingPointError, match=r"diverged; .*a rerun resumes from step \d"):
        experiment.train_and_evaluate(wild, run_copy)
    with checkpoint.Checkpointer(run_copy / "checkpoints", save_interval_steps=1) as ckpt:
        steps = ckpt.all_steps()
    assert steps and max(steps) >= 4
    for step in steps:  # every checkpoint left holds finite parameters
        _, params = inference.restore_params(wild, run_copy, step)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params)), step
    # The advice: the same command with a lower learning rate (the run's own here) resumes.
    result = experiment.train_and_evaluate(config_for(cohort_root, num_steps=6), run_copy)
    assert result["final_step"] == 6
    assert all(np.isfinite(r["loss"]) for r in result["history"])


def test_divergence_on_the_command_line_is_one_sentence_with_exit_status_1(
    cohort_root, run_copy, capsys
):
    status = train_cmd.cli(
        [
            "train",
            "--config",
            str(smoke.__file__),
            "--workdir",
            str(run_copy),
            f"--config.data.root={cohort_root}",
            "--config.eval.run_after_training=False",
            "--config.train.checkpoint_every_steps=2",
            "--config.train.log_every_steps=1",
            "--config.train.num_steps=10",
            "--config.optim.learning_rate=1e38",
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert status == 1
    assert len(errors) == 1 and "kinetix.train: error: non-finite param" in errors[0]


# -- damaged checkpoints -------------------------------------------------------------------------
def largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_a_damaged_latest_checkpoint_is_moved_aside_and_training_resumes_from_the_previous(
    cohort_root, run_copy, caplog
):
    largest_array_file(run_copy / "checkpoints" / "4").unlink()
    result = experiment.train_and_evaluate(config_for(cohort_root, num_steps=6), run_copy)
    assert result["final_step"] == 6
    assert "checkpoints/4 is damaged" in caplog.text and "falling back to step 2" in caplog.text
    assert (run_copy / "checkpoints" / "damaged-4").is_dir()
    assert steps_on_disk(run_copy)[-1] == 6
    steps = [r["step"] for r in result["history"]]
    assert steps == [3, 4, 5, 6]  # resumed after step 2


@pytest.mark.parametrize("damage", ["metadata", "array"])
def test_inference_falls_back_from_a_damaged_latest_checkpoint(run_copy, damage, caplog):
    step_dir = run_copy / "checkpoints" / "4"
    if damage == "metadata":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        largest_array_file(step_dir).unlink()
    config = load_config(run_copy)
    inference.restore_params(config, run_copy)  # the newest intact one: step 2
    assert "checkpoints/4 is damaged" in caplog.text
    assert (step_dir / "state").is_dir()  # inference moves nothing
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"checkpoints/4 is damaged \("):
        inference.restore_params(config, run_copy, 4)
    gc.collect()  # Orbax's abandoned reads must leave no "Exception ignored" noise behind


def test_a_config_json_edited_after_training_is_refused_by_inference(run_copy):
    """Shapes alike, meaning not: the checkpoint's recorded settings catch it."""
    path = run_copy / "config.json"
    values = json.loads(path.read_text())
    values["model"]["input_norm"] = "plasma"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"model.input_norm 'none' → 'plasma'"):
        inference.load_for_inference(run_copy)


# -- optional truth derivatives -------------------------------------------------------------------
def test_an_incomplete_truth_derivative_drops_the_truth_but_not_the_run(cohort_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cohort_root, root)
    from kinetix.data import bids, pipeline

    cohort = pipeline.Cohort.from_bids(root)
    subjects = list(cohort.subjects)
    found, note = evaluation.truth.find_truth_root(cohort, subjects)
    assert found == root
    bids.truth_paths(root, subjects[1])["label_table"].unlink()
    found, note = evaluation.truth.find_truth_root(cohort, subjects)
    assert found is None
    assert f"incomplete for {subjects[1]} (no {subjects[1]}_dseg.tsv)" in note
    with pytest.raises(ValueError, match="no complete derivatives/truth"):
        evaluation.truth.find_truth_root(cohort, subjects, truth_root=root)


# -- command-line sentences ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "/no/such/config.py"], r"--config /no/such/config.py: no such file\."),
        (
            ["--config", str(smoke.__file__), "--config.train.nosuch=3"],
            r"the config has no key 'nosuch' \(overrides given: --config.train.nosuch\)\.",
        ),
    ],
)
def test_config_faults_are_one_sentence(args, message, capsys):
    status = train_cmd.cli(["train", *args])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert "\n" not in err
    assert err.startswith("kinetix.train: error: ")
    assert re.search(message, err), err


def test_an_unwritable_workdir_is_one_sentence_before_anything_runs(unwritable_dir):
    workdir = unwritable_dir / "run"
    with pytest.raises(PermissionError, match=rf"cannot write to the workdir {workdir} "):
        experiment.train_and_evaluate(smoke.get_config(), workdir)
    assert list(unwritable_dir.iterdir()) == []


def test_an_unwritable_evaluation_output_is_refused_before_the_run_is_loaded(
    run_copy, unwritable_dir, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("the run was loaded before the output was checked")

    monkeypatch.setattr(inference, "load_for_inference", never)
    with pytest.raises(PermissionError, match=r"output directory \(--out\) .* is not writable"):
        evaluation.evaluate_workdir(run_copy, out=unwritable_dir / "eval")
