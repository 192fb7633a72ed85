"""Ki maps of the held-out evaluation (`kinetix.evaluate`): the methods and their Patlak fits.

The fit windows (`KiWindows`), the batched Patlak abscissa and voxelwise Ki of every method
(`patlak_coordinates`, `batch_ki`), the splice of measured and predicted frames, and the true
Ki of simulated cohorts (`find_truth_root`). Time in minutes, Ki in mL/min/mL.
"""

import dataclasses
import functools
import pathlib

import jax
import numpy as np

import kinetix.kinetics as kk
from kinetix.data import bids
from kinetix.losses import splice  # noqa: F401  (re-exported: kinetix.evaluate.splice)

METHOD_LABELS = {
    "reference": "65-min Patlak (reference)",
    "baseline": "30-min Patlak (baseline)",
    "proposed": "kinetix: meas. 9-35 + pred. 35-65",
    "proposed_late": "pred. 35-65 only (authors)",
    "direct": "direct net (no model)",
    "direct_late": "direct, pred. 35-65 only",
    "truth": "true Ki",
    "measured": "measured frame",
    "noisefree": "noise-free frame (truth)",
}
"""Display names of the methods (tables and figures)."""

TUMOUR_NAME_PARTS = ("nodule", "tumo", "lesion")
"""A truth label whose name contains one of these is a tumour."""


# ----------------------------------------------------------------------------------------------
# Ki maps
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KiWindows:
    """The Patlak fit windows of the evaluation (minutes; frames chosen by mid-time).

    Attributes:
      schedule: the cohort's frame schedule (T frames).
      n_early: measured frames the model sees; frames ≥ n_early are predicted.
      t_star: start of the linear phase (min), e.g. 9.
      baseline_t_end: end of the baseline window (min), e.g. 35.
      method: "ols" or "perpendicular".
    """

    schedule: kk.FrameSchedule
    n_early: int
    t_star: float
    baseline_t_end: float
    method: str

    def __post_init__(self):
        t = self.schedule.n_frames
        if not 2 <= self.n_early <= t - 2:
            raise ValueError(
                f"config.model.n_early = {self.n_early} must leave at least 2 measured and 2 "
                f"predicted frames of the {t}-frame schedule."
            )
        if self.method not in kk.METHODS:
            raise ValueError(
                f"config.eval.method must be one of {kk.METHODS}, got {self.method!r}."
            )
        for name, (t0, t1) in self.windows().items():
            try:
                self.schedule.select(t0, t1)
            except ValueError as err:
                raise ValueError(f"The {name} Patlak window [{t0}, {t1}] min: {err}") from err

    @property
    def late_t_star(self) -> float:
        """Start (min) of the first predicted frame: the authors' predicted-only window."""
        return float(self.schedule.start[self.n_early])

    def windows(self) -> dict[str, tuple[float, float | None]]:
        """{name: (t_star, t_end)} of the fits (t_end None = to the end of the scan)."""
        return {
            "reference": (float(self.t_star), None),
            "baseline": (float(self.t_star), float(self.baseline_t_end)),
            "proposed": (float(self.t_star), None),
            "proposed_late": (self.late_t_star, None),
        }

    def frame_numbers(self) -> dict[str, list[int]]:
        """1-based frame numbers entering each fit (as the paper counts frames)."""
        out = {k: [int(i) + 1 for i in self.schedule.select(*w)] for k, w in self.windows().items()}
        out["proposed_measured"] = [i for i in out["proposed"] if i <= self.n_early]
        out["proposed_predicted"] = [i for i in out["proposed"] if i > self.n_early]
        return out


@functools.partial(jax.jit, static_argnames=("schedule",))
def patlak_coordinates(plasma_times, plasma, *, schedule):
    """Patlak abscissa and frame-mean plasma of a batch of inputs (`kk.patlak_x`, vmapped).

    Args:
      plasma_times: [B, K] input sample times (min).
      plasma: [B, K] plasma input (SUV), piecewise linear (`kk.SampledInput`).
      schedule: static T-frame schedule (min).

    Returns:
      (x [B, T] in min: ∫0^{t_mid} Cp / frame-mean Cp, cp [B, T] frame-mean Cp in SUV).
    """
    return jax.vmap(lambda t, p: kk.patlak_x(kk.SampledInput(t, p), schedule))(plasma_times, plasma)


@functools.partial(jax.jit, static_argnames=("idx", "method"))
def batch_ki(frames, x, cp, *, idx, method):
    """Voxelwise Patlak Ki of a batch of slices, each with its own input's coordinates.

    The same computation as `kk.patlak` (its `patlak_x` and `fit_line`), with the abscissa
    computed once per batch by `patlak_coordinates` and shared by every fit window.

    Args:
      frames: [B, H, W, T] decay-corrected frames (SUV).
      x: [B, T] Patlak abscissa (min).
      cp: [B, T] frame-mean plasma (SUV).
      idx: static tuple of the frame indices in the fit (`FrameSchedule.select`).
      method: static "ols" or "perpendicular".

    Returns:
      [B, H, W] Ki (mL/min/mL).
    """
    sel = np.asarray(idx)
    xs = x[:, sel][:, None, None, :]  # [B, 1, 1, N]
    y = frames[..., sel] / cp[:, sel][:, None, None, :]  # [B, H, W, N]
    return kk.fit_line(xs, y, method=method)[0]


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------
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
        return [s for s in subjects if not bids.truth_paths(root, s)["dir"].is_dir()]

    if truth_root is not None:
        root = pathlib.Path(truth_root)
        lacking = missing(root)
        if lacking:
            raise ValueError(
                f"truth_root {root} has no derivatives/truth directory for "
                f"{', '.join(lacking[:5])}."
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
                return None, (
                    f"no true Ki: {root}/derivatives/truth lacks {', '.join(lacking[:5])}"
                )
            return root, f"true Ki read from {root}/derivatives/truth"
    return None, "no true Ki: the cohort has no derivatives/truth (not simulated)"


def _load_truth(root, subject, cohort, grid, n_early: int | None = None) -> dict:
    """One subject's truth: Ki, labels, tumour labels, the 2TCM parameter maps it has ({name:
    [X, Y, Z]}), the noise-free last frame in SUV and, with ``n_early``, the mean of the
    noise-free frames after the first n_early (SUV, [X, Y, Z])."""
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
