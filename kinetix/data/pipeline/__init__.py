"""Slice-level input pipeline (grain): cohorts, subject splits, input-curve packing, batches.

Training works on 2-D axial slices ``[H, W, T]`` (H = X, W = Y of the NIfTI grid) of a cohort of
dynamic PET studies. This module turns a cohort into fixed-shape NumPy batches::

    cohort = Cohort.from_bids(root)                 # lazy, small LRU cache of decoded studies
    split = split_subjects(cohort.subjects, seed=0)   # subject-level: no slice leakage
    it = slice_dataset(cohort, split["train"], batch_size=8, seed=0)
    batch = next(it)                                   # dict of NumPy arrays, see below
    state = it.get_state(); ...; it.set_state(state)   # kinetix.training.checkpoint saves it

A batch (and `Cohort.slice`, without the leading B) holds

=============  ===============  ================================================================
key            shape, dtype     meaning
=============  ===============  ================================================================
frames         [B,H,W,T] f32    decay-corrected frames (SUV), all T frames of the schedule
mask           [B,H,W] f32      body mask (1 inside), see `body_mask`
plasma_times   [B,K] f32        input-curve sample times (min), strictly increasing
plasma         [B,K] f32        plasma input (SUV) at `plasma_times`
whole_blood    [B,K] f32        whole blood (SUV) at the same times; = plasma when not measured
subject        [B] i32          index into `cohort.subjects`
slice          [B] i32          z index of the slice
valid          [B] f32          1 for real examples, 0 for padding (`eval_batches` only)
=============  ===============  ================================================================

with K = `input_points`. Every subject's curves are brought to exactly K samples so batches have
fixed shapes: `compress_curve` (only when a subject has more than K samples) and `pad_curve`.
Padding is exact (`kk.SampledInput` holds the last value); **compression is the only
approximation in the training path**: the piecewise-linear input through the kept samples
differs from the measured one by at most the error `compress_curve` minimises. Measured for
a 1-s-sampled Feng FDG curve (3901 samples -> K = 128): 1.1e-4 of the peak, and paper-schedule
frames of typical tissues change by < 3e-4 of their maximum (tests/test_pipeline.py); the 1-s
sampling itself differs from the analytic Feng frames by ~2e-3, an order of magnitude more.

Memory: a paper-size study (256×256×71×28 float32) is ~0.5 GB decoded, ~50 GB for 103 subjects,
so `Cohort.from_bids` never loads the cohort: it reads headers and sidecars up front and decodes
studies on demand into an LRU cache (`cache_size` studies; by default as many as fit in 2 GiB,
at least 4, so a small cohort such as the demo's is decoded once). A globally shuffled slice
stream hits the cache with probability ≈ cache_size / n_subjects, so each miss re-decodes a
whole ``.nii.gz`` (seconds at paper size; a demo batch of 2 slices took 0.1–0.2 s that way,
next to a 0.9-s train step, and 2.4 ms once the cache held the whole cohort). For paper scale,
convert each study once to an uncompressed ``.npy`` and open it with
``np.load(..., mmap_mode="r")`` (a slice then costs one strided read), or raise `cache_size`
when RAM allows. (Not implemented here.)

The implementation is split into `curves` (input curves, body mask), `batch` (the one batch
builder: `input_curves`, `slice_example`, and `volume_batches`, the network input of prediction),
`cohort` (`Cohort`, `split_subjects`) and `dataset` (grain datasets and batches); every name is
re-exported here.
"""

from kinetix.data.pipeline.batch import (
    BATCH_KEYS,
    input_curves,
    slice_example,
    stack_examples,
    volume_batches,
)
from kinetix.data.pipeline.cohort import (
    DEFAULT_CACHE_SIZE,
    SCHEDULE_ATOL_MIN,
    Cohort,
    split_subjects,
)
from kinetix.data.pipeline.curves import (
    DEFAULT_INPUT_POINTS,
    DEFAULT_MASK_THRESHOLD,
    compress_curve,
    interpolation_error,
    pad_curve,
)
from kinetix.data.pipeline.dataset import eval_batches, slice_dataset
from kinetix.maps.mask import MASK_PERCENTILE, time_average
from kinetix.maps.mask import threshold_mask as body_mask

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_INPUT_POINTS",
    "DEFAULT_MASK_THRESHOLD",
    "MASK_PERCENTILE",
    "SCHEDULE_ATOL_MIN",
    "Cohort",
    "body_mask",
    "compress_curve",
    "eval_batches",
    "input_curves",
    "interpolation_error",
    "pad_curve",
    "slice_dataset",
    "slice_example",
    "split_subjects",
    "stack_examples",
    "time_average",
    "volume_batches",
]
