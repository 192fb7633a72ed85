"""grain datasets of slices: `slice_dataset` (training) and `eval_batches` (evaluation).

See `kinetix.data.pipeline` for the batch layout.
"""

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from kinetix.data.pipeline.batch import stack_examples
from kinetix.data.pipeline.cohort import Cohort
from kinetix.data.pipeline.curves import DEFAULT_INPUT_POINTS, DEFAULT_MASK_THRESHOLD


# ------------------------------------------------------------------------------------------------
# grain pipeline
# ------------------------------------------------------------------------------------------------
class _LoadSlice(grain.transforms.Map):
    """(subject index, z) -> example dict (picklable, for grain worker processes)."""

    def __init__(self, cohort: Cohort, input_points: int, mask_threshold: float):
        self.cohort = cohort
        self.input_points = input_points
        self.mask_threshold = mask_threshold

    def map(self, element):
        i, z = element
        return self.cohort.slice(
            self.cohort.subjects[i],
            z,
            input_points=self.input_points,
            mask_threshold=self.mask_threshold,
        )


def _check_common(batch_size, input_points, mask_threshold) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if int(input_points) != input_points or input_points < 2:
        raise ValueError(f"input_points must be an integer >= 2, got {input_points}.")
    if not mask_threshold >= 0:
        raise ValueError(f"mask_threshold must be >= 0, got {mask_threshold}.")


def _check_shard(shard_index, shard_count) -> None:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index must be in [0, shard_count) with shard_count >= 1, got "
            f"shard_index={shard_index}, shard_count={shard_count}."
        )


def slice_dataset(
    cohort: Cohort,
    subjects: Sequence[str],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    input_points: int = DEFAULT_INPUT_POINTS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    prefetch: int = 2,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable iterator of training batches over all slices of `subjects`.

    Pipeline (grain `MapDataset`, so every step is a pure function of the index)::

        records (subject, z), subjects sorted by cohort index
        -> shuffle(seed)               a new permutation every epoch (seed + epoch)
        -> map(Cohort.slice) -> batch(batch_size, drop_remainder=True)   local-size blocks
        -> [shard_index : m - m % shard_count : shard_count]   block k·S + shard_index
        -> repeat(num_epochs)

    With S = shard_count processes and local batch B, global batch k (B·S examples) is the
    k-th run of B·S consecutive records of the shuffled stream, and process i takes its i-th
    block of B. Concatenating the processes' batches in process order therefore gives exactly
    the batch a single process with `batch_size` B·S reads: the data order does not depend on
    the process count. Each epoch visits every record at most once; the incomplete global
    batch at the end of each epoch is dropped (fixed shapes), so every process yields the same
    number of batches.

    Args:
      cohort: the `Cohort`.
      subjects: subject names (order does not matter).
      batch_size: examples per batch on this process (B).
      seed: shuffle seed, in [0, 2**32); the same seed gives the same sequence.
      shuffle: False keeps the (subject, z) order (every epoch the same).
      num_epochs: epochs to iterate; None repeats forever.
      shard_index: this process's shard (`jax.process_index()`).
      shard_count: number of shards (`jax.process_count()`).
      input_points: samples per input curve (K).
      mask_threshold: body-mask threshold (`body_mask`).
      prefetch: batches read ahead by background threads (0: read in the calling thread).
      worker_count: grain worker processes (0: none; `mp_prefetch` otherwise). Needs absl
        flags parsed (true under `absl.app.run`); the cohort is pickled into each worker, so a
        lazy cohort's cache is per worker.

    Returns:
      A `grain.DatasetIterator` of batch dicts (module docstring) with `get_state()` /
      `set_state(state)` (a JSON-able dict), checkpointed by
      `kinetix.training.checkpoint.Checkpointer`. Restoring needs the same `shard_count` and
      pipeline arguments. Call `close()` on it when done (it stops prefetch threads and worker
      processes).
    """
    _check_common(batch_size, input_points, mask_threshold)
    if isinstance(subjects, str):
        raise ValueError("subjects must be a list of subject names, not one string.")
    subjects = sorted(set(subjects), key=lambda s: cohort.index(s))
    _check_shard(shard_index, shard_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    if prefetch < 0 or worker_count < 0:
        raise ValueError(
            f"prefetch and worker_count must be >= 0, got {prefetch} and {worker_count}."
        )
    records = cohort.records(subjects)
    if not records:
        raise ValueError("The subjects given have no slices.")
    per_shard = len(records) // shard_count
    if per_shard < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {per_shard} slices per shard "
            f"({len(records)} slices over {shard_count} shards); no full batch can be made."
        )
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.map(_LoadSlice(cohort, int(input_points), float(mask_threshold)))
    ds = ds.batch(int(batch_size), drop_remainder=True)  # lazy: only this shard's are read
    n_global = len(ds) // shard_count  # complete global batches per epoch
    ds = ds[shard_index : n_global * shard_count : shard_count]
    ds = ds.repeat(num_epochs)
    read = grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    ids = ds.to_iter_dataset(read)
    if worker_count > 0:
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ids)


def eval_batches(
    cohort: Cohort,
    subjects: Sequence[str],
    batch_size: int,
    *,
    input_points: int = DEFAULT_INPUT_POINTS,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict]:
    """Every slice of `subjects` once, in order (subject as given, then z), in fixed-size batches.

    The last batch is padded to `batch_size` with copies of its last example whose `valid` is
    0; weight per-example metrics by `valid`. Subjects are read one after another, so the LRU
    cache decodes each study once.

    With `shard_count` = S > 1 (one shard per process), the slices go in global batches of
    S × `batch_size`, and shard i yields only block i of each (`batch_size` slices, process 0's
    first, as `training.shard_batch` assembles them), reading only its own slices. Every shard
    yields as many batches; a block past the last slice is all padding (copies of the global
    batch's first slice, `valid` 0).

    Args:
      cohort: the `Cohort`.
      subjects: subject names, in the order wanted.
      batch_size: examples per batch (B), per shard.
      input_points: samples per input curve (K).
      mask_threshold: body-mask threshold.
      shard_index, shard_count: this process's shard and the number of shards.

    Yields:
      Batch dicts as `slice_dataset` yields, `valid` [B] f32 marking real examples.
    """
    _check_common(batch_size, input_points, mask_threshold)
    _check_shard(shard_index, shard_count)
    records = cohort.records(subjects)  # validates before the first yield
    if not records:
        raise ValueError("The subjects given have no slices.")
    return _eval_generator(
        cohort,
        records,
        int(batch_size),
        int(input_points),
        mask_threshold,
        int(shard_index),
        int(shard_count),
    )


def _eval_generator(cohort, records, batch_size, input_points, mask_threshold, index, count):
    def read(record):
        i, z = record
        return cohort.slice(
            cohort.subjects[i], z, input_points=input_points, mask_threshold=mask_threshold
        )

    for start in range(0, len(records), batch_size * count):
        first = start + index * batch_size
        examples = [read(r) for r in records[first : first + batch_size]]
        n_real = len(examples)
        if n_real < batch_size:
            template = examples[-1] if examples else read(records[start])
            pad = dict(template, valid=np.float32(0.0))
            examples.extend([pad] * (batch_size - n_real))
        yield stack_examples(examples)
