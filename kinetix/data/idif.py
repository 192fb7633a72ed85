"""Image-derived input function (IDIF): the blood curve read from the PET frames themselves.

Without arterial sampling the input can be measured where the image shows blood: the
left-ventricle cavity or the aorta, given as a mask or as a label of a segmentation (a BIDS
`*_dseg.nii.gz` with its `*_dseg.tsv`). The method, in four steps:

1. **Mask** (`read_mask`): the voxels of the vessel, on the PET's voxel grid (same shape, affine
   within 1e-3 mm); nothing is resampled.
2. **Core** (`blood_core`): the voxels of the mask far enough from the vessel wall. The PSF
   blurs the vessel with its surroundings: near the wall a voxel holds a mix of blood and tissue
   (spill-out of blood, spill-in of tissue), and the mean over the whole mask is biased low
   during the bolus (blood ≫ tissue) and towards the tissue later. The default rule, "hottest",
   keeps the hottest `fraction` of the mask in the bolus frames, where blood is 10–50 times
   hotter than tissue, so that these voxels are the ones the PSF mixes least with tissue,
   whatever the vessel's shape and the PSF's width; "erode" keeps the voxels at least
   `erosion` voxels inside the mask, which needs the erosion matched to the PSF (docs/input.md
   has the measured errors of both and of the plain mask mean).
3. **Whole blood** (`image_derived_input`): the mean of the core in each frame, a decay-corrected
   frame mean, placed at the frame's mid-time, after a leading sample (t = 0, 0) and before a
   closing one at the scan's end holding the last frame's value. The tracer is injected at
   TimeZero, so the piecewise-linear input rises from 0 there instead of jumping to the first
   frame's value (`kk.SampledInput` is 0 before its first sample); the closing sample changes
   nothing (`kk.SampledInput` holds its last value) but lets the curve cover the scan as a blood
   file must (`write_blood` writes one that `read_subject` reads back).
4. **Plasma** (`plasma_from_whole_blood`): FDG's plasma and whole-blood activities differ (red
   cells take FDG up slowly), so the plasma input is the whole-blood curve times a ratio
   Cp/C_WB from one of `PLASMA_MODELS` ("kmap", the simulator's, by default).

`study_with_idif` reads a study with its IDIF (`kinetix.data.bids.read_subject(...,
input_from_image=...)`), `write_blood` writes the curves as a BIDS `*_recording-IDIF_blood.tsv`
with its JSON sidecar, which `read_subject` reads back. NumPy only; frames in SUV, times in min.
"""

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from kinetix.data.bids import read as bids_read
from kinetix.data.bids.study import BidsError, Study, _read_tsv, load_nifti
from kinetix.data.bids.write import _write_json, _write_tsv, blood_sidecar, check_outputs_free
from kinetix.kinetics.frames import FrameSchedule

CORE_RULES = ("hottest", "erode")
"""Rules of `blood_core`; "hottest" is the default (module docstring, docs/input.md)."""

DEFAULT_FRACTION = 0.3
"""Share of the mask's voxels the "hottest" rule keeps: for a round vessel, the voxels within
√0.3 ≈ 0.55 of its radius from the centre (measured in docs/input.md)."""

MIN_CORE_VOXELS = 4
"""Fewest voxels of a core: "hottest" keeps at least this many (or the whole mask when smaller),
"erode" falls back to "hottest" when fewer remain; noise averages over the core."""

BOLUS_LEVEL = 0.5
"""The "hottest" rule ranks voxels by their mean over the frames around the maximum of the mask's
mean curve where that curve is at least this fraction of its maximum (the bolus)."""

MAX_FIRST_FRAME_MIN = 1.0
"""The first frame must start within this time (min) of TimeZero: an IDIF from a scan that
starts later misses the bolus (as `plausibility.BLOOD_FIRST_SAMPLE_MAX_MIN` for blood files)."""

RANK_SMOOTHING = 1
"""The "hottest" rule ranks voxels by their bolus mean averaged over the 3 × 3 in-plane
neighbourhood (radius 1): ranking single voxels picks those whose noise is high, and in the
short, noisy bolus frames that biases the core's mean up (measured in docs/input.md)."""

