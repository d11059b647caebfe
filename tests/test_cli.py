"""Guards the user-facing CLI: the console script works, the real subprocess path runs end to end
with progress and a summary, a rerun is a no-op, and expected failures are one line with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.conftest import project_pythonpath, resolved_items, run_inprocess, write_job

ORCHESTRATE = [sys.executable, "-m", "orchestrator.cli"]


def orchestrate(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=project_pythonpath())
    return subprocess.run([*ORCHESTRATE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "stage", "status", "demo"):
        assert command in result.output


def test_console_script_entry_point_exists():
    """pyproject's `orchestrate = orchestrator.cli:main` must name a real function."""
    import tomllib

    target = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]["orchestrate"]
    module, func = target.split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


@pytest.mark.platforms
def test_run_end_to_end_with_real_subprocesses(tiny_model, tmp_path):
    job_file = write_job(tmp_path, f"""
        [job]
        name = "e2e"
        model = "{tiny_model}"
        [defaults]
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 3
        [[generation]]
        prompt = "pirate ship trapped in a cosmic maelstrom nebula"
        seed = 1152753
        count = 2
    """)
    first = orchestrate("run", str(job_file), "--workdir", "work", "--device", "cpu", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    for stage in ("encode", "denoise", "decode"):
        assert f"> python -m stages.{stage} work/e2e" in out  # the exact command, rerunnable by hand
    assert "peak host RSS" in out  # the summary table
    job_dir = tmp_path / "work" / "e2e"
    step = "denoise: 0000-pirate-ship-trapped-in-a-cosmic-maelstro step 3/3"  # per-step progress: the stage's log only
    assert step in (job_dir / "denoise" / "stage.log").read_text() and step not in first.stderr
    assert "denoise: 2/2 items in" in first.stderr  # the console's progress line
    items = resolved_items(job_dir)
    assert [i["seed"] for i in items] == [1152753, 1152754]

    # The PNGs carry their generation parameters.
    from PIL import Image

    with Image.open(job_dir / items[0]["image"]) as image:
        assert image.text["prompt"] == "pirate ship trapped in a cosmic maelstrom nebula"
        assert image.text["seed"] == "1152753"

    # Separate processes and the in-process path write byte-identical artifacts.
    other_dir, _, _ = run_inprocess(job_file, tmp_path / "other")
    for rel in ("decode/" + items[1]["id"] + ".png", "denoise/" + items[1]["id"] + ".safetensors"):
        assert (job_dir / rel).read_bytes() == (other_dir / rel).read_bytes(), rel

    second = orchestrate("run", str(job_file), "--workdir", "work", "--device", "cpu", cwd=tmp_path)
    assert second.returncode == 0
    assert "nothing to do" in second.stdout and "> python" not in second.stdout

    status = orchestrate("status", str(job_file), "--workdir", "work", "--device", "cpu", cwd=tmp_path)
    assert "decode: 2 up to date, 0 to do" in status.stdout

    # A stage can be run directly, as printed.
    direct = subprocess.run([sys.executable, "-m", "stages.decode", str(job_dir), "--force"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=project_pythonpath()),
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert "decode: done 2" in direct.stderr


def test_bad_job_file_is_one_line_exit_2_and_writes_nothing(tiny_model, tmp_path):
    job_file = write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [[generation]]
        prompt = "x"
        guidance = 3
    """)
    result = orchestrate("run", str(job_file), "--workdir", "work", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "'guidance'" in lines[0] and "did you mean 'guidance_scale'" in lines[0]
    assert not (tmp_path / "work").exists()


def test_missing_upstream_artifact_for_a_single_stage_is_one_line(tiny_model, tmp_path):
    job_file = write_job(tmp_path, f"""
        [job]
        name = "lonely"
        model = "{tiny_model}"
        [[generation]]
        prompt = "x"
        width = 64
        height = 64
        use_resolution_binning = false
    """)
    result = CliRunner().invoke(app, ["stage", "denoise", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "encode" in result.output and "orchestrate run" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_model_folder_is_one_line(tmp_path):
    job_file = write_job(tmp_path, """
        [job]
        model = "./no-such-model"
        [[generation]]
        prompt = "x"
    """)
    result = CliRunner().invoke(app, ["run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "no-such-model does not exist" in result.output
    assert not (tmp_path / "work").exists()


def test_stage_rerun_makes_later_stages_stale(tiny_model, tmp_path):
    """`orchestrate stage encode` remakes encode; identical embeddings leave the rest up to date,
    while a changed model component would make them stale through the hashes alone."""
    job_file = write_job(tmp_path, f"""
        [job]
        name = "rerun"
        model = "{tiny_model}"
        [[generation]]
        prompt = "a red apple"
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 1
        seed = 3
    """)
    run_inprocess(job_file, tmp_path / "work")
    result = orchestrate("stage", "encode", str(job_file), "--workdir", "work", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "> python -m stages.encode work/rerun --force" in result.stdout
    _, runs, _ = run_inprocess(job_file, tmp_path / "work")
    assert runs == []  # same bytes, same hashes: nothing downstream is stale
