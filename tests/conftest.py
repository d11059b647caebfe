"""Shared fixtures: a tiny PixArt-alpha model built offline once per run, job-file helpers, and an
in-process stage launcher that goes through the same planning code as `orchestrate run`."""

from __future__ import annotations

import importlib
import json
import os
import textwrap
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from orchestrator import job as jobfile  # noqa: E402
from orchestrator.runner import StageRun, run_job  # noqa: E402
from stages.contract import Clock  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests that need real weights or a GPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow (real weights or a GPU)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A complete tiny diffusers folder with random weights (see orchestrator/tiny.py)."""
    from orchestrator.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def write_job(folder: Path, body: str, name: str = "job.toml") -> Path:
    path = Path(folder) / name
    path.write_text(textwrap.dedent(body))
    return path


def inprocess_stage(stage: str, job_dir: Path, force: bool, echo) -> StageRun:
    """Run a stage's `main` in this process (fast); raises if it fails, like run_stage does."""
    module = importlib.import_module(f"stages.{stage}")
    clock = Clock()
    code = module.main([str(job_dir)] + (["--force"] if force else []))
    if code != 0:
        raise RuntimeError(f"stage {stage} exited {code}")
    return StageRun(stage, clock.seconds(), json.loads((job_dir / stage / "summary.json").read_text()))


def run_inprocess(job_file: Path, workdir: Path, force=(), device="cpu") -> tuple[Path, list[StageRun], list[str]]:
    """`orchestrate run` with in-process stages: (job_dir, stage runs, printed lines)."""
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, workdir)
    resolved = jobfile.resolve_job(job, job_dir, device)
    lines: list[str] = []
    runs = run_job(job_dir, resolved, lines.append, tuple(force), launch=inprocess_stage)
    return job_dir, runs, lines


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resolved_items(job_dir: Path) -> list[dict]:
    return json.loads((job_dir / "job.resolved.json").read_text())["items"]
