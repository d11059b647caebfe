"""`orchestrate clean` on hostile folders (issue 17, points 1-2): a stage folder, `.store` or
`.store/encode` that is a link out is refused in one line (exit 2) and nothing outside is touched;
a link planted inside is removed itself, never its target; a FIFO or folder is removed unopened."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from orchestrator.executors import session
from orchestrator.cli import app
from tests.conftest import artifact_bytes, write_job

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
"""


def _outside(tmp_path):
    """A folder outside the workdir with files an attacker would like deleted."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("precious.txt", "0000-an-owl-reading-a-book.json", "stale.safetensors"):
        (outside / name).write_text(f"keep {name}")
    return outside


def _clean(job_file, workdir, *extra):
    return CliRunner().invoke(app, ["clean", str(job_file), "--workdir", str(workdir), "--device", "cpu", "--yes", *extra])


@pytest.fixture
def finished(tiny_model, tmp_path, cli_in_process):
    """A finished run of a one-image job: (job file, workdir, job folder, its artifacts' bytes)."""
    workdir = tmp_path / "work"
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    session.run_job_file(job_file, workdir, "cpu", (), echo=print)
    job_dir = workdir / "tidy"
    made = artifact_bytes(job_dir)
    assert any(name.endswith(".png") for name in made)
    return job_file, workdir, job_dir, made


@pytest.mark.parametrize("stage", ["encode", "denoise", "decode"])
def test_clean_refuses_a_stage_folder_linked_out(finished, tmp_path, stage):
    job_file, workdir, job_dir, made = finished
    outside = _outside(tmp_path)
    shutil.move(job_dir / stage, tmp_path / f"real-{stage}")  # the job's own folder, kept aside
    (job_dir / stage).symlink_to(outside, target_is_directory=True)
    result = _clean(job_file, workdir)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and f"{stage} is a link to {outside}" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in outside.iterdir()) == ["0000-an-owl-reading-a-book.json", "precious.txt", "stale.safetensors"]  # no .lock made there either
    (job_dir / stage).unlink()
    shutil.move(tmp_path / f"real-{stage}", job_dir / stage)
    assert artifact_bytes(job_dir) == made


@pytest.mark.parametrize("linked", [".store", ".store/encode"])
def test_clean_store_refuses_a_store_linked_out(finished, tmp_path, linked):
    job_file, workdir, job_dir, made = finished
    outside = _outside(tmp_path)
    store = workdir / linked
    shutil.rmtree(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.symlink_to(outside, target_is_directory=True)
    result = _clean(job_file, workdir, "--store")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "not a folder of the store" in result.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["0000-an-owl-reading-a-book.json", "precious.txt", "stale.safetensors"]
    assert artifact_bytes(job_dir) == made


def test_clean_removes_planted_links_and_fifos_themselves(finished, tmp_path):
    job_file, workdir, job_dir, made = finished
    outside = _outside(tmp_path)
    (job_dir / "decode" / "9999-planted.png").symlink_to(outside / "precious.txt")
    (job_dir / "denoise" / "dir-link").symlink_to(outside, target_is_directory=True)
    os.mkfifo(job_dir / "encode" / "pipe.safetensors")  # opening it would block forever
    (job_dir / "decode" / "a-folder").mkdir()
    (job_dir / "decode" / "a-folder" / "link-inside").symlink_to(outside / "stale.safetensors")
    (workdir / ".store" / "encode" / "feedface.safetensors").symlink_to(outside / "stale.safetensors")
    result = _clean(job_file, workdir, "--store")
    assert result.exit_code == 0, result.output
    assert "removed 4 file(s) in tidy, 1 store entry" in result.output
    for gone in ("decode/9999-planted.png", "denoise/dir-link", "encode/pipe.safetensors", "decode/a-folder"):
        assert not os.path.lexists(job_dir / gone), gone
    assert not os.path.lexists(workdir / ".store" / "encode" / "feedface.safetensors")
    assert sorted(p.name for p in outside.iterdir()) == ["0000-an-owl-reading-a-book.json", "precious.txt", "stale.safetensors"]
    assert all((outside / n).read_text() == f"keep {n}" for n in ("precious.txt", "stale.safetensors"))
    assert artifact_bytes(job_dir) == made
