"""The training loop: resume, initialisation trials, steps, metrics, checkpoints.

Shape of the loop (big_vision / flax examples): the step is one jitted program over a plain
pytree state (`kinetix.training.step`); one code path for 1..N devices (a 1-D 'data' mesh,
batches sharded, parameters replicated); the host fetches metrics only on log steps
(``metrics.jsonl``, a progress bar with loss, steps/s and ETA) and stops with a clear error on
non-finite values; the workdir identifies the run: checkpoints (with the grain iterator state)
are restored on start, so rerunning the same command resumes. A rerun may change only the
settings `kinetix.training.rerun.RESUMABLE` lists; one process trains in a workdir at a time
(`kinetix.training.lock`); a damaged latest checkpoint is moved aside for the newest intact one.
The loop evaluates nothing but the validation loss: `kinetix.experiment.train_and_evaluate`
composes training and evaluation.
"""

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from kinetix.data import pipeline
from kinetix.training import checkpoint, population, provenance, rerun
from kinetix.training.cohort import build_cohort, split_cohort
from kinetix.training.config import load_config, validate_config
from kinetix.training.devices import make_mesh, shard_batch
from kinetix.training.lock import workdir_lock
from kinetix.training.state import create_train_state
from kinetix.training.step import loss_mask, make_eval_step, make_train_step


