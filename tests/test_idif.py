"""The image-derived input function (kinetix.data.idif) and the reader's blood options
(`read_subject(blood_until=..., input_from_image=...)`).

Reference: a vessel (a cylinder along z, radius R voxels) of the simulator's whole blood in warm
tissue (the simulator's soft tissue or myocardium, 2TCM frames of its input), blurred in-plane by
the simulator's Gaussian PSF (`phantom.recon.blur`); the truth is the decay-corrected frame mean
of the whole-blood curve (`kk.blood_frames`). The tolerances are the errors measured for these
volumes (docs/input.md, "Image-derived input function (IDIF)") with a margin, not tuned to pass.
"""

import functools
import json
import logging
import pathlib
import types

import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix.data import bids, idif
from kinetix.data.phantom import LABELS, recon
from kinetix.data.phantom.tissues import TISSUES, draw_input, kmap_plasma_to_blood_ratio

SCHED = kk.PAPER_SCHEDULE
DOSE_MBQ, WEIGHT_KG = 300.0, 75.0
SUV_TO_BQML = DOSE_MBQ * 1e6 / (WEIGHT_KG * 1e3)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
AORTA = LABELS["aorta"]


@functools.cache
def _curves() -> types.SimpleNamespace:
    """The simulator's input (seed 0) and its frame means (SUV): whole blood, plasma, tissues."""
    blood = draw_input(np.random.default_rng(0))
    wb = kk.SampledInput(blood.times, blood.whole_blood)
    plasma = kk.FengInput(blood.feng)
    params = np.array([TISSUES["soft_tissue"], TISSUES["myocardium"]], np.float32)
    tissue = np.asarray(kk.pet_frames(params, plasma, SCHED, blood=wb), np.float64)
    return types.SimpleNamespace(
        blood=blood,
        wb=np.asarray(kk.blood_frames(wb, SCHED), np.float64),
        plasma=np.asarray(kk.blood_frames(plasma, SCHED), np.float64),
        tissue={"soft_tissue": tissue[0], "myocardium": tissue[1]},
    )


def _vessel(radius: int, fwhm_px: float, around: str = "soft_tissue", slices: int = 2):
    """(frames [N, N, Z, T] SUV float32 blurred by the PSF, mask [N, N, Z] bool of the vessel)."""
    c = _curves()
    n = 2 * radius + 24
    x, y = np.meshgrid(*[np.arange(n) - (n - 1) / 2.0] * 2, indexing="ij")
    inside = (x**2 + y**2 <= radius**2)[:, :, None]
    frames = np.where(inside[..., None], c.wb, c.tissue[around])  # [N, N, 1, T]
    frames = np.repeat(frames, slices, axis=2).astype(np.float32)
    blurred = np.asarray(recon.blur(frames, fwhm_px), np.float32)
    return blurred, np.repeat(inside, slices, axis=2)


def _error(whole_blood_frames) -> tuple[float, float]:
    """(max |relative error| over the bolus frames (mid < 2 min, >= 5 % of the peak), the same
    over the frames from 2 min) of [T] whole-blood frame values against the truth."""
    truth = _curves().wb
    err = np.abs(np.asarray(whole_blood_frames) / np.where(truth > 0, truth, 1.0) - 1.0)
    bolus = (truth >= 0.05 * truth.max()) & (SCHED.mid < 2.0)
    return float(err[bolus].max()), float(err[SCHED.mid >= 2.0].max())


