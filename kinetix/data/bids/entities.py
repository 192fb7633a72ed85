"""BIDS file names as entities: parse, validate, filter, match and format them (pure, no I/O).

A BIDS name is ``key-label`` pairs joined by ``_``, then the suffix and the extension::

    sub-01_ses-baseline_trc-18FFDG_rec-acdyn_run-1_pet.nii.gz
    -> BidsName({"sub": "01", "ses": "baseline", "trc": "18FFDG", "rec": "acdyn", "run": "1"},
                suffix="pet", extension=".nii.gz")

Keys are the BIDS entities (`ENTITY_ORDER`, the order in which names carry them); labels are
alphanumeric, indices (`INDEX_ENTITIES`, e.g. ``run``) non-negative integers, compared as numbers
(``run-01`` is ``run-1``). An associated file (a blood recording) belongs to a data file when each
of its entities, besides the ones that tell associated files apart (``recording``), has the data
file's label (`applies_to`): a blood file without ``rec-`` serves every reconstruction of its scan.

Entity filters choose scans: a mapping {key: allowed labels}, written in configs and flags as
``"ses-baseline,trc-18FFDG"`` (`parse_entities`; a key given twice allows either label).
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping

from kinetix.data.bids.study import BidsError

ENTITY_ORDER = (
    "sub", "tpl", "ses", "cohort", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce",
    "trc", "stain", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc",
    "hemi", "space", "split", "recording", "chunk", "atlas", "seg", "scale", "res", "den",
    "label", "desc",
)  # fmt: skip
"""BIDS entity keys in the order file names carry them (the BIDS schema's `rules/entities`)."""

INDEX_ENTITIES = frozenset({"run", "echo", "flip", "inv", "split", "chunk"})
"""Entities whose label is an index (a non-negative integer, compared as a number)."""

_LABEL = re.compile(r"[A-Za-z0-9]+")
_INDEX = re.compile(r"[0-9]+")
_RANK = {key: i for i, key in enumerate(ENTITY_ORDER)}

Filters = dict[str, tuple[str, ...]]
"""{entity key: allowed labels}, e.g. {"ses": ("baseline",), "run": ("1", "2")}."""


@dataclasses.dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name.

    Attributes:
      entities: {key: label} in the name's order, e.g. {"sub": "01", "ses": "baseline"}.
      suffix: e.g. "pet", "blood".
      extension: from the first dot, e.g. ".nii.gz", ".tsv"; "" without one.
    """

    entities: Mapping[str, str]
    suffix: str
    extension: str = ""

    def __str__(self) -> str:
        return format_name(self.entities, self.suffix, self.extension)


def is_label(key: str, label) -> bool:
    """Whether `label` is a valid label of entity `key` (alphanumeric; digits for an index)."""
    pattern = _INDEX if key in INDEX_ENTITIES else _LABEL
    return isinstance(label, str) and pattern.fullmatch(label) is not None


def check_label(key: str, label, where: str) -> str:
    """`label` if valid for entity `key`; else a BidsError naming `where` (a file, key or flag)."""
    if not is_label(key, label):
        kind = "a non-negative integer" if key in INDEX_ENTITIES else "letters and digits only"
        raise BidsError(f"{where}: the {key}- label {label!r} must be {kind}.")
    return label


def parse_name(name: str) -> BidsName:
    """A BIDS file name (no directory) as entities, suffix and extension.

    Raises:
      BidsError: a part is not ``key-label``, a key is not a BIDS entity or appears twice, a
        label is not alphanumeric (an index not an integer), or the suffix is missing.
    """
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    suffix = parts[-1]
    if len(parts) < 2 or not _LABEL.fullmatch(suffix):
        raise BidsError(
            f"{name} is not a BIDS file name (key-label pairs, then a suffix such as _pet)."
        )
    found: dict[str, str] = {}
    for part in parts[:-1]:
        key, dash, label = part.partition("-")
        if not dash or key not in _RANK:
            raise BidsError(
                f"{name} is not a BIDS file name: {part!r} is not a key-label pair of a BIDS "
                "entity (sub, ses, trc, rec, run, recording, ...)."
            )
        if key in found:
            raise BidsError(f"{name} is not a BIDS file name: it has the {key}- entity twice.")
        found[key] = check_label(key, label, name)
    return BidsName(found, suffix, dot + ext)


def try_parse_name(name: str) -> BidsName | None:
    """`parse_name`, or None for a name that is not a BIDS name."""
    try:
        return parse_name(name)
    except BidsError:
        return None


def format_name(entities: Mapping[str, str], suffix: str, extension: str = "") -> str:
    """The BIDS name of `entities` (put in `ENTITY_ORDER`), `suffix` and `extension`.

    Raises:
      BidsError: an unknown key or an invalid label.
    """
    unknown = [k for k in entities if k not in _RANK]
    if unknown:
        raise BidsError(f"{unknown[0]!r} is not a BIDS entity (sub, ses, trc, rec, run, ...).")
    pairs = [
        f"{k}-{check_label(k, entities[k], 'format_name')}"
        for k in sorted(entities, key=_RANK.__getitem__)
    ]
    return "_".join([*pairs, suffix]) + extension


def format_entities(entities: Mapping[str, str]) -> str:
    """``key-label`` pairs of `entities` in `ENTITY_ORDER`, joined by ``_`` (e.g. "ses-a_run-1")."""
    return "_".join(f"{k}-{entities[k]}" for k in sorted(entities, key=_RANK.__getitem__))


def same_label(key: str, a: str, b: str) -> bool:
    """Whether two labels of entity `key` are equal (indices as numbers: "01" is "1")."""
    if key in INDEX_ENTITIES and a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def applies_to(
    associated: Mapping[str, str], data: Mapping[str, str], ignore: Iterable[str] = ("recording",)
) -> bool:
    """Whether an associated file (e.g. a blood TSV) belongs to a data file (e.g. a PET image).

    True when every entity of `associated` outside `ignore` is in `data` with the same label
    (the BIDS inheritance rule: fewer entities apply more widely, so a blood file without
    ``rec-`` serves every reconstruction). Both carry ``sub-`` when `data` does.
    """
    ignore = set(ignore)
    if "sub" in data and "sub" not in associated:
        return False
    return all(
        key in data and same_label(key, label, data[key])
        for key, label in associated.items()
        if key not in ignore
    )


def parse_entities(text, source: str = "config.data.entities") -> Filters:
    """An entity filter written as text, e.g. "ses-baseline,trc-18FFDG" or "run-1,run-2".

    Items are comma-separated ``key-label`` pairs; a key given twice allows either label. ""
    (or None) is no filter. The keys are checked against the dataset by `find_subjects` (which
    lists the labels there).

    Args:
      text: the filter text.
      source: what the text is (a config key or a flag), for the error sentence.

    Returns:
      {key: allowed labels}, in the order given.

    Raises:
      BidsError: an item that is not ``key-label`` with an alphanumeric label.
    """
    if text is None or not str(text).strip():
        return {}
    out: dict[str, list[str]] = {}
    for item in str(text).split(","):
        item = item.strip()
        key, dash, label = item.partition("-")
        if not dash or not _LABEL.fullmatch(key) or not _LABEL.fullmatch(label):
            raise BidsError(
                f"{source} item {item!r} must be key-label with an alphanumeric label, such as "
                "ses-baseline,trc-18FFDG."
            )
        check_label(key, label, f"{source} item {item!r}")
        if label not in out.setdefault(key, []):
            out[key].append(label)
    return {k: tuple(v) for k, v in out.items()}


def as_filters(filters, source: str = "filters") -> Filters:
    """`filters` as {key: allowed labels}: None, a text (`parse_entities`) or a mapping whose
    values are a label or a list of labels.

    Raises:
      BidsError: a label that is not alphanumeric (named with `source`).
    """
    if filters is None or isinstance(filters, str):
        return parse_entities(filters, source)
    if not isinstance(filters, Mapping):
        raise BidsError(
            f"{source} must be a mapping such as {{'ses': 'baseline'}} or a text such as "
            f"'ses-baseline', got {type(filters).__name__}."
        )
    out = {}
    for key, value in filters.items():
        labels = (value,) if isinstance(value, str | int) else tuple(value)
        if not labels:
            raise BidsError(f"{source} key {key!r} allows no label.")
        out[str(key)] = tuple(
            check_label(str(key), str(v), f"{source} key {key!r}") for v in labels
        )
    return out


def matches(entities: Mapping[str, str], filters: Mapping[str, Iterable[str]]) -> bool:
    """Whether a file's `entities` has, for every filter key, one of the allowed labels."""
    return all(
        key in entities and any(same_label(key, entities[key], v) for v in allowed)
        for key, allowed in filters.items()
    )


def describe_filters(filters: Mapping[str, Iterable[str]]) -> str:
    """Filters as text, e.g. "ses-baseline and run-1 or run-2"."""
    return " and ".join(" or ".join(f"{k}-{v}" for v in allowed) for k, allowed in filters.items())
