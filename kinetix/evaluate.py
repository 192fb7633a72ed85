"""Held-out evaluation: Ki maps by several routes, the authors' per-slice metrics, tumour ROIs.

    python -m kinetix.evaluate --workdir W [--data BIDS] [--ablation_workdir W2] [--out DIR]

For every slice of the held-out subjects, Patlak Ki maps (`kk.patlak`, TPCCLIB convention:
∫0^{t_mid} Cp / frame-mean Cp, frames chosen by mid-time) are computed from

- **reference**: the measured 65-min scan, frames with mid-time ≥ t* (16–28 for the paper's
  schedule and t* = 9 min);
- **baseline**: the measured first 35 min, mid-time in [t*, 35] (frames 16–22);
- **proposed**: measured frames 16–22 followed by the predicted frames 23–28 (the prediction
  replaces every frame ≥ `n_early`);
- **proposed_late**: the authors' variant, Patlak on the predicted frames 23–28 only
  (t* = start of frame `n_early` + 1, i.e. 35 min);
- **direct**: the "without model" ablation spliced like *proposed* (when `ablation_fn` is given);
- **direct_late**: the same ablation's predicted frames only, fitted like *proposed_late* (the
  authors' variant for both networks);
- **truth**: the simulator's voxel-level Ki (`derivatives/truth`), when every subject has one.

Every Ki (and SUV) map is multiplied by the body mask of the batch (Ki outside the body is 0)
before any metric. Metrics follow the authors' code (kinetix.metrics.batch_slice_metrics): per
2-D slice, both images clipped to [0, max(reference slice)], data_range = max(reference slice),
scikit-image SSIM defaults, PSNR, NRMSE (Euclidean), NMI with 100 bins, plus MS-SSIM; slices with
NaN metrics (e.g. an all-zero reference slice) are skipped and counted. Means over slices sit
beside their relative change against the baseline (kinetix.metrics.relative_change).
SUV metrics use the last frame (predicted vs measured frame 28) with the same conventions.

Tumour ROIs (the paper's 10×10×10-voxel ROI adapted to 2-D slices): every 8-connected region of
a tumour label (label name containing "nodule", "tumo" or "lesion") in a slice of the truth
label map, united with the 3×3 square centred on the region's centroid, so that a one-voxel
nodule still gives a 3×3 ROI. Bland–Altman statistics (bias, 95 % limits of agreement
bias ± 1.96·SD, SD with ddof = 1) compare each method's ROI-mean Ki against the reference (and
against the truth), plus a voxel-level variant over all ROI voxels (closer to the paper's plot).

Per tissue (when the truth has a label map): each label's mean late-frame SUV (measured, each
network's prediction, the noise-free truth) and mean Ki of every method over the masked voxels,
with the bias of the mean against the truth in % (`metrics.json` "tissues", a report section):
where the per-slice metrics say how well, this says in which organ a method is high or low.
When `predict_fn` returns the kinetic model's parameter maps and the truth has them, the same
is done for each 2TCM parameter (fv, K1, k2, k3, k4): the network's mean against the true mean
per tissue ("tissues" → "params"), which shows whether the fit is physiological or degenerate.

Outputs under `out_dir` (default `workdir/eval`, overwritten): `metrics.json`, `report.md`,
`per_slice.csv` and `figures/*.png` (see kinetix.report).
"""

import functools
import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import logging

from kinetix import metrics as km
from kinetix import report
from kinetix.data import pipeline

# The Ki maps, tables and figures live in evaluate_ki, evaluate_tables and evaluate_figures; they
# are re-exported here, so `kinetix.evaluate` stays the one import of the evaluation.
from kinetix.evaluate_figures import (  # noqa: F401
    ORGAN_PREFERENCE,
    _figure_quota,
    _pick_slices,
    _write_figures,
)
from kinetix.evaluate_ki import (  # noqa: F401
    METHOD_LABELS,
    TUMOUR_NAME_PARTS,
    KiWindows,
    _load_truth,
    batch_ki,
    find_truth_root,
    patlak_coordinates,
    splice,
)
from kinetix.evaluate_tables import (  # noqa: F401
    HIGHER_IS_BETTER,
    LOA_Z,
    ROI_MIN_SIDE,
    ROI_NOTE,
    TISSUE_NOTE,
    _as_json,
    _write_per_slice_csv,
    add_label_sums,
    bland_altman,
    bland_altman_groups,
    connected_components,
    conventions,
    summarize,
    summarize_table,
    tissue_bias,
    tumour_rois,
)
from kinetix.kinetics import PARAM_NAMES

