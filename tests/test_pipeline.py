"""Tests for kinetix.data.pipeline: splits, input-curve packing, Cohort, grain batches."""

import itertools

import jax
import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix.data import bids, pipeline
from kinetix.data.bids import Study

SCHED = kk.PAPER_SCHEDULE
H, W = 16, 12
TISSUES = np.array([[0.05, 0.1, 0.15, 0.1, 0.0], [0.3, 1.0, 1.0, 0.02, 0.01]])  # fv K1 k2 k3 k4
N_SLICES = {"sub-01": 3, "sub-02": 4, "sub-03": 3, "sub-04": 2}  # 12 slices


def _plasma(rng, n=200):
    """~n nonuniform samples of the Feng FDG curve on [0, 65] min (dense early)."""
    t = np.unique(np.concatenate([[0.0], np.sort(rng.uniform(0, 1, n - 2)) ** 3 * 65.0, [65.0]]))
    return t, np.asarray(kk.FengInput(kk.FENG_FDG)(t), np.float64)


def _study(name, n_z, seed, *, whole_blood=True, schedule=SCHED, shape=(H, W)):
    rng = np.random.default_rng(seed)
    frames = rng.uniform(0.0, 0.1, (*shape, n_z, schedule.n_frames)).astype(np.float32)
    frames[3:-3, 3:-3] += rng.uniform(1.0, 5.0, (shape[0] - 6, shape[1] - 6, n_z, 1))
    t, p = _plasma(rng)
    return Study(
        frames=frames,
        schedule=schedule,
        plasma_times=t,
        plasma=p,
        whole_blood=0.9 * p if whole_blood else None,
        suv_factor=1e-3,
        affine=np.eye(4),
        header=nib.Nifti1Header(),
        subject=name,
    )


def _studies():
    return [
        _study(name, n_z, seed, whole_blood=(name != "sub-03"))
        for seed, (name, n_z) in enumerate(N_SLICES.items())
    ]


@pytest.fixture(scope="module")
def cohort():
    return pipeline.Cohort.from_studies(_studies())


@jax.jit
def _frames(params, inp):
    """Paper-schedule frames (jitted: eager kinetics on long inputs is slow)."""
    return kk.pet_frames(params, inp, SCHED)


@jax.jit
def _value_and_integral(inp, t):
    return inp(t), inp.integral(t)


def _pairs(batch):
    return [(int(s), int(z)) for s, z in zip(batch["subject"], batch["slice"], strict=True)]


ALL_PAIRS = sorted((i, z) for i, n in enumerate(N_SLICES.values()) for z in range(n))


