"""BIDS-Derivatives datasets: where kinetix writes maps, and what describes them.

Every directory kinetix writes maps into (`--out` of `parametric`, `predict` and `fit`, and the
simulator's `derivatives/truth`) is a BIDS-Derivatives dataset (docs/bids.md)::

    OUT/dataset_description.json   DatasetType "derivative", GeneratedBy, SourceDatasets,
                                   DatasetLinks {"raw": the source dataset, relative}
    OUT/README                     what the dataset holds
    OUT/.bidsignore                names BIDS 1.11 has no rule for yet (`BIDSIGNORE`)
    OUT/sub-XX/[ses-YY/]pet/<prefix>_km-<model>[_desc-<label>]_<Param>.nii.gz (+ .json)
    OUT/sub-XX/[ses-YY/]pet/<prefix>_desc-<label>_pet.nii.gz (+ .json)   frame series
    OUT/sub-XX/[ses-YY/]pet/<prefix>_recording-IDIF_blood.tsv (+ .json) image-derived input
    OUT/sub-XX/[ses-YY/]anat/<prefix>_desc-<label>_mask.nii.gz (+ .json) masks
    OUT/sub-XX/[ses-YY/]anat/<prefix>_dseg.nii.gz, _dseg.tsv (+ .json)   label maps

`<prefix>` is the source scan's entities (`sub-01_ses-1_trc-FDG_rec-acdyn_run-1`, the PET file's
name without `_pet.nii.gz`). BIDS 1.11 names no voxelwise kinetic parameter (Ki, K1..k4, V0): such
maps follow the PET-derivatives proposal's `km-<model>` entity (as in the OpenNeuroPET
derivative examples, e.g. `sub-001_ses-M000_trc-FDG_km-suvr_desc-pons_kinpar.tsv`) with the
parameter as the suffix, the way BIDS names quantitative maps (`T1map`), and are listed in
`.bidsignore`. Masks and label maps are BIDS-valid derivatives of the `anat` datatype (BIDS has
no `mask` or `dseg` under `pet`). Sidecars carry `Description`, `Units` (a string) and
`Sources` as BIDS URIs (`bids:raw:sub-01/pet/sub-01_pet.nii.gz`).
"""

import importlib.metadata
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

BIDS_VERSION = "1.10.0"
"""The BIDS version kinetix's datasets declare (the official validator checks them)."""

KM_ENTITY = "km"
"""The entity of the PET-derivatives proposal naming the kinetic model of a parametric map."""

BIDSIGNORE = ("*_km-*", "*_simulation.json")
"""`.bidsignore` patterns: files whose names BIDS 1.11 has no rule for yet."""

RAW_LINK = "raw"
"""The `DatasetLinks` name of the source (raw) dataset in BIDS URIs (`bids:raw:...`)."""

_LABEL = re.compile(r"[A-Za-z0-9]+")
_SUFFIX = re.compile(r"[A-Za-z0-9]+")