@jax.jit
def _all_finite(tree):
    """One boolean: every element of every floating leaf of ``tree`` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _diverged(ckpt, what: str, step: int, verified: int) -> FloatingPointError:
    """Discards the checkpoints not known to be finite; the error that says what to do.

    ``verified`` is the newest step whose state is known to be good (a finite loss was logged
    after it, or the run resumed from it): checkpoints after it may hold the diverging state,
    so they are deleted and the advised rerun resumes from before the divergence.
    """
    gone = ckpt.discard_after(verified)
    kept = ckpt.all_steps()
    resume = f"step {kept[-1]}" if kept else "the start (no checkpoint was kept)"
    dropped = (
        f"the checkpoints of steps {', '.join(map(str, gone))} were discarded and " if gone else ""
    )
    return FloatingPointError(
        f"non-finite {what} at step {step}: training diverged; {dropped}a rerun resumes from "
        f"{resume}. Lower config.optim.learning_rate (e.g. ten times) or set "
        "config.optim.grad_clip (e.g. 1.0), then rerun the same command with that override."
    )


def evaluate_loss(eval_step, params, cohort, subjects, config, sharding):
    """The objective's mean over every body voxel of ``subjects`` (the run's val_loss).

    Each batch's loss (`make_eval_step`: a mean over the batch's body voxels) is weighted by the
    batch's body-voxel count (`loss_mask`), so the value is the same whatever the batch size
    and the number of devices or processes (up to float32 summation order). With P processes a
    global batch holds P × ``train.eval_batch_size`` slices; every process reads and feeds only
    its own block of them (process 0's first, `pipeline.eval_batches` with shard_index /
    shard_count), so no process repeats another's reading or work, and the blocks' body-voxel
    counts are summed across processes (one all-gather at the end).
    """
    index, count = jax.process_index(), jax.process_count()
    weights, losses = [], []
    for block in pipeline.eval_batches(
        cohort,
        subjects,
        int(config.train.eval_batch_size),
        input_points=config.data.input_points,
        mask_threshold=config.data.mask_threshold,
        shard_index=index,
        shard_count=count,
    ):
        weights.append(float(np.sum(loss_mask(block))))
        # Kept on device: no host round trip per batch, so reading the next batch overlaps
        # this one's computation (fetched once, below).
        losses.append(eval_step(params, shard_batch(block, sharding))[2])
    losses = np.asarray(jax.device_get(losses), np.float64)
    weights = np.asarray(weights)  # this process's body voxels per global batch
    if count > 1:
        from jax.experimental import multihost_utils

        # Gathered as float32 (exact while a block holds < 2^24 voxels), summed in float64.
        gathered = multihost_utils.process_allgather(weights.astype(np.float32))
        weights = np.asarray(gathered, np.float64).sum(axis=0)
    if weights.sum() == 0:
        raise ValueError(
            f"The validation subjects {list(subjects)} have no body voxels (mask threshold "
            f"{config.data.mask_threshold}): there is nothing to validate on."
        )
    real = weights > 0  # an all-padding batch's loss is 0/0
    return float(np.sum(losses[real] * weights[real]) / weights.sum())


def run_init_trials(
    config, train_step, eval_step, first, make_iterator, cohort, val_subjects, shardings
):
    """Train ``config.train.init_trials`` initialisations briefly and keep the best one.

    Trial k starts from the initialisation of seed ``config.seed + k`` (trial 0 is the plain
    run's) and trains ``config.train.init_trial_steps`` steps on a fresh iterator, so every trial
    sees the same batches. The winner has the lowest loss on the validation subjects
    (`evaluate_loss`, the run's val_loss); it goes on with its own optimiser state and iterator,
    so the rest of the run is the plain run of that initialisation. Trials whose validation loss
    is not finite lose. With several processes, process 0's choice is broadcast.

    Args:
      config: the resolved config.
      train_step, eval_step: `make_train_step` / `make_eval_step` (one graphdef serves every
        seed).
      first: (state, iterator) of trial 0, the run's own fresh state (replicated) and
        untouched iterator, so that they are not built twice.
      make_iterator: () -> a fresh training iterator, for the other trials.
      cohort, val_subjects: the data and the validation subjects (at least one).
      shardings: (mesh, data sharding, replicated sharding).

    Returns:
      (state, iterator, trials): the winning state and its iterator, and one record per trial,
      {"trial", "init_seed", "steps", "loss" (its last training loss), "val_loss", "chosen"}.
    """
    mesh, data_sharding, replicated = shardings
    n, steps = int(config.train.init_trials), int(config.train.init_trial_steps)
    trials, best = [], None
    for k in range(n):
        seed = int(config.seed) + k
        if k == 0:
            state, iterator = first
        else:
            trial_config = config.copy_and_resolve_references()
            trial_config.seed = seed
            state = jax.device_put(create_train_state(trial_config)[2], replicated)
            iterator = make_iterator()
        with jax.set_mesh(mesh):
            for _ in tqdm(
                range(steps),
                desc=f"init trial {k + 1}/{n} (seed {seed})",
                disable=jax.process_index() != 0,
                dynamic_ncols=True,
                leave=False,
            ):
                state, metrics = train_step(state, shard_batch(next(iterator), data_sharding))
            val = evaluate_loss(
                eval_step, state["params"], cohort, val_subjects, config, data_sharding
            )
        record = {
            "trial": k,
            "init_seed": seed,
            "steps": steps,
            "loss": float(jax.device_get(metrics["loss"])),
            "val_loss": val,
        }
        logging.info(
            "Init trial %d/%d (seed %d): val loss %.5g", k + 1, n, record["init_seed"], val
        )
        trials.append(record)
        score = val if math.isfinite(val) else math.inf
        if best is None or score < best[0]:
            best = (score, k, state, iterator)
    chosen = best[1]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen != best[1]:
            raise RuntimeError(
                f"Process {jax.process_index()} chose init trial {best[1]} but process 0 chose "
                f"{chosen}: the validation losses differ between processes."
            )
    for record in trials:
        record["chosen"] = record["trial"] == chosen
    logging.info("Continuing init trial %d (seed %d).", chosen + 1, trials[chosen]["init_seed"])
    return best[2], best[3], trials


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves: the logged history and what an evaluation of the run needs.

    Attributes:
      history: one record per log step (the lines of ``metrics.jsonl``).
      final_step: the step the state holds (``train.num_steps``, or the preemption step).
      preempted: True when the run stopped at a preemption notice (checkpoint written).
      cohort: the `kinetix.data.pipeline.Cohort` trained on.
      splits: {"train", "val", "test"} subject lists.
      state: the train state {step, params, opt_state, rng} (replicated over the mesh).
      eval_step: `make_eval_step`'s jitted ``eval_step(params, batch)``.
    """

    history: list
    final_step: int
    preempted: bool
    cohort: pipeline.Cohort
    splits: dict
    state: dict
    eval_step: object


def train(
    config: ml_collections.ConfigDict, workdir, provenance_kw: dict | None = None
) -> TrainResult:
    """Train (resuming from workdir if it holds a checkpoint); evaluates only the validation loss.

    Args:
      config: the resolved config.
      workdir: the run directory.
      provenance_kw: passed to `provenance.write` (e.g. `config_file` and `overrides` of the
        command line, so that `provenance.command_line` can rebuild it).

    Returns:
      a `TrainResult`.

    Raises:
      ValueError: nothing to train (``num_steps`` < 1 and no checkpoint), the workdir is in use
        by another run (`kinetix.training.lock`), or it holds a run with settings this config
        changes (`kinetix.training.rerun`); all before anything is written.
      FloatingPointError: the loss or the parameters became non-finite; the checkpoints not
        known to be finite are discarded first (the advised rerun resumes before the
        divergence). No checkpoint is ever written from a non-finite state.
    """
    workdir = pathlib.Path(workdir)
    check_trainable(config, workdir)
    with workdir_lock(workdir, "kinetix.train"):
        return _train(config, workdir, int(config.train.num_steps), provenance_kw)


def check_trainable(config, workdir) -> None:
    """Refuses ``train.num_steps`` < 1 on a workdir without a checkpoint (nothing to do)."""
    num_steps = int(config.train.num_steps)
    if num_steps < 1 and not checkpoint.has_checkpoint(pathlib.Path(workdir) / "checkpoints"):
        raise ValueError(
            f"config.train.num_steps = {num_steps} and {workdir} holds no checkpoint: there is "
            "nothing to train or evaluate (num_steps = 0 only re-evaluates a trained run)."
        )


def check_resumable(config, workdir: pathlib.Path) -> None:
    """Refuses a rerun that changes the run's data, split or model (`rerun.check_rerun`) and
    logs the settings it changes that resuming allows."""
    if not (workdir / "config.json").exists():
        return
    allowed = rerun.check_rerun(load_config(workdir), config)
    if allowed:
        logging.info("Rerun with changed settings: %s", rerun.describe(allowed))


def _train(config, workdir: pathlib.Path, num_steps: int, provenance_kw) -> TrainResult:
    check_resumable(config, workdir)
    cohort = build_cohort(config, workdir)
    schedule = cohort.schedule
    validate_config(config, schedule, cohort.shape)
    splits = split_cohort(config, cohort)
    with_trials = config.train.init_trials > 1
    if with_trials and not splits["val"]:
        raise ValueError(
            "config.train.init_trials > 1 chooses an initialisation by the validation loss, but "
            "the split has no validation subjects (config.data.val_fraction / val_subjects)."
        )

    def write_run_files():
        provenance.write(workdir, config, extra={"splits": splits}, **(provenance_kw or {}))
        (workdir / "splits.json").write_text(json.dumps(splits, indent=1))
        (workdir / "schedule.json").write_text(
            json.dumps(
                {"start": schedule.start.tolist(), "end": schedule.end.tolist(), "units": "min"}
            )
        )
        # The input of 35-min scans after 35 min (late input "population").
        population.write_population(workdir, cohort, splits["train"], config.data.input_points)

    logging.info(
        "Subjects: %d train, %d val, %d test", *(len(splits[k]) for k in ("train", "val", "test"))
    )

    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    graphdef, tx, state = create_train_state(config)
    state = jax.device_put(state, replicated)
    train_step = make_train_step(graphdef, tx, config, schedule)
    eval_step = make_eval_step(graphdef, config, schedule)

    per_process = config.data.batch_size // jax.process_count()

    def make_iterator():
        return pipeline.slice_dataset(
            cohort,
            splits["train"],
            per_process,
            seed=config.seed,
            shuffle=True,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            input_points=config.data.input_points,
            mask_threshold=config.data.mask_threshold,
            prefetch=config.data.prefetch,
            worker_count=config.data.worker_count,
        )

    train_iter = make_iterator()
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        save_interval_steps=config.train.checkpoint_every_steps,
        keep=config.train.keep_checkpoints,
        keep_steps=config.train.keep_checkpoint_steps,
    )
    history = []
    settings = rerun.checkpoint_settings(config)
    try:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        restored = ckpt.restore_latest(abstract, train_iter, move_damaged=True)
        if restored is not None:
            start, state = restored
            logging.info("Resumed from step %d in %s", start, workdir)
        else:
            start = 0
        # Written after the restore, so a rerun with a mismatching model leaves the run's
        # files alone; an evaluation-only rerun (nothing left to train) keeps the training
        # run's config.json and provenance.json (they describe how the weights were made).
        if jax.process_index() == 0:
            if restored is not None and start >= num_steps:
                logging.info(
                    "Nothing to train (checkpoint at step %d, num_steps %d): evaluation only; "
                    "config.json and provenance.json of the training run are kept.",
                    start,
                    num_steps,
                )
            else:
                write_run_files()
        if restored is None and with_trials:
            state, train_iter, trials = run_init_trials(
                config,
                train_step,
                eval_step,
                (state, train_iter),
                make_iterator,
                cohort,
                splits["val"],
                (mesh, data_sharding, replicated),
            )
            if jax.process_index() == 0:
                (workdir / "init_trials.json").write_text(json.dumps(trials, indent=1))
            # A resumed run continues the winner instead of repeating the trials.
            ckpt.save(
                int(jax.device_get(state["step"])), state, train_iter, force=True, settings=settings
            )
        metrics_path = workdir / "metrics.jsonl"
        writer = open(metrics_path, "a") if jax.process_index() == 0 else None  # noqa: SIM115
        start = int(jax.device_get(state["step"]))
        bar = tqdm(
            total=num_steps,
            initial=start,
            desc=f"train {config.name}",
            disable=jax.process_index() != 0 or start >= num_steps,
            dynamic_ncols=True,
        )
        try:
            t_last, s_last = time.perf_counter(), start
            verified = start  # newest step whose state is known good (see `_diverged`)
            in_flight = None  # the previous step's metrics: one step runs while the next is fed
            with jax.set_mesh(mesh):
                for step in range(start + 1, num_steps + 1):
                    batch = shard_batch(next(train_iter), data_sharding)
                    if step == start + 1:
                        logging.info("Compiling the first step…")
                        t0 = time.perf_counter()
                    state, metrics = train_step(state, batch)
                    if step == start + 1:
                        jax.block_until_ready(state)
                        logging.info("First step took %.1f s", time.perf_counter() - t0)
                    if in_flight is not None:
                        # Count finished steps, not dispatched ones (steps run asynchronously).
                        jax.block_until_ready(in_flight)
                        bar.update(1)
                    in_flight = metrics
                    last = step == num_steps
                    if step % config.train.log_every_steps == 0 or last:
                        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        bad = [k for k, v in m.items() if not np.isfinite(v)]
                        if bad:
                            raise _diverged(ckpt, ", ".join(bad), step, verified)
                        verified = step - 1  # this step's loss came from that state
                        now = time.perf_counter()
                        m["steps_per_sec"] = (step - s_last) / max(now - t_last, 1e-9)
                        t_last, s_last = now, step
                        if step % config.train.eval_every_steps == 0 or last:
                            if splits["val"]:
                                m["val_loss"] = evaluate_loss(
                                    eval_step,
                                    state["params"],
                                    cohort,
                                    splits["val"],
                                    config,
                                    data_sharding,
                                )
                        record = {"step": step, **m}
                        history.append(record)
                        if writer:
                            writer.write(json.dumps(record) + "\n")
                            writer.flush()
                        bar.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)
                    if (last or ckpt.should_save(step)) and not _all_finite(state["params"]):
                        raise _diverged(ckpt, "parameters", step, verified)
                    ckpt.save(step, state, train_iter, force=last, settings=settings)
                    if ckpt.reached_preemption(step):
                        ckpt.wait()
                        logging.warning("Preemption at step %d: checkpoint written, exiting.", step)
                        return TrainResult(history, step, True, cohort, splits, state, eval_step)
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                    bar.update(1)
        finally:
            bar.close()
            if writer:
                writer.close()
        ckpt.wait()
    finally:
        ckpt.close()

    return TrainResult(history, num_steps, False, cohort, splits, state, eval_step)
