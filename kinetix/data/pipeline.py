"""Slice-level input pipeline (grain): cohorts, subject splits, input-curve packing, batches.

Training works on 2-D axial slices ``[H, W, T]`` (H = X, W = Y of the NIfTI grid) of a cohort of
dynamic PET studies. This module turns a cohort into fixed-shape NumPy batches::

    cohort = Cohort.from_bids(root)                 # lazy, small LRU cache of decoded studies
    split = split_subjects(cohort.subjects, seed=0)   # subject-level: no slice leakage
    it = slice_dataset(cohort, split["train"], batch_size=8, seed=0)
    batch = next(it)                                   # dict of NumPy arrays, see below
    state = it.get_state(); ...; it.set_state(state)   # or checkpoint it (kinetix.checkpoint)

A batch (and `Cohort.slice`, without the leading B) holds

=============  ===============  ================================================================
key            shape, dtype     meaning
=============  ===============  ================================================================
frames         [B,H,W,T] f32    decay-corrected frames (SUV), all T frames of the schedule
mask           [B,H,W] f32      body mask (1 inside), see `body_mask`
plasma_times   [B,K] f32        input-curve sample times (min), strictly increasing
plasma         [B,K] f32        plasma input (SUV) at `plasma_times`
whole_blood    [B,K] f32        whole blood (SUV) at the same times; = plasma when not measured
subject        [B] i32          index into `cohort.subjects`
slice          [B] i32          z index of the slice
valid          [B] f32          1 for real examples, 0 for padding (`eval_batches` only)
=============  ===============  ================================================================

with K = `input_points`. Every subject's curves are brought to exactly K samples so batches have
fixed shapes: `compress_curve` (only when a subject has more than K samples) and `pad_curve`.
Padding is exact (`kk.SampledInput` holds the last value); **compression is the only
approximation in the training path**: the piecewise-linear input through the kept samples
differs from the measured one by at most the error `compress_curve` minimises. Measured for
a 1-s-sampled Feng FDG curve (3901 samples -> K = 128): 1.1e-4 of the peak, and paper-schedule
frames of typical tissues change by < 3e-4 of their maximum (tests/test_pipeline.py); the 1-s
sampling itself differs from the analytic Feng frames by ~2e-3, an order of magnitude more.

Memory: a paper-size study (256×256×71×28 float32) is ~0.5 GB decoded, ~50 GB for 103 subjects,
so `Cohort.from_bids` never loads the cohort: it reads headers and sidecars up front and decodes
studies on demand into an LRU cache (`cache_size` studies, default 4). A globally shuffled
slice stream hits the cache with probability ≈ cache_size / n_subjects, so each miss re-decodes
a whole ``.nii.gz`` (seconds). That is acceptable for small cohorts and the simulator; for paper
scale, convert each study once to an uncompressed ``.npy`` and open it with
``np.load(..., mmap_mode="r")`` (a slice then costs one strided read), or raise `cache_size`
when RAM allows. (Not implemented here.)
"""

import bisect
import collections
import dataclasses
import json
import pathlib
import threading
from collections.abc import Iterator, Sequence

import grain
import nibabel as nib
import numpy as np

from kinetix.data import bids
from kinetix.data.bids import Study
from kinetix.kinetics.frames import FrameSchedule

DEFAULT_INPUT_POINTS = 128
"""Samples per input curve in a batch (K)."""

DEFAULT_MASK_THRESHOLD = 0.05
"""Body mask: time-averaged SUV above this fraction of the subject's 99th percentile."""

MASK_PERCENTILE = 99.0
"""Percentile of a subject's time-averaged volume used as the mask's reference level."""

DEFAULT_CACHE_SIZE = 4
"""Decoded studies kept by `Cohort.from_bids` (each ~0.5 GB at paper size)."""

SCHEDULE_ATOL_MIN = 1e-4
"""Frame times (min) of two subjects agree when within this (6 ms; BIDS stores seconds)."""

_BATCH_KEYS = (
    "frames",
    "mask",
    "plasma_times",
    "plasma",
    "whole_blood",
    "subject",
    "slice",
    "valid",
)


