"""One run per workdir: an advisory lock held while a command writes into a run directory.

The lock is `fcntl.flock` on ``workdir/.kinetix.lock``: the kernel releases it when the holding
process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock
behind. The file records who holds it (command, process id, host, start time) for the refusal
sentence. Re-entrant within one process (the training command trains, then evaluates under the
same lock). With several JAX processes only process 0 locks (the others share its workdir).
flock works on local file systems and on NFSv4; on file systems without it the lock is skipped
with a logged warning.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket

from absl import logging

LOCK_NAME = ".kinetix.lock"

_held: dict[pathlib.Path, list] = {}  # lock path -> [fd, depth]


def _holder(path: pathlib.Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"{info.get('command', 'kinetix')} (process {info.get('pid')} on {info.get('host')}, "
        f"since {info.get('since')})"
    )


def _open(path: pathlib.Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as err:
        raise PermissionError(
            f"cannot write to the workdir {path.parent} (permission denied): choose a writable "
            "--workdir."
        ) from err


@contextlib.contextmanager
def workdir_lock(workdir, command: str = "kinetix"):
    """Holds the workdir's lock for the block; refuses if another process holds it.

    Args:
      workdir: the run directory (created if missing).
      command: who holds it, for the other process's refusal sentence.

    Raises:
      ValueError: another running process holds the lock (one sentence naming it).
      PermissionError: the workdir cannot be written (one sentence).
    """
    import jax  # the process index decides who locks

    if jax.process_index() != 0:
        yield
        return
    path = (pathlib.Path(workdir) / LOCK_NAME).absolute()
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"the workdir {path.parent} is in use by {_holder(path)}: wait for it to finish, "
            "or use another --workdir."
        ) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        logging.warning("%s: file locks are not supported here; the workdir is not locked.", path)
    info = {
        "command": command,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        _held.pop(path, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock
