"""Voxelwise 2TCM fits of volumes (`kinetix.maps.volume_fit`), the `kinetix.fit` command and the
fit Ki routes of the evaluation.

References: `kk.fit_2tcm` called directly on the same voxels (the chunking must not change a
result), `kk.pet_frames` of the true parameters (noise-free frames), the true voxel-level Ki
(1 − fv)·K1·k3/(k2 + k3) that the simulator writes.
"""

import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix import fit as fit_cmd
from kinetix import maps
from kinetix.data import bids
from kinetix.evaluation import fits, routes
from kinetix.inference import fit as fit_study_lib

SCHED = kk.PAPER_SCHEDULE
INP = kk.FengInput(np.asarray(kk.FENG_FDG) * np.array([0.02] * 3 + [1] * 4))
TISSUES = np.array(  # fv, K1, k2, k3, k4
    [
        [0.03, 0.05, 0.32, 0.015, 0.0],
        [0.15, 1.2, 1.3, 0.01, 0.01],
        [0.05, 0.4, 0.6, 0.25, 0.0],
        [0.05, 0.15, 0.5, 0.05, 0.005],
    ]
)


def _volume(shape=(3, 4, 2)):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(TISSUES), shape)
    params = TISSUES[idx] * np.exp(0.1 * rng.standard_normal(shape + (1,)))
    params[..., 0] = np.clip(params[..., 0], 0, 1)
    frames = np.asarray(kk.pet_frames(params, INP, SCHED), np.float32)
    return params, frames


def test_volume_fit_equals_the_direct_fit_whatever_the_chunks():
    params, frames = _volume()
    mask = np.ones(frames.shape[:-1], bool)
    mask[0, 0, 0] = mask[2, 3, 1] = False
    whole = maps.volume_fit(frames, INP, SCHED, mask, window=(0, 35), chunk_voxels=64)
    chunked = maps.volume_fit(frames, INP, SCHED, mask, window=(0, 35), chunk_voxels=5)
    direct = kk.fit_2tcm(frames[mask], INP, SCHED, window=(0, 35), weights="duration")
    for key in ("params", "ki", "wrss"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-5, atol=2e-6, err_msg=key)
        np.testing.assert_allclose(
            whole[key][mask], np.asarray(getattr(direct, key)), rtol=1e-5, atol=2e-6, err_msg=key
        )
    assert not whole["converged"][~mask].any() and np.all(whole["params"][~mask] == 0)
    assert whole["converged"][mask].all()


def test_fitted_frames_extrapolate_the_true_curve_and_apply_the_delay():
    params, frames = _volume((5,))
    fitted = maps.fitted_frames(params, np.zeros(5), INP, SCHED)
    np.testing.assert_allclose(np.asarray(fitted), frames, rtol=1e-4, atol=1e-6)
    shifted = maps.fitted_frames(params, np.full(5, 0.3), INP, SCHED)
    expected = kk.pet_frames(params, INP.shift(0.3), SCHED)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(expected), rtol=1e-5, atol=1e-7)


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort

    root = tmp_path_factory.mktemp("cohort")
    simulate_cohort(
        root,
        1,
        0,
        SimulationConfig(size=16, slices=1, noise="none"),
        overwrite=True,
        progress=False,
    )
    return root / "sub-01" / "pet" / "sub-01_pet.nii.gz"