# ------------------------------------------------------------------------------------------------
# Input curves: compress to at most K samples, then pad to exactly K
# ------------------------------------------------------------------------------------------------
def _check_curve(times, values) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times)
    v = np.asarray(values)
    if t.ndim != 1 or t.size < 1:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {t.shape}.")
    if v.ndim not in (1, 2) or v.shape[-1] != t.size:
        raise ValueError(
            f"values must be [K] or [C, K] with K = {t.size} samples (len(times)), got shape "
            f"{v.shape}."
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(v))):
        raise ValueError("times and values must be finite.")
    if np.any(np.diff(t) <= 0):
        raise ValueError("times must be strictly increasing.")
    return t, v


def _segment_error(t: np.ndarray, v: np.ndarray, a: int, b: int) -> np.ndarray:
    """|v - chord| on samples a..b (inclusive) for the chord a→b; v is [C, K] -> [C, b-a+1]."""
    frac = (t[a : b + 1] - t[a]) / (t[b] - t[a])  # [n]
    chord = v[:, a : a + 1] + (v[:, b : b + 1] - v[:, a : a + 1]) * frac[None, :]
    return np.abs(v[:, a : b + 1] - chord)


def compress_curve(times, values, max_points: int = DEFAULT_INPUT_POINTS):
    """Keeps at most `max_points` of a piecewise-linear curve's samples, minimising the error.

    The curve (as `kk.SampledInput` reads it: linear between samples, 0 before the first, held
    after the last) is replaced by the piecewise-linear curve through a subset of its own
    samples. The first and last samples are always kept; the rest are chosen greedily
    (Douglas–Peucker-style insertion): repeatedly add the sample where the current
    approximation is worst. Both curves are piecewise linear with the kept breakpoints a subset
    of the original ones, so the maximum error over all t is attained at an original sample and
    the error reported by the greedy loop is the true sup-norm error. This is the only
    approximation in kinetix's training path (see the module docstring).

    Args:
      times: [K] sample times (min), strictly increasing.
      values: [K] values, or [C, K] several curves sharing `times` (e.g. plasma and whole
        blood); then one subset serves all, chosen on the error relative to each curve's peak
        |value| (max over curves).
      max_points: the largest number of samples to keep (>= 2).

    Returns:
      (times [M], values [M] or [C, M]), M = min(K, max_points): the input arrays themselves
      (same dtype, copied) when K <= max_points, otherwise the kept samples, in order.
    """
    t, v = _check_curve(times, values)
    max_points = int(max_points)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}.")
    k = t.size
    if k <= max_points:
        return t.copy(), v.copy()
    t64 = t.astype(np.float64)
    v64 = np.atleast_2d(v).astype(np.float64)  # [C, K]
    scale = np.max(np.abs(v64), axis=1, keepdims=True)
    v64 = v64 / np.where(scale > 0, scale, 1.0)  # relative to each curve's peak
    kept = [0, k - 1]  # sorted indices of kept samples
    err = np.max(_segment_error(t64, v64, 0, k - 1), axis=0)  # [K]
    while len(kept) < max_points:
        i = int(np.argmax(err))
        if err[i] <= 0.0:
            break  # already exact
        pos = bisect.bisect(kept, i)
        a, b = kept[pos - 1], kept[pos]
        kept.insert(pos, i)
        err[a : i + 1] = np.max(_segment_error(t64, v64, a, i), axis=0)
        err[i : b + 1] = np.max(_segment_error(t64, v64, i, b), axis=0)
    idx = np.asarray(kept)
    return t[idx], v[..., idx]


def interpolation_error(times, values, kept_times) -> float:
    """Max |curve − curve through the samples at `kept_times`| (the sup norm over all t).

    Args:
      times: [K] sample times (min) of the full curve.
      values: [K] its values.
      kept_times: [M] a subset of `times` that includes the first and last.

    Returns:
      The largest absolute difference, in the units of `values`.
    """
    t, v = _check_curve(times, values)
    kept = np.asarray(kept_times)
    idx = np.searchsorted(t, kept)
    if np.any(idx >= t.size) or np.any(t[np.minimum(idx, t.size - 1)] != kept):
        raise ValueError("kept_times must be a subset of times.")
    approx = np.interp(t, t[idx], v[idx])
    return float(np.max(np.abs(v - approx)))


