"""Shared by the benchmark scripts: load a config file the way `--config configs/X.py` names it."""

import importlib.util


def load_config(path):
    """`get_config()` of the config module at ``path`` (e.g. configs/demo.py)."""
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()
