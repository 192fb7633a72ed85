"""Checkpoints: a thin wrapper over Orbax's `CheckpointManager` (train state + grain iterator).

One checkpoint per saved step under ``directory/<step>/`` with two items:

* ``state``: any pytree of `jax.Array` (params, optimizer state, step, RNG key), written by
  `ocp.args.StandardSave` (async by default) and always restored into an abstract target
  (`ocp.args.StandardRestore`) that carries each leaf's shape, dtype and sharding, so a restored
  array lands directly on the devices and layout the caller asks for.
* ``data``: the grain `DatasetIterator` state (`grain.checkpoint.CheckpointSave`), one small JSON
  file per process (``process_<i>-of-<n>.json``). It is written synchronously while `save` runs,
  so it records exactly the batches consumed so far, and it can only be restored with the same
  process count (and the same pipeline arguments).
* ``settings`` (optional): a small JSON dict of what using the state correctly depends on
  (`kinetix.training.rerun.checkpoint_settings`), read back by `settings`.

A checkpoint that cannot be read (a missing array file or metadata, a truncated file) raises
`DamagedCheckpoint`; `restore_latest` then falls back to the newest intact checkpoint, saying
so, and can move the damaged one aside (``damaged-<step>``) so that training can write that
step again.

Usage (the training loop)::

    with Checkpointer(workdir / "checkpoints", save_interval_steps=500) as ckpt:
        restored = ckpt.restore_latest(jax.eval_shape(init_state), data_iterator=it)
        step, state = restored if restored else (0, init_state())
        for step in range(step + 1, num_steps + 1):
            state, metrics = train_step(state, next(it))
            ckpt.save(step, state, it)
            if ckpt.reached_preemption(step):
                break
        ckpt.save(step, state, it, force=True)        # the final step, always

`save` is collective (call it on every process); `close` (or leaving the `with` block) waits for
the last async save. Async-save errors are raised by the next `save`, `wait` or `close`, never
swallowed.
"""

import gc
import pathlib
import sys
import time

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class DamagedCheckpoint(ValueError):
    """A checkpoint on disk that cannot be read (files missing or damaged)."""