def pad_curve(times, values, n_points: int):
    """Pads a sampled curve to exactly `n_points` samples without changing it.

    Appends samples at t_last + 1, t_last + 2, ... minutes holding the last value. The curve is
    held constant after its last sample (`kk.SampledInput`), so the padded curve is the same
    function of time: values, integrals and convolutions are unchanged exactly.

    Args:
      times: [K] sample times (min), strictly increasing.
      values: [K] or [C, K] values.
      n_points: the target length (>= K).

    Returns:
      (times [n_points], values [n_points] or [C, n_points]), dtypes preserved.
    """
    t, v = _check_curve(times, values)
    n_points = int(n_points)
    k = t.size
    if n_points < k:
        raise ValueError(
            f"n_points {n_points} is smaller than the curve's {k} samples; use compress_curve "
            "first."
        )
    extra = n_points - k
    new_t = t[-1] + np.arange(1, extra + 1, dtype=t.dtype)
    new_v = np.repeat(v[..., -1:], extra, axis=-1)
    return np.concatenate([t, new_t]), np.concatenate([v, new_v], axis=-1)


# ------------------------------------------------------------------------------------------------
# Body mask
# ------------------------------------------------------------------------------------------------
def time_average(frames: np.ndarray, schedule: FrameSchedule) -> np.ndarray:
    """Duration-weighted mean over frames: Σ_m x_m Δ_m / Σ_m Δ_m.

    Args:
      frames: [..., T] frame values (SUV).
      schedule: the `T`-frame schedule (min).

    Returns:
      [...] float32 time-averaged SUV (the scan's mean activity).
    """
    w = (schedule.duration / np.sum(schedule.duration)).astype(np.float32)
    return np.asarray(frames, np.float32) @ w


def body_mask(mean_suv: np.ndarray, reference: float, threshold: float) -> np.ndarray:
    """1 where the time-averaged SUV exceeds `threshold` × `reference`, else 0.

    The rule kinetix uses: `reference` is the `MASK_PERCENTILE` (99th) percentile of the
    subject's whole time-averaged volume (robust to a few hot voxels such as the bladder, and
    the same for every slice of a subject), and the time average weights frames by duration, so
    the many short early frames do not dominate. It assumes the body fills more than ~1 % of
    the field of view.

    Args:
      mean_suv: [...] time-averaged SUV (`time_average`).
      reference: the subject's reference level (SUV).
      threshold: fraction of `reference` (e.g. 0.05).

    Returns:
      [...] float32 0/1 mask.
    """
    return (np.asarray(mean_suv) > threshold * reference).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    """What a cohort knows about a subject without decoding its image."""

    shape: tuple[int, int, int]  # (X, Y, Z)
    schedule: FrameSchedule
    path: pathlib.Path | None  # PET image, or None for in-memory studies


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
    schedule = bids._read_schedule(sidecar, sidecar_path, shape[3], pet_path)
    return _Entry(shape=shape[:3], schedule=schedule, path=pet_path)


def _same_schedule(a: FrameSchedule, b: FrameSchedule) -> bool:
    return (
        a.n_frames == b.n_frames
        and np.allclose(a.start, b.start, rtol=0.0, atol=SCHEDULE_ATOL_MIN)
        and np.allclose(a.end, b.end, rtol=0.0, atol=SCHEDULE_ATOL_MIN)
    )


