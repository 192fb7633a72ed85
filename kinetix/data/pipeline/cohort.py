"""`Cohort` (lazy or in-memory set of subjects read slice by slice) and `split_subjects`.

See the `kinetix.data.pipeline` module docstring for the batch layout and the memory notes on
the LRU cache. Import these names from `kinetix.data.pipeline`.
"""

import collections
import copy
import dataclasses
import json
import math
import pathlib
import threading
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from kinetix.data import bids
from kinetix.data.bids import Study
from kinetix.data.bids.read import read_schedule
from kinetix.data.pipeline.batch import REFERENCE_KEYS, input_curves, slice_example
from kinetix.data.pipeline.curves import DEFAULT_INPUT_POINTS, DEFAULT_MASK_THRESHOLD
from kinetix.kinetics.frames import FrameSchedule
from kinetix.maps.mask import reference_level, threshold_mask, time_average

DEFAULT_CACHE_SIZE = 4
"""Fewest decoded studies `Cohort.from_bids` keeps (each ~0.5 GB at paper size)."""

DEFAULT_CACHE_BYTES = 2 * 2**30
"""Memory for decoded studies that `Cohort.from_bids` may use by default: small cohorts (the
demo's 24 subjects are 90 MB) are then decoded once instead of once per cache miss."""

SCHEDULE_ATOL_MIN = 1e-4
"""Frame times (min) of two subjects agree when within this (6 ms; BIDS stores seconds)."""


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    """What a cohort knows about a subject without decoding its image."""

    shape: tuple[int, int, int]  # (X, Y, Z)
    schedule: FrameSchedule
    path: pathlib.Path | None  # PET image, or None for in-memory studies
    blood: pathlib.Path | None = None  # its blood TSV (`bids.find_blood`), for BIDS cohorts


def _bids_entry(pet_path: pathlib.Path) -> _Entry:
    """Image shape from the NIfTI header and the schedule from the sidecar (no voxel decoding)."""
    try:
        shape = tuple(int(s) for s in nib.load(pet_path).shape)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise bids.BidsError(f"{pet_path} cannot be read as NIfTI ({err}).") from err
    if len(shape) != 4:
        raise bids.BidsError(
            f"{pet_path} is {len(shape)}-D with shape {shape}; kinetix needs a 4-D dynamic "
            "image [X, Y, Z, T]."
        )
    name = pet_path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    sidecar_path = pet_path.with_name(stem + ".json")
    if not sidecar_path.is_file():
        raise bids.BidsError(f"The PET sidecar {sidecar_path} does not exist.")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise bids.BidsError(f"The PET sidecar {sidecar_path} is not valid JSON ({err}).") from err
    if not isinstance(sidecar, dict):
        raise bids.BidsError(f"The PET sidecar {sidecar_path} must hold a JSON object.")
    schedule = read_schedule(sidecar, sidecar_path, shape[3], pet_path)
    return _Entry(shape=shape[:3], schedule=schedule, path=pet_path)


