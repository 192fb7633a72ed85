"""Tests for kinetix.training.checkpoint (Orbax + grain state) and kinetix.training.provenance."""

import json
import shlex

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from kinetix.training import checkpoint, provenance


def _state(scale=1.0):
    """A train-state-like pytree: one leaf sharded over a 4-device 'data' mesh, others replicated."""
    mesh = jax.make_mesh((4,), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    return {
        "params": {
            "w": jax.device_put(scale * jnp.arange(24.0).reshape(8, 3), sharded),
            "b": jax.device_put(scale * jnp.ones(3), repl),
        },
        "step": jax.device_put(jnp.int32(7), repl),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(3)), repl),
    }


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _iterator():
    ds = grain.MapDataset.range(10).shuffle(seed=5).batch(2, drop_remainder=True).repeat(None)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def test_round_trip_with_sharding_and_data(tmp_path):
    assert len(jax.devices()) == 4
    state = _state()
    it = _iterator()
    [next(it) for _ in range(3)]
    ckpt = checkpoint.Checkpointer(tmp_path / "ck", save_interval_steps=5)
    try:
        assert ckpt.restore_latest(_abstract(state)) is None  # empty directory
        assert ckpt.save(5, state, it)
        expected = [next(it) for _ in range(7)]  # the uninterrupted run (crosses an epoch)
    finally:
        ckpt.close()

    with checkpoint.Checkpointer(tmp_path / "ck", save_interval_steps=5) as ckpt:
        it2 = _iterator()  # a fresh pipeline, as after a restart
        target = _abstract(_state(0.0))
        step, restored = ckpt.restore_latest(target, data_iterator=it2)
    assert step == 5
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
    assert restored["params"]["w"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.stack([next(it2) for _ in range(7)]), np.stack(expected))


def test_interval_keep_and_forced_final_step(tmp_path):
    state = _state()
    it = _iterator()
    ckpt = checkpoint.Checkpointer(tmp_path, save_interval_steps=2, keep=2, async_save=False)
    try:
        saved = [s for s in range(1, 10) if ckpt.save(s, state, it)]
        assert saved == [1, 2, 4, 6, 8]  # Orbax also saves the first step of a fresh run
        assert ckpt.all_steps() == [6, 8]  # LatestN(2)
        assert ckpt.save(9, state, it, force=True)  # the final step
        assert ckpt.save(9, state, it, force=True) is False  # never overwritten
        assert ckpt.latest_step() == 9 and ckpt.all_steps() == [8, 9]
        assert ckpt.reached_preemption(9) is False
    finally:
        ckpt.close()


def test_keep_steps_are_kept_saved_off_interval_and_restored_by_step(tmp_path):
    """keep_steps: written even off the interval, never deleted by LatestN, restorable by step."""
    it = _iterator()
    ckpt = checkpoint.Checkpointer(
        tmp_path, save_interval_steps=4, keep=1, keep_steps=(3, 8), async_save=False
    )
    try:
        saved = [s for s in range(1, 14) if ckpt.save(s, _state(float(s)), it)]
        assert saved == [1, 3, 4, 8, 12]  # 1: Orbax's first save; 3: kept, off the interval
        assert ckpt.all_steps() == [3, 8, 12]  # LatestN(1) plus the kept steps
        assert ckpt.should_save(3) and not ckpt.should_save(5)
        target = _abstract(_state(0.0))
        for step in (3, 8):
            restored = ckpt.restore(step, target)
            np.testing.assert_array_equal(restored["params"]["b"], np.full(3, float(step)))
        assert ckpt.restore_latest(target)[0] == 12
        with pytest.raises(ValueError, match=r"no checkpoint at step 4; it has 3, 8, 12\."):
            ckpt.restore(4, target)
    finally:
        ckpt.close()
    with pytest.raises(ValueError, match="keep_steps must be positive integers"):
        checkpoint.Checkpointer(tmp_path, save_interval_steps=1, keep_steps=(0,))