AFFINE_TOL_MM = 1e-3
"""A mask's voxels may lie at most this far (mm) from the PET's voxels of the same index."""

PLASMA_MODELS = {
    "kmap": "Cp/C_WB = 0.386·e^{−0.191 t} + 1.165 (t in min)",
    "naganawa": "Cp/C_WB = 1 / (0.97 − 0.06·e^{−0.085 t}) (t in min)",
    "ratio": "Cp/C_WB = r (constant; r = 1: plasma = whole blood)",
    "hematocrit": "Cp = C_WB / (1 − Hct·(1 − ρ)), ρ = red-cell / plasma concentration",
}
"""Plasma-from-whole-blood models of `plasma_from_whole_blood` (name -> formula):

- "kmap" (default): the FDG ratio of the KMAP toolbox (G. Wang, UC Davis; `patlak_plot.m`),
  which the simulator uses for its whole blood (`phantom.kmap_plasma_to_blood_ratio`), so that a
  simulated IDIF is unbiased. Code that uses it cites Wu HM et al., J Nucl Med 48:837–845 (2007),
  an FDG study in mice: the ratio falls from 1.55 at injection to 1.17.
- "naganawa": a population ratio measured in humans, C_WB/Cp = 0.97 − 0.06·e^{−0.085 t}
  (Naganawa M et al., EJNMMI Phys 7:67 (2020); KMAP's `FDG_plasma2blood.m`, method "Yale"):
  Cp/C_WB from 1.10 at injection to 1.03.
- "ratio": a constant r (parameter `ratio`, default 1: the paper's plasma = whole blood).
- "hematocrit": mass balance of blood = plasma + red cells, C_WB = (1 − Hct)·Cp + Hct·ρ·Cp,
  with the hematocrit Hct and the red-cell / plasma concentration ratio ρ (parameters
  `hematocrit` and `rbc_to_plasma`, both required; ρ = 0 for a tracer that stays in plasma).
  For FDG ρ rises with time as red cells take it up, so a constant ρ holds near one time only.
"""


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def _label_table_path(path: pathlib.Path) -> pathlib.Path:
    """The `*.tsv` next to a `*.nii[.gz]` with the same stem (a BIDS dseg's label table)."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".tsv")
    return path.with_suffix(".tsv")


def _label_table(path: pathlib.Path) -> dict[int, str]:
    """{index: name} of a BIDS dseg table (columns `index`, `name`)."""
    table = _read_tsv(path)
    for column in ("index", "name"):
        if column not in table:
            raise BidsError(f"{path} lacks the required column '{column}'.")
    out = {}
    for cell, name in zip(table["index"], table["name"], strict=True):
        try:
            out[int(cell)] = name
        except ValueError as err:
            raise BidsError(f"{path} column 'index' holds {cell!r}, not an integer.") from err
    return out


def _resolve_label(path: pathlib.Path, label) -> tuple[int, str]:
    """(label number, how sentences name it, e.g. "label 7 (aorta)") of `label` (int or name)."""
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    table_path = _label_table_path(path)
    if isinstance(label, bool) or not isinstance(label, int | np.integer | str):
        raise ValueError(f"label must be an integer or a label name, got {label!r}.")
    if isinstance(label, str):
        if not table_path.is_file():
            raise BidsError(
                f"{path} has no label table {table_path.name} next to it, so the label name "
                f"{label!r} cannot be looked up (give the label number instead)."
            )
        table = _label_table(table_path)
        by_name = {name.lower(): index for index, name in table.items()}
        if label.strip().lower() not in by_name:
            raise BidsError(
                f"{table_path} has no label named {label!r} (names: {', '.join(table.values())})."
            )
        index = by_name[label.strip().lower()]
        return index, f"label {index} ({table[index]})"
    index = int(label)
    name = None
    if table_path.is_file():
        try:
            name = _label_table(table_path).get(index)
        except BidsError:
            name = None  # a number needs no table; a broken one only loses the name
    return index, f"label {index}" + (f" ({name})" if name else "")


def _grid_distance_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between the voxel centres that affines `a` and `b` give one index,
    over the grid `shape` (attained at a corner: the difference is affine)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm(((a - b) @ corners)[:3], axis=0)))


def _present_labels(values: np.ndarray, limit: int = 10) -> str:
    present = np.unique(values).astype(np.int64)
    text = ", ".join(str(v) for v in present[:limit])
    return text + (f" and {present.size - limit} more" if present.size > limit else "")


def read_mask(path, like_shape, like_affine, label=None, *, what: str = "IDIF mask") -> np.ndarray:
    """Reads a mask or one label of a label image on the PET's voxel grid.

    Args:
      path: a 3-D NIfTI (`.nii[.gz]`; a 4-D one with a single volume is accepted). Without
        `label`, every nonzero finite voxel is inside; with it, the voxels equal to it (a BIDS
        `*_dseg.nii.gz`).
      like_shape: the PET's shape ([X, Y, Z] or [X, Y, Z, T]); the mask must have [X, Y, Z].
      like_affine: the PET's [4, 4] voxel-to-world affine (mm); the mask's must place every
        voxel within `AFFINE_TOL_MM` of it (nothing is resampled).
      label: None, an integer, or a name looked up (case-insensitively) in the `*.tsv` with the
        image's stem next to it (columns `index`, `name`, as a BIDS dseg's; a `.json` is not
        needed). A string of digits counts as a number.
      what: how sentences name the file.

    Returns:
      [X, Y, Z] bool.

    Raises:
      BidsError: the file is missing, truncated or not 3-D; its shape or affine differs from
        the PET's; the label name is unknown or has no table; the label is absent; a label is
        asked of an image with non-integer values; the mask is empty (one sentence each).
    """
    path = pathlib.Path(path)
    data, img = load_nifti(path, what, np.float64)
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise BidsError(
            f"The {what} {path} is {data.ndim}-D with shape {data.shape}; it must be 3-D "
            "[X, Y, Z] (or 4-D with a single volume)."
        )
    grid = tuple(int(n) for n in tuple(like_shape)[:3])
    if data.shape != grid:
        raise BidsError(
            f"The {what} {path} has shape {data.shape} but the PET image has {grid}; the mask "
            "must lie on the PET's voxel grid (resample it first)."
        )
    distance = _grid_distance_mm(np.asarray(img.affine, np.float64), np.asarray(like_affine), grid)
    if distance > AFFINE_TOL_MM:
        raise BidsError(
            f"The {what} {path} has an affine that places its voxels up to {distance:.3g} mm from "
            f"the PET image's (more than {AFFINE_TOL_MM:g} mm); the mask must lie on the PET's "
            "voxel grid (resample it first)."
        )
    finite = np.isfinite(data)
    if label is None:
        mask = finite & (data != 0)
        if not np.any(mask):
            raise BidsError(f"The {what} {path} has no voxel inside (every value is 0).")
        return mask
    index, named = _resolve_label(path, label)
    values = data[finite]
    if not np.all(values == np.round(values)):
        bad = values[values != np.round(values)][0]
        raise BidsError(
            f"The {what} {path} is not an integer label image (it holds {bad:.6g}), so {named} "
            "cannot be selected."
        )
    mask = finite & (data == index)
    if not np.any(mask):
        raise BidsError(
            f"The {what} {path} has no voxel with {named} (labels present: "
            f"{_present_labels(values)})."
        )
    return mask


# ------------------------------------------------------------------------------------------------
# Core
# ------------------------------------------------------------------------------------------------
def _check_frames_mask(frames, schedule: FrameSchedule, mask) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames, np.float32)
    mask = np.asarray(mask)
    if frames.ndim != 4 or frames.shape[-1] != schedule.n_frames:
        raise ValueError(
            f"frames must be [X, Y, Z, T] with T = {schedule.n_frames} frames, got shape "
            f"{frames.shape}."
        )
    if mask.shape != frames.shape[:3] or mask.dtype != bool:
        raise ValueError(
            f"mask must be a bool array of the frames' grid {frames.shape[:3]}, got "
            f"{mask.dtype} {mask.shape}."
        )
    if not np.any(mask):
        raise ValueError("The IDIF mask is empty.")
    return frames, mask


def bolus_frames(tac, schedule: FrameSchedule) -> np.ndarray:
    """[T] bool: the frames around the maximum of `tac` [T] where it is >= `BOLUS_LEVEL` × max.

    The contiguous run of frames through the maximum, so a later second pass or a hot late
    frame does not join it.
    """
    tac = np.asarray(tac, np.float64)
    peak = int(np.argmax(tac))
    if not tac[peak] > 0:
        raise ValueError("The mean of the IDIF mask is never positive; it shows no tracer.")
    high = tac >= BOLUS_LEVEL * tac[peak]
    lo, hi = peak, peak
    while lo > 0 and high[lo - 1]:
        lo -= 1
    while hi < tac.size - 1 and high[hi + 1]:
        hi += 1
    out = np.zeros(schedule.n_frames, bool)
    out[lo : hi + 1] = True
    return out


def erode(mask, radius: int, in_plane: bool = True) -> np.ndarray:
    """Binary erosion: the voxels whose every neighbour within `radius` voxels is in `mask`.

    Args:
      mask: [X, Y, Z] bool; outside the array counts as outside the mask.
      radius: structuring-element radius (voxels, >= 0): a disk (in-plane, axes 0 and 1) or a
        ball (3-D) of the offsets with i² + j² (+ k²) <= radius².
      in_plane: erode along axes 0 and 1 only (the simulator's slices are 2-D and far apart;
        a vessel along z loses nothing in z).

    Returns:
      [X, Y, Z] bool.
    """
    mask = np.asarray(mask, bool)
    r = int(radius)
    if r < 0:
        raise ValueError(f"erosion must be >= 0 voxels, got {radius}.")
    if r == 0:
        return mask.copy()
    rz = 0 if in_plane else r
    pad = np.pad(mask, ((r, r), (r, r), (rz, rz)), constant_values=False)
    out = np.ones_like(mask)
    nx, ny, nz = mask.shape
    for i in range(-r, r + 1):
        for j in range(-r, r + 1):
            for k in range(-rz, rz + 1):
                if i * i + j * j + k * k <= r * r:
                    out &= pad[r + i : r + i + nx, r + j : r + j + ny, rz + k : rz + k + nz]
    return out


def _box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """[X, Y, Z] mean over the (2·radius + 1)² in-plane neighbours (edge values repeated)."""
    if radius <= 0:
        return image
    r = int(radius)
    nx, ny = image.shape[:2]
    pad = np.pad(image, ((r, r), (r, r), (0, 0)), mode="edge")
    out = np.zeros(image.shape, np.float64)
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            out += pad[i : i + nx, j : j + ny]
    return out / (2 * r + 1) ** 2


def _hottest(frames, schedule, mask, fraction: float) -> np.ndarray:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    inside = frames[mask]  # [N, T]
    tac = inside.mean(axis=0)
    use = bolus_frames(tac, schedule)
    weights = np.where(use, schedule.duration, 0.0)
    early = frames @ (weights / weights.sum()).astype(np.float32)  # [X, Y, Z]
    early = _box_mean(early, RANK_SMOOTHING)[mask]  # [N]
    n = inside.shape[0]
    keep = min(n, max(math.ceil(fraction * n), MIN_CORE_VOXELS))
    order = np.argsort(-early, kind="stable")[:keep]
    core_flat = np.zeros(n, bool)
    core_flat[order] = True
    core = np.zeros(mask.shape, bool)
    core[mask] = core_flat
    return core


def blood_core(
    frames,
    schedule: FrameSchedule,
    mask,
    *,
    rule: str = "hottest",
    fraction: float = DEFAULT_FRACTION,
    erosion: int = 1,
    in_plane: bool = True,
) -> np.ndarray:
    """The voxels of `mask` whose mean estimates the blood (module docstring, step 2).

    Rules:
      "hottest" (default): the hottest ceil(`fraction` × N) voxels of the N in the mask (at
        least `MIN_CORE_VOXELS`, at most N) in the duration-weighted mean of the bolus frames
        (`bolus_frames` of the mask's mean curve), averaged over 3 × 3 in-plane neighbours
        (`RANK_SMOOTHING`). During the bolus blood is 10–50 times hotter than tissue, so the
        hottest voxels are those the PSF mixes least with their surroundings, whatever the
        vessel's shape and the PSF's width; the run of frames around the peak (not a fixed
        time) follows the injection's delay; the neighbours' mean keeps noise from choosing.
      "erode": the mask eroded by `erosion` voxels (`erode`; in-plane unless `in_plane` is
        False): simple and independent of the data, but the erosion must match the PSF (too
        little keeps voxels near the wall, too much leaves none). When fewer than
        `MIN_CORE_VOXELS` remain, a warning is logged and the "hottest" rule is used.

    Args:
      frames: [X, Y, Z, T] decay-corrected frames (SUV).
      schedule: their T frames (min).
      mask: [X, Y, Z] bool, not empty (e.g. `read_mask`).
      rule: one of `CORE_RULES`.
      fraction: share of the mask kept by "hottest", in (0, 1].
      erosion: erosion radius (voxels) of "erode".
      in_plane: "erode" erodes along axes 0 and 1 only.

    Returns:
      [X, Y, Z] bool, a non-empty subset of `mask`.

    Raises:
      ValueError: an unknown rule, a bad fraction or erosion, shapes that disagree, an empty
        mask or one whose mean is never positive.
    """
    frames, mask = _check_frames_mask(frames, schedule, mask)
    return _core(frames, schedule, mask, rule, fraction, erosion, in_plane)[0]


def _core(frames, schedule, mask, rule, fraction, erosion, in_plane) -> tuple[np.ndarray, str]:
    """`blood_core` on checked arrays: (core, the rule that made it)."""
    if rule not in CORE_RULES:
        raise ValueError(f"rule must be one of {', '.join(CORE_RULES)}, got {rule!r}.")
    if rule == "erode":
        core = erode(mask, erosion, in_plane)
        if np.count_nonzero(core) >= MIN_CORE_VOXELS:
            return core, rule
        logging.warning(
            "Eroding the IDIF mask (%d voxels) by %d voxels leaves %d, fewer than %d; using the "
            "hottest %.0f %% of the mask instead.",
            np.count_nonzero(mask),
            erosion,
            np.count_nonzero(core),
            MIN_CORE_VOXELS,
            100 * fraction,
        )
    core = _hottest(frames, schedule, mask, fraction)
    if not np.any(core):  # cannot happen for a non-empty mask; kept as the contract
        raise ValueError("The IDIF core is empty.")
    return core, "hottest" if rule == "hottest" else "hottest (erosion left too few voxels)"


# ------------------------------------------------------------------------------------------------
# Plasma
# ------------------------------------------------------------------------------------------------
def _positive(name: str, value, upper: float | None = None) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(float(value))
        and value > 0
        and (upper is None or value < upper)
    )
    if not ok:
        where = "a positive number" if upper is None else f"a number in (0, {upper:g})"
        raise ValueError(f"{name} must be {where}, got {value!r}.")
    return float(value)


def plasma_to_blood_ratio(times_min, model: str = "kmap", **params) -> np.ndarray:
    """[K] Cp/C_WB of a `PLASMA_MODELS` model at `times_min` [K] (min after injection).

    Params: `ratio` (model "ratio", default 1), `hematocrit` and `rbc_to_plasma` (model
    "hematocrit", both required); others are refused.
    """
    t = np.asarray(times_min, np.float64)
    if model not in PLASMA_MODELS:
        raise ValueError(f"plasma_model must be one of {', '.join(PLASMA_MODELS)}, got {model!r}.")
    allowed = {"ratio": {"ratio"}, "hematocrit": {"hematocrit", "rbc_to_plasma"}}.get(model, set())
    given = {k for k, v in params.items() if v is not None}
    if given - allowed:
        raise ValueError(
            f"plasma model {model!r} takes no {', '.join(sorted(given - allowed))} "
            f"(its formula: {PLASMA_MODELS[model]})."
        )
    if model == "kmap":
        return 0.386 * np.exp(-0.191 * t) + 1.165
    if model == "naganawa":
        return 1.0 / (0.97 - 0.06 * np.exp(-0.085 * t))
    if model == "ratio":
        r = params.get("ratio")
        return np.full(t.shape, 1.0 if r is None else _positive("ratio", r))
    for key in ("hematocrit", "rbc_to_plasma"):
        if params.get(key) is None:
            raise ValueError(
                f"plasma model 'hematocrit' needs {key} ({PLASMA_MODELS['hematocrit']})."
            )
    hct = _positive("hematocrit", params["hematocrit"], 1.0)
    rho = float(params["rbc_to_plasma"])
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rbc_to_plasma must be a number >= 0, got {params['rbc_to_plasma']!r}.")
    return np.full(t.shape, 1.0 / (1.0 - hct * (1.0 - rho)))


def plasma_from_whole_blood(times_min, whole_blood, model: str = "kmap", **params) -> np.ndarray:
    """[K] plasma = whole blood [K] × `plasma_to_blood_ratio(times_min [K] min, model, **params)`
    (same units as `whole_blood`, e.g. SUV)."""
    whole_blood = np.asarray(whole_blood, np.float64)
    return whole_blood * plasma_to_blood_ratio(times_min, model, **params)


# ------------------------------------------------------------------------------------------------
# The IDIF
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class IdifResult:
    """An image-derived input.

    Attributes:
      times: [K] sample times (min), K = T + 2: 0, the frames' mid-times, the scan's end.
      whole_blood: [K] whole blood (SUV): 0, the core's mean in each frame, the last frame's
        mean again (held to the scan's end).
      plasma: [K] plasma (SUV) from `whole_blood` by the plasma model.
      core: [X, Y, Z] bool, the voxels averaged.
      n_core: number of core voxels.
      description: how it was made (method, rule, fraction or erosion, voxel counts, plasma
        model, formula and parameters), JSON-ready; `write_blood` puts it in the sidecar.
    """

    times: np.ndarray
    whole_blood: np.ndarray
    plasma: np.ndarray
    core: np.ndarray
    n_core: int
    description: dict


def image_derived_input(
    frames,
    schedule: FrameSchedule,
    mask,
    *,
    core_rule: str = "hottest",
    fraction: float = DEFAULT_FRACTION,
    erosion: int = 1,
    in_plane: bool = True,
    plasma_model: str = "kmap",
    ratio: float | None = None,
    hematocrit: float | None = None,
    rbc_to_plasma: float | None = None,
) -> IdifResult:
    """The image-derived whole-blood and plasma input of a scan (module docstring).

    Args:
      frames: [X, Y, Z, T] decay-corrected frames (SUV).
      schedule: their T frames (min); the first must start within `MAX_FIRST_FRAME_MIN` of
        TimeZero (the injection).
      mask: [X, Y, Z] bool, the vessel (e.g. `read_mask`).
      core_rule, fraction, erosion, in_plane: see `blood_core`.
      plasma_model: one of `PLASMA_MODELS`; ratio, hematocrit, rbc_to_plasma: its parameters.

    Returns:
      An `IdifResult` with K = T + 2 samples.

    Raises:
      ValueError: a scan starting after the bolus, or a bad argument (see `blood_core`,
        `plasma_to_blood_ratio`).
    """
    ratio_params = dict(ratio=ratio, hematocrit=hematocrit, rbc_to_plasma=rbc_to_plasma)
    plasma_to_blood_ratio(np.zeros(1), plasma_model, **ratio_params)  # arguments, before work
    if float(schedule.start[0]) > MAX_FIRST_FRAME_MIN:
        raise ValueError(
            f"The scan starts at {schedule.start[0]:.3g} min, more than "
            f"{MAX_FIRST_FRAME_MIN:g} min after TimeZero, so its frames miss the bolus and "
            "cannot give an image-derived input."
        )
    frames, mask = _check_frames_mask(frames, schedule, mask)
    core, rule = _core(frames, schedule, mask, core_rule, fraction, erosion, in_plane)
    n_core = int(np.count_nonzero(core))
    whole = frames[core].astype(np.float64).mean(axis=0)  # [T]
    times = np.concatenate([[0.0], schedule.mid, schedule.end[-1:]])
    whole = np.concatenate([[0.0], whole, whole[-1:]])
    plasma = plasma_from_whole_blood(times, whole, plasma_model, **ratio_params)
    description = {
        "Method": "image-derived input: mean of the core voxels of the mask in each frame",
        "CoreRule": rule,
        "CoreFraction": fraction if rule.startswith("hottest") else None,
        "CoreErosionVoxels": erosion if rule == "erode" else None,
        "MaskVoxels": int(np.count_nonzero(mask)),
        "CoreVoxels": n_core,
        "PlasmaModel": plasma_model,
        "PlasmaModelFormula": PLASMA_MODELS[plasma_model],
        "PlasmaModelParameters": {k: v for k, v in ratio_params.items() if v is not None},
    }
    description = {k: v for k, v in description.items() if v is not None}
    return IdifResult(
        times=times,
        whole_blood=whole,
        plasma=plasma,
        core=core,
        n_core=n_core,
        description=description,
    )


def _idif_for_image(mask, label, frames, schedule, affine, idif_kwargs) -> IdifResult:
    """`image_derived_input` with `mask` read on the image's grid (a path) or given (an array)."""
    if isinstance(mask, np.ndarray):
        result = image_derived_input(frames, schedule, mask, **idif_kwargs)
        return result
    mask_path = pathlib.Path(mask)
    voxels = read_mask(mask_path, np.shape(frames), affine, label)
    result = image_derived_input(frames, schedule, voxels, **idif_kwargs)
    where = {"Mask": str(mask_path)}
    if label is not None:
        where["MaskLabel"] = label if isinstance(label, str) else int(label)
    return dataclasses.replace(result, description={**where, **result.description})


def input_from_image(mask, label=None, **idif_kwargs):
    """The callable `kinetix.data.bids.read_subject(input_from_image=...)` expects.

    Args:
      mask: a mask or label image (path; read with `read_mask` against the PET's shape and
        affine inside the call) or an [X, Y, Z] bool array on the PET's grid.
      label: with a path, the label to select (number or name); see `read_mask`.
      **idif_kwargs: `image_derived_input`'s keyword arguments (core_rule, fraction, ...).

    Returns:
      `f(frames [X, Y, Z, T] SUV, schedule, affine [4, 4]) -> (times [K] min, plasma [K] SUV,
      whole blood [K] SUV)`.
    """

    def derive(frames, schedule, affine):
        result = _idif_for_image(mask, label, frames, schedule, affine, idif_kwargs)
        return result.times, result.plasma, result.whole_blood

    return derive


def study_with_idif(
    pet_path,
    mask_path,
    label=None,
    *,
    blood_until: float | None = None,
    check_plausibility: bool = True,
    **idif_kwargs,
) -> tuple[Study, IdifResult]:
    """Reads a BIDS-PET study with its blood taken from the image: the one call a command makes.

    Args:
      pet_path: the `*_pet.nii.gz`.
      mask_path: the vessel mask or label image on the PET's grid (`read_mask`).
      label: the label to select in it (number or name), or None for a mask.
      blood_until, check_plausibility: see `kinetix.data.bids.read_subject`.
      **idif_kwargs: `image_derived_input`'s keyword arguments.

    Returns:
      (the `Study`, with plasma and whole blood from the image and `blood_path` None; the
      `IdifResult`, whose description names the mask and label).

    Raises:
      BidsError: the PET or the mask is unreadable or inconsistent, or the IDIF fails the
        blood checks; ValueError: a bad argument.
    """
    results: list[IdifResult] = []

    def derive(frames, schedule, affine):
        results.append(_idif_for_image(mask_path, label, frames, schedule, affine, idif_kwargs))
        return results[-1].times, results[-1].plasma, results[-1].whole_blood

    study = bids_read.read_subject(
        pet_path,
        check_plausibility=check_plausibility,
        blood_until=blood_until,
        input_from_image=derive,
    )
    return study, results[-1]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def idif_blood_path(pet_path) -> pathlib.Path:
    """`<entities>_recording-IDIF_blood.tsv` next to `<entities>_pet.nii[.gz]`."""
    pet_path = pathlib.Path(pet_path)
    stem = pet_path.name
    for ext in (".nii.gz", ".nii"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    prefix = stem[: -len("_pet")] if stem.endswith("_pet") else stem
    return pet_path.with_name(f"{prefix}_recording-IDIF_blood.tsv")


def _sentence(description: Mapping) -> str:
    """The sidecar's `Description` of an IDIF from its `IdifResult.description`."""
    where = description.get("Mask", "a mask")
    if "MaskLabel" in description:
        where = f"label {description['MaskLabel']!r} of {where}"
    rule = description.get("CoreRule", "hottest")
    if rule.startswith("hottest"):
        how = f"the hottest {100 * description.get('CoreFraction', DEFAULT_FRACTION):g} % in the "
        how += "bolus frames"
        if rule != "hottest":
            how += " (erosion left too few voxels)"
    else:
        how = f"eroded by {description.get('CoreErosionVoxels')} voxel(s)"
    params = description.get("PlasmaModelParameters") or {}
    given = "; ".join(f"{k} = {v:g}" for k, v in params.items())
    return (
        f"Image-derived input function (kinetix): whole blood is the mean, in each frame, of "
        f"{description.get('CoreVoxels')} of the {description.get('MaskVoxels')} voxels of "
        f"{where} ({how}), at the frame mid-times, after a sample (0 s, 0) and held to the "
        f"scan's end; plasma is whole blood times the '{description.get('PlasmaModel')}' ratio "
        f"{description.get('PlasmaModelFormula')}{' with ' + given if given else ''}."
    )


def write_blood(
    path, result: IdifResult, suv_factor: float, *, sources=(), overwrite: bool = False
) -> list[pathlib.Path]:
    """Writes an IDIF as a BIDS blood recording: `path` (TSV) and its `.json` sidecar.

    Columns: `time` (s from TimeZero), `plasma_radioactivity` and `whole_blood_radioactivity`
    (Bq/mL = SUV / `suv_factor`). The sidecar has `blood_sidecar`'s keys (PlasmaAvail,
    WholeBloodAvail true; MetaboliteAvail, DispersionCorrected false; column `Description`s
    and `Units` "s" and "Bq/mL"), a `Description` saying how the curves were made, `Sources`,
    and `ImageDerivedInput` (`result.description`). `read_subject(pet, path)` reads it back.

    Args:
      path: a `*_blood.tsv`, usually `idif_blood_path(pet)` (`*_recording-IDIF_blood.tsv`).
      result: from `image_derived_input` / `study_with_idif`.
      suv_factor: the study's `Study.suv_factor` (SUV per Bq/mL).
      sources: files it was made from (BIDS `Sources`, e.g. "bids::sub-01/pet/sub-01_pet.nii.gz").
      overwrite: replace existing files; otherwise an existing one raises FileExistsError.

    Returns:
      [TSV path, JSON path].
    """
    path = pathlib.Path(path)
    if not path.name.endswith("_blood.tsv"):
        raise ValueError(f"An IDIF blood file must be named *_blood.tsv, got {path.name}.")
    suv_factor = _positive("suv_factor", suv_factor)
    meta = path.with_name(path.name[: -len(".tsv")] + ".json")
    check_outputs_free((path, meta), overwrite, "--overwrite (overwrite=True)")
    columns = {
        "time": np.asarray(result.times, np.float64) * 60.0,
        "plasma_radioactivity": np.asarray(result.plasma, np.float64) / suv_factor,
        "whole_blood_radioactivity": np.asarray(result.whole_blood, np.float64) / suv_factor,
    }
    sidecar = blood_sidecar(whole_blood=True)
    sidecar["plasma_radioactivity"]["Description"] = (
        "Radioactivity in plasma, derived from the image-derived whole blood by the "
        f"'{result.description.get('PlasmaModel')}' plasma/whole-blood ratio, decay-corrected "
        "to TimeZero"
    )
    sidecar["whole_blood_radioactivity"]["Description"] = (
        "Radioactivity in whole blood: mean of the vessel core in each decay-corrected frame, "
        "at the frame mid-time"
    )
    sidecar = {
        "Description": _sentence(result.description),
        "Sources": [str(s) for s in sources],
        **sidecar,
        "ImageDerivedInput": dict(result.description),
    }
    _write_tsv(path, columns)
    _write_json(meta, sidecar)
    return [path, meta]
