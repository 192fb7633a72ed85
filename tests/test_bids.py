"""Tests for kinetix.data.bids: write/read round trips, SUV and unit conversion, validation."""

import json
import math
import pathlib
import shutil
import types

import nibabel as nib
import numpy as np
import pytest
from scipy import integrate

from kinetix.data import bids
from kinetix.kinetics.frames import F18_HALF_LIFE_MIN, PAPER_SCHEDULE

SHAPE = (4, 5, 2, 28)
DOSE_MBQ = 370.0
WEIGHT_KG = 70.0
AFFINE = np.array(
    [[2.0, 0.0, 0.0, -4.0], [0.0, 2.5, 0.0, -6.0], [0.0, 0.0, 3.0, 1.5], [0.0, 0.0, 0.0, 1.0]]
)
DELETE = object()


def _blood_curve():
    """Non-uniform sample times (min) to 70 min and a smooth plasma / whole-blood curve (Bq/mL)."""
    times = np.concatenate(
        [np.arange(0.0, 2.0, 0.25), [2.5, 3, 4, 5, 7.5, 10, 15, 20, 30, 40, 50, 60, 70]]
    )
    plasma = 8e4 * times * np.exp(-4.0 * times) + 6e3 * np.exp(-0.1 * times) + 3e3
    return times, plasma, 0.9 * plasma


def _write(root, subject="sub-01", seed=0, whole_blood=True, **kwargs):
    rng = np.random.default_rng(seed)
    frames = rng.uniform(100.0, 2e4, SHAPE).astype(np.float32)
    times, plasma, wb = _blood_curve()
    pet = bids.write_subject(
        root,
        subject,
        frames,
        PAPER_SCHEDULE,
        times,
        plasma,
        wb if whole_blood else None,
        DOSE_MBQ,
        WEIGHT_KG,
        AFFINE,
        **kwargs,
    )
    return types.SimpleNamespace(
        root=pathlib.Path(root),
        pet=pet,
        sidecar=pet.with_name(pet.name.replace(".nii.gz", ".json")),
        blood=pet.parent / f"{subject}_recording-manual_blood.tsv",
        frames=frames,
        times=times,
        plasma=plasma,
        wb=wb,
    )


