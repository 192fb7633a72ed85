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
from kinetix import experiment, inference, training
from kinetix.data import pipeline


@pytest.fixture(scope="module")
def cohort_root(tiny_cohort):
    return tiny_cohort


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
    """The sharded step computes the same loss and gradients as the single-device one.

    Plain SGD makes the parameter change −lr·gradient, so comparing changes compares gradients
    (Adam's first steps divide by |g| and amplify reduction-order rounding of near-zero
    gradient components into visible parameter differences; the Adam path itself is covered
    by the resume and multi-process tests).
    """
    import optax

    config = smoke_config(cohort_root)
    cohort = pipeline.Cohort.from_bids(cohort_root)
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 4, input_points=64))
    tx = optax.sgd(1e-3)
    results = []
    for n in (1, 2):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        graphdef, _, state = training.create_train_state(config)
        state = {**state, "opt_state": tx.init(state["params"])}
        initial = jax.device_get(state["params"])
        state = jax.device_put(state, NamedSharding(mesh, P()))
        step = training.make_train_step(graphdef, tx, config, cohort.schedule)
        with jax.set_mesh(mesh):
            sharded = training.shard_batch(batch, NamedSharding(mesh, P("data")))
            state, first = step(state, sharded)
            state, second = step(state, sharded)
        change = jax.tree.map(lambda a, b: a - b, jax.device_get(state["params"]), initial)
        results.append((change, jax.device_get((first, second))))
    (change1, metrics1), (change2, metrics2) = results
    chex.assert_trees_all_close(metrics1, metrics2, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(change1), jax.tree.leaves(change2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_loss_falls_on_a_tiny_cohort(cohort_root, tmp_path):
    config = smoke_config(
        cohort_root,
        num_steps=30,
        log_every_steps=5,
        eval_every_steps=100,
        checkpoint_every_steps=100,
    )
    experiment.train_and_evaluate(config, tmp_path)
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:1]), losses


def test_resume_continues_exactly_and_refuses_another_model(cohort_root, tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    experiment.train_and_evaluate(smoke_config(cohort_root, num_steps=6), full)
    experiment.train_and_evaluate(smoke_config(cohort_root, num_steps=4), part)
    assert (part / "checkpoints").is_dir()
    for name in ("config.json", "provenance.json", "splits.json"):
        assert (part / name).exists()
    experiment.train_and_evaluate(smoke_config(cohort_root, num_steps=6), part)  # resumes at 4
    m_full = {m["step"]: m for m in read_metrics(full)}
    m_part = {m["step"]: m for m in read_metrics(part)}
    assert sorted(m_part) == [2, 4, 6]
    for key in ("loss", "loss_suv", "loss_patlak", "grad_norm", "param_norm"):
        np.testing.assert_allclose(m_part[6][key], m_full[6][key], rtol=1e-5, err_msg=key)

    # A rerun with another model is refused before anything in the workdir changes: by the
    # run's config.json, and without it by the checkpoint's shapes.
    saved = {n: (part / n).read_bytes() for n in ("config.json", "provenance.json")}
    other = smoke_config(cohort_root, num_steps=8)
    other.model.head_hidden = (32,)
    with pytest.raises(ValueError, match=r"other settings \(model.head_hidden \[16\] → \[32\]"):
        experiment.train_and_evaluate(other, part)
    assert {n: (part / n).read_bytes() for n in saved} == saved
    (part / "config.json").unlink()
    with pytest.raises(ValueError, match="does not match this model/config"):
        experiment.train_and_evaluate(other, part)


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


def test_saturation_guard_adds_its_weighted_penalty_to_the_training_loss(cohort_root):
    """With loss.saturation_weight = w the step's loss is the evaluation objective plus
    w · the logged penalty on the head's pre-activations (margin 1: nonzero at init)."""
    config = smoke_config(cohort_root)
    config.loss.saturation_weight = 0.5
    config.loss.saturation_margin = 1.0
    cohort = pipeline.Cohort.from_bids(cohort_root)
    graphdef, tx, state = training.create_train_state(config)
    params0 = jax.tree.map(jnp.copy, state["params"])
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 4, input_points=64))
    _, metrics = training.make_train_step(graphdef, tx, config, cohort.schedule)(state, batch)
    _, _, objective = training.make_eval_step(graphdef, config, cohort.schedule)(params0, batch)
    assert float(metrics["loss_saturation"]) > 1e-3
    np.testing.assert_allclose(
        metrics["loss"], objective + 0.5 * metrics["loss_saturation"], rtol=1e-5
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.widths", (16, 24), "multiples of 16"),
        ("data.batch_size", 3, "multiple of the 4 devices"),
        ("data.expected_frames", 30, "expected_frames is 30"),
        ("model.n_early", 28, "leaves no frame to predict"),
        ("model.input_norm", "suv", "input_norm must be 'none' or 'plasma', got 'suv'"),
        ("model.curve_frames", 22, "curve_frames must be 0 .the paper. or the schedule's 28"),
    ],
)
def test_bad_config_gives_one_clear_sentence(cohort_root, tmp_path, field, value, match):
    config = smoke_config(cohort_root)
    section, name = field.split(".")
    setattr(getattr(config, section), name, value)
    with pytest.raises(ValueError, match=match):
        experiment.train_and_evaluate(config, tmp_path)


