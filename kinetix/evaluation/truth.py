"""The ground truth of simulated cohorts (`derivatives/truth`): where it is, and what a slice needs.

`find_truth_root` locates the truth of every evaluated subject (or says why there is none: a
truth derivative is optional, so an incomplete one only drops the truth columns, never the run),
`load_truth` reads one subject's true Ki, labels, 2TCM parameters and noise-free frames, and
`TruthCache` keeps the subjects of the current batch. Ki in mL/min/mL, frames in SUV.
"""

import pathlib

import numpy as np
from absl import logging

from kinetix.data import bids

TUMOUR_NAME_PARTS = ("nodule", "tumo", "lesion")
"""A truth label whose name contains one of these is a tumour."""


TRUTH_FILES = ("noisefree", "ki", "labels", "label_table")
"""The files of `kinetix.data.bids.truth_paths` that the evaluation reads for each subject."""


def truth_gap(root, subject) -> str | None:
    """What keeps ``subject``'s truth under ``root`` from being used (None: nothing)."""
    paths = bids.truth_paths(root, subject)
    if not paths["dir"].is_dir():
        return "no directory"
    absent = [paths[k].name for k in TRUTH_FILES if not paths[k].is_file()]
    return f"no {', '.join(absent)}" if absent else None


def find_truth_root(cohort, subjects, truth_root=None) -> tuple[pathlib.Path | None, str]:
    """The BIDS root holding `derivatives/truth/<subject>` for every subject, if any.

    Args:
      cohort: the cohort (`root` attribute or the first study's `pet_path` locate the dataset).
      subjects: the evaluated subjects.
      truth_root: an explicit root (then every subject must have a truth directory).

    Returns:
      (root or None, a sentence explaining the outcome).
    """

    def missing(root):
        return [f"{s} ({why})" for s in subjects if (why := truth_gap(root, s))]

    if truth_root is not None:
        root = pathlib.Path(truth_root)
        lacking = missing(root)
        if lacking:
            raise ValueError(
                f"truth_root {root} has no complete derivatives/truth for {', '.join(lacking[:3])}."
            )
        return root, f"true Ki read from {root}/derivatives/truth"
    candidates = []
    if getattr(cohort, "root", None):
        candidates.append(pathlib.Path(cohort.root))
    pet_path = getattr(cohort.study(subjects[0]), "pet_path", None)
    if pet_path is not None:
        candidates.extend(pathlib.Path(pet_path).resolve().parents)
    for root in candidates:
        if (root / "derivatives" / "truth").is_dir():
            lacking = missing(root)
            if lacking:
                note = (
                    f"no true Ki: {root}/derivatives/truth is incomplete for "
                    f"{', '.join(lacking[:3])}{' …' if len(lacking) > 3 else ''}"
                )
                logging.warning("%s; the evaluation goes on without the truth.", note)
                return None, note
            return root, f"true Ki read from {root}/derivatives/truth"
    return None, "no true Ki: the cohort has no derivatives/truth (not simulated)"


def load_truth(root, subject, cohort, grid, n_early: int | None = None) -> dict:
    """One subject's truth.

    Args:
      root: the BIDS root with `derivatives/truth`.
      subject: the subject name.
      cohort: the cohort (its study gives the SUV factor).
      grid: (X, Y, Z) of the subject's PET volume.
      n_early: frames the network sees; with it, the late noise-free mean is computed.

    Returns:
      {"ki": [X, Y, Z] true Ki, "labels": [X, Y, Z] int, "label_names": {id: name},
      "tumour_ids": tumour label ids, "params": {name: [X, Y, Z]} the 2TCM maps it has,
      "last_frame_suv": [X, Y, Z] noise-free last frame (SUV), "late_suv": [X, Y, Z] mean of the
      noise-free frames ≥ n_early (SUV) or None}.
    """
    t = bids.read_truth(root, subject)
    if t["ki"].shape != tuple(grid):
        raise ValueError(
            f"The true Ki of {subject} has shape {t['ki'].shape} but its PET grid is {tuple(grid)}."
        )
    tumour_ids = [
        i
        for i, name in t["label_names"].items()
        if any(p in name.lower() for p in TUMOUR_NAME_PARTS)
    ]
    suv = np.float32(cohort.study(subject).suv_factor)
    return {
        "ki": t["ki"],
        "labels": t["labels"],
        "label_names": t["label_names"],
        "tumour_ids": tumour_ids,
        "params": t["params"],
        "last_frame_suv": t["noisefree"][..., -1] * suv,
        "late_suv": None if n_early is None else t["noisefree"][..., n_early:].mean(-1) * suv,
    }


class TruthCache:
    """The truth of the subjects of the current batch (subjects of earlier batches are dropped,
    so memory holds a batch's subjects only; `pipeline.eval_batches` goes subject by subject)."""

    def __init__(self, root, cohort, n_early: int):
        self.root, self.cohort, self.n_early = root, cohort, n_early
        self._cache: dict[str, dict] = {}

    def batch(self, names: list[str]) -> list[dict]:
        """The truth of each slice's subject, one dict (`load_truth`) per name."""
        for s in set(names) - set(self._cache):
            grid = self.cohort.study(s).frames.shape[:3]
            self._cache[s] = load_truth(self.root, s, self.cohort, grid, self.n_early)
        for s in set(self._cache) - set(names):
            del self._cache[s]
        return [self._cache[s] for s in names]
