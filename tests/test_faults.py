"""Kill -9 fault injection (issue 4, points 1 and 6): a stage process killed at any moment, or hit
by a real write error from the kernel, loses nothing that was finished and lets nothing half-written
through. Every trial then finishes the job and must end with artifacts byte-identical to an
uninterrupted run, with no finished item recomputed.

Stage processes are forked from a `forkserver` that has imported torch, diffusers and the stages
once, so a trial costs a model load instead of a 5 s interpreter start; each child runs the
stage's own `main` and dies by a real SIGKILL. One trial kills a real `python -m stages.denoise`
and one test sends Ctrl-C to a real `orchestrate run`.

Trials, all drawn from SEED:
  - 5 precise kill points per stage (15): half-written artifact, complete but unrenamed artifact,
    artifact without its record, half-written record, and after the last record (before the summary);
    the unit hit is drawn at random.
  - 2 kills per stage at a random moment (6), with slowed writes so some land inside a write.
  - 1 kill of a real `python -m stages.denoise` process right after its first record.
  - 3 real write errors (RLIMIT_FSIZE makes the kernel refuse the write, EFBIG), one per stage.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.executors.runner import stage_command
from stages import contract, files
from stages.contract import STAGES, TMP_PREFIX
from stages.records import read_record
from stages.resolved import read_job
from stages.units import plan_units, unit_status
from tests.conftest import artifact_bytes, project_pythonpath, run_inprocess, write_job

SEED = 4_2024
JOB_NAME = "faults"
# 4 items, 3 encode units (the first prompt is shared by two items), guidance on and off, two sizes.
FAULT_JOB = """
[job]
name = "faults"
model = "{model}"