_batch_metrics = jax.jit(km.batch_slice_metrics)


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------
def _check_prediction(out, shape, name) -> np.ndarray:
    if not isinstance(out, dict) or "frames" not in out:
        raise ValueError(f"{name} must return a dict with a 'frames' array.")
    frames = np.asarray(out["frames"], np.float32)
    if frames.shape != shape:
        raise ValueError(
            f"{name} returned frames of shape {frames.shape}; expected {shape} = [B, H, W, T], "
            "all frames of the schedule."
        )
    return frames


def _check_params(out, shape, name) -> np.ndarray | None:
    """The prediction's 2TCM parameter maps [B, H, W, 5] (fv, K1, k2, k3, k4), or None."""
    params = out.get("params")
    if params is None:
        return None
    params = np.asarray(params, np.float64)
    if params.shape != (*shape, len(PARAM_NAMES)):
        raise ValueError(
            f"{name} returned params of shape {params.shape}; expected "
            f"{(*shape, len(PARAM_NAMES))} = [B, H, W, 5] ({', '.join(PARAM_NAMES)}) or None."
        )
    return params


def _config_value(config, path, default=None):
    node = config
    for part in path.split("."):
        if part not in node:
            if default is not None:
                return default
            raise ValueError(f"The config lacks the field config.{path}.")
        node = node[part]
    return node


