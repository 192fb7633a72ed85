"""Plausibility of inputs (kinetix.data.bids.plausibility) and file faults (truncated or corrupt
NIfTI files, unwritable output directories) through the reader and the commands.

References: a small FDG study built from the 2TCM and Feng's input at clinical levels (plasma
about SUV 2–5 after 10 min), and the same study spoiled the way users spoil them (a unit of
kBq/mL over Bq/mL data, a sparse or late blood curve, a truncated file); the bounds are the
documented module constants (docs/conventions.md, "Plausibility checks").
"""

import functools
import json
import logging
import pathlib
import types

import jax
import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix import parametric, simulate
from kinetix.data import bids
from kinetix.data.bids import plausibility as pl
from kinetix.inference import network, patlak

SCHED = kk.PAPER_SCHEDULE
SHAPE = (8, 8, 2)
DOSE_MBQ, WEIGHT_KG = 300.0, 75.0
SUV_TO_BQML = DOSE_MBQ * 1e6 / (WEIGHT_KG * 1e3)
PLASMA_SCALE = 0.2  # Feng's FDG amplitudes (µCi/mL numbers) × 0.2: plasma ≈ SUV 2.3 at 60 min
PARAMS = np.array(  # (fv, K1, k2, k3, k4): soft tissue, muscle, liver-like, a tumour
    [[0.03, 0.05, 0.3, 0.015, 0.0], [0.02, 0.035, 0.15, 0.015, 0.0], [0.15, 0.8, 1.0, 0.01, 0.0]]
    + [[0.05, 0.2, 0.3, 0.1, 0.0]]
)


def _grid():
    return np.concatenate([np.arange(0, 2, 0.1), np.arange(2, 10, 0.5), np.arange(10, 70.1, 2.5)])


@functools.cache
def _curves() -> tuple[np.ndarray, np.ndarray]:
    """(tissue frames [4, 28] SUV of PARAMS, plasma [K] SUV at `_grid()`), Feng's input × 0.2."""
    inp = kk.FengInput(np.asarray(kk.FENG_FDG, np.float32) * np.array([PLASMA_SCALE] * 3 + [1] * 4))
    frames = jax.jit(lambda p: kk.pet_frames(p, inp, SCHED))(PARAMS)  # one compile (~2 s)
    return np.asarray(frames, np.float64), np.asarray(inp(_grid()), np.float64)


def _write(root) -> types.SimpleNamespace:
    """A plausible FDG study: a box of 2TCM tissue in air, blood sampled densely to 70 min."""
    t = _grid()
    tissue, plasma = _curves()
    body = np.zeros(SHAPE, bool)
    body[1:7, 1:7, :] = True
    idx = np.arange(int(body.sum())) % len(PARAMS)
    frames = np.zeros(SHAPE + (SCHED.n_frames,))
    frames[body] = tissue[idx]
    pet = bids.write_subject(
        root,
        "sub-01",
        frames * SUV_TO_BQML,
        SCHED,
        t,
        plasma * SUV_TO_BQML,
        0.9 * plasma * SUV_TO_BQML,
        DOSE_MBQ,
        WEIGHT_KG,
        np.diag([3.0, 3.0, 4.0, 1.0]),
    )
    blood = pet.parent / "sub-01_recording-manual_blood.tsv"
    return types.SimpleNamespace(
        root=pathlib.Path(root),
        pet=pet,
        sidecar=pet.with_name("sub-01_pet.json"),
        blood=blood,
        blood_json=blood.with_suffix(".json"),
        t=t,
        plasma=plasma * SUV_TO_BQML,
        frames=frames * SUV_TO_BQML,
    )


@pytest.fixture
def case(tmp_path):
    return _write(tmp_path / "bids")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _rewrite_blood(c, t_min, plasma, whole=None):
    lines = ["time\tplasma_radioactivity" + ("\twhole_blood_radioactivity" if whole else "")]
    for i, (ti, p) in enumerate(zip(t_min, plasma, strict=True)):
        cells = [float(ti) * 60.0, float(p)] + ([float(whole[i])] if whole else [])
        lines.append("\t".join(repr(c) for c in cells))
    c.blood.write_text("\n".join(lines) + "\n")


def _one_sentence(message: str) -> None:
    assert message.count(". ") == 0 and "\n" not in message, message


