"""Locks: one run of a job, one whole-stage process or many shards, one process per unit; a dead holder's lock is taken over."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from pathlib import Path

from stages.contract import JobFileError
from stages.files import sha256_bytes


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str, shared: bool = False):
    """Hold an flock on `lock_path` (written with our pid) or fail naming the holder's pid.
    The kernel drops the lock when its process dies, so a lock left by a killed run is taken over.
    `shared`: many holders at once (the shards of one stage), none while an exclusive one holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)  # without touching the file: the holder's pid stays readable
        raise JobFileError(
            f"{what} is already running (pid {holder}, lock {lock_path}); wait for it to finish "
            f"or stop it, then run again"
        ) from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()) and not shared:
            logging.getLogger(__name__).info("taking over the lock left by pid %s (no longer running)", previous)
        if not (shared and previous):  # a shared lock keeps the first holder's pid: it may be a live fellow shard's
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if not shared or os.pread(fd, 64, 0).decode(errors="replace").strip() == str(os.getpid()):
                os.ftruncate(fd, 0)
        os.close(fd)


UNIT_LOCKS = ".units.lock"


@contextlib.contextmanager
def stage_lock(job_dir: Path, stage: str, units: list | None = None):
    """What a stage process holds while it works. The whole stage (`units` None): `<stage>/.lock`,
    exclusively, as always. Some units (`--units`, a shard of the Ray executor): that lock shared,
    so shards of one stage run side by side while a whole-stage run or `orchestrate clean` is
    refused, and one byte per unit of `<stage>/.units.lock` (a POSIX record lock at an offset drawn
    from the unit's key: one file descriptor for any number of units), so no two processes ever
    make the same unit. The kernel drops them all when the process dies."""
    stage_dir = Path(job_dir) / stage
    what = f"stage {stage} of {Path(job_dir).name}"
    if units is None:
        with exclusive_lock(stage_dir / ".lock", what):
            yield
        return
    with exclusive_lock(stage_dir / ".lock", what, shared=True):
        fd = os.open(stage_dir / UNIT_LOCKS, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for unit in units:
                offset = int(sha256_bytes(unit.key.encode())[:12], 16)  # 48 bits: collisions are negligible
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                except OSError:
                    raise JobFileError(
                        f"{stage}: unit {unit.key} is being made by another process (pid {_record_lock_holder(fd, offset)}, "
                        f"lock {stage_dir / UNIT_LOCKS}); wait for it to finish or stop it, then run again"
                    ) from None
            yield
        finally:
            os.close(fd)  # releases every record lock of this file


def _record_lock_holder(fd: int, offset: int) -> str:
    """The pid holding a POSIX record lock at `offset` (F_GETLK; Linux's struct flock), or 'unknown'."""
    import struct

    if not sys.platform.startswith("linux"):  # struct flock's layout differs elsewhere
        return "unknown"
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        return str(pid) if kind != fcntl.F_UNLCK and pid > 0 else "unknown"
    except (OSError, struct.error):
        return "unknown"
