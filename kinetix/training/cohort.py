"""The training cohort: a BIDS root or a simulated cohort, and its subject split."""

import pathlib

import jax
from absl import logging

from kinetix.data import bids, pipeline
from kinetix.data.phantom.cohort import simulate_cohort, simulation_config


def build_cohort(config, workdir: pathlib.Path):
    """The cohort: `config.data.root` (BIDS), or a cohort simulated once into workdir/data."""
    root = config.data.root
    if not root:
        root = workdir / "data"
        # Only process 0 decides and writes; participants.tsv is written last.
        if jax.process_index() == 0 and not (root / "participants.tsv").exists():
            cfg, n_subjects, seed = simulation_config(config)
            logging.info("No data root: simulating %d subjects into %s", n_subjects, root)
            simulate_cohort(root, n_subjects, seed, cfg, overwrite=True)
        if jax.process_count() > 1:
            # Every process waits, simulated or not: one that saw participants.tsv and skipped
            # the barrier would leave process 0 waiting in it forever.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kinetix: simulated cohort written")
    return pipeline.Cohort.from_bids(
        root, check_plausibility=config.data.check_plausibility, **scan_choice(config)
    )


def scan_choice(config) -> dict:
    """The `Cohort.from_bids` keywords that choose each subject's scan and blood recording:
    ``config.data.entities`` as filters and ``config.data.recording`` ("" = the default)."""
    data = config.data
    recording = str(data.get("recording", "") or "") or None
    if recording is not None:
        bids.entities.check_label("recording", recording, "config.data.recording")
    return {
        "filters": bids.parse_entities(data.get("entities", ""), "config.data.entities"),
        "recording": recording,
    }


def split_seed(config) -> int:
    """The subject split's seed: ``config.data.split_seed``, or ``config.seed`` when it is < 0."""
    seed = int(config.data.split_seed)
    return int(config.seed) if seed < 0 else seed


def split_cohort(config, cohort):
    return pipeline.split_subjects(
        cohort.subjects,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=split_seed(config),
        val=list(config.data.val_subjects) or None,
        test=list(config.data.test_subjects) or None,
    )
