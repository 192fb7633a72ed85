"""Benchmark: kinetix's BIDS-PET discovery vs pybids on a 100-subject, two-visit archive.

    python benchmarks/layout.py [--workdir DIR] [--subjects 100] [--repeats 5]

Builds once, into `--workdir` (default: a `kinetix-layout` folder in the temporary directory),
a BIDS-PET tree of `--subjects` subjects, each with two visits (`ses-baseline`, `ses-followup`)
of one scan, `sub-X/ses-Y/pet/sub-X_ses-Y_trc-18FFDG_rec-acdyn_run-1_pet.nii.gz` (a 1×1×1×28
float32 NIfTI, header and one voxel per frame) with its sidecar, and two blood recordings per scan
(`..._trc-18FFDG_run-1_recording-manual_blood.tsv` and `...-autosampler_...`, without `rec-`).
Then it times, each in a fresh subprocess (interpreter start-up, imports and the query):

* kinetix: `import kinetix.data.bids`; `bids.find_subjects(root, {"ses": "baseline"})` and
  `bids.find_blood(pet, "manual")` for each scan found;
* pybids: `from bids import BIDSLayout`; `BIDSLayout(root, validate=False)`,
  `layout.get(suffix="pet", session="baseline", extension=".nii.gz")` and, for each scan,
  `layout.get(suffix="blood", recording="manual", extension=".tsv", <the scan's subject,
  session, tracer and run>)`.

Both must find the same (scan, blood) pairs. The table gives medians over `--repeats` runs of the
import, the query (index + look-ups) and the subprocess's wall time, and the ratio pybids /
kinetix. pybids is not a kinetix dependency: install it for this script with
``pip install -e .[bench]``.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

N_FRAMES = 28
SESSIONS = ("baseline", "followup")
RECORDINGS = ("manual", "autosampler")
SCAN = "trc-18FFDG_rec-acdyn_run-1"
BLOOD = "trc-18FFDG_run-1"  # blood is not reconstructed: no rec-


# ------------------------------------------------------------------------------------------------
# The archive
# ------------------------------------------------------------------------------------------------
def build(root: pathlib.Path, n_subjects: int) -> None:
    """Writes the tree (once: a complete tree has `.complete`)."""
    import nibabel as nib
    import numpy as np

    if (root / ".complete").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "layout benchmark", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    rows = ["participant_id\tweight"]
    sidecar = {
        "FrameTimesStart": [0.0] * N_FRAMES,  # content is not read by either side
        "FrameDuration": [1.0] * N_FRAMES,
        "Units": "Bq/mL",
        "TracerName": "FDG",
        "TracerRadionuclide": "F18",
    }
    blood_tsv = "time\tplasma_radioactivity\n0\t0\n60\t1000\n"
    blood_json = json.dumps({"time": {"Units": "s"}, "plasma_radioactivity": {"Units": "Bq/mL"}})
    image = nib.Nifti1Image(np.ones((1, 1, 1, N_FRAMES), np.float32), np.eye(4))
    for i in range(1, n_subjects + 1):
        sub = f"sub-{i:03d}"
        rows.append(f"{sub}\t70")
        for ses in SESSIONS:
            folder = root / sub / f"ses-{ses}" / "pet"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{sub}_ses-{ses}_{SCAN}_pet"
            nib.save(image, folder / f"{stem}.nii.gz")
            (folder / f"{stem}.json").write_text(json.dumps(sidecar))
            for rec in RECORDINGS:
                blood = folder / f"{sub}_ses-{ses}_{BLOOD}_recording-{rec}_blood"
                blood.with_suffix(".tsv").write_text(blood_tsv)
                blood.with_suffix(".json").write_text(blood_json)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / ".complete").write_text("")


# ------------------------------------------------------------------------------------------------
# One side, in its own process
# ------------------------------------------------------------------------------------------------
def run_kinetix(root: str) -> dict:
    t0 = time.perf_counter()
    from kinetix.data import bids

    t1 = time.perf_counter()
    pets = bids.find_subjects(root, {"ses": "baseline"})
    pairs = [(str(p), str(bids.find_blood(p, "manual"))) for p in pets]
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "query_s": t2 - t1, "pairs": pairs}


def run_pybids(root: str) -> dict:
    t0 = time.perf_counter()
    from bids import BIDSLayout

    t1 = time.perf_counter()
    layout = BIDSLayout(root, validate=False)
    pets = layout.get(suffix="pet", session="baseline", extension=".nii.gz")
    pairs = []
    for pet in pets:
        ents = pet.get_entities()
        shared = {k: ents[k] for k in ("subject", "session", "task", "tracer", "run") if k in ents}
        (blood,) = layout.get(suffix="blood", recording="manual", extension=".tsv", **shared)
        pairs.append((pet.path, blood.path))
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "query_s": t2 - t1, "pairs": sorted(pairs)}


def timed(side: str, root: pathlib.Path) -> dict:
    """One side's figures from a fresh subprocess, with its wall time around it."""
    cmd = [sys.executable, __file__, "--side", side, str(root)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kinetix-layout"))
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="Write the raw figures to this file.")
    parser.add_argument("--side", nargs=2, metavar=("SIDE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side, root = args.side
        print(json.dumps((run_kinetix if side == "kinetix" else run_pybids)(root)))
        return

    root = pathlib.Path(args.workdir) / f"bids-{args.subjects}"
    t0 = time.perf_counter()
    build(root, args.subjects)
    built = time.perf_counter() - t0
    print(f"{root}: {args.subjects} subjects × {len(SESSIONS)} visits (ready in {built:.1f} s)")
    runs = {"kinetix": [], "pybids": []}
    for _ in range(args.repeats):  # interleaved, so that load changes hit both sides
        for side in runs:
            runs[side].append(timed(side, root))
    pairs = {side: sorted(map(tuple, r[0]["pairs"])) for side, r in runs.items()}
    if pairs["kinetix"] != pairs["pybids"]:
        raise SystemExit("kinetix and pybids found different (scan, blood) pairs")
    print(f"both found {len(pairs['kinetix'])} (scan, blood) pairs of ses-baseline\n")
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("import_s", "query_s", "wall_s")}
        for side, rs in runs.items()
    }
    print(f"medians of {args.repeats} fresh processes, {platform.node()}, {os.cpu_count()} CPUs")
    print(f"{'':24s}{'kinetix':>10s}{'pybids':>10s}{'pybids/kinetix':>16s}")
    for key, label in (("import_s", "import (s)"), ("query_s", "index + look-ups (s)"),
                       ("wall_s", "process wall (s)")):  # fmt: skip
        k, p = med["kinetix"][key], med["pybids"][key]
        print(f"{label:24s}{k:10.3f}{p:10.3f}{p / k:15.1f}×")
    if args.json:
        figures = {"subjects": args.subjects, "repeats": args.repeats, "medians": med}
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
