"""Locks: one run of a job, one whole-stage process or many shards, one process per unit; a dead holder's lock is taken over."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import filelock

from stages.contract import JobFileError

# Every lock is a `filelock.FileLock` (flock on Linux and macOS, LockFileEx on Windows), which the
# OS drops when its process dies, so a lock left by a killed run is taken over. The holder's pid is
# written beside the lock (`<lock>.pid`): on Windows the locked byte cannot be read by others.
#
# filelock has no shared lock that the OS drops with its holder, so a shared hold (a shard of a
# stage, `--units`) is built from exclusive ones: the lock file itself is a gate; a shard takes it
# for a moment, takes the first free slot `<lock>.shared-<n>.lock` and lets the gate go. An
# exclusive holder keeps the gate, then checks that no slot is held. Shards run side by side; a
# whole-stage run is refused while one runs, and shards while a whole-stage run holds the gate.
GATE_WAIT_S = 0.5  # a shard holds the gate only while it takes its slot (milliseconds)
MAX_SLOTS = 256


def _pid_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".pid")


def read_holder(lock_path: Path) -> str:
    """The pid written beside `lock_path`, or '' (none, or unreadable)."""
    try:
        return _pid_path(Path(lock_path)).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _write_holder(lock_path: Path) -> None:
    _pid_path(lock_path).write_text(str(os.getpid()), encoding="utf-8")


def _forget_holder(lock_path: Path) -> None:
    with contextlib.suppress(OSError):
        _pid_path(lock_path).unlink()


def _try_lock(path: Path, wait: float = 0.0):
    """The held FileLock on `path`, or None when another process holds it (after `wait` seconds)."""
    lock = filelock.FileLock(str(path), timeout=wait, is_singleton=False, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return None
    return lock


def _drop(lock, path: Path) -> None:
    """Release a slot or unit lock and remove its files (filelock retries a file unlinked under it)."""
    _forget_holder(path)
    with contextlib.suppress(OSError):
        path.unlink()
    lock.release()


def _busy(what: str, holder: str, lock_path: Path) -> JobFileError:
    return JobFileError(
        f"{what} is already running (pid {holder or 'unknown'}, lock {lock_path}); wait for it to finish "
        f"or stop it, then run again"
    )


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str, shared: bool = False):
    """Hold `lock_path` (our pid beside it) or fail naming the holder's pid.
    `shared`: many holders at once (the shards of one stage), none while an exclusive one holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    gate = _try_lock(lock_path, GATE_WAIT_S)
    if gate is None:
        raise _busy(what, read_holder(lock_path), lock_path) from None
    if shared:
        try:
            slot, slot_path = _take_slot(lock_path)
        finally:
            gate.release()
        if slot is None:
            raise JobFileError(f"{what}: all {MAX_SLOTS} shard slots of {lock_path} are held; wait for some shards to finish")
        try:
            yield
        finally:
            _drop(slot, slot_path)
        return
    try:
        for slot_path in sorted(lock_path.parent.glob(f"{lock_path.name}.shared-*.lock")):
            probe = _try_lock(slot_path)
            if probe is None:
                raise _busy(what, read_holder(slot_path), slot_path)
            _drop(probe, slot_path)  # left by a killed shard
        previous = read_holder(lock_path)
        if previous and previous != str(os.getpid()):
            logging.getLogger(__name__).info("taking over the lock left by pid %s (no longer running)", previous)
        _write_holder(lock_path)
        yield
    finally:
        _forget_holder(lock_path)
        gate.release()


def _take_slot(lock_path: Path):
    """The first free shared slot of `lock_path` (called holding its gate): (lock, path) or (None, None)."""
    for n in range(MAX_SLOTS):
        path = lock_path.with_name(f"{lock_path.name}.shared-{n}.lock")
        slot = _try_lock(path)
        if slot is not None:
            _write_holder(path)
            return slot, path
    return None, None


@contextlib.contextmanager
def stage_lock(job_dir: Path, stage: str, units: list | None = None):
    """What a stage process holds while it works. The whole stage (`units` None): `<stage>/.lock`,
    exclusively. Some units (`--units`, a shard of the Ray executor or of a chunked run): that lock
    shared, so shards of one stage run side by side while a whole-stage run or `orchestrate clean`
    is refused, and one lock per unit (`<stage>/.unit-<key>.lock`), so no two processes ever make
    the same unit. The OS drops them all when the process dies."""
    stage_dir = Path(job_dir) / stage
    what = f"stage {stage} of {Path(job_dir).name}"
    if units is None:
        with exclusive_lock(stage_dir / ".lock", what):
            yield
        return
    with exclusive_lock(stage_dir / ".lock", what, shared=True), contextlib.ExitStack() as held:
        for unit in units:
            path = stage_dir / f".unit-{unit.key}.lock"
            lock = _try_lock(path)
            if lock is None:
                raise JobFileError(
                    f"{stage}: unit {unit.key} is being made by another process (pid {read_holder(path) or 'unknown'}, "
                    f"lock {path}); wait for it to finish or stop it, then run again"
                )
            _write_holder(path)
            held.callback(_drop, lock, path)
        yield
