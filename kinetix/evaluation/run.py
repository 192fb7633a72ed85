"""The held-out evaluation of a trained run: Ki maps by every route, per-slice metrics, ROIs.

    evaluate_run(config, workdir, cohort, subjects, predict_fn, ablation_fn=...)   # library
    evaluate_workdir(workdir, data=..., ablation_workdir=...)   # `python -m kinetix.evaluate`

For every slice of the held-out subjects, Patlak Ki maps (TPCCLIB convention: ∫0^{t_mid} Cp /
frame-mean Cp, frames chosen by mid-time) are computed by every available Ki route
(`kinetix.evaluation.routes`: the 65-min reference, the 30-min baseline, the proposed splice of
measured and predicted frames, the authors' predicted-only variant, the same for the direct
"without model" ablation when `ablation_fn` is given, and the simulator's true Ki when every
subject has one). Every Ki and SUV map is multiplied by the body mask of the batch before any
metric. Metrics follow the authors' code (`metrics.batch_slice_metrics`, per 2-D slice); SUV
metrics use the last frame. Tumour ROIs and Bland–Altman statistics, per-tissue means against
the truth, and the network's 2TCM parameters per tissue (when it returns them) complete it.

The steps: `_setup` (config → windows, routes, tables), `_accumulate` (batch by batch into the
accumulators of `kinetix.evaluation.accumulate`), `_summaries`, `_draw` (figures), `_metrics`
(the metrics.json dict) and `_write` (metrics.json, report.md, per_slice.csv).
"""

import dataclasses
import json
import pathlib
import time

import numpy as np
from absl import logging

