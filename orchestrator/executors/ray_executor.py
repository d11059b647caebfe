"""Run a job's stages as Ray tasks over a cluster: `orchestrate run job.toml --executor ray` (issue 9).

Ray schedules the stage processes themselves, unchanged: each shard of a stage's pending units is
one task that runs `python -m stages.<name> <job_dir> --units KEY,... --summary FILE` on the node it
lands on and ends when that process exits, so a GPU's memory is released exactly as in a local run
(GPU tasks also take a fresh Ray worker each, `max_calls=1`). The stage process is bound to its Ray
worker (stages/lifeline.py): it dies if the worker dies. Artifacts, records, staleness and resume
are the local run's, since the same stage code writes them, each unit under its own lock
(stages/locks.py `stage_lock`). The job folder must be at the same path on every node; one probe
task per node checks that before anything runs.

Shards (docs/ray.md): encode, one per worker (encode units are keyed by text, so a shard's prompts
share one T5 load and weight pass); denoise, about two per worker, the first wave half the size of
the later ones so the first images come out early; decode, the denoise shards' items. The driver
keeps the queue itself and hands Ray one task per free worker slot, decode before denoise before
encode; a shard is handed over once the upstream units it reads are published and verified against
their records, so the first image of a long queue never waits for the whole queue to be denoised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.planning.chunks import merge_summaries
from orchestrator.planning.plan import UnitState, _states, describe_stage
from stages.records import RecordReader
from orchestrator.executors.runner import PROJECT_ROOT, StageFailedError, StageRun, _remove_leftovers, _shown, budget_overrun, stage_command
from stages import lifeline
from stages.contract import ALL_STAGES, EXIT_INTERRUPTED, EXIT_RESOURCE_ERROR, EXIT_USER_ERROR, RESOLVED_JOB, STAGES, TMP_PREFIX, ArtifactError, JobFileError
from stages.files import publish_json, sha256_file, shown_path
from stages.locks import exclusive_lock
from stages.measure import Clock, format_bytes
from stages.resolved import read_job
from stages.units import Unit, plan_units, unit_status

EXECUTORS = ("local", "ray")
RETRIES = 2  # Ray runs a task again when its worker dies (kill -9, node lost, OOM killer), this often
PROBE_SECONDS = 120  # a node that has not answered the storage probe by then is reported, and nothing runs
STOP_SECONDS = 30  # as the local runner: time a stage gets to clean up after Ctrl-C before it is killed
SHARDS = "shards"  # <stage>/shards/<n>.json: each shard's own summary (shards of a stage run at once)
SHOWN_UNITS = 4  # units named in a printed shard command; the stage log has every run's units


class ShardKilledError(Exception):
    """The stage process of a shard was killed (the OOM killer, a signal): Ray runs the task again."""


@dataclass(frozen=True)
class Shard:
    """Some units of one stage, run as one Ray task; `needs` are the upstream (stage, key) units
    made in this run that it reads, so it waits for them."""

    stage: str
    index: int  # 1-based, within its stage
    count: int  # shards of its stage
    units: tuple
    needs: frozenset


def import_ray():
    """The ray module, or a one-line JobFileError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise JobFileError("--executor ray needs Ray, which is not installed; install the extra with "
                           "`pip install -e '.[ray]'` (or `pip install 'ray>=2.60'`)") from None
    return ray


def check_executor(executor: str, ray_address: str | None, gpus_per_task: float | None) -> None:
    """Refuse an unknown executor, Ray options without Ray, and Ray when it is not installed."""
    if executor not in EXECUTORS:
        raise JobFileError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "local" and (ray_address is not None or gpus_per_task is not None):
        raise JobFileError("--ray-address and --gpus-per-task need --executor ray")
    if gpus_per_task is not None and not 0 < gpus_per_task <= 64:
        raise JobFileError(f"--gpus-per-task {gpus_per_task} is not in (0, 64]; e.g. 1, or 0.5 for two tasks per GPU")
    if executor == "ray":
        import_ray()


# ---------------------------------------------------------------------------------------------
# Task bodies: these run on the Ray workers