@pytest.fixture
def case(tmp_path):
    return _write(tmp_path)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _rewrite_blood(path, columns):
    names = list(columns)
    lines = ["\t".join(names)]
    lines += ["\t".join(str(c) for c in row) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _blood_columns(case, times_min=None):
    times = case.times if times_min is None else times_min
    return {"time": list(times * 60.0), "plasma_radioactivity": list(case.plasma[: len(times)])}


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------
def test_round_trip_frames_schedule_blood_affine(case):
    study = bids.read_subject(case.pet)
    suv = WEIGHT_KG * 1e3 / (DOSE_MBQ * 1e6)  # g / Bq
    assert study.suv_factor == pytest.approx(suv, rel=1e-12)
    assert study.frames.dtype == np.float32 and study.frames.shape == SHAPE
    np.testing.assert_allclose(study.frames, case.frames.astype(np.float64) * suv, rtol=1e-6)
    np.testing.assert_allclose(study.schedule.start, PAPER_SCHEDULE.start, rtol=0, atol=1e-9)
    np.testing.assert_allclose(study.schedule.end, PAPER_SCHEDULE.end, rtol=0, atol=1e-9)
    np.testing.assert_allclose(study.plasma_times, case.times, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(study.plasma, case.plasma * suv, rtol=1e-6)
    np.testing.assert_allclose(study.whole_blood, case.wb * suv, rtol=1e-6)
    np.testing.assert_allclose(study.affine, AFFINE, rtol=0, atol=1e-6)
    assert study.subject == "sub-01"
    assert study.pet_path == case.pet and study.blood_path == case.blood
    assert study.decay_constant == pytest.approx(math.log(2) / F18_HALF_LIFE_MIN, rel=1e-12)
    assert nib.load(case.pet).get_data_dtype() == np.float32
    for key in (
        "FrameTimesStart",
        "FrameDuration",
        "Units",
        "TracerName",
        "TracerRadionuclide",
        "InjectedRadioactivity",
        "InjectedRadioactivityUnits",
        "ImageDecayCorrected",
        "ImageDecayCorrectionTime",
        "DecayCorrectionFactor",
        "TimeZero",
        "ScanStart",
        "InjectionStart",
        "BodyWeight",
    ):
        assert key in study.sidecar, key
    assert study.sidecar["TracerName"] == "FDG" and study.sidecar["TracerRadionuclide"] == "F18"
    blood_meta = json.loads(case.blood.with_suffix(".json").read_text())
    assert blood_meta["time"]["Units"] == "s" and blood_meta["WholeBloodAvail"] is True


def test_decay_correction_factor_corrects_constant_activity(case):
    """f_m·(1/Δ)∫ e^{−λt} dt over each frame must be 1 (scipy quadrature, seconds)."""
    sidecar = json.loads(case.sidecar.read_text())
    lam = math.log(2) / (F18_HALF_LIFE_MIN * 60.0)  # 1/s
    for m in (0, 9, 27):
        ts, dur = sidecar["FrameTimesStart"][m], sidecar["FrameDuration"][m]
        mean, _ = integrate.quad(lambda t: math.exp(-lam * t), ts, ts + dur)
        assert sidecar["DecayCorrectionFactor"][m] * mean / dur == pytest.approx(1.0, rel=1e-10)


def test_plasma_and_blood_inputs(case):
    study = bids.read_subject(case.pet)
    inp = study.plasma_input()
    np.testing.assert_allclose(np.asarray(inp(study.plasma_times)), study.plasma, rtol=1e-5)
    blood = study.blood_input()
    np.testing.assert_allclose(np.asarray(blood(study.plasma_times)), study.whole_blood, rtol=1e-5)


def test_no_whole_blood_gives_none(tmp_path):
    c = _write(tmp_path, whole_blood=False)
    study = bids.read_subject(c.pet)
    assert study.whole_blood is None and study.blood_input() is None


def test_whole_blood_na_rows_interpolated(case):
    cols = _blood_columns(case)
    wb = [str(v) for v in case.wb]
    wb[3] = "n/a"
    cols["whole_blood_radioactivity"] = wb
    _rewrite_blood(case.blood, cols)
    study = bids.read_subject(case.pet)
    t = case.times
    expected = case.wb[2] + (case.wb[4] - case.wb[2]) * (t[3] - t[2]) / (t[4] - t[2])
    assert study.whole_blood[3] == pytest.approx(expected * study.suv_factor, rel=1e-6)


@pytest.mark.parametrize(
    "changes, dose_bq",
    [
        # Injection 30 s after TimeZero, image corrected to TimeZero: dose corrected back 30 s.
        ({"InjectionStart": 30.0}, DOSE_MBQ * 1e6 * 2 ** (0.5 / F18_HALF_LIFE_MIN)),
        # Image corrected to the injection time itself: the dose as injected.
        ({"InjectionStart": 30.0, "ImageDecayCorrectionTime": 30.0}, DOSE_MBQ * 1e6),
        ({"InjectedRadioactivity": 10.0, "InjectedRadioactivityUnits": "mCi"}, 10.0 * 3.7e7),
        ({"InjectedRadioactivity": 3.7e8, "InjectedRadioactivityUnits": "Bq"}, 3.7e8),
    ],
)
def test_suv_factor_dose_units_and_decay(tmp_path, changes, dose_bq):
    c = _write(tmp_path, extra_sidecar=changes)
    study = bids.read_subject(c.pet)
    assert study.suv_factor == pytest.approx(WEIGHT_KG * 1e3 / dose_bq, rel=1e-12)


@pytest.mark.parametrize("units, scale", [("Bq/mL", 1.0), ("kBq/mL", 1e3), ("MBq/mL", 1e6)])
def test_image_units(tmp_path, units, scale):
    c = _write(tmp_path, extra_sidecar={"Units": units})
    # The same numbers in kBq/mL or MBq/mL are implausible for FDG: only the conversion is tested.
    study = bids.read_subject(c.pet, check_plausibility=False)
    np.testing.assert_allclose(study.frames, c.frames * scale * study.suv_factor, rtol=1e-6)
    # The blood TSV stays in Bq/mL (its own JSON says so), independent of the image units.
    np.testing.assert_allclose(study.plasma, c.plasma * study.suv_factor, rtol=1e-6)


def test_blood_json_units_kbq(case):
    meta_path = case.blood.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["plasma_radioactivity"]["Units"] = "kBq/mL"
    meta_path.write_text(json.dumps(meta))
    study = bids.read_subject(case.pet, check_plausibility=False)  # implausible, see above
    np.testing.assert_allclose(study.plasma, case.plasma * 1e3 * study.suv_factor, rtol=1e-6)


def test_body_weight_from_participants(case):
    _edit_json(case.sidecar, BodyWeight=DELETE)
    bids.write_participants(case.root, [{"participant_id": "sub-01", "weight": 80.0, "sex": "F"}])
    study = bids.read_subject(case.pet)
    assert study.suv_factor == pytest.approx(80e3 / (DOSE_MBQ * 1e6), rel=1e-12)
    rows = bids.read_participants(case.root)
    assert rows == {"sub-01": {"participant_id": "sub-01", "weight": 80.0, "sex": "F"}}


def test_explicit_blood_path(case, tmp_path):
    other = tmp_path / "elsewhere_blood.tsv"
    cols = _blood_columns(case)
    cols["plasma_radioactivity"] = [2.0 * v for v in case.plasma]
    _rewrite_blood(other, cols)
    study = bids.read_subject(case.pet, blood_path=other)
    np.testing.assert_allclose(study.plasma, 2.0 * case.plasma * study.suv_factor, rtol=1e-6)
    assert study.whole_blood is None


# ---------------------------------------------------------------------------------------------
# Validation: every case raises BidsError naming the file and the key
# ---------------------------------------------------------------------------------------------
def _drop(key):
    return lambda c: _edit_json(c.sidecar, **{key: DELETE})


def _set(**changes):
    return lambda c: _edit_json(c.sidecar, **changes)


def _write_image(c, data):
    nib.save(nib.Nifti1Image(data, AFFINE), c.pet)


def _nan_voxels(c):
    data = c.frames.copy()
    data[0, 0, 0, 0] = np.nan
    data[1, 2, 1, 5] = np.nan
    data[3, 4, 0, 27] = np.inf
    _write_image(c, data)


def _blood_minutes(c):
    cols = _blood_columns(c)
    cols["time"] = list(c.times)  # minutes written where seconds are expected
    _rewrite_blood(c.blood, cols)


def _blood_short(c):
    keep = c.times <= 60.0  # last sample at 60 min; the scan ends at 65 min
    _rewrite_blood(c.blood, _blood_columns(c, c.times[keep]))


def _blood_drop(column):
    def mutate(c):
        cols = _blood_columns(c)
        cols.pop(column)
        cols["other"] = [1.0] * len(c.times)
        _rewrite_blood(c.blood, cols)

    return mutate


def _blood_swap(c):
    cols = _blood_columns(c)
    cols["time"][4], cols["time"][5] = cols["time"][5], cols["time"][4]
    _rewrite_blood(c.blood, cols)


def _blood_bad_units(c):
    meta_path = c.blood.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["plasma_radioactivity"]["Units"] = "counts"
    meta_path.write_text(json.dumps(meta))


def _frames_swapped(c):
    start = list(json.loads(c.sidecar.read_text())["FrameTimesStart"])
    start[10], start[11] = start[11], start[10]
    _edit_json(c.sidecar, FrameTimesStart=start)


def _frames_clock(c):
    start = json.loads(c.sidecar.read_text())["FrameTimesStart"]
    _edit_json(c.sidecar, FrameTimesStart=[120000.0 + s for s in start])  # hhmmss-like


def _frames_ms(c):
    dur = json.loads(c.sidecar.read_text())["FrameDuration"]
    _edit_json(c.sidecar, FrameDuration=[1000.0 * d for d in dur])


def _frames_short(key):
    def mutate(c):
        sidecar = json.loads(c.sidecar.read_text())
        _edit_json(c.sidecar, **{key: sidecar[key][:27]})

    return mutate


def _frames_both_short(c):
    sidecar = json.loads(c.sidecar.read_text())
    _edit_json(
        c.sidecar,
        FrameTimesStart=sidecar["FrameTimesStart"][:27],
        FrameDuration=sidecar["FrameDuration"][:27],
    )


PET_JSON, PET_NII, BLOOD = (
    "sub-01_pet.json",
    "sub-01_pet.nii.gz",
    "sub-01_recording-manual_blood.tsv",
)
BAD_CASES = [
    ("no sidecar", lambda c: c.sidecar.unlink(), [PET_JSON, "does not exist"]),
    ("sidecar not json", lambda c: c.sidecar.write_text("{not json"), [PET_JSON, "JSON"]),
    *[
        (f"missing {key}", _drop(key), [PET_JSON, key])
        for key in (
            "FrameTimesStart",
            "FrameDuration",
            "Units",
            "InjectedRadioactivity",
            "InjectedRadioactivityUnits",
            "ImageDecayCorrected",
            "TracerRadionuclide",
            "BodyWeight",
        )
    ],
    ("FrameTimesStart string", _set(FrameTimesStart="0,10,20"), [PET_JSON, "FrameTimesStart"]),
    ("FrameDuration nulls", _set(FrameDuration=[None] * 28), [PET_JSON, "FrameDuration"]),
    ("dose string", _set(InjectedRadioactivity="370"), [PET_JSON, "InjectedRadioactivity"]),
    ("dose negative", _set(InjectedRadioactivity=-1.0), [PET_JSON, "InjectedRadioactivity"]),
    ("weight zero", _set(BodyWeight=0.0), [PET_JSON, "BodyWeight"]),
    ("weight grams", _set(BodyWeight=70000.0), [PET_JSON, "BodyWeight", "grams"]),
    ("image units", _set(Units="SUV"), [PET_JSON, "Units", "SUV"]),
    (
        "dose units",
        _set(InjectedRadioactivityUnits="Ci/kg"),
        [PET_JSON, "InjectedRadioactivityUnits"],
    ),
    ("decay flag malformed", _set(ImageDecayCorrected="maybe"), [PET_JSON, "ImageDecayCorrected"]),
    (
        "not decay corrected",
        _set(ImageDecayCorrected=False),
        [PET_JSON, "ImageDecayCorrected", "decay-corrected"],
    ),
    ("radionuclide", _set(TracerRadionuclide="Xx99"), [PET_JSON, "TracerRadionuclide"]),
    ("InjectionStart string", _set(InjectionStart="00:00:30"), [PET_JSON, "InjectionStart"]),
    (
        "decay factors length",
        _set(DecayCorrectionFactor=[1.0] * 3),
        [PET_JSON, "DecayCorrectionFactor"],
    ),
    (
        "durations shorter",
        _frames_short("FrameDuration"),
        [PET_JSON, "FrameDuration", "FrameTimesStart", "27", "28"],
    ),
    (
        "starts shorter",
        _frames_short("FrameTimesStart"),
        [PET_JSON, "FrameDuration", "FrameTimesStart"],
    ),
    ("frames vs image", _frames_both_short, [PET_JSON, PET_NII, "FrameTimesStart", "27", "28"]),
    ("frames clock times", _frames_clock, [PET_JSON, "FrameTimesStart", "clock"]),
    ("frames in ms", _frames_ms, [PET_JSON, "FrameDuration", "24 h"]),
    ("frames not increasing", _frames_swapped, [PET_JSON, "FrameTimesStart", "overlap"]),
    ("frames negative", _set(FrameDuration=[-10.0] + [10.0] * 27), [PET_JSON, "FrameDuration"]),
    ("3-D image", lambda c: _write_image(c, c.frames[..., 0]), [PET_NII, "3-D", "4-D"]),
    ("NaN voxels", _nan_voxels, [PET_NII, "3 non-finite", "2 NaN", "1 infinite"]),
    ("no pet", lambda c: c.pet.unlink(), [PET_NII, "does not exist"]),
    ("no blood", lambda c: c.blood.unlink(), ["sub-01_recording-*_blood.tsv", "blood_path"]),
    ("blood short", _blood_short, [BLOOD, "'time'", "3600", "3900"]),
    ("blood minutes", _blood_minutes, [BLOOD, "'time'", "minutes"]),
    ("blood no plasma", _blood_drop("plasma_radioactivity"), [BLOOD, "plasma_radioactivity"]),
    ("blood no time", _blood_drop("time"), [BLOOD, "'time'"]),
    ("blood not increasing", _blood_swap, [BLOOD, "'time'", "increasing"]),
    (
        "blood units",
        _blood_bad_units,
        ["sub-01_recording-manual_blood.json", "plasma_radioactivity"],
    ),
]


@pytest.mark.parametrize(
    "mutate, fragments", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_input_raises_bids_error(case, mutate, fragments):
    mutate(case)
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(case.pet)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert message.count(". ") == 0, f"one sentence expected: {message}"


def test_participants_without_weight(case):
    _edit_json(case.sidecar, BodyWeight=DELETE)
    bids.write_participants(case.root, [{"participant_id": "sub-01", "age": 50}])
    with pytest.raises(bids.BidsError, match=r"participants\.tsv.*'weight'.*sub-01"):
        bids.read_subject(case.pet)


# ---------------------------------------------------------------------------------------------
# Dataset helpers and writers
# ---------------------------------------------------------------------------------------------
def test_find_subjects(tmp_path):
    _write(tmp_path, "sub-02", seed=2)
    _write(tmp_path, "sub-01", seed=1)
    bids.write_dataset_description(tmp_path)
    found = bids.find_subjects(tmp_path)
    assert [p.name for p in found] == ["sub-01_pet.nii.gz", "sub-02_pet.nii.gz"]
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and "BIDSVersion" in desc
    with pytest.raises(bids.BidsError, match="does not exist"):
        bids.find_subjects(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(bids.BidsError, match="holds no"):
        bids.find_subjects(tmp_path / "empty")


def test_overwrite_refused_then_allowed(case):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(case.root, seed=5)
    new = _write(case.root, seed=5, overwrite=True)
    study = bids.read_subject(new.pet)
    np.testing.assert_allclose(study.frames, new.frames * study.suv_factor, rtol=1e-6)
    bids.write_dataset_description(case.root)
    with pytest.raises(FileExistsError):
        bids.write_dataset_description(case.root)
    bids.write_participants(case.root, [{"participant_id": "sub-01"}])
    with pytest.raises(FileExistsError):
        bids.write_participants(case.root, [{"participant_id": "sub-01"}])


def test_write_map_keeps_affine_and_header(case, tmp_path):
    study = bids.read_subject(case.pet)
    study.header.set_qform(AFFINE, code=1)  # a non-default code that must survive
    ki = np.arange(40, dtype=np.float64).reshape(SHAPE[:3]) / 1000.0
    out = bids.write_map(
        tmp_path / "out" / "ki.nii.gz", ki, study, description="Ki", intent_name="Ki"
    )
    img = nib.load(out)
    assert img.shape == SHAPE[:3] and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, study.affine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.5, 3.0), rtol=1e-6)
    assert img.header.get_xyzt_units() == study.header.get_xyzt_units() == ("mm", "sec")
    assert int(img.header["qform_code"]) == 1
    assert int(img.header["sform_code"]) == int(study.header["sform_code"])
    assert img.header.get_intent() == ("estimate", (), "Ki")
    assert img.header["descrip"].item() == b"Ki"
    np.testing.assert_allclose(np.asarray(img.dataobj), ki.astype(np.float32), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        bids.write_map(out, ki, study)
    bids.write_map(out, 2 * ki, study, overwrite=True)
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj), 2 * ki, rtol=1e-6)
    # 4-D series from a (header, affine) tuple; a mismatched grid is refused.
    series = np.ones(SHAPE[:3] + (6,), np.float32)
    out4 = bids.write_map(tmp_path / "late.nii.gz", series, (study.header, study.affine))
    img4 = nib.load(out4)
    assert img4.shape == SHAPE[:3] + (6,) and img4.header.get_intent()[0] == "none"
    np.testing.assert_allclose(img4.affine, study.affine, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        bids.write_map(tmp_path / "bad.nii.gz", np.ones((3, 3, 3)), study)


def test_truth_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    noisefree = rng.uniform(0, 1e4, SHAPE).astype(np.float32)
    params = {
        n: rng.uniform(0, 1, SHAPE[:3]).astype(np.float32) for n in ("k4", "K1", "fv", "k2", "k3")
    }
    ki = rng.uniform(0, 0.05, SHAPE[:3]).astype(np.float32)
    labels = rng.integers(0, 3, SHAPE[:3])
    names = {0: "background", 1: "liver", 2: "tumour"}
    out = bids.write_truth(tmp_path, "01", noisefree, params, ki, labels, AFFINE, names)
    assert out == tmp_path / "derivatives" / "truth" / "sub-01"
    for name in (
        "pet/sub-01_desc-noisefree_pet.nii.gz",
        "pet/sub-01_desc-noisefree_pet.json",
        "pet/sub-01_km-2tcm_K1.nii.gz",
        "pet/sub-01_km-2tcm_K1.json",
        "pet/sub-01_km-2tcm_fv.nii.gz",
        "pet/sub-01_km-2tcm_Ki.nii.gz",
        "anat/sub-01_dseg.nii.gz",
        "anat/sub-01_dseg.tsv",
        "anat/sub-01_dseg.json",
    ):
        assert (out / name).is_file(), name
    description = json.loads((out.parent / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["DatasetLinks"] == {"raw": "../.."}
    assert json.loads((out / "pet" / "sub-01_km-2tcm_K1.json").read_text())["Units"] == "mL/min/mL"
    truth = bids.read_truth(tmp_path, "sub-01")
    np.testing.assert_array_equal(truth["noisefree"], noisefree)
    assert list(truth["params"]) == ["fv", "K1", "k2", "k3", "k4"]
    for n, v in params.items():
        np.testing.assert_array_equal(truth["params"][n], v)
    np.testing.assert_array_equal(truth["ki"], ki)
    np.testing.assert_array_equal(truth["labels"], labels)
    assert truth["labels"].dtype == np.int32
    assert truth["label_names"] == names
    np.testing.assert_allclose(truth["affine"], AFFINE, rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError):
        bids.write_truth(tmp_path, "01", noisefree, params, ki, labels, AFFINE, names)
    with pytest.raises(ValueError, match="label_names"):
        bids.write_truth(tmp_path, "02", noisefree, params, ki, labels, AFFINE, {0: "bg"})
    with pytest.raises(bids.BidsError, match="sub-03"):
        bids.read_truth(tmp_path, "sub-03")


def test_truth_in_the_flat_layout_of_earlier_versions_is_read(tmp_path):
    """Truths written before the BIDS-Derivatives layout (every file in sub-XX/) still read."""
    rng = np.random.default_rng(4)
    noisefree = rng.uniform(0, 1e4, SHAPE).astype(np.float32)
    params = {n: rng.uniform(0, 1, SHAPE[:3]).astype(np.float32) for n in ("fv", "K1")}
    ki = rng.uniform(0, 0.05, SHAPE[:3]).astype(np.float32)
    labels = rng.integers(0, 2, SHAPE[:3])
    bids.write_truth(tmp_path, "01", noisefree, params, ki, labels, AFFINE, {0: "bg", 1: "liver"})
    sub = tmp_path / "derivatives" / "truth" / "sub-01"
    flat_names = {
        "pet/sub-01_desc-noisefree_pet.nii.gz": "sub-01_desc-noisefree_pet.nii.gz",
        "pet/sub-01_km-2tcm_fv.nii.gz": "sub-01_param-fv_map.nii.gz",
        "pet/sub-01_km-2tcm_K1.nii.gz": "sub-01_param-K1_map.nii.gz",
        "pet/sub-01_km-2tcm_Ki.nii.gz": "sub-01_Ki.nii.gz",
        "anat/sub-01_dseg.nii.gz": "sub-01_dseg.nii.gz",
        "anat/sub-01_dseg.tsv": "sub-01_dseg.tsv",
    }
    for new, old in flat_names.items():
        (sub / new).rename(sub / old)
    for folder in ("pet", "anat"):
        shutil.rmtree(sub / folder)
    assert bids.truth_paths(tmp_path, "sub-01")["ki"] == sub / "sub-01_Ki.nii.gz"
    truth = bids.read_truth(tmp_path, "sub-01")
    assert list(truth["params"]) == ["fv", "K1"]
    np.testing.assert_array_equal(truth["ki"], ki)
    np.testing.assert_array_equal(truth["params"]["K1"], params["K1"])


def test_writer_rejects_bad_arguments(tmp_path):
    frames = np.ones(SHAPE, np.float32)
    times, plasma, wb = _blood_curve()
    args = (frames, PAPER_SCHEDULE, times, plasma, wb, DOSE_MBQ, WEIGHT_KG, AFFINE)
    with pytest.raises(ValueError, match="frames_bqml"):
        bids.write_subject(tmp_path, "sub-01", frames[..., :27], *args[1:])
    with pytest.raises(ValueError, match="subject"):
        bids.write_subject(tmp_path, "sub_01", *args)
    with pytest.raises(ValueError, match="whole_blood_bqml"):
        bids.write_subject(tmp_path, "sub-01", *args[:4], wb[:-1], *args[5:])
