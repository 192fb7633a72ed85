"""Multi-process training on CPU: 2 processes × 2 devices against 1 process × 4 devices.

How the 2-process runs start: `python -m kinetix.train` with ``KINETIX_MULTIPROCESS=1`` calls
``jax.distributed.initialize()`` without arguments. jax 0.10 reads only the coordinator address
from the environment (``JAX_COORDINATOR_ADDRESS``; there is no ``JAX_NUM_PROCESSES`` or
``JAX_PROCESS_ID``) and takes the process count and index from a detected cluster. The test
therefore gives each process the variables of a one-node Slurm step (``SLURM_JOB_ID``,
``SLURM_NTASKS=2``, ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NODELIST``), the path
`launch/slurm.sbatch` relies on, with the coordinator on ``127.0.0.1:<free port>`` (bound to the
loopback interface only). `_mp_worker.py` uses explicit `jax.distributed.initialize` arguments.

Evaluation after training is checked by its own test (process 0 evaluates on its own devices,
writes and prints; the others wait at a barrier).

Data order. `pipeline.slice_dataset` gives process i of S the i-th block of B/S records of each
run of B consecutive records of the shuffled stream, so global batch k (the processes' local
batches, process 0's rows first: `test_global_rows_follow_process_order`) is exactly the
single-process batch k (`test_global_batch_is_the_single_process_batch`). Losses and gradients
are sums over the batch, so the 2-process run equals the 1-process run up to float32 reduction
order (rtol 1e-5; observed ~1e-7: the cross-process all-reduce (gloo) sums in another order than
the in-process one).
"""

import json
import sys

import _cli
import jax
import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from configs import smoke
from kinetix import experiment, inference, training
from kinetix.data import pipeline
from kinetix.data.bids import Study

TIMEOUT_S = 300  # the 2-process run takes ~35 s alone on 2 cores


# ------------------------------------------------------------------------ data order only ---
def _memory_cohort(n_subjects: int = 3, n_slices: int = 7):
    """21 tiny in-memory slices (21 is not a multiple of the batch: epochs end mid-batch)."""
    schedule = kk.FrameSchedule.from_durations([60.0] * 4)
    rng = np.random.default_rng(0)
    times = np.array([0.0, 0.5, 1.0, 4.0], np.float32)
    studies = [
        Study(
            frames=rng.uniform(0.5, 1.0, (4, 4, n_slices, 4)).astype(np.float32),
            schedule=schedule,
            plasma_times=times,
            plasma=np.array([0.0, 10.0, 5.0, 2.0], np.float32),
            whole_blood=None,
            suv_factor=1.0,
            affine=np.eye(4),
            header=nib.Nifti1Header(),
            subject=f"sub-{i:02d}",
        )
        for i in range(n_subjects)
    ]
    return pipeline.Cohort.from_studies(studies)


def _global_batches(cohort, global_batch: int, processes: int, epochs: int):
    """Per step, the (subject, slice) pairs of the global batch: local batches in process order."""
    local = []
    for i in range(processes):
        it = pipeline.slice_dataset(
            cohort,
            cohort.subjects,
            global_batch // processes,
            seed=3,
            shard_index=i,
            shard_count=processes,
            num_epochs=epochs,
            input_points=4,
            prefetch=0,
        )
        local.append(
            [list(zip(b["subject"].tolist(), b["slice"].tolist(), strict=True)) for b in it]
        )
    assert len({len(batches) for batches in local}) == 1  # every process makes as many steps
    return [sum(step, []) for step in zip(*local, strict=True)]