# ------------------------------------------------------------------------------------------------
# The reference study and the existing fixtures pass
# ------------------------------------------------------------------------------------------------
def test_plausible_study_passes_with_its_levels_inside_the_bounds(case):
    study = bids.read_subject(case.pet)
    assert study.warnings == ()
    median, robust_max = pl.image_levels(study.frames, study.schedule)
    # Independent: late frames (mid >= 32.5 min) averaged by duration, body = the box.
    late = SCHED.mid >= 32.5
    mean = (study.frames[..., late] * SCHED.duration[late]).sum(-1) / SCHED.duration[late].sum()
    np.testing.assert_allclose(median, np.median(mean[1:7, 1:7, :]), rtol=1e-5)
    assert pl.IMAGE_MEDIAN_SUV[0] < median < pl.IMAGE_MEDIAN_SUV[1]
    assert pl.IMAGE_ROBUST_MAX_SUV[0] < robust_max < pl.IMAGE_ROBUST_MAX_SUV[1]
    late_plasma = pl._late_median(study.plasma_times, study.plasma, 65.0)
    assert 1.0 < late_plasma < 6.0  # clinical FDG plasma, SUV


def test_simulated_cohorts_pass_for_every_noise_kind(tmp_path):
    from kinetix.data.phantom.cohort import simulate_cohort, simulation_settings

    for noise in ("image", "projection", "none"):
        cfg = simulation_settings(16, 1, noise, counts_per_slice=4e6)
        root = tmp_path / noise
        for sid in simulate_cohort(root, 1, 7, cfg, progress=False, preview=False):
            study = bids.read_subject(root / sid / "pet" / f"{sid}_pet.nii.gz")
            assert study.warnings == ()


# ------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "units, data_scale, level",
    [("kBq/mL", 1.0, "e+03"), ("Bq/mL", 1e-3, "0.00")],  # ×1000 and ÷1000 in SUV
    ids=["kBq-over-Bq", "Bq-over-kBq"],
)
def test_image_units_off_by_1000_are_refused(case, caplog, units, data_scale, level):
    _edit_json(case.sidecar, Units=units)
    nib.save(nib.Nifti1Image(case.frames * data_scale, np.eye(4)), case.pet)
    with pytest.raises(bids.ImplausibleError) as info:
        bids.read_subject(case.pet)
    message = str(info.value)
    _one_sentence(message)
    for fragment in ("sub-01_pet.nii.gz", "median SUV of the body", level, "'Units'"):
        assert fragment in message, (fragment, message)
    assert "--nocheck_plausibility" in message and "check_plausibility=False" in message
    # The flag proceeds: the finding becomes a logged warning, kept with the study.
    with caplog.at_level(logging.WARNING):
        study = bids.read_subject(case.pet, check_plausibility=False)
    assert len(study.warnings) == 1 and "median SUV of the body" in study.warnings[0]
    assert "--nocheck_plausibility" not in study.warnings[0]
    assert any("median SUV of the body" in r.getMessage() for r in caplog.records)


def test_dose_unit_mistake_is_refused(case):
    _edit_json(case.sidecar, InjectedRadioactivityUnits="GBq")  # 1000× the dose: SUV ÷1000
    with pytest.raises(bids.ImplausibleError, match="blood.tsv column 'plasma_radioactivity'"):
        bids.read_subject(case.pet)


@pytest.mark.parametrize("check", [True, False])
def test_all_zero_image_is_refused_even_without_checks(case, check):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (28,), np.float32), np.eye(4)), case.pet)
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(case.pet, check_plausibility=check)
    assert not isinstance(info.value, bids.ImplausibleError)
    assert "sub-01_pet.nii.gz has no positive voxel value" in str(info.value)
    _one_sentence(str(info.value))


# ------------------------------------------------------------------------------------------------
# Blood
# ------------------------------------------------------------------------------------------------
def _spike(c, value, at_min):
    plasma = c.plasma.copy()
    plasma[int(np.argmin(np.abs(c.t - at_min)))] = value
    return plasma


