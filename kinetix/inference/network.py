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
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import kinetix.kinetics as kk
from kinetix import maps
from kinetix.data import bids, pipeline
from kinetix.data.bids import derivatives as der
from kinetix.data.bids.write import check_command_outputs, check_outputs_free
from kinetix.inference import late
from kinetix.inference.patlak import MODEL, output_stem
from kinetix.training import checkpoint, rerun
from kinetix.training.cohort import build_cohort, scan_choice
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
    """(graphdef, params) of a checkpoint in workdir (the latest intact one, or ``step``),
    restored into an abstract target, after checking that ``config`` describes its weights.

    Without ``step``, a damaged latest checkpoint is reported and the newest intact one is used
    (`Checkpointer.restore_latest`).

    Raises:
      FileNotFoundError: workdir holds no checkpoint.
      ValueError: there is no checkpoint at ``step`` (the sentence lists those there are), the
        checkpoint does not match the config's model, or it was trained with settings the
        config does not have (`kinetix.training.rerun.INFERENCE_KEYS`: e.g. a config.json
        edited after training).
      DamagedCheckpoint: the checkpoint (every checkpoint, without ``step``) is damaged.
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
        if not ckpt.all_steps():
            raise FileNotFoundError(f"{workdir} holds no checkpoint: train it first.")
        if step is None:
            step, restored = ckpt.restore_latest(abstract)
        else:
            restored = ckpt.restore(step, abstract)
        recorded = ckpt.settings(step)
    finally:
        ckpt.close()
    differ = [] if recorded is None else rerun.settings_differences(recorded, config)
    if differ:
        raise ValueError(
            f"the checkpoint {pathlib.Path(workdir) / 'checkpoints' / str(step)} was trained with "
            f"other settings than {pathlib.Path(workdir) / 'config.json'} states "
            f"({rerun.describe(differ)}; checkpoint → config.json): that config does not describe "
            "these weights; restore the run's config.json or train again."
        )
    return graphdef, restored["params"]


def load_for_inference(workdir, data_root=None, step: int | None = None, entities=None):
    """(config, predict_fn, cohort, splits) of a trained workdir; `data_root` overrides the data,
    `step` picks a checkpoint (default: the latest), `entities` (text, e.g. "ses-followup"; ""
    for none) overrides the run's ``config.data.entities`` that choose each subject's scan.

    Raises:
      FileNotFoundError: no config.json or no checkpoint in workdir.
      ValueError: the data do not fit the trained configuration.
    """
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    if entities is not None:
        with config.unlocked():
            config.data.entities = str(entities)
    if data_root:
        cohort = pipeline.Cohort.from_bids(
            data_root, check_plausibility=config.data.check_plausibility, **scan_choice(config)
        )
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
      mask [X,Y,Z] — Ki from measured frames with mid-time ≥ t* up to n_early plus predicted ones
      —, late_start / late_end [T_late] (min) the predicted frames' times, and warnings:
      sentences on implausible inputs (`study.warnings`) and on a Ki map outside
      the plausible FDG ranges (`kinetix.data.bids.ki_problems`), also logged as warnings.
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
    # Findings on the inputs accepted with check_plausibility=False, then on Ki itself.
    source = study.pet_path or f"{study.subject}_pet.nii.gz"
    problems = bids.ki_problems(ki, mask, output_paths(source, ".", False)["ki"].name)
    for problem in problems:  # the study's own were logged when it was read
        logging.warning("%s", problem)
    warnings = list(study.warnings) + problems
    mask = mask.astype(np.float32)
    return {
        "late": late,
        "params": params,
        "ki": ki,  # 0 outside the body mask
        "ki_pred_only": pred_only,
        "v0": v0,
        "mask": mask,
        "warnings": warnings,
        "late_start": np.asarray(trained.start[n_early:]),  # [T_late] min
        "late_end": np.asarray(trained.end[n_early:]),
    }


PARAMS = ("fv", "K1", "k2", "k3", "k4")
MASK_DESC = "kinetix"
"""`desc-` of the body mask of `kinetix.predict` (`anat/<prefix>_desc-kinetix_mask`)."""
_UNITS = {"fv": "mL/mL", "K1": "mL/min/mL", "Ki": "mL/min/mL", "V0": "mL/mL"}


def output_paths(pet_path, out_dir, with_params: bool = True) -> dict[str, pathlib.Path]:
    """{key: path} of the maps `write_outputs` writes for the scan `pet_path` in the derivative
    dataset `out_dir` (docs/bids.md): "late" `pet/<prefix>_desc-predicted_pet.nii.gz`, "ki"
    `<prefix>_km-patlak_desc-kinetix_Ki`, "ki_pred_only" `..._desc-predonly_Ki`, "v0"
    `..._km-patlak_desc-kinetix_V0`, "mask" `anat/<prefix>_desc-kinetix_mask` and, with
    `with_params`, the network's 2TCM maps `<prefix>_km-2tcm_desc-kinetix_<param>`. Each has a
    JSON sidecar (`derivatives.sidecar_path`)."""
    prefix = output_stem(pet_path)
    paths = {
        "late": der.image_path(out_dir, prefix, "pet", desc="predicted"),
        "ki": der.map_path(out_dir, prefix, "Ki", model=MODEL, desc="kinetix"),
        "ki_pred_only": der.map_path(out_dir, prefix, "Ki", model=MODEL, desc="predonly"),
        "v0": der.map_path(out_dir, prefix, "V0", model=MODEL, desc="kinetix"),
        "mask": der.image_path(out_dir, prefix, "mask", desc=MASK_DESC, datatype="anat"),
    }
    if with_params:
        for name in PARAMS:
            paths[name] = der.map_path(out_dir, prefix, name, model="2tcm", desc="kinetix")
    return paths


def _descriptions() -> dict[str, tuple[str, str]]:
    """{output key: (Description, Units)} of `write_outputs`' maps."""
    return {
        "late": ("Frames after the early frames, predicted by kinetix", "g/mL"),
        "ki": ("Patlak Ki of kinetix.predict: measured frames from t* to the last early frame "
               "followed by the predicted late frames", _UNITS["Ki"]),
        "ki_pred_only": ("Patlak Ki on the predicted frames only", _UNITS["Ki"]),
        "v0": ("Patlak intercept V0 of the kinetix Ki fit", _UNITS["V0"]),
        "mask": ("Body mask of kinetix.predict (1 inside; Ki and V0 are 0 outside)", ""),
    } | {n: (f"The network's 2TCM {n}", _UNITS.get(n, "1/min")) for n in PARAMS}  # fmt: skip


