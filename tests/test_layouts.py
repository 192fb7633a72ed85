"""Real BIDS-PET layouts: entity names, scan filters, blood recordings, one scan per subject in a
cohort, the config key and the commands' --recording flag (tiny images, a few seconds)."""

import json
import shutil
import types

import numpy as np
import pytest

import kinetix.kinetics as kk
from configs import default
from kinetix import parametric
from kinetix.data import bids, pipeline
from kinetix.data.bids import entities
from kinetix.inference import patlak
from kinetix.training.cohort import build_cohort, scan_choice

SCHED = kk.PAPER_SCHEDULE
SHAPE = (5, 5, 2)
DOSE_MBQ, WEIGHT_KG = 370.0, 70.0
SCAN = {"ses": "baseline", "trc": "18FFDG", "rec": "acdyn", "run": "1"}


def _one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and len(message.splitlines()) == 1


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One subject written by `bids.write_subject` (sub-01/pet/...), to be copied under other
    names: a 3×3 body of smooth FDG-like curves in zero air, blood to 70 min."""
    root = tmp_path_factory.mktemp("template")
    t = np.concatenate([np.arange(0.0, 2.0, 0.25), [2.5, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 70]])
    plasma = 8e4 * t * np.exp(-4.0 * t) + 6e3 * np.exp(-0.1 * t) + 3e3  # Bq/mL
    mid = SCHED.mid
    frames = np.zeros(SHAPE + (SCHED.n_frames,))
    frames[1:4, 1:4, :] = 5e3 * (1.0 - np.exp(-mid / 5.0)) + 60.0 * mid  # Bq/mL
    pet = bids.write_subject(
        root, "sub-01", frames, SCHED, t, plasma, None, DOSE_MBQ, WEIGHT_KG, np.eye(4)
    )
    stem = pet.name[: -len("_pet.nii.gz")]
    return types.SimpleNamespace(
        pet=pet,
        sidecar=pet.with_name(f"{stem}_pet.json"),
        blood=pet.with_name(f"{stem}_recording-manual_blood.tsv"),
        blood_json=pet.with_name(f"{stem}_recording-manual_blood.json"),
    )


def _place(template, root, sub, scan=None, recordings=("manual",), blood_scan=None):
    """Copies the template scan to `root/sub-<sub>/[ses-<ses>/]pet/` under the BIDS name of
    `scan` (entities besides sub), with one blood file per recording; the blood files carry
    `blood_scan` (default: `scan` without rec-). Returns the PET path."""
    scan = dict(scan or {})
    blood_scan = {k: v for k, v in scan.items() if k != "rec"} if blood_scan is None else blood_scan
    folder = root / f"sub-{sub}" / (f"ses-{scan['ses']}" if "ses" in scan else "") / "pet"
    folder.mkdir(parents=True, exist_ok=True)
    pet = folder / entities.format_name({"sub": sub, **scan}, "pet", ".nii.gz")
    shutil.copy(template.pet, pet)
    shutil.copy(
        template.sidecar, folder / entities.format_name({"sub": sub, **scan}, "pet", ".json")
    )
    for rec in recordings:
        names = {"sub": sub, **blood_scan, "recording": rec}
        shutil.copy(template.blood, folder / entities.format_name(names, "blood", ".tsv"))
        shutil.copy(template.blood_json, folder / entities.format_name(names, "blood", ".json"))
    return pet


@pytest.fixture
def archive(template, tmp_path):
    """Two subjects, each with a baseline and a follow-up visit (ses-, trc-, rec-, run-) and a
    manual and an autosampler blood recording per scan."""
    pets = {}
    for sub in ("01", "02"):
        for ses in ("baseline", "followup"):
            scan = {**SCAN, "ses": ses}
            pets[sub, ses] = _place(template, tmp_path, sub, scan, ("manual", "autosampler"))
    return types.SimpleNamespace(root=tmp_path, pets=pets)


# ------------------------------------------------------------------------------------------------
# Entity names and the config text
# ------------------------------------------------------------------------------------------------
def test_names_parse_validate_and_format():
    name = "sub-01_ses-baseline_trc-18FFDG_rec-acdyn_run-1_recording-manual_blood.tsv"
    parsed = entities.parse_name(name)
    assert dict(parsed.entities) == {**{"sub": "01"}, **SCAN, "recording": "manual"}
    assert (parsed.suffix, parsed.extension) == ("blood", ".tsv") and str(parsed) == name
    assert entities.format_name({"run": "1", "sub": "01", "ses": "a"}, "pet", ".nii.gz") == (
        "sub-01_ses-a_run-1_pet.nii.gz"
    )
    assert entities.same_label("run", "01", "1") and not entities.same_label("ses", "01", "1")
    for bad, fragment in [
        ("sub-01_ses-a.b_pet.nii.gz", "not a BIDS file name"),
        ("sub-01_session-a_pet.nii.gz", "'session-a'"),
        ("sub-01_ses-a_ses-b_pet.nii.gz", "ses- entity twice"),
        ("sub-01_run-x_pet.nii.gz", "non-negative integer"),
        ("sub-01.nii.gz", "not a BIDS file name"),
        ("sub-01_ses-a+b_pet.nii.gz", "letters and digits"),
    ]:
        with pytest.raises(bids.BidsError, match=fragment) as info:
            entities.parse_name(bad)
        assert bad in str(info.value) and _one_sentence(str(info.value))


def test_config_text_parses_and_bad_forms_are_refused():
    assert bids.parse_entities("ses-a,trc-b") == {"ses": ("a",), "trc": ("b",)}
    assert bids.parse_entities(" run-1, run-2 ") == {"run": ("1", "2")}
    assert bids.parse_entities("") == {} and bids.parse_entities(None) == {}
    for bad in ("ses", "ses-a-b", "ses-", "-a", "ses-a,", "run-one"):
        with pytest.raises(bids.BidsError, match="config.data.entities item") as info:
            bids.parse_entities(bad)
        assert _one_sentence(str(info.value))
    config = default.get_config()
    config.data.entities, config.data.recording = "ses-a,trc-b", "autosampler"
    assert scan_choice(config) == {
        "filters": {"ses": ("a",), "trc": ("b",)},
        "recording": "autosampler",
    }
    config.data.entities, config.data.recording = "", ""
    assert scan_choice(config) == {"filters": {}, "recording": None}
    config.data.recording = "auto-sampler"
    with pytest.raises(bids.BidsError, match="config.data.recording"):
        scan_choice(config)


# ------------------------------------------------------------------------------------------------
# Discovery and filters
# ------------------------------------------------------------------------------------------------
def test_session_tracer_reconstruction_run_layouts_are_found_and_filtered(archive, template):
    root = archive.root
    _place(template, root, "03", {"trc": "18FFDG", "run": "02"})  # no session
    _place(template, root, "04")  # sub-04/pet/sub-04_pet.nii.gz
    found = bids.find_subjects(root)
    assert len(found) == 6 and found == sorted(found)
    baseline = bids.find_subjects(root, {"ses": "baseline"})
    assert baseline == [archive.pets["01", "baseline"], archive.pets["02", "baseline"]]
    assert bids.find_subjects(root, "ses-baseline,trc-18FFDG,rec-acdyn,run-1") == baseline
    assert bids.find_subjects(root, {"ses": ["baseline", "followup"]}) == sorted(
        archive.pets.values()
    )
    run2 = bids.find_subjects(root, {"run": 2})  # indices compare as numbers
    assert [p.name for p in run2] == ["sub-03_trc-18FFDG_run-02_pet.nii.gz"]
    with pytest.raises(bids.BidsError, match="has ses-baseline and run-2 together") as info:
        bids.find_subjects(root, {"ses": "baseline", "run": "2"})
    assert "run-1, run-02" in str(info.value) and _one_sentence(str(info.value))


@pytest.mark.parametrize(
    "filters, fragments",
    [
        ({"ses": "week2"}, ["ses-week2", "'ses'", "ses-baseline", "ses-followup"]),
        ({"session": "baseline"}, ["'session' is not a BIDS entity", "ses-baseline", "rec-acdyn"]),
        ({"acq": "fast"}, ["acq-fast", "no acq- entity"]),
    ],
)
def test_a_filter_that_matches_nothing_is_one_sentence(archive, filters, fragments):
    with pytest.raises(bids.BidsError) as info:
        bids.find_subjects(archive.root, filters)
    message = str(info.value)
    assert all(f in message for f in fragments), message
    assert str(archive.root) in message and _one_sentence(message)


def test_names_must_agree_with_their_folders(archive):
    pet = archive.pets["01", "baseline"]
    shutil.move(pet, pet.with_name(pet.name.replace("ses-baseline", "ses-week2")))
    with pytest.raises(bids.BidsError, match="ses-week2 in its name but lies in ses-baseline"):
        bids.find_subjects(archive.root)


# ------------------------------------------------------------------------------------------------
# Blood recordings
# ------------------------------------------------------------------------------------------------
def test_blood_recording_default_choice_and_refusals(template, tmp_path):
    pet = _place(template, tmp_path, "01", SCAN, ("manual", "autosampler"))
    blood = "sub-01_ses-baseline_trc-18FFDG_run-1_recording-{}_blood.tsv"
    assert bids.find_blood(pet).name == blood.format("manual")  # DEFAULT_RECORDING
    assert bids.find_blood(pet, "autosampler").name == blood.format("autosampler")
    assert bids.read_subject(pet, recording="autosampler").blood_path.name == blood.format(
        "autosampler"
    )
    with pytest.raises(
        bids.BidsError, match=r"recording-IDIF.*found: autosampler, manual.*--recording"
    ):
        bids.find_blood(pet, "IDIF")
    with pytest.raises(ValueError, match="excludes blood_path"):
        bids.read_subject(pet, blood_path=bids.find_blood(pet), recording="manual")

    # Two recordings, neither manual: refused with the list and the way to choose.
    pet.with_name(blood.format("manual")).rename(pet.with_name(blood.format("IDIF")))
    with pytest.raises(bids.BidsError) as info:
        bids.read_subject(pet)
    message = str(info.value)
    assert "(IDIF, autosampler)" in message and "--recording" in message, message
    assert "config.data.recording" in message and _one_sentence(message)

    for path in pet.parent.glob("*_blood.*"):
        path.unlink()
    with pytest.raises(bids.BidsError, match=r"No blood file sub-01_ses-baseline.*blood_path"):
        bids.find_blood(pet)


def test_blood_matches_by_shared_entities_without_rec(template, tmp_path):
    # The blood file leaves out rec- (blood is not reconstructed): it serves both
    # reconstructions; a blood file of another run serves neither.
    pet = _place(template, tmp_path, "01", SCAN)
    other_rec = _place(template, tmp_path, "01", {**SCAN, "rec": "nacdyn"}, recordings=())
    _place(template, tmp_path, "01", {**SCAN, "run": "2"}, recordings=("autosampler",))
    name = "sub-01_ses-baseline_trc-18FFDG_run-1_recording-manual_blood.tsv"
    assert bids.find_blood(pet).name == name and bids.find_blood(other_rec).name == name
    with pytest.raises(bids.BidsError, match="found: manual"):
        bids.find_blood(pet, "autosampler")  # run-2's recording is not run-1's
    # A blood file that carries the image's rec- is more specific and taken for that image.
    _place(template, tmp_path, "01", SCAN, blood_scan=SCAN)
    assert "_rec-acdyn_" in bids.find_blood(pet).name
    assert bids.find_blood(other_rec).name == name  # rec-acdyn's blood is not rec-nacdyn's
    # Two equally specific files of one recording: refused, naming both.
    for blood in pet.parent.glob("*_blood.*"):
        blood.unlink()
    _place(template, tmp_path, "01", SCAN, blood_scan={"ses": "baseline", "trc": "18FFDG"})
    _place(template, tmp_path, "01", SCAN, blood_scan={"ses": "baseline", "run": "1"})
    with pytest.raises(bids.BidsError, match="_run-1_recording-manual_blood.tsv and .*both match"):
        bids.find_blood(pet)


def test_names_outside_bids_keep_the_prefix_rule(template, tmp_path):
    pet = tmp_path / "scan_pet.nii.gz"
    shutil.copy(template.pet, pet)
    for name in ("scan_recording-manual_blood.tsv", "other_recording-manual_blood.tsv"):
        shutil.copy(template.blood, tmp_path / name)
    assert bids.find_blood(pet).name == "scan_recording-manual_blood.tsv"


# ------------------------------------------------------------------------------------------------
# Cohorts: one scan per subject
# ------------------------------------------------------------------------------------------------
def test_a_cohort_takes_one_scan_per_subject(archive):
    with pytest.raises(ValueError) as info:
        pipeline.Cohort.from_bids(archive.root)
    message = str(info.value)
    assert "Subject sub-01 has 2 PET images" in message, message
    assert "ses-baseline and ses-followup" in message
    assert "--config.data.entities=ses-baseline" in message and _one_sentence(message)

    cohort = pipeline.Cohort.from_bids(
        archive.root, filters="ses-followup", recording="autosampler"
    )
    assert cohort.subjects == ["sub-01", "sub-02"]
    study = cohort.study("sub-02")
    assert study.pet_path == archive.pets["02", "followup"]
    assert (
        study.blood_path.name
        == "sub-02_ses-followup_trc-18FFDG_run-1_recording-autosampler_blood.tsv"
    )
    assert (
        pipeline.Cohort.from_bids(archive.root, filters={"ses": "baseline"})
        .study("sub-01")
        .blood_path.name.endswith("_recording-manual_blood.tsv")
    )


def test_the_training_cohort_reads_the_config_keys(archive, tmp_path):
    config = default.get_config()
    config.data.root = str(archive.root)
    config.data.entities, config.data.recording = "ses-baseline,trc-18FFDG", "autosampler"
    cohort = build_cohort(config, tmp_path / "run")
    assert cohort.subjects == ["sub-01", "sub-02"]
    assert "recording-autosampler" in cohort.study("sub-01").blood_path.name
    config.data.recording = "arterial"
    with pytest.raises(bids.BidsError, match="recording-arterial.*found: autosampler, manual"):
        build_cohort(config, tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# The commands' --recording
# ------------------------------------------------------------------------------------------------
def test_parametric_recording_flag_reaches_the_reader(template, tmp_path, capsys):
    pet = _place(template, tmp_path / "bids", "01", SCAN, ("manual", "autosampler"))
    out = tmp_path / "maps"
    argv = ["prog", "--pet", str(pet), "--tstar", "9", "--out", str(out)]
    assert parametric.cli([*argv, "--recording", "autosampler"]) == 0
    sources = json.loads(patlak.output_paths(pet, out)["json"].read_text())["Sources"]
    assert sources[1].endswith("/" + bids.find_blood(pet, "autosampler").name)
    capsys.readouterr()
    assert parametric.cli([*argv, "--recording", "arterial", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kinetix.parametric: error: No blood file of recording-arterial")
    assert "found: autosampler, manual" in err and len(err.splitlines()) == 1
    blood = str(bids.find_blood(pet))
    assert parametric.cli([*argv, "--recording", "manual", "--blood", blood, "--overwrite"]) == 2
    assert "--recording and --blood exclude each other" in capsys.readouterr().err