HARD_BLOOD = [
    ("negated", lambda c: _rewrite_blood(c, c.t, list(-c.plasma)), "no positive value"),
    ("spike -1e6", lambda c: _rewrite_blood(c, c.t, list(_spike(c, -1e6, 30.0))), "negative"),
    ("inf", lambda c: _rewrite_blood(c, c.t, list(_spike(c, np.inf, 30.0))), "non-finite"),
    (
        "whole blood inf",
        lambda c: _rewrite_blood(c, c.t, list(c.plasma), list(_spike(c, np.inf, 30.0))),
        "'whole_blood_radioactivity' has a non-finite",
    ),
    (
        "whole blood negative",
        lambda c: _rewrite_blood(c, c.t, list(c.plasma), list(_spike(c, -1e6, 30.0))),
        "'whole_blood_radioactivity' is -1e+06",
    ),
]


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize(
    "mutate, fragment", [h[1:] for h in HARD_BLOOD], ids=[h[0] for h in HARD_BLOOD]
)
def test_broken_blood_is_refused_even_without_checks(case, mutate, fragment, check):
    mutate(case)
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(case.pet, check_plausibility=check)
    message = str(info.value)
    assert not isinstance(info.value, bids.ImplausibleError)
    assert "sub-01_recording-manual_blood.tsv column" in message and fragment in message, message
    _one_sentence(message)


def test_slightly_negative_blood_within_tolerance_is_accepted(case):
    peak = case.plasma.max()
    plasma = case.plasma.copy()
    plasma[0] = -0.5 * pl.BLOOD_NEGATIVE_RTOL * peak  # background-subtracted noise at t = 0
    _rewrite_blood(case, case.t, list(plasma))
    assert bids.read_subject(case.pet).warnings == ()
    plasma[0] = -2.0 * pl.BLOOD_NEGATIVE_RTOL * peak
    _rewrite_blood(case, case.t, list(plasma))
    with pytest.raises(bids.BidsError, match="cannot be negative"):
        bids.read_subject(case.pet, check_plausibility=False)


def _keep(c, times):
    idx = [int(np.argmin(np.abs(c.t - x))) for x in times]
    return c.t[idx], c.plasma[idx]


SOFT_BLOOD = [
    ("three samples", lambda c: _rewrite_blood(c, *_keep(c, [0.5, 30, 70])), "has 3 samples"),
    (
        "starts at 10 min",
        lambda c: _rewrite_blood(c, c.t[c.t >= 10], list(c.plasma[c.t >= 10])),
        "starts at 600 s",
    ),
    (
        "late spike",
        lambda c: _rewrite_blood(c, c.t, list(_spike(c, 1e6, 40.0))),
        "peaks at 2400 s",
    ),
    (
        "gap 10-50 min",
        lambda c: _rewrite_blood(c, *[a[(c.t <= 10) | (c.t >= 50)] for a in (c.t, c.plasma)]),
        "no sample between 600 s and 3000 s",
    ),
    (
        "blood json kBq/mL",
        lambda c: _edit_json(
            c.blood_json, plasma_radioactivity={"Units": "kBq/mL"}, whole_blood_radioactivity={}
        ),
        "e+03 from 10 to 65 min",
    ),
    (
        "blood values in kBq/mL",
        lambda c: _rewrite_blood(c, c.t, list(c.plasma / 1000.0)),
        "has a median of SUV 0.00",
    ),
]


@pytest.mark.parametrize(
    "mutate, fragment", [s[1:] for s in SOFT_BLOOD], ids=[s[0] for s in SOFT_BLOOD]
)
def test_implausible_blood_is_refused_unless_checks_are_off(case, mutate, fragment):
    mutate(case)
    with pytest.raises(bids.ImplausibleError) as info:
        bids.read_subject(case.pet)
    message = str(info.value)
    assert "sub-01_recording-manual_blood.tsv column 'plasma_radioactivity'" in message
    assert fragment in message and "--nocheck_plausibility" in message, message
    _one_sentence(message)
    study = bids.read_subject(case.pet, check_plausibility=False)
    assert any(fragment in w for w in study.warnings), study.warnings


def test_blood_rules_at_their_bounds():
    """Hand-built curves just inside and just outside each bound (values in SUV)."""
    t = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 65.0])  # gaps ≤ max(2, t)
    v = np.array([0.0, 40.0, 20.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0])

    def problems(times, values):
        return pl.blood_problems(times, values, "plasma_radioactivity", "b.tsv", 65.0)

    assert problems(t, v) == []
    assert problems(t + 1.0, v) == []  # first sample at 1 min: still in time for the bolus
    assert "starts at 72 s" in problems(t + 1.2, v)[0]
    # Judged from the injection (InjectionStart), which may follow TimeZero.
    late_inj = pl.blood_problems(t + 1.2, v, "p", "b.tsv", 65.0, injection_min=0.5)
    assert late_inj == []
    late_peak = v.copy()
    late_peak[5] = 50.0  # the maximum at 5 min is allowed, one later is not
    assert problems(t, late_peak) == []
    late_peak[6] = 60.0
    assert "peaks at 600 s" in problems(t, late_peak)[0]
    # Gap rule: 20 -> 40 min is allowed (gap 20 = t), 20 -> 41 is not.
    assert "between 1200 s and 2460 s" in problems(np.where(t == 40.0, 41.0, t), v)[0]
    # Level: the median over 10–65 min of the linear interpolant (by hand: 2.4 to 3 SUV).
    np.testing.assert_allclose(
        pl._late_median(t, v, 65.0),
        np.median(np.interp(np.linspace(10, 65, 201), t, v)),
        rtol=1e-12,
    )
    assert "median of SUV" in problems(t, v * 50.0)[0]
    assert problems(t, v * 20.0) == []  # SUV 40–80 late: still inside the range (< 100)


