"""GPU checks (marker `gpu`; skipped where no GPU is visible).

Run on a GPU machine with `JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu` (tests/conftest.py
otherwise pins the CPU backend). Each check compares the GPU result with an independent one on
the CPU backend of the same process:
- the 2TCM frames (float32 on the GPU) against float64 on the CPU, over rate sets that include
  the edge cases (k4 = 0, k3 = 0, equal eigenvalues), ≤ 1e-4 of each curve's largest frame;
- Patlak Ki / V0 (float32) on both backends, ≤ 2e-4 relative (13-frame float32 sums in a
  different order: 7e-5 to 9e-5 was seen on an H200);
- two train steps of the smoke model on one GPU against one CPU device with matmul/conv
  precision "highest" (no TF32), parameters ≤ 1e-4 absolute / relative;
- the step's state donation frees the old buffers on the GPU (memory at paper scale relies on it);
- a short smoke training run end to end with a checkpoint and finite metrics.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kinetix.kinetics as kk
from configs import smoke
from kinetix import experiment, training
from kinetix.data import pipeline

pytestmark = pytest.mark.gpu

# fv, K1, k2, k3, k4 (1/min): typical tissues and the closed form's edge cases.
RATES = np.array(
    [
        [0.05, 0.10, 0.15, 0.05, 0.00],  # irreversible
        [0.30, 0.80, 1.20, 0.10, 0.02],  # fast exchange, reversible
        [0.00, 0.05, 0.20, 0.00, 0.00],  # k3 = 0 (one tissue compartment)
        [0.10, 0.20, 0.30, 0.00, 0.30],  # k3 = 0, k2 = k4: equal eigenvalues
        [0.02, 0.03, 0.06, 0.20, 0.01],  # slow
        [0.00, 1.50, 2.00, 0.50, 0.20],  # upper corner of the box
        [1.00, 0.00, 0.00, 0.00, 0.00],  # pure blood
    ]
)


def gpu():
    return jax.devices("gpu")[0]


def cpu():
    return jax.devices("cpu")[0]


def test_pet_frames_on_gpu_match_float64_on_cpu(x64):
    sched = kk.PAPER_SCHEDULE

    def frames(params, dtype, device):
        inp = kk.FengInput(jnp.asarray(np.asarray(kk.FENG_FDG), dtype))
        p = jax.device_put(jnp.asarray(params, dtype), device)
        return np.asarray(jax.jit(lambda q: kk.pet_frames(q, inp, sched))(p), np.float64)

    ref = frames(RATES, jnp.float64, cpu())
    got = frames(RATES, jnp.float32, gpu())
    rel = np.abs(got - ref) / np.max(np.abs(ref), axis=-1, keepdims=True)
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    assert rel.max() <= 1e-4, (
        f"max error {rel.max():.3g} of the curve's largest frame at rate set {worst[0]} "
        f"{RATES[worst[0]]}, frame {worst[1]}; per set: {rel.max(axis=-1)}"
    )


def test_patlak_on_gpu_matches_cpu():
    sched = kk.PAPER_SCHEDULE
    inp = kk.FengInput(kk.FENG_FDG)
    rng = np.random.default_rng(0)
    params = np.column_stack(
        [
            rng.uniform(0, 0.3, 256),
            rng.uniform(0.01, 1.0, 256),
            rng.uniform(0.05, 1.5, 256),
            rng.uniform(0.005, 0.4, 256),
            np.zeros(256),
        ]
    ).astype(np.float32)
    frames = np.asarray(kk.pet_frames(jnp.asarray(params), inp, sched))
    frames = frames * rng.normal(1.0, 0.05, frames.shape).astype(np.float32)
    fit = jax.jit(lambda f: kk.patlak(f, inp, sched, t_star=9.0))
    on_gpu = jax.device_get(fit(jax.device_put(frames, gpu())))
    on_cpu = jax.device_get(fit(jax.device_put(frames, cpu())))
    for g, c in zip(on_gpu, on_cpu, strict=True):
        np.testing.assert_allclose(g, c, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort

    root = tmp_path_factory.mktemp("cohort")
    config = SimulationConfig(size=16, slices=2, noise="image")
    simulate_cohort(root, 4, 0, config, overwrite=True, progress=False)
    return root


def smoke_config(root, **train):
    config = smoke.get_config()
    config.data.root = str(root)
    config.data.batch_size = 2
    config.eval.run_after_training = False
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


def two_steps(config, cohort, batch, device):
    mesh = Mesh(np.array([device]), ("data",))
    graphdef, tx, state = training.create_train_state(config)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = training.make_train_step(graphdef, tx, config, cohort.schedule)
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        sharded = training.shard_batch(batch, NamedSharding(mesh, P("data")))
        state, metrics = step(state, sharded)
        state, metrics = step(state, sharded)
    return jax.device_get((state["params"], metrics))


def test_train_step_on_gpu_matches_cpu(cohort_root):
    config = smoke_config(cohort_root)
    cohort = pipeline.Cohort.from_bids(cohort_root)
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 2, input_points=64))
    params_gpu, metrics_gpu = two_steps(config, cohort, batch, gpu())
    params_cpu, metrics_cpu = two_steps(config, cohort, batch, cpu())
    for a, b in zip(jax.tree.leaves(params_gpu), jax.tree.leaves(params_cpu), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(metrics_gpu["loss"], metrics_cpu["loss"], rtol=1e-4)


def test_train_step_donates_its_state_on_gpu(cohort_root):
    config = smoke_config(cohort_root)
    cohort = pipeline.Cohort.from_bids(cohort_root)
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 2, input_points=64))
    mesh = Mesh(np.array([gpu()]), ("data",))
    graphdef, tx, state = training.create_train_state(config)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    old = jax.tree.leaves(state["params"])
    step = training.make_train_step(graphdef, tx, config, cohort.schedule)
    with jax.set_mesh(mesh):
        new, _ = step(state, training.shard_batch(batch, NamedSharding(mesh, P("data"))))
    jax.block_until_ready(new)
    assert all(leaf.is_deleted() for leaf in old)


def test_smoke_training_runs_on_gpu(cohort_root, tmp_path):
    config = smoke_config(cohort_root, num_steps=10, log_every_steps=5, checkpoint_every_steps=5)
    experiment.train_and_evaluate(config, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["jax"]["platform"] == "gpu"
    assert (tmp_path / "checkpoints").is_dir()
