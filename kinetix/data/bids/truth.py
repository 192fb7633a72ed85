"""The simulator's ground truth as a BIDS derivative (`derivatives/truth/sub-XX/`).

`truth_paths` names the files, `write_truth` writes them and `read_truth` reads them back.
Import these names from `kinetix.data.bids`.
"""

import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from kinetix.data.bids import derivatives as der
from kinetix.data.bids.study import BidsError, _read_tsv, load_nifti
from kinetix.data.bids.write import (
    _check_affine,
    _check_free,
    _save_nifti,
    _subject_label,
    _write_tsv,
)

_CANONICAL_PARAMS = ("fv", "K1", "k2", "k3", "k4")


# ------------------------------------------------------------------------------------------------
# Ground truth (simulator derivatives)
# ------------------------------------------------------------------------------------------------
TRUTH_MODEL = "2tcm"
"""The `km-` label of the simulator's parameter maps (the model that made the data)."""

UNITS = {"fv": "mL/mL", "K1": "mL/min/mL", "Ki": "mL/min/mL", "fraction": "mL/mL"}
"""Units of the truth maps (others: 1/min)."""

_NOT_PARAMS = ("Ki", "fraction")


def truth_paths(root, subject: str, param_names: Sequence[str] = _CANONICAL_PARAMS) -> dict:
    """File names of the simulator's ground truth, the derivative dataset `root/derivatives/truth`.

    Returns a dict (docs/bids.md; `kinetix.data.bids.derivatives` names the files):
    "dir" -> `sub-XX/`; "noisefree" -> `pet/sub-XX_desc-noisefree_pet.nii.gz` (noise-free
    frames, Bq/mL [X, Y, Z, T]); "noisefree_psf" -> `pet/sub-XX_desc-noisefreepsf_pet.nii.gz`;
    "params" -> {name: `pet/sub-XX_km-2tcm_<name>.nii.gz`} (fv mL/mL, K1 mL/min/mL, k2..k4
    1/min; tissue-level rates); "ki" -> `pet/sub-XX_km-2tcm_Ki.nii.gz` (voxel-level Ki,
    mL/min/mL); "fraction" -> `pet/sub-XX_km-2tcm_fraction.nii.gz` (tissue fraction);
    "labels" -> `anat/sub-XX_dseg.nii.gz` (int32 label map); "label_table" ->
    `anat/sub-XX_dseg.tsv` (columns `index`, `name`); "simulation" ->
    `pet/sub-XX_simulation.json`. A truth in the flat layout of earlier kinetix versions (every
    file in `sub-XX/`: `sub-XX_param-<name>_map.nii.gz`, `sub-XX_Ki.nii.gz`) is still read.
    """
    sub = _subject_label(subject)
    flat = pathlib.Path(root) / "derivatives" / "truth" / sub
    if not (flat / "pet").is_dir() and (flat / f"{sub}_Ki.nii.gz").is_file():
        return _flat_truth_paths(flat, sub, param_names)
    return _bids_truth_paths(root, sub, param_names)


def _bids_truth_paths(root, sub: str, param_names: Sequence[str]) -> dict:
    """The truth's file names in its BIDS-Derivatives layout (what `write_truth` writes)."""
    base = pathlib.Path(root) / "derivatives" / "truth"
    anat = der.scan_dir(base, sub, "anat")
    return {
        "dir": base / sub,
        "noisefree": der.image_path(base, sub, "pet", desc="noisefree"),
        "noisefree_psf": der.image_path(base, sub, "pet", desc="noisefreepsf"),
        "params": {n: der.map_path(base, sub, n, model=TRUTH_MODEL) for n in param_names},
        "ki": der.map_path(base, sub, "Ki", model=TRUTH_MODEL),
        "fraction": der.map_path(base, sub, "fraction", model=TRUTH_MODEL),
        "labels": anat / f"{sub}_dseg.nii.gz",
        "label_table": anat / f"{sub}_dseg.tsv",
        "simulation": der.scan_dir(base, sub, "pet") / f"{sub}_simulation.json",
    }


def _flat_truth_paths(flat: pathlib.Path, sub: str, param_names: Sequence[str]) -> dict:
    """The layout of truths written by earlier kinetix versions (read only)."""
    return {
        "dir": flat,
        "noisefree": flat / f"{sub}_desc-noisefree_pet.nii.gz",
        "noisefree_psf": flat / f"{sub}_desc-noisefreepsf_pet.nii.gz",
        "params": {n: flat / f"{sub}_param-{n}_map.nii.gz" for n in param_names},
        "ki": flat / f"{sub}_Ki.nii.gz",
        "fraction": flat / f"{sub}_desc-fraction_map.nii.gz",
        "labels": flat / f"{sub}_dseg.nii.gz",
        "label_table": flat / f"{sub}_dseg.tsv",
        "simulation": flat / f"{sub}_simulation.json",
    }


