"""No stage process outlives the orchestrator (issue 11, point 1).

A real `orchestrate run` (a 4-item job on the tiny model, 60 denoise steps so every stage takes a
moment) is killed at a random moment: its whole process group with SIGKILL (`timeout -s KILL`, a
batch scheduler, a dropped SSH session), or the orchestrator alone with SIGTERM or SIGHUP. The stage
process started ahead with `--wait` lives in its own session, so a group kill does not reach it: it
must die with its parent (stages/lifeline.py). Each trial then checks that

  - within 2 s no stage process of the job is left (running or waiting);
  - SIGTERM / SIGHUP end the orchestrator like Ctrl-C: exit 143 / 129, one line saying how to
    resume, no traceback;
  - the same command, run at once, succeeds; the job's artifacts are byte-identical to an
    uninterrupted run's, and no unit accepted before the kill is made again.

Trials are drawn from SEED: the default suite runs 6 (a kill in each stage, one while only a
waiting stage is ahead, SIGTERM, SIGHUP); `pytest -m stress` runs 18 more at random moments.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.contract import STAGES
from tests.conftest import artifact_bytes, project_pythonpath, write_job
from tests.test_faults import FAULT_JOB, JOB_NAME, UNITS, Harness, accepted_records, temp_files

SEED = 11_2026
ORCHESTRATE = str(Path(sys.executable).with_name("orchestrate"))


@pytest.fixture(scope="module")
def slow_harness(tiny_model, tmp_path_factory) -> Harness:
    return Harness(tmp_path_factory.mktemp("orphans"), tiny_model, FAULT_JOB.replace("num_inference_steps = 3", "num_inference_steps = 60"))


def stage_processes(job_dir: Path) -> dict[int, str]:
    """pid -> command line of every live (not zombie) stage process working on `job_dir`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "-m stages." in cmdline and str(job_dir) in cmdline and state not in ("Z", "X"):
            found[int(entry.name)] = cmdline
    return found


def trial(harness: Harness, work: Path, target: str, delay: float, how: str) -> str:
    """One kill: wait until `target`'s stage is at work, `delay` s more, then `how` (SIGKILL to the
    group, SIGTERM or SIGHUP to the orchestrator); check what is left and that a rerun finishes.

    A fast machine may finish the job inside `delay` (decode of 4 tiny images takes well under a
    second), and then the signal kills nothing. Such an attempt proves nothing, so it is made again
    from scratch with half the delay, up to 4 times; a trial whose signal never lands fails."""
    for _ in range(4):
        shutil.rmtree(work, ignore_errors=True)
        report = _attempt(harness, work, target, delay, how)
        if report is not None:
            return report
        delay /= 2
    pytest.fail(f"{how} at {target}: the job finished before the signal in every attempt (last delay {delay * 2:.2f} s)")