def _subject_name(pet_path: pathlib.Path) -> str:
    name = pet_path.name.split("_")[0]
    return name if name.startswith("sub-") else pet_path.name.split(".")[0]


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
        cls, root, *, cache_size: int = DEFAULT_CACHE_SIZE, validate: bool = False
    ) -> "Cohort":
        """A lazy cohort over a BIDS-PET dataset (one PET image per subject).

        Reads only NIfTI headers and sidecars here; voxels, blood curves and the remaining
        validation come from `bids.read_subject` when a subject is first used.

        Args:
          root: the dataset root (`bids.find_subjects` layout).
          cache_size: decoded studies kept in memory (each X·Y·Z·T·4 bytes).
          validate: if True, read every subject once now (full `read_subject` validation,
            slow: decodes every image), so bad files fail before training starts.

        Raises:
          ValueError: (`BidsError`) on an empty root, unreadable headers or sidecars, a subject
            with several PET images, or subjects that disagree on schedule or slice size.
        """
        entries: dict[str, _Entry] = {}
        for path in bids.find_subjects(root):
            subject = _subject_name(path)
            if subject in entries:
                raise ValueError(
                    f"Subject {subject} has more than one PET image ({entries[subject].path} "
                    f"and {path}); a kinetix cohort takes one scan per subject."
                )
            entries[subject] = _bids_entry(path)
        cohort = cls(entries, None, cache_size)
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
            st = bids.read_subject(entry.path)
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
            self._reference[subject] = float(np.percentile(mean, MASK_PERCENTILE))
        return self._reference[subject]

    def mask_reference(self, subject: str) -> float:
        """The subject's mask reference: 99th percentile of its time-averaged volume (SUV)."""
        self._check_subject(subject)
        if subject not in self._reference:
            self._remember_reference(subject, self.study(subject))
        return self._reference[subject]

    def curves(self, subject: str, input_points: int = DEFAULT_INPUT_POINTS):
        """The subject's input curves with exactly `input_points` samples.

        Returns:
          (times [K] f32 min, plasma [K] f32 SUV, whole_blood [K] f32 SUV); whole blood is the
          plasma when the study has none. Compressed jointly (`compress_curve`) when the study
          has more than K samples, then padded (`pad_curve`).
        """
        self._check_subject(subject)
        input_points = int(input_points)
        if input_points < 2:
            raise ValueError(f"input_points must be >= 2, got {input_points}.")
        key = (subject, input_points)
        if key not in self._curves:
            st = self.study(subject)
            blood = st.plasma if st.whole_blood is None else st.whole_blood
            t, v = compress_curve(st.plasma_times, np.stack([st.plasma, blood]), input_points)
            t, v = pad_curve(t, v, input_points)
            out = (t.astype(np.float32), v[0].astype(np.float32), v[1].astype(np.float32))
            for a in out:
                a.setflags(write=False)
            self._curves[key] = out
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
        mask = body_mask(
            time_average(frames, self.schedule), self.mask_reference(subject), mask_threshold
        )
        times, plasma, blood = self.curves(subject, input_points)
        return {
            "frames": frames,
            "mask": mask,
            "plasma_times": times,
            "plasma": plasma,
            "whole_blood": blood,
            "subject": np.int32(self._index[subject]),
            "slice": np.int32(z),
            "valid": np.float32(1.0),
        }

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


# ------------------------------------------------------------------------------------------------
# grain pipeline
# ------------------------------------------------------------------------------------------------
class _LoadSlice(grain.transforms.Map):
    """(subject index, z) -> example dict (picklable, for grain worker processes)."""

    def __init__(self, cohort: Cohort, input_points: int, mask_threshold: float):
        self.cohort = cohort
        self.input_points = input_points
        self.mask_threshold = mask_threshold

    def map(self, element):
        i, z = element
        return self.cohort.slice(
            self.cohort.subjects[i],
            z,
            input_points=self.input_points,
            mask_threshold=self.mask_threshold,
        )


def _check_common(batch_size, input_points, mask_threshold) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if int(input_points) != input_points or input_points < 2:
        raise ValueError(f"input_points must be an integer >= 2, got {input_points}.")
    if not mask_threshold >= 0:
        raise ValueError(f"mask_threshold must be >= 0, got {mask_threshold}.")


def slice_dataset(
    cohort: Cohort,
    subjects: Sequence[str],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    input_points: int = DEFAULT_INPUT_POINTS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    prefetch: int = 2,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable iterator of training batches over all slices of `subjects`.

    Pipeline (grain `MapDataset`, so every step is a pure function of the index)::

        records (subject, z), subjects sorted by cohort index
        -> shuffle(seed)               a new permutation every epoch (seed + epoch)
        -> map(Cohort.slice) -> batch(batch_size, drop_remainder=True)   local-size blocks
        -> [shard_index : m - m % shard_count : shard_count]   block k·S + shard_index
        -> repeat(num_epochs)

    With S = shard_count processes and local batch B, global batch k (B·S examples) is the
    k-th run of B·S consecutive records of the shuffled stream, and process i takes its i-th
    block of B. Concatenating the processes' batches in process order therefore gives exactly
    the batch a single process with `batch_size` B·S reads: the data order does not depend on
    the process count. Each epoch visits every record at most once; the incomplete global
    batch at the end of each epoch is dropped (fixed shapes), so every process yields the same
    number of batches.

    Args:
      cohort: the `Cohort`.
      subjects: subject names (order does not matter).
      batch_size: examples per batch on this process (B).
      seed: shuffle seed, in [0, 2**32); the same seed gives the same sequence.
      shuffle: False keeps the (subject, z) order (every epoch the same).
      num_epochs: epochs to iterate; None repeats forever.
      shard_index: this process's shard (`jax.process_index()`).
      shard_count: number of shards (`jax.process_count()`).
      input_points: samples per input curve (K).
      mask_threshold: body-mask threshold (`body_mask`).
      prefetch: batches read ahead by background threads (0: read in the calling thread).
      worker_count: grain worker processes (0: none; `mp_prefetch` otherwise). Needs absl
        flags parsed (true under `absl.app.run`); the cohort is pickled into each worker, so a
        lazy cohort's cache is per worker.

    Returns:
      A `grain.DatasetIterator` of batch dicts (module docstring) with `get_state()` /
      `set_state(state)` (a JSON-able dict), checkpointed by `kinetix.checkpoint.Checkpointer`.
      Restoring needs the same `shard_count` and pipeline arguments. Call `close()` on it when
      done (it stops prefetch threads and worker processes).
    """
    _check_common(batch_size, input_points, mask_threshold)
    if isinstance(subjects, str):
        raise ValueError("subjects must be a list of subject names, not one string.")
    subjects = sorted(set(subjects), key=lambda s: cohort.index(s))
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index must be in [0, shard_count) with shard_count >= 1, got "
            f"shard_index={shard_index}, shard_count={shard_count}."
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    if prefetch < 0 or worker_count < 0:
        raise ValueError(
            f"prefetch and worker_count must be >= 0, got {prefetch} and {worker_count}."
        )
    records = cohort.records(subjects)
    if not records:
        raise ValueError("The subjects given have no slices.")
    per_shard = len(records) // shard_count
    if per_shard < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {per_shard} slices per shard "
            f"({len(records)} slices over {shard_count} shards); no full batch can be made."
        )
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.map(_LoadSlice(cohort, int(input_points), float(mask_threshold)))
    ds = ds.batch(int(batch_size), drop_remainder=True)  # lazy: only this shard's are read
    n_global = len(ds) // shard_count  # complete global batches per epoch
    ds = ds[shard_index : n_global * shard_count : shard_count]
    ds = ds.repeat(num_epochs)
    read = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    ids = ds.to_iter_dataset(read)
    if worker_count > 0:
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ids)


def eval_batches(
    cohort: Cohort,
    subjects: Sequence[str],
    batch_size: int,
    *,
    input_points: int = DEFAULT_INPUT_POINTS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
) -> Iterator[dict]:
    """Every slice of `subjects` once, in order (subject as given, then z), in fixed-size batches.

    The last batch is padded to `batch_size` with copies of its last example whose `valid` is
    0; weight per-example metrics by `valid`. Subjects are read one after another, so the LRU
    cache decodes each study once.

    Args:
      cohort: the `Cohort`.
      subjects: subject names, in the order wanted.
      batch_size: examples per batch (B).
      input_points: samples per input curve (K).
      mask_threshold: body-mask threshold.

    Yields:
      Batch dicts as `slice_dataset` yields, `valid` [B] f32 marking real examples.
    """
    _check_common(batch_size, input_points, mask_threshold)
    records = cohort.records(subjects)  # validates before the first yield
    if not records:
        raise ValueError("The subjects given have no slices.")
    return _eval_generator(cohort, records, int(batch_size), int(input_points), mask_threshold)


def _eval_generator(cohort, records, batch_size, input_points, mask_threshold):
    for start in range(0, len(records), batch_size):
        examples = [
            cohort.slice(
                cohort.subjects[i], z, input_points=input_points, mask_threshold=mask_threshold
            )
            for i, z in records[start : start + batch_size]
        ]
        n_real = len(examples)
        if n_real < batch_size:
            pad = dict(examples[-1], valid=np.float32(0.0))
            examples.extend([pad] * (batch_size - n_real))
        yield {k: np.stack([ex[k] for ex in examples]) for k in _BATCH_KEYS}