def test_state_only_and_errors(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, with_data=False) as ckpt:
        with pytest.raises(ValueError, match="with_data=False"):
            ckpt.save(1, state, _iterator())
        assert ckpt.save(1, state)
        ckpt.wait()
        step, restored = ckpt.restore_latest(state)  # concrete arrays work as a target
        assert step == 1
        np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore_latest(state, data_iterator=_iterator())
        other = dict(state, params={"w": jnp.zeros((4, 3)), "b": state["params"]["b"]})
        with pytest.raises(ValueError, match=r"\['params'\]\['w'\] has shape \(8, 3\)"):
            ckpt.restore_latest(other)
        with pytest.raises(ValueError, match=r"has no \['extra'\]"):
            ckpt.restore_latest(dict(state, extra=jnp.zeros(2)))
    with checkpoint.Checkpointer(tmp_path / "d", save_interval_steps=1) as ckpt:
        with pytest.raises(ValueError, match="needs data_iterator"):
            ckpt.save(1, state)
    with pytest.raises(ValueError, match="save_interval_steps"):
        checkpoint.Checkpointer(tmp_path, save_interval_steps=0)


def test_async_errors_are_raised(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(1, _state(), _iterator())

    def failed():
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt._manager, "check_for_errors", failed)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(2, _state(), _iterator())
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.close()  # close surfaces it too (and still releases Orbax's threads)


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------
def _config():
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.data = ml_collections.ConfigDict({"root": "data/bids", "batch_size": 8})
    c.optim = ml_collections.ConfigDict({"lr": 1e-3, "betas": (0.9, 0.99), "clip": True})
    return c


def test_collect_and_write(tmp_path):
    config = _config()
    argv = ["kinetix/train.py", "--config", "configs/demo.py", "--config.seed=42"]
    prov = provenance.write(
        tmp_path / "run", config, argv=argv, overrides={"seed": 42}, extra={"note": "test"}
    )
    on_disk = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert on_disk == prov
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config.to_dict() | {
        "optim": {"lr": 1e-3, "betas": [0.9, 0.99], "clip": True}
    }
    for key in (
        "time_utc",
        "hostname",
        "argv",
        "git",
        "python",
        "packages",
        "jax",
        "environment",
        "jax_environment_info",
        "seed",
        "config",
        "overrides",
        "command",
    ):
        assert key in prov, key  # fmt: skip
    assert prov["seed"] == 42 and prov["argv"] == argv and prov["extra"] == {"note": "test"}
    assert prov["config_file"] == "configs/demo.py" and prov["workdir"] == str(tmp_path / "run")
    assert prov["jax"]["device_count"] == 4 and prov["jax"]["process_count"] == 1
    assert prov["jax"]["platform"] == "cpu"
    assert "--xla_force_host_platform_device_count=4" in prov["environment"]["XLA_FLAGS"]
    assert prov["packages"]["jax"] == jax.__version__
    assert prov["packages"]["orbax-checkpoint"] is not None
    git = prov["git"]
    assert git["sha"] is None or (len(git["sha"]) == 40 and isinstance(git["dirty"], bool))


def test_command_line_round_trip(tmp_path):
    cfg_file = tmp_path / "my config.py"  # a space: shell quoting matters
    cfg_file.write_text(
        "import ml_collections\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = 0\n"
        "    c.data = ml_collections.ConfigDict({'root': 'x', 'batch_size': 8})\n"
        "    c.optim = ml_collections.ConfigDict({'lr': 1e-3, 'betas': (0.9, 0.99), 'clip': True})\n"
        "    return c\n"
    )
    overrides = {
        "seed": 3,
        "data.root": "/data/my bids",
        "optim.lr": 2.5e-4,
        "optim.betas": (0.8, 0.9),
        "optim.clip": False,
    }
    prov = provenance.collect(
        _config(), argv=["train.py"], overrides=overrides, config_file=str(cfg_file),
        workdir="runs/a b",
    )  # fmt: skip
    cmd = provenance.command_line(json.loads(json.dumps(prov)))  # as read back from JSON
    assert cmd == prov["command"]
    words = shlex.split(cmd)
    assert words[:3] == ["python", "-m", "kinetix.train"]
    # Parse the rebuilt flags the way kinetix.train will (ml_collections config flags).
    argv = ["train", *words[3:]]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
    fv(argv)
    assert fv.workdir == "runs/a b"
    assert config_flags.get_config_filename(fv["config"]) == str(cfg_file)
    assert config_flags.get_override_values(fv["config"]) == overrides
    assert fv.config.optim.betas == (0.8, 0.9) and fv.config.optim.clip is False
    # Without a recorded config file, argv is replayed.
    assert provenance.command_line({"argv": ["x.py", "--config=c.py"]}) == (
        "python -m kinetix.train --config=c.py"
    )
    with pytest.raises(ValueError, match="neither"):
        provenance.command_line({})
