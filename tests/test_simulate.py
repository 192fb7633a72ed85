"""Tests for the BIDS cohort writer (`kinetix.data.phantom.cohort`) and `kinetix.simulate`.

References: the simulator's own in-memory output (`phantom.simulate_subject`, independent of
any file I/O) read back through `kinetix.data.bids`, the PNG signature, and a second process
(the CLI) for determinism.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from kinetix.data import bids
from kinetix.data import phantom as ph
from kinetix.data.phantom.cohort import simulate_cohort, simulation_settings, subject_ids

SEED = 3
CFG = ph.SimulationConfig(size=32, slices=2, noise="image")
CLI_ARGS = ["--subjects", "2", "--seed", str(SEED), "--size", "32", "--slices", "2"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, timeout=120, cache_dir=None):
    """Runs the command; with `cache_dir` it shares this session's JAX compilation cache (and its
    XLA_FLAGS, part of the cache key), so it loads what this process compiled instead."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache_dir is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "kinetix.simulate", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _data(path):
    return np.asarray(nib.load(path).dataobj)


def _arrays(root, sid):
    """Every NIfTI data array of one subject (raw and truth), keyed by file name."""
    root = pathlib.Path(root)
    files = sorted((root / sid).rglob("*.nii.gz"))
    files += sorted((root / "derivatives" / "truth" / sid).rglob("*.nii.gz"))
    return {p.name: _data(p) for p in files}


@pytest.fixture(scope="module")
def sims():
    return [ph.simulate_subject(SEED, CFG, i) for i in range(2)]


@pytest.fixture(scope="module")
def lib_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib") / "cohort"
    ids = simulate_cohort(root, 2, SEED, CFG, progress=False)
    assert ids == ["sub-01", "sub-02"]
    return root


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "cohort"
    result = _cli("--out", root, *CLI_ARGS, "--noise", "image", "--noprogress")
    assert result.returncode == 0, result.stderr
    return root, result


# ------------------------------------------------------------------------------------------------
# Layout and round trips
# ------------------------------------------------------------------------------------------------
def test_cli_writes_the_bids_layout(cli_run):
    root, result = cli_run
    expected = ["dataset_description.json", "participants.tsv", "participants.json"]
    for sid in ("sub-01", "sub-02"):
        expected += [
            f"{sid}/pet/{sid}_pet.nii.gz",
            f"{sid}/pet/{sid}_pet.json",
            f"{sid}/pet/{sid}_recording-manual_blood.tsv",
            f"{sid}/pet/{sid}_recording-manual_blood.json",
            f"derivatives/preview/{sid}_preview.png",
            f"derivatives/truth/{sid}/pet/{sid}_desc-noisefree_pet.nii.gz",
            f"derivatives/truth/{sid}/pet/{sid}_desc-noisefreepsf_pet.nii.gz",
            f"derivatives/truth/{sid}/pet/{sid}_desc-noisefreepsf_pet.json",
            f"derivatives/truth/{sid}/pet/{sid}_km-2tcm_fraction.nii.gz",
            f"derivatives/truth/{sid}/pet/{sid}_km-2tcm_fraction.json",
            f"derivatives/truth/{sid}/pet/{sid}_km-2tcm_Ki.nii.gz",
            f"derivatives/truth/{sid}/anat/{sid}_dseg.nii.gz",
            f"derivatives/truth/{sid}/pet/{sid}_simulation.json",
        ] + [f"derivatives/truth/{sid}/pet/{sid}_km-2tcm_{n}.nii.gz" for n in ("fv", "K1", "k4")]
    expected += ["README", ".bidsignore", "derivatives/truth/README"]
    missing = [name for name in expected if not (root / name).is_file()]
    assert not missing
    assert not (root / "sub-03").exists()
    assert "2 subjects" in result.stdout and str(root.resolve()) in result.stdout
    assert "2 slices" in result.stdout and "image noise" in result.stdout


