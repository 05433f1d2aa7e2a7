"""One training job per workdir: an advisory lock (fcntl.flock) on <workdir>/train.lock.

    with workdir_lock.hold(workdir):   # WorkdirInUse (one line naming the holder) if another job holds it
        ...train...
    holder(workdir) -> 'pid 4121 on host node07, since 2026-12-06 22:45:14' or None (not held)

flock, not a pid file: the kernel releases the lock when its holder dies, however it dies (kill -9, out of
memory), so a crashed run never blocks its rerun, where a pid file would outlive it and need a guess at
whether its pid is still the same job. The file holds the holder's description, for the refusal line; it is
removed when the holder ends normally.

A multi-process job locks once, from process 0, and tells the others through jax.distributed's key-value
store whether it got the lock: the job's own processes never refuse each other, and every process of a
refused job ends with the same line. Only training takes the lock: --mode=eval and --mode=sample read
checkpoints and write their own folders, and sampling a run while it trains is a use, not a conflict.

Not locked (logged): a bucket (gs://...: no file locks) and a file system without flock (some network
file systems): there nothing stops a second job.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import sys
import time

from absl import logging

from ddlm import distributed, paths
from ddlm.sharding import ConfigError

LOCK_FILE = "train.lock"
_TRIES, _RETRY_S = 5, 0.1  # a held lock is tried this often, this far apart, before the job is refused


class WorkdirInUse(ConfigError):
    """Another live training job holds the workdir; the message is one line naming it and its holder."""


def _describe_this_process(count: int) -> str:
    since = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    job = f", process 0 of {count}" if count > 1 else ""
    return f"pid {os.getpid()} on host {socket.gethostname()}{job}, since {since}"


def _refusal(workdir: str, holder: str | None) -> WorkdirInUse:
    return WorkdirInUse(
        f"--workdir {workdir} is in use by another training job ({holder or 'holder unknown'}): wait for it "
        "to end or stop it, or train in another --workdir"
    )


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _lock(workdir: str, count: int) -> int | None:
    """The descriptor holding the lock of local `workdir` (which exists), or None where the file system
    has no flock; raises WorkdirInUse if another process holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    busy = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            busy += 1
            if busy < _TRIES:  # a look from `holder()` holds it for an instant; a job holds it for hours
                time.sleep(_RETRY_S)
                continue
            raise _refusal(workdir, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                logging.warning("%s: no file locks here (%s): a second training job is not refused.", path, e)
                return None
            raise
        # The previous holder removes the file as it ends: if it did so between our open and our flock, we
        # locked a file nobody else can find. Lock the one at `path` instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, (_describe_this_process(count) + "\n").encode())
            return fd
        os.close(fd)


def _unlock(workdir: str, fd: int) -> None:
    with contextlib.suppress(OSError):  # removed while still locked: a newcomer then retries (see _lock)
        os.unlink(os.path.join(workdir, LOCK_FILE))
    os.close(fd)


def _job() -> tuple[int, int]:
    """(process index, process count): (0, 1) unless jax.distributed was initialised (without starting
    jax's backends for a process that has not)."""
    if "jax" not in sys.modules:
        return 0, 1
    import jax
    from jax._src import distributed as jax_distributed

    if jax_distributed.global_state.client is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


_answers = 0  # answers asked for so far in this process: each gets its own key


def _agree(workdir: str, index: int, count: int) -> int | None:
    """Process 0 locks and publishes the outcome; the others read it. Returns process 0's descriptor."""
    global _answers
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    _answers += 1
    key = f"ddlm/workdir_lock/{_answers}"
    if index != 0:  # process 0 did the same work before this point: it answers soon
        timeout = distributed.collective_timeout()
        try:
            answer = client.blocking_key_value_get(key, timeout * 1000)
        except RuntimeError:  # jax.errors.JaxRuntimeError: DEADLINE_EXCEEDED
            raise distributed.CollectiveTimeout(
                f"process 0 did not say within --collective_timeout={timeout}s whether it holds the lock of "
                f"{workdir} (slower, stuck or dead: see its output)"
            ) from None
        verdict, _, message = answer.partition(":")
        if verdict == "refused":
            raise WorkdirInUse(message)
        if verdict == "failed":  # process 0 reports the error itself
            raise RuntimeError(f"process 0 could not lock {workdir}: {message}")
        return None
    try:
        fd = _lock(workdir, count)
    except WorkdirInUse as e:
        client.key_value_set(key, f"refused:{e}")
        raise
    except BaseException as e:
        client.key_value_set(key, f"failed:{e!r}")
        raise
    client.key_value_set(key, "ok:")
    return fd


@contextlib.contextmanager
def hold(workdir: str):
    """Holds the training lock of `workdir` (a local path, created before) for the `with` block; raises
    WorkdirInUse before anything is written if another job holds it."""
    workdir = paths.resolve(workdir)
    if paths.is_remote(workdir):
        logging.info("%s: a bucket has no file locks: a second training job is not refused.", workdir)
        yield
        return
    index, count = _job()
    fd = _lock(workdir, count) if count == 1 else _agree(workdir, index, count)
    try:
        yield
    finally:
        if fd is not None:
            _unlock(workdir, fd)


def holder(workdir: str) -> str | None:
    """The description of the process that holds the lock of local `workdir`, or None if nobody does
    (for the instant it looks, it holds a shared lock: a job starting then tries again, see _TRIES)."""
    path = os.path.join(paths.resolve(workdir), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd) or "holder unknown"
    finally:
        os.close(fd)  # also releases the shared lock taken when nobody held it
    return None
