"""Every file in configs/ loads, uses only keys that configs/default.py defines (a misspelt
override would otherwise add a new key that nothing reads), and passes the trainer's checks on
the paper's 28-frame schedule at its own slice size, on one device (the paper's batch of 1
needs no more; the tests' four fake devices are not a setting any config targets)."""

import importlib
import pathlib

import pytest

import kinetix.kinetics as kk
from kinetix import training

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def _keys(config, prefix=""):
    out = set()
    for k, v in config.items():
        if hasattr(v, "items"):
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_is_listed():
    assert {"default", "demo", "demo_long", "paper", "smoke"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_keys_and_checks(name, monkeypatch):
    for fn in ("device_count", "local_device_count", "process_count"):
        monkeypatch.setattr(training.jax, fn, lambda: 1)
    config = _load(name)
    extra = _keys(config) - _keys(_load("default"))
    assert not extra, f"configs/{name}.py sets keys that configs/default.py lacks: {extra}"
    size = config.data.sim_size
    training.validate_config(config, kk.PAPER_SCHEDULE, (size, size))


def test_demo_long_is_the_demo_with_a_longer_schedule():
    demo, long = _load("demo").to_dict(), _load("demo_long").to_dict()
    changed = {
        f"{g}.{k}"
        for g in demo
        if isinstance(demo[g], dict)
        for k in demo[g]
        if demo[g][k] != long[g][k]
    } | {g for g in demo if not isinstance(demo[g], dict) and demo[g] != long[g]}
    assert changed == {
        "name",
        "train.num_steps",
        "optim.decay_every",
        "train.eval_every_steps",
    }
    assert (long["train"]["num_steps"], long["optim"]["decay_every"]) == (9600, 6400)
