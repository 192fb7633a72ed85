"""A trained network applied to a study: restore a run, predict late frames, Ki and 2TCM maps.

    config, predict_fn, cohort, splits = load_for_inference(workdir)   # evaluation
    paths = predict_to_dir(workdir, pet, out, blood=None)              # `kinetix.predict`

A 22-frame file is enough; of a 28-frame file only the first 22 frames are used. Any matrix size
works (slices are padded to the U-Net's size multiple and cropped back). `predict_to_dir` writes
NIfTI maps with the input's affine: the predicted late frames, Ki from Patlak on the measured
frames from t* on plus the predicted ones (and the authors' variant on the predicted frames
only), V0, the body mask, and fv, K1..k4.
"""

import json
import pathlib

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import kinetix.kinetics as kk
from kinetix import maps
from kinetix.data import bids, pipeline
from kinetix.training import checkpoint
from kinetix.training.cohort import build_cohort
from kinetix.training.config import load_config, validate_config
from kinetix.training.devices import make_mesh, shard_batch
from kinetix.training.state import create_train_state
from kinetix.training.step import make_eval_step


def make_predict_fn(eval_step, params, sharding):
    """numpy batch -> {"frames": [B,H,W,T], "params": [B,H,W,5] or None} (host arrays)."""

    def predict_fn(batch):
        pred, pmap, _ = eval_step(params, shard_batch(batch, sharding))
        return {
            "frames": np.asarray(jax.device_get(pred)),
            "params": None if pmap is None else np.asarray(jax.device_get(pmap)),
        }

    return predict_fn


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the checkpoints in ``workdir/checkpoints``, ascending (empty if none)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    with checkpoint.Checkpointer(directory, save_interval_steps=1) as ckpt:
        return ckpt.all_steps()


def restore_params(config, workdir, step: int | None = None):
    """(graphdef, params) of a checkpoint in workdir (the latest, or ``step``), restored into an
    abstract target.

    Raises:
      FileNotFoundError: workdir holds no checkpoint.
      ValueError: there is no checkpoint at ``step`` (the sentence lists those there are), or
        the checkpoint does not match the config's model.
    """
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    graphdef, _, state = create_train_state(config)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
    )
    ckpt = checkpoint.Checkpointer(
        pathlib.Path(workdir) / "checkpoints",
        save_interval_steps=1,
        keep=config.train.keep_checkpoints,
        with_data=True,
    )
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir} holds no checkpoint: train it first.")
        restored = ckpt.restore(steps[-1] if step is None else step, abstract)
    finally:
        ckpt.close()
    return graphdef, restored["params"]


def load_for_inference(workdir, data_root=None, step: int | None = None):
    """(config, predict_fn, cohort, splits) of a trained workdir; `data_root` overrides the data,
    `step` picks a checkpoint (default: the latest).

    Raises:
      FileNotFoundError: no config.json or no checkpoint in workdir.
      ValueError: the data do not fit the trained configuration.
    """
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    if data_root:
        cohort = pipeline.Cohort.from_bids(data_root)
    else:
        cohort = build_cohort(config, workdir)
    validate_config(config, cohort.schedule, cohort.shape)
    splits_path = workdir / "splits.json"
    if data_root or not splits_path.exists():
        splits = {"train": [], "val": [], "test": list(cohort.subjects)}
    else:
        splits = json.loads(splits_path.read_text())
    graphdef, params = restore_params(config, workdir, step)
    mesh = make_mesh()
    eval_step = make_eval_step(graphdef, config, cohort.schedule)
    return (
        config,
        make_predict_fn(eval_step, params, NamedSharding(mesh, P("data"))),
        cohort,
        splits,
    )


def trained_schedule(workdir):
    """The frame schedule a run was trained on (workdir/schedule.json)."""
    path = pathlib.Path(workdir) / "schedule.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a finished kinetix run?")
    d = json.loads(path.read_text())
    return kk.FrameSchedule(np.asarray(d["start"]), np.asarray(d["end"]))


def check_schedule(study_schedule, trained, n_early, pet_path):
    """The input's first n_early frames must be the trained ones (to 1 ms)."""
    if study_schedule.n_frames < n_early:
        raise ValueError(
            f"{pet_path} has {study_schedule.n_frames} frames; the model needs the first "
            f"{n_early} (0–{trained.end[n_early - 1]:g} min)."
        )
    a, b = study_schedule[:n_early], trained[:n_early]
    if np.max(np.abs(a.start - b.start)) > 2e-5 or np.max(np.abs(a.end - b.end)) > 2e-5:
        raise ValueError(
            f"The first {n_early} frames of {pet_path} do not match the schedule the model was "
            "trained on (FrameTimesStart / FrameDuration differ)."
        )