def test_fit_command_writes_every_map_with_a_sidecar_and_recovers_ki(subject, tmp_path, capsys):
    out = tmp_path / "fit"
    status = fit_cmd.cli(["fit", "--pet", str(subject), "--out", str(out), "--window", "0,35"])
    assert status == 0, capsys.readouterr().err
    paths = fit_study_lib.output_paths(subject, out)
    assert paths["K1"] == out / "sub-01" / "pet" / "sub-01_km-2tcm_K1.nii.gz"
    summary = json.loads(paths["summary"].read_text())
    assert summary["Window"] == [0.0, 35.0] and summary["FramesUsed"] == list(range(22))
    assert summary["Model"] == "2tcm" and summary["Voxels"] > 0
    for name in ("K1", "k4", "fv"):
        meta = json.loads(bids.derivatives.sidecar_path(paths[name]).read_text())
        assert isinstance(meta["Units"], str)
        assert meta["Sources"][0] == "bids:raw:sub-01/pet/sub-01_pet.nii.gz"
    ki = np.asarray(nib.load(paths["Ki"]).dataobj)
    mask = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    fv = np.asarray(nib.load(paths["fv"]).dataobj)
    # The simulator's voxel Ki (noise-free frames): tissue Ki × (1 − fv) × the tissue fraction.
    true_ki = np.asarray(nib.load(bids.truth_paths(subject.parents[2], "sub-01")["ki"]).dataobj)
    voxel_ki = (1 - fv) * ki
    hot = mask & (true_ki > 0.2 * true_ki.max())
    rel = np.abs(voxel_ki[hot] - true_ki[hot]) / true_ki[hot]
    assert np.median(rel) < 0.1, np.median(rel)  # partial-volume mixtures are not one 2TCM
    # Nothing is overwritten without --overwrite, and the sentence names the file.
    assert fit_cmd.cli(["fit", "--pet", str(subject), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "35,0"], "--window must satisfy 0 <= START < END"),
        (["--window", "a,b"], "--window must be START,END in minutes"),
        (["--window", "0.1,0.15"], "holds no whole frame"),
        (["--model", "3tcm"], "--model"),
        (["--idif_label", "aorta"], "--idif_label needs --idif_mask"),
        (["--idif_mask", "{subject}"], "is 4-D"),
    ],
)
def test_fit_command_bad_flags_are_one_sentence(subject, tmp_path, capsys, args, message):
    args = [a.format(subject=subject) for a in args]
    status = fit_cmd.cli(["fit", "--pet", str(subject), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- the evaluation routes -------------------------------------------------------------------------
def test_fit_routes_are_registered_with_their_kinds():
    assert routes.ROUTES["fit35_rates"].frames == routes.RATES
    assert routes.ROUTES["fit35"].frames == routes.SPLICED
    assert routes.ROUTES["fit65_rates"].prediction == "fit65"
    assert set(fits.FIT_PREDICTIONS) <= set(routes.PREDICTION_LABELS)
    params = np.array([[0.1, 0.5, 0.4, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(routes.rates_ki(params), [0.9 * 0.5 * 0.1 / 0.5, 0.0])


def test_fit_predictor_recovers_noise_free_voxels_and_extrapolates():
    params, frames = _volume((2, 6, 5))  # B = 2 slices of 6×5
    times = np.concatenate([np.linspace(0, 3, 61), np.linspace(3.5, 66, 126)])
    plasma = np.asarray(INP(times), np.float32)
    mask = np.ones((2, 6, 5), np.float32)
    mask[1, :2] = 0
    batch = {
        "frames": frames,
        "mask": mask,
        "valid": np.array([1.0, 1.0], np.float32),
        "subject": np.array([0, 0], np.int32),
        "plasma_times": np.stack([times] * 2).astype(np.float32),
        "plasma": np.stack([plasma] * 2),
        "whole_blood": np.stack([plasma] * 2),
    }
    config = ml_collections.ConfigDict(
        {
            "model": {"n_early": 22},
            "kinetics": {"decay_constant": kk.F18_DECAY_CONSTANT, "use_whole_blood": False},
            "eval": {
                "fit_weights": "duration",
                "fit_starts": 2,
                "fit_max_steps": 100,
                "fit_chunk_voxels": 64,
            },
        }
    )
    out = fits.make_fit_predictor(config, SCHED, "early")(batch)
    body = mask > 0
    true_ki = routes.rates_ki(params)
    got_ki = routes.rates_ki(out["params"])
    # The batch's input is the 187-knot piecewise-linear Feng curve, not Feng itself: a small
    # model mismatch (|Ki| error within 2 % of each voxel's, frames within 1 % of the peak).
    np.testing.assert_allclose(got_ki[body], true_ki[body], rtol=0.02, atol=1e-5)
    assert np.all(out["frames"][~body] == 0) and np.all(out["params"][~body] == 0)
    err = np.abs(out["frames"][body][:, 22:] - frames[body][:, 22:])
    assert err.max() < 0.01 * frames.max()
