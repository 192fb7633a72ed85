"""A study in, maps out: the trained network (`network`) and voxelwise Patlak (`patlak`).

`network`: restore a trained run (`restore_params`, `load_for_inference`), predict a study's late
frames, Ki and 2TCM maps (`predict_study`) and write them (`predict_to_dir`, what
`python -m kinetix.predict` does). `patlak`: Patlak Ki and V0 maps of a BIDS-PET scan
(`patlak_study`, what `python -m kinetix.parametric` does). `fit`: voxelwise 2TCM maps of a
BIDS-PET scan (`fit_study`, what `python -m kinetix.fit` does).
"""

from kinetix.inference.fit import fit_maps, fit_study
from kinetix.inference.network import (
    check_schedule,
    checkpoint_steps,
    load_for_inference,
    make_predict_fn,
    predict_study,
    predict_to_dir,
    restore_params,
    trained_schedule,
    write_outputs,
)
from kinetix.inference.patlak import output_paths, patlak_maps, patlak_study

__all__ = [
    "check_schedule",
    "checkpoint_steps",
    "fit_maps",
    "fit_study",
    "load_for_inference",
    "make_predict_fn",
    "output_paths",
    "patlak_maps",
    "patlak_study",
    "predict_study",
    "predict_to_dir",
    "restore_params",
    "trained_schedule",
    "write_outputs",
]
