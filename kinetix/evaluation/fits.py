"""The voxelwise 2TCM fit as a predictor: the baseline a kinetic modeller would try first.

A fit predictor takes a batch of evaluation slices like a network does and returns, for every
body voxel, the 2TCM fitted to the measured frames inside its window (`kinetix.maps.volume_fit`
on the batch's own plasma and whole-blood curves, the curves the Patlak routes use) and the
fitted model's frames over the whole schedule (`kinetix.maps.fitted_frames`): for the window
0–35 min, the fit extrapolated to 65 min. The Ki routes "fit35_rates", "fit35" (spliced, then
Patlak) and "fit65_rates" (`kinetix.evaluation.routes`) use them.
"""

import numpy as np

import kinetix.kinetics as kk
from kinetix import maps

CURVE_KEYS = ("plasma_times", "plasma", "whole_blood")

FIT_PREDICTIONS = {"fit35": "early", "fit65": "full"}
"""The fit predictions and their windows: "early" = the network's input frames (0–35 min),
"full" = the whole scan (0–65 min)."""


def fit_window(kind: str, schedule: kk.FrameSchedule, n_early: int) -> tuple[float, float]:
    """(start, end) in min of a fit prediction's window."""
    end = schedule.end[n_early - 1] if kind == "early" else schedule.end[-1]
    return 0.0, float(end)


def make_fit_predictor(config, schedule: kk.FrameSchedule, kind: str):
    """batch -> {"frames": [B, H, W, T] fitted-model frames, "params": [B, H, W, 5]}.

    Args:
      config: the run's config (``eval.fit_*`` settings, ``kinetics``, ``model.n_early``).
      schedule: the cohort's T-frame schedule (min).
      kind: "early" (fit 0–35 min) or "full" (fit the whole scan).
    """
    window = fit_window(kind, schedule, int(config.model.n_early))
    lam = float(config.kinetics.decay_constant)
    use_wb = bool(config.kinetics.use_whole_blood)
    options = dict(
        model="2tcm",
        window=window,
        weights=config.eval.fit_weights,
        n_starts=int(config.eval.fit_starts),
        max_steps=int(config.eval.fit_max_steps),
        chunk_voxels=int(config.eval.fit_chunk_voxels),
    )

    def predict(batch):
        # The full-scan fit stands for the full hour: the measured input, also when the
        # protocol's input was completed past the early frames (`Cohort.with_input`).
        prefix = "reference_" if kind == "full" and "reference_plasma" in batch else ""
        frames = np.asarray(batch["frames"], np.float32)
        body = (np.asarray(batch["mask"]) > 0) & (np.asarray(batch["valid"]) > 0)[:, None, None]
        out_frames = np.zeros_like(frames)
        out_params = np.zeros(frames.shape[:3] + (5,), np.float32)
        subjects = np.asarray(batch["subject"])
        for s in np.unique(subjects[body.any(axis=(1, 2))]):  # one fit call per input curve
            b = int(np.flatnonzero(subjects == s)[0])
            rows = body & (subjects == s)[:, None, None]
            times, plasma, whole_blood = (batch[prefix + k][b] for k in CURVE_KEYS)
            inp = kk.SampledInput(times, plasma)
            blood = kk.SampledInput(times, whole_blood)
            blood = blood if use_wb else None
            res = maps.volume_fit(
                frames[rows], inp, schedule, np.ones(rows.sum(), bool), blood=blood, **options
            )
            out_params[rows] = res["params"]
            fitted = maps.fitted_frames(res["params"], res["delay"], inp, schedule, blood, lam)
            out_frames[rows] = np.asarray(fitted)
        return {"frames": out_frames, "params": out_params}

    return predict
