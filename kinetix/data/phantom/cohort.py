"""Writing a simulated cohort as BIDS-PET with ground truth: `simulate_cohort`, `simulation_config`.

`simulate_cohort` runs `kinetix.data.phantom.simulate_subject` for subjects 0..N−1 and writes
(SUV × the subject's `suv_factor` = Bq/mL in every file)::

    DIR/dataset_description.json, README, .bidsignore, participants.tsv (+ .json: weight kg,
        dose MBq)
    DIR/sub-XX/pet/sub-XX_pet.nii.gz (+ .json)            noisy frames [X, Y, Z, T], Bq/mL
    DIR/sub-XX/pet/sub-XX_recording-manual_blood.tsv      plasma and whole blood (s, Bq/mL)
    DIR/derivatives/truth/                                a BIDS derivative, `bids.write_truth`:
        sub-XX/pet/sub-XX_desc-noisefree_pet.nii.gz       true voxel activity, NO PSF: Patlak on
                                                          these curves gives the true Ki
        sub-XX/pet/sub-XX_desc-noisefreepsf_pet.nii.gz    the same blurred by the scanner PSF:
                                                          the expectation of the noisy frames
        sub-XX/pet/sub-XX_km-2tcm_fraction.nii.gz         tissue fraction per voxel (lung ≈ 0.2)
        sub-XX/pet/sub-XX_km-2tcm_{fv,K1,k2,k3,k4,Ki}.nii.gz, sub-XX/anat/sub-XX_dseg.nii.gz/.tsv
        sub-XX/pet/sub-XX_simulation.json                 seed, noise model, Feng input (SUV),
                                                          dose, tumours, config
    DIR/derivatives/preview/sub-XX_preview.png            a one-page visual check per subject

Everything is deterministic for a seed: the same (seed, config) gives identical NIfTI data
arrays (the gzip headers hold a time stamp, so the files themselves differ in a few bytes).

`simulation_config(config)` is the one mapping from a training config (``config.data.sim_*``,
``config.seed``) to the simulator's settings, used by `kinetix.train` (a config without a data
root) and by ``python -m kinetix.simulate --config``, so both write the same cohort.
"""

import dataclasses
import json
import math
import pathlib
import re
import shutil

import nibabel as nib
import numpy as np
from tqdm import tqdm

from kinetix.data import bids
from kinetix.data.bids import derivatives
from kinetix.data.phantom.anatomy import LABELS
from kinetix.data.phantom.config import SimulationConfig
from kinetix.data.phantom.subject import simulate_subject

DATASET_NAME = "kinetix simulated FDG cohort"
"""`Name` in the cohort's dataset_description.json; marks a directory `--overwrite` may clear."""

OSEM_SUBSETS = 16
"""OSEM subsets of projection noise; gcd(size, 16) when 16 does not divide the matrix size."""


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def simulation_settings(
    size: int = 64,
    slices: int = 8,
    noise: str = "image",
    counts_per_slice: float | None = None,
    noise_scale: float | None = None,
) -> SimulationConfig:
    """A `SimulationConfig` from the settings a user chooses (the others keep their defaults).

    OSEM subsets (projection noise) are `OSEM_SUBSETS` when they divide the `size` projection
    angles, else their greatest common divisor with `size`.

    Args:
      size: matrix size (pixels per side, >= 16).
      slices: axial slices per subject (>= 1).
      noise: "image", "projection" or "none".
      counts_per_slice: prompts per slice over the scan (projection noise); None: the default.
      noise_scale: scale of the image-domain noise (√(SUV·min)); None: the default.

    Returns:
      The `SimulationConfig` (it raises ValueError on invalid settings).
    """
    extra = {}
    if counts_per_slice is not None:
        extra["counts_per_slice"] = float(counts_per_slice)
    if noise_scale is not None:
        extra["noise_scale"] = float(noise_scale)
    return SimulationConfig(
        size=int(size),
        slices=int(slices),
        noise=str(noise),
        recon_subsets=math.gcd(int(size), OSEM_SUBSETS),
        **extra,
    )


def simulation_config(config) -> tuple[SimulationConfig, int, int]:
    """The simulated cohort a training config trains on when it has no data root.

    Args:
      config: a training config (`configs/default.py` layout): ``config.data.sim_size``,
        ``sim_slices``, ``sim_noise``, ``sim_counts_per_slice``, ``sim_noise_scale``,
        ``sim_subjects`` and ``config.seed``.

    Returns:
      (simulation settings, number of subjects, seed): the arguments of `simulate_cohort`.
    """
    d = config.data
    cfg = simulation_settings(
        size=d.sim_size,
        slices=d.sim_slices,
        noise=d.sim_noise,
        counts_per_slice=d.sim_counts_per_slice,
        noise_scale=d.sim_noise_scale,
    )
    return cfg, int(d.sim_subjects), int(config.seed)


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
    ours = ("participants.tsv", "participants.json", "dataset_description.json", "README")
    for name in (*ours, ".bidsignore"):
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