def kinetix_version() -> str:
    """The installed kinetix's version ("unknown" when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version("kinetix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def code_url() -> str | None:
    """The project's source URL from the installed package's metadata (`[project.urls] Source`)."""
    try:
        urls = importlib.metadata.metadata("kinetix").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in urls:
        name, _, url = entry.partition(",")
        if name.strip().lower() in ("source", "repository", "homepage"):
            return url.strip()
    return None


def generated_by(description: str) -> list[dict]:
    """`GeneratedBy` of a kinetix derivative: name, version, code URL (when known), what ran."""
    entry = {"Name": "kinetix", "Version": kinetix_version(), "Description": description}
    url = code_url()
    if url:
        entry["CodeURL"] = url
    return [entry]


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
def scan_prefix(pet_path) -> str:
    """The entities of a source scan, `<prefix>` of `<prefix>_pet.nii[.gz]` (e.g. `sub-01_ses-1`).

    A file not named as BIDS (`scan 1.nii.gz`) becomes the subject `sub-scan1`.

    Raises:
      ValueError: the name does not end in .nii.gz / .nii.
    """
    name = pathlib.Path(pet_path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        raise ValueError(f"{pet_path} is not a NIfTI file (expected .nii.gz or .nii).")
    prefix = stem[: -len("_pet")] if stem.endswith("_pet") else stem
    if re.fullmatch(r"sub-[A-Za-z0-9]+(_[A-Za-z0-9]+-[A-Za-z0-9]+)*", prefix):
        return prefix
    return f"sub-{label(prefix)}"  # a file not named as BIDS: one subject named after it


def label(text: str) -> str:
    """A BIDS label from free text: its letters and digits (`2tcm_irreversible` ->
    `2tcmirreversible`)."""
    out = "".join(_LABEL.findall(str(text)))
    if not out:
        raise ValueError(f"{text!r} has no letters or digits to make a BIDS label of.")
    return out


def scan_dir(root, prefix: str, datatype: str = "pet") -> pathlib.Path:
    """`root/sub-XX/[ses-YY/]<datatype>` for a scan `<prefix>`."""
    parts = dict(p.split("-", 1) for p in prefix.split("_") if "-" in p)
    folder = pathlib.Path(root) / f"sub-{parts['sub']}"
    if "ses" in parts:
        folder = folder / f"ses-{parts['ses']}"
    return folder / datatype


def _name(prefix: str, suffix: str, ext: str, **entities) -> str:
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"BIDS suffix {suffix!r} must be alphanumeric.")
    parts = [prefix] + [f"{k}-{label(v)}" for k, v in entities.items() if v is not None]
    return "_".join(parts + [suffix]) + ext


def map_path(root, prefix: str, param: str, *, model: str, desc: str | None = None):
    """`<root>/.../pet/<prefix>_km-<model>[_desc-<desc>]_<param>.nii.gz`: a parametric map."""
    name = _name(prefix, param, ".nii.gz", **{KM_ENTITY: model, "desc": desc})
    return scan_dir(root, prefix, "pet") / name


def image_path(root, prefix: str, suffix: str, *, desc: str | None = None, datatype="pet"):
    """`<root>/.../<datatype>/<prefix>[_desc-<desc>]_<suffix>.nii.gz`: a BIDS-named image."""
    return scan_dir(root, prefix, datatype) / _name(prefix, suffix, ".nii.gz", desc=desc)


def sidecar_path(path) -> pathlib.Path:
    """The `.json` sidecar of a `.nii.gz` / `.nii` / `.tsv` file."""
    path = pathlib.Path(path)
    for ext in (".nii.gz", ".nii", ".tsv"):
        if path.name.endswith(ext):
            return path.with_name(path.name[: -len(ext)] + ".json")
    raise ValueError(f"{path} has no sidecar (expected .nii.gz, .nii or .tsv).")


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
def dataset_root(path) -> pathlib.Path | None:
    """The BIDS dataset holding `path` (`sub-XX/[ses-YY/]pet/<file>`), or None for a loose file."""
    path = pathlib.Path(path).resolve()
    for parent in list(path.parents)[:4]:
        if (parent / "dataset_description.json").is_file():
            return parent
    return None


def bids_uri(path, links: Mapping[str, pathlib.Path]) -> str:
    """`bids:<name>:<relative path>` of `path` in the innermost linked dataset holding it (name
    "" is the dataset itself), else a file URI."""
    path = pathlib.Path(path).resolve()
    holders = [
        (name, pathlib.Path(root).resolve())
        for name, root in links.items()
        if path.is_relative_to(pathlib.Path(root).resolve())
    ]
    if not holders:
        return path.as_uri()
    name, root = max(holders, key=lambda item: len(item[1].parts))
    return f"bids:{name}:{path.relative_to(root).as_posix()}"


def source_links(sources: Iterable) -> dict[str, pathlib.Path]:
    """{"raw": the dataset holding the first source file that lies in one} (absolute), or {}."""
    for source in sources:
        if source is not None and (root := dataset_root(source)) is not None:
            return {RAW_LINK: root}
    return {}


def map_sidecar(description: str, units: str, sources: Sequence, links, **extra) -> dict:
    """A map's JSON sidecar: `Description`, `Units` (a string), `Sources` (BIDS URIs), extras."""
    if not isinstance(units, str):
        raise ValueError(f"Units must be a string, got {units!r}.")
    return {
        "Description": description,
        "Units": units,
        "Sources": [bids_uri(s, links) for s in sources if s is not None],
        **extra,
    }


