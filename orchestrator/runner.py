"""Runs the stage processes in order, one model per process, and summarises what they did.

Each stage runs as `python -m stages.<name> <job_dir>`; the exact command is printed first so it
can be rerun by hand. Process exit is what guarantees a stage's memory is released.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import stages
from stages import lifeline
from orchestrator.plan import describe_stage, plan_stage
from stages.contract import (
    EXIT_INTERRUPTED,
    EXIT_RESOURCE_ERROR,
    RESOLVED_JOB,
    STAGES,
    TMP_PREFIX,
    Clock,
    JobFileError,
    exclusive_lock,
    format_bytes,
    publish_json,
    read_job,
    remove_temp_files,
)

PROJECT_ROOT = Path(stages.__file__).resolve().parent.parent


class StageFailedError(Exception):
    """A stage process exited non-zero; `exit_code` is passed on by the CLI."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageRun:
    stage: str
    seconds: float
    summary: dict


def stage_command(stage: str, job_dir: Path, force: bool = False, units: list[str] | None = None) -> list[str]:
    """`python -m stages.<stage> <job_dir> [--force] [--units KEY,...]`."""
    command = [sys.executable, "-m", f"stages.{stage}", str(job_dir)] + (["--force"] if force else [])
    return command + (["--units", ",".join(units)] if units else [])


def _shown(command: list[str]) -> str:
    """The command as a user would type it: `python`, and paths relative to the current folder."""
    shown = ["python"] + command[1:]
    try:
        shown[3] = os.path.relpath(shown[3])
    except ValueError:
        pass
    return shlex.join(shown)


