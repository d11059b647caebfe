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

from orchestrator.jobfile import job as jobfile  # noqa: E402
from orchestrator.views.gallery import toml_string  # noqa: E402,F401 (job files in tests quote strings as the gallery does)
from orchestrator.executors.runner import StageRun, run_job  # noqa: E402
from stages.measure import Clock  # noqa: E402


def project_pythonpath() -> str:
    """PYTHONPATH for a process a test starts: the project, then what was there (in foreign-platform
    mode tests/foreign, so that the process is foreign too)."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))


def pytest_configure(config):
    """Foreign-platform mode (tests/foreign/sitecustomize.py): refuse to run half-set-up, since a
    run without the import guard or the encoding errors would pass for the wrong reason."""
    if os.environ.get("PIXART_FOREIGN_PLATFORM") != "1":
        return
    import builtins
    import sys

    if not getattr(builtins.__import__, "foreign_platform", False) or not sys.flags.warn_default_encoding:
        raise pytest.UsageError("PIXART_FOREIGN_PLATFORM=1 needs PYTHONPATH=$PWD/tests/foreign and PYTHONWARNDEFAULTENCODING=1 "
                                "(see .ci/run)")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests that need real weights or a GPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow (real weights or a GPU)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _warm_math_kernels():
    """The reference pipelines computed in this process get the stages' VML warm-up too
    (stages/entry.py warm_up_math_kernels), so a reference is never the odd one out."""
    from stages.entry import warm_up_math_kernels

    warm_up_math_kernels()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A complete tiny diffusers folder with random weights (see orchestrator/tools/tiny.py)."""
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_256(tmp_path_factory) -> Path:
    """The tiny model with a 256-px default size (sample_size 32, the 256 bins): for jobs that run
    at the model's default size (the tiny model's is 1024 px) or bin their sizes, cheaply."""
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-256", sample_size=32)


def write_job(folder: Path, body: str, name: str = "job.toml") -> Path:
    path = Path(folder) / name
    path.write_text(textwrap.dedent(body))
    return path


def inprocess_stage(stage: str, job_dir: Path, force: bool, echo, units: list[str] | None = None) -> StageRun:
    """Run a stage's `main` in this process (fast); raises if it fails, like run_stage does."""
    module = importlib.import_module(f"stages.{stage}")
    clock = Clock()
    code = module.main([str(job_dir)] + (["--force"] if force else []) + (["--units", ",".join(units)] if units else []))
    if code != 0:
        raise RuntimeError(f"stage {stage} exited {code}")
    return StageRun(stage, clock.seconds(), json.loads((job_dir / stage / "summary.json").read_text()))


@pytest.fixture
def cli_in_process(monkeypatch):
    """`orchestrate run` through the CLI's own code (session.run_job_file, prepare.prepare_job) with in-process stages."""
    from orchestrator.executors import session

    monkeypatch.setattr(session, "run_job", lambda job_dir, resolved, echo, force, **kw: run_job(job_dir, resolved, echo, force, launch=inprocess_stage, **kw))


def run_inprocess(job_file: Path, workdir: Path, force=(), device="cpu", runtime=None, chunk=0, launch=None) -> tuple[Path, list[StageRun], list[str]]:
    """`orchestrate run` with in-process stages: (job_dir, stage runs, printed lines).
    `runtime` is the memory plan (docs/memory.md) to write into the resolved job; `chunk` as
    `--chunk` (0: one process per stage); `launch` replaces the in-process launcher."""
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, workdir)
    resolved = jobfile.resolve_job(job, job_dir, device, runtime=runtime)
    lines: list[str] = []
    runs = run_job(job_dir, resolved, lines.append, tuple(force), launch=launch or inprocess_stage, chunk=chunk)
    return job_dir, runs, lines


def count_reads_and_hashes(monkeypatch):
    """(reads, hashes): Counters of the records read and the files hashed, by path, wherever the
    plan (stages/records.py) and the gallery make them."""
    import collections

    from orchestrator.views import gallery
    from stages import records

    reads, hashes = collections.Counter(), collections.Counter()
    real_read, real_hash = records.read_record, records.sha256_file
    monkeypatch.setattr(records, "read_record", lambda path: reads.update([str(path)]) or real_read(path))
    monkeypatch.setattr(gallery, "read_record", lambda path: reads.update([str(path)]) or real_read(path))
    monkeypatch.setattr(records, "sha256_file", lambda path: hashes.update([str(path)]) or real_hash(path))
    return reads, hashes


def python_probe(code: str) -> str:
    """The last stdout line of `code` run by a fresh interpreter in the project root (what a
    command imports, e.g. no torch, is seen only from a fresh process)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resolved_items(job_dir: Path) -> list[dict]:
    return json.loads((job_dir / "job.resolved.json").read_text())["items"]


# ---------------------------------------------------------------------------------------------
# Helpers for the reliability tests (test_faults, test_reliability, test_jobfile)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file under `root` -> (inode, mtime_ns, size): a rewrite or a new file shows up. The
    job's state cache (.state.json, docs/state.md) is left out: a run may add to it, like a log."""
    root = Path(root)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".state.json"}


def artifact_bytes(job_dir: Path) -> dict[str, bytes]:
    """The bytes of every stage artifact (embeddings, latents, PNGs and their thumbnails) of a job, by relative path."""
    return {p.relative_to(job_dir).as_posix(): p.read_bytes()
            for stage in ("encode", "denoise", "decode") for p in sorted((Path(job_dir) / stage).glob("*"))
            if p.suffix in (".safetensors", ".png", ".webp") and not p.name.startswith(".tmp-")}
