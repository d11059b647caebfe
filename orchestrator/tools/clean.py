"""`orchestrate clean JOB.toml`: artifacts no current item uses, listed with their sizes, and removed
with `--yes` (issue 11, point 4).

A job's stage folders keep what earlier versions of the job made: embeddings of prompts since
edited, latents and images of items since removed (an item id is its index and prompt slug), files
left by a killed writer (`.tmp-*`). What the current job file's units name is never touched, even
when stale: the next run replaces it. Nothing is listed or removed while a run or a stage holds the
job's locks. With `--store`, entries of the workdir's embedding store that no job folder in the
workdir holds are cleaned as well.

Nothing outside the job folder or the store is ever touched (issue 17, points 1-2): a stage folder,
`.store` or `.store/encode` that is a link or resolves elsewhere is refused before any lock is taken
(a lock file would be made there); a link inside is removed itself, never its target; a FIFO, socket
or folder is listed from `lstat` and removed without being opened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from orchestrator.jobfile import job as jobfile
from orchestrator.planning.prepare import last_run_device, resolve_device
from stages.contract import ALL_STAGES, TMP_PREFIX, ArtifactError, JobFileError
from stages.locks import exclusive_lock
from stages.measure import format_bytes
from stages.records import STATE_FILE
from stages.units import plan_units

KEEP = {"summary.json", "stage.log", ".lock", ".lock.pid", "shards"}  # a stage folder's own files (stages/locks.py; shards/: the Ray executor's)


def unused_files(job_dir: Path, job: dict) -> list[Path]:
    """Files in the stage folders that no unit of `job` owns (artifacts, records, temp files)."""
    owned = set()
    for stage, units in plan_units(job).items():
        for unit in units:
            owned.add((stage, f"{unit.key}.json"))
            owned.update((stage, name) for name in unit.outputs)
    found = []
    for stage in ALL_STAGES:
        folder = Path(job_dir) / stage
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name not in KEEP and ((stage, path.name) not in owned or path.name.startswith(TMP_PREFIX)):
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
    return sorted(p for p in store.iterdir() if p.stem not in held or p.name.startswith(TMP_PREFIX))


def check_real_folders(job_dir: Path, workdir: Path, store: bool) -> None:
    """ArtifactError unless the job folder, its stage folders (and with `store`, `.store` and
    `.store/encode`) are real folders where they seem to be: a link there would make `clean` list
    and delete another folder's files as if they were the job's."""
    workdir = Path(workdir).resolve()
    folders = [Path(job_dir)] + [Path(job_dir) / stage for stage in ALL_STAGES]
    if store:
        folders += [workdir / ".store", workdir / ".store" / "encode"]
    for folder in folders:
        if not os.path.lexists(folder):
            continue
        mode = os.lstat(folder).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode) or folder.resolve() != workdir / folder.relative_to(workdir):
            what = "a link to " + str(folder.resolve()) if stat.S_ISLNK(mode) else "not a folder" if not stat.S_ISDIR(mode) else f"resolves to {folder.resolve()}"
            raise ArtifactError(f"clean: {folder} is {what}, not a folder of {'the store' if '.store' in folder.parts else 'the job'}; "
                                f"nothing was removed; replace it with a real folder (or remove it by hand) and run clean again")


def _size(path: Path) -> int:
    """Bytes of a file or folder as found (lstat: a link counts as itself, a FIFO is never opened)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    return sum(os.lstat(os.path.join(root, name)).st_size for root, dirs, files in os.walk(path) for name in files + dirs)


def _remove(path: Path) -> None:
    """Remove the entry itself: a link (not its target), a FIFO or socket, a file, or a folder
    (rmtree removes links inside it, it does not follow them)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def job_locked(job_dir: Path):
    """The run lock and every stage's lock: no run, no stage started by hand, while we clean."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive_lock(Path(job_dir) / "run.lock", f"job {Path(job_dir).name}"))
        for stage in ALL_STAGES:
            if (Path(job_dir) / stage).is_dir():
                stack.enter_context(exclusive_lock(Path(job_dir) / stage / ".lock", f"stage {stage} of {Path(job_dir).name}"))
        yield


def clean(job_dir: Path, job: dict, workdir: Path, remove: bool, store: bool, echo) -> int:
    """List (and with `remove`, delete) what no current item uses; returns the bytes concerned."""
    check_real_folders(job_dir, workdir, store)  # before the locks, which make files in these folders
    with job_locked(job_dir):
        files = unused_files(job_dir, job)
        entries = unused_store_entries(workdir, files) if store else []
        total = 0
        for path in files + entries:
            size = _size(path)
            total += size
            echo(f"{'removed' if remove else 'unused'}  {format_bytes(size):>10}  {path.relative_to(workdir)}")
            if remove:
                _remove(path)
        state = Path(job_dir) / STATE_FILE
        if remove and (state.exists() or state.is_symlink()):  # only a cache: the next run or status rebuilds it
            _remove(state)
            echo(f"removed the state cache {STATE_FILE} (file hashes and verdicts; rebuilt by the next run)")
        what = f"{len(files)} file(s) in {Path(job_dir).name}" + (f", {len(entries)} store entr{'y' if len(entries) == 1 else 'ies'}" if store else "")
        if not files and not entries:
            echo(f"nothing to clean: every file in {Path(job_dir).name} belongs to a current item" + (", and every store entry to a job" if store else ""))
        elif remove:
            echo(f"removed {what}: {format_bytes(total)}")
        else:
            echo(f"{what} unused: {format_bytes(total)}; run again with --yes to remove them")
        return total


def clean_job_file(job_file: Path, workdir: Path, device: str, remove: bool, store: bool, echo) -> int:
    """`orchestrate clean`: `clean` for the job folder of `job_file`, judged for `device` (auto: the
    device of its last run, since it decides the dtype and so the encode keys)."""
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, workdir)
    if not job_dir.is_dir():
        raise JobFileError(f"job folder {job_dir} does not exist; nothing was run for {job_file} in {workdir}")
    if device == "auto":
        device = last_run_device(job_dir) or device
    resolved = jobfile.resolve_job(job, job_dir, resolve_device(device), require_weights=False)
    return clean(job_dir, resolved, Path(workdir).resolve(), remove, store, echo)
