"""Every file in configs/ loads, uses only keys that configs/default.py defines (a misspelt
override would otherwise add a new key that nothing reads), and passes the trainer's checks on
the paper's 28-frame schedule at its own slice size, on one device (the paper's batch of 1
needs no more; the tests' four fake devices are not a setting any config targets)."""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

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


def test_configs_load_by_path_from_any_directory(tmp_path):
    """`--config /abs/path/configs/X.py` works from another working directory, even one with a
    `configs` package of its own (a derived config loads its parent by path, not by import)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("raise ImportError('not kinetix configs')\n")
    code = (
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "for path in sys.argv[1:]:\n"
        "    fv = flags.FlagValues()\n"
        "    argv = ['x', '--config', path, '--config.seed=7']\n"
        "    config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)\n"
        "    fv(argv)\n"
        "    print(fv.config.name, fv.config.seed, fv.config.train.num_steps)\n"
    )
    paths = [str(ROOT / "configs" / f"{name}.py") for name in NAMES]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code, *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    expected = [f"{c.name} 7 {c.train.num_steps}" for c in map(_load, NAMES)]
    assert out.stdout.split("\n")[:-1] == expected
