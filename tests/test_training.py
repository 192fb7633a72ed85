"""Training: the jitted step on 1 vs 2 devices, loss decrease, resume, traces, bad configs."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import smoke
from kinetix import training
from kinetix.data import pipeline


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    from kinetix import simulate
    from kinetix.data.phantom import SimulationConfig

    root = tmp_path_factory.mktemp("cohort")
    simulate.simulate_cohort(
        root,
        4,
        0,
        SimulationConfig(size=16, slices=2, noise="image"),
        overwrite=True,
        progress=False,
    )
    return root


def smoke_config(root, **train):
    config = smoke.get_config()
    config.data.root = str(root)
    config.eval.run_after_training = False
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_step_two_devices_equals_one(cohort_root):
    config = smoke_config(cohort_root)
    cohort = pipeline.Cohort.from_bids(cohort_root)
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 4, input_points=64))
    results = []
    for n in (1, 2):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        graphdef, tx, state = training.create_train_state(config)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        step = training.make_train_step(graphdef, tx, config, cohort.schedule)
        with jax.set_mesh(mesh):
            sharded = training.shard_batch(batch, NamedSharding(mesh, P("data")))
            state, metrics = step(state, sharded)
            state, metrics = step(state, sharded)
        results.append(jax.device_get((state["params"], metrics)))
    chex.assert_trees_all_close(results[0], results[1], rtol=2e-5, atol=1e-6)


def test_loss_falls_on_a_tiny_cohort(cohort_root, tmp_path):
    config = smoke_config(
        cohort_root,
        num_steps=30,
        log_every_steps=5,
        eval_every_steps=100,
        checkpoint_every_steps=100,
    )
    training.train_and_evaluate(config, tmp_path)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:1]), losses


def test_resume_continues_exactly(cohort_root, tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    training.train_and_evaluate(smoke_config(cohort_root, num_steps=6), full)
    training.train_and_evaluate(smoke_config(cohort_root, num_steps=4), part)
    assert (part / "checkpoints").is_dir()
    for name in ("config.json", "provenance.json", "splits.json"):
        assert (part / name).exists()
    training.train_and_evaluate(smoke_config(cohort_root, num_steps=6), part)  # resumes at 4
    m_full = {m["step"]: m for m in read_metrics(full)}
    m_part = {m["step"]: m for m in read_metrics(part)}
    assert sorted(m_part) == [2, 4, 6]
    for key in ("loss", "loss_suv", "loss_patlak", "grad_norm", "param_norm"):
        np.testing.assert_allclose(m_part[6][key], m_full[6][key], rtol=1e-5, err_msg=key)


def test_train_step_traces_once(cohort_root):
    config = smoke_config(cohort_root)
    cohort = pipeline.Cohort.from_bids(cohort_root)
    graphdef, tx, state = training.create_train_state(config)
    step = training.make_train_step(
        graphdef, tx, config, cohort.schedule, wrap=chex.assert_max_traces(n=1)
    )
    mesh = training.make_mesh()
    state = jax.device_put(state, NamedSharding(mesh, P()))
    it = pipeline.slice_dataset(cohort, cohort.subjects, 4, seed=0, input_points=64)
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, _ = step(state, training.shard_batch(next(it), NamedSharding(mesh, P("data"))))
    assert int(state["step"]) == 3


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.widths", (16, 24), "multiples of 16"),
        ("data.batch_size", 3, "multiple of the 4 devices"),
        ("data.expected_frames", 30, "expected_frames is 30"),
        ("model.n_early", 28, "leaves no frame to predict"),
    ],
)
def test_bad_config_gives_one_clear_sentence(cohort_root, tmp_path, field, value, match):
    config = smoke_config(cohort_root)
    section, name = field.split(".")
    setattr(getattr(config, section), name, value)
    with pytest.raises(ValueError, match=match):
        training.train_and_evaluate(config, tmp_path)


def test_empty_data_root_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    config = smoke_config(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no sub-"):
        training.train_and_evaluate(config, tmp_path / "run")


def test_learning_rate_schedule_matches_paper():
    config = smoke.get_config()
    config.optim.learning_rate, config.optim.decay_every = 1e-4, 10_000
    lr = training.learning_rate_schedule(config.optim)
    np.testing.assert_allclose(
        [lr(0), lr(9_999), lr(10_000), lr(25_000), lr(10**6)],
        [1e-4, 1e-4, 1e-5, 1e-6, 1e-7],
        rtol=1e-5,
    )
    assert jnp.isfinite(lr(10**7))
