"""`orchestrate status`: per stage and item, done, to do, or stale and why, as console lines; runs nothing."""

from __future__ import annotations

from pathlib import Path

from orchestrator.planning.plan import describe_stage, plan_job
from orchestrator.planning.prepare import describe_model, prepare_job
from stages.contract import RESOLVED_JOB


def show_status(job_file: Path, workdir: Path, device: str, memory: tuple, *, echo) -> None:
    """The model, then each stage's units judged for `device` (auto: the device of the last run) and
    the decode strategy `memory` plans."""
    job_dir, resolved = prepare_job(job_file, workdir, device, memory, as_last_run=True)
    for line in describe_model(resolved):
        echo(line)
    if device == "auto" and (job_dir / RESOLVED_JOB).is_file():
        echo(f"judged for {resolved['device']}, the device of the job's last run (--device judges it for another)")
    states = plan_job(job_dir, resolved)
    for name in states:  # imagencode only with img2img items
        for line in describe_stage(name, states[name], limit=10_000):
            echo(line)