def _frozen(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _same_schedule(a: FrameSchedule, b: FrameSchedule) -> bool:
    return (
        a.n_frames == b.n_frames
        and np.allclose(a.start, b.start, rtol=0.0, atol=SCHEDULE_ATOL_MIN)
        and np.allclose(a.end, b.end, rtol=0.0, atol=SCHEDULE_ATOL_MIN)
    )


def _subject_name(pet_path: pathlib.Path) -> str:
    """The subject ("sub-XX") of a PET image's BIDS name (`bids.find_subjects` parsed it)."""
    return f"sub-{bids.parse_name(pet_path.name).entities['sub']}"


def _several_scans(subject: str, paths: Sequence[pathlib.Path], root) -> str:
    """The sentence refusing a subject with several PET images: what tells them apart and the
    config key that chooses one."""
    names = [bids.parse_name(p.name) for p in paths]
    keys = [k for k in bids.ENTITY_ORDER if len({n.entities.get(k) for n in names}) > 1]
    if not keys:  # the same name twice: .nii and .nii.gz
        return (
            f"Subject {subject} has more than one PET image under {root} "
            f"({' and '.join(p.name for p in paths)}); a kinetix cohort takes one scan per "
            "subject, so remove all but one."
        )

    def tell(name):
        return "_".join(f"{k}-{name.entities[k]}" for k in keys if k in name.entities) or (
            "no " + "/".join(f"{k}-" for k in keys)
        )

    example = next((n for n in names if all(k in n.entities for k in keys)), names[0])
    choice = ",".join(f"{k}-{example.entities[k]}" for k in keys if k in example.entities)
    return (
        f"Subject {subject} has {len(paths)} PET images under {root} ("
        f"{', '.join(map(tell, names[:-1]))} and {tell(names[-1])}); a kinetix cohort takes one "
        f"scan per subject: choose with config.data.entities (as in --config.data.entities="
        f"{choice}), or filters= of Cohort.from_bids."
    )


class Cohort:
    """A set of subjects with a common frame schedule and slice size, read slice by slice.

    Build it with `Cohort.from_bids` (lazy: studies are decoded on demand into an LRU cache) or
    `Cohort.from_studies` (in memory). Thread-safe (grain reads with several threads); picklable
    (the cache is dropped), so it also works with grain worker processes.

    Attributes:
      subjects: sorted subject names, e.g. ['sub-01', 'sub-02'].
      schedule: the common `FrameSchedule` (min), T frames: the first subject's; the others
        agree within `SCHEDULE_ATOL_MIN`.
      shape: (H, W) = (X, Y), the common slice size (voxels).
    """

    def __init__(
        self,
        entries: dict[str, _Entry],
        studies: dict[str, Study] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        """Use `from_bids` or `from_studies`."""
        self._check_plausibility = True
        if not entries:
            raise ValueError("A Cohort needs at least one subject.")
        cache_size = int(cache_size)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}.")
        self.subjects = sorted(entries)
        self._entries = entries
        self._index = {s: i for i, s in enumerate(self.subjects)}
        first = self.subjects[0]
        self.schedule = entries[first].schedule
        self.shape = tuple(entries[first].shape[:2])
        for s in self.subjects[1:]:
            e = entries[s]
            if not _same_schedule(e.schedule, self.schedule):
                raise ValueError(
                    f"Subject {s} has a different frame schedule ({e.schedule.n_frames} frames "
                    f"ending at {e.schedule.end[-1]:.4g} min) from {first} "
                    f"({self.schedule.n_frames} frames ending at {self.schedule.end[-1]:.4g} "
                    "min); a cohort needs one common schedule."
                )
            if tuple(e.shape[:2]) != self.shape:
                raise ValueError(
                    f"Subject {s} has slices of {e.shape[0]}×{e.shape[1]} voxels but {first} "
                    f"has {self.shape[0]}×{self.shape[1]}; a cohort needs one slice size."
                )
        self._studies = studies  # in memory (from_studies) or None (lazy)
        self._complete = None  # Study -> Study for the input curves (`with_input`), or None
        self._cache_size = cache_size
        self._init_runtime()

    def _init_runtime(self):
        self._lock = threading.Lock()
        self._subject_locks = {s: threading.Lock() for s in self.subjects}
        self._cache: collections.OrderedDict[str, Study] = collections.OrderedDict()
        self._reference: dict[str, float] = {}  # subject -> mask reference level (SUV)
        self._curves: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_subject_locks", "_cache", "_reference", "_curves"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        mode = "in memory" if self._studies is not None else f"lazy, cache {self._cache_size}"
        return (
            f"Cohort({len(self.subjects)} subjects, slices {self.shape[0]}×{self.shape[1]}, "
            f"{self.schedule.n_frames} frames, {mode})"
        )

    @classmethod
    def from_bids(
        cls,
        root,
        *,
        cache_size: int | None = None,
        validate: bool = False,
        check_plausibility: bool = True,
        filters=None,
        recording: str | None = None,
    ) -> "Cohort":
        """A lazy cohort over a BIDS-PET dataset (one PET image per subject).

        Reads only NIfTI headers, sidecars and blood file names here; voxels, blood curves and
        the remaining validation come from `bids.read_subject` when a subject is first used.
        Subjects keep their `sub-XX` names whatever their session, tracer, reconstruction or
        run; a subject with several scans after `filters` is refused (cohorts of several scans
        per subject, split by participant, are not supported).

        Args:
          root: the dataset root (`bids.find_subjects` layout).
          cache_size: decoded studies kept in memory (each X·Y·Z·T·4 bytes). None (default):
            as many as fit in `DEFAULT_CACHE_BYTES`, at least `DEFAULT_CACHE_SIZE`.
          validate: if True, read every subject once now (full `read_subject` validation,
            slow: decodes every image), so bad files fail before training starts.
          check_plausibility: refuse implausible images and blood curves when a subject is
            read (`bids.read_subject`; docs/conventions.md, "Plausibility checks").
          filters: the scans to take, by BIDS entity (`bids.find_subjects`): a mapping such as
            {"ses": "baseline", "trc": "18FFDG"} or its text "ses-baseline,trc-18FFDG"
            (``config.data.entities``); None or "": every scan.
          recording: the blood recording of every subject, e.g. "autosampler"
            (`bids.find_blood`); None: each subject's only one, or "manual" among several.

        Raises:
          ValueError: (`BidsError`) on an empty root, unreadable headers or sidecars, a filter
            that matches nothing, a subject with several PET images (naming what tells them
            apart), a missing or ambiguous blood recording, or subjects that disagree on
            schedule or slice size.
        """
        scans: dict[str, list[pathlib.Path]] = {}
        for path in bids.find_subjects(root, filters):
            scans.setdefault(_subject_name(path), []).append(path)
        for subject, paths in scans.items():
            if len(paths) > 1:
                raise bids.BidsError(_several_scans(subject, paths, root))
        entries: dict[str, _Entry] = {}
        for subject, (path,) in scans.items():
            blood = bids.find_blood(path, recording)
            entries[subject] = dataclasses.replace(_bids_entry(path), blood=blood)
        if cache_size is None:
            sizes = [4 * math.prod(e.shape) * e.schedule.n_frames for e in entries.values()]
            largest = max(sizes, default=1)  # no subjects: the Cohort raises its own error
            fit = max(DEFAULT_CACHE_SIZE, DEFAULT_CACHE_BYTES // largest)
            cache_size = min(fit, len(entries))  # no slots beyond the cohort
        cohort = cls(entries, None, cache_size)
        cohort._check_plausibility = bool(check_plausibility)
        if validate:
            for subject in cohort.subjects:
                cohort.study(subject)
        return cohort

    @classmethod
    def from_studies(cls, studies: Sequence[Study]) -> "Cohort":
        """An in-memory cohort of `Study` objects (`Study.subject` names them; must be unique)."""
        studies = list(studies)
        if not studies:
            raise ValueError("from_studies needs at least one Study.")
        by_name: dict[str, Study] = {}
        for st in studies:
            if not isinstance(st, Study):
                raise ValueError(f"from_studies takes Study objects, got {type(st).__name__}.")
            if st.subject in by_name:
                raise ValueError(f"Subject {st.subject} appears twice in from_studies.")
            by_name[st.subject] = st
        entries = {
            s: _Entry(shape=tuple(st.frames.shape[:3]), schedule=st.schedule, path=None)
            for s, st in by_name.items()
        }
        return cls(entries, by_name, max(len(by_name), 1))

    # -- per-subject access ----------------------------------------------------------------------
    def _check_subject(self, subject: str) -> None:
        if subject not in self._index:
            raise ValueError(
                f"Subject {subject!r} is not in the cohort (has {len(self.subjects)} subjects: "
                f"{', '.join(self.subjects[:5])}{', ...' if len(self.subjects) > 5 else ''})."
            )

    def index(self, subject: str) -> int:
        """Position of `subject` in `subjects` (the `subject` batch field)."""
        self._check_subject(subject)
        return self._index[subject]

    def n_slices(self, subject: str) -> int:
        """Number of axial slices (Z) of `subject`."""
        self._check_subject(subject)
        return int(self._entries[subject].shape[2])

    def study(self, subject: str) -> Study:
        """The subject's `Study` (decoded on first use for lazy cohorts; LRU-cached)."""
        self._check_subject(subject)
        if self._studies is not None:
            return self._studies[subject]
        with self._lock:
            if subject in self._cache:
                self._cache.move_to_end(subject)
                return self._cache[subject]
        with self._subject_locks[subject]:  # one decode per subject at a time
            with self._lock:
                if subject in self._cache:
                    self._cache.move_to_end(subject)
                    return self._cache[subject]
            entry = self._entries[subject]
            st = bids.read_subject(
                entry.path, blood_path=entry.blood, check_plausibility=self._check_plausibility
            )
            if (
                not _same_schedule(st.schedule, entry.schedule)
                or tuple(st.frames.shape[:3]) != entry.shape
            ):
                raise ValueError(
                    f"Subject {subject} ({entry.path}) changed since the cohort was opened "
                    "(schedule or image shape differ from its header)."
                )
            self._remember_reference(subject, st)
            with self._lock:
                self._cache[subject] = st
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return st

    def _remember_reference(self, subject: str, st: Study) -> float:
        if subject not in self._reference:
            mean = time_average(st.frames, self.schedule)  # [X, Y, Z]
            self._reference[subject] = reference_level(mean)
        return self._reference[subject]

    def mask_reference(self, subject: str) -> float:
        """The subject's mask reference: 99th percentile of its time-averaged volume (SUV)."""
        self._check_subject(subject)
        if subject not in self._reference:
            self._remember_reference(subject, self.study(subject))
        return self._reference[subject]

    def with_input(self, complete) -> "Cohort":
        """A view of this cohort whose input curves are ``complete(study).plasma_times / plasma
        / whole_blood`` (e.g. the blood after the early frames replaced by an extrapolation,
        `kinetix.data.late_input.complete_study`); frames, masks and the decoded studies are
        shared with this cohort. The view's examples also carry the measured curves
        (`REFERENCE_KEYS`). ``complete`` runs once per subject and input size; its errors
        propagate.
        """
        view = copy.copy(self)
        view._complete = complete
        view._curves = {}
        return view

    def reference_curves(self, subject: str, input_points: int = DEFAULT_INPUT_POINTS):
        """The measured input curves (as `curves` without `with_input`'s completion)."""
        if self._complete is None:
            return self.curves(subject, input_points)
        key = ("reference", subject, int(input_points))
        if key not in self._curves:
            self._check_subject(subject)
            self._curves[key] = _frozen(input_curves(self.study(subject), int(input_points)))
        return self._curves[key]

    def curves(self, subject: str, input_points: int = DEFAULT_INPUT_POINTS):
        """The subject's input curves with exactly `input_points` samples.

        Returns:
          (times [K] f32 min, plasma [K] f32 SUV, whole_blood [K] f32 SUV); whole blood is the
          plasma when the study has none. Compressed jointly (`compress_curve`) when the study
          has more than K samples, then padded (`pad_curve`). A `with_input` view returns the
          completed curves.
        """
        self._check_subject(subject)
        input_points = int(input_points)
        if input_points < 2:
            raise ValueError(f"input_points must be >= 2, got {input_points}.")
        key = (subject, input_points)
        if key not in self._curves:
            study = self.study(subject)
            if self._complete is not None:
                study = self._complete(study)
            self._curves[key] = _frozen(input_curves(study, input_points))
        return self._curves[key]

    def slice(
        self,
        subject: str,
        z: int,
        *,
        input_points: int = DEFAULT_INPUT_POINTS,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    ) -> dict:
        """One training example: slice `z` of `subject` (keys as a batch, without B).

        Returns:
          dict of NumPy arrays: frames [H, W, T] f32 (SUV), mask [H, W] f32, plasma_times [K]
          f32 (min), plasma [K] f32, whole_blood [K] f32 (SUV), subject i32, slice i32,
          valid f32 (1).
        """
        n = self.n_slices(subject)
        z = int(z)
        if not 0 <= z < n:
            raise ValueError(f"Slice {z} is out of range for {subject}, which has {n} slices.")
        if mask_threshold < 0:
            raise ValueError(f"mask_threshold must be >= 0, got {mask_threshold}.")
        st = self.study(subject)
        frames = np.ascontiguousarray(st.frames[:, :, z, :], dtype=np.float32)  # [H, W, T]
        mask = threshold_mask(
            time_average(frames, self.schedule), self.mask_reference(subject), mask_threshold
        )
        curves = self.curves(subject, input_points)
        example = slice_example(frames, mask, curves, self._index[subject], z)
        if self._complete is not None:
            reference = self.reference_curves(subject, input_points)
            example.update(zip(REFERENCE_KEYS, reference, strict=True))
        return example

    def records(self, subjects: Sequence[str]) -> list[tuple[int, int]]:
        """(subject index, z) for every slice of `subjects`, in the given order, then z."""
        if isinstance(subjects, str):
            raise ValueError("subjects must be a list of subject names, not one string.")
        subjects = list(subjects)
        unknown = [s for s in subjects if s not in self._index]
        if unknown:
            raise ValueError(
                f"Subjects {', '.join(map(str, unknown[:5]))} are not in the cohort "
                f"({len(self.subjects)} subjects)."
            )
        if len(set(subjects)) != len(subjects):
            raise ValueError("subjects lists a subject more than once.")
        return [(self._index[s], z) for s in subjects for z in range(self.n_slices(s))]


# ------------------------------------------------------------------------------------------------
# Subject-level split
# ------------------------------------------------------------------------------------------------
def _count(fraction: float, n: int, name: str) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {fraction}.")
    return 0 if fraction == 0 else max(1, int(round(fraction * n)))


def split_subjects(
    subjects: Sequence[str],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    val: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Deterministic subject-level train/val/test split (no subject in two parts).

    Subjects are sorted, permuted with `np.random.default_rng(seed)`, and the first
    round(test_fraction·n) go to test, the next round(val_fraction·n) to val (each at least 1
    when its fraction is > 0), the rest to train (at least 1). Explicit `val`/`test` lists
    override their fraction; the other parts come from the remaining subjects.

    Args:
      subjects: subject names (unique).
      val_fraction: fraction of subjects for validation, in [0, 1).
      test_fraction: fraction for the test set, in [0, 1).
      seed: permutation seed.
      val: explicit validation subjects (overrides `val_fraction`).
      test: explicit test subjects (overrides `test_fraction`).

    Returns:
      {"train": [...], "val": [...], "test": [...]}, each sorted.
    """
    if isinstance(subjects, str):
        raise ValueError("subjects must be a list of subject names, not one string.")
    names = sorted(subjects)
    if len(set(names)) != len(names):
        raise ValueError("subjects lists a subject more than once.")
    fixed = {}
    for part, given in (("val", val), ("test", test)):
        if given is None:
            continue
        given = sorted(given)
        missing = [s for s in given if s not in names]
        if missing:
            raise ValueError(f"{part} subjects {', '.join(missing)} are not in subjects.")
        fixed[part] = given
    if "val" in fixed and "test" in fixed and set(fixed["val"]) & set(fixed["test"]):
        both = sorted(set(fixed["val"]) & set(fixed["test"]))
        raise ValueError(f"Subjects {', '.join(both)} are in both val and test.")
    taken = {s for part in fixed.values() for s in part}
    rest = [s for s in names if s not in taken]
    perm = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    n = len(names)
    want = {
        "test": 0 if "test" in fixed else _count(test_fraction, n, "test_fraction"),
        "val": 0 if "val" in fixed else _count(val_fraction, n, "val_fraction"),
    }
    needed = 1 + sum(1 for p in ("val", "test") if want[p] > 0)
    if len(rest) < needed:
        parts = " and ".join(p for p in ("val", "test") if want[p] > 0)
        raise ValueError(
            f"Cannot split {n} subjects into train and {parts}: that needs at least "
            f"{needed + len(taken)} subjects (one per part); lower the fractions or pass "
            "explicit val/test lists."
        )
    while want["test"] + want["val"] > len(rest) - 1:  # keep >= 1 for train
        part = "test" if want["test"] >= want["val"] else "val"
        want[part] -= 1
    out = {"test": perm[: want["test"]]}
    out["val"] = perm[want["test"] : want["test"] + want["val"]]
    out["train"] = perm[want["test"] + want["val"] :]
    out.update(fixed)
    if not out["train"]:
        raise ValueError("The split leaves no training subjects; shorten the val/test lists.")
    return {k: sorted(out[k]) for k in ("train", "val", "test")}
