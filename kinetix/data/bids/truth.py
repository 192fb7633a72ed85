"""The simulator's ground truth as a BIDS derivative (`derivatives/truth/sub-XX/`).

`truth_paths` names the files, `write_truth` writes them and `read_truth` reads them back.
Import these names from `kinetix.data.bids`.
"""

import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from kinetix.data.bids.study import BidsError, _read_tsv, load_nifti
from kinetix.data.bids.write import (
    _check_affine,
    _check_free,
    _kinetix_version,
    _save_nifti,
    _subject_label,
    _write_json,
    _write_tsv,
)

_CANONICAL_PARAMS = ("fv", "K1", "k2", "k3", "k4")


# ------------------------------------------------------------------------------------------------
# Ground truth (simulator derivatives)
# ------------------------------------------------------------------------------------------------
def truth_paths(root, subject: str, param_names: Sequence[str] = _CANONICAL_PARAMS) -> dict:
    """File names of the simulator's ground truth under `root/derivatives/truth/sub-XX/`.

    Returns a dict: "noisefree" -> `sub-XX_desc-noisefree_pet.nii.gz` (noise-free frames,
    Bq/mL [X, Y, Z, T]); "params" -> {name: `sub-XX_param-<name>_map.nii.gz`} (fv unitless,
    K1 mL/min/mL, k2..k4 1/min; tissue-level rates); "ki" -> `sub-XX_Ki.nii.gz` (voxel-level Ki,
    mL/min/mL); "labels" -> `sub-XX_dseg.nii.gz` (int32 label map); "label_table" ->
    `sub-XX_dseg.tsv` (columns `index`, `name`).
    """
    sub = _subject_label(subject)
    base = pathlib.Path(root) / "derivatives" / "truth" / sub
    return {
        "dir": base,
        "noisefree": base / f"{sub}_desc-noisefree_pet.nii.gz",
        "params": {n: base / f"{sub}_param-{n}_map.nii.gz" for n in param_names},
        "ki": base / f"{sub}_Ki.nii.gz",
        "labels": base / f"{sub}_dseg.nii.gz",
        "label_table": base / f"{sub}_dseg.tsv",
    }


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


def _write_truth_description(root) -> None:
    """Writes `derivatives/truth/dataset_description.json` (a derivative dataset) if missing."""
    path = pathlib.Path(root) / "derivatives" / "truth" / "dataset_description.json"
    if path.exists():
        return
    _write_json(
        path,
        {
            "Name": "kinetix simulator ground truth",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "kinetix", "Version": _kinetix_version()}],
        },
    )


def _save_truth_maps(paths: dict, maps: Mapping[str, np.ndarray], ki, affine) -> None:
    """Saves the parameter maps (fv unitless, K1 mL/min/mL, others 1/min) and the true Ki."""
    units = {"fv": "unitless", "K1": "mL/min/mL"}
    for name, value in maps.items():
        unit = units.get(name, "1/min")
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
    """Writes the simulator's ground truth to `root/derivatives/truth/sub-XX/` (see `truth_paths`).

    Also writes `derivatives/truth/dataset_description.json` (a derivative dataset) if missing.

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
    paths = truth_paths(root, subject, list(maps))
    _check_free(
        [paths["noisefree"], *paths["params"].values(), paths["ki"], paths["labels"]]
        + [paths["label_table"]],
        overwrite,
    )
    _write_truth_description(root)
    _save_nifti(paths["noisefree"], noisefree, affine, np.float32, "noise-free PET Bq/mL")
    _save_truth_maps(paths, maps, ki, affine)
    _save_labels(paths, labels, label_names, affine)
    return paths["dir"]


def read_truth(root, subject: str) -> dict:
    """Reads what `write_truth` wrote.

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
    prefix, suffix = f"{sub}_param-", "_map.nii.gz"
    found = {p.name[len(prefix) : -len(suffix)]: p for p in base.glob(f"{prefix}*{suffix}")}
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