# ------------------------------------------------------------------------------------------------
# split_subjects
# ------------------------------------------------------------------------------------------------
def test_split_deterministic_disjoint_covering():
    subjects = [f"sub-{i:02d}" for i in range(20)]
    a = pipeline.split_subjects(subjects, 0.1, 0.2, seed=3)
    b = pipeline.split_subjects(list(reversed(subjects)), 0.1, 0.2, seed=3)
    assert a == b  # deterministic, independent of input order
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 2, 4)
    parts = [set(a[k]) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 20 and set().union(*parts) == set(subjects)
    others = [pipeline.split_subjects(subjects, 0.1, 0.2, seed=s)["test"] for s in range(4, 8)]
    assert any(o != a["test"] for o in others)  # the seed matters


def test_split_small_cohorts_keep_one_per_part():
    s3 = ["sub-01", "sub-02", "sub-03"]
    out = pipeline.split_subjects(s3, 0.1, 0.1, seed=0)
    assert [len(out[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    out = pipeline.split_subjects(s3[:2], 0.1, 0.0, seed=0)
    assert [len(out[k]) for k in ("train", "val", "test")] == [1, 1, 0]
    with pytest.raises(ValueError, match="at least 3 subjects"):
        pipeline.split_subjects(s3[:2], 0.1, 0.1)
    out = pipeline.split_subjects(s3[:1], 0.0, 0.0)
    assert out == {"train": ["sub-01"], "val": [], "test": []}


def test_split_explicit_lists_override():
    subjects = [f"sub-{i:02d}" for i in range(10)]
    out = pipeline.split_subjects(subjects, val=["sub-03"], test=["sub-07", "sub-01"])
    assert out["val"] == ["sub-03"] and out["test"] == ["sub-01", "sub-07"]
    assert sorted(out["train"]) == sorted(set(subjects) - {"sub-01", "sub-03", "sub-07"})
    out = pipeline.split_subjects(subjects, 0.2, test=["sub-05"], seed=1)
    assert out["test"] == ["sub-05"] and len(out["val"]) == 2 and "sub-05" not in out["val"]
    with pytest.raises(ValueError, match="sub-99"):
        pipeline.split_subjects(subjects, val=["sub-99"])
    with pytest.raises(ValueError, match="both val and test"):
        pipeline.split_subjects(subjects, val=["sub-01"], test=["sub-01"])


# ------------------------------------------------------------------------------------------------
# compress_curve / pad_curve
# ------------------------------------------------------------------------------------------------
def _sup_error(t, v, tc, vc):
    """Independent check: both curves on a grid 8× finer than the samples."""
    fine = np.concatenate([np.linspace(a, b, 8, endpoint=False) for a, b in itertools.pairwise(t)])
    return np.max(np.abs(np.interp(fine, t, v) - np.interp(fine, tc, vc)))


def test_compress_short_curve_is_returned_unchanged():
    t, v = _plasma(np.random.default_rng(0), 100)
    tc, vc = pipeline.compress_curve(t, v, 128)
    np.testing.assert_array_equal(tc, t)
    np.testing.assert_array_equal(vc, v)


def test_compress_feng_1s_grid_error(x64):
    t = np.arange(3901) / 60.0  # 1-s grid, 65 min
    feng = kk.FengInput(kk.FENG_FDG)
    v = np.asarray(feng(t))
    tc, vc = pipeline.compress_curve(t, v, 128)
    assert tc.size == 128 and tc[0] == t[0] and tc[-1] == t[-1]
    idx = np.searchsorted(t, tc)
    np.testing.assert_array_equal(t[idx], tc)  # a subset of the samples ...
    np.testing.assert_array_equal(v[idx], vc)  # ... with their own values
    peak = v.max()
    err = _sup_error(t, v, tc, vc) / peak
    assert err < 2e-4  # measured 1.1e-4 of the peak
    assert pipeline.interpolation_error(t, v, tc) / peak == pytest.approx(err, rel=1e-6)
    uniform = np.unique(np.round(np.linspace(0, t.size - 1, 128)).astype(int))
    assert _sup_error(t, v, t[uniform], v[uniform]) / peak > 50 * err  # greedy ≫ uniform

    # The cost in frames: a typical tissue (and a fast one) on the paper schedule.
    full, comp = kk.SampledInput(t, v), kk.SampledInput(tc, vc)
    params = TISSUES
    f_full = np.asarray(_frames(params, full))
    f_comp = np.asarray(_frames(params, comp))
    rel = np.max(np.abs(f_comp - f_full), axis=-1) / np.max(np.abs(f_full), axis=-1)
    assert np.all(rel < 1e-3)  # measured 2.6e-4 and 2.2e-4 (the brief allowed 0.5 %)


def test_compress_joint_curves_share_times():
    t, p = _plasma(np.random.default_rng(1), 400)
    wb = 0.8 * p + 0.5 * np.sin(t)  # a curve with different detail
    tc, vc = pipeline.compress_curve(t, np.stack([p, wb]), 64)
    assert tc.shape == (64,) and vc.shape == (2, 64)
    for curve, got in ((p, vc[0]), (wb, vc[1])):
        assert _sup_error(t, curve, tc, got) / np.abs(curve).max() < 0.02
    with pytest.raises(ValueError, match="max_points"):
        pipeline.compress_curve(t, p, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        pipeline.compress_curve(t[::-1], p, 64)


def test_pad_curve_is_exact(x64):
    t, v = _plasma(np.random.default_rng(2), 90)
    tp, vp = pipeline.pad_curve(t, v, 128)
    assert tp.shape == vp.shape == (128,)
    np.testing.assert_array_equal(tp[90:], t[-1] + np.arange(1, 39))
    np.testing.assert_array_equal(vp[90:], v[-1])
    grid = np.linspace(0.0, 65.0, 2001)
    a, b = kk.SampledInput(t, v), kk.SampledInput(tp, vp)
    (va, ia), (vb, ib) = _value_and_integral(a, grid), _value_and_integral(b, grid)
    np.testing.assert_array_equal(vb, va)
    np.testing.assert_allclose(ib, ia, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(_frames(TISSUES, b), _frames(TISSUES, a), rtol=1e-12)
    with pytest.raises(ValueError, match="compress_curve"):
        pipeline.pad_curve(t, v, 50)


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------
def test_cohort_from_studies(cohort):
    assert cohort.subjects == sorted(N_SLICES)
    assert cohort.schedule == SCHED and cohort.shape == (H, W)
    assert [cohort.n_slices(s) for s in cohort.subjects] == list(N_SLICES.values())
    st = cohort.study("sub-02")
    ex = cohort.slice("sub-02", 2, input_points=64, mask_threshold=0.05)
    assert ex["frames"].shape == (H, W, 28) and ex["frames"].dtype == np.float32
    np.testing.assert_array_equal(ex["frames"], st.frames[:, :, 2, :])
    for key in ("plasma_times", "plasma", "whole_blood"):
        assert ex[key].shape == (64,) and ex[key].dtype == np.float32
    assert ex["subject"] == 1 and ex["slice"] == 2 and ex["valid"] == 1.0
    # Mask rule, recomputed independently: duration-weighted mean vs 5 % of the 99th percentile.
    mean = np.average(st.frames, axis=-1, weights=SCHED.duration)
    ref = np.percentile(mean, 99.0)
    np.testing.assert_array_equal(ex["mask"], (mean[:, :, 2] > 0.05 * ref).astype(np.float32))
    assert ex["mask"].sum() == (H - 6) * (W - 6)  # the synthetic "body"
    # The packed input is the measured one up to the compression error (200 -> 64 samples).
    t, p = st.plasma_times, st.plasma
    assert _sup_error(t, p, ex["plasma_times"], ex["plasma"]) / p.max() < 5e-3
    np.testing.assert_allclose(ex["whole_blood"], 0.9 * ex["plasma"], rtol=1e-6)
    # No whole blood measured -> whole blood = plasma.
    ex3 = cohort.slice("sub-03", 0)
    assert ex3["plasma"].shape == (128,)
    np.testing.assert_array_equal(ex3["whole_blood"], ex3["plasma"])


def test_cohort_errors():
    a, b = _study("sub-01", 2, 0), _study("sub-02", 2, 1, schedule=SCHED[:27])
    with pytest.raises(ValueError, match="sub-02 has a different frame schedule"):
        pipeline.Cohort.from_studies([a, b])
    with pytest.raises(ValueError, match="sub-02 has slices of 8×12"):
        pipeline.Cohort.from_studies([a, _study("sub-02", 2, 1, shape=(8, W))])
    with pytest.raises(ValueError, match="twice"):
        pipeline.Cohort.from_studies([a, a])
    c = pipeline.Cohort.from_studies([a])
    with pytest.raises(ValueError, match="'sub-09' is not in the cohort"):
        c.study("sub-09")
    with pytest.raises(ValueError, match="out of range"):
        c.slice("sub-01", 2)


def test_cohort_from_bids_is_lazy(tmp_path, monkeypatch):
    studies = _studies()[:3]
    for st in studies:
        bids.write_subject(
            tmp_path, st.subject, st.frames / 1e-3, SCHED, st.plasma_times,
            st.plasma / 1e-3, None if st.whole_blood is None else st.whole_blood / 1e-3,
            injected_mbq=70.0, body_weight_kg=70.0, affine=np.eye(4),
        )  # fmt: skip
    reads = []
    real_read = bids.read_subject
    monkeypatch.setattr(bids, "read_subject", lambda p, **kw: reads.append(p) or real_read(p, **kw))
    c = pipeline.Cohort.from_bids(tmp_path, cache_size=1)
    assert reads == []  # headers and sidecars only
    assert c.subjects == ["sub-01", "sub-02", "sub-03"] and c.shape == (H, W)
    np.testing.assert_allclose(c.schedule.start, SCHED.start, atol=1e-8)  # s -> min round trip
    np.testing.assert_allclose(c.schedule.end, SCHED.end, atol=1e-8)
    assert c.n_slices("sub-02") == 4
    ex = c.slice("sub-02", 1)
    ref = real_read(tmp_path / "sub-02/pet/sub-02_pet.nii.gz")
    np.testing.assert_allclose(ex["frames"], ref.frames[:, :, 1, :], rtol=1e-6)
    c.slice("sub-02", 3)
    assert len(reads) == 1  # cached
    c.slice("sub-01", 0), c.slice("sub-02", 0)
    assert len(reads) == 3  # cache_size=1 evicted sub-02
    with pytest.raises(ValueError, match="holds no"):
        pipeline.Cohort.from_bids(tmp_path / "sub-01")


# ------------------------------------------------------------------------------------------------
# slice_dataset / eval_batches
# ------------------------------------------------------------------------------------------------
def _take(it, n):
    return [next(it) for _ in range(n)]


def test_slice_dataset_batches(cohort):
    it = pipeline.slice_dataset(cohort, cohort.subjects, 3, seed=0, input_points=32)
    batch = next(it)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "frames": ((3, H, W, 28), np.float32),
        "mask": ((3, H, W), np.float32),
        "plasma_times": ((3, 32), np.float32),
        "plasma": ((3, 32), np.float32),
        "whole_blood": ((3, 32), np.float32),
        "subject": ((3,), np.int32),
        "slice": ((3,), np.int32),
        "valid": ((3,), np.float32),
    }
    for b, (s, z) in enumerate(_pairs(batch)):  # contents match the example
        ex = cohort.slice(cohort.subjects[s], z, input_points=32)
        for key in ("frames", "mask", "plasma_times", "plasma", "whole_blood"):
            np.testing.assert_array_equal(batch[key][b], ex[key])


def test_slice_dataset_order_epochs_and_seeds(cohort):
    def order(seed, n=8):
        it = pipeline.slice_dataset(cohort, cohort.subjects, 3, seed=seed, prefetch=0)
        return [_pairs(b) for b in _take(it, n)]

    a = order(0)
    assert a == order(0)  # deterministic
    assert a != order(1)
    epoch1 = [p for b in a[:4] for p in b]  # 12 slices / 3 = 4 batches per epoch
    epoch2 = [p for b in a[4:] for p in b]
    assert sorted(epoch1) == ALL_PAIRS and sorted(epoch2) == ALL_PAIRS
    assert epoch1 != epoch2  # reshuffled each epoch
    it = pipeline.slice_dataset(cohort, cohort.subjects, 5, seed=0, num_epochs=2)
    batches = list(it)
    assert len(batches) == 4  # 2 full batches per epoch, remainder dropped
    seen = [p for b in batches[:2] for p in b["subject"].tolist()]
    assert len(seen) == 10
    plain = pipeline.slice_dataset(cohort, cohort.subjects, 4, seed=0, shuffle=False)
    assert [p for b in _take(plain, 3) for p in _pairs(b)] == ALL_PAIRS


@pytest.mark.parametrize("shard_count, per_shard", [(2, 6), (5, 2)])
def test_slice_dataset_shards(cohort, shard_count, per_shard):
    seen = []
    for i in range(shard_count):
        it = pipeline.slice_dataset(
            cohort, cohort.subjects, 1, seed=4, shard_index=i, shard_count=shard_count,
            num_epochs=1,
        )  # fmt: skip
        pairs = [p for b in it for p in _pairs(b)]
        assert len(pairs) == per_shard  # equal per process
        seen += pairs
    assert len(set(seen)) == len(seen)  # disjoint
    if 12 % shard_count == 0:
        assert sorted(seen) == ALL_PAIRS  # covering
    else:
        assert len(seen) == 12 - 12 % shard_count  # 2 slices dropped this epoch


def test_slice_dataset_state_resumes(cohort):
    it = pipeline.slice_dataset(cohort, cohort.subjects, 3, seed=7, input_points=16)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 6)  # crosses the epoch boundary
    it2 = pipeline.slice_dataset(cohort, cohort.subjects, 3, seed=7, input_points=16)
    it2.set_state(state)
    for a, b in zip(expected, _take(it2, 6), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_slice_dataset_errors(cohort):
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.slice_dataset(cohort, cohort.subjects, 0, seed=0)
    with pytest.raises(ValueError, match="sub-77"):
        pipeline.slice_dataset(cohort, ["sub-01", "sub-77"], 2, seed=0)
    with pytest.raises(ValueError, match="no slices"):
        pipeline.slice_dataset(cohort, [], 2, seed=0)
    with pytest.raises(ValueError, match="no full batch"):
        pipeline.slice_dataset(cohort, ["sub-04"], 3, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.slice_dataset(cohort, cohort.subjects, 1, seed=0, shard_index=2, shard_count=2)


def test_eval_batches_cover_every_slice_once(cohort):
    subjects = ["sub-03", "sub-01", "sub-02", "sub-04"]
    batches = list(pipeline.eval_batches(cohort, subjects, 5, input_points=16))
    assert len(batches) == 3
    assert all(b["frames"].shape == (5, H, W, 28) for b in batches)
    np.testing.assert_array_equal(batches[-1]["valid"], [1, 1, 0, 0, 0])
    pairs = [p for b in batches for p, ok in zip(_pairs(b), b["valid"], strict=True) if ok]
    expected = [(cohort.index(s), z) for s in subjects for z in range(N_SLICES[s])]
    assert pairs == expected  # in order, each once
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.eval_batches(cohort, subjects, 0)
    with pytest.raises(ValueError, match="sub-00"):
        pipeline.eval_batches(cohort, ["sub-00"], 2)


@pytest.mark.parametrize("shards, local", [(2, 5), (3, 3)])  # 12 slices: 10+2, 9+3
def test_eval_batch_shards_assemble_the_single_process_batches(cohort, shards, local):
    """Shard i's batches are block i of each global batch of shards × local slices: put side
    by side they are the unsharded batches, real examples and `valid` alike; every shard
    yields as many batches, even when its block of the last global batch is all padding."""
    subjects = ["sub-03", "sub-01", "sub-02", "sub-04"]
    whole = list(pipeline.eval_batches(cohort, subjects, shards * local, input_points=16))
    parts = [
        list(
            pipeline.eval_batches(
                cohort, subjects, local, input_points=16, shard_index=i, shard_count=shards
            )
        )
        for i in range(shards)
    ]
    assert [len(p) for p in parts] == [len(whole)] * shards
    for k, batch in enumerate(whole):
        valid = np.concatenate([p[k]["valid"] for p in parts])
        np.testing.assert_array_equal(valid, batch["valid"])
        ok = valid > 0
        for key in ("frames", "mask", "plasma", "subject", "slice"):
            got = np.concatenate([p[k][key] for p in parts])
            np.testing.assert_array_equal(got[ok], batch[key][ok], err_msg=f"batch {k} {key}")
    assert not parts[-1][-1]["valid"].any()  # the last block of the last batch is padding
    with pytest.raises(ValueError, match="shard_index must be in"):
        pipeline.eval_batches(cohort, subjects, 2, shard_index=2, shard_count=2)


def test_default_cache_holds_a_small_cohort(tmp_path):
    """By default a cohort that fits in DEFAULT_CACHE_BYTES is decoded once per subject."""
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort
    from kinetix.data.pipeline import DEFAULT_CACHE_SIZE

    n = DEFAULT_CACHE_SIZE + 2
    simulate_cohort(
        tmp_path, n, 0, SimulationConfig(size=16, slices=1, noise="none"),
        overwrite=True, progress=False, preview=False,
    )  # fmt: skip
    c = pipeline.Cohort.from_bids(tmp_path)
    assert c._cache_size >= n
    for _ in range(2):
        for s in c.subjects:
            c.slice(s, 0)
    assert len(c._cache) == n  # nothing evicted: every subject decoded once
