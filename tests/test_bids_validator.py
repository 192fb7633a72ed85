"""Every dataset kinetix writes passes the official BIDS validator (bids-validator-deno) with no
error: the simulated cohort, its truth derivative, a clinic's 35-minute cut of it, and the
outputs of kinetix.parametric and kinetix.fit (with an image-derived input). kinetix.predict's
outputs are validated in tests/test_predict.py, which has a trained run.

Each derivative is validated as its own dataset: the validator's recursive mode (3.0.2) does
not apply a derivative's own `.bidsignore`.
"""

import json
import shutil

import _bids_validator
import nibabel as nib
import numpy as np
import pytest

from kinetix.data import bids
from kinetix.data.phantom import SimulationConfig
from kinetix.data.phantom.cohort import simulate_cohort
from kinetix.inference import fit, patlak


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("validator") / "raw"
    cfg = SimulationConfig(size=16, slices=1, noise="image")
    simulate_cohort(root, 2, 0, cfg, overwrite=True, progress=False)
    return root


def test_the_simulated_cohort_and_its_truth_pass(cohort):
    assert _bids_validator.errors(cohort) == []
    summary = _bids_validator.report(cohort)["summary"]
    assert "pet" in summary["dataTypes"] and len(summary["subjects"]) == 2  # it looked
    truth = cohort / "derivatives" / "truth"
    assert _bids_validator.errors(truth) == []
    assert len(_bids_validator.report(truth)["summary"]["subjects"]) == 2


def test_a_35_minute_cut_without_blood_passes(cohort, tmp_path):
    clinic = tmp_path / "clinic"
    shutil.copytree(cohort, clinic, ignore=shutil.ignore_patterns("derivatives", "sub-02"))
    bids.cut_scan(clinic / "sub-01" / "pet" / "sub-01_pet.nii.gz", 22)
    participants = (clinic / "participants.tsv").read_text().splitlines()
    (clinic / "participants.tsv").write_text("\n".join(participants[:2]) + "\n")
    assert not list(clinic.rglob("*_blood.tsv"))
    assert _bids_validator.errors(clinic) == []


def _vessel_mask(pet, path):
    """The 8 hottest voxels of the first 2 minutes (16 x 16 vessels are under a voxel)."""
    img = nib.load(pet)
    early = np.asarray(img.dataobj)[..., :8].mean(axis=-1)
    hot = early >= np.sort(early, axis=None)[-8]
    nib.save(nib.Nifti1Image(hot.astype(np.uint8), img.affine), path)
    return path


def test_parametric_and_fit_outputs_pass(cohort, tmp_path):
    out = tmp_path / "derivatives" / "kinetix"
    pet1 = cohort / "sub-01" / "pet" / "sub-01_pet.nii.gz"
    pet2 = cohort / "sub-02" / "pet" / "sub-02_pet.nii.gz"
    ki = patlak.patlak_study(pet1, out, 9.0)
    idif = patlak.patlak_study(
        pet2, out, 9.0, idif_mask=_vessel_mask(pet2, tmp_path / "vessel.nii.gz"),
        check_plausibility=False,
    )  # fmt: skip
    fitted = fit.fit_study(pet1, out, window=(0.0, 35.0), max_steps=20)
    for path in (ki["ki"], ki["mask"], idif["idif_tsv"], fitted["K1"], fitted["summary"]):
        assert path.is_file(), path
    assert _bids_validator.errors(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert (out / description["DatasetLinks"]["raw"]).resolve() == cohort.resolve()
    sidecar = json.loads(ki["json"].read_text())
    assert isinstance(sidecar["Units"], str)
    assert sidecar["Sources"][0] == "bids:raw:sub-01/pet/sub-01_pet.nii.gz"


def test_the_validator_finds_what_breaks_the_rules(cohort, tmp_path):
    """The check can fail: without the .bidsignore entries, kinetix's parametric names (which
    BIDS 1.11 lacks) are errors, as is a mask sidecar whose `Type` BIDS does not know."""
    out = tmp_path / "out"
    paths = patlak.patlak_study(cohort / "sub-01" / "pet" / "sub-01_pet.nii.gz", out, 9.0)
    ignore = (out / ".bidsignore").read_text()
    (out / ".bidsignore").unlink()
    found = _bids_validator.errors(out)
    assert any(e.startswith("NOT_INCLUDED") and "km-patlak_Ki.nii.gz" in e for e in found), found
    (out / ".bidsignore").write_text(ignore)
    assert _bids_validator.errors(out) == []
    mask_meta = json.loads(paths["mask_json"].read_text())
    paths["mask_json"].write_text(json.dumps({**mask_meta, "Type": "Body"}))
    found = _bids_validator.errors(out)
    assert any("desc-patlak_mask" in e for e in found), found


def test_outputs_never_go_into_a_raw_dataset_nor_mix_two_sources(cohort, tmp_path):
    pet = cohort / "sub-01" / "pet" / "sub-01_pet.nii.gz"
    before = sorted(p for p in cohort.rglob("*"))
    with pytest.raises(ValueError, match="holds a raw BIDS dataset.*derivatives"):
        patlak.patlak_study(pet, cohort, 9.0)
    assert sorted(p for p in cohort.rglob("*")) == before  # nothing written
    other = tmp_path / "other"
    shutil.copytree(cohort, other, ignore=shutil.ignore_patterns("derivatives"))
    out = tmp_path / "maps"
    patlak.patlak_study(pet, out, 9.0)
    with pytest.raises(ValueError, match="links 'raw' to .*another --out"):
        patlak.patlak_study(other / "sub-02" / "pet" / "sub-02_pet.nii.gz", out, 9.0)