def write_outputs(result, study, out_dir, overwrite=False, *, sidecar: dict | None = None):
    """Writes the maps with the input's affine and header, each with a JSON sidecar, into the
    derivative dataset `out_dir` (`output_paths`); returns the written paths (maps, sidecars).

    Every output is checked first: with `overwrite` False, an existing one raises
    FileExistsError before anything is written. `sidecar` (a JSON-serialisable dict) is merged
    into the Ki map's sidecar, with `result["warnings"]` as its "Warnings".
    """
    out_dir = pathlib.Path(out_dir)
    paths = output_paths(study.pet_path, out_dir, result["params"] is not None)
    sidecars = {k: der.sidecar_path(p) for k, p in paths.items()}
    check_outputs_free([*paths.values(), *sidecars.values()], overwrite)
    links = der.open_outputs(out_dir, "kinetix.predict", [study.pet_path, study.blood_path])
    sources = [der.bids_uri(p, links) for p in (study.pet_path, study.blood_path) if p]
    arrays = {k: result[k] for k in ("late", "ki", "ki_pred_only", "v0", "mask")}
    if result["params"] is not None:
        arrays |= {n: result["params"][..., i] for i, n in enumerate(PARAMS)}
    start, end = result.get("late_start"), result.get("late_end")
    texts = _descriptions()
    written = []
    for key, data in arrays.items():
        text, units = texts[key]
        written.append(
            bids.write_map(paths[key], data, study, description=text[:79], overwrite=overwrite)
        )
        meta = {"Description": text, "Units": units, "Sources": sources}
        if key == "mask":
            meta = {"Description": text, "Type": "ROI", "Sources": sources[:1]}
            meta["SpatialReference"] = sources[0]
        elif key == "late":
            meta["SkullStripped"] = False
            if start is not None:
                meta["FrameTimesStart"] = [round(float(t) * 60.0, 6) for t in start]
                meta["FrameDuration"] = [
                    round(float(b - a) * 60.0, 6) for a, b in zip(start, end, strict=True)
                ]
        elif key == "ki" and sidecar is not None:
            meta |= {k: v for k, v in sidecar.items() if k != "Sources"}
            meta["Warnings"] = list(result.get("warnings", []))
        written.append(der.write_sidecar(paths[key], meta))
    return written


