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
from orchestrator.plan import describe_stage, plan_job
from stages.contract import (
    EXIT_INTERRUPTED,
    EXIT_RESOURCE_ERROR,
    RESOLVED_JOB,
    STAGES,
    Clock,
    exclusive_lock,
    format_bytes,
    publish_json,
    read_job,
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


def stage_command(stage: str, job_dir: Path, force: bool = False) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", str(job_dir)] + (["--force"] if force else [])


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


def run_stage(stage: str, job_dir: Path, force: bool, echo) -> StageRun:
    """Run one stage process to completion; raise StageFailedError if it fails."""
    command = stage_command(stage, job_dir, force)
    echo(f"> {_shown(command)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    clock = Clock()
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # The terminal sends SIGINT to the whole group; forward it for a signal sent to us alone.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
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
    `launch(stage, job_dir, force, echo)` runs one stage; by default a `run_stage` subprocess."""
    launch = launch or run_stage
    job_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    with exclusive_lock(job_dir / "run.lock", f"job {job_dir.name}"):
        publish_json(job_dir / RESOLVED_JOB, resolved)
        job = read_job(job_dir)
        for stage in STAGES:
            states = plan_job(job_dir, job)[stage]  # re-planned after each stage: real upstream records
            forced = stage in force
            if forced:
                echo(f"{stage}: forced, remaking all {len(states)}")
            else:
                for line in describe_stage(stage, states):
                    echo(line)
                if all(s.state == "done" for s in states):
                    continue
            runs.append(launch(stage, job_dir, forced, echo))
    return runs


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