def run_shard(stage: str, job_dir: str, keys: list[str], force: bool, summary_path: str, pythonpath: str) -> dict:
    """Ray task body: run the stage process for `keys` on this worker and wait for it to exit.
    Returns its exit code, last error line, seconds, where it ran and its summary."""
    import ray

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")])))
    env[lifeline.ENV] = str(os.getpid())  # it dies with this worker, however the worker dies
    lifeline.create_stage_job()  # Windows: the Job Object it joins, ended with this worker
    command = stage_command(stage, Path(job_dir), force, keys) + ["--summary", summary_path]
    clock = Clock()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                   encoding="utf-8", **lifeline.popen_options())
        try:
            while process.poll() is None:  # short waits: ray.cancel's KeyboardInterrupt lands between them
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.2)
        except KeyboardInterrupt:  # ray.cancel: the stage removes its half-written files and stops
            _stop_process(process)
            raise
        stderr.seek(0)
        said = stderr.read()
    code = process.returncode
    if code < 0 or lifeline.was_interrupted(code, EXIT_INTERRUPTED):
        raise ShardKilledError(f"stage {stage} {'killed by signal ' + str(-code) if code < 0 else 'interrupted'}: {_last_line(said)}")
    summary = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return {"code": code, "error": _last_line(said), "seconds": clock.seconds(), "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(), "gpus": list(gpus), "summary": summary}


def probe_job_folder(job_dir: str, resolved_sha256: str) -> str:
    """Ray task body: "" when this node reads the driver's job.resolved.json at the same path and
    can write in the job folder; else what is wrong."""
    path = Path(job_dir) / RESOLVED_JOB
    try:
        if sha256_file(path) != resolved_sha256:
            return f"sees another {path} than the driver (a folder of its own, not the shared one)"
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror or exc})"
    probe = Path(job_dir) / f"{TMP_PREFIX}probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"probe\n")
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return f"cannot write in the job folder {job_dir} ({exc.strerror or exc})"
    return ""


def _stop_process(process: subprocess.Popen) -> None:
    """Ctrl-C to the stage, time to clean up, then SIGKILL (as the local runner's _interrupt)."""
    lifeline.send_interrupt(process)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _last_line(text: str) -> str:
    """The stage's last `error:` line (its one-line message), else its last line (a traceback's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# Planning the shards


def pending_units(job_dir: Path, job: dict, force: tuple[str, ...], echo) -> dict[str, list[Unit]]:
    """Per stage, the units this run makes: not up to date, forced, or reading a unit made before
    them in this run (the stage skips those that turn out up to date). Prints each stage's state."""
    units = plan_units(job)
    pending: set[tuple[str, str]] = set()
    reader = RecordReader()  # this plan's: each record and output read once
    todo = {}
    for stage in ALL_STAGES:
        if stage not in STAGES and not units[stage]:  # imagencode, in a job without pictures
            todo[stage] = []
            continue
        if stage in force:
            states = [UnitState(unit, "stale", "forced") for unit in units[stage]]
            pending.update((stage, unit.key) for unit in units[stage])
            echo(f"{stage}: forced, remaking all {len(states)}")
        else:
            states = _states(job_dir, units[stage], pending, reader)
            for line in describe_stage(stage, states):
                echo(line)
        todo[stage] = [s.unit for s in states if s.state != "done"]
        if not todo[stage]:
            _remove_leftovers(job_dir, stage, echo)
    return todo


