"""Tests for kinetix.parametric: Patlak maps of a tiny BIDS subject, mask, CLI and errors."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix import maps, parametric
from kinetix.data import bids
from kinetix.inference import patlak as patlak_study

SCHED = kk.PAPER_SCHEDULE
SHAPE = (7, 6, 3)
DOSE_MBQ = 300.0
WEIGHT_KG = 75.0
SUV_TO_BQML = DOSE_MBQ * 1e6 / (WEIGHT_KG * 1e3)
AFFINE = np.array(
    [[0.0, -2.0, 0.0, 30.0], [2.5, 0.0, 0.0, -40.0], [0.0, 0.0, 3.27, 5.5], [0.0, 0.0, 0.0, 1.0]]
)
# (fv, K1, k2, k3, k4): five irreversible sets (Patlak bias < 0.7 % at t* = 9 min) and one
# reversible set (k4 > 0: Patlak underestimates K1·k3/(k2 + k3), not compared with it).
PARAMS = np.array(
    [
        [0.05, 0.10, 0.13, 0.06, 0.0],
        [0.10, 0.20, 0.30, 0.10, 0.0],
        [0.02, 0.30, 0.40, 0.15, 0.0],
        [0.03, 0.60, 0.90, 0.05, 0.0],
        [0.20, 0.50, 0.60, 0.20, 0.0],
        [0.05, 0.10, 0.13, 0.06, 0.01],
    ]
)
HOLE = (3, 2, 1)  # a cold voxel enclosed by the body in its axial slice
SPECK = (6, 5, 0)  # an isolated warm voxel in the air


def _body():
    body = np.zeros(SHAPE, bool)
    body[1:6, 1:5, :] = True
    return body


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A noise-free BIDS subject: a box-shaped body of known 2TCM voxels in zero air."""
    root = tmp_path_factory.mktemp("bids")
    grid = np.concatenate([np.arange(0, 2, 0.05), np.arange(2, 10, 0.5), np.arange(10, 66.1, 2)])
    plasma_suv = np.asarray(kk.FengInput(kk.FENG_FDG)(grid), np.float64)
    inp = kk.SampledInput(grid, plasma_suv)

    body = _body()
    body[HOLE] = False
    n_body = int(body.sum())
    idx = np.arange(n_body) % len(PARAMS)
    params = np.zeros(SHAPE + (5,))
    params[body] = PARAMS[idx]
    frames = np.zeros(SHAPE + (SCHED.n_frames,))
    frames[body] = np.asarray(kk.pet_frames(PARAMS, inp, SCHED))[idx]
    frames[SPECK] = frames[body][0]
    pet = bids.write_subject(
        root,
        "sub-01",
        frames * SUV_TO_BQML,
        SCHED,
        grid,
        plasma_suv * SUV_TO_BQML,
        plasma_suv * SUV_TO_BQML,  # whole blood = plasma
        DOSE_MBQ,
        WEIGHT_KG,
        AFFINE,
    )
    return types.SimpleNamespace(pet=pet, params=params, study=bids.read_subject(pet))


