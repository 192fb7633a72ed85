"""Predict the late frames, Ki and 2TCM parameter maps of one subject from its first 35 minutes.

    python -m kinetix.predict --workdir W --pet sub-01_pet.nii.gz [--blood ...] --out DIR

A 22-frame file is enough; of a 28-frame file only the first 22 frames are used. Any matrix size
works (slices are padded to the U-Net's size multiple and cropped back). Writes NIfTI maps with
the input's affine: the predicted late frames, Ki from Patlak on measured frames 16–22 plus
predicted 23–28 (and the authors' variant on the predicted frames only), V0, and fv, K1..k4.
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """Define the command's flags (at run time, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "Trained run directory (config.json + checkpoints).")
    flags.DEFINE_string(
        "pet", None, "The subject's *_pet.nii.gz (sidecar JSON read automatically)."
    )
    flags.DEFINE_string("blood", None, "Blood TSV (default: the *_blood.tsv next to the PET file).")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_integer("batch_slices", 8, "Slices per forward pass.")
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
    flags.DEFINE_integer(
        "step", None, "Use the checkpoint of this training step (default: latest)."
    )


def trained_schedule(workdir):
    """The frame schedule a run was trained on (workdir/schedule.json)."""
    import kinetix.kinetics as kk

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


def pad_to_multiple(vol, multiple):
    """Zero-pad axes 0 and 1 of vol [X, Y, ...] up to a multiple; returns (padded, (X, Y))."""
    x, y = vol.shape[:2]
    px, py = (-x) % multiple, (-y) % multiple
    pad = [(0, px), (0, py)] + [(0, 0)] * (vol.ndim - 2)
    return np.pad(vol, pad), (x, y)


def predict_study(config, predict_fn, study, trained, batch_slices=8, progress=True):
    """Per-slice prediction of a whole volume.

    Returns:
      dict with late [X,Y,Z,T_late] (SUV), params [X,Y,Z,5] or None, ki, ki_pred_only, v0,
      mask [X,Y,Z] — Ki from measured frames with mid-time ≥ t* up to n_early plus predicted ones.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import kinetix.kinetics as kk
    from kinetix.data import pipeline

    n_early = config.model.n_early
    check_schedule(study.schedule, trained, n_early, study.pet_path)
    multiple = 2 ** (len(config.model.widths) - 1)
    frames = study.frames[..., :n_early]
    padded, (nx, ny) = pad_to_multiple(frames, multiple)
    times, plasma = pipeline.compress_curve(
        study.plasma_times, study.plasma, config.data.input_points
    )
    times, plasma = pipeline.pad_curve(times, plasma, config.data.input_points)
    if study.whole_blood is not None:
        wb = np.interp(times, study.plasma_times, study.whole_blood)
    else:
        wb = plasma
    nz = padded.shape[2]
    t_full = trained.n_frames
    late = np.zeros((nx, ny, nz, t_full - n_early), np.float32)
    params = None
    bar = tqdm(total=nz, desc="predict slices", disable=not progress)
    for z0 in range(0, nz, batch_slices):
        zs = list(range(z0, min(z0 + batch_slices, nz)))
        zs_full = zs + [zs[-1]] * (batch_slices - len(zs))  # fixed batch shape: one compile
        x = np.moveaxis(padded[:, :, zs_full, :], 2, 0)  # [B, X, Y, T_early]
        full = np.concatenate([x, np.zeros(x.shape[:3] + (t_full - n_early,), x.dtype)], -1)
        b = len(zs_full)
        batch = {
            "frames": full.astype(np.float32),
            "mask": np.ones(x.shape[:3], np.float32),
            "plasma_times": np.broadcast_to(times, (b, times.size)).astype(np.float32),
            "plasma": np.broadcast_to(plasma, (b, times.size)).astype(np.float32),
            "whole_blood": np.broadcast_to(wb, (b, times.size)).astype(np.float32),
            "valid": np.ones(b, np.float32),
        }
        out = predict_fn(batch)
        n = len(zs)
        late[:, :, zs, :] = np.moveaxis(out["frames"][:n, :nx, :ny, n_early:], 0, 2)
        if out["params"] is not None:
            if params is None:
                params = np.zeros((nx, ny, nz, 5), np.float32)
            params[:, :, zs, :] = np.moveaxis(out["params"][:n, :nx, :ny], 0, 2)
        bar.update(n)
    bar.close()

    inp = kk.SampledInput(times, plasma)
    combined = np.concatenate([study.frames[..., :n_early], late], axis=-1)
    t_star = float(config.kinetics.t_star)
    method = config.eval.method
    fit = jax.jit(lambda v, ts: kk.patlak(v, inp, trained, ts, method=method), static_argnums=1)
    ki, v0 = fit(jnp.asarray(combined), t_star)
    late_sched_start = float(trained.mid[n_early])
    pred_only, _ = fit(jnp.asarray(combined), late_sched_start)
    mean = pipeline.time_average(combined, trained)
    mask = pipeline.body_mask(
        mean, float(np.percentile(mean, pipeline.MASK_PERCENTILE)), config.data.mask_threshold
    ).astype(np.float32)
    return {
        "late": late,
        "params": params,
        "ki": np.asarray(ki, np.float32) * mask,  # outside the body: 0
        "ki_pred_only": np.asarray(pred_only, np.float32) * mask,
        "v0": np.asarray(v0, np.float32) * mask,
        "mask": mask,
    }


def write_outputs(result, study, out_dir, overwrite=False):
    """NIfTI maps with the input's affine and header; returns the written paths."""
    from kinetix.data import bids

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        for name in ("workdir", "pet", "out"):
            if not getattr(FLAGS, name):
                raise ValueError(f"--{name} is required.")
        from kinetix import training
        from kinetix.data import bids

        config = training.load_config(FLAGS.workdir)
        trained = trained_schedule(FLAGS.workdir)
        study = bids.read_subject(FLAGS.pet, FLAGS.blood)
        graphdef, params = training.restore_params(config, FLAGS.workdir, FLAGS.step)
        eval_step = training.make_eval_step(graphdef, config, trained)
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sharding = NamedSharding(training.make_mesh(), P("data"))
        predict_fn = training.make_predict_fn(eval_step, params, sharding)
        result = predict_study(config, predict_fn, study, trained, FLAGS.batch_slices)
        paths = write_outputs(result, study, FLAGS.out, FLAGS.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kinetix.predict: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {len(paths)} maps to {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