def split_sizes(n: int, weights: list[int]) -> list[int]:
    """`n` items cut into len(weights) consecutive groups in proportion to `weights`, none empty
    (equal groups when the proportions would leave one empty)."""
    total, bounds, acc = sum(weights), [0], 0
    for weight in weights:
        acc += weight
        bounds.append(int(n * acc / total + 0.5))
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(sizes) > 0:
        return sizes
    k = len(weights)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def wave_sizes(n: int, workers: int) -> list[int]:
    """About two shards per worker (at least one item each); the first wave (one per worker) half
    the size of the later ones, so the first items reach the next stage early."""
    if n == 0:
        return []
    k = min(n, 2 * workers)
    first = min(workers, k // 2)
    return split_sizes(n, [1] * first + [2] * (k - first))


def make_shards(todo: dict[str, list[Unit]], workers: int) -> list[Shard]:
    """Encode: one shard per worker. Denoise: wave_sizes. Decode: the denoise shards' items, then
    the other pending decode units in waves alike."""
    made = {(stage, unit.key) for stage in ALL_STAGES for unit in todo.get(stage, ())}
    encode = todo["encode"]
    groups = {"encode": _cut(encode, split_sizes(len(encode), [1] * min(len(encode), workers)) if encode else [])}
    pictures = todo.get("imagencode", [])  # img2img's posteriors: one shard per worker, as encode
    groups["imagencode"] = _cut(pictures, split_sizes(len(pictures), [1] * min(len(pictures), workers)) if pictures else [])
    groups["denoise"] = _cut(todo["denoise"], wave_sizes(len(todo["denoise"]), workers))
    decode = {unit.key: unit for unit in todo["decode"]}
    following = [[decode[u.key] for u in group if u.key in decode] for group in groups["denoise"]]
    covered = {unit.key for group in following for unit in group}
    rest = [unit for unit in todo["decode"] if unit.key not in covered]
    groups["decode"] = [group for group in following if group] + _cut(rest, wave_sizes(len(rest), workers))
    shards = []
    for stage in ALL_STAGES:
        for index, group in enumerate(groups[stage], 1):
            needs = frozenset(source for unit in group for source in unit.inputs if source in made)
            shards.append(Shard(stage, index, len(groups[stage]), tuple(group), needs))
    return shards


def _cut(units: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(units[start:start + size])
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def run_job_on_ray(job_dir: Path, resolved: dict, echo, force: tuple[str, ...] = (), address: str | None = None,
                   gpus_per_task: float | None = None) -> list[StageRun]:
    """`run_job` on Ray: write the resolved job, probe the job folder from every node, then run
    each stage's pending units as shards, overlapping the stages. Joins the cluster at `address`
    (`auto`, `ray://host:port`), or starts a local Ray instance; uses Ray as is when this process
    has already initialised it."""
    ray = import_ray()
    device = resolved["device"]
    if device.startswith("cuda:"):
        raise JobFileError(f"--device {device} names one GPU of this machine; with --executor ray use --device cuda "
                           "(Ray gives each task its own GPU)")
    if gpus_per_task is not None and not device.startswith("cuda"):
        raise JobFileError(f"--gpus-per-task needs a CUDA job, and this one runs on {device}; leave it out, or use --device cuda")
    gpu = device.startswith("cuda")
    resources = {"num_gpus": gpus_per_task or 1} if gpu else {"num_cpus": 1}
    started = _connect(ray, address)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(job_dir / "run.lock", f"job {job_dir.name}"):
            publish_json(job_dir / RESOLVED_JOB, resolved)
            job = read_job(job_dir)
            todo = pending_units(job_dir, job, force, echo)
            if not any(todo.values()):
                return []
            workers = worker_slots(ray, resources)
            probe_storage(ray, job_dir, resources)
            shards = make_shards(todo, workers)
            echo(f"ray: {workers} worker slot{'s' if workers > 1 else ''} ({_describe(resources)} per task); "
                 + ", ".join(f"{stage} {sum(s.stage == stage for s in shards)} shards" for stage in ALL_STAGES if todo[stage]))
            return _Driver(ray, job_dir, job, force, resources, echo).run(shards)
    finally:
        if started:
            ray.shutdown()


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local instance; True when we must shut it down.
    Workers find this checkout's code through PYTHONPATH (a cluster's nodes have the package installed)."""
    if ray.is_initialized():
        return False
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    options = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}, "logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    try:
        # "local": always a new instance; ray.init() with no address would join whatever cluster
        # /tmp/ray/ray_current_cluster names, and wait for it when it is gone.
        ray.init(address=address or "local", **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise JobFileError(f"--ray-address {address}: cannot join the Ray cluster ({said}); start one with `ray start --head` "
                           "and pass its address (or `auto` on one of its nodes)") from None
    return True


def worker_slots(ray, resources: dict) -> int:
    """How many shard tasks the cluster runs at once: its GPUs / GPUs per task, else its CPUs."""
    total = ray.cluster_resources()
    if "num_gpus" in resources:
        slots = int(total.get("GPU", 0) / resources["num_gpus"] + 1e-9)
        if slots == 0:
            raise JobFileError(f"the Ray cluster has {total.get('GPU', 0):g} GPUs, and each task of this CUDA job needs "
                               f"{resources['num_gpus']:g}; add GPU workers to the cluster, or run with --device cpu")
        return slots
    return max(1, int(total.get("CPU", 0)))


def probe_storage(ray, job_dir: Path, resources: dict) -> None:
    """One task on each node that can run shards: it must read this job.resolved.json (the same
    bytes) at the same path and write in the job folder, or a JobFileError names the node and nothing runs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needed = "GPU" if "num_gpus" in resources else "CPU"
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get(needed, 0) > 0]
    if not nodes:
        raise JobFileError(f"no node of the Ray cluster has a {needed} to run shards on; add workers (`ray start --address=...`)")
    expected = sha256_file(job_dir / RESOLVED_JOB)
    probe = ray.remote(probe_job_folder)
    refs = {probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(str(job_dir), expected): node for node in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_SECONDS)
    fix = ("put the job folder on storage every node mounts at the same path (NFS, a shared volume) and pass "
           "--workdir there, or take that node out of the cluster")
    for ref in late:
        ray.cancel(ref, force=True)
        raise JobFileError(f"node {_node_name(refs[ref])} did not answer the storage probe within {PROBE_SECONDS} s; "
                           f"check that it is healthy (`ray status`)")
    for ref in ready:
        problem = ray.get(ref)
        if problem:
            raise JobFileError(f"node {_node_name(refs[ref])} {problem}; {fix}")


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})"