@pytest.mark.parametrize("processes, global_batch", [(2, 4), (4, 8)])
def test_global_batch_holds_the_single_process_examples(processes, global_batch):
    cohort = _memory_cohort()
    single = _global_batches(cohort, global_batch, 1, epochs=3)
    multi = _global_batches(cohort, global_batch, processes, epochs=3)
    assert len(single) == 3 * (21 // global_batch)
    assert len(multi) == len(single)
    for k, (a, b) in enumerate(zip(single, multi, strict=True)):
        assert sorted(a) == sorted(b), f"step {k}"


@pytest.mark.parametrize("processes, global_batch", [(2, 4), (4, 8)])
def test_global_batch_is_the_single_process_batch(processes, global_batch):
    cohort = _memory_cohort()
    assert _global_batches(cohort, global_batch, processes, epochs=3) == _global_batches(
        cohort, global_batch, 1, epochs=3
    )


def test_global_rows_follow_process_order(tmp_path):
    """kinetix's mesh puts process i's local batch at rows i·B … (i+1)·B − 1 of the global one."""
    port = _cli.free_port()
    address = f"127.0.0.1:{port}"
    procs, logs = {}, {}
    for i in range(2):
        logs[i] = tmp_path / f"worker{i}.log"
        procs[i] = _cli.start(
            [sys.executable, "tests/_mp_worker.py", address, "2", str(i), "2"],
            logs[i],
            _cli.env(2, JAX_COORDINATOR_BIND_ADDRESS=address),
        )
    _cli.wait_all(procs, logs, TIMEOUT_S)
    for i in range(2):
        lines = [ln for ln in logs[i].read_text().splitlines() if ln.startswith('{"process"')]
        out = json.loads(lines[-1])
        assert out["process"] == i
        assert out["device_processes"] == [0, 0, 1, 1]
        assert out["rows"] == [0, 1, 2, 3]


# --------------------------------------------------------------------------------- training ---
OVERRIDES = {
    "data.batch_size": 4,  # global batch, 1 slice per device in both runs
    "train.num_steps": 4,
    "eval.run_after_training": False,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run (subprocesses) overlapping the 1-process, 4-device run in this process.

    Neither gets a data root: each simulates the cohort into its workdir (the 2-process run on
    process 0 while process 1 waits at kinetix's barrier); the test checks both are identical.
    The 2-process run also evaluates after training (its own test); evaluation writes nothing
    that training reads, so the training comparison holds whether or not it succeeds.
    """
    base = tmp_path_factory.mktemp("multiprocess")
    work = {"multi": base / "multi", "single": base / "single"}
    address = f"127.0.0.1:{_cli.free_port()}"
    overrides = {**OVERRIDES, "eval.run_after_training": True}
    args = ["--config", _cli.SMOKE, "--workdir", str(work["multi"])]
    procs, logs = {}, {}
    for i in range(2):
        logs[i] = base / f"process{i}.log"
        environ = _cli.env(
            2,
            _cli.cache_dir(tmp_path_factory),
            KINETIX_MULTIPROCESS="1",
            JAX_COORDINATOR_ADDRESS=address,
            JAX_COORDINATOR_BIND_ADDRESS=address,
            SLURM_JOB_ID="1",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            SLURM_STEP_NODELIST="localhost",
        )
        procs[i] = _cli.start_train(args + _cli.override_args(overrides), logs[i], environ)
    try:
        config = _cli.apply_overrides(smoke.get_config(), OVERRIDES)
        experiment.train_and_evaluate(config, work["single"])
    except BaseException:
        _cli.kill(procs.values())
        raise
    codes = _cli.wait_all(procs, logs, TIMEOUT_S, check=False)
    return {"work": work, "codes": codes, "logs": logs}


def _params(workdir):
    config = training.load_config(workdir)
    return jax.device_get(inference.restore_params(config, workdir)[1])


def test_two_processes_train_like_one(runs):
    multi, single = runs["work"]["multi"], runs["work"]["single"]
    if not (multi / "checkpoints" / "4").is_dir():
        pytest.fail("the 2-process run did not train:\n" + _cli.tail(runs["logs"][0]))
    prov = json.loads((multi / "provenance.json").read_text())["jax"]
    assert (prov["process_count"], prov["device_count"], prov["local_device_count"]) == (2, 4, 2)
    assert sorted(p.name for p in (multi / "checkpoints" / "4" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    a, b = pipeline.Cohort.from_bids(multi / "data"), pipeline.Cohort.from_bids(single / "data")
    assert a.subjects == b.subjects
    for s in a.subjects:
        np.testing.assert_array_equal(a.study(s).frames, b.study(s).frames)
        np.testing.assert_array_equal(a.study(s).plasma, b.study(s).plasma)
    m_multi, m_single = _cli.read_metrics(multi), _cli.read_metrics(single)
    assert [m["step"] for m in m_multi] == [2, 4]  # process 0 alone writes the metrics
    assert [m.keys() for m in m_multi] == [m.keys() for m in m_single]
    assert "val_loss" in m_multi[-1]
    for m, r in zip(m_multi, m_single, strict=True):
        for key in r:
            np.testing.assert_allclose(m[key], r[key], rtol=1e-5, err_msg=f"step {r['step']} {key}")
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4),
        _params(multi),
        _params(single),
    )


def test_two_processes_evaluate_after_training(runs):
    logs = {i: runs["logs"][i].read_text(errors="replace") for i in range(2)}
    assert runs["codes"] == {0: 0, 1: 0}, _cli.tail(runs["logs"][0])
    assert (runs["work"]["multi"] / "eval" / "report.md").is_file()
    assert "Ki against" in logs[0]  # the table, printed by process 0 only
    assert "Ki against" not in logs[1]
