"""Runs the stage processes in order, one model per process, and summarises what they did.

Each stage runs as `python -m stages.<name> <job_dir>`; the exact command is printed first so it
can be rerun by hand. Process exit is what guarantees a stage's memory is released.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import stages
from stages.artifacts import read_json
from stages import lifeline
from orchestrator.planning import chunks
from orchestrator.planning.plan import describe_stage, plan_job, todo_states, units_once
from stages.contract import ALL_STAGES, EXIT_INTERRUPTED, EXIT_RESOURCE_ERROR, RESOLVED_JOB, TMP_PREFIX, JobFileError
from stages.files import publish_json, remove_temp_files, shown_path
from stages.locks import exclusive_lock
from stages.measure import Clock, format_bytes
from stages.records import RecordReader
from stages.resolved import read_job

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
    shown[3] = shown_path(shown[3])
    return shlex.join(shown)


def _last_error(job_dir: Path, stage: str) -> str:
    try:
        lines = (job_dir / stage / "stage.log").read_text(encoding="utf-8", errors="replace").splitlines()
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
    lifeline.create_stage_job()  # Windows: the Job Object it joins, ended with us
    command = stage_command(stage, job_dir, force, units) + (["--wait"] if wait else [])
    # A waiting process gets its own session, so a Ctrl-C in the terminal (sent to our process group)
    # cannot hit it mid-import; the orchestrator dismisses it or forwards the SIGINT once it runs.
    # On Windows every stage gets its own process group, so that Ctrl-Break can be sent to it.
    return subprocess.Popen(command, env=env, stdin=subprocess.PIPE if wait else None, encoding="utf-8",
                            **lifeline.popen_options(new_session=wait))


def go_stage(process: subprocess.Popen, go: bool, units: list[str] | None = None) -> None:
    """Release (go=True; for `units` only, when given) or dismiss (go=False: it exits without
    touching anything) a waiting stage."""
    try:
        if go:
            process.stdin.write("go" + (" --units " + ",".join(units) if units else "") + "\n")
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
    lifeline.send_interrupt(process)
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
        if lifeline.was_interrupted(code, EXIT_INTERRUPTED):
            raise KeyboardInterrupt
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        hint = "finished items are kept; run the same command again to resume"
        message = f"stage {stage} failed ({how}){': ' + detail if detail else ''}; log: {shown_path(log)}; {hint}"
        raise StageFailedError(message, EXIT_RESOURCE_ERROR if code == EXIT_RESOURCE_ERROR else 2)
    try:
        summary = read_json(job_dir / stage / "summary.json")
    except (OSError, json.JSONDecodeError):
        summary = {}
    return StageRun(stage, clock.seconds(), summary)


def run_job(job_dir: Path, resolved: dict, echo, force: tuple[str, ...] = (), launch=None, chunk: int | None = 0,
            on_images=None, reader: RecordReader | None = None, plans: list | None = None) -> list[StageRun]:
    """Write the resolved job, then run each stage that has work, in order, under the job lock.
    `launch(stage, job_dir, force, echo, units)` runs one stage; by default a `run_stage`
    subprocess, with the next stage's process started ahead (`--wait`) so its imports overlap this
    one. `chunk`: items per denoise/decode process after the one encode pass (0: the whole queue
    in one process each; None: chosen by orchestrator/planning/chunks.py). `on_images(job_dir, ids)` is
    called after each chunk's decode but the last, with the chunk's item ids (the CLI refreshes the
    gallery page for them). The job is planned once, and again only after a stage made new records;
    `reader` (records.RecordReader, the run's: the CLI shares it with prepare_job) reads each record
    and output once per run. `plans`: when given, the job's plan as the run leaves it (plan_job's
    shape) is appended, so the caller need not plan again (the gallery)."""
    warm: dict[str, subprocess.Popen] = {}
    active: list[subprocess.Popen] = []
    try:
        run = _Run(job_dir, resolved, echo, force, launch, warm, active, on_images, reader if reader is not None else RecordReader())
        runs = run.all_stages(chunk)
        if plans is not None:
            plans.append(run.plan() if run.changed else run.states)
        return runs
    finally:
        for process in warm.values():  # a stage started ahead but not needed: dismiss it
            go_stage(process, False)
        for process in active:  # interrupted between starting a stage and waiting for it
            if process.poll() is None:
                _interrupt(process)


class _Run:
    """One `orchestrate run` under the job lock: the stage processes it starts, in order."""

    def __init__(self, job_dir: Path, resolved: dict, echo, force, launch, warm: dict, active: list, on_images, reader) -> None:
        self.job_dir, self.resolved, self.echo, self.force = job_dir, resolved, echo, force
        self.launch, self.warm, self.active, self.on_images = launch, warm, active, on_images
        self.reader = reader
        self.runs: list[StageRun] = []
        self.states: dict | None = None
        self.changed = False  # a stage ran since `states` was planned

    def plan(self) -> dict:
        """The whole job's states; records and outputs no stage rewrote come from the run's reader."""
        self.states, self.changed = plan_job(self.job_dir, self.job, self.reader, self.units), False
        self.reader.save()  # the job's state cache, when this plan learned something (stages/records.py)
        return self.states

    def all_stages(self, chunk: int | None) -> list[StageRun]:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.job_dir / "run.lock", f"job {self.job_dir.name}"):
            self.job = publish_resolved(self.job_dir, self.resolved)
            self.units = units_once(self.job)  # made once per run, and not at all when the job's plan entry holds (issue 21)
            # One plan for the whole job; planned again only after a stage made new records, each
            # stage deciding on the real records of the stages before it.
            if self._announce("encode", self.plan()["encode"]):
                self.stage("encode", None, then="imagencode" if "imagencode" in self.states else "denoise")
            # img2img: the pictures' posteriors, before denoise; a text-only job has no such stage.
            if "imagencode" in self.states and self._announce("imagencode", (self.plan() if self.changed else self.states)["imagencode"]):
                self.stage("imagencode", None, then="denoise")
            predicted = self.plan() if self.changed else self.states
            if chunk != 0 and _has_work(predicted["denoise"], "denoise" in self.force) and _has_work(predicted["decode"], "decode" in self.force):
                self.chunked({stage: self._announce(stage, predicted[stage]) for stage in ("denoise", "decode")}, chunk)
            else:
                if self._announce("denoise", predicted["denoise"]):
                    self.stage("denoise", None, then="decode")
                if self._announce("decode", (self.plan() if self.changed else self.states)["decode"]):
                    self.stage("decode", None)
            _publish_merged(self.job_dir, self.runs)
        return self.runs

    def _announce(self, stage: str, states) -> list[str]:
        """Print the stage's decision; the keys of its units to make (all when forced)."""
        if stage in self.force:
            self.echo(f"{stage}: forced, remaking all {len(states)}")
            return [s.unit.key for s in states]
        for line in describe_stage(stage, states):
            self.echo(line)
        todo = [s.unit.key for s in todo_states(states)]
        if not todo:
            _remove_leftovers(self.job_dir, stage, self.echo)
        return todo

    def chunked(self, todo: dict[str, list[str]], chunk: int | None) -> None:
        """Denoise and decode alternate over chunks of the items that need either (job order)."""
        wanted = set(todo["denoise"]) | set(todo["decode"])
        items = [item["id"] for item in self.job["items"] if item["id"] in wanted]
        start, made, shown = 0, 0, None
        while start < len(items):
            if chunk:
                size, why = chunk, f"chunks of {chunk} item{'s' if chunk > 1 else ''} (--chunk)"
            else:
                size, why = self._auto_chunk(len(items), made, len(items) - start)
            if why != shown:
                self.echo(why)
                shown = why
            ids = items[start:start + size]
            start, made = start + size, made + 1
            whole = len(ids) == len(items)  # one chunk after all: the stages' own choice of units is the same
            denoise = [key for key in todo["denoise"] if key in ids]
            decode = [key for key in todo["decode"] if key in ids]
            if denoise:
                self.stage("denoise", None if whole else denoise, then="decode" if decode else None)
            if decode:
                self.stage("decode", None if whole else decode, then="denoise" if start < len(items) else None)
                if start < len(items) and self.on_images is not None:  # the run's end writes its own page
                    self.on_images(self.job_dir, ids)
            self.echo(f"images: {start} of {len(items)} made in {shown_path(self.job_dir / 'decode')}/")

    def _auto_chunk(self, total: int, made: int, remaining: int) -> tuple[int, str]:
        """The next chunk's size, and the plan in words, from this run's measurements, else an
        earlier run's summaries, else the weights' size."""
        costs, sources = {}, set()
        for stage in ("denoise", "decode"):
            mine = [(r.summary, r.seconds) for r in self.runs if r.stage == stage and r.summary.get("units_done")]
            cost = chunks.measured_cost(chunks.merge_summaries(mine)) if mine else chunks.read_cost(self.job_dir, stage)
            costs[stage] = cost or chunks.estimate_costs(self.job)[stage]
            sources.add("measured" if cost else "estimated")
        planned = chunks.max_chunks(total, costs)
        how = sources.pop() if len(sources) == 1 else "partly measured"
        first = f", the first of {chunks.next_chunk(total, 0, total, costs)} items" if planned > 1 else ""
        return chunks.next_chunk(total, made, remaining, costs), (
            f"chunks: {planned} in all for {total} items{first}; extra model loads ~{chunks.extra_share(total, planned, costs):.0%} "
            f"of the run ({how} costs); --chunk N to choose, --chunk 0 for one process per stage")

    def stage(self, stage: str, units: list[str] | None, then: str | None = None) -> None:
        """Run one stage process (for `units`, or all its stale units); start `then` ahead of it."""
        forced = stage in self.force
        if self.launch is not None:
            self.runs.append(self.launch(stage, self.job_dir, forced, self.echo, units))
        else:
            self.echo(f"> {_shown(stage_command(stage, self.job_dir, forced, units))}")
            clock = Clock()
            process = self.warm.pop(stage, None)
            if process is None:
                process = start_stage(stage, self.job_dir, forced, units=units)
            else:
                go_stage(process, True, units)
            self.active[:] = [process]
            if then:  # it will most likely have work once this stage has made new artifacts
                self.warm[then] = start_stage(then, self.job_dir, then in self.force, wait=True)
            self.runs.append(finish_stage(stage, self.job_dir, process, clock))
        self.changed = True
        over = budget_overrun(self.runs[-1].summary, self.job.get("runtime", {}))
        if over:
            self.echo(f"warning: {stage} {over}")