def _attempt(harness: Harness, work: Path, target: str, delay: float, how: str) -> str | None:
    """One attempt of `trial`; None when the job had finished before the signal landed."""
    job_dir = work / JOB_NAME
    env = dict(os.environ, PYTHONPATH=project_pythonpath())
    out, err = work.with_suffix(".out"), work.with_suffix(".err")
    command = [ORCHESTRATE, "run", str(harness.job_file), "--workdir", str(work), "--device", "cpu"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        log = job_dir / target / "stage.log"
        deadline = time.monotonic() + 120
        while process.poll() is None and not (log.exists() and "to do" in log.read_text()):
            assert time.monotonic() < deadline, f"timed out waiting for {target}"
            time.sleep(0.01)
        time.sleep(delay)
        if process.poll() == 0:
            return None  # finished inside the delay: nothing to kill
        at_kill = stage_processes(job_dir)
        if how == "SIGKILL":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            os.kill(process.pid, getattr(signal, how))
        code = process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Nothing of this job may run 2 s after the orchestrator is gone.
    deadline = time.monotonic() + 2
    while stage_processes(job_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = stage_processes(job_dir)
    assert not left, f"{how}: stage processes outlived the orchestrator: {left}"
    if code == 0:
        return None  # the job finished between the check above and the signal
    if how == "SIGKILL":
        assert code == -signal.SIGKILL, (code, err.read_text()[-2000:])
    else:
        lines = err.read_text().strip().splitlines()
        assert code == 128 + getattr(signal, how), (code, err.read_text()[-2000:])
        assert "run the same command again to resume" in lines[-1], lines
        assert "Traceback" not in err.read_text() + out.read_text()

    accepted = accepted_records(job_dir) if (job_dir / "job.resolved.json").exists() else {}
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, f"{how}: the immediate rerun failed: {rerun.stderr[-2000:]}"
    for (stage, key), identity in accepted.items():
        path = job_dir / stage / f"{key}.json"
        assert (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) == identity, f"{stage} {key} was made again"
    assert artifact_bytes(job_dir) == harness.reference  # byte-identical embeddings, latents and images
    assert temp_files(job_dir) == []
    running = sorted({c.split("-m stages.")[1].split()[0] + (" (started ahead)" if "--wait" in c else "") for c in at_kill.values()})
    done = {s: sum(1 for st, _ in accepted if st == s) for s in STAGES}
    return f"{how} at {target}+{delay:.2f}s: stages alive at the kill {running or 'none'}, done {done}, exit {code}"


_rng = random.Random(SEED)
BASIC = [("encode", 0.0, "SIGKILL"), ("denoise", 0.3, "SIGKILL"), ("decode", 0.0, "SIGKILL"), ("denoise", 0.0, "SIGKILL"),
         ("denoise", 0.5, "SIGTERM"), ("encode", 0.0, "SIGHUP")]
STRESS = ([(_rng.choice(STAGES), round(_rng.uniform(0, 1.5), 2), "SIGKILL") for _ in range(12)]
          + [(_rng.choice(STAGES), round(_rng.uniform(0, 1.5), 2), how) for how in ("SIGTERM", "SIGHUP") for _ in range(3)])


@pytest.mark.platforms
@pytest.mark.parametrize(("target", "delay", "how"), BASIC, ids=[f"{h}-{t}-{d}" for t, d, h in BASIC])
def test_no_stage_outlives_the_orchestrator(slow_harness, tmp_path, target, delay, how):
    print(trial(slow_harness, tmp_path / "work", target, delay, how))


@pytest.mark.stress
@pytest.mark.parametrize(("target", "delay", "how"), STRESS, ids=[f"{n}-{h}-{t}-{d}" for n, (t, d, h) in enumerate(STRESS)])
def test_no_stage_outlives_the_orchestrator_at_random_moments(slow_harness, tmp_path, target, delay, how):
    print(trial(slow_harness, tmp_path / "work", target, delay, how))


@pytest.mark.platforms
def test_a_stage_started_by_hand_is_not_bound(monkeypatch):
    """Without the orchestrator's variable nothing is armed; with it, the process is bound (on
    Linux by the kernel) and the variable is gone, so what the stage starts does not inherit it."""
    from stages import lifeline

    monkeypatch.delenv(lifeline.ENV, raising=False)
    assert lifeline.bind_to_parent() is None
    code = ("import os, sys; from stages import lifeline; os.environ[lifeline.ENV] = str(os.getppid()); "
            "how = lifeline.bind_to_parent(); print(how, lifeline.ENV in os.environ)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=project_pythonpath()))
    assert result.stdout.split() == ["prctl" if sys.platform.startswith("linux") else "watch", "False"], result.stderr


@pytest.mark.platforms
def test_a_stage_whose_orchestrator_is_already_gone_exits_at_once():
    """The race: the orchestrator died between starting the stage and the binding."""
    result = subprocess.run([sys.executable, "-m", "stages.denoise", "/nonexistent", "--wait"],
                            env=dict(os.environ, PYTHONPATH=project_pythonpath(), PIXART_ORCHESTRATOR_PID="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and result.stdout == "" and result.stderr == ""


def test_an_interrupt_that_a_library_turns_into_another_error_is_still_an_interrupt(tiny_model, tmp_path):
    """Found by the stress trials: SIGINT, forwarded while a stage imported diffusers, surfaced as a
    RuntimeError (numpy's and transformers' lazy imports wrap the KeyboardInterrupt) and printed a
    traceback. With a signal on record, any error is the interruption: exit 130, one line."""
    from orchestrator.jobfile import job as jobfile
    from stages.contract import RESOLVED_JOB
    from stages.files import publish_json

    job_file = write_job(tmp_path, f'[job]\nmodel = "{tiny_model}"\n[[generation]]\nprompt = "an owl"\nseed = 1\n')
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, tmp_path / "work")
    job_dir.mkdir(parents=True)
    publish_json(job_dir / RESOLVED_JOB, jobfile.resolve_job(job, job_dir, "cpu"))
    script = (
        "import os, signal, sys, time\n"
        "from stages import entry\n"
        "def make_units(job, job_dir, todo, log):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(5)\n"
        "    except KeyboardInterrupt as exc:  # what a lazy import wrapper does with it\n"
        "        raise RuntimeError('Failed to import diffusers.pipelines because of the following error') from exc\n"
        f"sys.exit(entry.stage_main('encode', make_units, [{str(job_dir)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=project_pythonpath()),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "encode: interrupted; finished items are kept" in result.stderr
