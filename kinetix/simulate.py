"""Simulate a BIDS-PET FDG thorax cohort with ground truth (library function + absl entry point).

    python -m kinetix.simulate --out DIR --subjects N --seed S [--size 64] [--slices 8]
        [--noise image|projection|none] [--overwrite]

`simulate_cohort` runs `kinetix.data.phantom.simulate_subject` for subjects 0..N−1 and writes
(SUV × the subject's `suv_factor` = Bq/mL in every file)::

    DIR/dataset_description.json, participants.tsv (+ .json: weight kg, dose MBq)
    DIR/sub-XX/pet/sub-XX_pet.nii.gz (+ .json)            noisy frames [X, Y, Z, T], Bq/mL
    DIR/sub-XX/pet/sub-XX_recording-manual_blood.tsv      plasma and whole blood (s, Bq/mL)
    DIR/derivatives/truth/sub-XX/                         `bids.write_truth`, plus:
        sub-XX_desc-noisefree_pet.nii.gz        true voxel activity, NO PSF: Patlak on these
                                                curves gives the true Ki (`bids.read_truth`)
        sub-XX_desc-noisefreepsf_pet.nii.gz     the same blurred by the scanner PSF: the
                                                expectation of the noisy frames
        sub-XX_desc-fraction_map.nii.gz         tissue fraction per voxel (lung ≈ 0.2–0.3)
        sub-XX_param-{fv,K1,k2,k3,k4}_map.nii.gz, sub-XX_Ki.nii.gz, sub-XX_dseg.nii.gz/.tsv
        sub-XX_simulation.json                  seed, noise model, Feng input (SUV), dose,
                                                tumours (centre, radius, parameters, Ki), config
    DIR/derivatives/preview/sub-XX_preview.png            a one-page visual check per subject

Everything is deterministic for a seed: the same (seed, config) gives identical NIfTI data
arrays (the gzip headers hold a time stamp, so the files themselves differ in a few bytes).
"""

import dataclasses
import json
import math
import pathlib
import re
import shutil
import sys
import time

import nibabel as nib
import numpy as np
from absl import app, flags
from tqdm import tqdm

from kinetix.data import bids
from kinetix.data import phantom as ph

DATASET_NAME = "kinetix simulated FDG cohort"
"""`Name` in the cohort's dataset_description.json; marks a directory `--overwrite` may clear."""

PREVIEW_EARLY_MIN = 1.25
"""The preview shows the frame whose mid-time is nearest to this (min) as the early frame."""

_TAC_TISSUES = ("blood_pool", "myocardium", "liver", "lung", "muscle")


# ------------------------------------------------------------------------------------------------
# Output directory
# ------------------------------------------------------------------------------------------------
def _is_kinetix_cohort(root: pathlib.Path) -> bool:
    path = root / "dataset_description.json"
    try:
        desc = json.loads(path.read_text())
        return desc.get("Name") == DATASET_NAME and desc["GeneratedBy"][0]["Name"] == "kinetix"
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