def publish_resolved(job_dir: Path, resolved: dict) -> dict:
    """Write job.resolved.json unless it already holds `resolved`, and return the job as the stages
    will read it. Comparing the parsed file is ~20x cheaper than writing it again (its indented
    JSON goes through the pure-Python encoder: 1 s at 10,000 items), and a no-op rerun then leaves it alone."""
    try:
        previous = read_job(job_dir)
    except (JobFileError, OSError, ValueError):
        previous = None
    if previous != resolved:
        publish_json(job_dir / RESOLVED_JOB, resolved)
        previous = read_job(job_dir)
    return previous


def _has_work(states, forced: bool) -> bool:
    return forced or bool(todo_states(states))


def _publish_merged(job_dir: Path, runs: list[StageRun]) -> None:
    """A stage run in several processes (chunks) gets one summary.json for the whole run."""
    for stage in ALL_STAGES:
        mine = [(r.summary, r.seconds) for r in runs if r.stage == stage]
        if len(mine) > 1:
            publish_json(job_dir / stage / "summary.json", chunks.merge_summaries(mine))


def merge_runs(runs: list[StageRun]) -> list[StageRun]:
    """One StageRun per stage, its processes' summaries merged (orchestrator/planning/chunks.py)."""
    merged = []
    for stage in ALL_STAGES:
        mine = [r for r in runs if r.stage == stage]
        if len(mine) == 1:
            merged.append(mine[0])
        elif mine:
            merged.append(StageRun(stage, round(sum(r.seconds for r in mine), 3),
                                   chunks.merge_summaries([(r.summary, r.seconds) for r in mine])))
    return merged


def measured_peak(summary: dict, device_type: str) -> int | None:
    """What the budget limits: reserved memory on a GPU (allocated would hide the caching
    allocator's slack; on MPS what Metal's driver holds); on the CPU, the host memory the stage's
    model work added."""
    peak = summary.get("peak", {})
    if device_type in ("cuda", "xpu", "mps"):
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
    try:  # names only (Path.glob made a Path per file: a third of a 10,000-item no-op rerun's gallery time)
        if not any(map(str.startswith, os.listdir(stage_dir), itertools.repeat(TMP_PREFIX))):
            return
    except OSError:
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
    for run in merge_runs(runs):
        s, peak = run.summary, run.summary.get("peak", {})
        rows.append((
            run.stage, str(s.get("units_done", "?")), str(s.get("units_up_to_date", "?")), f"{run.seconds:.1f}",
            f"{s.get('load_seconds', 0.0):.1f}", format_bytes(peak.get("device_max_allocated_bytes")),
            format_bytes(peak.get("device_max_reserved_bytes")), format_bytes(peak.get("host_peak_rss_bytes")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
