"""One writer per run directory: an exclusive lock file ``RUN/.lock`` holding the writer's pid, host and start.

The lock is an ``fcntl.flock`` on that file, held for the whole run: the kernel releases it when the process
ends in any way (``kill -9`` included), so a lock left by a dead writer is recognised as stale and taken over
(with a note naming it).  A second writer fails at once with :class:`RunLockedError`, naming the process that
holds the directory.  Where ``flock`` is not available (some network filesystems), the pid recorded in the
file is checked instead when it was written on this host.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]

LOCK_NAME = ".lock"


def _fcntl() -> types.ModuleType | None:
    """``fcntl`` (advisory file locks) on POSIX; None elsewhere."""
    try:
        return importlib.import_module("fcntl")
    except ImportError:  # pragma: no cover - non-POSIX
        return None


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    cmd = info.get("argv")
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {when}"
        + (f": {' '.join(cmd)[:200]}" if isinstance(cmd, list) else "")
        + ")"
    )


class RunLock:
    """``with RunLock(run_dir): ...`` — hold ``run_dir/.lock`` exclusively (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict | None = None  # the record of a dead writer's lock this one took over

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        fcntl = _fcntl()
        for _ in range(20):  # retry if the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                            raise
                        raise RunLockedError(self._busy_message(self._read())) from None
                st, cur = os.fstat(fd), None
                try:
                    cur = os.stat(self.path)
                except FileNotFoundError:
                    pass
                if cur is None or (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
                    os.close(fd)  # the holder released and unlinked it meanwhile: lock the new file
                    continue
                prev = self._read()
                if prev.get("pid") and prev.get("pid") != os.getpid():
                    if fcntl is None and prev.get("host") == socket.gethostname() and _pid_alive(int(prev["pid"])):
                        raise RunLockedError(self._busy_message(prev))
                    self.stale = prev
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.time(),
                    "argv": list(sys.argv),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                os.fsync(fd)
                self.fd = fd
                return self
            except BaseException:
                if self.fd != fd:
                    os.close(fd)
                raise
        raise RunLockedError(f"could not lock {self.path}: it keeps being replaced by another process")

    def _busy_message(self, info: dict) -> str:
        return (
            f"run directory {self.dir} is in use by another layerwise process: {_describe(info)}. "
            f"Wait for it to finish or stop it; use another --out for a separate run. (If that process "
            f"is gone and this is a network filesystem without locks, delete {self.path}.)"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: a waiter re-checks the inode
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, ctx=None) -> RunLock | None:
    """Rank 0 locks ``run_dir`` (creating it); every rank of a process group learns the outcome, so a refused
    lock ends all ranks at once with the same message.  Returns the held lock on rank 0, else ``None``."""
    lock, err = None, ""
    if ctx is None or ctx.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            err = str(e)
        if lock is not None and lock.stale:
            import warnings

            warnings.warn(
                f"{lock.path}: took over the stale lock of a writer that is gone ({_describe(lock.stale)})",
                RuntimeWarning,
                stacklevel=2,
            )
    if ctx is not None and ctx.active and ctx.world_size > 1:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        if lock is not None:  # pragma: no cover - rank 0 holds it only when err is empty
            lock.release()
        raise RunLockedError(err)
    return lock