def _first_line(err: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _is_abandoned_read(unraisable) -> bool:
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _discard_abandoned_reads() -> None:
    """Collects the shard reads Orbax leaves pending when one read of a restore fails.

    Orbax reads a checkpoint's shards as concurrent coroutines; when one read fails, the others
    are abandoned and each prints an "Exception ignored in <coroutine>" traceback whenever the
    garbage collector reaches it, at some unrelated later moment. The failure has already been
    reported as `DamagedCheckpoint`, so they are collected now and those reports dropped; any
    other unraisable exception still reaches the previous hook.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _abstract_leaf(x):
    """A restore target leaf: ShapeDtypeStruct with the array's sharding (other leaves as is)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray | np.generic):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _plain_path(path) -> str:
    """A key path as `['a']['0']['count']` whatever the containers were (dicts, sequences,
    named tuples, dataclasses), so saved metadata (plain dicts) and live state compare."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(f"['{name}']")
    return "".join(parts)


def _describe_mismatch(saved, target) -> str | None:
    """First difference in tree structure, shape or dtype between saved metadata and target."""
    saved_keys = {_plain_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    target_keys = {_plain_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing = sorted(set(target_keys) - set(saved_keys))
    if missing:
        return f"the checkpoint has no {missing[0]} (and {len(missing) - 1} more)"
    extra = sorted(set(saved_keys) - set(target_keys))
    if extra:
        return f"the checkpoint has {extra[0]} that the target lacks ({len(extra)} in all)"
    for key, t in target_keys.items():
        s = saved_keys[key]
        s_shape, t_shape = getattr(s, "shape", None), getattr(t, "shape", None)
        if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
            return f"{key} has shape {tuple(s_shape)} in the checkpoint but {tuple(t_shape)} here"
    return None


def has_checkpoint(directory) -> bool:
    """Whether ``directory`` (a run's ``checkpoints/``) holds at least one saved step."""
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Checkpointer:
    """Saves and restores (train state, data iterator) with Orbax's `CheckpointManager`.

    Args:
      directory: where step directories go (created if missing), e.g. ``workdir/checkpoints``.
      save_interval_steps: `save` writes at multiples of this, plus (Orbax's default policy)
        the first `save` call of a run with no checkpoint yet and any step at which a
        preemption was signalled; `force=True` writes regardless.
      keep: the newest `keep` checkpoints are preserved (`LatestN`); older ones are deleted.
      keep_steps: steps whose checkpoints are also kept for good (`CustomSteps`), e.g. the
        points of a learning curve to evaluate later (`kinetix.evaluate --step`); `save`
        writes at these steps even off the interval.
      async_save: write array data in a background thread (`save` returns once the arrays are
        copied to host memory).
      with_data: also checkpoint a grain iterator (item ``data``).
    """

    def __init__(
        self,
        directory,
        *,
        save_interval_steps: int,
        keep: int = 3,
        keep_steps=(),
        async_save: bool = True,
        with_data: bool = True,
    ):
        if int(save_interval_steps) != save_interval_steps or save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps must be a positive integer, got {save_interval_steps}."
            )
        if int(keep) != keep or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep}.")
        steps = tuple(keep_steps or ())
        if any(int(k) != k or k < 1 for k in steps):
            raise ValueError(f"keep_steps must be positive integers, got {steps}.")
        self.keep_steps = frozenset(int(k) for k in steps)
        policy = ocp.checkpoint_managers.LatestN(int(keep))
        if self.keep_steps:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.CustomSteps(sorted(self.keep_steps))]
            )
        self.directory = pathlib.Path(directory).absolute()
        self.with_data = bool(with_data)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=int(save_interval_steps),
            preservation_policy=policy,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        # Handlers are named up front (not inferred at the first save/restore), so that a fresh
        # manager can read a saved checkpoint's metadata and refuse a mismatched restore with a
        # clear sentence instead of Orbax's error deep inside the restore.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "settings": ocp.JsonCheckpointHandler(),
        }
        if self.with_data:
            handlers["data"] = grain.checkpoint.CheckpointHandler()
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (interval, a kept step, or preemption)."""
        return step in self.keep_steps or self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True when the job was told to stop (e.g. a preemption notice); save, wait, exit."""
        return self._manager.reached_preemption(step)

    # -- save / restore --------------------------------------------------------------------------
    def save(
        self, step: int, state, data_iterator=None, force: bool = False, settings=None
    ) -> bool:
        """Saves `state` (and the iterator's position) at `step` if due; collective.

        Args:
          step: the training step the state is at (after `step` updates).
          state: pytree of `jax.Array` (sharded or not).
          data_iterator: the grain `DatasetIterator` feeding training; required when the
            checkpointer was made `with_data=True`.
          force: save even if `step` is not a multiple of `save_interval_steps` (use it for the
            final step); implied at `keep_steps`. An existing checkpoint at `step` is never
            overwritten.
          settings: a JSON-serialisable dict stored beside the state (`settings` reads it).

        Returns:
          True if a checkpoint was started (it finishes in the background when async).

        Raises:
          ValueError: if a data iterator is missing or given when not configured.
          Exception: any error of a previous async save (surfaced here, not swallowed).
        """
        if self.with_data and data_iterator is None:
            raise ValueError(
                "save needs data_iterator: this Checkpointer was made with with_data=True."
            )
        if not self.with_data and data_iterator is not None:
            raise ValueError("save got a data_iterator but the Checkpointer has with_data=False.")
        self._manager.check_for_errors()
        force = force or int(step) in self.keep_steps
        if force and step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if self.with_data:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if settings is not None:
            items["settings"] = ocp.args.JsonSave(settings)
        return bool(self._manager.save(int(step), args=ocp.args.Composite(**items), force=force))

    def restore_latest(self, abstract_state, data_iterator=None, move_damaged: bool = False):
        """Restores the newest intact checkpoint into `abstract_state`'s shapes, dtypes and
        shardings; see `restore` for the arguments and errors.

        A damaged checkpoint (`DamagedCheckpoint`) is skipped with a warning for the next older
        one; with ``move_damaged`` it is renamed ``damaged-<step>`` (kept for inspection, no
        longer a checkpoint), so that a resumed run can save that step again.

        Returns:
          (step, state), or None when the directory holds no (intact) checkpoint.

        Raises:
          DamagedCheckpoint: every checkpoint on disk is damaged.
        """
        self.wait()
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except DamagedCheckpoint as err:
                older = [s for s in steps if s < step]
                logging.warning(
                    "%s%s",
                    str(err).rstrip("."),
                    f"; falling back to step {older[-1]}" if older else "; no older checkpoint",
                )
                if move_damaged:
                    self._move_aside(step)
        if steps:
            raise DamagedCheckpoint(
                f"every checkpoint in {self.directory} (steps {', '.join(map(str, steps))}) is "
                "damaged: start a new workdir or restore the files."
            )
        return None

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"damaged-{step}"
        if dst.exists():
            dst = self.directory / f"damaged-{step}-{int(time.time())}"
        src.rename(dst)
        self._manager.reload()
        logging.warning("Moved the damaged checkpoint %s to %s.", src, dst)

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints of steps after ``step`` (e.g. after a divergence); returns
        the steps deleted."""
        self.wait()
        gone = [s for s in self.all_steps() if s > step]
        for s in gone:
            self._manager.delete(s)
        return gone

    def settings(self, step: int) -> dict | None:
        """The settings dict saved with the checkpoint of ``step``; None if it has none.

        Raises:
          DamagedCheckpoint: the settings file is there but unreadable.
        """
        if not (self.directory / str(step) / "settings").is_dir():
            return None
        try:
            restored = self._manager.restore(
                int(step), args=ocp.args.Composite(settings=ocp.args.JsonRestore())
            )
        except Exception as err:  # noqa: BLE001 - any read failure means a damaged file
            raise self._damaged(step, _first_line(err)) from err
        return dict(restored["settings"])

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the checkpoint of `step` into `abstract_state`'s shapes, dtypes, shardings.

        Args:
          step: a step on disk (`all_steps`).
          abstract_state: the target pytree, typically `jax.eval_shape(init_fn)` with shardings
            attached (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`); concrete arrays are
            accepted and used for their shape, dtype and sharding only. Leaves without a
            sharding are restored on the default device.
          data_iterator: a freshly built grain iterator of the same pipeline; if given, its
            position is set in place to the saved one.

        Returns:
          the restored state.

        Raises:
          ValueError: if there is no checkpoint at `step` (the sentence lists those there are),
            if it does not match the target (another model or config), or if it has no iterator
            state when `data_iterator` is given.
          DamagedCheckpoint: its files cannot be read (missing or damaged).
        """
        self.wait()
        steps = self.all_steps()
        if int(step) not in steps:
            raise ValueError(
                f"{self.directory} has no checkpoint at step {step}; it has "
                f"{', '.join(map(str, steps)) if steps else 'none'}."
            )
        step = int(step)
        target = jax.tree.map(_abstract_leaf, abstract_state)
        where = self.directory / str(step)
        try:
            saved = self._manager.item_metadata(step)
            tree = saved["state"] if "state" in saved else None
        except Exception as err:  # noqa: BLE001 - any read failure means a damaged file
            raise self._damaged(step, _first_line(err)) from err
        if tree is None:
            raise self._damaged(step, "its state metadata is missing")
        problem = _describe_mismatch(getattr(tree, "tree", tree), target)
        if problem is not None:
            raise ValueError(f"The checkpoint {where} does not match this model/config: {problem}.")
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").is_dir():
                raise ValueError(
                    f"The checkpoint {self.directory / str(step)} holds no data-iterator state; "
                    "restore without data_iterator or start a new workdir."
                )
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        why = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - any read failure means a damaged file
            why = _first_line(err)
        if why is not None:  # outside the handler, so that the failed read can be collected
            _discard_abandoned_reads()
            raise self._damaged(step, why)
        return restored["state"]

    def _damaged(self, step: int, why: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"The checkpoint {self.directory / str(step)} is damaged ({why}).")

    # -- lifecycle -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises their errors."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        """Waits for pending saves (raising their errors) and releases Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