def _fresh_eval_setup(config, cohort_root):
    """(cohort, freshly initialised params, eval_step, data sharding) for `evaluate_loss`."""
    cohort = pipeline.Cohort.from_bids(cohort_root)
    graphdef, _, state = training.create_train_state(config)
    eval_step = training.make_eval_step(graphdef, config, cohort.schedule)
    return cohort, state["params"], eval_step, NamedSharding(training.make_mesh(), P("data"))


def test_validation_loss_is_the_mean_over_every_body_voxel(cohort_root):
    """`evaluate_loss` over batches of 4 equals the objective of one batch holding every slice
    (a direct mean over all body voxels), whatever the batch size; the old slice-count weighting
    of the batch means would differ where slices hold different numbers of body voxels."""
    config = smoke_config(cohort_root)
    cohort, params, eval_step, sharding = _fresh_eval_setup(config, cohort_root)
    subjects = cohort.subjects
    n = len(cohort.records(subjects))
    whole = -(-n // 4) * 4  # every slice in one batch, padded to a multiple of the 4 devices
    batch = next(pipeline.eval_batches(cohort, subjects, whole, input_points=64))
    _, _, want = eval_step(params, training.shard_batch(batch, sharding))
    # The old weighting (batch means weighted by real slices) misses it by far more than rtol,
    # so this test tells the two apart.
    means, slices = [], []
    for b in pipeline.eval_batches(cohort, subjects, 4, input_points=64):
        means.append(float(eval_step(params, training.shard_batch(b, sharding))[2]))
        slices.append(float(np.sum(b["valid"])))
    assert len(means) > 1
    assert abs(np.average(means, weights=slices) / float(want) - 1) > 1e-4
    for b in (4, 8):
        config.train.eval_batch_size = b
        got = training.evaluate_loss(eval_step, params, cohort, subjects, config, sharding)
        np.testing.assert_allclose(got, float(want), rtol=2e-6, err_msg=f"batch {b}")


def test_validation_loss_without_body_voxels_is_an_error(cohort_root):
    """A threshold no voxel reaches leaves nothing to validate on: one clear error, not NaN."""
    config = smoke_config(cohort_root)
    config.data.mask_threshold = 1e9
    cohort, params, eval_step, sharding = _fresh_eval_setup(config, cohort_root)
    with pytest.raises(ValueError, match="have no body voxels .mask threshold 1000000000"):
        training.evaluate_loss(eval_step, params, cohort, cohort.subjects[:1], config, sharding)


def test_init_trials_keep_the_lowest_validation_loss_and_resume(cohort_root, tmp_path):
    """Trial 0 is the plain run; the winner has the lowest val loss and is what was saved."""
    plain = smoke_config(cohort_root, num_steps=2, eval_every_steps=2)
    experiment.train_and_evaluate(plain, tmp_path / "plain")
    plain_val = read_metrics(tmp_path / "plain")[-1]["val_loss"]

    config = smoke_config(cohort_root, num_steps=2, init_trials=2, init_trial_steps=2)
    experiment.train_and_evaluate(config, tmp_path / "trials")
    path = tmp_path / "trials" / "init_trials.json"
    trials = json.loads(path.read_text())
    vals = [t["val_loss"] for t in trials]
    assert [t["init_seed"] for t in trials] == [config.seed, config.seed + 1]
    assert vals[0] != vals[1]  # another seed is another initialisation
    np.testing.assert_allclose(vals[0], plain_val, rtol=1e-6)
    assert [t["chosen"] for t in trials] == [v == min(vals) for v in vals]

    # The checkpoint holds the winner: its validation loss is the chosen trial's.
    cohort = pipeline.Cohort.from_bids(cohort_root)
    graphdef, params = inference.restore_params(config, tmp_path / "trials")
    eval_step = training.make_eval_step(graphdef, config, cohort.schedule)
    mesh = training.make_mesh()
    val_subjects = training.split_cohort(config, cohort)["val"]
    got = training.evaluate_loss(
        eval_step, params, cohort, val_subjects, config, NamedSharding(mesh, P("data"))
    )
    np.testing.assert_allclose(got, min(vals), rtol=1e-6)

    # Training on resumes from the winner's checkpoint without repeating the trials.
    written = path.stat().st_mtime_ns
    experiment.train_and_evaluate(
        smoke_config(cohort_root, num_steps=4, init_trials=2, init_trial_steps=2),
        tmp_path / "trials",
    )
    assert path.stat().st_mtime_ns == written
    assert [m["step"] for m in read_metrics(tmp_path / "trials")] == [4]


@pytest.mark.parametrize(
    "train, match",
    [
        ({"init_trials": 0}, "init_trials must be an integer >= 1, got 0"),
        ({"init_trials": 2, "init_trial_steps": 5}, "init_trial_steps must be an integer from 1"),
    ],
)
def test_bad_init_trials_are_clear_errors(cohort_root, tmp_path, train, match):
    with pytest.raises(ValueError, match=match):
        experiment.train_and_evaluate(smoke_config(cohort_root, **train), tmp_path)


def test_init_trials_need_validation_subjects(cohort_root, tmp_path):
    config = smoke_config(cohort_root, init_trials=2, init_trial_steps=2)
    config.data.val_fraction = 0.0
    with pytest.raises(ValueError, match="has no validation subjects"):
        experiment.train_and_evaluate(config, tmp_path)


def test_empty_data_root_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    config = smoke_config(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no sub-"):
        experiment.train_and_evaluate(config, tmp_path / "run")


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


@pytest.mark.parametrize(
    ("requested", "batch", "cores", "expected"),
    [(0, 2, 2, 0), (-1, 2, 2, 2), (-1, 4, 2, 2), (-1, 3, 2, 0), (-1, 2, 16, 0), (-1, 4, 1, 0),
     (3, 2, 2, 3)],
)  # fmt: skip
def test_host_device_plan(requested, batch, cores, expected):
    assert training.host_device_plan(requested, batch, cores) == expected


def test_host_device_plan_rejects_bad_values():
    with pytest.raises(ValueError, match="cpu_devices"):
        training.host_device_plan(-2, 2, 2)


def test_configure_host_devices_after_backend_start_is_a_clear_error(monkeypatch):
    jax.devices()  # this process's backends exist
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    config = smoke.get_config()
    config.train.cpu_devices = 2
    with pytest.raises(RuntimeError, match="before JAX starts its backends"):
        training.configure_host_devices(config)


def test_configure_host_devices_in_a_fresh_process():
    """Before the backends start, cpu_devices = 2 gives two single-threaded CPU devices."""
    import os
    import subprocess
    import sys

    from _cli import REPO

    code = (
        "import os, jax\n"
        "from configs import smoke\n"
        "from kinetix import training\n"
        "c = smoke.get_config(); c.train.cpu_devices = 2\n"
        "print(training.configure_host_devices(c), jax.device_count(), os.environ['XLA_FLAGS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    n, count, flags = out.stdout.split(maxsplit=2)
    assert (n, count) == ("2", "2")
    assert "--xla_cpu_multi_thread_eigen=false" in flags


@pytest.mark.parametrize(
    ("kind", "curve"), [("kinetic", False), ("direct", False), ("kinetic", True)]
)
def test_plasma_input_norm_makes_predictions_scale_equivariant(cohort_root, kind, curve):
    """model.input_norm = 'plasma': scaling a subject's input function and frames by a (a
    different dose or clearance) leaves the kinetic model's parameters unchanged and scales
    every predicted frame by a; without it the network sees a different input. The scale is
    the mean plasma over the input window (hand value on a ramp). The head's curve inputs
    (model.curve_frames) are divided by the same scale, so this holds with them too."""
    import kinetix.kinetics as kk

    config = smoke_config(cohort_root)
    config.model.kind = kind
    if curve:
        config.model.curve_frames = 28
    cohort = pipeline.Cohort.from_bids(cohort_root)
    batch = next(pipeline.eval_batches(cohort, cohort.subjects, 4, input_points=64))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, _, state = training.create_train_state(config)
    n_early = config.model.n_early

    def predict(b, norm):
        # Batched inputs are built inside jit, as in the train and eval steps.
        config.model.input_norm = norm

        def run(b):
            inp, blood = training.batch_inputs(b, True)
            early = b["frames"][..., :n_early]
            return training.predict_frames(
                graphdef, state["params"], early, inp, blood, config, cohort.schedule
            )

        return jax.jit(run)(b)

    a = 1.7
    scaled = {**batch, **{k: batch[k] * a for k in ("frames", "plasma", "whole_blood")}}
    pred, params = predict(batch, "plasma")
    pred_a, params_a = predict(scaled, "plasma")
    np.testing.assert_allclose(pred_a, a * pred, rtol=2e-5, atol=1e-6 * float(jnp.max(pred)))
    if kind == "kinetic":
        np.testing.assert_allclose(params_a, params, rtol=2e-5, atol=1e-7)
        raw, _ = predict(batch, "none")
        raw_a, _ = predict(scaled, "none")
        assert float(jnp.max(jnp.abs(raw_a - a * raw))) > 1e-3 * float(jnp.max(raw))
    # Ramp 0 → 2 SUV over 0–10 min, held after: mean over 0–35 min = (10 + 50) / 35.
    ramp = jax.jit(lambda t, v: training.plasma_scale(kk.SampledInput(t, v), 35.0))
    got = ramp(jnp.array([[0.0, 10.0]]), jnp.array([[0.0, 2.0]]))
    np.testing.assert_allclose(got, [60.0 / 35.0], rtol=1e-6)


def test_curve_features_are_frame_means_of_the_plasma_input():
    """Hand values: a ramp 0 → 2 SUV over 0–10 min, held at 2 after, has ∫0^t = t²/10 up to
    10 min and 10 + 2 (t − 10) after; the frame mean is the difference over the duration."""
    import kinetix.kinetics as kk

    schedule = kk.PAPER_SCHEDULE
    start, end = np.asarray(schedule.start, float), np.asarray(schedule.end, float)

    def integral(t):
        return np.where(t <= 10.0, t**2 / 10.0, 10.0 + 2.0 * (t - 10.0))

    want = (integral(end) - integral(start)) / (end - start)
    f = jax.jit(lambda t, v, s: training.curve_features(kk.SampledInput(t, v), schedule, s))
    t, v = jnp.array([[0.0, 10.0]] * 2), jnp.array([[0.0, 2.0], [0.0, 6.0]])
    got = np.asarray(f(t, v, jnp.array([1.0, 3.0])))
    assert got.shape == (2, schedule.n_frames)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-6)  # 3× curve ÷ 3
    raw = jax.jit(lambda t, v: training.curve_features(kk.SampledInput(t, v), schedule))(t, v)
    np.testing.assert_allclose(raw[1], 3.0 * want, rtol=1e-5, atol=1e-6)


def test_split_seed_separates_the_subject_split_from_the_init_seed():
    """data.split_seed < 0 (default) splits with config.seed; otherwise it alone decides."""
    import types

    cohort = types.SimpleNamespace(subjects=[f"sub-{i:02d}" for i in range(24)])
    config = smoke.get_config()
    config.data.val_fraction, config.data.test_fraction = 1 / 12, 1 / 6

    def split(seed, split_seed):
        config.seed, config.data.split_seed = seed, split_seed
        return training.split_cohort(config, cohort)

    assert split(3, -1) == pipeline.split_subjects(
        cohort.subjects, val_fraction=1 / 12, test_fraction=1 / 6, seed=3
    )
    assert split(3, 5) == split(5, -1) == split(0, 5)
    assert split(3, 5)["test"] != split(3, -1)["test"]


def test_former_training_names_still_import():
    """Users' code written against the former single module `kinetix.training` keeps working:
    the names that moved to the layers above are the same objects there."""
    from kinetix import experiment, inference

    assert training.train_and_evaluate is experiment.train_and_evaluate
    for name in ("load_for_inference", "restore_params", "make_predict_fn", "checkpoint_steps"):
        assert getattr(training, name) is getattr(inference, name)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        training.nonexistent  # noqa: B018


def test_zero_steps_without_a_checkpoint_is_refused_and_writes_nothing(tmp_path):
    """num_steps = 0 re-evaluates a trained run; on a fresh workdir there is nothing to do."""
    config = smoke.get_config()
    config.train.num_steps = 0
    workdir = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"num_steps = 0 and .*fresh holds no checkpoint"):
        experiment.train_and_evaluate(config, workdir)
    assert not workdir.exists()