def _prepare_out_dir(root: pathlib.Path, overwrite: bool) -> None:
    """Checks `root` and, with `overwrite`, removes a previous simulated cohort's files."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"out_dir {root} exists and is not a directory.")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"out_dir {root} is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    if (root / "dataset_description.json").exists() and not _is_kinetix_cohort(root):
        raise ValueError(
            f"out_dir {root} holds a BIDS dataset not written by kinetix.simulate; refusing to "
            "overwrite it."
        )
    if not _is_kinetix_cohort(root):
        return  # nothing of ours to clear: files of the same name are replaced
    for path in root.iterdir():
        if path.is_dir() and re.fullmatch(r"sub-[A-Za-z0-9]+", path.name):
            shutil.rmtree(path)
    for sub in ("truth", "preview"):
        if (root / "derivatives" / sub).is_dir():
            shutil.rmtree(root / "derivatives" / sub)
    for name in ("participants.tsv", "participants.json", "dataset_description.json"):
        (root / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Writing one subject
# ------------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def config_dict(cfg: ph.SimulationConfig) -> dict:
    """The simulation config as a JSON-ready dict (schedule as start/end lists in minutes)."""
    out = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "schedule":
            value = {"start_min": value.start, "end_min": value.end}
        out[field.name] = _jsonable(value)
    return out


def _recon_sidecar(cfg: ph.SimulationConfig) -> dict:
    """`_pet.json` keys that say how the noisy frames were made."""
    if cfg.noise == "projection":
        return {
            "ReconMethodName": "OSEM (simulated Poisson sinograms, parallel beam, no attenuation)",
            "ReconMethodParameterLabels": ["subsets", "iterations"],
            "ReconMethodParameterUnits": ["none", "none"],
            "ReconMethodParameterValues": [cfg.recon_subsets, cfg.recon_iterations],
            "ReconFilterType": "Gaussian",
            "ReconFilterSize": cfg.psf_fwhm_mm,
        }
    name = {"image": "image-domain Gaussian noise on PSF-blurred frames", "none": "noise-free"}
    return {
        "ReconMethodName": f"none (simulated: {name[cfg.noise]})",
        "ReconFilterType": "Gaussian PSF",
        "ReconFilterSize": cfg.psf_fwhm_mm,
    }


def _write_subject(root: pathlib.Path, sid: str, subj: dict, seed: int, cfg, overwrite: bool):
    """Writes one simulated subject's BIDS files and ground truth (all activities in Bq/mL)."""
    sf = float(subj["suv_factor"])  # Bq/mL per SUV
    to_bq = lambda a: np.asarray(a, np.float64) * sf
    times, plasma = subj["plasma"]
    _, whole_blood = subj["whole_blood"]
    affine = subj["affine"]
    bids.write_subject(
        root, sid, to_bq(subj["frames"]), cfg.schedule, times, to_bq(plasma),
        to_bq(whole_blood), subj["dose_mbq"], subj["weight_kg"], affine,
        extra_sidecar=_recon_sidecar(cfg), overwrite=overwrite,
    )  # fmt: skip
    params = {name: subj["params"][..., i] for i, name in enumerate(("fv", "K1", "k2", "k3", "k4"))}
    truth_dir = bids.write_truth(
        root, sid, to_bq(subj["noisefree"]), params, subj["ki_true"], subj["labels"], affine,
        {v: k for k, v in ph.LABELS.items()}, overwrite=overwrite,
    )  # fmt: skip
    like = nib.load(bids.truth_paths(root, sid, ())["noisefree"])
    bids.write_map(
        truth_dir / f"{sid}_desc-noisefreepsf_pet.nii.gz",
        to_bq(subj["noisefree_psf"]),
        like,
        description="noise-free PET blurred by the PSF, Bq/mL",
        overwrite=overwrite,
    )
    bids.write_map(
        truth_dir / f"{sid}_desc-fraction_map.nii.gz",
        subj["fraction"],
        like,
        description="tissue fraction of the voxel (unitless)",
        intent_name="fraction",
        overwrite=overwrite,
    )
    meta = {
        "seed": seed,
        "subject_index": subj["subject_index"],
        "noise": subj["noise"],
        "noise_scale_after_dose_scaling": subj["noise_scale"],
        "dose_mbq": subj["dose_mbq"],
        "weight_kg": subj["weight_kg"],
        "suv_factor_bqml_per_suv": sf,
        "feng_suv": {"names": ["A1", "A2", "A3", "lambda1", "lambda2", "lambda3", "tau"]}
        | {"values": subj["feng"]},
        "slice_positions": subj["slice_positions"],
        "tumours": subj["tumours"],
        "prompts_per_slice_and_frame": subj["prompts"],
        "files": {
            "desc-noisefree_pet": "true voxel activity without PSF (Bq/mL); Patlak on it gives Ki",
            "desc-noisefreepsf_pet": "noise-free activity blurred by the PSF (Bq/mL): the "
            "expectation of the noisy frames",
            "desc-fraction_map": "tissue fraction of each voxel",
            "Ki": "(1 - fv) * K1 * k3 / (k2 + k3) * fraction (mL/min/mL)",
        },
        "config": config_dict(cfg),
    }
    (truth_dir / f"{sid}_simulation.json").write_text(json.dumps(_jsonable(meta), indent=2) + "\n")


