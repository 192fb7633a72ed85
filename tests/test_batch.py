"""Tests for kinetix.data.pipeline.batch: one subject gives the network the same input whether the
training pipeline (`Cohort.slice`, `slice_dataset`) or prediction (`volume_batches`) builds it.

Reference: the training pipeline's batch of the same simulated subject, read from the same BIDS
files; the study's own arrays for the frames and the padding.
"""

import dataclasses

import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix.data import bids, pipeline
from kinetix.data.phantom import SimulationConfig
from kinetix.data.phantom.cohort import simulate_cohort

SIZE, SLICES, K = 16, 2, 32  # the simulator samples 150 blood points, far more than K
N_EARLY = kk.N_EARLY_FRAMES


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "cohort"
    cfg = SimulationConfig(size=SIZE, slices=SLICES, noise="image")
    simulate_cohort(root, 2, 5, cfg, progress=False, preview=False)
    return root


@pytest.fixture(scope="module")
def study(cohort_root):
    """sub-02 as `kinetix.predict` reads it (`bids.read_subject`)."""
    return bids.read_subject(cohort_root / "sub-02" / "pet" / "sub-02_pet.nii.gz")


def test_the_subject_has_more_blood_samples_than_input_points(study):
    assert study.plasma_times.size > K
    assert study.whole_blood is not None
    assert not np.allclose(study.whole_blood, study.plasma, rtol=0.05, atol=0.0)
    # A subject on which reducing the plasma alone keeps other samples than the joint reduction
    # (the prediction path before the batch builder), so the next test tells them apart.
    alone, _ = pipeline.compress_curve(study.plasma_times, study.plasma, K)
    assert np.setdiff1d(pipeline.input_curves(study, K)[0], alone).size > 0


def test_prediction_input_equals_the_training_input(cohort_root, study):
    cohort = pipeline.Cohort.from_bids(cohort_root)
    assert cohort.subjects[1] == study.subject
    it = pipeline.slice_dataset(
        cohort, [study.subject], SLICES, seed=0, shuffle=False, num_epochs=1, input_points=K,
        prefetch=0,
    )  # fmt: skip
    train = next(it)
    it.close()
    batches = list(
        pipeline.volume_batches(
            study, N_EARLY, cohort.schedule.n_frames, K, SLICES, 4, subject_index=1
        )
    )
    assert len(batches) == 1 and batches[0][0] == list(range(SLICES))
    pred = batches[0][1]
    assert sorted(pred) == sorted(train) == sorted(pipeline.BATCH_KEYS)
    for key in pipeline.BATCH_KEYS:
        assert pred[key].dtype == train[key].dtype and pred[key].shape == train[key].shape, key
    for key in ("plasma_times", "plasma", "whole_blood", "subject", "slice", "valid"):
        np.testing.assert_array_equal(pred[key], train[key], err_msg=key)
    np.testing.assert_array_equal(pred["frames"][..., :N_EARLY], train["frames"][..., :N_EARLY])
    np.testing.assert_array_equal(pred["frames"][..., N_EARLY:], 0.0)
    for z in range(SLICES):  # the same through Cohort.slice
        ex = cohort.slice(study.subject, z, input_points=K)
        np.testing.assert_array_equal(pred["frames"][z, ..., :N_EARLY], ex["frames"][..., :N_EARLY])
        for key in ("plasma_times", "plasma", "whole_blood"):
            np.testing.assert_array_equal(pred[key][z], ex[key], err_msg=key)


def test_input_curves_keep_joint_samples_of_both_curves(study):
    times, plasma, blood = pipeline.input_curves(study, K)
    assert times.shape == plasma.shape == blood.shape == (K,)
    assert all(a.dtype == np.float32 for a in (times, plasma, blood))
    idx = np.searchsorted(study.plasma_times, times)  # kept samples are measured samples
    np.testing.assert_array_equal(study.plasma_times[idx], times)
    np.testing.assert_array_equal(study.plasma[idx], plasma)
    np.testing.assert_array_equal(study.whole_blood[idx], blood)
    assert idx[0] == 0 and idx[-1] == study.plasma_times.size - 1


def test_input_curves_without_whole_blood_repeat_the_plasma(study):
    no_blood = dataclasses.replace(study, whole_blood=None)
    times, plasma, blood = pipeline.input_curves(no_blood, K)
    np.testing.assert_array_equal(blood, plasma)
    short = dataclasses.replace(
        study, plasma_times=study.plasma_times[:5], plasma=study.plasma[:5], whole_blood=None
    )
    times, plasma, _ = pipeline.input_curves(short, 8)  # fewer samples than K: padded, exact
    np.testing.assert_array_equal(times[:5], study.plasma_times[:5])
    np.testing.assert_array_equal(
        times[5:], study.plasma_times[4] + np.arange(1, 4, dtype=np.float32)
    )
    np.testing.assert_array_equal(plasma[5:], study.plasma[4])


def test_volume_batches_pad_xy_and_fill_the_last_batch(study):
    nx, ny, nz, _ = study.frames.shape
    (zs, batch), *rest = pipeline.volume_batches(study, N_EARLY, 28, K, nz + 1, 32)
    assert not rest and zs == list(range(nz))
    assert batch["frames"].shape == (nz + 1, 32, 32, 28)
    for i, z in enumerate([*range(nz), nz - 1]):  # the filler repeats the last slice
        np.testing.assert_array_equal(
            batch["frames"][i, :nx, :ny, :N_EARLY], study.frames[..., z, :N_EARLY]
        )
        assert batch["slice"][i] == z
    np.testing.assert_array_equal(batch["frames"][:, nx:], 0.0)
    np.testing.assert_array_equal(batch["frames"][:, :, ny:], 0.0)
    np.testing.assert_array_equal(batch["valid"], [1.0] * nz + [0.0])
    np.testing.assert_array_equal(batch["mask"][:, :nx, :ny], 1.0)
    assert batch["mask"].sum() == (nz + 1) * nx * ny
    one = list(pipeline.volume_batches(study, N_EARLY, 28, K, 1))
    assert [zs for zs, _ in one] == [[z] for z in range(nz)]
    assert one[1][1]["frames"].shape == (1, nx, ny, 28)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_early=29), "n_early must be in"),
        (dict(n_frames=10), "n_early must be in"),
        (dict(batch_slices=0), "batch_slices and multiple must be >= 1"),
        (dict(input_points=1), "input_points must be >= 2"),
    ],
)
def test_volume_batches_reject_bad_arguments(study, kwargs, match):
    args = dict(n_early=N_EARLY, n_frames=28, input_points=K, batch_slices=2) | kwargs
    with pytest.raises(ValueError, match=match):
        pipeline.volume_batches(study, **args)
