"""Safe reruns: a workdir is one run, and a rerun may change only what resuming allows.

Rerunning ``python -m kinetix.train`` on a workdir resumes it. Settings that change the data, the
subject split or what the network means (the seed, the model, the kinetics, the loss, the data
and simulation settings, ...) are fixed by the run: a rerun that changes any of them is refused
before anything is written, with the differing keys named. The settings in `RESUMABLE` may
change: how long to train, logging, checkpointing, evaluation, data loading, and the two
optimiser settings a divergence calls for (learning rate, gradient clipping).

`checkpoint_settings` is the part of a config that a checkpoint needs to be used correctly
(the model, the kinetics, the network-input settings): every checkpoint records it, and
inference refuses a ``config.json`` that disagrees with it (`settings_differences`).
"""

import json
from collections.abc import Mapping

import ml_collections

RESUMABLE = (
    "name",
    "train.num_steps",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.keep_checkpoint_steps",
    "train.eval_batch_size",
    "train.multiprocess",
    "train.cpu_devices",
    "data.prefetch",
    "data.worker_count",
    "data.check_plausibility",
    "optim.learning_rate",
    "optim.grad_clip",
    "eval.",
)
"""Keys (or, ending in '.', sections) that may differ between a run and its rerun."""

INFERENCE_KEYS = (
    "model.",
    "kinetics.",
    "data.input_points",
    "data.mask_threshold",
    "data.expected_frames",
)
"""What a checkpoint records of its config: what using its weights correctly depends on."""


def flatten(values: Mapping, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value}, values in their JSON form (tuples become lists)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_json(config) -> dict:
    """A config (ConfigDict or dict) as the plain dict its ``config.json`` holds."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def differences(old: Mapping, new: Mapping) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every flattened key whose values differ, sorted."""
    a, b = flatten(as_json(old)), flatten(as_json(new))
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def describe(diffs) -> str:
    """``key old → new, ...`` for log lines and error sentences."""
    return ", ".join(f"{k} {old!r} → {new!r}" for k, old, new in diffs)


def check_rerun(saved: Mapping, config) -> list[tuple[str, object, object]]:
    """Refuses a rerun that changes what a run is; returns the allowed changes.

    Args:
      saved: the run's config (``workdir/config.json``, defaults filled).
      config: the config of the rerun.

    Returns:
      the differences in `RESUMABLE` keys (to log).

    Raises:
      ValueError: some other key differs (the sentence names every one).
    """
    diffs = differences(saved, config)
    fixed = [d for d in diffs if not _matches(d[0], RESUMABLE)]
    if fixed:
        raise ValueError(
            f"this workdir holds a run made with other settings ({describe(fixed)}); they "
            "change the data, the split or the model, so rerun with the run's settings (its "
            "config.json) or use a new --workdir. A rerun may change only "
            f"{', '.join(p.rstrip('.') for p in RESUMABLE)}."
        )
    return diffs


def checkpoint_settings(config) -> dict:
    """The `INFERENCE_KEYS` of a config, flattened: what a checkpoint records."""
    return {k: v for k, v in flatten(as_json(config)).items() if _matches(k, INFERENCE_KEYS)}


def settings_differences(recorded: Mapping, config) -> list[tuple[str, object, object]]:
    """How ``config`` disagrees with the settings a checkpoint recorded (keys it recorded)."""
    current = checkpoint_settings(config)
    return [(k, v, current.get(k)) for k, v in sorted(recorded.items()) if current.get(k) != v]
