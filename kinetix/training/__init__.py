"""Training: config checks, optimiser, state, objective, the jitted step, devices, the loop,
checkpoints and provenance.

    from kinetix.training import loop
    result = loop.train(config, workdir)          # resumes from workdir's checkpoints

`kinetix.experiment.train_and_evaluate` (what `python -m kinetix.train` calls) composes training
with the evaluation; the loop itself imports no evaluation and no command.

Modules: `config` (validate_config, default_config, load_config), `optim`, `state`, `losses`,
`step` (predict_frames, make_train_step, make_eval_step), `devices`, `cohort` (build_cohort,
split_cohort), `loop` (train), `checkpoint`, `provenance`. Every name the former single module
`kinetix.training` had is still importable from here; `train_and_evaluate` and the inference
helpers (`load_for_inference`, `restore_params`, `make_predict_fn`, `checkpoint_steps`) now live
in the layers above (`kinetix.experiment`, `kinetix.inference`) and are looked up on first use.
"""

import importlib

from kinetix.training.cohort import build_cohort, split_cohort, split_seed
from kinetix.training.config import default_config, load_config, validate_config
from kinetix.training.devices import (
    BATCH_KEYS,
    configure_host_devices,
    host_device_plan,
    local_copy,
    make_mesh,
    shard_batch,
)
from kinetix.training.loop import TrainResult, evaluate_loss, run_init_trials, train
from kinetix.training.optim import learning_rate_schedule, make_optimizer
from kinetix.training.state import create_model, create_train_state
from kinetix.training.step import (
    batch_inputs,
    compute_loss,
    curve_features,
    early_weight_at,
    loss_mask,
    make_eval_step,
    make_train_step,
    plasma_scale,
    predict_frames,
)

# Names of the former `kinetix.training` that now live in a layer above it (module -> names).
# Imported lazily on attribute access (PEP 562), so importing kinetix.training imports neither.
_MOVED_UP = {
    "kinetix.experiment": ("train_and_evaluate",),
    "kinetix.inference": (
        "checkpoint_steps",
        "load_for_inference",
        "make_predict_fn",
        "restore_params",
    ),
}


def __getattr__(name):
    for module, names in _MOVED_UP.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'kinetix.training' has no attribute {name!r}")


__all__ = [
    "BATCH_KEYS",
    "TrainResult",
    "batch_inputs",
    "build_cohort",
    "compute_loss",
    "configure_host_devices",
    "create_model",
    "create_train_state",
    "curve_features",
    "default_config",
    "early_weight_at",
    "evaluate_loss",
    "host_device_plan",
    "learning_rate_schedule",
    "load_config",
    "local_copy",
    "loss_mask",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "plasma_scale",
    "predict_frames",
    "run_init_trials",
    "shard_batch",
    "split_cohort",
    "split_seed",
    "train",
    "validate_config",
    *(name for names in _MOVED_UP.values() for name in names),
]
