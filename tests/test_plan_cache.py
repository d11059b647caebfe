"""The memory plan is made once (issue 11, point 3): `orchestrate run` keeps each plan in
<job_dir>/plan-cache.json, keyed by the model's hashes, dtype, device type, family and tokens,
the items' shapes and steps, the budgets rounded down to 64 MiB, the flags and the planner's code
version; a rerun with nothing to do reuses the previous runtime section without planning (nor,
on CUDA, asking the GPU for its free memory). bench/noop.py measures what a no-op rerun costs."""

from __future__ import annotations

import json

from orchestrator import cli
from orchestrator.planning import memory
from tests.conftest import write_job

JOB = """
[job]
name = "cached"
model = "{model}"
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2
[[generation]]
prompt = "an owl reading a book"
seed = {a}
[[generation]]
prompt = "a red apple"
seed = {b}
"""


def test_a_plan_is_made_once_per_shape_and_budget(tiny_model, tmp_path, monkeypatch, cli_in_process):
    plans = []
    real = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **k: plans.append(a[5]) or real(*a, **k))
    workdir, job_dir = tmp_path / "work", tmp_path / "work" / "cached"

    def run(a, b, ram="8GiB"):
        job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=a, b=b))
        cli._run(job_file, workdir, "cpu", (), (None, ram, True, False))
        return json.loads((job_dir / "job.resolved.json").read_text())["runtime"]

    first = run(1, 2)
    assert len(plans) == 1 and "plan_cache" not in first
    assert list(json.loads((job_dir / memory.PLAN_CACHE).read_text())) == [first["plan_key"]]
    again = run(1, 2)  # nothing to do: the previous runtime, no planning
    assert len(plans) == 1 and again["plan_cache"] == "not needed: nothing to do"
    reseeded = run(3, 4)  # new images of the same shapes: the cached plan
    assert len(plans) == 1 and reseeded["plan_cache"] == "hit" and reseeded["stages"] == first["stages"]
    assert len(list((job_dir / "decode").glob("*.png"))) == 2
    run(5, 6, "8224MiB")  # 8 GiB + 32 MiB: the same 64 MiB step
    assert len(plans) == 1
    run(7, 8, "9GiB")  # another budget: planned again, and kept
    assert len(plans) == 2 and plans[-1] == 9 * 1024**3
    assert len(json.loads((job_dir / memory.PLAN_CACHE).read_text())) == 2


def test_a_damaged_plan_cache_is_planned_over(tiny_model, tmp_path, cli_in_process):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=1, b=2))
    (tmp_path / "work" / "cached").mkdir(parents=True)
    (tmp_path / "work" / "cached" / memory.PLAN_CACHE).write_text("{half")
    cli._run(job_file, tmp_path / "work", "cpu", (), (None, "8GiB", True, False))
    cache = json.loads((tmp_path / "work" / "cached" / memory.PLAN_CACHE).read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["runtime"]["stages"]
