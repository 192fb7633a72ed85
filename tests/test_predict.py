"""kinetix.predict on odd matrix sizes, multi-slice volumes, 22- and 28-frame inputs, bad input."""

import json
import shutil
import subprocess
import sys

import _bids_validator
import _cli
import jax
import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from configs import smoke
from kinetix import evaluation, experiment, inference, training
from kinetix.data import bids
from kinetix.inference import network


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort

    base = tmp_path_factory.mktemp("predict")
    simulate_cohort(
        base / "cohort",
        4,
        0,
        SimulationConfig(size=16, slices=2, noise="image"),
        overwrite=True,
        progress=False,
        preview=False,
    )
    config = smoke.get_config()
    config.data.root = str(base / "cohort")
    config.eval.run_after_training = False
    config.train.keep_checkpoints = 1
    config.train.keep_checkpoint_steps = (3,)  # off the interval (2): kept besides the last, 4
    experiment.train_and_evaluate(config, base / "run")
    return base


def write_study(root, shape, n_frames, subject="sub-99", with_blood=True):
    """A small BIDS subject of noise-free frames with an odd matrix size."""
    rng = np.random.default_rng(0)
    sched = kk.PAPER_SCHEDULE[:n_frames]
    params = np.stack(
        [
            rng.uniform(0, 0.2, shape),
            rng.uniform(0.05, 0.5, shape),
            rng.uniform(0.1, 1, shape),
            rng.uniform(0.01, 0.2, shape),
            np.zeros(shape),
        ],
        -1,
    )
    inp = kk.FengInput(kk.FENG_FDG)
    frames = np.asarray(kk.pet_frames(params.astype(np.float32), inp, sched)) * 1000.0
    t = np.concatenate([np.linspace(0, 2, 41), np.linspace(2.5, 70, 60)])
    cp = np.asarray(inp(t)) * 1000.0
    pet = bids.write_subject(root, subject, frames, sched, t, cp, cp, 300.0, 70.0, np.eye(4) * 2)
    if not with_blood:
        for f in pet.parent.glob("*_blood.*"):
            f.unlink()
    return pet


@pytest.mark.parametrize("shape, n_frames", [((17, 19, 3), 28), ((16, 16, 5), 22)])
def test_predict_odd_sizes_and_frame_counts(trained, tmp_path, shape, n_frames):
    pet = write_study(tmp_path / "bids", shape, n_frames)
    out = tmp_path / "out"
    config = training.load_config(trained / "run")
    graphdef, params = inference.restore_params(config, trained / "run")
    sched = inference.trained_schedule(trained / "run")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    fn = inference.make_predict_fn(
        training.make_eval_step(graphdef, config, sched),
        params,
        NamedSharding(training.make_mesh(), P("data")),
    )
    study = bids.read_subject(pet)
    result = inference.predict_study(config, fn, study, sched, batch_slices=4, progress=False)
    assert result["late"].shape == shape + (6,)
    assert result["params"].shape == shape + (5,)
    assert np.all(np.isfinite(result["ki"])) and np.all(np.isfinite(result["late"]))
    # The parameters respect the configured bounds and reproduce the predicted frames.
    upper = np.asarray(config.model.bounds_upper)
    assert np.all(result["params"] >= 0) and np.all(result["params"] <= upper + 1e-6)
    # A slice predicted alone equals the same slice predicted within the volume.
    one = bids.Study(**{**study.__dict__, "frames": study.frames[:, :, 1:2]})
    alone = inference.predict_study(config, fn, one, sched, batch_slices=4, progress=False)
    np.testing.assert_allclose(
        alone["late"][:, :, 0], result["late"][:, :, 1], rtol=1e-5, atol=1e-6
    )
    paths = inference.write_outputs(result, study, out)
    ki = nib.load(network.output_paths(study.pet_path, out)["ki"])
    np.testing.assert_array_equal(ki.affine, study.affine)
    assert len(paths) == 20  # 10 maps, each with its sidecar
    with pytest.raises(FileExistsError):
        inference.write_outputs(result, study, out)