# ------------------------------------------------------------------------------------------------
# Ki
# ------------------------------------------------------------------------------------------------
def test_ki_problems_bounds():
    rng = np.random.default_rng(0)
    mask = np.zeros((10, 10, 2), bool)
    mask[1:9, 1:9] = True
    ki = np.where(mask, rng.uniform(0.001, 0.02, mask.shape), 0.0)
    assert pl.ki_problems(ki, mask, "k.nii.gz") == []
    assert pl.ki_levels(ki, mask)[0] == pytest.approx(np.median(ki[mask]), rel=1e-12)
    big = pl.ki_problems(1000.0 * ki, mask, "k.nii.gz")
    assert "k.nii.gz: the median Ki of the body" in big[0] and len(big) == 2
    assert "median Ki" in pl.ki_problems(ki / 1000.0, mask, "k.nii.gz")[0]
    hot = ki.copy()
    hot[1:9, 1:3, :] = 2.0  # a quarter of the body at 2/min: the 99th percentile is out
    assert "1st–99th percentiles" in pl.ki_problems(hot, mask, "k")[0]
    bad = ki.copy()
    bad[2, 2, 0] = np.nan
    assert "1 body voxels have a non-finite Ki" in pl.ki_problems(bad, mask, "k")[0]
    assert "mask is empty" in pl.ki_problems(ki, np.zeros_like(mask), "k")[0]


# ------------------------------------------------------------------------------------------------
# kinetix.parametric: refusal, the flag, warnings in the sidecar
# ------------------------------------------------------------------------------------------------
def _parametric(*args):
    return parametric.cli(["prog", *map(str, args)])