[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 3

[[generation]]
prompt = "a red apple on a wooden table"
seed = 1
count = 2

[[generation]]
prompt = "an owl reading a book in a cozy library"
negative_prompt = "blurry"
guidance_scale = 7.0
seed = 5

[[generation]]
prompt = "city skyline at night with neon lights and rain"
guidance_scale = 1.0
width = 96
seed = 9
"""
UNITS = {"encode": 3, "denoise": 4, "decode": 4}
KILL_POINTS = ("artifact-partial", "artifact-unrenamed", "record-missing", "record-partial", "summary")
_rng = random.Random(SEED)
TRIALS = (
    [(stage, point, _rng.randrange(UNITS[stage])) for stage in STAGES for point in KILL_POINTS]
    + [(stage, "random", round(_rng.uniform(0.05, 0.95), 3)) for stage in STAGES for _ in range(2)]
    + [(stage, "write-error", _rng.randrange(UNITS[stage])) for stage in STAGES]
)
# Imported once in the fork server, so forked stage processes start warm.
PRELOAD = [
    "tests.test_faults", "torch", "diffusers", "transformers", "safetensors.torch",
    "stages.encode", "stages.denoise", "stages.decode",
    "transformers.models.t5.modeling_t5", "transformers.models.t5.tokenization_t5",
    "diffusers.models.transformers.pixart_transformer_2d", "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.image_processor", "PIL.PngImagePlugin",
]


# ---------------------------------------------------------------------------------------------
# The stage process (runs in a forked child)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_fault(stage: str, point: str, index) -> None:
    """Wrap `files.publish` (every artifact, record and summary goes through it) so that this
    process dies by SIGKILL, or gets a real write error, at the chosen point of the chosen unit."""
    real_publish = files.publish
    seen = {"artifact": 0, "record": 0}

    def publish(path, write):
        path = Path(path)
        if path.parent.name != stage or path.name.endswith(".thumb.webp"):  # a PNG's thumbnail: the PNG is the unit's artifact
            return real_publish(path, write)
        kind = "summary" if path.name == "summary.json" else "record" if path.suffix == ".json" else "artifact"
        n = seen.get(kind, 0)
        seen[kind] = n + 1
        if point == "slow":
            return real_publish(path, lambda tmp: _write_slowly(write, Path(tmp)))
        if point == "summary" and kind == "summary":
            _kill_self()
        if n != index:
            return real_publish(path, write)
        if kind == "artifact" and point in ("artifact-partial", "artifact-unrenamed"):
            return real_publish(path, lambda tmp: _write_then_die(write, Path(tmp), partial=point == "artifact-partial"))
        if kind == "record" and point == "record-missing":
            _kill_self()  # the artifact is in place, its record never gets written
        if kind == "record" and point == "record-partial":
            return real_publish(path, lambda tmp: _write_then_die(write, Path(tmp), partial=True))
        if kind == "artifact" and point == "write-error":
            # From here on the kernel refuses to grow any file past 512 bytes (EFBIG), as a full
            # disk would refuse with ENOSPC; the limit is lifted once the write has failed.
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))
            try:
                return real_publish(path, write)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return real_publish(path, write)

    files.publish = publish
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us


def _write_then_die(write, tmp: Path, partial: bool) -> None:
    write(tmp)
    if partial:  # the kill came half way through the write
        os.truncate(tmp, tmp.stat().st_size // 2)
    _kill_self()


def _write_slowly(write, tmp: Path) -> None:
    """Write the file in 4 chunks with pauses, like a slow disk, so random kills can land mid-write."""
    write(tmp)
    data = tmp.read_bytes()
    with open(tmp, "wb") as f:
        for start in range(0, len(data), max(1, len(data) // 4 + 1)):
            f.write(data[start:start + len(data) // 4 + 1])
            f.flush()
            time.sleep(0.03)


def _stage_child(stage: str, job_dir: str, fault) -> None:
    """The body of a forked stage process: arm the fault (if any), then run the stage's main."""
    if fault is not None:
        _arm_fault(stage, *fault)
    sys.exit(importlib.import_module(f"stages.{stage}").main([job_dir]))


# ---------------------------------------------------------------------------------------------
# The harness


class Harness:
    """The reference run, per-stage starting points, the fork server and calibrated durations."""

    def __init__(self, root: Path, model: Path, job: str = FAULT_JOB) -> None:
        self.root = root
        self.job_file = write_job(root, job.format(model=model))
        self.reference_dir, _, _ = run_inprocess(self.job_file, root / "reference")
        self.reference = artifact_bytes(self.reference_dir)
        self.records = sorted(p.relative_to(self.reference_dir).as_posix()
                              for stage in STAGES for p in (self.reference_dir / stage).glob("*.json") if p.name != "summary.json")
        assert len(self.reference) == sum(UNITS.values()) + UNITS["decode"] and len(self.records) == sum(UNITS.values())
        # A trial on stage S starts from the reference with S and every later stage removed.
        self.templates = {}
        for n, stage in enumerate(STAGES):
            template = root / f"template-{stage}"
            shutil.copytree(root / "reference", template)
            for later in STAGES[n:]:
                shutil.rmtree(template / JOB_NAME / later)
            self.templates[stage] = template
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.durations = {}

    def start(self, stage: str, fault, work: Path) -> tuple[multiprocessing.Process, Path]:
        shutil.copytree(self.templates[stage], work)
        job_dir = work / JOB_NAME
        process = self.context.Process(target=_stage_child, args=(stage, str(job_dir), fault))
        process.start()
        return process, job_dir

    def duration(self, stage: str, work: Path) -> float:
        """Seconds an uninterrupted slowed-write stage process takes (measured once per stage)."""
        if stage not in self.durations:
            started = time.perf_counter()
            process, job_dir = self.start(stage, ("slow", None), work)
            process.join(120)
            assert process.exitcode == 0
            self.durations[stage] = time.perf_counter() - started
            # The forked, slowed process writes exactly what the in-process reference wrote.
            for rel, data in artifact_bytes(job_dir).items():
                assert data == self.reference[rel], rel
            shutil.rmtree(work)
        return self.durations[stage]


@pytest.fixture(scope="module")
def harness(tiny_model, tmp_path_factory) -> Harness:
    return Harness(tmp_path_factory.mktemp("faults"), tiny_model)


def accepted_records(job_dir: Path) -> dict[tuple[str, str], tuple]:
    """(stage, key) -> (inode, mtime_ns, bytes) of the record of every unit that is up to date now."""
    job = read_job(job_dir)
    accepted = {}
    for stage, units in plan_units(job).items():
        for unit in units:
            if unit_status(job_dir, unit)[0]:
                path = unit.record_path(job_dir)
                accepted[(stage, unit.key)] = (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
    return accepted


def temp_files(job_dir: Path) -> list[str]:
    return sorted(p.relative_to(job_dir).as_posix() for p in job_dir.rglob(f"{TMP_PREFIX}*"))


def check_recovery(harness: Harness, job_dir: Path, stage: str) -> str:
    """After a kill: nothing accepted differs from the reference; then finish the job and check that
    the artifacts equal the reference and that no unit accepted before was made again."""
    accepted = accepted_records(job_dir)
    # No half-written artifact is ever accepted: every unit that counts as done has reference bytes.
    job = read_job(job_dir)
    for (s, key), _ in accepted.items():
        unit = next(u for u in plan_units(job)[s] if u.key == key)
        for name in unit.outputs:
            assert (job_dir / s / name).read_bytes() == harness.reference[f"{s}/{name}"], f"{s}/{name} accepted but differs"
    # Earlier stages were complete before the kill and must stay so.
    for earlier in STAGES[: STAGES.index(stage)]:
        assert sum(1 for s, _ in accepted if s == earlier) == UNITS[earlier]
    leftovers = temp_files(job_dir)
    done_in_stage = sum(1 for s, _ in accepted if s == stage)

    _, runs, _ = run_inprocess(harness.job_file, job_dir.parent)

    made = {run.stage: run.summary["units_done"] for run in runs}
    expected = {s: UNITS[s] - (done_in_stage if s == stage else 0) for s in STAGES[STAGES.index(stage):]}
    assert made == {s: n for s, n in expected.items() if n}, "a finished unit was made again, or a missing one was not"
    for (s, key), identity in accepted.items():
        path = job_dir / s / f"{key}.json"
        assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) == identity, f"{s} {key} was recomputed"
    assert artifact_bytes(job_dir) == harness.reference  # byte-identical images, latents and embeddings
    records = sorted(p.relative_to(job_dir).as_posix() for s in STAGES for p in (job_dir / s).glob("*.json") if p.name != "summary.json")
    assert records == harness.records
    assert temp_files(job_dir) == []
    return f"{done_in_stage}/{UNITS[stage]} units done at the kill, temp files {leftovers or 'none'}"


# ---------------------------------------------------------------------------------------------
# The trials


@pytest.mark.parametrize(("stage", "point", "arg"), TRIALS, ids=[f"{s}-{p}-{a}" for s, p, a in TRIALS])
def test_killed_or_failed_stage_recovers_exactly(harness, tmp_path, stage, point, arg):
    """Guards point 1 (kill -9 at any moment) and point 6 (write errors): see the module docstring."""
    if point == "random":
        delay = arg * harness.duration(stage, tmp_path / "calibrate")
        process, job_dir = harness.start(stage, ("slow", None), tmp_path / "work")
        process.join(delay)
        if process.exitcode is None:
            process.kill()
        process.join(60)
        assert process.exitcode in (0, -signal.SIGKILL)
    else:
        process, job_dir = harness.start(stage, (point, arg), tmp_path / "work")
        process.join(120)
        assert process.exitcode is not None, "stage process hung"

    if point == "write-error":
        # The stage stops with the resource exit code and one clear line; nothing partial remains.
        assert process.exitcode == contract.EXIT_RESOURCE_ERROR
        error = [line for line in (job_dir / stage / "stage.log").read_text().splitlines() if "error:" in line]
        assert len(error) == 1 and "could not write" in error[0] and "File too large" in error[0], error
        assert "free disk space" in error[0]
        assert temp_files(job_dir) == []
    elif point != "random":
        assert process.exitcode == -signal.SIGKILL
        # The kill landed where it was aimed.
        unit = plan_units(read_job(job_dir))[stage][arg]
        artifact = job_dir / stage / unit.outputs[0]
        if point in ("artifact-partial", "artifact-unrenamed"):
            assert (job_dir / stage / f"{TMP_PREFIX}{process.pid}-{artifact.name}").exists() and not artifact.exists()
        elif point == "record-missing":
            assert artifact.exists() and not unit.record_path(job_dir).exists()
        elif point == "record-partial":
            assert read_record(unit.record_path(job_dir))[0] is None
            assert (job_dir / stage / f"{TMP_PREFIX}{process.pid}-{unit.key}.json").exists()
        if point != "summary":
            assert not unit_status(job_dir, unit)[0]
    outcome = check_recovery(harness, job_dir, stage)
    print(f"fault trial {stage} {point} {arg}: exit {process.exitcode}, {outcome}: recovered byte-identical")


@pytest.mark.platforms
def test_kill9_of_a_real_stage_process(harness, tmp_path):
    """Guards point 1 with a real `python -m stages.denoise` process, killed after its first record."""
    shutil.copytree(harness.templates["denoise"], tmp_path / "work")
    job_dir = tmp_path / "work" / JOB_NAME
    env = dict(os.environ, PYTHONPATH=project_pythonpath())
    process = subprocess.Popen(stage_command("denoise", job_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = plan_units(read_job(job_dir))["denoise"]
    deadline = time.monotonic() + 120
    while not any(read_record(u.record_path(job_dir))[0] for u in units):
        assert time.monotonic() < deadline, "no denoise record appeared"
        try:
            process.wait(timeout=0.005)
            break
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    assert process.wait(30) in (-signal.SIGKILL, 0)
    print(f"fault trial denoise real-process: {check_recovery(harness, job_dir, 'denoise')}")


def test_ctrl_c_stops_orchestrate_run_cleanly_and_a_second_run_is_refused(tiny_model, tmp_path):
    """Guards point 1 (Ctrl-C) and point 4 (concurrent runs) on a real `orchestrate run`:
    while it runs, a second run on the same job is refused naming its pid; Ctrl-C (SIGINT to the
    process group, as a terminal sends it) then stops the running stage, exit 130 with how to
    resume, no traceback and no temp file; a rerun finishes without redoing finished items."""
    # Denoise takes seconds here (60 steps), so the Ctrl-C surely lands while it works: with the
    # 3-step job it finished in ~0.1 s, and the signal sometimes hit decode instead.
    (tmp_path / "slow").mkdir()
    harness = Harness(tmp_path / "slow", tiny_model, FAULT_JOB.replace("num_inference_steps = 3", "num_inference_steps = 60"))
    workdir = tmp_path / "work"
    job_dir = workdir / JOB_NAME
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = dict(os.environ, PYTHONPATH=project_pythonpath())
    command = [str(Path(sys.executable).with_name("orchestrate")), "run", str(harness.job_file), "--workdir", str(workdir), "--device", "cpu"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        def wait_for(condition, what):
            deadline = time.monotonic() + 120
            while not condition():
                assert process.poll() is None, f"orchestrate ended before {what}: {err.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.01)

        wait_for(lambda: (job_dir / "encode" / "stage.log").exists(), "the encode stage")
        resolved = (job_dir / "job.resolved.json").stat()
        second = CliRunner().invoke(app, ["run", str(harness.job_file), "--workdir", str(workdir), "--device", "cpu"])
        assert second.exit_code == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {process.pid}" in lines[0] and "already running" in lines[0], second.stderr
        assert (job_dir / "job.resolved.json").stat().st_mtime_ns == resolved.st_mtime_ns  # the refused run wrote nothing

        log = job_dir / "denoise" / "stage.log"
        wait_for(lambda: log.exists() and "to do" in log.read_text(), "the denoise stage to start its work")
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == contract.EXIT_INTERRUPTED
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr_text = err.read_text()
    assert "interrupted" in stderr_text and "run the same command again to resume" in stderr_text
    assert "Traceback" not in stderr_text + out.read_text()
    assert "interrupted; finished items are kept" in log.read_text()
    assert temp_files(job_dir) == []
    print(f"ctrl-c trial: {check_recovery(harness, job_dir, 'denoise')}")
