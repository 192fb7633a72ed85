"""BIDS-PET reading, validation and writing (the only place where seconds become minutes).

Layout (docs/conventions.md, "BIDS-PET files")::

    ROOT/dataset_description.json
    ROOT/participants.tsv (+ .json)                      participant_id, weight (kg), ...
    ROOT/sub-XX/pet/sub-XX_pet.nii.gz                    4-D float32 [X, Y, Z, T], Bq/mL
    ROOT/sub-XX/pet/sub-XX_pet.json                      frame times (s), dose, units, ...
    ROOT/sub-XX/pet/sub-XX_recording-manual_blood.tsv    time (s), plasma_radioactivity,
                                                         whole_blood_radioactivity (Bq/mL)
    ROOT/sub-XX/pet/sub-XX_recording-manual_blood.json   column descriptions and units
    ROOT/derivatives/truth/sub-XX/ ...                   simulator ground truth (`write_truth`)

Conversions done by `read_subject` (and nowhere else in kinetix):

* Times: BIDS seconds -> minutes (frame schedule, blood sample times).
* Activity: image and blood values -> SUV (g/mL) = Bq/mL × body weight [g] / dose [Bq]. The
  dose `InjectedRadioactivity` was measured at `InjectionStart` (s after `TimeZero`); it is
  decay-corrected to the image's decay-correction reference `ImageDecayCorrectionTime` (s after
  `TimeZero`, default 0): dose_ref = dose · exp(−λ·(ImageDecayCorrectionTime − InjectionStart)),
  with λ from `TracerRadionuclide`. This SUV equals "image decay-corrected to TimeZero × weight /
  dose at TimeZero", which is what kinetix's frame model (`kk.pet_frames`) assumes, so any
  reference time works. Blood radioactivities are taken as decay-corrected to the same reference
  as the image and are scaled by the same `suv_factor`.
* Images must be decay-corrected (`ImageDecayCorrected: true`); otherwise reading fails.

Validation failures raise `BidsError` (a `ValueError`) with one sentence that names the file and
the key or column at fault. Values outside the plausible ranges for FDG (a unit mistake of 1000,
a blood curve too sparse or starting too late) raise `ImplausibleError` (a `BidsError`) unless
`read_subject(check_plausibility=False)`; `plausibility` holds the bounds and the checks
(docs/conventions.md, "Plausibility checks"). `load_nifti` / `open_nifti` turn a truncated or
corrupt NIfTI file into one sentence that names it; `check_writable_dir` checks an output
directory before any computation.

Real archives add visits, tracers, reconstructions and runs (`sub-XX/ses-YY/pet/
sub-XX_ses-YY_trc-T_rec-R_run-N_pet.nii.gz`) and several blood recordings
(`..._recording-manual_blood.tsv`, `..._recording-autosampler_blood.tsv`): `find_subjects(root,
filters)` chooses scans by entity, `find_blood(pet, recording)` the blood file whose entities
match the image's (docs/conventions.md, "Entities, scans and blood recordings").

The implementation is split into `entities` (BIDS names: parse, filter, match), `study` (units,
`BidsError`, `Study`, NIfTI loading, small parsers), `read` (readers), `plausibility` (FDG
bounds), `write` (writers) and `truth` (simulator ground truth); every public name is re-exported
here.
"""

from kinetix.data.bids import derivatives
from kinetix.data.bids.entities import (
    ENTITY_ORDER,
    BidsName,
    format_name,
    parse_entities,
    parse_name,
)
from kinetix.data.bids.plausibility import ImplausibleError, ki_problems
from kinetix.data.bids.read import (
    BLOOD_COVER_RTOL,
    DEFAULT_RECORDING,
    MAX_BODY_WEIGHT_KG,
    MAX_FRAME_START_S,
    MAX_SCAN_S,
    find_blood,
    find_subjects,
    read_participants,
    read_subject,
)
from kinetix.data.bids.study import (
    DOSE_UNITS,
    HALF_LIFE_MIN,
    IMAGE_UNITS,
    BidsError,
    Study,
    load_nifti,
    open_nifti,
)
from kinetix.data.bids.truth import read_truth, truth_paths, write_truth
from kinetix.data.bids.write import (
    check_writable_dir,
    cut_scan,
    write_dataset_description,
    write_map,
    write_participants,
    write_subject,
)

__all__ = [
    "BLOOD_COVER_RTOL",
    "DEFAULT_RECORDING",
    "DOSE_UNITS",
    "ENTITY_ORDER",
    "HALF_LIFE_MIN",
    "IMAGE_UNITS",
    "MAX_BODY_WEIGHT_KG",
    "MAX_FRAME_START_S",
    "MAX_SCAN_S",
    "BidsError",
    "BidsName",
    "ImplausibleError",
    "Study",
    "check_writable_dir",
    "derivatives",
    "cut_scan",
    "find_blood",
    "find_subjects",
    "format_name",
    "ki_problems",
    "load_nifti",
    "open_nifti",
    "parse_entities",
    "parse_name",
    "read_participants",
    "read_subject",
    "read_truth",
    "truth_paths",
    "write_dataset_description",
    "write_map",
    "write_participants",
    "write_subject",
    "write_truth",
]
