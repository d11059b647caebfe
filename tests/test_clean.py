"""`orchestrate clean` (issue 11, point 4): lists what no current item uses, with sizes; removes it
only with --yes; never touches a current item's files; refuses while a run holds the job; with
--store, cleans store entries no job folder holds."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from orchestrator.executors import session
from orchestrator.cli import app
from orchestrator.executors.runner import PROJECT_ROOT
from tests.conftest import write_job

JOB = """
[job]
name = "tidy"
model = "{model}"
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2
[[generation]]
prompt = "an owl reading a book"
seed = 1
[[generation]]
prompt = "{second}"
seed = 2
"""


def test_clean_lists_then_removes_only_what_no_current_item_uses(tiny_model, tmp_path, cli_in_process):
    workdir = tmp_path / "work"
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, second="a red apple"))
    session.run_job_file(job_file, workdir, "cpu", (), echo=print)
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, second="a lighthouse by the sea"))  # the prompt edited
    session.run_job_file(job_file, workdir, "cpu", (), echo=print)
    job_dir = workdir / "tidy"
    (job_dir / "decode" / ".tmp-999-left-by-a-kill.png").write_bytes(b"half")
    old = sorted(p.name for s in ("encode", "denoise", "decode") for p in (job_dir / s).iterdir() if "apple" in p.name)
    assert len(old) == 7  # embedding, latents, image, its thumbnail and their records

    listed = CliRunner().invoke(app, ["clean", str(job_file), "--workdir", str(workdir)])
    assert listed.exit_code == 0, listed.output
    assert sum(line.startswith("unused") for line in listed.output.splitlines()) == 8
    assert "8 file(s) in tidy unused:" in listed.output and "run again with --yes" in listed.output
    assert all((job_dir / s / n).exists() for s in ("encode", "denoise", "decode") for n in old if (job_dir / s / n).exists()) and \
        sum(1 for s in ("encode", "denoise", "decode") for p in (job_dir / s).iterdir() if "apple" in p.name) == 7  # listing removes nothing

    removed = CliRunner().invoke(app, ["clean", str(job_file), "--workdir", str(workdir), "--yes", "--store"])
    assert removed.exit_code == 0, removed.output
    assert not [p for s in ("encode", "denoise", "decode") for p in (job_dir / s).iterdir() if "apple" in p.name or p.name.startswith(".tmp-")]
    assert "removed 8 file(s) in tidy, 2 store entries" in removed.output  # the apple embedding's .safetensors and .json
    assert not [p for p in (workdir / ".store" / "encode").iterdir() if "apple" in p.name]
    status = CliRunner().invoke(app, ["status", str(job_file), "--workdir", str(workdir), "--device", "cpu"])
    assert "to do" in status.output and all(line.endswith(" 0 to do") for line in status.output.splitlines() if line.startswith(("encode:", "denoise:", "decode:"))), status.output
    again = CliRunner().invoke(app, ["clean", str(job_file), "--workdir", str(workdir), "--store"])
    assert "nothing to clean" in again.output


def test_clean_refuses_while_a_run_holds_the_job(tiny_model, tmp_path):
    workdir = tmp_path / "work"
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, second="a red apple"))
    (workdir / "tidy").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from stages.locks import exclusive_lock\n"
                               "with exclusive_lock(sys.argv[1], 'job tidy'):\n    print('held', flush=True); time.sleep(60)",
                               str(workdir / "tidy" / "run.lock")], env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["clean", str(job_file), "--workdir", str(workdir), "--yes", "--device", "cpu"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.stderr and "already running" in result.stderr
    finally:
        holder.kill()
        holder.wait()