def _param_files(paths: dict, sub: str) -> dict[str, pathlib.Path]:
    """{name: path} of every parameter map in a truth (`paths` from `truth_paths`)."""
    folder = paths["ki"].parent
    if paths["ki"].name == f"{sub}_Ki.nii.gz":  # the flat layout
        pattern = re.compile(rf"{re.escape(sub)}_param-([A-Za-z0-9]+)_map\.nii\.gz")
    else:
        pattern = re.compile(rf"{re.escape(sub)}_km-{TRUTH_MODEL}_([A-Za-z0-9]+)\.nii\.gz")
    found = {}
    for path in folder.glob(f"{sub}_*.nii.gz"):
        match = pattern.fullmatch(path.name)
        if match and match.group(1) not in _NOT_PARAMS:
            found[match.group(1)] = path
    return found


def _check_param_maps(param_maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: float32 map}; every name alphanumeric (it becomes part of a file name)."""
    maps = {}
    for name, value in param_maps.items():
        if not re.fullmatch(r"[A-Za-z0-9]+", str(name)):
            raise ValueError(
                f"param_maps name {name!r} must be alphanumeric (used in a file name)."
            )
        maps[str(name)] = np.asarray(value, dtype=np.float32)
    return maps


def _check_labels(labels: np.ndarray, label_names: Mapping[int, str]) -> None:
    """An integer label map whose every value has a name in `label_names`."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}.")
    missing = sorted(set(np.unique(labels).tolist()) - {int(k) for k in label_names})
    if missing:
        raise ValueError(f"label_names lacks names for the label values {missing}.")