def test_parametric_refuses_implausible_input_and_proceeds_with_the_flag(case, tmp_path, capsys):
    out = tmp_path / "maps"
    assert _parametric("--pet", case.pet, "--tstar", 9, "--out", out) == 0
    paths, paths2 = (patlak.output_paths(case.pet, o) for o in (out, tmp_path / "maps2"))
    meta = json.loads(paths["json"].read_text())
    assert meta["Warnings"] == []
    capsys.readouterr()

    _edit_json(case.sidecar, Units="kBq/mL")  # Bq/mL data: SUV ×1000, Ki ×1000
    out2 = tmp_path / "maps2"
    assert _parametric("--pet", case.pet, "--tstar", 9, "--out", out2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error:") and len(err.splitlines()) == 1
    assert "sub-01_pet.nii.gz" in err and "--nocheck_plausibility" in err
    assert "Traceback" not in err and not out2.exists()  # nothing written, not even the dir

    args = ("--pet", case.pet, "--tstar", 9, "--out", out2, "--nocheck_plausibility")
    assert _parametric(*args) == 0
    warnings = json.loads(paths2["json"].read_text())["Warnings"]
    assert any("median SUV of the body" in w for w in warnings), warnings
    assert any("sub-01_km-patlak_Ki.nii.gz: the median Ki of the body" in w for w in warnings)
    ki = np.asarray(nib.load(paths2["ki"]).dataobj)
    ki_ok = np.asarray(nib.load(paths["ki"]).dataobj)
    np.testing.assert_allclose(ki, 1000.0 * ki_ok, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# File faults: truncated or corrupt NIfTI files
# ------------------------------------------------------------------------------------------------
def _truncate(path: pathlib.Path, keep):
    data = path.read_bytes()
    path.write_bytes(keep(data))


CORRUPT = [
    ("truncated", lambda b: b[: len(b) // 2], "Compressed file ended"),
    ("flipped", lambda b: b[:400] + bytes(x ^ 0xFF for x in b[400:800]) + b[800:], "corrupt"),
    ("header cut", lambda b: b[:60], "cannot be read as NIfTI"),
    ("empty", lambda b: b"", "cannot be read as NIfTI"),
]


@pytest.mark.parametrize("keep, detail", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_pet_image_is_one_sentence_naming_it(case, tmp_path, capsys, keep, detail):
    _truncate(case.pet, keep)
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(case.pet)
    message = str(info.value)
    assert f"The PET image {case.pet} is truncated or corrupt" in message, message
    assert detail in message and "\n" not in message
    out = tmp_path / "maps"
    assert _parametric("--pet", case.pet, "--tstar", 9, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error: The PET image") and "Traceback" not in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_truncated_uncompressed_nifti(tmp_path):
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2, 3), np.float32), np.eye(4)), path)
    _truncate(path, lambda b: b[: len(b) - 50])
    with pytest.raises(bids.BidsError, match=r"x\.nii is truncated or corrupt.*damaged\?\)\.$"):
        bids.load_nifti(path, "image")
    with pytest.raises(bids.BidsError, match="does not exist"):
        bids.load_nifti(tmp_path / "missing.nii.gz", "image")


def test_corrupt_truth_file_names_it(tmp_path):
    rng = np.random.default_rng(1)
    grid = (4, 4, 2)
    params = {n: rng.uniform(0, 1, grid) for n in ("fv", "K1", "k2", "k3", "k4")}
    bids.write_truth(
        tmp_path,
        "01",
        rng.uniform(0, 1e4, grid + (28,)),
        params,
        rng.uniform(0, 0.05, grid),
        np.zeros(grid, np.int32),
        np.eye(4),
        {0: "background"},
    )
    path = bids.truth_paths(tmp_path, "sub-01")["params"]["K1"]
    _truncate(path, lambda b: b[: len(b) // 2])
    with pytest.raises(bids.BidsError, match=r"The truth file .*_K1\.nii\.gz is truncated"):
        bids.read_truth(tmp_path, "sub-01")


# ------------------------------------------------------------------------------------------------
# File faults: output directories
# ------------------------------------------------------------------------------------------------
def test_check_writable_dir_changes_nothing(tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert bids.check_writable_dir(existing) == existing
    assert list(existing.iterdir()) == []  # the probe file is gone
    new = tmp_path / "a" / "b"
    assert bids.check_writable_dir(new) == new
    assert not (tmp_path / "a").exists() and sorted(tmp_path.iterdir()) == [existing]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        bids.check_writable_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match=r"cannot be created: .*file is not a directory"):
        bids.check_writable_dir(tmp_path / "file" / "sub")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # As root permissions are not enforced, so the probe's failure is simulated here.
    monkeypatch.setattr(bids.write.tempfile, "mkstemp", denied)
    monkeypatch.setattr(bids.write.tempfile, "mkdtemp", denied)
    with pytest.raises(PermissionError) as info:
        bids.check_writable_dir(existing, "--out directory")
    assert str(info.value) == f"The --out directory {existing} is not writable: Permission denied."
    with pytest.raises(PermissionError, match=r"would be created in .*: Permission denied\.$"):
        bids.check_writable_dir(new)


@pytest.fixture
def read_only(unwritable_dir):
    """An empty directory this process cannot write in (conftest's `unwritable_dir`)."""
    return unwritable_dir


@pytest.mark.parametrize("sub", ["", "new"], ids=["existing", "to-create"])
def test_parametric_refuses_an_unwritable_out_before_reading(case, read_only, capsys, sub):
    out = read_only / sub if sub else read_only
    assert _parametric("--pet", case.pet, "--tstar", 9, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error: The output directory (--out)")
    assert "not writable" in err and str(out) in err and len(err.splitlines()) == 1
    assert list(read_only.iterdir()) == []


def test_simulate_refuses_an_unwritable_out_before_simulating(read_only, capsys):
    out = read_only / "cohort"
    args = ["prog", "--out", str(out), "--subjects", "1", "--size", "16", "--slices", "1"]
    assert simulate.cli([*args, "--nopreview", "--noprogress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.simulate: error: The --out directory") and "not writable" in err
    assert list(read_only.iterdir()) == []


def test_predict_refuses_an_unwritable_out_before_anything_else(case, read_only):
    # The workdir does not exist: the output directory is checked before the run is even read.
    with pytest.raises(PermissionError, match="output directory .* is not writable"):
        network.predict_to_dir(read_only / "run", case.pet, read_only / "out")


def test_predict_checks_out_before_reading_the_run(case, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="output directory"):
        network.predict_to_dir(tmp_path / "no-run", case.pet, tmp_path / "file")
