"""The evaluation of a 35-minute protocol: every subject's input after the early frames is
replaced by its completion from the first 35 minutes (``config.eval.late_input``).

With "fit" or "population" the cohort is viewed through `Cohort.with_input`: the network, its
Patlak term and 2TCM frames, and every Ki route see the completed input, except the routes that
stand for the full-hour scan (`Route.full_input`: the 65-min reference and the 0–65 min fit),
which keep the measured one. The error of the completed Cp is reported as the relative error of
its integral over 35–65 min (`kinetix.data.late_input.auc_error`), per subject.
"""

import dataclasses

import numpy as np
from absl import logging

from kinetix.data import late_input
from kinetix.inference import late
from kinetix.training import population as population_lib


def late_input_view(how: str, sample_time, n_early: int, workdir, cohort, subjects):
    """(the cohort the evaluation reads, the "late_input" record of metrics.json or None).

    Args:
      how: ``config.eval.late_input``: "measured", "fit" or "population".
      sample_time: ``config.eval.late_sample_min``: a late plasma sample's time (min), read
        off the measured curve; 0 or None: none.
      n_early: ``config.model.n_early``: Cp is completed after the end of these frames.
      workdir: the run directory (its population input).
      cohort: the evaluated `Cohort`.
      subjects: the evaluated subjects (their AUC errors are recorded).

    Raises:
      ValueError: an unknown choice, or a subject whose input cannot be completed (one
        sentence naming it).
    """
    how = str(how)
    if how not in late.LATE_INPUTS:
        raise ValueError(
            f"config.eval.late_input must be one of {', '.join(late.LATE_INPUTS)}, got {how!r}."
        )
    if how == "measured":
        return cohort, None
    t_cut = float(cohort.schedule.end[int(n_early) - 1])
    t_end = float(cohort.schedule.end[-1])
    sample_time = float(sample_time or 0.0) or None
    if sample_time is not None and not t_cut < sample_time <= t_end:
        raise ValueError(
            f"config.eval.late_sample_min = {sample_time:g} must lie in ({t_cut:g}, {t_end:g}] "
            "min (0: no late sample)."
        )
    population = None
    if how == "population":
        population = population_lib.run_population(workdir, cohort)
        if population is None:
            raise ValueError(
                f"config.eval.late_input = 'population' needs "
                f"{population_lib.population_path(workdir)} or the run's splits.json with its "
                "training subjects in the evaluated cohort to learn it from."
            )
    complete = late.complete_fn(
        how, t_cut=t_cut, t_end=t_end, population=population, sample_time=sample_time
    )
    errors, completed = {}, {}
    for subject in subjects:
        study = cohort.study(subject)
        try:
            done = complete(study)
        except ValueError as err:
            raise ValueError(f"{subject}: {err}") from None
        errors[subject] = late_input.auc_error(
            study.plasma_times, study.plasma, done.plasma_times, done.plasma, t_cut, t_end
        )
        # The curves only: the studies' frames stay with the cohort's cache.
        completed[subject] = (done.plasma_times, done.plasma, done.whole_blood)
    values = np.asarray(list(errors.values()), np.float64)
    record = {
        "method": how,
        "t_cut_min": t_cut,
        "t_end_min": t_end,
        "late_sample_min": sample_time,
        "note": f"Cp after {t_cut:g} min completed by '{how}' from the blood up to {t_cut:g} min"
        + (f" and one plasma sample at {sample_time:g} min" if sample_time else "")
        + "; the 65-min reference and the 0-65 fit keep the measured input. AUC error = "
        f"relative error of the integral of Cp over {t_cut:g}-{t_end:g} min.",
        "auc_error": {
            "median": float(np.median(values)),
            "median_abs": float(np.median(np.abs(values))),
            "max_abs": float(np.max(np.abs(values))),
            "per_subject": errors,
        },
    }
    logging.info(
        "Late input '%s': median |AUC error| %.2f %% over %d subjects.",
        how,
        100 * record["auc_error"]["median_abs"],
        len(errors),
    )

    def completed_once(study):  # the fits above serve the view (fitting is the costly part)
        if study.subject not in completed:
            return complete(study)
        times, plasma, whole_blood = completed[study.subject]
        return dataclasses.replace(
            study, plasma_times=times, plasma=plasma, whole_blood=whole_blood
        )

    return cohort.with_input(completed_once), record
