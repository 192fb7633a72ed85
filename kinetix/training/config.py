"""Training configuration: the checks a config must pass, and configs of earlier runs.

Every value has one source, `configs/default.py`; the code reads ``config.section.field`` and
never restates a default. `load_config` fills the keys an older run's ``config.json`` lacks from
that default, so runs written before a key existed still load.
"""

import importlib.util
import json
import math
import pathlib

import jax
import ml_collections

import kinetix.kinetics as kk
from kinetix import models


def validate_config(config: ml_collections.ConfigDict, schedule: kk.FrameSchedule, shape) -> None:
    """One clear sentence for configurations that cannot work with these data or devices."""
    n_dev = jax.device_count()
    bs = config.data.batch_size
    if bs < 1 or bs % n_dev:
        raise ValueError(
            f"config.data.batch_size = {bs} must be a positive multiple of the {n_dev} devices."
        )
    if bs % jax.process_count():
        raise ValueError(f"config.data.batch_size = {bs} must divide by the process count.")
    ebs, n_local = config.train.eval_batch_size, jax.local_device_count()
    if ebs < 1 or ebs % n_local:
        raise ValueError(
            f"config.train.eval_batch_size = {ebs} must be a positive multiple of the {n_local} "
            "devices of this process."
        )
    bad = [w for w in config.model.widths if w <= 0 or w % 16]
    if bad:
        raise ValueError(f"config.model.widths must be positive multiples of 16, got {bad}.")
    expected = config.data.expected_frames
    if expected and schedule.n_frames != expected:
        raise ValueError(
            f"The data have {schedule.n_frames} frames but config.data.expected_frames is "
            f"{expected}."
        )
    if config.model.n_early >= schedule.n_frames:
        raise ValueError(
            f"config.model.n_early = {config.model.n_early} leaves no frame to predict in a "
            f"{schedule.n_frames}-frame schedule."
        )
    multiple = 2 ** (len(config.model.widths) - 1)
    if shape[0] % multiple or shape[1] % multiple:
        raise ValueError(
            f"Slices of {shape[0]}×{shape[1]} do not divide by {multiple}, the U-Net's size "
            f"multiple for {len(config.model.widths)} levels."
        )
    if config.loss.kind not in ("paper", "paper_faithful"):
        raise ValueError(
            f"config.loss.kind must be 'paper' or 'paper_faithful', got {config.loss.kind!r}."
        )
    if config.loss.patlak_slope not in ("reference", "prediction"):
        raise ValueError("config.loss.patlak_slope must be 'reference' or 'prediction'.")
    if config.loss.patlak_frames not in ("model", "splice"):
        raise ValueError("config.loss.patlak_frames must be 'model' or 'splice'.")
    if config.model.input_norm not in ("none", "plasma"):
        raise ValueError(
            f"config.model.input_norm must be 'none' or 'plasma', got {config.model.input_norm!r}."
        )
    curve_frames = config.model.curve_frames
    if curve_frames not in (0, schedule.n_frames):
        raise ValueError(
            f"config.model.curve_frames must be 0 (the paper) or the schedule's "
            f"{schedule.n_frames} frames (the head sees the plasma input's mean over each "
            f"frame), got {curve_frames!r}."
        )
    early_weight = config.loss.early_weight
    if not (isinstance(early_weight, (int, float)) and math.isfinite(early_weight)) or (
        early_weight < 0
    ):
        raise ValueError(
            f"config.loss.early_weight must be a finite number >= 0, got {early_weight!r}."
        )
    early_steps = config.loss.early_weight_steps
    if not isinstance(early_steps, int) or early_steps < 0:
        raise ValueError(
            f"config.loss.early_weight_steps must be an integer >= 0, got {early_steps!r}."
        )
    sat_weight = config.loss.saturation_weight
    sat_margin = config.loss.saturation_margin
    for name, value in (("saturation_weight", sat_weight), ("saturation_margin", sat_margin)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)) or value < 0:
            raise ValueError(f"config.loss.{name} must be a finite number >= 0, got {value!r}.")
    if sat_weight > 0 and (
        config.model.kind != "kinetic" or config.model.activation not in models.BOUNDED_ACTIVATIONS
    ):
        raise ValueError(
            "config.loss.saturation_weight > 0 guards the scaled sigmoids of the kinetic model's "
            f"head; it does not apply to model.kind = {config.model.kind!r} with activation "
            f"{config.model.activation!r}."
        )
    trials = config.train.init_trials
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"config.train.init_trials must be an integer >= 1, got {trials!r}.")
    trial_steps, num_steps = config.train.init_trial_steps, config.train.num_steps
    if trials > 1 and (not isinstance(trial_steps, int) or not 1 <= trial_steps <= num_steps):
        raise ValueError(
            f"config.train.init_trial_steps must be an integer from 1 to num_steps = {num_steps} "
            f"when init_trials > 1, got {trial_steps!r}."
        )
    if config.optim.name not in ("adam", "rmsprop"):
        raise ValueError(
            f"config.optim.name must be 'adam' or 'rmsprop', got {config.optim.name!r}."
        )


DEFAULT_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "default.py"
"""`configs/default.py` of the source tree kinetix runs from: the one source of every default."""


def config_file_module(path):
    """A ``configs/*.py`` file loaded by path as a module (it defines ``get_config()``).

    Loading by path, not by import, works from any working directory and never picks up another
    package named ``configs`` on the user's path.

    Raises:
      FileNotFoundError: no such file.
    """
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"The config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_kinetix_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling_config(config_file, name: str):
    """The config module ``name`` in the directory of ``config_file``: how a derived config
    imports its parent (``default = sibling_config(__file__, "default")``), the same way from
    any working directory."""
    return config_file_module(pathlib.Path(config_file).resolve().with_name(f"{name}.py"))


def default_config(path=DEFAULT_CONFIG_FILE) -> ml_collections.ConfigDict:
    """`get_config()` of `configs/default.py` (loaded by path, so from any working directory).

    Raises:
      FileNotFoundError: the file is not there (kinetix installed without its configs/).
    """
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(
            f"{path} does not exist: kinetix needs its configs/ directory beside the package "
            "(install it from a source checkout with `pip install -e .`)."
        )
    return config_file_module(path).get_config()


def fill_defaults(values: dict, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`values` (a nested dict) with every key it lacks taken from `defaults`, recursively.

    Keys that `values` has and `defaults` lacks are kept (a run's own additions).
    """
    merged = defaults.to_dict()

    def merge(into, new):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(merged, values)
    return ml_collections.ConfigDict(merged)


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run was trained with (``workdir/config.json``), with the keys it lacks (runs
    written before those keys existed) filled from `default_config`.

    Raises:
      FileNotFoundError: workdir has no config.json.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a kinetix training workdir?")
    return fill_defaults(json.loads(path.read_text()), default_config())
