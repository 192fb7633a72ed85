"""Parametric maps on arrays: batched and volume Patlak, volume 2TCM fits, body-mask rules.

Pure functions on top of `kinetix.kinetics` (NumPy and JAX; no I/O, no network). The training
loss, the evaluation, `kinetix.predict` and `kinetix.parametric` all compute Patlak and body
masks here.
"""

from kinetix.maps.fit import (
    DEFAULT_FIT_CHUNK,
    DEFAULT_WEIGHTS,
    MAP_KEYS,
    fitted_frames,
    volume_fit,
)
from kinetix.maps.mask import (
    MASK_PERCENTILE,
    MASK_RULE_DESCRIPTIONS,
    MASK_RULES,
    ROBUST_MAX_PERCENTILE,
    filled_mask,
    mean_image,
    reference_level,
    threshold_mask,
    time_average,
    volume_mask,
)
from kinetix.maps.patlak import (
    DEFAULT_CHUNK_VOXELS,
    batch_patlak,
    chunk_size,
    expand_batch,
    fit_frames,
    patlak_coordinates,
    patlak_y,
    splice,
    volume_patlak,
    warm_up,
)

__all__ = [
    "DEFAULT_CHUNK_VOXELS",
    "DEFAULT_FIT_CHUNK",
    "DEFAULT_WEIGHTS",
    "MAP_KEYS",
    "fitted_frames",
    "volume_fit",
    "MASK_PERCENTILE",
    "MASK_RULE_DESCRIPTIONS",
    "MASK_RULES",
    "ROBUST_MAX_PERCENTILE",
    "batch_patlak",
    "chunk_size",
    "expand_batch",
    "filled_mask",
    "fit_frames",
    "mean_image",
    "patlak_coordinates",
    "patlak_y",
    "splice",
    "reference_level",
    "threshold_mask",
    "time_average",
    "volume_mask",
    "volume_patlak",
    "warm_up",
]