def predict_study(config, predict_fn, study, trained, batch_slices=8, progress=True):
    """Per-slice prediction of a whole volume.

    Returns:
      dict with late [X,Y,Z,T_late] (SUV), params [X,Y,Z,5] or None, ki, ki_pred_only, v0,
      mask [X,Y,Z] — Ki from measured frames with mid-time ≥ t* up to n_early plus predicted ones.
    """
    n_early = config.model.n_early
    check_schedule(study.schedule, trained, n_early, study.pet_path)
    nx, ny, nz = study.frames.shape[:3]
    t_full = trained.n_frames
    multiple = 2 ** (len(config.model.widths) - 1)
    k = config.data.input_points
    late = np.zeros((nx, ny, nz, t_full - n_early), np.float32)
    params = None
    bar = tqdm(total=nz, desc="predict slices", disable=not progress)
    # The network input is built as in training (kinetix.data.pipeline.batch).
    for zs, batch in pipeline.volume_batches(study, n_early, t_full, k, batch_slices, multiple):
        out = predict_fn(batch)
        n = len(zs)
        late[:, :, zs, :] = np.moveaxis(out["frames"][:n, :nx, :ny, n_early:], 0, 2)
        if out["params"] is not None:
            if params is None:
                params = np.zeros((nx, ny, nz, 5), np.float32)
            params[:, :, zs, :] = np.moveaxis(out["params"][:n, :nx, :ny], 0, 2)
        bar.update(n)
    bar.close()

    times, plasma, _ = pipeline.input_curves(study, k)  # the plasma input the network saw
    inp = kk.SampledInput(times, plasma)
    combined = np.concatenate([study.frames[..., :n_early], late], axis=-1)
    # The rule and threshold the network was trained with (kinetix.maps.mask, "threshold").
    mask = maps.volume_mask(combined, trained, "threshold", config.data.mask_threshold)
    method = config.eval.method
    fit = maps.fit_frames(trained, float(config.kinetics.t_star))
    ki, v0 = maps.volume_patlak(combined, inp, trained, fit, mask, method)
    pred_fit = maps.fit_frames(trained, float(trained.mid[n_early]))
    pred_only, _ = maps.volume_patlak(combined, inp, trained, pred_fit, mask, method)
    mask = mask.astype(np.float32)
    return {
        "late": late,
        "params": params,
        "ki": ki,  # 0 outside the body mask
        "ki_pred_only": pred_only,
        "v0": v0,
        "mask": mask,
    }


def write_outputs(result, study, out_dir, overwrite=False):
    """NIfTI maps with the input's affine and header; returns the written paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sub = study.subject
    items = {
        f"{sub}_desc-predicted_pet.nii.gz": (result["late"], "predicted frames 23-28 (SUV)"),
        f"{sub}_Ki.nii.gz": (result["ki"], "Patlak Ki, measured 16-22 + predicted 23-28 (1/min)"),
        f"{sub}_desc-predonly_Ki.nii.gz": (
            result["ki_pred_only"],
            "Patlak Ki on predicted frames only",
        ),
        f"{sub}_V0.nii.gz": (result["v0"], "Patlak V0 (mL/mL)"),
        f"{sub}_mask.nii.gz": (result["mask"], "body mask (Ki and V0 are 0 outside)"),
    }
    if result["params"] is not None:
        for i, name in enumerate(("fv", "K1", "k2", "k3", "k4")):
            items[f"{sub}_param-{name}_map.nii.gz"] = (result["params"][..., i], f"2TCM {name}")
    paths = []
    for name, (data, desc) in items.items():
        paths.append(
            bids.write_map(out_dir / name, data, study, description=desc, overwrite=overwrite)
        )
    return paths


def predict_to_dir(
    workdir, pet, out, blood=None, *, step=None, batch_slices=8, overwrite=False, progress=True
) -> list[pathlib.Path]:
    """What `python -m kinetix.predict` does: restore a run, predict one study, write its maps.

    Args:
      workdir: a trained run directory (config.json, schedule.json, checkpoints).
      pet: the subject's ``*_pet.nii.gz`` (sidecar JSON read automatically).
      out: output directory (created).
      blood: blood TSV; default the ``*_blood.tsv`` next to the PET file.
      step: the checkpoint's training step (default: the latest).
      batch_slices: slices per forward pass (>= 1).
      overwrite: replace existing outputs.
      progress: show a progress bar.

    Returns:
      The written paths.
    """
    if isinstance(batch_slices, bool) or not isinstance(batch_slices, int) or batch_slices < 1:
        raise ValueError(f"--batch_slices must be a positive integer, got {batch_slices!r}.")
    config = load_config(workdir)
    trained = trained_schedule(workdir)
    study = bids.read_subject(pet, blood)
    graphdef, params = restore_params(config, workdir, step)
    eval_step = make_eval_step(graphdef, config, trained)
    predict_fn = make_predict_fn(eval_step, params, NamedSharding(make_mesh(), P("data")))
    result = predict_study(config, predict_fn, study, trained, batch_slices, progress)
    return write_outputs(result, study, out, overwrite)