def config_dict(cfg: SimulationConfig) -> dict:
    """The simulation config as a JSON-ready dict (schedule as start/end lists in minutes)."""
    out = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "schedule":
            value = {"start_min": value.start, "end_min": value.end}
        out[field.name] = _jsonable(value)
    return out


def _recon_sidecar(cfg: SimulationConfig) -> dict:
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
    bids.write_truth(
        root, sid, to_bq(subj["noisefree"]), params, subj["ki_true"], subj["labels"], affine,
        {v: k for k, v in LABELS.items()}, overwrite=overwrite,
    )  # fmt: skip
    paths = bids.truth_paths(root, sid, ())
    like = nib.load(paths["noisefree"])
    bids.write_map(
        paths["noisefree_psf"],
        to_bq(subj["noisefree_psf"]),
        like,
        description="noise-free PET blurred by the PSF, Bq/mL",
        overwrite=overwrite,
    )
    bids.write_map(
        paths["fraction"],
        subj["fraction"],
        like,
        description="tissue fraction of the voxel (unitless)",
        intent_name="fraction",
        overwrite=overwrite,
    )
    _truth_extra_sidecars(root, sid, paths)
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
            "km-2tcm_fraction": "tissue fraction of each voxel",
            "km-2tcm_Ki": "(1 - fv) * K1 * k3 / (k2 + k3) * fraction (mL/min/mL)",
        },
        "config": config_dict(cfg),
    }
    paths["simulation"].write_text(json.dumps(_jsonable(meta), indent=2) + "\n")


def _truth_extra_sidecars(root: pathlib.Path, sid: str, paths: dict) -> None:
    """Sidecars of the truth images the simulator adds to `bids.write_truth`'s."""
    links = {"raw": root}
    source = [root / sid / "pet" / f"{sid}_pet.nii.gz"]
    derivatives.write_sidecar(
        paths["noisefree_psf"],
        derivatives.map_sidecar(
            "Noise-free frames blurred by the scanner's PSF: the expectation of the noisy "
            "frames in Sources",
            "Bq/mL",
            source,
            links,
            SkullStripped=False,
        ),
    )
    derivatives.write_sidecar(
        paths["fraction"],
        derivatives.map_sidecar(
            "Tissue fraction of the voxel (lung is mostly air)", "mL/mL", (), links
        ),
    )


README = """{name}

Dynamic [18F]FDG PET of {n} simulated thorax subjects (seed {seed}; {size}x{size} voxels,
{slices} slices, {noise} noise), written by kinetix.simulate: 4-D images in Bq/mL
decay-corrected to TimeZero (the injection) with their sidecars, and arterial plasma and
whole-blood curves (recording-manual). The exact quantities behind each scan (noise-free frames,
2TCM parameter maps, the voxel-level Ki, tissue labels) are the derivative dataset
derivatives/truth; derivatives/preview holds a one-page picture per subject.

The subjects are not people: the anatomy, kinetics, blood curves and scanner are simulated
(kinetix's docs/conventions.md describes how).
"""


def _write_readme(root: pathlib.Path, cfg, n_subjects: int, seed: int) -> None:
    text = README.format(
        name=DATASET_NAME, n=n_subjects, seed=seed, size=cfg.size, slices=cfg.slices,
        noise=cfg.noise,
    )  # fmt: skip
    (root / "README").write_text(text)


def _write_participants(root: pathlib.Path, rows: list[dict], overwrite: bool) -> None:
    bids.write_participants(root, rows, overwrite=overwrite)
    js = root / "participants.json"
    desc = json.loads(js.read_text())
    desc["dose"] = {"Description": "Injected FDG activity at injection", "Units": "MBq"}
    js.write_text(json.dumps(desc, indent=2) + "\n")


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
    cfg: SimulationConfig | None = None,
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
    cfg = SimulationConfig() if cfg is None else cfg
    if not isinstance(cfg, SimulationConfig):
        raise ValueError(f"cfg must be a phantom.SimulationConfig, got {type(cfg).__name__}.")
    root = pathlib.Path(out_dir)
    _prepare_out_dir(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    bids.write_dataset_description(root, name=DATASET_NAME, overwrite=overwrite)
    _write_readme(root, cfg, int(n_subjects), int(seed))
    derivatives.write_bidsignore(root)  # the truth's km- maps, for a recursive validation

    ids = subject_ids(int(n_subjects))
    rows = []
    desc = f"simulate ({cfg.noise} noise)"
    with tqdm(total=len(ids), desc=desc, unit="subject", disable=not progress) as bar:
        for i, sid in enumerate(ids):
            subj = simulate_subject(int(seed), cfg, i)
            _write_subject(root, sid, subj, int(seed), cfg, overwrite)
            if preview:
                # Imported here: matplotlib costs ~1 s to import, paid only for previews.
                from kinetix.figures.cohort import write_preview

                path = root / "derivatives" / "preview" / f"{sid}_preview.png"
                write_preview(path, subj, sid, LABELS)
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