def _describe(resources: dict) -> str:
    return f"{resources['num_gpus']:g} GPU" if "num_gpus" in resources else f"{resources['num_cpus']} CPU"


class _Driver:
    """The scheduling loop: hands ready shards to Ray, one per free worker slot, and follows them."""

    def __init__(self, ray, job_dir: Path, job: dict, force: tuple[str, ...], resources: dict, echo) -> None:
        self.ray, self.job_dir, self.job, self.force, self.echo = ray, job_dir, job, force, echo
        self.resources = resources
        options = dict(resources, max_retries=RETRIES, retry_exceptions=[ShardKilledError])
        if "num_gpus" in resources:
            options["max_calls"] = 1  # a fresh worker per GPU task: nothing of a task stays on the card
        self.task = ray.remote(**options)(run_shard)
        self.running: dict = {}  # ObjectRef -> (shard, monotonic start)
        self.finished: set[tuple[str, str]] = set()  # (stage, key) made or checked up to date in this run
        self.results: dict[str, list[dict]] = {stage: [] for stage in ALL_STAGES}
        self.spans: dict[str, list[float]] = {}
        self.units = {stage: 0 for stage in ALL_STAGES}

    def run(self, shards: list[Shard]) -> list[StageRun]:
        for stage in ALL_STAGES:
            self.units[stage] = sum(len(s.units) for s in shards if s.stage == stage)
            for leftover in (self.job_dir / stage / SHARDS).glob("*"):  # summaries of an earlier run's shards
                leftover.unlink()
        waiting = list(shards)
        try:
            while waiting or self.running:
                free = worker_slots(self.ray, self.resources) - len(self.running)
                ready = sorted((s for s in waiting if s.needs <= self.finished), key=lambda s: (-ALL_STAGES.index(s.stage), s.index))
                for shard in ready[:max(free, 0) if self.running else max(free, 1)]:
                    waiting.remove(shard)
                    self._submit(shard)
                if not self.running:
                    stuck = waiting[0]
                    raise ArtifactError(f"{stuck.stage}: shard {stuck.index} waits for upstream units that were not made "
                                        f"({sorted(stuck.needs - self.finished)[0]}); run the same command again")
                done, _ = self.ray.wait(list(self.running), num_returns=1)
                for ref in done:
                    self._collect(ref)
        except BaseException:
            self._cancel()
            raise
        return self._stage_runs()

    def _submit(self, shard: Shard) -> None:
        keys = [unit.key for unit in shard.units]
        forced = shard.stage in self.force
        command = stage_command(shard.stage, self.job_dir, forced, keys)
        shown = _shown(command)
        if len(keys) > SHOWN_UNITS:
            shown = shown.replace(",".join(keys), ",".join(keys[:SHOWN_UNITS]) + f",... ({len(keys)} units)")
        self.echo(f"> {shown}  [ray: {shard.stage} shard {shard.index}/{shard.count}]")
        summary = self.job_dir / shard.stage / SHARDS / f"{shard.index}.json"
        ref = self.task.remote(shard.stage, str(self.job_dir), keys, forced, str(summary), str(PROJECT_ROOT))
        self.running[ref] = (shard, time.monotonic())
        self.spans.setdefault(shard.stage, [time.monotonic(), time.monotonic()])

    def _collect(self, ref) -> None:
        """A shard's task ended: check it, verify its units against their records, print progress."""
        shard, _ = self.running.pop(ref)
        log = shown_path(self.job_dir / shard.stage / "stage.log")
        hint = "finished items are kept; run the same command again to resume"
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            code = EXIT_RESOURCE_ERROR if type(exc).__name__ == "OutOfMemoryError" else EXIT_USER_ERROR
            cause = getattr(exc, "cause", None) or exc
            said = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
            raise StageFailedError(f"stage {shard.stage} failed (shard {shard.index}/{shard.count}, after {RETRIES} retries: {said}); "
                                   f"log: {log}; {hint}", code) from None
        if result["code"] != 0:
            detail = f": {result['error']}" if result["error"] else ""
            raise StageFailedError(f"stage {shard.stage} failed (exit {result['code']}, shard {shard.index}/{shard.count} on "
                                   f"{result['node']}){detail}; log: {log}; {hint}",
                                   EXIT_RESOURCE_ERROR if result["code"] == EXIT_RESOURCE_ERROR else EXIT_USER_ERROR)
        for unit in shard.units:  # what the next stage reads must be published and match its record
            ok, why = unit_status(self.job_dir, unit)
            if not ok:
                raise ArtifactError(f"{shard.stage}: unit {unit.key} is not up to date after its shard finished ({why}); "
                                    f"run the same command again")
            self.finished.add((shard.stage, unit.key))
        result["units"] = len(shard.units)
        self.results[shard.stage].append(result)
        self.spans[shard.stage][1] = time.monotonic()
        over = budget_overrun(result["summary"], self.job.get("runtime") or {})
        if over:
            self.echo(f"warning: {shard.stage} shard {shard.index} {over}")
        where = f"{result['node']} gpu {','.join(map(str, result['gpus']))}" if result["gpus"] else f"{result['node']} pid {result['pid']}"
        self.echo(f"{shard.stage} shard {shard.index}/{shard.count} done: {result['summary'].get('units_done', '?')} made, "
                  f"{result['seconds']:.1f} s on {where} | {self._progress()}")

    def _progress(self) -> str:
        """Per stage: units done, running and to do."""
        parts = []
        for stage in (s for s in ALL_STAGES if s in STAGES or self.units[s]):  # imagencode only with pictures
            done = sum(r["units"] for r in self.results[stage])
            running = sum(len(shard.units) for shard, _ in self.running.values() if shard.stage == stage)
            parts.append(f"{stage} {done} done, {running} running, {self.units[stage] - done - running} to do")
        return "; ".join(parts)

    def _cancel(self) -> None:
        """Stop every task still running: Ctrl-C to its stage (it cleans up), then kill what is left."""
        refs = list(self.running)
        if not refs:
            return
        for ref in refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        with contextlib.suppress(Exception):
            _, left = self.ray.wait(refs, num_returns=len(refs), timeout=STOP_SECONDS + 5)
            for ref in left:
                self.ray.cancel(ref, force=True)
        self.running.clear()

    def _stage_runs(self) -> list[StageRun]:
        """One StageRun per stage that ran: its shards' summaries merged (written to
        <stage>/summary.json, as a local run writes it), and per-worker numbers under "workers"."""
        runs = []
        all_units = plan_units(self.job)
        for stage in ALL_STAGES:
            results = self.results[stage]
            if not results:
                continue
            # As a chunked local run merges its processes (counts add up, peaks per process), then the
            # stage's span on the cluster as its seconds.
            merged = merge_summaries([(r["summary"], r["seconds"]) for r in results])
            made = merged.get("units_done", 0)
            seconds = round(self.spans[stage][1] - self.spans[stage][0], 3)
            merged.update(stage=stage, units_done=made, units_up_to_date=len(all_units[stage]) - made, seconds=seconds,
                          load_seconds=round(merged.get("load_seconds", 0.0), 3), shards=len(results), workers=_per_worker(results))
            publish_json(self.job_dir / stage / "summary.json", merged)
            runs.append(StageRun(stage, seconds, merged))
        return runs