@pytest.mark.parametrize("method", kk.METHODS)
@pytest.mark.parametrize("t_end", [None, 35.0])
def test_maps_equal_kk_patlak_inside_mask(subject, method, t_end):
    study = subject.study
    ki, v0, mask = patlak_study.patlak_maps(study, 9.0, t_end, method, chunk_voxels=16)
    ref_ki, ref_v0 = kk.patlak(
        study.frames[mask], study.plasma_input(), study.schedule, 9.0, t_end, method=method
    )
    assert ki.shape == v0.shape == mask.shape == SHAPE
    assert ki.dtype == v0.dtype == np.float32
    np.testing.assert_allclose(ki[mask], ref_ki, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(v0[mask], ref_v0, rtol=1e-5, atol=1e-7)
    assert not np.any(ki[~mask]) and not np.any(v0[~mask])


def test_ki_matches_rates_for_irreversible_voxels(subject):
    ki, _, mask = patlak_study.patlak_maps(subject.study, 9.0)
    fv, k1, k2, k3, k4 = np.moveaxis(subject.params, -1, 0)
    irreversible = mask & (k1 > 0) & (k4 == 0)
    assert irreversible.sum() >= 40
    true = (1.0 - fv) * np.asarray(kk.ki_from_rates(k1, k2, k3))
    np.testing.assert_allclose(ki[irreversible], true[irreversible], rtol=0.02)
    # k4 > 0: Patlak sees less than K1·k3/(k2 + k3) (trapping is not irreversible).
    reversible = mask & (k4 > 0)
    assert np.all(ki[reversible] < 0.95 * true[reversible])


def test_mask_covers_body_fills_hole_drops_speck(subject):
    _, _, mask = patlak_study.patlak_maps(subject.study, 9.0)
    np.testing.assert_array_equal(mask, _body())
    assert mask[HOLE] and not mask[SPECK]
    _, _, everything = patlak_study.patlak_maps(subject.study, 9.0, mask_threshold=0.0)
    assert everything.all()


def test_body_mask_fills_enclosed_region_only():
    img = np.zeros((9, 9, 2), np.float32)
    img[1:8, 1:8, :] = 1.0
    img[3:6, 3:6, 0] = 0.0  # enclosed cold region ("lung")
    img[0:3, 4, 1] = 0.0  # a notch open to the air along y: stays outside
    img[1, 4, 1] = 0.0
    mask = maps.filled_mask(img, 0.5)
    expected = img > 0.5
    expected[3:6, 3:6, 0] = True
    np.testing.assert_array_equal(mask, expected)
    assert not mask[1, 4, 1] and not mask[0, 4, 1]
    with pytest.raises(ValueError, match="mask_threshold"):
        maps.filled_mask(img, 1.5)


def test_chunking_invariance_and_single_compile(subject):
    maps.patlak._fit_chunk.clear_cache()
    small = patlak_study.patlak_maps(subject.study, 9.0, chunk_voxels=7)  # 60 voxels: 9 chunks
    assert maps.patlak._fit_chunk._cache_size() == 1
    large = patlak_study.patlak_maps(subject.study, 9.0, chunk_voxels=1000)
    # An in-memory study in C order (NIfTI data is Fortran order) takes the other layout path.
    assert subject.study.frames.flags.f_contiguous
    c_study = dataclasses.replace(subject.study, frames=np.ascontiguousarray(subject.study.frames))
    c_order = patlak_study.patlak_maps(c_study, 9.0, chunk_voxels=7)
    for a, b, c in zip(small, large, c_order, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_warm_up_compiles_exactly_what_the_fit_uses(subject, tmp_path):
    maps.patlak._fit_chunk.clear_cache()
    patlak_study._warm_up(subject.pet, None, 9.0, None, "ols", 32)
    assert maps.patlak._fit_chunk._cache_size() == 1  # the peek worked
    paths = patlak_study.patlak_study(subject.pet, tmp_path, 9.0, chunk_voxels=32)
    assert maps.patlak._fit_chunk._cache_size() == 1  # ... and the fit reused it
    ki, _, _ = patlak_study.patlak_maps(subject.study, 9.0, chunk_voxels=32)
    np.testing.assert_array_equal(np.asarray(nib.load(paths["ki"]).dataobj), ki)


def _cli(*args):
    return ["prog", *map(str, args)]


def test_cli_subprocess_writes_maps_on_input_grid(subject, tmp_path):
    out = tmp_path / "maps"
    cmd = [sys.executable, "-m", "kinetix.parametric", "--pet", subject.pet, "--tstar", "9"]
    proc = subprocess.run(
        [*map(str, cmd), "--out", str(out), "--chunk_voxels", "16"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    ki, v0, mask = patlak_study.patlak_maps(subject.study, 9.0)
    src = nib.load(subject.pet)
    paths = patlak_study.output_paths(subject.pet, out)
    for name, expected in (("ki", ki), ("v0", v0), ("mask", mask.astype(np.float32))):
        img = nib.load(paths[name])
        np.testing.assert_array_equal(img.affine, src.affine)
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
        assert img.header.get_zooms()[:3] == src.header.get_zooms()[:3]
        assert img.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.asarray(img.dataobj), expected, rtol=1e-6, atol=1e-9)
    assert paths["ki"] == out / "sub-01" / "pet" / "sub-01_km-patlak_Ki.nii.gz"
    meta = json.loads(paths["json"].read_text())
    # The scan lies in no BIDS dataset (no dataset_description.json): Sources are file URIs.
    assert meta["Units"] == "mL/min/mL" and meta["Sources"][0] == subject.pet.resolve().as_uri()
    assert json.loads(paths["v0_json"].read_text())["Units"] == "mL/mL"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and "DatasetLinks" not in description
    assert meta["Method"] == "ols" and meta["TStar"] == 9.0 and meta["TEnd"] == 65.0
    assert meta["FramesUsed"] == list(range(15, 28))
    assert "TPCCLIB" in meta["Conventions"] and meta["Mask"]["Voxels"] == int(mask.sum())


def test_cli_refuses_to_overwrite(subject, tmp_path, capsys):
    args = ("--pet", subject.pet, "--tstar", 9, "--out", tmp_path, "--method", "perpendicular")
    assert parametric.cli(_cli(*args)) == 0
    paths = patlak_study.output_paths(subject.pet, tmp_path)
    before = paths["ki"].stat().st_mtime_ns
    assert parametric.cli(_cli(*args)) == 2
    err = capsys.readouterr().err
    assert "kinetix.parametric: error:" in err and "already exists" in err
    assert "Traceback" not in err
    assert paths["ki"].stat().st_mtime_ns == before
    assert parametric.cli(_cli(*args, "--tend", 40, "--overwrite")) == 0
    assert json.loads(paths["json"].read_text())["TEnd"] == 40.0


@pytest.mark.parametrize(
    "args, message",
    [
        (("--pet", "{missing}", "--tstar", 9, "--out", "{out}"), "does not exist"),
        (("--pet", "{pet}", "--tstar", 100, "--out", "{out}"), "past the last frame"),
        (("--pet", "{pet}", "--tstar", 9, "--out", "{out}", "--method", "lsq"), "--method"),
        (("--pet", "{pet}", "--tstar", 9, "--tend", 5, "--out", "{out}"), "t_end"),
        (("--pet", "{pet}", "--out", "{out}"), "--tstar is required"),
        (("--pet", "{pet}", "--tstar", 9, "--out", "{out}", "--mask_threshold", 2), "mask"),
    ],
)
def test_cli_errors_are_one_sentence(subject, tmp_path, capsys, args, message):
    fill = {"missing": tmp_path / "sub-02_pet.nii.gz", "pet": subject.pet, "out": tmp_path / "o"}
    argv = _cli(*(str(a).format(**fill) for a in args))
    assert parametric.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.nii.gz"))


def test_library_validates_arguments(subject):
    with pytest.raises(ValueError, match="method"):
        patlak_study.patlak_maps(subject.study, 9.0, method="wls")
    with pytest.raises(ValueError, match="chunk_voxels"):
        patlak_study.patlak_maps(subject.study, 9.0, chunk_voxels=0)
    with pytest.raises(ValueError, match="t_star"):
        patlak_study.patlak_maps(subject.study, float("nan"))
    with pytest.raises(ValueError, match="NIfTI"):
        patlak_study.output_paths(pathlib.Path("x_pet.img"), "out")


def test_blood_ending_at_35_min_with_the_late_input_fit(subject, tmp_path):
    """Blood to 35 min of a 65-min scan: refused as it is, and with --late_input fit the Feng
    fit of the noise-free Feng samples gives the Ki of the full blood (to 1e-4 relative)."""
    blood = next(subject.pet.parent.glob("*_blood.tsv"))
    lines = blood.read_text().splitlines()
    # The samples are 2 min apart there: up to 36 min covers 35 min; the late input uses <= 35.
    keep = [lines[0]] + [ln for ln in lines[1:] if float(ln.split("\t")[0]) <= 36 * 60]
    cut = tmp_path / "sub-01_recording-cut_blood.tsv"
    cut.write_text("\n".join(keep) + "\n")
    base = ("--pet", subject.pet, "--tstar", 9, "--blood", cut)
    assert parametric.cli(_cli(*base, "--out", tmp_path / "m")) == 2
    assert parametric.cli(_cli(*base, "--out", tmp_path / "f", "--late_input", "fit")) == 0
    paths = patlak_study.output_paths(subject.pet, tmp_path / "f")
    ki = np.asarray(nib.load(paths["ki"]).dataobj)
    full, _, mask = patlak_study.patlak_maps(subject.study, 9.0)
    np.testing.assert_allclose(ki[mask], full[mask], rtol=1e-4)
    meta = json.loads(paths["json"].read_text())
    assert meta["InputFunction"]["LateInput"]["method"] == "fit"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--late_input", "fit", "--late_sample", "60,2"), "--late_sample '60,2' must read"),
        (("--late_input", "fit", "--late_sample", "20min,5kBq/mL"), "late sample"),
        (("--late_input", "population"), "--population FILE"),
        (("--idif_label", "aorta"), "--idif_label needs --idif_mask"),
        (("--blood", "{pet}", "--idif_mask", "{pet}"), "exclude each other"),
        (("--late_sample", "60min,5kBq/mL"), "--late_sample needs --late_input"),
    ],
)
def test_input_function_flag_errors_are_one_sentence(subject, tmp_path, capsys, extra, message):
    args = [str(a).format(pet=subject.pet) for a in extra]
    argv = _cli("--pet", subject.pet, "--tstar", 9, "--out", tmp_path / "o", *args)
    assert parametric.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error:") and message in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
