"""bench/gpu.sh --smoke: the GPU benchmark's whole path (model build, `orchestrate run` under each
budget, both diffusers baselines, tables) on the CPU with a tiny model, so a lent GPU's one call
is not spent finding a bug in the script. Starts ~20 real processes: about 1-2 minutes here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "ours --max-vram 1GiB",
    "ours --max-vram 2GiB",
    "ours --max-vram 6GiB",
    "ours, no budget flag",
    "diffusers, all resident",
    "diffusers, model CPU offload",
)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """{run name: cells} of the summary table."""
    rows = {}
    for line in markdown.split("## Summary", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ROWS:
            rows[cells[0]] = cells
    return rows


def test_gpu_bench_smoke_prints_its_table_with_all_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    markdown = (out / "gpu_bench.md").read_text()
    assert result.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1]), "the table must be printed last"
    assert {p.name for p in out.iterdir()} == {"gpu_bench.md", "gpu_bench.json", "gpu_bench.log"}  # the device tool brings back 8 at most

    rows = table_rows(markdown)
    assert set(rows) == set(ROWS)
    for name, cells in rows.items():
        if "no --max-vram" in cells[-1]:  # allowed only while the budget flags have not landed
            assert name.startswith("ours --max-vram"), cells
            warnings.warn(f"{name}: {cells[-1]}")
            continue
        assert cells[1] == "4/4", cells  # every image made
        if name == "diffusers, all resident":
            assert cells[-1] == "(reference)", cells
        elif not name.startswith("ours --max-vram"):  # a budget may batch or tile: close, not always equal
            assert cells[-1].startswith("4/4 equal"), cells  # no budget on the CPU: the exact defaults

    report = json.loads((out / "gpu_bench.json").read_text())
    ours = report["runs"]["ours, no budget flag"]
    assert list(ours["stages"]) == ["encode", "denoise", "decode"]
    for stage in ours["stages"].values():  # read from the records and summaries
        assert stage["units"] >= 1 and stage["compute"] > 0 and stage["peak"]["host_peak_rss_bytes"] > 0
    assert report["runs"]["diffusers, all resident"]["report"]["components"]["denoise"]["calls"] == 4 * 2  # 4 images x 2 steps