def _per_worker(results: list[dict]) -> dict:
    """Shards, units, seconds and peak memory per worker (node and GPU, or node and worker pid)."""
    workers: dict[str, dict] = {}
    for r in results:
        name = f"{r['node']} gpu {','.join(map(str, r['gpus']))}" if r["gpus"] else f"{r['node']} pid {r['pid']}"
        peak = r["summary"].get("peak") or {}
        entry = workers.setdefault(name, {"shards": 0, "units": 0, "seconds": 0.0, "peak_bytes": 0})
        entry["shards"] += 1
        entry["units"] += r["summary"].get("units_done", 0)
        entry["seconds"] = round(entry["seconds"] + r["seconds"], 3)
        entry["peak_bytes"] = max(entry["peak_bytes"], peak.get("device_max_reserved_bytes", peak.get("host_peak_rss_bytes", 0)))
    return workers


def worker_table(runs: list[StageRun]) -> str:
    """Per stage and worker: shards, units made, seconds and peak memory (device reserved on a GPU,
    else host RSS)."""
    rows = [("stage", "worker", "shards", "made", "seconds", "peak")]
    for run in runs:
        for name, w in sorted(run.summary.get("workers", {}).items()):
            rows.append((run.stage, name, str(w["shards"]), str(w["units"]), f"{w['seconds']:.1f}", format_bytes(w["peak_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