def test_predict_cli_and_bad_inputs(trained, tmp_path, tmp_path_factory):
    environ = _cli.env(None, _cli.cache_dir(tmp_path_factory))  # reuses this session's compiles
    pet = write_study(tmp_path / "bids", (16, 16, 2), 28)
    cmd = [
        sys.executable,
        "-m",
        "kinetix.predict",
        "--workdir",
        str(trained / "run"),
        "--pet",
        str(pet),
        "--out",
        str(tmp_path / "out"),
        "--batch_slices",
        "4",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=environ)
    assert ok.returncode == 0, ok.stderr
    assert network.output_paths(pet, tmp_path / "out")["late"].exists()
    assert _bids_validator.errors(tmp_path / "out") == []  # a valid BIDS derivative

    def fails(args, match, clean=True):
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=environ)
        assert r.returncode == 2, r.stderr
        assert "kinetix.predict: error:" in r.stderr and match in r.stderr, r.stderr
        if clean:  # orbax's background threads may print teardown noise after a failed restore
            assert "Traceback" not in r.stderr

    short = write_study(tmp_path / "short", (16, 16, 2), 20)
    fails(cmd[:6] + [str(short), "--out", str(tmp_path / "o2")], "has 20 frames")
    noblood = write_study(tmp_path / "nob", (16, 16, 2), 28, with_blood=False)
    fails(cmd[:6] + [str(noblood), "--out", str(tmp_path / "o3")], "blood")
    fails(cmd[:5] + ["--pet", str(pet), "--out", str(tmp_path / "out")], "exists")
    fails(cmd[:8] + [str(tmp_path / "o6"), "--batch_slices", "0"], "--batch_slices must be")
    fails(
        cmd[:6] + [str(pet), "--out", str(tmp_path / "o5"), "--step", "2"], "at step 2; it has 3, 4"
    )
    # A checkpoint that does not belong to the config.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("schedule.json", "checkpoints"):
        (other / name).symlink_to(trained / "run" / name)
    cfg = json.loads((trained / "run" / "config.json").read_text())
    cfg["model"]["head_hidden"] = [32]
    (other / "config.json").write_text(json.dumps(cfg))
    fails(
        cmd[:4] + [str(other), "--pet", str(pet), "--out", str(tmp_path / "o4")],
        "shape",
        clean=False,
    )


def test_a_kept_step_is_restored_evaluated_and_recorded(trained):
    """train.keep_checkpoint_steps keeps step 3; restore_params and evaluate take it by step."""
    run = trained / "run"
    assert inference.checkpoint_steps(run) == [3, 4]
    config = training.load_config(run)
    at3 = inference.restore_params(config, run, 3)[1]
    at4 = inference.restore_params(config, run)[1]
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(at3), jax.tree.leaves(at4), strict=True)
    )
    with pytest.raises(ValueError, match=r"no checkpoint at step 2; it has 3, 4\."):
        inference.restore_params(config, run, 2)
    res3 = evaluation.evaluate_workdir(run, step=3)
    res4 = evaluation.evaluate_workdir(run, out=str(trained / "eval-latest"))
    assert res3["out_dir"] == str(run / "eval-step3")
    assert res3["metrics"]["run"]["checkpoint_step"] == 3
    assert res4["metrics"]["run"]["checkpoint_step"] == 4
    assert "- checkpoint: step 3\n" in (run / "eval-step3" / "report.md").read_text()
    ssim = [
        r["metrics"]["tables"]["ki_vs_reference"]["methods"]["proposed"]["ssim"]["mean"]
        for r in (res3, res4)
    ]
    assert ssim[0] != ssim[1]  # step 3's weights were used, not the latest
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        evaluation.evaluate_workdir(run, step=5)