def _last_error(job_dir: Path, stage: str) -> str:
    try:
        lines = (job_dir / stage / "stage.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return ""


def start_stage(stage: str, job_dir: Path, force: bool, wait: bool = False, units: list[str] | None = None) -> subprocess.Popen:
    """Start a stage process; with `wait` it only imports its libraries until `go_stage`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    env[lifeline.ENV] = str(os.getpid())  # it dies with us, however we die (stages/lifeline.py)
    command = stage_command(stage, job_dir, force, units) + (["--wait"] if wait else [])
    # A waiting process gets its own session, so a Ctrl-C in the terminal (sent to our process group)
    # cannot hit it mid-import; the orchestrator dismisses it or forwards the SIGINT once it runs.
    return subprocess.Popen(command, env=env, stdin=subprocess.PIPE if wait else None, text=True, start_new_session=wait)


def go_stage(process: subprocess.Popen, go: bool) -> None:
    """Release (go=True) or dismiss (go=False: it exits without touching anything) a waiting stage."""
    try:
        if go:
            process.stdin.write("go\n")
        process.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    if not go:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_stage(stage: str, job_dir: Path, force: bool, echo, units: list[str] | None = None) -> StageRun:
    """Run one stage process to completion; raise StageFailedError if it fails."""
    echo(f"> {_shown(stage_command(stage, job_dir, force, units))}")
    clock = Clock()
    return finish_stage(stage, job_dir, start_stage(stage, job_dir, force, units=units), clock)


def _interrupt(process: subprocess.Popen) -> None:
    """Forward Ctrl-C (a stage started ahead runs in its own session, and a signal may have been
    sent to us alone) and give the stage time to clean up; kill it if it does not stop."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def finish_stage(stage: str, job_dir: Path, process: subprocess.Popen, clock: Clock) -> StageRun:
    try:
        code = process.wait()
    except KeyboardInterrupt:
        _interrupt(process)
        raise
    if code != 0:
        log = job_dir / stage / "stage.log"
        detail = _last_error(job_dir, stage)
        if code == EXIT_INTERRUPTED or code == -signal.SIGINT:
            raise KeyboardInterrupt
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        hint = "finished items are kept; run the same command again to resume"
        message = f"stage {stage} failed ({how}){': ' + detail if detail else ''}; log: {os.path.relpath(log)}; {hint}"
        raise StageFailedError(message, EXIT_RESOURCE_ERROR if code == EXIT_RESOURCE_ERROR else 2)
    try:
        summary = json.loads((job_dir / stage / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    return StageRun(stage, clock.seconds(), summary)


def run_job(job_dir: Path, resolved: dict, echo, force: tuple[str, ...] = (), launch=None) -> list[StageRun]:
    """Write the resolved job, then run each stage that has work, in order, under the job lock.
    `launch(stage, job_dir, force, echo)` runs one stage; by default a `run_stage` subprocess,
    with the next stage's process started ahead (`--wait`) so its imports overlap this one."""
    warm: dict[str, subprocess.Popen] = {}
    active: list[subprocess.Popen] = []
    try:
        return _run_stages(job_dir, resolved, echo, force, launch, warm, active)
    finally:
        for process in warm.values():  # a stage started ahead but not needed: dismiss it
            go_stage(process, False)
        for process in active:  # interrupted between starting a stage and waiting for it
            if process.poll() is None:
                _interrupt(process)


def _run_stages(job_dir: Path, resolved: dict, echo, force: tuple[str, ...], launch, warm: dict, active: list) -> list[StageRun]:
    job_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    with exclusive_lock(job_dir / "run.lock", f"job {job_dir.name}"):
        publish_json(job_dir / RESOLVED_JOB, resolved)
        job = read_job(job_dir)
        for stage in STAGES:
            states = plan_stage(job_dir, job, stage)  # after the stages before it: their real records
            forced = stage in force
            if forced:
                echo(f"{stage}: forced, remaking all {len(states)}")
            else:
                for line in describe_stage(stage, states):
                    echo(line)
                if all(s.state == "done" for s in states):
                    _remove_leftovers(job_dir, stage, echo)
                    continue
            if launch is not None:
                runs.append(launch(stage, job_dir, forced, echo))
            else:
                echo(f"> {_shown(stage_command(stage, job_dir, forced))}")
                clock = Clock()
                process = warm.pop(stage, None)
                if process is None:
                    process = start_stage(stage, job_dir, forced)
                else:
                    go_stage(process, True)
                active[:] = [process]
                later = STAGES[STAGES.index(stage) + 1:]
                if later:  # it will most likely have work once this stage has made new artifacts
                    warm[later[0]] = start_stage(later[0], job_dir, later[0] in force, wait=True)
                runs.append(finish_stage(stage, job_dir, process, clock))
            over = budget_overrun(runs[-1].summary, job.get("runtime", {}))
            if over:
                echo(f"warning: {stage} {over}")
    return runs


def measured_peak(summary: dict, device_type: str) -> int | None:
    """What the budget limits: CUDA reserved memory on a GPU (allocated would hide the caching
    allocator's slack); on the CPU, the host memory the stage's model work added."""
    peak = summary.get("peak", {})
    if device_type == "cuda":
        return peak.get("device_max_reserved_bytes")
    if "host_peak_rss_bytes" in peak and "host_rss_at_start_bytes" in summary:
        return peak["host_peak_rss_bytes"] - summary["host_rss_at_start_bytes"]
    return None


def budget_overrun(summary: dict, runtime: dict) -> str:
    """A sentence when the stage's measured peak went over the budget, else "": never silent."""
    budget = runtime.get("budget_bytes")
    measured = measured_peak(summary, runtime.get("device_type", "cpu"))
    if budget is None or measured is None or measured <= budget:
        return ""
    return (f"measured peak {format_bytes(measured)} exceeded the budget {format_bytes(budget)}; "
            f"lower --max-vram/--max-ram to pick a leaner strategy")


def _remove_leftovers(job_dir: Path, stage: str, echo) -> None:
    """A stage with nothing to do never starts, so delete what a killed run of it left half-written
    (e.g. its summary) here, under its lock; a stage run by hand holds the lock and cleans up itself."""
    stage_dir = job_dir / stage
    if not any(stage_dir.glob(f"{TMP_PREFIX}*")):
        return
    try:
        with exclusive_lock(stage_dir / ".lock", f"stage {stage} of {job_dir.name}"):
            for tmp in remove_temp_files(stage_dir):
                echo(f"{stage}: removed half-written {tmp.name}")
    except JobFileError:
        pass


def summary_table(runs: list[StageRun]) -> str:
    """Items, seconds and peak memory per stage that ran."""
    header = ("stage", "made", "up to date", "seconds", "load s", "peak device alloc", "peak device reserved", "peak host RSS")
    rows = [header]
    for run in runs:
        s, peak = run.summary, run.summary.get("peak", {})
        rows.append((
            run.stage, str(s.get("units_done", "?")), str(s.get("units_up_to_date", "?")), f"{run.seconds:.1f}",
            f"{s.get('load_seconds', 0.0):.1f}", format_bytes(peak.get("device_max_allocated_bytes")),
            format_bytes(peak.get("device_max_reserved_bytes")), format_bytes(peak.get("host_peak_rss_bytes")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