def test_read_subject_gives_the_simulated_suv_frames(lib_root, sims):
    for sid, sim in zip(("sub-01", "sub-02"), sims, strict=True):
        study = bids.read_subject(lib_root / sid / "pet" / f"{sid}_pet.nii.gz")
        assert study.frames.shape == (32, 32, 2, 28)
        scale = np.abs(sim["frames"]).max()
        np.testing.assert_allclose(study.frames, sim["frames"], rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(study.suv_factor * sim["suv_factor"], 1.0, rtol=1e-12)
        np.testing.assert_allclose(study.schedule.start, CFG.schedule.start, rtol=0, atol=1e-9)
        np.testing.assert_allclose(study.schedule.end, CFG.schedule.end, rtol=0, atol=1e-9)
        times, plasma = sim["plasma"]
        np.testing.assert_allclose(study.plasma_times, times, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(study.plasma, plasma, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(study.whole_blood, sim["whole_blood"][1], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(study.affine, sim["affine"], rtol=0, atol=1e-5)
        assert study.sidecar["BodyWeight"] == pytest.approx(sim["weight_kg"], rel=1e-12)


def test_truth_round_trip(lib_root, sims):
    for sid, sim in zip(("sub-01", "sub-02"), sims, strict=True):
        truth = bids.read_truth(lib_root, sid)
        np.testing.assert_array_equal(truth["ki"], sim["ki_true"])
        np.testing.assert_array_equal(truth["labels"], sim["labels"])
        assert truth["label_names"] == {v: k for k, v in ph.LABELS.items()}
        assert list(truth["params"]) == ["fv", "K1", "k2", "k3", "k4"]
        for i, name in enumerate(truth["params"]):
            np.testing.assert_array_equal(truth["params"][name], sim["params"][..., i])
        sf = sim["suv_factor"]
        scale = sim["noisefree"].max() * sf
        np.testing.assert_allclose(
            truth["noisefree"], sim["noisefree"] * sf, rtol=1e-6, atol=1e-7 * scale
        )
        paths = bids.truth_paths(lib_root, sid)
        psf = _data(paths["noisefree_psf"])
        np.testing.assert_allclose(psf, sim["noisefree_psf"] * sf, rtol=1e-6, atol=1e-7 * scale)
        frac = _data(paths["fraction"])
        np.testing.assert_array_equal(frac, sim["fraction"])
        meta = json.loads(paths["simulation"].read_text())
        assert meta["seed"] == SEED and meta["noise"] == "image"
        assert len(meta["tumours"]) == len(sim["tumours"])
        np.testing.assert_allclose(meta["feng_suv"]["values"], sim["feng"], rtol=1e-15)


def test_participants_table(lib_root, sims):
    rows = bids.read_participants(lib_root)
    assert list(rows) == ["sub-01", "sub-02"]
    for row, sim in zip(rows.values(), sims, strict=True):
        assert row["sex"] is None and row["age"] is None
        assert row["weight"] == pytest.approx(sim["weight_kg"], abs=1e-3)
        assert row["dose"] == pytest.approx(sim["dose_mbq"], abs=1e-3)
    desc = json.loads((lib_root / "participants.json").read_text())
    assert desc["dose"]["Units"] == "MBq" and desc["weight"]["Units"] == "kg"


def test_preview_is_a_readable_png(lib_root):
    path = lib_root / "derivatives" / "preview" / "sub-01_preview.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 800
    assert np.std(img[..., :3]) > 0.05  # not a blank page


# ------------------------------------------------------------------------------------------------
# Determinism and overwriting
# ------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_arrays_across_processes(lib_root, cli_run):
    cli_root, _ = cli_run
    for sid in ("sub-01", "sub-02"):
        a, b = _arrays(lib_root, sid), _arrays(cli_root, sid)
        assert sorted(a) == sorted(b) and len(a) == 11  # PET + 10 truth maps
        for name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    blood = "sub-01/pet/sub-01_recording-manual_blood.tsv"
    assert (lib_root / blood).read_text() == (cli_root / blood).read_text()


def test_overwrite_refusal_and_replacement(tmp_path, lib_root):
    out = tmp_path / "cohort"
    simulate_cohort(out, 2, SEED, CFG, progress=False, preview=False)
    first = _arrays(out, "sub-01")
    reference = _arrays(lib_root, "sub-01")
    for name in reference:  # a second in-process run with the same seed: identical
        np.testing.assert_array_equal(first[name], reference[name], err_msg=name)
    assert not (out / "derivatives" / "preview").exists()

    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        simulate_cohort(out, 1, SEED, CFG, progress=False)
    np.testing.assert_array_equal(
        _arrays(out, "sub-01")["sub-01_pet.nii.gz"], first["sub-01_pet.nii.gz"]
    )

    ids = simulate_cohort(out, 1, SEED + 1, CFG, overwrite=True, progress=False)
    assert ids == ["sub-01"]
    assert not (out / "sub-02").exists()  # the previous cohort's extra subject is gone
    assert not (out / "derivatives" / "truth" / "sub-02").exists()
    assert list(bids.read_participants(out)) == ["sub-01"]
    second = _arrays(out, "sub-01")
    assert not np.array_equal(second["sub-01_pet.nii.gz"], first["sub-01_pet.nii.gz"])
    assert not np.array_equal(second["sub-01_km-2tcm_Ki.nii.gz"], first["sub-01_km-2tcm_Ki.nii.gz"])


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "real scans"}))
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(ValueError, match="not written by kinetix.simulate"):
        simulate_cohort(tmp_path, 1, 0, CFG, overwrite=True, progress=False)
    assert (tmp_path / "sub-01").is_dir()


def test_subject_ids_are_zero_padded():
    assert subject_ids(3) == ["sub-01", "sub-02", "sub-03"]
    assert subject_ids(100)[0] == "sub-001"


# ------------------------------------------------------------------------------------------------
# --config: the cohort a training config simulates
# ------------------------------------------------------------------------------------------------
def _cohort_files(root):
    """{relative path: file} of every NIfTI and TSV of a cohort (previews and JSON left out)."""
    root = pathlib.Path(root)
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.name.endswith((".nii.gz", ".tsv"))
    }