def predict_to_dir(
    workdir,
    pet,
    out,
    blood=None,
    *,
    step=None,
    batch_slices=8,
    overwrite=False,
    progress=True,
    check_plausibility=True,
    idif_mask=None,
    idif_label=None,
    late_input="measured",
    late_sample=None,
    population=None,
    recording=None,
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
      check_plausibility: refuse image and blood values outside the plausible FDG ranges
        (`bids.read_subject`); False proceeds and records them as warnings.
      idif_mask, idif_label: take the blood from the image inside this mask / label
        (`kinetix.data.idif`) instead of a blood file; it is written beside the maps as
        `pet/<prefix>_recording-IDIF_blood.tsv` (+ .json).
      recording: the blood recording next to `pet` to read (e.g. "autosampler"; default: the
        only one, or "manual" among several; `bids.find_blood`); excludes `blood` and
        `idif_mask`.
      late_input: how Cp after the early frames is obtained (`late.LATE_INPUTS`): "measured"
        needs blood up to the end of the trained schedule, "fit" and "population" only up to
        the end of the early frames (`kinetix.data.late_input`).
      late_sample: (time [min], activity [Bq/mL]) of one late venous sample, or None.
      population: a population JSON for "population" (default: the run's own).

    Returns:
      The written paths (`output_paths`: maps and their sidecars; the Ki map's sidecar holds the
      sources, Patlak settings, the input function and late input used, "Warnings": implausible
      inputs accepted and a Ki map outside the plausible FDG ranges), then the IDIF blood files.

    Raises:
      ValueError, OSError: bad arguments, unreadable or implausible inputs, an output that
        exists (without `overwrite`) or an output directory that is not writable; all before
        anything is computed or written.
    """
    if isinstance(batch_slices, bool) or not isinstance(batch_slices, int) or batch_slices < 1:
        raise ValueError(f"--batch_slices must be a positive integer, got {batch_slices!r}.")
    paths = output_paths(pet, out)  # named after the scan's file: known before reading it
    out = check_command_outputs(
        out, [*paths.values(), *late.idif_paths(pet, out, idif_mask)], overwrite
    )
    config = load_config(workdir)
    trained = trained_schedule(workdir)
    n_early = int(config.model.n_early)
    study, input_used, idif_result = late.read_study(
        pet,
        blood=blood,
        idif_mask=idif_mask,
        idif_label=idif_label,
        late=late_input,
        late_sample=late_sample,
        population=late.load_population(late_input, population, workdir),
        t_cut=float(trained.end[n_early - 1]),
        t_end=float(trained.end[-1]),
        check_plausibility=check_plausibility,
        recording=recording,
    )
    graphdef, params = restore_params(config, workdir, step)
    eval_step = make_eval_step(graphdef, config, trained)
    predict_fn = make_predict_fn(eval_step, params, NamedSharding(make_mesh(), P("data")))
    result = predict_study(config, predict_fn, study, trained, batch_slices, progress)
    sidecar = {
        "TrainedRun": pathlib.Path(workdir).resolve().as_uri(),
        "InputFunction": input_used,
        "CheckpointStep": "latest" if step is None else int(step),
        "Method": str(config.eval.method),
        "TStar": float(config.kinetics.t_star),
        "TimeUnits": "min",
        "SoftwareName": "kinetix",
    }
    paths = write_outputs(result, study, out, overwrite, sidecar=sidecar)
    if idif_result is not None:
        paths += late.write_idif_blood(idif_result, study, out, overwrite)
    return paths