def test_entry_point_modules_import_together():
    """Importing the commands defines no flags, so a program can import all of them."""
    code = (
        "import kinetix.train, kinetix.predict, kinetix.evaluate, kinetix.simulate, "
        "kinetix.parametric; from absl import flags; "
        "assert 'workdir' not in flags.FLAGS and 'pet' not in flags.FLAGS"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_predict_refuses_implausible_damaged_or_taken_outputs_before_writing(
    trained, tmp_path, capsys
):
    """Issue 28: a unit mistake, a truncated image or one existing output: one sentence, exit
    2, nothing written; --nocheck_plausibility proceeds and records the findings in Ki.json."""
    from kinetix import predict

    pet = write_study(tmp_path / "bids", (16, 16, 2), 28)
    run = ["prog", "--workdir", str(trained / "run"), "--batch_slices", "4", "--pet", str(pet)]

    def fails(out, match, *extra):
        assert predict.cli([*run, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("kinetix.predict: error:") and match in err[-1], err
        assert not any("Traceback" in line for line in err)
        return err[-1]

    # One output exists already: refused before anything is computed or written.
    taken = tmp_path / "taken"
    k4 = network.output_paths(pet, taken)["k4"]
    k4.parent.mkdir(parents=True)
    k4.write_bytes(b"")
    fails(taken, "sub-99_km-2tcm_desc-kinetix_k4.nii.gz already exists")
    assert [p for p in taken.rglob("*") if p.is_file()] == [k4]

    sidecar = pet.with_name("sub-99_pet.json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "Units": "kBq/mL"}))  # Bq/mL data: SUV × 1000
    err = fails(tmp_path / "o1", "sub-99_pet.nii.gz has a median SUV of the body")
    assert "--nocheck_plausibility" in err and not (tmp_path / "o1").exists()
    out = tmp_path / "o2"
    assert predict.cli([*run, "--out", str(out), "--nocheck_plausibility"]) == 0
    ki_path = network.output_paths(pet, out)["ki"]
    ki_meta = json.loads(bids.derivatives.sidecar_path(ki_path).read_text())
    assert any("median SUV of the body" in w for w in ki_meta["Warnings"]), ki_meta
    assert ki_path.exists()

    sidecar.write_text(json.dumps(meta))
    data = pet.read_bytes()
    pet.write_bytes(data[: len(data) // 2])
    fails(tmp_path / "o3", f"The PET image {pet} is truncated or corrupt")
    assert not (tmp_path / "o3").exists()


def first_frames(pet_path, out_root, n_frames=22):
    """A copy of a simulated subject's scan cut to its first `n_frames` (no blood file)."""
    out = out_root / "sub-01" / "pet"
    out.mkdir(parents=True)
    json_path = pet_path.with_name(pet_path.name.replace(".nii.gz", ".json"))
    for path in (pet_path, json_path, *pet_path.parent.glob("*_blood.*")):
        shutil.copy(path, out / path.name)
    cut = bids.cut_scan(out / pet_path.name, n_frames)
    assert not list(out.glob("*_blood.*")) and nib.load(cut).shape[3] == n_frames
    return cut


def test_a_35_minute_scan_with_an_image_derived_input_and_no_blood_file(trained, tmp_path):
    """The clinic's case: 22 frames, a vessel mask, no blood: an image-derived input, Cp after
    35 min from the run's population input (or a Feng fit); the measured
    route says what is missing; the population input is stored by training."""
    run = trained / "run"
    assert (run / training.population.POPULATION_FILE).is_file()
    source = trained / "cohort" / "sub-01" / "pet" / "sub-01_pet.nii.gz"
    pet = first_frames(source, tmp_path / "clinic")
    # At 16 x 16 voxels the simulator's vessels are under a voxel (tests/test_idif.py tests the
    # IDIF on vessels it resolves); here the mask is the 8 hottest voxels of the first 2 min.
    img = nib.load(pet)
    early = np.asarray(img.dataobj)[..., :8].mean(axis=-1)
    hot = early >= np.sort(early, axis=None)[-8]
    dseg = tmp_path / "sub-01_desc-vessel_mask.nii.gz"
    nib.save(nib.Nifti1Image(hot.astype(np.uint8), img.affine), dseg)
    kw = dict(idif_mask=dseg, progress=False, check_plausibility=False)
    blood = next(source.parent.glob("*_blood.tsv"))  # 0-65 min; "fit" uses 0-35 min only
    cases = {"population": kw, "fit": dict(blood=blood, progress=False)}
    for late, args in cases.items():
        out = tmp_path / late
        paths = inference.predict_to_dir(run, pet, out, late_input=late, **args)
        ki_path = network.output_paths(pet, out)["ki"]
        ki = np.asarray(nib.load(ki_path).dataobj)
        assert np.all(np.isfinite(ki)) and np.any(ki != 0)
        meta = json.loads(bids.derivatives.sidecar_path(ki_path).read_text())
        assert meta["InputFunction"]["LateInput"]["method"] == late
        assert late == "fit" or meta["InputFunction"]["InputFunction"] == "image-derived"
    # The IDIF written beside the maps reads back as the scan's blood (to 35 min).
    assert "sub-01_recording-IDIF_blood.tsv" in {p.name for p in paths} or late == "fit"
    written = tmp_path / "population" / "sub-01" / "pet" / "sub-01_recording-IDIF_blood.tsv"
    study = bids.read_subject(pet, written, check_plausibility=False)
    assert study.plasma_times[-1] == pytest.approx(35.0, abs=1e-3)
    # Eight hot voxels of a 16 x 16 phantom are no vessel: the Feng fit says so.
    with pytest.raises(ValueError, match="did not converge"):
        inference.predict_to_dir(run, pet, tmp_path / "f", late_input="fit", **kw)
    with pytest.raises(ValueError, match=r"before .*65 min"):
        inference.predict_to_dir(run, pet, tmp_path / "m", late_input="measured", **kw)
    with pytest.raises(ValueError, match="--blood and --idif_mask exclude each other"):
        inference.predict_to_dir(
            run, pet, tmp_path / "b", blood=pet, late_input="fit", idif_mask=dseg
        )
    with pytest.raises(ValueError, match="late_sample"):
        inference.predict_to_dir(
            run, pet, tmp_path / "s", late_input="fit", late_sample="60 parsecs,3", **kw
        )


def test_evaluation_of_a_35_minute_protocol_keeps_the_reference_on_the_measured_input(trained):
    """eval.late_input = fit: the AUC error of Cp over 35-65 min is recorded per subject and
    the 65-min reference (full_input) is the same Ki as with the measured input."""
    run = trained / "run"
    measured = evaluation.evaluate_workdir(run, out=trained / "eval-m", overwrite=True)
    fitted = evaluation.evaluate_workdir(
        run, out=trained / "eval-fit", overwrite=True, late_input="fit"
    )
    record = fitted["metrics"]["late_input"]
    assert record["method"] == "fit"
    errors = record["auc_error"]["per_subject"]
    assert set(errors) == set(measured["metrics"]["run"]["subjects"])
    assert all(np.isfinite(v) and abs(v) < 0.5 for v in errors.values())
    assert "late_input" not in measured["metrics"]
    report = (trained / "eval-fit" / "report.md").read_text()
    assert "## Late input (a 35-minute protocol)" in report and "AUC error of Cp" in report
    ref_m, ref_f = (
        {
            k: v
            for k, v in run["metrics"]["tables"]["ki_vs_truth"]["methods"]["reference"].items()
            if k != "relative_change_pct"
        }  # relative to the baseline, whose input changed
        for run in (measured, fitted)
    )
    assert ref_m == ref_f


def test_a_run_without_a_stored_population_input_learns_it_from_its_training_subjects(trained):
    """Runs trained before population_input.json existed: learnt again from splits.json's
    training subjects, the same shape as the stored one; without the data, None."""
    run = trained / "run"
    stored = training.population.read_population(run)
    old = trained / "old-run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns(training.population.POPULATION_FILE))
    again = training.population.run_population(old)
    np.testing.assert_allclose(again.plasma, stored.plasma, rtol=1e-6)
    np.testing.assert_allclose(again.times, stored.times)
    config = json.loads((old / "config.json").read_text())
    config["data"]["root"] = str(trained / "nowhere")
    (old / "config.json").write_text(json.dumps(config))
    assert training.population.run_population(old) is None
    with pytest.raises(ValueError, match="--population FILE"):
        inference.late.load_population("population", None, old)
