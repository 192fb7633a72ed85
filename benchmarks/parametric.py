"""Benchmark: `python -m kinetix.parametric` end to end vs a plain NumPy float64 Patlak.

    python benchmarks/parametric.py [--shape 256 256 71] [--repeats 3] [--workdir DIR] [--keep]

Writes a synthetic BIDS-PET subject (default 256×256×71×28 float32, 521 MB before gzip; the
paper's 28-frame schedule) into a temporary directory: a handful of 2TCM tissue curves
(`kk.pet_frames` of a Feng input) painted onto a label volume (body ellipse, lungs, liver,
heart, tumours), plus Gaussian noise that grows as 1/√(frame duration). Then it times, each in
a fresh subprocess (so JAX start-up, NIfTI decompression and writing are included):

* kinetix: `python -m kinetix.parametric --pet ... --tstar 9 --out ...` (body mask + JAX Patlak);
* baseline: a straightforward NumPy script: `nib.load(...).get_fdata()` (float64), Patlak
  coordinates on a 1-s grid, `np.linalg.lstsq` of all voxels at once, `nib.save` of Ki and V0.

Wall time is measured around the subprocess, peak memory is the child's `ru_maxrss` (from
`os.wait4`). The table prints the median of `--repeats` runs, the ratio to the baseline, the
targets (< 10 s, ≤ 3× the volume's size) and TPCCLIB imgki's external figure (6.3 s on this
volume size). It also checks that both Ki maps agree inside the kinetix mask.

The read alone is timed too, each in a fresh subprocess that has imported kinetix first (so JAX's
start-up is not counted): kinetix's `bids.read_subject` (sidecar, blood, checks, zlib-ng inflate
into one array, SUV scaling in place) against what it replaces, nibabel's
`get_fdata(dtype=float32)` times the SUV factor; memory is the peak above the child's resident
memory before reading. kinetix's own log splits its end-to-end time into read, fit and write.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

T_STAR = 9.0
TPCCLIB_IMGKI_S = 6.3
DOSE_MBQ = 350.0
WEIGHT_KG = 75.0
SUV_TO_BQML = DOSE_MBQ * 1e6 / (WEIGHT_KG * 1e3)
INPUT_SCALE = 0.05  # Feng's FDG curve (peak ~103) scaled to plasma SUV (peak ~5, tail ~0.9)

# (fv, K1, k2, k3, k4) and tissue fraction per label; 0 is air.
TISSUES = {
    "air": ((0.0, 0.0, 0.0, 0.0, 0.0), 0.0),
    "soft tissue": ((0.03, 0.05, 0.30, 0.02, 0.0), 1.0),
    "lung": ((0.10, 0.03, 0.30, 0.01, 0.0), 0.3),
    "liver": ((0.05, 0.70, 0.90, 0.01, 0.005), 1.0),
    "heart": ((0.60, 0.60, 1.00, 0.10, 0.0), 1.0),
    "tumour": ((0.05, 0.25, 0.40, 0.15, 0.0), 1.0),
}


# ------------------------------------------------------------------------------------------------
# Synthetic subject
# ------------------------------------------------------------------------------------------------
def _labels(shape) -> np.ndarray:
    """[X, Y, Z] int8 label volume (indices into TISSUES)."""
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2)[:, None] / (0.43 * nx)
    y = (np.arange(ny) - ny / 2)[None, :] / (0.30 * ny)
    lab2 = np.zeros((nx, ny), np.int8)
    lab2[x**2 + y**2 < 1] = 1
    lungs = np.zeros((nx, ny), bool)
    for cx in (-0.45, 0.45):
        lungs |= ((x - cx) / 0.33) ** 2 + (y / 0.6) ** 2 < 1
    liver = ((x + 0.35) / 0.4) ** 2 + ((y - 0.1) / 0.5) ** 2 < 1
    heart = ((x - 0.1) / 0.18) ** 2 + ((y + 0.2) / 0.3) ** 2 < 1
    labels = np.zeros(shape, np.int8)
    for z in range(nz):
        sl = lab2.copy()
        if z > nz // 2:
            sl[lungs] = 2
            sl[heart & (z < 0.8 * nz)] = 4
        else:
            sl[liver] = 3
        labels[:, :, z] = sl
    rng = np.random.default_rng(1)
    zz = np.arange(nz)[None, None, :]
    xx = np.arange(nx)[:, None, None]
    yy = np.arange(ny)[None, :, None]
    for _ in range(6):  # tumours inside the body
        cx, cy = rng.uniform(0.3, 0.7) * nx, rng.uniform(0.35, 0.65) * ny
        cz, r = rng.uniform(0.1, 0.9) * nz, rng.uniform(3, 8)
        labels[((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 < r * r)] = 5
    return labels


def write_subject(root: pathlib.Path, shape) -> pathlib.Path:
    """Writes the synthetic subject; returns its `_pet.nii.gz` path."""
    import kinetix.kinetics as kk
    from kinetix.data import bids

    sched = kk.PAPER_SCHEDULE
    grid = np.concatenate([np.arange(0, 2, 1 / 12), np.arange(2, 10, 0.5), np.arange(10, 66.1, 2)])
    feng = kk.FengInput(kk.FENG_FDG)
    plasma_suv = INPUT_SCALE * np.asarray(feng(grid), np.float64)
    inp = kk.SampledInput(grid, plasma_suv)
    params = np.array([p for p, _ in TISSUES.values()])
    fraction = np.array([f for _, f in TISSUES.values()])
    tacs = fraction[:, None] * np.asarray(kk.pet_frames(params, inp, sched), np.float64)
    tacs_bq = (tacs * SUV_TO_BQML).astype(np.float32)  # [L, T]

    labels = _labels(shape)
    rng = np.random.default_rng(0)
    frames = np.empty((*shape, sched.n_frames), np.float32, order="F")  # NIfTI layout
    for t in range(sched.n_frames):
        clean = tacs_bq[labels, t]  # [X, Y, Z]
        # Poisson-like: sigma ∝ sqrt((C + c0) / duration), C in SUV, duration in min.
        sigma = (
            0.15 * np.sqrt((clean / SUV_TO_BQML + 0.02) / float(sched.duration[t])) * SUV_TO_BQML
        )
        clean += rng.standard_normal(shape, np.float32) * sigma
        frames[..., t] = clean
    affine = np.diag([2.73, 2.73, 3.27, 1.0])
    affine[:3, 3] = -0.5 * np.array(shape) * np.diag(affine)[:3]
    return bids.write_subject(
        root,
        "sub-01",
        frames,
        sched,
        grid,
        plasma_suv * SUV_TO_BQML,
        plasma_suv * SUV_TO_BQML,
        DOSE_MBQ,
        WEIGHT_KG,
        affine,
    )


# ------------------------------------------------------------------------------------------------
# Baseline: straightforward NumPy float64
# ------------------------------------------------------------------------------------------------
def baseline(pet: pathlib.Path, blood: pathlib.Path, out: pathlib.Path, t_star: float) -> None:
    """Plain NumPy Patlak (float64, every voxel, one lstsq); writes `out/baseline_{Ki,V0}`."""
    import nibabel as nib

    img = nib.load(pet)
    data = img.get_fdata()  # [X, Y, Z, T] float64
    side = json.loads(pet.with_name(pet.name.replace(".nii.gz", ".json")).read_text())
    start = np.asarray(side["FrameTimesStart"]) / 60.0
    end = start + np.asarray(side["FrameDuration"]) / 60.0
    mid = 0.5 * (start + end)
    table = np.genfromtxt(blood, delimiter="\t", names=True)
    tt = np.arange(0.0, end[-1] + 1 / 60, 1 / 60)  # 1-s grid (min)
    cp = np.interp(tt, table["time"] / 60.0, table["plasma_radioactivity"])
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (cp[1:] + cp[:-1]) * np.diff(tt))])
    cp_mean = np.array(
        [
            (np.interp(e, tt, cum) - np.interp(s, tt, cum)) / (e - s)
            for s, e in zip(start, end, strict=False)
        ]
    )
    use = mid >= t_star  # frames by mid-time, as TPCCLIB
    x = np.interp(mid[use], tt, cum) / cp_mean[use]  # [F]
    y = data[..., use] / cp_mean[use]  # [X, Y, Z, F]
    a = np.stack([x, np.ones_like(x)], axis=1)  # [F, 2]
    coef = np.linalg.lstsq(a, y.reshape(-1, x.size).T, rcond=None)[0]  # [2, N]
    out.mkdir(parents=True, exist_ok=True)
    for name, row in (("Ki", 0), ("V0", 1)):
        vol = coef[row].reshape(data.shape[:3]).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, img.affine, img.header), out / f"baseline_{name}.nii.gz")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall s, child CPU s = user + sys, child peak RSS in bytes, stderr) of a subprocess.

    Peak RSS is the child's `ru_maxrss` from `os.wait4`. On Linux it starts from the parent's
    RSS at fork time (the high-water mark survives exec), so the parent imports only NumPy and
    writes the data in a separate child; its own RSS (~40 MB) bounds the overstatement.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024.0, err


def read_only(how: str, pet: pathlib.Path) -> None:
    """Child: reads the scan as `how` ("kinetix" or "nibabel") and prints one JSON line: wall
    and CPU seconds of the read, resident memory (bytes) before it and at its peak."""
    import nibabel as nib

    from kinetix.data import bids

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    t0, c0 = time.perf_counter(), time.process_time()
    if how == "kinetix":
        frames = bids.read_subject(pet).frames
    else:
        side = json.loads(pet.with_name(pet.name.replace(".nii.gz", ".json")).read_text())
        suv_factor = side["BodyWeight"] * 1e3 / (side["InjectedRadioactivity"] * 1e6)  # g/Bq
        frames = nib.load(pet).get_fdata(dtype=np.float32) * np.float32(suv_factor)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    print(json.dumps({"wall": wall, "cpu": cpu, "before": before, "peak": peak, "n": frames.size}))


def timed_read(how: str, pet: pathlib.Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak resident memory above the start in bytes) of `read_only` in a child."""
    cmd = [sys.executable, __file__, "--read", how, str(pet)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    return row["wall"], row["cpu"], row["peak"] - row["before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 71))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data")
    parser.add_argument(
        "--baseline", nargs=3, metavar=("PET", "BLOOD", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--write", nargs=4, metavar=("ROOT", "X", "Y", "Z"), help=argparse.SUPPRESS)
    parser.add_argument("--read", nargs=2, metavar=("HOW", "PET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read_only(args.read[0], pathlib.Path(args.read[1]))
        return
    if args.write:
        write_subject(pathlib.Path(args.write[0]), tuple(int(v) for v in args.write[1:]))
        return
    if args.baseline:
        pet, blood, out = map(pathlib.Path, args.baseline)
        baseline(pet, blood, out, T_STAR)
        return

    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="kinetix-bench-"))
    try:
        pet = work / "bids" / "sub-01" / "pet" / "sub-01_pet.nii.gz"
        if not pet.exists():  # in a child, so that this process stays small (see `timed`)
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--write", str(work / "bids"), *map(str, args.shape)]
            subprocess.run(cmd, check=True)
            print(f"wrote {pet} in {time.perf_counter() - t0:.1f} s")
        blood = pet.with_name("sub-01_recording-manual_blood.tsv")
        volume_bytes = int(np.prod(args.shape)) * 28 * 4
        print(
            f"volume {tuple(args.shape)}×28 float32 = {volume_bytes / 1e6:.0f} MB, "
            f"gzip file {pet.stat().st_size / 1e6:.0f} MB"
        )
        kin_out, base_out = work / "kinetix", work / "baseline"
        runs = {
            "kinetix.parametric (JAX, mask)": [
                sys.executable,
                "-m",
                "kinetix.parametric",
                "--pet",
                str(pet),
                "--tstar",
                str(T_STAR),
                "--out",
                str(kin_out),
                "--overwrite",
            ],
            "baseline (NumPy float64 lstsq)": [
                sys.executable,
                __file__,
                "--baseline",
                str(pet),
                str(blood),
                str(base_out),
            ],
        }
        results = {name: [] for name in runs}
        reads = {"kinetix read_subject (zlib-ng)": "kinetix", "nibabel get_fdata × SUV": "nibabel"}
        read_results = {name: [] for name in reads}
        breakdown = []
        for _ in range(args.repeats):
            for name, cmd in runs.items():
                wall, cpu, rss, err = timed(cmd)
                results[name].append((wall, cpu, rss))
                if "kinetix" in name:
                    line = next((ln for ln in err.splitlines() if "read " in ln), "")
                    breakdown.append(line.split("] ", 1)[-1])
            for name, how in reads.items():
                read_results[name].append(timed_read(how, pet))
        report(results, volume_bytes, breakdown)
        report_reads(read_results, volume_bytes)
        check_agreement(pet, kin_out, base_out)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict, volume_bytes: int, breakdown: list[str]) -> None:
    """Prints the comparison table (medians over the repeats)."""
    med = {n: np.median(np.asarray(rows), axis=0) for n, rows in results.items()}
    base = med[next(n for n in results if n.startswith("baseline"))]
    print(
        f"\n{platform.node()} | {os.cpu_count()} CPUs | load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} | "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    cols = ("wall s", "wall s (runs)", "CPU s", "peak RSS GB", "×volume", "wall ratio", "CPU ratio")
    widths = (8, 18, 8, 12, 8, 11, 10)

    def row(name, cells):
        return f"{name:32s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=False))

    print(row("(medians)", cols))
    for name, rows in results.items():
        (wall, cpu, rss), runs = med[name], " ".join(f"{r[0]:.1f}" for r in rows)
        cells = (f"{wall:.2f}", runs, f"{cpu:.2f}", f"{rss / 1e9:.2f}", f"{rss / volume_bytes:.2f}")
        cells += (f"{wall / base[0]:.2f}", f"{cpu / base[1]:.2f}")
        print(row(name, cells))
    print(row("TPCCLIB imgki (external figure)", (f"{TPCCLIB_IMGKI_S:.2f}",)))
    target = ("< 10", "", "", f"{3 * volume_bytes / 1e9:.2f}", "3.00")
    print(row("target", target))
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    print(f"(peak RSS includes at most this process's {parent / 1e6:.0f} MB at fork)")
    for i, line in enumerate(breakdown):
        print(f"kinetix run {i + 1}: {line}")


def report_reads(results: dict, volume_bytes: int) -> None:
    """Prints the read-only table (medians over the repeats)."""
    print(
        f"\n{'read only (medians)':32s}{'wall s':>8s}{'CPU s':>8s}{'peak above start GB':>21s}"
        f"{'×volume':>9s}"
    )
    for name, rows in results.items():
        wall, cpu, rss = np.median(np.asarray(rows), axis=0)
        print(f"{name:32s}{wall:8.2f}{cpu:8.2f}{rss / 1e9:21.2f}{rss / volume_bytes:9.2f}")


def check_agreement(pet: pathlib.Path, kin_out: pathlib.Path, base_out: pathlib.Path) -> None:
    import nibabel as nib

    from kinetix.inference import patlak  # after the timings: the parent stays small for them

    paths = patlak.output_paths(pet, kin_out)
    ki = np.asarray(nib.load(paths["ki"]).dataobj)
    mask = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    ref = np.asarray(nib.load(base_out / "baseline_Ki.nii.gz").dataobj)
    diff = np.abs(ki[mask] - ref[mask])
    scale = float(np.percentile(np.abs(ref[mask]), 99))
    print(
        f"Ki agreement inside the mask ({mask.sum()} voxels, {mask.mean():.1%} of the volume): "
        f"max |Δ| = {diff.max():.2e}, 99th pct |Δ| = {np.percentile(diff, 99):.2e} "
        f"(1/min; 99th pct |Ki| = {scale:.3g})"
    )


if __name__ == "__main__":
    main()
