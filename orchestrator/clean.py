"""`orchestrate clean JOB.toml`: artifacts no current item uses, listed with their sizes, and removed
with `--yes` (issue 11, point 4).

A job's stage folders keep what earlier versions of the job made: embeddings of prompts since
edited, latents and images of items since removed (an item id is its index and prompt slug), files
left by a killed writer (`.tmp-*`). What the current job file's units name is never touched, even
when stale: the next run replaces it. Nothing is listed or removed while a run or a stage holds the
job's locks. With `--store`, entries of the workdir's embedding store that no job folder in the
workdir holds are cleaned as well.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stages.contract import STAGES, TMP_PREFIX
from stages.locks import exclusive_lock
from stages.measure import format_bytes
from stages.units import plan_units

KEEP = {"summary.json", "stage.log", ".lock", ".lock.pid"}  # a stage folder's own files (stages/locks.py)


def unused_files(job_dir: Path, job: dict) -> list[Path]:
    """Files in the stage folders that no unit of `job` owns (artifacts, records, temp files)."""
    owned = set()
    for stage, units in plan_units(job).items():
        for unit in units:
            owned.add((stage, f"{unit.key}.json"))
            owned.update((stage, name) for name in unit.outputs)
    found = []
    for stage in STAGES:
        folder = Path(job_dir) / stage
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in KEEP and ((stage, path.name) not in owned or path.name.startswith(TMP_PREFIX)):
                found.append(path)
    return found


def unused_store_entries(workdir: Path, leaving=()) -> list[Path]:
    """Store entries (<workdir>/.store/encode/<key>.*) whose key no job folder's encode/ holds once
    the files in `leaving` are gone."""
    store = Path(workdir) / ".store" / "encode"
    if not store.is_dir():
        return []
    leaving = {Path(p).resolve() for p in leaving}
    held = {p.stem for p in Path(workdir).glob("*/encode/*.safetensors")  # job folders, not .store itself
            if not p.parent.parent.name.startswith(".") and p.resolve() not in leaving}
    return sorted(p for p in store.iterdir() if p.is_file() and (p.stem not in held or p.name.startswith(TMP_PREFIX)))


@contextlib.contextmanager
def job_locked(job_dir: Path):
    """The run lock and every stage's lock: no run, no stage started by hand, while we clean."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive_lock(Path(job_dir) / "run.lock", f"job {Path(job_dir).name}"))
        for stage in STAGES:
            if (Path(job_dir) / stage).is_dir():
                stack.enter_context(exclusive_lock(Path(job_dir) / stage / ".lock", f"stage {stage} of {Path(job_dir).name}"))
        yield


def clean(job_dir: Path, job: dict, workdir: Path, remove: bool, store: bool, echo) -> int:
    """List (and with `remove`, delete) what no current item uses; returns the bytes concerned."""
    with job_locked(job_dir):
        files = unused_files(job_dir, job)
        entries = unused_store_entries(workdir, files) if store else []
        total = 0
        for path in files + entries:
            size = path.stat().st_size
            total += size
            echo(f"{'removed' if remove else 'unused'}  {format_bytes(size):>10}  {path.relative_to(workdir)}")
            if remove:
                path.unlink()
        what = f"{len(files)} file(s) in {Path(job_dir).name}" + (f", {len(entries)} store entr{'y' if len(entries) == 1 else 'ies'}" if store else "")
        if not files and not entries:
            echo(f"nothing to clean: every file in {Path(job_dir).name} belongs to a current item" + (", and every store entry to a job" if store else ""))
        elif remove:
            echo(f"removed {what}: {format_bytes(total)}")
        else:
            echo(f"{what} unused: {format_bytes(total)}; run again with --yes to remove them")
        return total
