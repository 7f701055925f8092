"""One run per workdir: an exclusive flock on WORKDIR/.lock, held by process 0 for the run's life.

The kernel releases a flock when its holder exits in any way (kill -9 included), so a lock is never
stale; the file keeps the holder's host, pid and start time to name it in the error a second run gets.
flock works across machines on NFSv4 and Lustre; in a multi-process run only process 0 takes it and
every process learns whether it got it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for the block; raises WorkdirBusyError at once when
    another run holds it."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir).absolute() / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        error = ""
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirBusyError as e:
                error = str(e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            if busy and not error:
                error = f"workdir {self.path.parent} is held by another run (process 0 could not lock {self.path})"
        if error:
            raise WorkdirBusyError(error)
        return self

    def _acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']} (since {h['started']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by {who}; wait for that run to end or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