from kinetix import inference
from kinetix.data import bids, pipeline
from kinetix.evaluation import accumulate as acc
from kinetix.evaluation import fits, late, report
from kinetix.evaluation import routes as kr
from kinetix.evaluation import tables as kt
from kinetix.evaluation.truth import TruthCache, find_truth_root
from kinetix.figures.evaluation import write_figures
from kinetix.training.checkpoint import DamagedCheckpoint


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What an evaluation is: its directories, subjects, windows, routes and tables."""

    workdir: pathlib.Path
    out_dir: pathlib.Path
    name: str
    subjects: list
    windows: kr.KiWindows
    batch_size: int
    input_points: int
    mask_threshold: float
    max_figures: int
    truth_root: pathlib.Path | None
    truth_note: str
    routes: list
    tables: dict

    @property
    def has_truth(self) -> bool:
        return self.truth_root is not None


def _config_value(config, path, default=None):
    node = config
    for part in path.split("."):
        if part not in node:
            if default is not None:
                return default
            raise ValueError(f"The config lacks the field config.{path}.")
        node = node[part]
    return node


def _setup(config, workdir, cohort, subjects, out_dir, truth_root, predictions) -> _Setup:
    """Reads the config, finds the truth and derives the routes and tables."""
    workdir = pathlib.Path(workdir)
    subjects = list(subjects)
    if not subjects:
        raise ValueError("subjects is empty: there are no held-out subjects to evaluate.")
    windows = kr.KiWindows(
        schedule=cohort.schedule,
        n_early=int(_config_value(config, "model.n_early")),
        t_star=float(_config_value(config, "kinetics.t_star")),
        baseline_t_end=float(_config_value(config, "eval.baseline_t_end")),
        method=str(_config_value(config, "eval.method")),
    )
    root, truth_note = find_truth_root(cohort, subjects, truth_root)
    routes = kr.available_routes(predictions, root is not None)
    return _Setup(
        workdir=workdir,
        out_dir=pathlib.Path(out_dir) if out_dir is not None else workdir / "eval",
        name=str(_config_value(config, "name", "unnamed")),
        subjects=subjects,
        windows=windows,
        batch_size=int(_config_value(config, "train.eval_batch_size")),
        input_points=int(_config_value(config, "data.input_points")),
        mask_threshold=float(_config_value(config, "data.mask_threshold")),
        max_figures=int(_config_value(config, "eval.max_figures")),
        truth_root=root,
        truth_note=truth_note,
        routes=routes,
        tables=kt.table_methods(routes, predictions, root is not None),
    )


def _accumulate(setup: _Setup, cohort, predictors: dict) -> dict:
    """Feeds every batch of the held-out slices to the accumulators; returns them by name."""
    n_early = setup.windows.n_early
    sinks = {
        "scores": acc.SliceScores(setup.tables),
        "tissues": acc.TissueSums(n_early),
        "rois": acc.TumourRois(),
        "examples": acc.FigureExamples(cohort, setup.subjects, setup.max_figures),
    }
    truth = TruthCache(setup.truth_root, cohort, n_early) if setup.has_truth else None
    batches = pipeline.eval_batches(
        cohort,
        setup.subjects,
        setup.batch_size,
        input_points=setup.input_points,
        mask_threshold=setup.mask_threshold,
    )
    for batch in batches:
        maps = acc.batch_maps(batch, cohort, predictors, setup.routes, setup.windows, truth)
        if maps is not None:
            for sink in sinks.values():
                sink.add(maps)
    return sinks


def _summaries(setup: _Setup, sinks: dict) -> dict:
    """Per-slice values, table summaries, per-subject means, Bland–Altman, tissue tables."""
    scores, rois, tissues = sinks["scores"], sinks["rois"], sinks["tissues"]
    per_slice = scores.per_slice()
    subj = np.asarray(scores.subjects)
    table_summary = {t: kt.summarize_table(per_slice[t], kt.TABLES[t].baseline) for t in per_slice}
    per_subject = {
        t: {
            s: {
                "n_slices": int(np.sum(subj == s)),
                **{
                    m: {k: kt.summarize(v[subj == s])["mean"] for k, v in vals.items()}
                    for m, vals in per_slice[t].items()
                },
            }
            for s in setup.subjects
        }
        for t in per_slice
    }
    names = tissues.label_names
    return {
        "per_slice": per_slice,
        "subjects": subj,
        "slices": np.asarray(scores.slices, np.int64),
        "tables": table_summary,
        "per_subject": per_subject,
        "bland_altman": kt.bland_altman_groups(
            rois.rois, rois.voxels, [r.name for r in setup.routes]
        ),
        "tissues": {k: kt.tissue_bias(v, names) for k, v in tissues.sums.items()},
        "params": {k: kt.tissue_bias(v, names) for k, v in tissues.params.items()},
    }


def _roi_curves(setup: _Setup, example: dict, roi: np.ndarray) -> dict:
    """ROI-mean TACs of a figure slice and the Patlak fits of its measured and spliced routes."""
    curves = {"measured": example["measured"][roi].mean(axis=0)}
    curves.update({k: p[roi].mean(axis=0) for k, p in example["predictions"].items()})
    x, cp = example["x"], example["cp"]
    fits = kr.roi_fits(setup.routes, setup.windows, curves, x, cp)
    return {"x": x, "cp": cp, "curves": curves, "fits": fits}


def _draw(setup: _Setup, sinks: dict, summary: dict) -> list[dict]:
    """Draws the report's figures; returns their records (metrics.json "figures")."""
    labels = kr.method_labels()
    ki_table = summary["per_slice"]["ki_vs_reference"]
    boxes = {
        labels[r.name]: ki_table[r.name]
        for r in setup.routes
        if r.name in ki_table and r.frames != kr.TRUTH
    }
    return write_figures(
        setup.out_dir / "figures",
        examples=sinks["examples"].examples,
        rois=sinks["rois"].rois,
        bland_altman=summary["bland_altman"],
        boxes=boxes,
        slice_subjects=summary["subjects"],
        subjects=setup.subjects,
        labels=labels,
        schedule=setup.windows.schedule,
        n_early=setup.windows.n_early,
        roi_curves=lambda example, roi: _roi_curves(setup, example, roi),
        metrics_jsonl=setup.workdir / "metrics.jsonl",
        tissue_params=summary["params"],
    )


