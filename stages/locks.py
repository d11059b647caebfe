"""Exclusive locks: one run of a job, one process per stage folder; a dead holder's lock is taken over."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from pathlib import Path

from stages.contract import JobFileError


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str):
    """Hold an flock on `lock_path` (written with our pid) or fail naming the holder's pid.
    The kernel drops the lock when its process dies, so a lock left by a killed run is taken over."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)  # without touching the file: the holder's pid stays readable
        raise JobFileError(
            f"{what} is already running (pid {holder}, lock {lock_path}); wait for it to finish "
            f"or stop it, then run again"
        ) from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            logging.getLogger(__name__).info("taking over the lock left by pid %s (no longer running)", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
