"""Every file in configs/ loads, uses only keys that configs/default.py defines (a misspelt
override would otherwise add a new key that nothing reads), and passes the trainer's checks on
the paper's 28-frame schedule at its own slice size, on one device (the paper's batch of 1
needs no more; the tests' four fake devices are not a setting any config targets)."""

import importlib
import json
import pathlib
import re

import jax
import pytest

import kinetix.kinetics as kk
from kinetix import training

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def _flat(config, prefix=""):
    """{"group.key": value} of a (nested) ConfigDict."""
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_every_config_is_listed():
    assert {"default", "demo", "demo_long", "paper", "smoke"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_keys_and_checks(name, monkeypatch):
    for fn in ("device_count", "local_device_count", "process_count"):
        monkeypatch.setattr(jax, fn, lambda: 1)
    config = _load(name)
    extra = _flat(config).keys() - _flat(_load("default")).keys()
    assert not extra, f"configs/{name}.py sets keys that configs/default.py lacks: {extra}"
    size = config.data.sim_size
    training.validate_config(config, kk.PAPER_SCHEDULE, (size, size))


def test_demo_long_is_the_demo_with_a_longer_schedule():
    demo, long = _flat(_load("demo")), _flat(_load("demo_long"))
    assert demo.keys() == long.keys()
    changed = {k for k in demo if demo[k] != long[k]}
    assert changed == {
        "name",
        "train.num_steps",
        "optim.decay_every",
        "train.eval_every_steps",
    }
    assert (long["train.num_steps"], long["optim.decay_every"]) == (9600, 6400)


def test_default_config_is_configs_default():
    """kinetix's runtime defaults are configs/default.py itself, loaded by path."""
    assert _flat(training.default_config()) == _flat(_load("default"))


def test_an_older_runs_config_json_loads_with_defaults_filled(tmp_path):
    """config.json of a run written before some keys existed: the missing keys come from
    configs/default.py, the run's own values (including keys default.py lacks) are kept."""
    values = _load("smoke").to_dict()
    del values["loss"]["early_weight"], values["model"]["curve_frames"], values["eval"]
    values["model"]["widths"] = [16, 32]  # JSON turns tuples into lists
    values["retired_section"] = {"old_key": 1}
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = training.load_config(tmp_path)
    default = _load("default")
    assert loaded.loss.early_weight == default.loss.early_weight
    assert loaded.model.curve_frames == default.model.curve_frames
    assert _flat(loaded.eval) == _flat(default.eval)
    assert list(loaded.model.widths) == [16, 32] and loaded.name == "smoke"
    assert loaded.retired_section.old_key == 1
    assert _flat(default).keys() <= _flat(loaded).keys()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        training.load_config(tmp_path / "nothing")


def test_code_reads_no_config_default_of_its_own():
    """No `config.<section>.get(key, default)` in the package: defaults live in configs/ only."""
    pattern = re.compile(r"config\.\w+\.get\(")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "kinetix").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders
