"""Frame schedules and decay correction.

A `FrameSchedule` is static metadata: NumPy float64 arrays in **minutes**, hashable, so it can be
closed over or passed as a static argument under `jax.jit` (which frames enter a Patlak fit is
decided from it at trace time).

A scanner frame m over [t_s, t_e] records the count integral ∫ C(τ)·e^{−λτ} dτ. The
decay-corrected image value is that integral times f_m/Δ_m with

    f_m = λ·Δ_m·e^{λ·t_s} / (1 − e^{−λ·Δ_m})

(the BIDS / DICOM `DecayCorrectionFactor`; docs/conventions.md, "Frames and decay"). For a constant
activity C the image value is C; with λ = 0 the factor is 1 and the value is the plain frame mean.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

F18_HALF_LIFE_MIN = 109.77
"""Half-life of F-18 in minutes."""

F18_DECAY_CONSTANT = math.log(2.0) / F18_HALF_LIFE_MIN
"""Decay constant of F-18 in 1/min (ln 2 / 109.77)."""

SAME_EDGE_MIN = 1e-9
"""Frame boundaries closer than this (min) are one boundary in `FrameSchedule.edges`."""


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"FrameSchedule {name} must be 1-D, got shape {arr.shape}.")
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class FrameSchedule:
    """Frame start and end times of a dynamic scan, in minutes from injection (time zero).

    Attributes:
      start: [T] frame start times (min), non-decreasing.
      end: [T] frame end times (min); `end > start` and frames do not overlap
        (`start[i+1] >= end[i]`); gaps are allowed.
    """

    start: np.ndarray
    end: np.ndarray

    def __post_init__(self):
        start = _as_1d("start", self.start)
        end = _as_1d("end", self.end)
        if start.shape != end.shape:
            raise ValueError(
                f"FrameSchedule start and end must have the same length, got {start.size} "
                f"and {end.size}."
            )
        if start.size == 0:
            raise ValueError("FrameSchedule needs at least one frame.")
        if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end))):
            raise ValueError("FrameSchedule times must be finite.")
        if start[0] < 0:
            raise ValueError(f"FrameSchedule starts before time zero ({start[0]} min).")
        bad = np.nonzero(end <= start)[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"FrameSchedule frame {i} ends at {end[i]} min, not after its start {start[i]} min."
            )
        overlap = np.nonzero(start[1:] < end[:-1] - 1e-9)[0]
        if overlap.size:
            i = int(overlap[0])
            raise ValueError(
                f"FrameSchedule frames {i} and {i + 1} overlap or are not increasing: frame "
                f"{i + 1} starts at {start[i + 1]} min before frame {i} ends at {end[i]} min."
            )
        start.setflags(write=False)
        end.setflags(write=False)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_durations(cls, seconds: Sequence[float]) -> "FrameSchedule":
        """Contiguous frames from t = 0 with the given durations in **seconds**."""
        dur = _as_1d("durations", seconds) / 60.0
        if np.any(dur <= 0):
            raise ValueError("FrameSchedule durations must be positive.")
        end = np.cumsum(dur)
        return cls(end - dur, end)

    @classmethod
    def from_seconds(cls, start_s: Sequence[float], duration_s: Sequence[float]) -> "FrameSchedule":
        """From BIDS `FrameTimesStart` and `FrameDuration` (seconds)."""
        start = _as_1d("FrameTimesStart", start_s)
        dur = _as_1d("FrameDuration", duration_s)
        if start.shape != dur.shape:
            raise ValueError(
                f"FrameTimesStart has {start.size} entries but FrameDuration has {dur.size}."
            )
        return cls(start / 60.0, (start + dur) / 60.0)

    # -- properties -----------------------------------------------------------------------------
    @property
    def mid(self) -> np.ndarray:
        """[T] frame mid-times (min)."""
        return 0.5 * (self.start + self.end)

    @property
    def duration(self) -> np.ndarray:
        """[T] frame durations (min)."""
        return self.end - self.start

    @property
    def n_frames(self) -> int:
        return int(self.start.size)

    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, index) -> "FrameSchedule":
        """A sub-schedule, e.g. `PAPER_SCHEDULE[:22]` for the first 35 minutes."""
        start = np.atleast_1d(self.start[index])
        return FrameSchedule(start, np.atleast_1d(self.end[index]))

    def __eq__(self, other) -> bool:
        if not isinstance(other, FrameSchedule):
            return NotImplemented
        return np.array_equal(self.start, other.start) and np.array_equal(self.end, other.end)

    def __hash__(self) -> int:
        return hash((self.start.tobytes(), self.end.tobytes()))

    def __repr__(self) -> str:
        return (
            f"FrameSchedule(n_frames={self.n_frames}, {self.start[0]:.4g}–{self.end[-1]:.4g} min)"
        )

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique sorted frame boundaries and each frame's start / end index into them.

        Boundaries closer than `SAME_EDGE_MIN` are one boundary: contiguous frames give
        start[i + 1] and end[i] that differ only by rounding (seconds converted to minutes).
        """
        edges = np.unique(np.concatenate([self.start, self.end]))
        keep = np.concatenate([[True], np.diff(edges) > SAME_EDGE_MIN])
        slot = np.cumsum(keep) - 1
        return (
            edges[keep],
            slot[np.searchsorted(edges, self.start)],
            slot[np.searchsorted(edges, self.end)],
        )

    def select(self, t_star: float, t_end: float | None = None) -> np.ndarray:
        """Indices of frames whose **mid-time** lies in [t_star, t_end] (TPCCLIB's rule).

        Raises:
          ValueError: if t_star lies past the last frame mid-time or fewer than 2 frames qualify.
        """
        mid = self.mid
        if t_end is None:
            t_end = float(self.end[-1])
        if t_star > mid[-1]:
            raise ValueError(
                f"t_star = {t_star} min lies past the last frame (mid-time {mid[-1]:.4g} min)."
            )
        if t_end <= t_star:
            raise ValueError(f"t_end = {t_end} min must be after t_star = {t_star} min.")
        idx = np.nonzero((mid >= t_star - 1e-9) & (mid <= t_end + 1e-9))[0]
        if idx.size < 2:
            raise ValueError(
                f"Only {idx.size} frame(s) have mid-times in [{t_star}, {t_end}] min; a fit "
                "needs at least 2."
            )
        return idx

    def decay_factors(self, decay_constant: float = F18_DECAY_CONSTANT) -> np.ndarray:
        """[T] decay-correction factors f_m (dimensionless; 1 when λ = 0)."""
        return decay_correction_factors(self, decay_constant)


def decay_correction_factors(
    schedule: FrameSchedule, decay_constant: float = F18_DECAY_CONSTANT
) -> np.ndarray:
    """[T] f_m = λΔ·e^{λ t_s}/(1 − e^{−λΔ}); the BIDS `DecayCorrectionFactor` (to time zero)."""
    lam = float(decay_constant)
    if lam < 0:
        raise ValueError(f"decay_constant must be >= 0, got {lam}.")
    if lam == 0.0:
        return np.ones(schedule.n_frames)
    x = lam * schedule.duration
    return x * np.exp(lam * schedule.start) / -np.expm1(-x)


PAPER_SCHEDULE = FrameSchedule.from_durations(
    [10.0] * 6 + [30.0] * 4 + [60.0] * 4 + [120.0] * 4 + [300.0] * 10
)
"""The paper's 28-frame protocol: 6×10 s, 4×30 s, 4×60 s, 4×120 s, 10×300 s (65 min).
Frames 0–21 (0–35 min) are the network input, frames 22–27 (35–65 min) the target."""

N_EARLY_FRAMES = 22
"""Frames of the paper schedule that end by 35 min (network input)."""