def evaluate_run(
    config,
    workdir,
    cohort,
    subjects,
    predict_fn,
    *,
    ablation_fn=None,
    out_dir=None,
    truth_root=None,
    step=None,
    ablation_step=None,
) -> dict:
    """Evaluates a trained model on held-out subjects and writes metrics, figures and a report.

    Args:
      config: the run's ConfigDict; uses model.n_early, kinetics.t_star, eval.method,
        eval.baseline_t_end, eval.max_figures, train.eval_batch_size, data.input_points,
        data.mask_threshold, name.
      workdir: the run directory (its metrics.jsonl gives the loss curve).
      cohort: a `kinetix.data.pipeline.Cohort` (`subjects`, `schedule`, `study`, `n_slices`).
      subjects: names of the subjects to evaluate.
      predict_fn: numpy batch (pipeline.eval_batches) -> {"frames": [B, H, W, T] predicted
        frames (SUV), "params": [B, H, W, 5] or None}. Frames ≥ n_early are used.
      ablation_fn: same for the direct "without model" network, or None.
      out_dir: output directory (default workdir/eval); existing files are replaced.
      truth_root: BIDS root with derivatives/truth (default: found from the cohort).
      step, ablation_step: the training steps of the checkpoints evaluated (the ablation's
        only with `ablation_fn`), recorded in metrics.json ("run" → "checkpoint_step",
        "ablation_checkpoint_step") and the report; None leaves one unrecorded (null).

    Returns:
      {"metrics": everything written to metrics.json (NumPy-free), "table": fixed-width text
      table of the Ki comparison (and vs truth when available), "per_subject": {table: {subject:
      {method: {metric: mean}}}}, "out_dir": path}.
    """
    t_start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / "eval"
    step = None if step is None else int(step)
    ablation_step = None if ablation_fn is None or ablation_step is None else int(ablation_step)
    subjects = list(subjects)
    if not subjects:
        raise ValueError("subjects is empty: there are no held-out subjects to evaluate.")
    schedule = cohort.schedule
    windows = KiWindows(
        schedule=schedule,
        n_early=int(_config_value(config, "model.n_early")),
        t_star=float(_config_value(config, "kinetics.t_star")),
        baseline_t_end=float(_config_value(config, "eval.baseline_t_end")),
        method=str(_config_value(config, "eval.method")),
    )
    batch_size = int(_config_value(config, "train.eval_batch_size"))
    input_points = int(_config_value(config, "data.input_points"))
    mask_threshold = float(_config_value(config, "data.mask_threshold"))
    max_figures = int(_config_value(config, "eval.max_figures"))
    n_early = windows.n_early

    root, truth_note = find_truth_root(cohort, subjects, truth_root)
    has_truth = root is not None
    has_direct = ablation_fn is not None
    logging.info("Evaluating %d subjects (%s).", len(subjects), truth_note)

    ki_methods = ["baseline", "proposed", "proposed_late"] + ["direct", "direct_late"] * has_direct
    tables = {"ki_vs_reference": ki_methods + ["truth"] * has_truth}
    if has_truth:
        tables["ki_vs_truth"] = ["reference", *ki_methods]
    tables["suv_last_frame"] = ["proposed"] + ["direct"] * has_direct
    if has_truth:
        tables["suv_last_frame_vs_truth"] = ["measured", "proposed"] + ["direct"] * has_direct
    acc = {t: {m: {k: [] for k in km.METRIC_NAMES} for m in ms} for t, ms in tables.items()}
    ids = {"subject": [], "slice": []}
    rois: list[dict] = []
    roi_voxels: dict[str, list[np.ndarray]] = {}
    tissue_sums: dict[str, dict] = {"late_frames": {}, "ki": {}}
    param_sums: dict[str, dict] = {}  # 2TCM parameter -> add_label_sums accumulator
    label_names: dict[int, str] = {}
    quota = dict(zip(subjects, _figure_quota(len(subjects), max(max_figures, 0)), strict=True))
    wanted: dict[str, list[int]] = {}
    examples: list[dict] = []
    truth_cache: dict[str, dict] = {}
    fit = {
        name: functools.partial(
            batch_ki, idx=tuple(int(i) for i in schedule.select(*w)), method=windows.method
        )
        for name, w in windows.windows().items()
    }
    batches = pipeline.eval_batches(
        cohort, subjects, batch_size, input_points=input_points, mask_threshold=mask_threshold
    )
    for batch in batches:
        valid = np.asarray(batch["valid"]) > 0
        if not valid.any():
            continue
        measured = np.asarray(batch["frames"], np.float32)
        mask = np.asarray(batch["mask"], np.float32)
        times, plasma = batch["plasma_times"], batch["plasma"]
        raw = predict_fn(batch)
        pred = _check_prediction(raw, measured.shape, "predict_fn")
        pmap = _check_params(raw, measured.shape[:3], "predict_fn")
        proposed = splice(measured, pred, n_early)
        frames = {"reference": measured, "baseline": measured, "proposed": proposed}
        frames["proposed_late"] = pred
        direct = direct_raw = None
        if has_direct:
            direct_raw = _check_prediction(ablation_fn(batch), measured.shape, "ablation_fn")
            direct = splice(measured, direct_raw, n_early)
        x, cp = patlak_coordinates(times, plasma, schedule=schedule)
        ki = {
            name: np.asarray(fit[name](frames[name], x, cp)) * mask
            for name in ("reference", "baseline", "proposed", "proposed_late")
        }
        if has_direct:
            ki["direct"] = np.asarray(fit["proposed"](direct, x, cp)) * mask
            ki["direct_late"] = np.asarray(fit["proposed_late"](direct, x, cp)) * mask
        x, cp = np.asarray(x, np.float64), np.asarray(cp, np.float64)
        names = [cohort.subjects[int(i)] for i in batch["subject"]]
        zs = [int(z) for z in batch["slice"]]
        suv = {"measured": measured[..., -1] * mask, "proposed": pred[..., -1] * mask}
        if has_direct:
            suv["direct"] = direct[..., -1] * mask
        truth_slices = None
        if has_truth:
            for s in set(names) - set(truth_cache):
                grid = cohort.study(s).frames.shape[:3]
                truth_cache[s] = _load_truth(root, s, cohort, grid, n_early)
            for s in set(truth_cache) - set(names):
                del truth_cache[s]
            truth_slices = [truth_cache[s] for s in names]
            ki["truth"] = (
                np.stack([t["ki"][:, :, z] for t, z in zip(truth_slices, zs, strict=True)]) * mask
            )
            suv["truth"] = (
                np.stack(
                    [t["last_frame_suv"][:, :, z] for t, z in zip(truth_slices, zs, strict=True)]
                )
                * mask
            )

        def score(ref, pred_maps, _valid=valid):
            return {
                k: np.asarray(v)
                for k, v in _batch_metrics(ref, pred_maps, jax.numpy.asarray(_valid)).items()
            }

        for table, methods in tables.items():
            for method in methods:
                if table.startswith("ki_vs_"):
                    ref = ki[table[len("ki_vs_") :]]
                    vals = score(ref, ki[method])
                else:
                    ref = suv["truth"] if table.endswith("vs_truth") else suv["measured"]
                    vals = score(ref, suv[method])
                for k in km.METRIC_NAMES:
                    acc[table][method][k].append(vals[k][valid])
        ids["subject"].extend(s for s, v in zip(names, valid, strict=True) if v)
        ids["slice"].extend(z for z, v in zip(zs, valid, strict=True) if v)

        for b in np.nonzero(valid)[0]:
            s, z = names[b], zs[b]
            tr = truth_slices[b] if truth_slices is not None else None
            labels2d = tr["labels"][:, :, z] if tr is not None else None
            if tr is not None:
                late = {
                    "truth": tr["late_suv"][:, :, z],
                    "measured": measured[b, ..., n_early:].mean(-1),
                    "proposed": pred[b, ..., n_early:].mean(-1),
                }
                if direct_raw is not None:
                    late["direct"] = direct_raw[b, ..., n_early:].mean(-1)
                add_label_sums(tissue_sums["late_frames"], labels2d, mask[b], late)
                add_label_sums(tissue_sums["ki"], labels2d, mask[b], {m: ki[m][b] for m in ki})
                if pmap is not None:
                    for i, name in enumerate(PARAM_NAMES):
                        if name in tr["params"]:
                            add_label_sums(
                                param_sums.setdefault(name, {}),
                                labels2d,
                                mask[b],
                                {"truth": tr["params"][name][:, :, z], "proposed": pmap[b, ..., i]},
                            )
                label_names.update(tr["label_names"])
                for r in tumour_rois(labels2d, tr["tumour_ids"]):
                    roi = r["roi"]
                    rois.append(
                        {
                            "subject": s,
                            "slice": z,
                            "label": r["label"],
                            "label_name": tr["label_names"].get(r["label"], str(r["label"])),
                            "centre": list(r["centre"]),
                            "n_voxels": int(roi.sum()),
                            "n_tumour_voxels": r["n_tumour"],
                            "ki": {m: float(ki[m][b][roi].mean()) for m in ki},
                        }
                    )
                    for m in ki:
                        roi_voxels.setdefault(m, []).append(ki[m][b][roi].astype(np.float64))
            if s not in wanted:
                n_z = cohort.n_slices(s)
                wanted[s] = _pick_slices(
                    n_z,
                    tr["labels"] if tr is not None else None,
                    tr["tumour_ids"] if tr is not None else [],
                    min(quota[s], n_z),
                )
            if z in wanted[s]:
                examples.append(
                    {
                        "subject": s,
                        "slice": z,
                        "ki": {m: ki[m][b].copy() for m in ki},
                        "mask": mask[b].copy(),
                        "labels": None if labels2d is None else labels2d.copy(),
                        "label_names": {} if tr is None else tr["label_names"],
                        "tumour_ids": [] if tr is None else tr["tumour_ids"],
                        "measured": measured[b].copy(),
                        "proposed": pred[b].copy(),
                        "direct": None if direct_raw is None else direct_raw[b].copy(),
                        "x": x[b],
                        "cp": cp[b],
                    }
                )

    per_slice = {
        t: {m: {k: np.concatenate(v) for k, v in ms.items()} for m, ms in tab.items()}
        for t, tab in acc.items()
    }
    subj = np.asarray(ids["subject"])
    slc = np.asarray(ids["slice"], np.int64)
    baselines = {
        "ki_vs_reference": "baseline",
        "ki_vs_truth": "baseline",
        "suv_last_frame": None,
        "suv_last_frame_vs_truth": "measured",
    }
    summary = {t: summarize_table(per_slice[t], baselines[t]) for t in per_slice}
    per_subject = {
        t: {
            s: {
                m: {k: summarize(v[subj == s])["mean"] for k, v in vals.items()}
                for m, vals in per_slice[t].items()
            }
            for s in subjects
        }
        for t in per_slice
    }

    ba = bland_altman_groups(rois, roi_voxels, list(ki))
    ba_note = ROI_NOTE if has_truth else "No tumour ROIs: the cohort has no truth label map."
    boxes = {
        METHOD_LABELS[m]: per_slice["ki_vs_reference"][m]
        for m in tables["ki_vs_reference"]
        if m != "truth"
    }
    param_table = {k: tissue_bias(v, label_names) for k, v in param_sums.items()}
    figures = _write_figures(
        out_dir / "figures",
        examples,
        rois,
        ba,
        boxes,
        subj,
        subjects,
        windows,
        workdir,
        tissue_params=param_table,
    )

    frames_used = windows.frame_numbers()
    result_metrics = {
        "run": {
            "config": str(_config_value(config, "name", "unnamed")),
            "workdir": str(workdir),
            "subjects": subjects,
            "n_slices": int(slc.size),
            "n_early": n_early,
            "t_star_min": windows.t_star,
            "baseline_t_end_min": windows.baseline_t_end,
            "late_t_star_min": windows.late_t_star,
            "patlak_method": windows.method,
            "frames": frames_used,
            "truth": truth_note,
            "direct_ablation": has_direct,
            "checkpoint_step": step,
            "ablation_checkpoint_step": ablation_step,
            "seconds": None,
        },
        "conventions": conventions(windows, mask_threshold, ba_note),
        "labels": {m: METHOD_LABELS[m] for m in METHOD_LABELS},
        "tables": {
            t: {
                "reference": {
                    "ki_vs_reference": "reference",
                    "ki_vs_truth": "truth",
                    "suv_last_frame": "measured",
                    "suv_last_frame_vs_truth": "noisefree",
                }[t],
                "baseline": baselines[t],
                "methods": summary[t],
            }
            for t in summary
        },
        "per_subject": {
            t: {s: {"n_slices": int(np.sum(subj == s)), **per_subject[t][s]} for s in subjects}
            for t in per_subject
        },
        "bland_altman": {"note": ba_note, "n_rois": len(rois), **ba, "rois": rois},
        "tissues": {
            "note": TISSUE_NOTE if has_truth else "No truth label map: no per-tissue table.",
            **{k: tissue_bias(v, label_names) for k, v in tissue_sums.items() if has_truth},
            "params": param_table,
        },
        "figures": figures,
    }
    result_metrics["run"]["seconds"] = round(time.perf_counter() - t_start, 2)
    result_metrics = _as_json(result_metrics)
    table = report.format_text_tables(result_metrics)
    (out_dir / "metrics.json").write_text(json.dumps(result_metrics, indent=1, allow_nan=False))
    (out_dir / "report.md").write_text(report.markdown_report(result_metrics))
    _write_per_slice_csv(out_dir / "per_slice.csv", per_slice, subj, slc)
    logging.info("Evaluation written to %s (%.1f s).", out_dir, time.perf_counter() - t_start)
    return {
        "metrics": result_metrics,
        "table": table,
        "per_subject": result_metrics["per_subject"],
        "out_dir": str(out_dir),
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _latest_step(workdir) -> int | None:
    """The newest checkpoint's step in workdir (None if none)."""
    from kinetix import training

    steps = training.checkpoint_steps(workdir)
    return steps[-1] if steps else None


def run_cli(
    workdir, data=None, ablation_workdir=None, out=None, overwrite=False, step=None
) -> dict:
    """What `python -m kinetix.evaluate` does, callable (raises ValueError / OSError).

    Args:
      workdir: a trained run directory (config.json + checkpoints).
      data: a BIDS root to evaluate on (all its subjects); default: the run's test split.
      ablation_workdir: a trained direct ("without model") run evaluated beside it.
      out: output directory (default workdir/eval, or workdir/eval-step<step> with `step`).
      overwrite: replace an existing metrics.json in `out`.
      step: evaluate the checkpoints of this training step (the run's and the ablation's, which
        must both be on disk: `train.keep_checkpoint_steps`); default: each run's latest.

    Returns:
      `evaluate_run`'s result.
    """
    from kinetix import training

    workdir = pathlib.Path(workdir)
    for name, path in (("workdir", workdir), ("ablation_workdir", ablation_workdir)):
        if path is None:
            continue
        path = pathlib.Path(path)
        if not path.is_dir():
            raise ValueError(f"--{name} {path} does not exist.")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--{name} {path} has no config.json: it is not a kinetix training workdir."
            )
        if not (path / "checkpoints").is_dir():
            raise ValueError(
                f"--{name} {path} has no checkpoints: training has not saved a step yet."
            )
    if data is not None and not pathlib.Path(data).is_dir():
        raise ValueError(f"--data {data} does not exist.")
    if step is not None and (int(step) != step or step < 1):
        raise ValueError(f"--step must be a positive integer, got {step}.")
    default_out = workdir / ("eval" if step is None else f"eval-step{int(step)}")
    out_dir = pathlib.Path(out) if out else default_out
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ValueError(
            f"{out_dir / 'metrics.json'} exists; pass --overwrite or choose another --out."
        )
    # The step is resolved before loading, so the one restored is the one recorded.
    run_step = step if step is not None else _latest_step(workdir)
    config, predict_fn, cohort, splits = training.load_for_inference(workdir, data, run_step)
    subjects = list(cohort.subjects) if data else list(splits.get("test", []))
    if not subjects:
        raise ValueError(f"{workdir} has no test subjects (splits.json); pass --data BIDS.")
    ablation_fn, abl_step = None, None
    if ablation_workdir is not None:
        abl_data = data or config.data.root or str(workdir / "data")
        abl_step = step if step is not None else _latest_step(ablation_workdir)
        abl_config, ablation_fn, _, _ = training.load_for_inference(
            ablation_workdir, abl_data, abl_step
        )
        if abl_config.model.kind != "direct":
            logging.warning(
                "--ablation_workdir %s holds a %r model, not 'direct'.",
                ablation_workdir,
                abl_config.model.kind,
            )
    return evaluate_run(
        config,
        workdir,
        cohort,
        subjects,
        predict_fn,
        ablation_fn=ablation_fn,
        out_dir=out_dir,
        step=run_step,
        ablation_step=abl_step,
    )


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", None, "Trained run directory (config.json + checkpoints).")
    flags.DEFINE_string("data", None, "BIDS-PET root to evaluate (default: the run's test split).")
    flags.DEFINE_string("ablation_workdir", None, "Trained direct (no-model) run to compare.")
    flags.DEFINE_string(
        "out", None, "Output directory (default: <workdir>/eval, or <workdir>/eval-step<N>)."
    )
    flags.DEFINE_integer(
        "step",
        None,
        "Evaluate the checkpoints of this training step (run and ablation; keep them with "
        "--config.train.keep_checkpoint_steps); default: the latest.",
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing evaluation in the output directory.")
    return flags.FLAGS


def main(argv):
    """absl entry point: prints the comparison table, or one error sentence and exits 2."""
    flags_ = _FLAGS
    if len(argv) > 1:
        print(f"kinetix.evaluate: error: unexpected arguments {argv[1:]}.", file=sys.stderr)
        sys.exit(2)
    if not flags_.workdir:
        print("kinetix.evaluate: error: --workdir is required.", file=sys.stderr)
        sys.exit(2)
    try:
        result = run_cli(
            flags_.workdir,
            flags_.data,
            flags_.ablation_workdir,
            flags_.out,
            flags_.overwrite,
            flags_.step,
        )
    except (ValueError, OSError) as err:
        print(f"kinetix.evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["table"])
    print(f"\nReport: {pathlib.Path(result['out_dir']) / 'report.md'}")


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()
    jax.config.parse_flags_with_absl()
    app.run(main)