# ------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------
def _relative_uri(target: pathlib.Path, start: pathlib.Path) -> str:
    return pathlib.Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _link_uris(out_root, links) -> dict[str, str]:
    """{name: the linked dataset's path relative to `out_root`} for `DatasetLinks`."""
    return {k: _relative_uri(pathlib.Path(v), pathlib.Path(out_root)) for k, v in links.items()}


def description_json(out_root, name: str, what: str, links, authors=()) -> dict:
    """The `dataset_description.json` of a kinetix derivative under `out_root`."""
    out = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(what),
    }
    if authors:
        out["Authors"] = list(authors)
    if links:
        uris = _link_uris(out_root, links)
        out["SourceDatasets"] = [{"URL": f"bids:{k}"} for k in uris]
        out["DatasetLinks"] = uris
    return out


def _merge_links(existing: dict, out_root, links) -> dict:
    """`existing` description with `links` added; a link name pointing elsewhere is refused."""
    if not links:
        return existing
    new = _link_uris(out_root, links)
    have = dict(existing.get("DatasetLinks", {}))
    for key, uri in new.items():
        if key in have and have[key] != uri:
            raise ValueError(
                f"{pathlib.Path(out_root) / 'dataset_description.json'} links '{key}' to "
                f"{have[key]}, not to {uri}: write the outputs of another dataset to another "
                "--out directory."
            )
        have[key] = uri
    sources = list(existing.get("SourceDatasets", []))
    for key in new:
        if {"URL": f"bids:{key}"} not in sources:
            sources.append({"URL": f"bids:{key}"})
    return {**existing, "SourceDatasets": sources, "DatasetLinks": have}


def init_derivative(
    out_root, *, name: str, what: str, readme: str, links=None, authors=()
) -> pathlib.Path:
    """Makes `out_root` a BIDS-Derivatives dataset (or extends the one there); returns it.

    Writes `dataset_description.json` (kept if present, with `links` added), `README` (if
    missing) and `.bidsignore` (the `BIDSIGNORE` patterns added to any there).

    Args:
      out_root: the derivative dataset's root (created).
      name: the dataset's `Name`.
      what: `GeneratedBy[0].Description`, e.g. "python -m kinetix.parametric".
      readme: the README text.
      links: {"raw": source dataset root} from `source_links`, or None.
      authors: `Authors` of a new description (who made the data), if known.

    Raises:
      ValueError: `out_root` holds a raw BIDS dataset (`DatasetType` not "derivative"), or its
        description links the source name to another dataset.
    """
    root = pathlib.Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset_description.json"
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}).") from err
        if not isinstance(existing, dict) or existing.get("DatasetType") != "derivative":
            raise ValueError(
                f"{path} describes a raw BIDS dataset; kinetix writes its maps into a "
                "derivative dataset: choose another --out directory (e.g. "
                "<bids root>/derivatives/kinetix)."
            )
        description = _merge_links(existing, root, links)
    else:
        description = description_json(root, name, what, links, authors)
    path.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")
    if not (root / "README").exists():
        (root / "README").write_text(readme.rstrip() + "\n")
    write_bidsignore(root)
    return root


def write_bidsignore(root) -> pathlib.Path:
    """Adds the `BIDSIGNORE` patterns to `root/.bidsignore` (kept lines stay); returns its path.

    A raw dataset holding kinetix derivatives needs them too: the validator, run recursively on
    the raw dataset, reads only the top-level `.bidsignore`.
    """
    ignore = pathlib.Path(root) / ".bidsignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    lines += [p for p in BIDSIGNORE if p not in lines]
    ignore.write_text("\n".join(lines) + "\n")
    return ignore