def _run_record(setup: _Setup, n_slices: int, has_ablation: bool, steps) -> dict:
    """metrics.json "run": what was evaluated, how, and with which checkpoints."""
    w = setup.windows
    return {
        "config": setup.name,
        "workdir": str(setup.workdir),
        "subjects": setup.subjects,
        "n_slices": n_slices,
        "n_early": w.n_early,
        "t_star_min": w.t_star,
        "baseline_t_end_min": w.baseline_t_end,
        "late_t_star_min": w.late_t_star,
        "patlak_method": w.method,
        "frames": w.frame_numbers(),
        "truth": setup.truth_note,
        "direct_ablation": has_ablation,
        "checkpoint_step": steps[0],
        "ablation_checkpoint_step": steps[1],
        "seconds": None,
    }


def _metrics(setup: _Setup, sinks: dict, summary: dict, figures, has_ablation, steps) -> dict:
    """The metrics.json dict (NumPy values, non-finite floats as they are; `as_json` follows)."""
    rois = sinks["rois"].rois
    ba_note = (
        kt.ROI_NOTE if setup.has_truth else "No tumour ROIs: the cohort has no truth label map."
    )
    tissue_note = kt.TISSUE_NOTE if setup.has_truth else "No truth label map: no per-tissue table."
    tissues = summary["tissues"] if setup.has_truth else {}
    return {
        "run": _run_record(setup, int(summary["slices"].size), has_ablation, steps),
        "conventions": report.conventions(
            setup.windows, setup.mask_threshold, ba_note, kr.ROUTES.values()
        ),
        "labels": kr.method_labels(),
        "tables": {
            t: {
                "reference": kt.TABLES[t].reference,
                "baseline": kt.TABLES[t].baseline,
                "methods": methods,
            }
            for t, methods in summary["tables"].items()
        },
        "per_subject": summary["per_subject"],
        "bland_altman": {
            "note": ba_note,
            "n_rois": len(rois),
            **summary["bland_altman"],
            "rois": rois,
        },
        "tissues": {"note": tissue_note, **tissues, "params": summary["params"]},
        "figures": figures,
    }


def _write(out_dir: pathlib.Path, metrics: dict, summary: dict) -> str:
    """Writes metrics.json, report.md and per_slice.csv; returns the printed text table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.format_text_tables(metrics)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    (out_dir / "report.md").write_text(report.markdown_report(metrics))
    kt.write_per_slice_csv(
        out_dir / "per_slice.csv", summary["per_slice"], summary["subjects"], summary["slices"]
    )
    return table


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
    predictors = {"proposed": ("predict_fn", predict_fn)}
    if ablation_fn is not None:
        predictors["direct"] = ("ablation_fn", ablation_fn)
    if _config_value(config, "eval.fit_2tcm", False):  # the voxelwise 2TCM fit baselines
        for name, kind in fits.FIT_PREDICTIONS.items():
            predictors[name] = (name, fits.make_fit_predictor(config, cohort.schedule, kind))
    cohort, late_record = late.late_input_view(
        _config_value(config, "eval.late_input", "measured"),
        _config_value(config, "eval.late_sample_min", 0.0),
        int(config.model.n_early),
        workdir,
        cohort,
        subjects,
    )
    setup = _setup(config, workdir, cohort, subjects, out_dir, truth_root, list(predictors))
    logging.info("Evaluating %d subjects (%s).", len(setup.subjects), setup.truth_note)
    steps = (
        None if step is None else int(step),
        None if ablation_fn is None or ablation_step is None else int(ablation_step),
    )
    sinks = _accumulate(setup, cohort, predictors)
    summary = _summaries(setup, sinks)
    figures = _draw(setup, sinks, summary)
    metrics = _metrics(setup, sinks, summary, figures, ablation_fn is not None, steps)
    if late_record is not None:
        metrics["late_input"] = late_record
    metrics["run"]["seconds"] = round(time.perf_counter() - t_start, 2)
    metrics = kt.as_json(metrics)
    table = _write(setup.out_dir, metrics, summary)
    logging.info("Evaluation written to %s (%.1f s).", setup.out_dir, time.perf_counter() - t_start)
    return {
        "metrics": metrics,
        "table": table,
        "per_subject": metrics["per_subject"],
        "out_dir": str(setup.out_dir),
    }


# ----------------------------------------------------------------------------------------------
# A trained run directory (what `python -m kinetix.evaluate` does)
# ----------------------------------------------------------------------------------------------
def _check_workdir(name: str, path) -> None:
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ValueError(f"--{name} {path} does not exist.")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--{name} {path} has no config.json: it is not a kinetix training workdir."
        )
    if not (path / "checkpoints").is_dir():
        raise ValueError(f"--{name} {path} has no checkpoints: training has not saved a step yet.")


def _latest_step(workdir) -> int | None:
    """The newest checkpoint's step in workdir (None if none)."""
    steps = inference.checkpoint_steps(workdir)
    return steps[-1] if steps else None


