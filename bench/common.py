"""Helpers the benchmarks share: how to start `orchestrate`, reading a job's records, tables.

The benchmarks read only what the stages publish (summary.json, per-item records, the PNGs and
job.resolved.json), so they measure the product as a user runs it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("encode", "denoise", "decode")
TMP_PREFIX = ".tmp-"  # stages.contract.TMP_PREFIX: a write in flight (or left by a killed stage)


def published(folder: Path, pattern: str) -> list[Path]:
    """The files matching `pattern` in `folder`, sorted, without the temporary files of writes in
    flight (pathlib's `*` matches names starting with a dot, so `*.json` would see them)."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith(TMP_PREFIX))


def orchestrate_command() -> list[str]:
    """The `orchestrate` console script beside this interpreter, else `python -m orchestrator.cli`
    (the same entry point; a checkout copied to a GPU machine has no console script)."""
    script = Path(sys.executable).parent / "orchestrate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def subprocess_env(threads: int | None = None) -> dict:
    """Our environment plus the repository on PYTHONPATH, offline mode and unbuffered output;
    `threads` sets the CPU threads torch uses (OMP_NUM_THREADS, MKL_NUM_THREADS)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def format_bytes(n) -> str:
    if n is None:
        return "-"
    if n < 1024**3:
        return f"{n / 1024**2:.0f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub table, columns padded so it also reads well in a terminal."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def read_stage(job_dir: Path, stage: str) -> dict:
    """A stage's summary.json, its per-item records, and the strategy the plan gave it (if any)."""
    folder = Path(job_dir) / stage
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8")) if (folder / "summary.json").exists() else {}
    records = []
    for path in published(folder, "*.json"):
        if path.name != "summary.json":
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("stage") == stage:
                records.append(record)
    resolved = json.loads((Path(job_dir) / "job.resolved.json").read_text(encoding="utf-8"))
    plan = ((resolved.get("runtime") or {}).get("stages") or {}).get(stage) or {}
    return {"summary": summary, "records": records, "plan": plan}


def stage_spans(job_dir: Path) -> dict[str, float]:
    """Wall seconds of each stage process, from file times: job.resolved.json is written just
    before encode starts, and each stage writes its summary.json last. A span includes the
    process start, imports and the orchestrator's re-planning before the stage."""
    job_dir = Path(job_dir)
    previous = (job_dir / "job.resolved.json").stat().st_mtime
    spans = {}
    for stage in STAGES:
        summary = job_dir / stage / "summary.json"
        if not summary.exists():
            break
        spans[stage] = round(summary.stat().st_mtime - previous, 2)
        previous = summary.stat().st_mtime
    return spans


def first_file_seconds(folder: Path, pattern: str, start_epoch: float) -> float | None:
    """Seconds from `start_epoch` to the earliest file matching `pattern` (its mtime)."""
    times = [p.stat().st_mtime for p in published(folder, pattern)]
    return round(min(times) - start_epoch, 2) if times else None


def load_rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def compare_images(ours: list[Path], theirs: list[Path]) -> dict:
    """How many pairs are equal (np.array_equal) and the largest absolute pixel difference."""
    import numpy as np

    equal, worst, compared = 0, 0, 0
    for a, b in zip(ours, theirs):
        if not (Path(a).exists() and Path(b).exists()):
            continue
        x, y = load_rgb(a), load_rgb(b)
        compared += 1
        if x.shape != y.shape:
            worst = 255
            continue
        equal += bool(np.array_equal(x, y))
        worst = max(worst, int(np.abs(x.astype(int) - y.astype(int)).max()))
    return {"compared": compared, "equal": equal, "max_abs_diff": worst}


def machine() -> dict:
    """CPU model, cores, memory, package versions and the GPU (from nvidia-smi), for the results
    header. Imports no torch: a CUDA context here would hold GPU memory while the runs go."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = int(Path("/proc/meminfo").read_text(encoding="utf-8").split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory": format_bytes(memory) if memory else "?", "python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        result = subprocess.run(query, capture_output=True, encoding="utf-8", errors="replace", check=False)
        if result.returncode == 0 and result.stdout.strip():
            info["gpu"] = result.stdout.strip().splitlines()[0]
    return info


def results_dir(out: Path | None) -> Path:
    """--out, else $OUT (the device tool's folder), else bench/results/."""
    folder = Path(out or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def copy_tree_logs(job_dir: Path, log) -> None:
    """Append each stage.log of a job to `log` (a text file object)."""
    for stage in STAGES:
        path = Path(job_dir) / stage / "stage.log"
        if path.exists():
            log.write(f"\n----- {path} -----\n{path.read_text(encoding='utf-8', errors='replace')}")


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fresh_folder(path: Path) -> Path:
    """`path` as a new empty folder. Leftovers of an earlier run are removed; what cannot be removed
    (a file still held open, a read-only tree) is moved aside as <name>.old-<ns> rather than failing."""
    path = Path(path)
    remove(path)
    if path.exists():
        path.rename(path.with_name(f"{path.name}.old-{time.time_ns()}"))
    path.mkdir(parents=True)
    return path


def write_job(path: Path, model: Path, items: list[dict], name: str, written_by: str, components: dict | None = None) -> None:
    """A job file with one [[generation]] per item (each item's keys as TOML values); `components`
    ({component: folder}) becomes its [job.components] table."""
    lines = [f"# Written by {written_by}", "[job]", f'name = "{name}"', f'model = "{model}"', ""]
    if components:
        lines += ["[job.components]", *(f'{part} = "{folder}"' for part, folder in components.items()), ""]
    for item in items:
        lines.append("[[generation]]")
        lines += [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in item.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
