"""The population input of a run: the training subjects' plasma shape, for 35-minute scans.

A 35-minute protocol has no blood after 35 min; the "population" late input
(`kinetix.data.late_input`) completes a subject's curve with the median shape of the training
cohort's curves, scaled to the subject's own first 35 minutes. Training learns that shape from
its training split and stores it in the workdir (`POPULATION_FILE`), so that `kinetix.predict`,
`kinetix.parametric` and the evaluation can use it without the training data.
"""

import json
import pathlib
from collections.abc import Sequence

from absl import logging

from kinetix.data import late_input, pipeline
from kinetix.training.cohort import scan_choice
from kinetix.training.config import load_config

POPULATION_FILE = "population_input.json"
"""The population input of a run, in its workdir (`PopulationInput.to_json`)."""


def population_path(workdir) -> pathlib.Path:
    """``workdir / POPULATION_FILE``."""
    return pathlib.Path(workdir) / POPULATION_FILE


def write_population(workdir, cohort, subjects: Sequence[str], input_points: int) -> pathlib.Path:
    """Learns the population input of `subjects` (their plasma curves as the network sees them,
    `input_points` samples each) and writes it to the workdir; returns the path.

    Args:
      workdir: the run directory.
      cohort: a `kinetix.data.pipeline.Cohort` (`curves`).
      subjects: the training subjects (at least one).
      input_points: samples per curve (``config.data.input_points``).
    """
    curves = [cohort.curves(s, input_points)[:2] for s in subjects]
    t_end = float(cohort.schedule.end[-1])
    population = late_input.learn_population(curves, t_end=t_end)
    path = population_path(workdir)
    population.to_json(path)
    logging.info("Population input of %d training subjects: %s", len(curves), path)
    return path


def read_population(workdir):
    """The run's stored `PopulationInput`, or None when the workdir has none."""
    path = population_path(workdir)
    return late_input.PopulationInput.from_json(path) if path.is_file() else None


def run_population(workdir, cohort=None):
    """The run's `PopulationInput`: the stored one, or, for a run trained before kinetix
    stored it, learnt again (not written) from the training subjects of its ``splits.json``,
    read from `cohort` or the run's data (``config.data.root`` or ``workdir/data``).

    Returns:
      The `PopulationInput`, or None when the run has neither the file nor its training data.
    """
    found = read_population(workdir)
    if found is not None:
        return found
    workdir = pathlib.Path(workdir)
    splits = workdir / "splits.json"
    if not splits.is_file() or not (workdir / "config.json").is_file():
        return None
    config = load_config(workdir)
    if cohort is None:
        root = pathlib.Path(config.data.root or workdir / "data")
        if not (root / "participants.tsv").is_file():
            return None
        cohort = pipeline.Cohort.from_bids(root, check_plausibility=False, **scan_choice(config))
    train = [s for s in json.loads(splits.read_text()).get("train", []) if s in cohort.subjects]
    if not train:
        return None
    logging.info("%s has no %s: learning it from its %d training subjects.",
                 workdir, POPULATION_FILE, len(train))  # fmt: skip
    curves = [cohort.curves(s, int(config.data.input_points))[:2] for s in train]
    return late_input.learn_population(curves, t_end=float(cohort.schedule.end[-1]))