def _write_participants(root: pathlib.Path, rows: list[dict], overwrite: bool) -> None:
    bids.write_participants(root, rows, overwrite=overwrite)
    js = root / "participants.json"
    desc = json.loads(js.read_text())
    desc["dose"] = {"Description": "Injected FDG activity at injection", "Units": "MBq"}
    js.write_text(json.dumps(desc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Preview
# ------------------------------------------------------------------------------------------------
_LABEL_COLOURS = {
    "background": "#000000", "soft_tissue": "#e9c39b", "muscle": "#b5524b", "lung": "#9ecae1",
    "liver": "#8c510a", "myocardium": "#e7298a", "blood_pool": "#d62728", "aorta": "#ff7f0e",
    "bone": "#f7f7f7", "marrow": "#fdd835", "nodule_benign": "#66bd63",
    "nodule_malignant": "#7b3294",
}  # fmt: skip


def _image(ax, fig, data, title, cmap, norm, unit):
    """Axial slice [X, Y] in radiological view: patient right on the left, anterior on top."""
    im = ax.imshow(data.T, origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=8, va="center")
    ax.text(0.98, 0.5, "L", transform=ax.transAxes, color="w", fontsize=8, va="center", ha="right")
    ax.text(0.5, 0.98, "A", transform=ax.transAxes, color="w", fontsize=8, va="top", ha="center")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(unit, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


def _log_scale(ax, which: str) -> None:
    """Log scale on axis `which` ("x"/"y") with plain labels 0.1, 1, 10 (mathtext is slow)."""
    from matplotlib import ticker

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _body_box(body: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """A square (x, y) crop around the body of an [X, Y] mask, `margin` pixels wider."""
    if not body.any():
        return slice(None), slice(None)
    box = []
    for axis in (1, 0):
        idx = np.nonzero(body.any(axis=axis))[0]
        box.append([int(idx[0]) - margin, int(idx[-1]) + 1 + margin])
    side = max(hi - lo for lo, hi in box)
    out = []
    for (lo, hi), n in zip(box, body.shape, strict=True):
        side_n = min(side, n)
        lo = min(max(0, lo - (side_n - (hi - lo)) // 2), n - side_n)
        out.append(slice(lo, lo + side_n))
    return tuple(out)


def _upper(values, q=99.0) -> float:
    values = np.asarray(values)
    top = float(np.percentile(values, q)) if values.size else 0.0
    return top if top > 0 else 1.0


def write_preview(path, subj: dict, title: str) -> pathlib.Path:
    """Saves a one-page PNG summary of a simulated subject (matplotlib Agg, no display).

    Panels: an early (~1.25 min) and the last noisy frame of the middle slice (SUV), the true
    Ki map, the label map, the plasma / whole-blood curves (log activity, inset: first 4 min)
    and mean tissue curves over the whole volume (noisy frames as dots, noise-free as lines).

    Args:
      path: output `.png` (parent directories are created).
      subj: a `kinetix.data.phantom.simulate_subject` result.
      title: figure title (e.g. the subject id).

    Returns:
      `path` as a `pathlib.Path`.
    """
    from matplotlib import colors
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    sched = subj["schedule"]
    frames, noisefree, labels = subj["frames"], subj["noisefree"], subj["labels"]
    s = labels.shape[2] // 2
    crop = _body_box(labels[..., s] > 0)
    body = labels[crop + (s,)] > 0
    early = int(np.argmin(np.abs(sched.mid - PREVIEW_EARLY_MIN)))
    late = sched.n_frames - 1

    fig = Figure(figsize=(15, 8.0))  # a fixed layout: "constrained" doubles the drawing time
    top = fig.add_gridspec(1, 4, left=0.03, right=0.925, bottom=0.52, top=0.92, wspace=0.32)
    low = fig.add_gridspec(1, 2, left=0.05, right=0.985, bottom=0.075, top=0.44, wspace=0.16)
    axes = [fig.add_subplot(top[0, i]) for i in range(4)]
    for ax, k in zip(axes[:2], (early, late), strict=True):
        img = frames[crop + (s, k)]
        _image(
            ax, fig, img,
            f"Noisy frame {k + 1}: {sched.start[k]:.3g}–{sched.end[k]:.3g} min",
            "inferno", colors.Normalize(0.0, _upper(img[body])), "SUV (g/mL)",
        )  # fmt: skip
    ki = subj["ki_true"][crop + (s,)]
    top_ki = _upper(ki[body], 100)
    norm = colors.PowerNorm(0.5, 0.0, top_ki)  # √ scale: shows tumours and tissue
    cb = _image(axes[2], fig, ki, "True Ki (√ colour scale)", "viridis", norm, "Ki (mL/min/mL)")
    cb.set_ticks(np.linspace(0.0, 1.0, 6) ** 2 * top_ki)
    cb.ax.yaxis.set_major_formatter("{x:.2g}")
    names = [""] * (max(ph.LABELS.values()) + 1)
    for name, index in ph.LABELS.items():
        names[index] = name
    cmap = colors.ListedColormap([_LABEL_COLOURS.get(n, "#808080") for n in names])
    norm = colors.BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    im = axes[3].imshow(labels[crop + (s,)].T, origin="lower", cmap=cmap, norm=norm)
    axes[3].set_title("Labels", fontsize=10)
    axes[3].set_xticks([])
    axes[3].set_yticks([])
    cb = fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02, ticks=np.arange(len(names)))
    cb.ax.set_yticklabels([n.replace("_", " ") for n in names], fontsize=7)

    # Input functions: log activity over the scan, linear inset over the bolus.
    ax = fig.add_subplot(low[0, 0])
    t, cp = subj["plasma"]
    _, wb = subj["whole_blood"]
    end = float(sched.end[-1])
    inset = ax.inset_axes([0.45, 0.42, 0.52, 0.52])
    for ax_, lw in ((ax, 1.6), (inset, 1.2)):
        ax_.plot(t, cp, color="C3", lw=lw, label="plasma (input)")
        ax_.plot(t, wb, color="C0", lw=lw, label="whole blood")
    inset.set_xlim(0.0, 4.0)
    inset.set_ylim(0.0, 1.08 * float(cp.max()))
    inset.tick_params(labelsize=7)
    inset.set_xlabel("time (min)", fontsize=7)
    inset.set_title("first 4 min (linear)", fontsize=8)
    keep = (t > 0) & (cp > 0)
    _log_scale(ax, "y")
    ax.set_xlim(0.0, end)
    ax.set_ylim(0.5 * float(wb[keep & (t <= end)].min()), 3.0 * float(cp.max()))
    ax.set_xlabel("time after injection (min)")
    ax.set_ylabel("activity (SUV, g/mL)")
    ax.set_title("Blood curves (sampled, Feng model 2)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.5)

    # Tissue curves: mean over each label in the whole volume.
    ax = fig.add_subplot(low[0, 1])
    curves = [(n.replace("_", " "), labels == ph.LABELS[n]) for n in _TAC_TISSUES]
    tumours = sorted(subj["tumours"], key=lambda d: -d["ki"])
    if tumours:
        kind = "malignant" if tumours[0]["malignant"] else "benign"
        curves.append((f"{kind} nodules", labels == ph.LABELS[f"nodule_{kind}"]))
    mid = sched.mid
    for i, (name, mask) in enumerate(curves):
        if not mask.any():
            continue
        color = f"C{i}"
        ax.plot(mid, noisefree[mask].mean(axis=0), color=color, lw=1.5, label=name)
        ax.plot(mid, frames[mask].mean(axis=0), "o", color=color, ms=3, alpha=0.7)
    if sched.n_frames > 22:  # the paper's split: 22 measured frames (0–35 min), then predicted
        split = float(sched.end[21])
        ax.axvline(split, color="0.4", ls="--", lw=1)
        ax.text(split * 1.03, 0.97, f"{split:.0f} min", transform=ax.get_xaxis_transform(),
                fontsize=8, va="top")  # fmt: skip
    _log_scale(ax, "x")
    _log_scale(ax, "y")
    arrived = np.nonzero(np.asarray(subj["blood_input"](sched.end)) > 0)[0]
    ax.set_xlim(0.7 * float(mid[arrived[0] if arrived.size else 0]), 1.2 * end)
    ax.set_ylim(0.05, None)
    ax.set_xlabel("frame mid-time (min, log)")
    ax.set_ylabel("mean activity (SUV, g/mL)")
    ax.set_title("Tissue curves (lines: noise-free, dots: noisy frames)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both", lw=0.5)

    z = float(subj["affine"][2, 3] + subj["affine"][2, 2] * s)
    fig.suptitle(
        f"{title}: {subj['noise']} noise, {subj['weight_kg']:.0f} kg, {subj['dose_mbq']:.0f} MBq "
        f"(1 SUV = {subj['suv_factor'] / 1e3:.2f} kBq/mL); images: slice {s + 1} of "
        f"{labels.shape[2]} (z = {z:.0f} mm)",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------
def subject_ids(n_subjects: int) -> list[str]:
    """["sub-01", ..., f"sub-{n:02d}"] (zero-padded to at least two digits)."""
    width = max(2, len(str(n_subjects)))
    return [f"sub-{i + 1:0{width}d}" for i in range(n_subjects)]


def simulate_cohort(
    out_dir,
    n_subjects: int,
    seed: int,
    cfg: ph.SimulationConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = True,
) -> list[str]:
    """Simulates `n_subjects` subjects and writes them as a BIDS-PET dataset with ground truth.

    Subject i (0-based) is `phantom.simulate_subject(seed, cfg, i)`, written as `sub-{i+1:02d}`
    (layout in the module docstring). Images and blood are converted from SUV to Bq/mL with the
    subject's `suv_factor`, so `bids.read_subject` gives back the simulator's SUV frames.

    Args:
      out_dir: output directory (created); must be empty unless `overwrite`.
      n_subjects: number of subjects (>= 1).
      seed: non-negative int; the same seed and config give identical data arrays.
      cfg: simulation config (matrix size, slices, noise model, ...); default
        `phantom.SimulationConfig()` (64², 8 slices, image-domain noise).
      overwrite: write into a non-empty `out_dir`; a previous kinetix cohort there (recognised
        by its dataset_description.json) is removed first, other files are left alone, and a
        BIDS dataset not written by kinetix is refused.
      progress: show a tqdm progress bar (one tick per subject).
      preview: write `derivatives/preview/sub-XX_preview.png` for each subject.

    Returns:
      The subject ids, e.g. ["sub-01", "sub-02"].

    Raises:
      ValueError: on a bad argument; FileExistsError: `out_dir` is not empty and not `overwrite`.
    """
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int | np.integer):
        raise ValueError(f"n_subjects must be an integer, got {n_subjects!r}.")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    cfg = ph.SimulationConfig() if cfg is None else cfg
    if not isinstance(cfg, ph.SimulationConfig):
        raise ValueError(f"cfg must be a phantom.SimulationConfig, got {type(cfg).__name__}.")
    root = pathlib.Path(out_dir)
    _prepare_out_dir(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    bids.write_dataset_description(root, name=DATASET_NAME, overwrite=overwrite)

    ids = subject_ids(int(n_subjects))
    rows = []
    desc = f"simulate ({cfg.noise} noise)"
    with tqdm(total=len(ids), desc=desc, unit="subject", disable=not progress) as bar:
        for i, sid in enumerate(ids):
            subj = ph.simulate_subject(int(seed), cfg, i)
            _write_subject(root, sid, subj, int(seed), cfg, overwrite)
            if preview:
                path = root / "derivatives" / "preview" / f"{sid}_preview.png"
                write_preview(path, subj, sid)
            rows.append(
                dict(
                    participant_id=sid,
                    sex=None,
                    age=None,
                    weight=round(subj["weight_kg"], 3),
                    dose=round(subj["dose_mbq"], 3),
                )
            )
            bar.update(1)
    _write_participants(root, rows, overwrite)
    return ids


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
_PROG = "kinetix.simulate"


def _fail(message: str) -> None:
    sys.stderr.write(f"{_PROG}: error: {message}\n")
    sys.exit(2)


def _define_flags() -> None:
    """Defines the CLI flags (only when run as a program, so importing defines nothing)."""
    flags.DEFINE_string("out", None, "Output directory of the BIDS-PET cohort.")
    flags.DEFINE_integer("subjects", None, "Number of subjects (>= 1).")
    flags.DEFINE_integer("seed", 0, "Random seed (non-negative integer).")
    flags.DEFINE_integer("size", 64, "Image matrix size (pixels per side, >= 16).")
    flags.DEFINE_integer("slices", 8, "Axial slices per subject (>= 1).")
    flags.DEFINE_string("noise", "image", "Noise model: image, projection or none.")
    flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --out.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as err:
        _fail(f"{err}.".replace("..", "."))
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = -1  # absl would log INFO (JAX backend probing) otherwise
    return rest


def _config_from_flags(f) -> ph.SimulationConfig:
    if not f.out:
        _fail("--out must name a directory (e.g. --out data/sim).")
    if f.subjects is None:
        _fail("--subjects is required (e.g. --subjects 24).")
    if f.subjects < 1:
        _fail(f"--subjects must be >= 1, got {f.subjects}.")
    if f.seed < 0:
        _fail(f"--seed must be a non-negative integer, got {f.seed}.")
    if f.size < 16:
        _fail(f"--size must be >= 16 pixels, got {f.size}.")
    if f.slices < 1:
        _fail(f"--slices must be >= 1, got {f.slices}.")
    if f.noise not in ("image", "projection", "none"):
        _fail(f"--noise must be image, projection or none, got {f.noise!r}.")
    # OSEM subsets must divide the angle count (= size): 16 when it does, else the gcd.
    return ph.SimulationConfig(
        size=f.size, slices=f.slices, noise=f.noise, recon_subsets=math.gcd(f.size, 16)
    )


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])!r} (all options are --flags).")
    f = flags.FLAGS
    cfg = _config_from_flags(f)
    t0 = time.perf_counter()
    try:
        ids = simulate_cohort(f.out, f.subjects, f.seed, cfg, f.overwrite, f.progress)
    except (ValueError, FileExistsError) as err:
        _fail(str(err))
    print(
        f"{_PROG}: wrote {len(ids)} subjects × {cfg.slices} slices of {cfg.size}×{cfg.size} "
        f"({cfg.noise} noise, seed {f.seed}) to {pathlib.Path(f.out).resolve()} in "
        f"{time.perf_counter() - t0:.1f} s."
    )
    return 0


def run() -> None:
    """Console entry point: `python -m kinetix.simulate ...`."""
    _define_flags()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