def write_sidecar(path, meta: Mapping) -> pathlib.Path:
    """Writes `meta` as the JSON sidecar of the file `path`; returns the sidecar's path."""
    side = sidecar_path(path)
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(json.dumps(dict(meta), indent=2, ensure_ascii=False) + "\n")
    return side


# ------------------------------------------------------------------------------------------------
# The outputs of a command
# ------------------------------------------------------------------------------------------------
OUTPUT_README = """kinetix outputs

Maps computed by kinetix (python -m kinetix.parametric, kinetix.fit, kinetix.predict) from the
dynamic FDG PET scans of the source dataset (DatasetLinks "raw"). Every map has a JSON sidecar
with its Description, Units and Sources (BIDS URIs). Parametric maps are named
<scan>_km-<model>[_desc-<variant>]_<parameter>.nii.gz: km-patlak (Patlak plot: Ki, V0),
km-2tcm / km-2tcmirreversible (voxelwise 2TCM fit: fv, K1, k2, k3, k4, Ki, their standard errors
as desc-stderr, the weighted residual sum wrss), desc-kinetix (the network's Patlak Ki on
measured early and predicted late frames; desc-predonly on the predicted frames alone). BIDS
1.11 has no names yet for voxelwise kinetic parameter maps: these follow the PET-derivatives
proposal's km-<model> entity and are listed in .bidsignore.
predicted frames pet/*_desc-predicted_pet, image-derived inputs pet/*_recording-IDIF_blood.tsv.
Masks are anat/*_desc-<command>_mask (patlak, fit, kinetix): the voxels each command computed.
"""


def check_output_root(out_root) -> None:
    """Refuses, before any computation, an output directory that holds a raw BIDS dataset.

    Raises:
      ValueError: `out_root/dataset_description.json` exists and is not a derivative's.
    """
    path = pathlib.Path(out_root) / "dataset_description.json"
    if not path.is_file():
        return
    try:
        kind = json.loads(path.read_text()).get("DatasetType", "raw")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid dataset description ({err}).") from err
    if kind != "derivative":
        raise ValueError(
            f"--out {out_root} holds a raw BIDS dataset ({path.name} says DatasetType "
            f"{kind!r}); write kinetix's maps to a derivative directory such as "
            f"{pathlib.Path(out_root) / 'derivatives' / 'kinetix'}."
        )


def open_outputs(out_root, command: str, sources: Iterable) -> dict[str, pathlib.Path]:
    """Makes `out_root` a kinetix derivative dataset for `command`'s maps (`init_derivative`).

    Args:
      out_root: the command's `--out` directory.
      command: e.g. "kinetix.parametric".
      sources: the input files (PET image, blood file; None entries are skipped).

    Returns:
      The links for `map_sidecar` / `bids_uri`: {"": `out_root`, "raw": the source dataset}
      ("raw" absent for files outside a BIDS dataset).
    """
    links = output_links(out_root, sources)
    init_derivative(
        out_root,
        name="kinetix outputs",
        what=f"python -m {command}",
        readme=OUTPUT_README,
        links={k: v for k, v in links.items() if k},
    )
    return links


def output_links(out_root, sources: Iterable) -> dict[str, pathlib.Path]:
    """The links `open_outputs` returns, without writing anything (for files added to an
    output dataset that `open_outputs` has made)."""
    return {"": pathlib.Path(out_root), **source_links(sources)}


def blood_path(root, prefix: str, recording: str) -> pathlib.Path:
    """`<root>/.../pet/<prefix without rec->_recording-<recording>_blood.tsv` (BIDS blood names
    carry the scan's entities but its reconstruction)."""
    kept = [p for p in prefix.split("_") if not p.startswith("rec-")]
    name = "_".join(kept) + f"_recording-{label(recording)}_blood.tsv"
    return scan_dir(root, prefix, "pet") / name