def _one_sentence(message: str) -> None:
    assert message.endswith(".") and message.count(". ") == 0, message


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fwhm_px, radius, around, rule, tol, naive_min",
    [
        # The simulator's 5.5 mm PSF on its 7.8 mm pixels (0.7 px): measured ≤ 0.05 %.
        (0.7, 3, "myocardium", "hottest", 0.005, 0.025),
        (0.7, 6, "soft_tissue", "erode", 0.005, 0.015),
        # 5.5 mm on 2 mm voxels (2.75 px), a 12 mm vessel: measured ≤ 0.4 % (soft tissue) and
        # ≤ 1.0 % (myocardium, hotter than blood late) from 2 min; the whole mask 12–36 %.
        (2.75, 6, "soft_tissue", "hottest", 0.01, 0.10),
        (2.75, 6, "myocardium", "hottest", 0.015, 0.30),
    ],
)
def test_noise_free_idif_matches_the_whole_blood_frames(
    fwhm_px, radius, around, rule, tol, naive_min
):
    frames, mask = _vessel(radius, fwhm_px, around)
    result = idif.image_derived_input(frames, SCHED, mask, core_rule=rule)
    bolus, late = _error(result.whole_blood[1:-1])
    assert bolus <= tol and late <= tol, (bolus, late)
    # The whole mask mixes in the wall: the core is what makes the estimate usable.
    naive_bolus, naive_late = _error(frames[mask].mean(axis=0))
    assert max(naive_bolus, naive_late) >= naive_min, (naive_bolus, naive_late)
    # Samples: (0, 0), the frame mid-times, the last value held to the scan's end; plasma by
    # the simulator's own ratio.
    assert result.times.shape == result.plasma.shape == (SCHED.n_frames + 2,)
    assert result.times[0] == 0 and result.whole_blood[0] == 0
    np.testing.assert_allclose(result.times[1:-1], SCHED.mid)
    assert result.times[-1] == SCHED.end[-1] and result.whole_blood[-1] == result.whole_blood[-2]
    ratio = kmap_plasma_to_blood_ratio(result.times)
    np.testing.assert_allclose(result.plasma, result.whole_blood * ratio, rtol=1e-12)
    truth = _curves()
    late_frames = SCHED.mid >= 2.0
    np.testing.assert_allclose(
        result.plasma[1:-1][late_frames], truth.plasma[late_frames], rtol=tol + 0.002
    )
    assert result.n_core == int(result.core.sum()) and not np.any(result.core & ~mask)
    assert result.description["CoreVoxels"] == result.n_core


def test_a_vessel_too_small_for_the_psf_is_biased():
    """The PSF limit: a vessel of radius 2 voxels under a 2.75-voxel PSF keeps ≈ 25 % of
    spill-out even at its centre (measured 24.7 % from 2 min); no core rule can undo it."""
    frames, mask = _vessel(2, 2.75)
    _, late = _error(idif.image_derived_input(frames, SCHED, mask).whole_blood[1:-1])
    assert 0.15 < late < 0.35


