"""The run lock of a preprocess output directory: one run writes there at a time.

``OUT/.seqpack.lock`` is held with ``flock`` for the whole run by the driver process (the one
that calls :func:`seqpack.preprocess.preprocess`; with ``--engine ray`` too: Ray tasks only write
shards and markers of the tasks the driver handed out). The file's content says who holds it:
``{"host", "pid", "fingerprint", "mode", "started"}``.

- Another run with a **different** fingerprint (config, inputs or tokenizer) is refused at once
  with a :class:`LockError` naming the holder.
- A run with the **same** fingerprint waits for the holder (up to ``timeout`` seconds, then is
  refused): it never interleaves with it, and finds the finished work when it gets the lock.
- ``--only-task`` runs (one Slurm array job each) hold the lock *shared*: jobs of the same run
  work side by side, a full run or another config waits or is refused as above.
- A lock whose holder died (the kernel drops ``flock`` locks of a dead process, so the file is
  free but still names it) is **stale**: it is taken over and reported with a warning naming the
  dead holder.

``OUT/.seqpack.lock.guard`` (held a moment, exclusively) makes "check the holder, take the lock,
write who holds it" one step, so two runs never both see a free directory. ``flock`` works on
local disks and on NFS (Linux emulates it with POSIX locks there); object stores need another
lock and are not handled here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from seqpack.preprocess.config import PreprocessError

LOCK_NAME = ".seqpack.lock"
GUARD_NAME = ".seqpack.lock.guard"
POLL_S = 0.2


class LockError(PreprocessError):
    """The output directory is locked by another run (the message names it and what to do)."""


class StaleLockWarning(UserWarning):
    """A run lock of a process that died was found and taken over."""


def _try_flock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 1 << 16):
        raw += chunk
    try:
        obj = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        return {"unreadable": raw[:80].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
    data = json.dumps(holder, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def describe(holder: dict) -> str:
    """``pid 123 on host h (since 2026-12-02 14:00:00 UTC, exclusive)`` for messages."""
    if not holder:
        return "an unknown process"
    if "unreadable" in holder:
        return f"an unknown process (lock content {holder['unreadable']!r})"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since}, {holder.get('mode')})"


def fault_delay(point: str) -> None:
    """Sleep ``$SEQPACK_TEST_DELAY_<POINT>`` seconds if set: tests widen race windows with it (e.g.
    ``RUN_MARKER``, between reading and writing the run marker; ``TASK``, at the start of a task)."""
    delay = os.environ.get(f"SEQPACK_TEST_DELAY_{point}")
    if delay:
        time.sleep(float(delay))


class RunLock:
    """The held lock of one run; :meth:`release` (or leaving :func:`run_lock`) frees it."""

    def __init__(self, out_dir: str, fd: int, holder: dict, stale: dict | None):
        self.out_dir, self.fd, self.holder, self.stale = out_dir, fd, holder, stale

    def release(self) -> None:
        if self.fd < 0:
            return
        with _guard(self.out_dir):
            # the last holder clears the content, so the next run sees a free, non-stale lock
            if _try_flock(self.fd, fcntl.LOCK_EX):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


@contextmanager
def _guard(out_dir: str) -> Iterator[None]:
    fd = os.open(os.path.join(out_dir, GUARD_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def acquire(out_dir: str, fingerprint: str, *, shared: bool = False, timeout: float = 3600.0) -> RunLock:
    """Take the run lock of ``out_dir`` (created if missing) for a run of ``fingerprint``.

    Args:
        shared: an ``--only-task`` run (jobs of one run may hold the lock together).
        timeout: seconds a run of the same fingerprint waits for the holder before giving up.

    Raises:
        LockError: held by a run of another fingerprint, or still held after ``timeout``.
    """
    os.makedirs(out_dir, exist_ok=True)
    mode = "shared" if shared else "exclusive"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "fingerprint": fingerprint, "mode": mode}
    fd = os.open(os.path.join(out_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    deadline, told = time.monotonic() + timeout, False
    try:
        while True:
            with _guard(out_dir):
                holder = _read_holder(fd)
                if _try_flock(fd, fcntl.LOCK_EX):
                    # nobody holds it: any content left is a stale lock of a process that died
                    stale = holder if holder else None
                    if shared:
                        fcntl.flock(fd, fcntl.LOCK_SH)  # nobody can slip in: acquirers hold the guard
                    _write_holder(fd, dict(me, started=time.time()))
                    lock = RunLock(out_dir, fd, me, stale)
                    break
                same = holder.get("fingerprint") == fingerprint
                if same and shared and holder.get("mode") == "shared" and _try_flock(fd, fcntl.LOCK_SH):
                    lock = RunLock(out_dir, fd, me, None)
                    break
            if not same:
                raise LockError(
                    f"{out_dir} is being written by another preprocess run with a different config, "
                    f"inputs or tokenizer ({describe(holder)}); refusing to write there: wait for it to "
                    "finish, stop it, or choose another --output directory"
                )
            if time.monotonic() > deadline:
                raise LockError(
                    f"{out_dir} is still locked by a run of the same config ({describe(holder)}) after "
                    f"{timeout:.0f} s; refusing to interleave with it"
                )
            if not told:
                print(
                    f"seqpack preprocess: {out_dir} is being written by a run of the same config "
                    f"({describe(holder)}); waiting for it to finish",
                    file=sys.stderr,
                )
                told = True
            time.sleep(POLL_S)
    except BaseException:
        os.close(fd)
        raise
    if lock.stale:
        warnings.warn(
            f"{out_dir}: took over the stale run lock of {describe(lock.stale)}, which is no longer "
            "running (killed or crashed); its finished tasks and windows are reused",
            StaleLockWarning,
            stacklevel=3,
        )
    return lock


@contextmanager
def run_lock(
    out_dir: str, fingerprint: str, *, shared: bool = False, timeout: float = 3600.0
) -> Iterator[RunLock]:
    """:func:`acquire` for the duration of a ``with`` block."""
    lock = acquire(out_dir, fingerprint, shared=shared, timeout=timeout)
    try:
        yield lock
    finally:
        lock.release()