def test_cli_config_writes_the_cohort_training_simulates(tmp_path):
    import jax

    from kinetix.training.cohort import build_cohort

    config = importlib.import_module("configs.smoke").get_config()
    config.data.sim_subjects = 2  # the smoke cohort, two of its subjects (an override)
    build_cohort(config, tmp_path / "run")  # simulates into run/data (config.data.root is "")
    result = _cli(
        "--config", "configs/smoke.py", "--config.data.sim_subjects=2", "--out", tmp_path / "cli",
        "--noprogress", "--nopreview", cache_dir=jax.config.jax_compilation_cache_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 subjects × 2 slices of 16×16 (image noise, seed 0)" in result.stdout
    train, cli = _cohort_files(tmp_path / "run" / "data"), _cohort_files(tmp_path / "cli")
    assert sorted(train) == sorted(cli) and len(train) == 1 + 2 * 13  # participants + 13 each
    for name, path in train.items():
        if name.endswith(".tsv"):
            assert path.read_text() == cli[name].read_text(), name
            continue
        a, b = _data(path), _data(cli[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert _data(train["sub-02/pet/sub-02_pet.nii.gz"]).shape == (16, 16, 2, 28)
    assert not (tmp_path / "cli" / "derivatives" / "preview").exists()  # --nopreview


def test_simulation_settings_fit_osem_subsets_to_the_matrix():
    assert simulation_settings(64).recon_subsets == 16
    assert simulation_settings(24).recon_subsets == 8  # 16 does not divide 24 angles
    cfg = simulation_settings(32, 2, "projection", counts_per_slice=4e6)
    assert cfg.counts_per_slice == 4e6 and cfg.noise_scale == ph.SimulationConfig().noise_scale
    assert simulation_settings(32, 2, "image", noise_scale=0.25).noise_scale == 0.25


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_subjects=0), "n_subjects must be >= 1"),
        (dict(n_subjects=1.5), "n_subjects must be an integer"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(cfg={"size": 32}), "cfg must be a phantom.SimulationConfig"),
    ],
)
def test_library_rejects_bad_arguments(tmp_path, kwargs, match):
    args = dict(out_dir=tmp_path / "x", n_subjects=1, seed=0, cfg=CFG, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        simulate_cohort(**args)
    assert not (tmp_path / "x").exists()


BAD_ARGS = {
    "subjects 0": (["--subjects", "0"], "--subjects must be >= 1, got 0."),
    "size 8": (["--subjects", "2", "--size", "8"], "--size must be >= 16 pixels, got 8."),
    "noise fbp": (
        ["--subjects", "2", "--noise", "fbp"],
        "--noise must be image, projection or none",
    ),
    "seed -4": (["--subjects", "1", "--seed=-4"], "--seed must be a non-negative integer, got -4."),
    "subjects x": (["--subjects", "x"], "flag --subjects=x"),
    "no out": (["--subjects", "1", "--out="], "--out must name a directory"),
    "positional": (["--subjects", "1", "extra"], "unexpected arguments 'extra'"),
    "config and seed": (
        ["--config", "configs/smoke.py", "--seed", "1", "--size", "32"],
        "--seed, --size cannot be combined with --config",
    ),
    "config bad noise": (
        ["--config", "configs/smoke.py", "--config.data.sim_noise=fbp"],
        "noise must be 'image', 'projection' or 'none'",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD_ARGS command, started at once (each costs a Python + JAX import)."""
    base = tmp_path_factory.mktemp("bad")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = {}
    for i, (name, (args, _)) in enumerate(BAD_ARGS.items()):
        cmd = [sys.executable, "-m", "kinetix.simulate", "--out", str(base / f"out{i}"), *args]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    return base, results


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_cli_rejects_bad_arguments(bad_runs, case):
    base, results = bad_runs
    code, stdout, stderr = results[case]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("kinetix.simulate: error: ")
    assert BAD_ARGS[case][1] in lines[0] and "Traceback" not in stderr
    assert stdout == "" and not any(base.iterdir())


def test_cli_refuses_a_non_empty_out_dir(cli_run):
    root, _ = cli_run
    before = (root / "sub-01" / "pet" / "sub-01_pet.nii.gz").read_bytes()
    result = _cli("--out", root, *CLI_ARGS)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"kinetix.simulate: error: out_dir {root} is not empty; pass overwrite=True "
        "(--overwrite) to replace it."
    )
    assert (root / "sub-01" / "pet" / "sub-01_pet.nii.gz").read_bytes() == before


def test_protocol_frames_writes_a_35_minute_scan_without_blood(tmp_path):
    """--protocol_frames 22: each scan cut to 0-35 min, no blood file, the label map kept; it
    reads with an image-derived input and no blood (a clinic's data)."""
    import jax

    result = _cli(
        "--out", tmp_path, "--subjects", "1", "--size", "16", "--slices", "1",
        "--protocol_frames", "22", "--noprogress", "--nopreview",
        cache_dir=jax.config.jax_compilation_cache_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pet = tmp_path / "sub-01" / "pet" / "sub-01_pet.nii.gz"
    assert nib.load(pet).shape[3] == 22 and not list(pet.parent.glob("*_blood.*"))
    side = json.loads(pet.with_name("sub-01_pet.json").read_text())
    assert len(side["FrameTimesStart"]) == len(side["FrameDuration"]) == 22
    assert bids.truth_paths(tmp_path, "sub-01")["labels"].is_file()
    with pytest.raises(bids.BidsError, match="No blood file"):
        bids.read_subject(pet)
    bad = _cli("--out", tmp_path / "x", "--subjects", "1", "--protocol_frames", "40")
    assert bad.returncode == 2 and "--protocol_frames must lie in [1, 28]" in bad.stderr
