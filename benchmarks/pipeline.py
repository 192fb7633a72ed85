"""Training input pipeline: kinetix's grain slice iterator vs re-reading every example from disk.

    python benchmarks/pipeline.py --data runs/s8/data [--batches 20] [--batch-size 2]  # demo cohort
    python benchmarks/pipeline.py --subjects 4 --size 64 --slices 8   # simulate a cohort first
    python benchmarks/pipeline.py --data DIR --batch-size 8 --json out.json

* kinetix: `pipeline.Cohort.from_bids(root)` and `pipeline.slice_dataset(cohort, subjects, B,
  seed=0, input_points=K, mask_threshold=..., prefetch=..., worker_count=...)` with the
  settings of `--config` (default configs/demo.py: B = 2, K = 64, threshold 0.05, prefetch 2,
  no worker processes), as `kinetix.training` builds its training iterator, over all subjects
  of the cohort. Cold: the whole first epoch (every study is decoded from its .nii.gz on first
  use; the time includes starting grain's prefetch threads). Warm: the next `--batches` batches,
  served from the LRU cache of decoded studies (the whole cohort when it fits in 2 GiB, as the
  demo's does; the cohort's repr prints the cache size). Both are a tight `next(it)` loop, so
  they measure throughput with the prefetch threads running ahead.
* baseline ("naive"): for the same records (subject, z) as the warm batches, each example
  re-reads its subject with `bids.read_subject` (NIfTI decode, sidecar and blood TSV, SUV
  conversion) and builds the example with the public helpers: the slice's frames,
  `body_mask(time_average(slice), 99th percentile of time_average(volume), threshold)`,
  `compress_curve` + `pad_curve` of (plasma, whole blood) to K points; then `np.stack` per key.
  It leaves out shuffling, batching bookkeeping, checkpointable iterator state and prefetch
  threads (it runs serially in the calling thread), and caches nothing.

Every baseline batch is checked against the kinetix batch of the same records with
`np.testing.assert_allclose(rtol=1e-6, atol=1e-6)` (the two should agree bit for bit; the script
prints the largest difference). For scale the table shows the demo's measured train step
(≈ 0.58 s per step of batch 2 on the 2-vCPU VM, configs/demo.py): input is a bottleneck only when
its ms per batch approaches that, since the prefetch threads fill the buffer during the step.

Small cohorts: grain's `index_shuffle` costs about 1/(number of records) per example (measured
4.6 ms per example at 6 records, 0.16 ms at 192, 0.02 ms at 10 000; grain 0.2.18), so on a tiny
simulated cohort the warm figure is mostly the shuffle, not the slice (a cached `Cohort.slice`
is ~0.06 ms at 32×32×28).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _config import load_config  # noqa: E402  (benchmarks/_config.py)

from kinetix.data import bids, pipeline  # noqa: E402

DEMO_STEP_S = 0.58  # configs/demo.py docstring: measured s per train step (2 vCPU, batch 2)
KEYS = ("frames", "mask", "plasma_times", "plasma", "whole_blood", "subject", "slice", "valid")


def simulate(out_dir, n_subjects, size, slices):
    from kinetix.data.phantom.cohort import simulate_cohort
    from kinetix.data.phantom.config import SimulationConfig

    cfg = SimulationConfig(size=size, slices=slices, noise="image")
    simulate_cohort(out_dir, n_subjects, 0, cfg, preview=False, progress=False)


def naive_example(pet_path, subject_index, z, schedule, input_points, mask_threshold):
    """One example built from scratch: `read_subject` (no cache) and the public helpers."""
    st = bids.read_subject(pet_path)
    frames = np.ascontiguousarray(st.frames[:, :, z, :], dtype=np.float32)
    reference = float(
        np.percentile(pipeline.time_average(st.frames, schedule), pipeline.MASK_PERCENTILE)
    )
    mask = pipeline.body_mask(pipeline.time_average(frames, schedule), reference, mask_threshold)
    blood = st.plasma if st.whole_blood is None else st.whole_blood
    t, v = pipeline.compress_curve(st.plasma_times, np.stack([st.plasma, blood]), input_points)
    t, v = pipeline.pad_curve(t, v, input_points)
    return {
        "frames": frames,
        "mask": mask,
        "plasma_times": t.astype(np.float32),
        "plasma": v[0].astype(np.float32),
        "whole_blood": v[1].astype(np.float32),
        "subject": np.int32(subject_index),
        "slice": np.int32(z),
        "valid": np.float32(1.0),
    }


def naive_batch(records, paths, subjects, schedule, input_points, mask_threshold):
    exs = [
        naive_example(paths[subjects[i]], i, z, schedule, input_points, mask_threshold)
        for i, z in records
    ]
    return {k: np.stack([ex[k] for ex in exs]) for k in KEYS}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=None, help="BIDS cohort (default: simulate one)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    ap.add_argument("--batches", type=int, default=20, help="warm and baseline batches timed")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's (2)")
    ap.add_argument("--workers", type=int, default=None, help="grain worker_count override")
    ap.add_argument("--subjects", type=int, default=4, help="simulated subjects")
    ap.add_argument("--size", type=int, default=64, help="simulated matrix size")
    ap.add_argument("--slices", type=int, default=8, help="simulated slices per subject")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    config = load_config(args.config)
    d = config.data
    bs = args.batch_size or int(d.batch_size)
    workers = int(d.worker_count) if args.workers is None else args.workers
    if workers > 0:  # grain's worker processes read absl flags
        from absl import flags

        flags.FLAGS(sys.argv[:1])
    root, tmp = args.data, None
    if root is None:  # removed at exit (TemporaryDirectory's finaliser), even on an error
        tmp = tempfile.TemporaryDirectory(prefix="kinetix_pipeline_")
        root = pathlib.Path(tmp.name) / "cohort"
        t0 = time.perf_counter()
        simulate(root, args.subjects, args.size, args.slices)
        print(f"simulated {args.subjects} subjects in {time.perf_counter() - t0:.1f} s: {root}")

    t0 = time.perf_counter()
    cohort = pipeline.Cohort.from_bids(root)
    t_open = time.perf_counter() - t0
    subjects = list(cohort.subjects)
    paths = {p.name.split("_")[0]: p for p in bids.find_subjects(root)}
    n_records = len(cohort.records(subjects))
    n_epoch = n_records // bs
    kw = dict(input_points=int(d.input_points), mask_threshold=float(d.mask_threshold))
    it = pipeline.slice_dataset(
        cohort, subjects, bs, seed=0, prefetch=int(d.prefetch), worker_count=workers, **kw
    )

    t0 = time.perf_counter()  # cold: the first epoch decodes every study once
    for _ in range(n_epoch):
        next(it)
    t_cold = (time.perf_counter() - t0) / n_epoch
    t0 = time.perf_counter()
    warm = [next(it) for _ in range(args.batches)]
    t_warm = (time.perf_counter() - t0) / args.batches
    if hasattr(it, "close"):
        it.close()

    recs = [list(zip(b["subject"].tolist(), b["slice"].tolist(), strict=True)) for b in warm]
    t0 = time.perf_counter()
    naive = [naive_batch(r, paths, subjects, cohort.schedule, **kw) for r in recs]
    t_naive = (time.perf_counter() - t0) / args.batches

    worst = 0.0
    for a, b in zip(warm, naive, strict=True):
        for k in KEYS:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)
            worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k]))))

    nx, ny = cohort.shape
    n_frames = cohort.schedule.n_frames
    print(
        f"\n{cohort!r}; opened in {t_open * 1e3:.0f} ms\nbatch {bs}, {len(subjects)} subjects, "
        f"{n_records} slices ({n_epoch} batches per epoch), {nx}×{ny}×{n_frames} frames, "
        f"K = {kw['input_points']}, prefetch {d.prefetch}, workers {workers}"
    )
    rows = [
        (f"kinetix cold (epoch 1, {n_epoch} batches)", t_cold),
        (f"kinetix warm ({args.batches} batches)", t_warm),
        (f"naive read_subject ({args.batches} batches)", t_naive),
        ("demo train step, for scale", DEMO_STEP_S),
    ]
    print(f"{'item':42s} {'ms/batch':>9s} {'batches/s':>10s} {'÷ step':>7s}")
    for name, t in rows:
        print(f"{name:42s} {t * 1e3:9.2f} {1 / t:10.1f} {t / DEMO_STEP_S:7.3f}")
    ratio = t_naive / t_warm
    print(f"baseline ÷ kinetix (warm) = {ratio:.1f}×; cold ÷ warm = {t_cold / t_warm:.1f}×")
    print(f"batches equal (rtol=atol=1e-6): yes, largest |difference| {worst:.3g}")

    if args.json:
        res = dict(
            data=str(args.data) if args.data else f"simulated ({args.subjects} subjects)",
            batch_size=bs,
            subjects=len(subjects),
            slices=n_records,
            matrix=[nx, ny],
            frames=n_frames,
            input_points=kw["input_points"],
            prefetch=int(d.prefetch),
            worker_count=workers,
            batches=args.batches,
            open_s=t_open,
            kinetix_cold_s_per_batch=t_cold,
            kinetix_warm_s_per_batch=t_warm,
            naive_s_per_batch=t_naive,
            ratio_naive_over_warm=ratio,
            demo_step_s=DEMO_STEP_S,
            max_abs_difference=worst,
        )
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