def _load(workdir, data, step, entities):
    """`inference.load_for_inference`, given `entities` (the scans' filter) only when set."""
    if entities is None:
        return inference.load_for_inference(workdir, data, step)
    return inference.load_for_inference(workdir, data, step, entities=entities)


def _load_run(workdir, data, step, entities=None):
    """(step, load_for_inference(...)) of ``step``, or of the newest intact checkpoint when
    ``step`` is None (a damaged one is reported and skipped)."""
    if step is not None:
        return step, _load(workdir, data, step, entities)
    steps = inference.checkpoint_steps(workdir)
    if not steps:  # load_for_inference says so in a sentence
        return None, _load(workdir, data, None, entities)
    for k in reversed(steps):
        try:
            return k, _load(workdir, data, k, entities)
        except DamagedCheckpoint as err:
            logging.warning("%s; trying the next older checkpoint.", str(err).rstrip("."))
    raise DamagedCheckpoint(f"every checkpoint in {workdir}/checkpoints is damaged.")


def _load_ablation(ablation_workdir, data, step, entities=None):
    """(predict_fn, step) of the direct ablation run, restored on `data` (a BIDS root) with the
    scans that `entities` choose."""
    abl_step = step if step is not None else _latest_step(ablation_workdir)
    abl_config, ablation_fn, _, _ = _load(ablation_workdir, data, abl_step, entities)
    if abl_config.model.kind != "direct":
        logging.warning(
            "--ablation_workdir %s holds a %r model, not 'direct'.",
            ablation_workdir,
            abl_config.model.kind,
        )
    return ablation_fn, abl_step


def evaluate_workdir(
    workdir,
    data=None,
    ablation_workdir=None,
    out=None,
    overwrite=False,
    step=None,
    late_input=None,
    late_sample_min=None,
    entities=None,
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
      late_input: overrides ``config.eval.late_input`` ("measured", "fit" or "population":
        evaluate a 35-min protocol, `kinetix.evaluation.late`).
      late_sample_min: overrides ``config.eval.late_sample_min`` (a late plasma sample's time;
        0: none).
      entities: overrides ``config.data.entities``, the BIDS entities that choose each
        subject's scan (text, e.g. "ses-followup"; "" for none); default: the run's.

    Returns:
      `evaluate_run`'s result.
    """
    workdir = pathlib.Path(workdir)
    _check_workdir("workdir", workdir)
    if ablation_workdir is not None:
        _check_workdir("ablation_workdir", ablation_workdir)
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
    bids.check_writable_dir(out_dir, "output directory (--out)")  # before any computation
    # The step is resolved with the loading, so the one restored is the one recorded.
    run_step, (config, predict_fn, cohort, splits) = _load_run(workdir, data, step, entities)
    subjects = list(cohort.subjects) if data else list(splits.get("test", []))
    with config.unlocked():
        if late_input is not None:
            config.eval.late_input = str(late_input)
        if late_sample_min is not None:
            config.eval.late_sample_min = float(late_sample_min)
    if not subjects:
        raise ValueError(f"{workdir} has no test subjects (splits.json); pass --data BIDS.")
    ablation_fn = abl_step = None
    if ablation_workdir is not None:
        abl_data = data or config.data.root or str(workdir / "data")
        ablation_fn, abl_step = _load_ablation(
            ablation_workdir, abl_data, step, config.data.entities
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