def test_core_rules(caplog):
    frames, mask = _vessel(3, 0.7)
    hottest = idif.blood_core(frames, SCHED, mask)
    assert hottest.sum() == int(np.ceil(idif.DEFAULT_FRACTION * mask.sum()))
    assert not np.any(hottest & ~mask)
    eroded = idif.blood_core(frames, SCHED, mask, rule="erode", erosion=1)
    np.testing.assert_array_equal(eroded, idif.erode(mask, 1))
    # Erosion beyond the vessel falls back to the hottest voxels, with a warning.
    with caplog.at_level(logging.WARNING):
        fallback = idif.blood_core(frames, SCHED, mask, rule="erode", erosion=3)
    np.testing.assert_array_equal(fallback, hottest)
    assert any("leaves 0" in r.getMessage() for r in caplog.records)
    result = idif.image_derived_input(frames, SCHED, mask, core_rule="erode", erosion=3)
    assert result.description["CoreRule"].startswith("hottest")
    # Erosion itself: a disk of radius 1 in-plane; 3-D erodes the end slices too.
    box = np.zeros((5, 5, 3), bool)
    box[1:4, 1:4, :] = True
    assert idif.erode(box, 1).sum() == 3 and idif.erode(box, 1, in_plane=False).sum() == 1
    for kwargs, match in [
        (dict(rule="largest"), "rule must be one of hottest, erode"),
        (dict(fraction=0.0), "fraction must lie in"),
        (dict(rule="erode", erosion=-1), "erosion must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            idif.blood_core(frames, SCHED, mask, **kwargs)
    with pytest.raises(ValueError, match="mask is empty"):
        idif.blood_core(frames, SCHED, np.zeros_like(mask))
    with pytest.raises(ValueError, match="never positive"):
        idif.blood_core(-frames, SCHED, mask)
    late_start = kk.FrameSchedule(SCHED.start + 5.0, SCHED.end + 5.0)
    with pytest.raises(ValueError, match="starts at 5 min.*miss the bolus"):
        idif.image_derived_input(frames, late_start, mask)


def test_plasma_models():
    t = np.array([0.0, 1.0, 10.0, 60.0])
    wb = np.array([0.0, 20.0, 3.0, 1.5])
    np.testing.assert_allclose(
        idif.plasma_from_whole_blood(t, wb), wb * kmap_plasma_to_blood_ratio(t), rtol=1e-12
    )
    np.testing.assert_allclose(
        idif.plasma_to_blood_ratio(t, "naganawa"), 1 / (0.97 - 0.06 * np.exp(-0.085 * t))
    )
    np.testing.assert_allclose(idif.plasma_from_whole_blood(t, wb, "ratio"), wb)
    np.testing.assert_allclose(idif.plasma_from_whole_blood(t, wb, "ratio", ratio=1.1), 1.1 * wb)
    np.testing.assert_allclose(
        idif.plasma_from_whole_blood(t, wb, "hematocrit", hematocrit=0.4, rbc_to_plasma=0.5),
        wb / 0.8,
    )
    for model, params, match in [
        ("kmap2", {}, "plasma_model must be one of kmap, naganawa, ratio, hematocrit"),
        ("kmap", dict(ratio=1.2), "'kmap' takes no ratio"),
        ("hematocrit", dict(hematocrit=0.4), "needs rbc_to_plasma"),
        ("hematocrit", dict(hematocrit=1.2, rbc_to_plasma=0.5), r"hematocrit must be .*\(0, 1\)"),
        ("ratio", dict(ratio=-1.0), "ratio must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            idif.plasma_to_blood_ratio(t, model, **params)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def _save(path, data, affine=AFFINE) -> pathlib.Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return pathlib.Path(path)


def _dseg(tmp_path, shape=(6, 6, 2)) -> tuple[pathlib.Path, np.ndarray]:
    labels = np.zeros(shape, np.int32)
    labels[1:3, 1:3, :] = AORTA
    labels[4:, 4:, :] = LABELS["blood_pool"]
    labels[0, 5, 0] = LABELS["muscle"]
    path = _save(tmp_path / "sub-01_dseg.nii.gz", labels)
    names = {v: k for k, v in LABELS.items()}
    rows = ["index\tname"] + [f"{i}\t{names[i]}" for i in sorted(names)]
    (tmp_path / "sub-01_dseg.tsv").write_text("\n".join(rows) + "\n")
    return path, labels


def test_read_mask_by_label_number_name_and_as_a_mask(tmp_path):
    path, labels = _dseg(tmp_path)
    aorta = labels == AORTA
    for label in (AORTA, np.int64(AORTA), "7", "aorta", "AORTA"):
        np.testing.assert_array_equal(idif.read_mask(path, (6, 6, 2, 28), AFFINE, label), aorta)
    np.testing.assert_array_equal(idif.read_mask(path, (6, 6, 2), AFFINE), labels > 0)
    # A 4-D file with a single volume is a 3-D mask; nonzero (not NaN) is inside.
    data = np.where(aorta, 0.5, 0.0)[..., None]
    data[0, 0, 0, 0] = np.nan
    single = _save(tmp_path / "m.nii.gz", data.astype(np.float32))
    np.testing.assert_array_equal(idif.read_mask(single, (6, 6, 2), AFFINE), aorta)


def _mask_error(tmp_path, case: str):
    path, labels = _dseg(tmp_path)
    shape, affine, label = (6, 6, 2), AFFINE, AORTA
    if case == "missing":
        path = tmp_path / "none.nii.gz"
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif case == "4-D":
        path = _save(tmp_path / "m4.nii.gz", np.stack([labels, labels], axis=-1))
    elif case == "shape":
        shape = (6, 7, 2)
    elif case == "affine":
        affine = AFFINE.copy()
        affine[0, 3] = 2.0
    elif case == "absent":
        label = LABELS["liver"]
    elif case == "unknown name":
        label = "aortta"
    elif case == "no table":
        (tmp_path / "sub-01_dseg.tsv").unlink()
        label = "aorta"
    elif case == "empty mask":
        path, label = _save(tmp_path / "zero.nii.gz", np.zeros((6, 6, 2), np.int16)), None
    elif case == "non-integer":
        path = _save(tmp_path / "float.nii.gz", (labels + 0.5).astype(np.float32))
    return lambda: idif.read_mask(path, shape, affine, label)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ["IDIF mask", "none.nii.gz does not exist"]),
        ("truncated", ["sub-01_dseg.nii.gz is truncated or corrupt"]),
        ("4-D", ["is 4-D with shape (6, 6, 2, 2)", "must be 3-D"]),
        ("shape", ["has shape (6, 6, 2) but the PET image has (6, 7, 2)"]),
        ("affine", ["up to 2 mm from the PET image's", "resample"]),
        ("absent", ["no voxel with label 4 (liver)", "labels present: 0, 2, 6, 7"]),
        ("unknown name", ["sub-01_dseg.tsv has no label named 'aortta'", "aorta, bone"]),
        ("no table", ["no label table sub-01_dseg.tsv", "'aorta'", "label number"]),
        ("empty mask", ["zero.nii.gz has no voxel inside"]),
        ("non-integer", ["not an integer label image", "label 7"]),
    ],
)
def test_read_mask_errors_are_one_sentence(tmp_path, case, fragments):
    with pytest.raises(bids.BidsError) as info:
        _mask_error(tmp_path, case)()
    message = str(info.value)
    _one_sentence(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------------------------
# Reading a study with its IDIF, writing it as BIDS blood
# ------------------------------------------------------------------------------------------------
def _study(root, blood_end_min: float = 70.0, around: str = "soft_tissue"):
    """A BIDS subject: the vessel of radius 6 in tissue (2.75-voxel PSF), its dseg labelling the
    vessel 'aorta', and the simulator's blood sampled up to `blood_end_min`."""
    frames, mask = _vessel(6, 2.75, around)
    c = _curves()
    times = np.append(c.blood.times[c.blood.times < blood_end_min - 1e-9], blood_end_min)
    plasma, whole = (
        np.interp(times, c.blood.times, v) for v in (c.blood.plasma, c.blood.whole_blood)
    )
    pet = bids.write_subject(
        root,
        "sub-01",
        frames * SUV_TO_BQML,
        SCHED,
        times,
        plasma * SUV_TO_BQML,
        whole * SUV_TO_BQML,
        DOSE_MBQ,
        WEIGHT_KG,
        AFFINE,
    )
    labels = np.where(mask, AORTA, LABELS["soft_tissue"]).astype(np.int32)
    dseg = _save(pet.parent / "sub-01_dseg.nii.gz", labels)
    dseg.with_name("sub-01_dseg.tsv").write_text("index\tname\n1\tsoft_tissue\n7\taorta\n")
    return types.SimpleNamespace(pet=pet, dseg=dseg, blood=idif.idif_blood_path(pet).parent)


def test_study_with_idif_and_write_blood_round_trip(tmp_path):
    s = _study(tmp_path)
    study, result = idif.study_with_idif(s.pet, s.dseg, "aorta")
    assert study.blood_path is None and study.warnings == ()
    np.testing.assert_allclose(study.plasma_times, result.times.astype(np.float32))
    np.testing.assert_allclose(study.whole_blood, result.whole_blood, rtol=1e-6)
    assert _error(study.whole_blood[1:-1])[1] <= 0.01  # the measured accuracy, through the files
    assert result.description["Mask"] == str(s.dseg)
    assert result.description["MaskLabel"] == "aorta"

    out = idif.idif_blood_path(s.pet)
    assert out.name == "sub-01_recording-IDIF_blood.tsv"
    tsv, meta = idif.write_blood(out, result, study.suv_factor, sources=["bids::sub-01/pet"])
    back = bids.read_subject(s.pet, tsv)
    np.testing.assert_allclose(back.plasma_times, study.plasma_times, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(back.plasma, study.plasma, rtol=1e-6)
    np.testing.assert_allclose(back.whole_blood, study.whole_blood, rtol=1e-6)
    sidecar = json.loads(meta.read_text())
    assert sidecar["time"]["Units"] == "s"
    for column in ("plasma_radioactivity", "whole_blood_radioactivity"):
        assert sidecar[column]["Units"] == "Bq/mL"
    assert sidecar["PlasmaAvail"] and sidecar["WholeBloodAvail"]
    assert not sidecar["MetaboliteAvail"] and not sidecar["DispersionCorrected"]
    assert sidecar["Sources"] == ["bids::sub-01/pet"]
    for fragment in ("sub-01_dseg.nii.gz", "'aorta'", "hottest 30 %", "kmap", "0.386"):
        assert fragment in sidecar["Description"], (fragment, sidecar["Description"])
    assert sidecar["ImageDerivedInput"]["CoreVoxels"] == result.n_core

    with pytest.raises(
        FileExistsError, match="recording-IDIF_blood.tsv already exists.*--overwrite"
    ):
        idif.write_blood(out, result, study.suv_factor)
    idif.write_blood(out, result, study.suv_factor, overwrite=True)
    # With both the manual and the IDIF recording next to the image, the manual one is read.
    assert bids.read_subject(s.pet).blood_path.name == "sub-01_recording-manual_blood.tsv"


def test_read_subject_input_from_image_gets_the_blood_checks(tmp_path):
    s = _study(tmp_path)
    with pytest.raises(ValueError, match="blood_path or from input_from_image, not both"):
        bids.read_subject(s.pet, s.pet, input_from_image=idif.input_from_image(s.dseg, 7))
    # The IDIF's curves get the blood file's checks, named as the image-derived input: here
    # a callable whose curves are 1000 times too high (soft), then negated (hard).
    good = idif.input_from_image(s.dseg, "aorta")

    def scaled(factor):
        def derive(frames, schedule, affine):
            times, plasma, whole = good(frames, schedule, affine)
            return times, factor * plasma, factor * whole

        return derive

    with pytest.raises(bids.ImplausibleError) as info:
        bids.read_subject(s.pet, input_from_image=scaled(1000.0))
    message = str(info.value)
    assert message.startswith(f"The image-derived input of {s.pet} column 'plasma_radioactivity'")
    assert "median of SUV" in message and "'Units'" in message
    assert "--nocheck_plausibility" in message
    study = bids.read_subject(s.pet, input_from_image=scaled(1000.0), check_plausibility=False)
    assert "median of SUV" in study.warnings[0]
    for check in (True, False):
        with pytest.raises(bids.BidsError, match="image-derived input.*has no positive value"):
            bids.read_subject(s.pet, input_from_image=scaled(-1.0), check_plausibility=check)

    def short(frames, schedule, affine):  # a curve that stops at 10 min
        times, plasma, whole = good(frames, schedule, affine)
        return times[times <= 10], plasma[times <= 10], whole[times <= 10]

    with pytest.raises(bids.BidsError, match="image-derived input.*before the scan ends at 3900 s"):
        bids.read_subject(s.pet, input_from_image=short)
    # A mask on another grid is named before any IDIF is made.
    with pytest.raises(bids.BidsError, match="has shape"):
        small = _save(tmp_path / "small.nii.gz", np.ones((4, 4, 2), np.int8))
        bids.read_subject(s.pet, input_from_image=idif.input_from_image(small))
    # An array mask works too.
    frames, mask = _vessel(6, 2.75)
    study = bids.read_subject(s.pet, input_from_image=idif.input_from_image(mask))
    assert study.plasma.shape == (SCHED.n_frames + 2,)


def test_blood_until_accepts_blood_that_covers_the_route(tmp_path):
    s = _study(tmp_path / "35", blood_end_min=35.0)
    with pytest.raises(bids.BidsError, match=r"ends with plasma at 2100 s, before the scan ends"):
        bids.read_subject(s.pet)
    study = bids.read_subject(s.pet, blood_until=35)
    assert study.plasma_times[-1] == pytest.approx(35.0)
    s30 = _study(tmp_path / "30", blood_end_min=30.0)
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(s30.pet, blood_until=35.0)
    message = str(info.value)
    _one_sentence(message)
    assert "ends with plasma at 1800 s, before 2100 s (35 min) that this route needs" in message
    for bad in (0, -1.0, float("nan"), "35", True):
        with pytest.raises(ValueError, match="blood_until must be a positive number of minutes"):
            bids.read_subject(s.pet, blood_until=bad)
    # An IDIF covers the whole scan: blood_until changes nothing there.
    study, _ = idif.study_with_idif(s.pet, s.dseg, AORTA, blood_until=35)
    assert study.plasma_times[-1] == pytest.approx(SCHED.end[-1])