def _check_truth(
    noisefree_bqml, param_maps, ki, labels, label_names
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(noisefree [X, Y, Z, T] float32, {name: [X, Y, Z] float32}, labels [X, Y, Z]), checked."""
    noisefree = np.asarray(noisefree_bqml, dtype=np.float32)
    if noisefree.ndim != 4:
        raise ValueError(f"noisefree_bqml must be [X, Y, Z, T], got shape {noisefree.shape}.")
    grid = noisefree.shape[:3]
    maps = _check_param_maps(param_maps)
    arrays = {**{f"param_maps[{n!r}]": v for n, v in maps.items()}, "ki": np.asarray(ki)}
    labels = np.asarray(labels)
    arrays["labels"] = labels
    for name, value in arrays.items():
        if value.shape != grid:
            raise ValueError(f"{name} must have the grid shape {grid}, got {value.shape}.")
    _check_labels(labels, label_names)
    return noisefree, maps, labels


TRUTH_README = """kinetix simulator ground truth

The exact quantities behind the simulated scans of the raw dataset two levels up: for every
subject the noise-free frames (desc-noisefree_pet, and desc-noisefreepsf_pet blurred by the
scanner's point-spread function; Bq/mL), the tissue-level 2TCM parameter maps
(km-2tcm_fv, _K1, _k2, _k3, _k4), the voxel-level Ki (km-2tcm_Ki, mL/min/mL), the voxel's tissue
fraction (km-2tcm_fraction), the label map (anat/..._dseg.nii.gz with its dseg.tsv) and the
simulation's settings (_simulation.json). BIDS 1.11 has no names yet for voxelwise kinetic
parameter maps: they use the PET-derivatives proposal's km-<model> entity and are listed in
.bidsignore. Written by kinetix.simulate.
"""


def _write_truth_description(root) -> None:
    """Makes `derivatives/truth` a derivative dataset linked to the raw dataset (`root`)."""
    base = pathlib.Path(root) / "derivatives" / "truth"
    if (base / "dataset_description.json").exists():
        return
    der.init_derivative(
        base,
        name="kinetix simulator ground truth",
        what="python -m kinetix.simulate (ground truth of the simulation)",
        readme=TRUTH_README,
        links={der.RAW_LINK: pathlib.Path(root)},
        authors=("kinetix developers",),
    )


def _truth_sidecars(paths: dict, maps: Mapping[str, np.ndarray], root, subject: str) -> None:
    """A JSON sidecar for every truth image (Description, Units, Sources as BIDS URIs)."""
    links = {der.RAW_LINK: pathlib.Path(root)}
    sub = _subject_label(subject)
    source = [pathlib.Path(root) / sub / "pet" / f"{sub}_pet.nii.gz"]
    for name in maps:
        der.write_sidecar(
            paths["params"][name],
            der.map_sidecar(
                f"True tissue-level 2TCM {name} of the simulation",
                UNITS.get(name, "1/min"),
                (),
                links,
                Model=TRUTH_MODEL,
            ),
        )
    der.write_sidecar(
        paths["ki"],
        der.map_sidecar(
            "True voxel-level Patlak Ki: (1 - fv) K1 k3 / (k2 + k3) times the voxel's tissue "
            "fraction",
            UNITS["Ki"],
            (),
            links,
            Model=TRUTH_MODEL,
        ),
    )
    der.write_sidecar(
        paths["noisefree"],
        der.map_sidecar(
            "Noise-free frames of the simulation (decay-corrected to TimeZero), on the grid "
            "and frame schedule of the raw scan in Sources",
            "Bq/mL",
            source,
            links,
            SkullStripped=False,
        ),
    )
    der.write_sidecar(
        paths["labels"],
        der.map_sidecar(
            "Tissue labels of the simulated anatomy (names in the dseg.tsv), on the PET grid",
            "n/a",
            source,
            links,
            SpatialReference=der.bids_uri(source[0], links),
        ),
    )


def _save_truth_maps(paths: dict, maps: Mapping[str, np.ndarray], ki, affine) -> None:
    """Saves the parameter maps (fv mL/mL, K1 mL/min/mL, others 1/min) and the true Ki."""
    for name, value in maps.items():
        unit = UNITS.get(name, "1/min")
        _save_nifti(
            paths["params"][name],
            value,
            affine,
            np.float32,
            f"true {name} ({unit})",
            intent="estimate",
            intent_name=name,
        )
    _save_nifti(
        paths["ki"],
        np.asarray(ki, dtype=np.float32),
        affine,
        np.float32,
        "true voxel-level Patlak Ki (mL/min/mL)",
        intent="estimate",
        intent_name="Ki",
    )


def _save_labels(paths: dict, labels: np.ndarray, label_names: Mapping[int, str], affine) -> None:
    """Saves the int32 label map and its `dseg.tsv` table (index, name), sorted by index."""
    _save_nifti(
        paths["labels"],
        labels.astype(np.int32),
        affine,
        np.int32,
        "tissue labels, see dseg.tsv",
        intent="label",
    )
    keys = sorted(int(k) for k in label_names)
    _write_tsv(
        paths["label_table"],
        {"index": keys, "name": [str(label_names[k]) for k in keys]},
    )


def write_truth(
    root,
    subject: str,
    noisefree_bqml,
    param_maps: Mapping[str, np.ndarray],
    ki,
    labels,
    affine,
    label_names: Mapping[int, str],
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the simulator's ground truth to `root/derivatives/truth` (see `truth_paths`).

    Also makes `derivatives/truth` a BIDS-Derivatives dataset (dataset_description.json linked
    to the raw dataset `root`, README, .bidsignore) if it is not one yet, and writes a JSON
    sidecar for every image.

    Args:
      root: BIDS root directory.
      subject: "sub-01" or "01".
      noisefree_bqml: [X, Y, Z, T] noise-free decay-corrected frames (Bq/mL).
      param_maps: {name: [X, Y, Z]} parameter maps, e.g. fv, K1, k2, k3, k4 (names alphanumeric).
      ki: [X, Y, Z] true voxel-level Ki (mL/min/mL).
      labels: [X, Y, Z] integer label map.
      affine: [4, 4] voxel-to-world (mm).
      label_names: {label: name} for every label value present in `labels`.
      overwrite: replace existing files; otherwise an existing file raises FileExistsError.

    Returns:
      The subject's truth directory.
    """
    noisefree, maps, labels = _check_truth(noisefree_bqml, param_maps, ki, labels, label_names)
    affine = _check_affine(affine)
    paths = _bids_truth_paths(root, _subject_label(subject), list(maps))
    _check_free(
        [paths["noisefree"], *paths["params"].values(), paths["ki"], paths["labels"]]
        + [paths["label_table"]],
        overwrite,
    )
    _write_truth_description(root)
    _save_nifti(paths["noisefree"], noisefree, affine, np.float32, "noise-free PET Bq/mL")
    _save_truth_maps(paths, maps, ki, affine)
    _save_labels(paths, labels, label_names, affine)
    _truth_sidecars(paths, maps, root, subject)
    return paths["dir"]


def read_truth(root, subject: str) -> dict:
    """Reads what `write_truth` wrote (either layout of `truth_paths`).

    Returns:
      {"noisefree": [X, Y, Z, T] float32 Bq/mL, "params": {name: [X, Y, Z] float32} (fv, K1,
      k2, k3, k4 first, then others sorted), "ki": [X, Y, Z] float32, "labels": [X, Y, Z]
      int32, "label_names": {int: str}, "affine": [4, 4]}.

    Raises:
      BidsError: if a truth file is missing, truncated or corrupt.
    """
    paths = truth_paths(root, subject, ())
    base, sub = paths["dir"], paths["dir"].name
    if not base.is_dir():
        raise BidsError(f"The truth directory {base} does not exist.")
    found = _param_files(paths, sub)
    order = [n for n in _CANONICAL_PARAMS if n in found] + sorted(
        n for n in found if n not in _CANONICAL_PARAMS
    )

    def load(path: pathlib.Path, dtype):
        data, img = load_nifti(path, "truth file", dtype)  # one sentence if missing or corrupt
        return data, img.affine

    noisefree, affine = load(paths["noisefree"], np.float32)
    table = _read_tsv(paths["label_table"])
    for column in ("index", "name"):
        if column not in table:
            raise BidsError(f"{paths['label_table']} lacks the required column '{column}'.")
    return {
        "noisefree": noisefree,
        "params": {n: load(found[n], np.float32)[0] for n in order},
        "ki": load(paths["ki"], np.float32)[0],
        "labels": load(paths["labels"], np.int32)[0],
        "label_names": {
            int(i): name for i, name in zip(table["index"], table["name"], strict=True)
        },
        "affine": np.asarray(affine, dtype=np.float64),
    }
