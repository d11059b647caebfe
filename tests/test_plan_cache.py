"""The memory plan is made once (issue 11, point 3): `orchestrate run` keeps each plan in
<job_dir>/plan-cache.json, keyed by the model's hashes, dtype, device type, family and tokens,
the items' shapes and steps, the budgets rounded down to 64 MiB, the flags and the planner's code
version; a rerun with nothing to do reuses the previous runtime section without planning (nor,
on CUDA, asking the GPU for its free memory). bench/noop.py measures what a no-op rerun costs.
`orchestrate plan` takes its table from the same file, under a key with the exact budgets
(issue 21: a second `plan` of a 10,000-item job in well under a second, without torch)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.executors import session
from orchestrator.planning import memory
from tests.conftest import python_probe, write_job

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
        session.run_job_file(job_file, workdir, "cpu", (), (None, ram, True, False), echo=print)
        return json.loads((job_dir / "job.resolved.json").read_text())["runtime"]

    first = run(1, 2)
    assert len(plans) == 1 and "plan_cache" not in first
    # The runtime section, and beside it the chosen estimates for `orchestrate plan` at this budget.
    estimates = memory.estimates_key(first["plan_key"], 8 * 1024**3, 8 * 1024**3)  # --max-ram on the CPU: both
    assert sorted(json.loads((job_dir / memory.PLAN_CACHE).read_text())) == sorted([first["plan_key"], estimates])
    again = run(1, 2)  # nothing to do: the previous runtime, no planning
    assert len(plans) == 1 and again["plan_cache"] == "not needed: nothing to do"
    reseeded = run(3, 4)  # new images of the same shapes: the cached plan
    assert len(plans) == 1 and reseeded["plan_cache"] == "hit" and reseeded["stages"] == first["stages"]
    assert len(list((job_dir / "decode").glob("*.png"))) == 2
    run(5, 6, "8224MiB")  # 8 GiB + 32 MiB: the same 64 MiB step
    assert len(plans) == 1
    run(7, 8, "9GiB")  # another budget: planned again, and kept
    assert len(plans) == 2 and plans[-1] == 9 * 1024**3
    assert len(json.loads((job_dir / memory.PLAN_CACHE).read_text())) == 4


def test_a_budget_no_op_takes_every_unit_from_the_plan_entry(tiny_model, tmp_path, monkeypatch, cli_in_process):
    """Under a budget (or on a GPU) a no-op rerun checks that nothing is left to do before planning
    memory; once the job's state holds a plan entry (docs/state.md) that check makes no unit at all."""
    from stages import records, units

    monkeypatch.setattr(records, "RACY_NS", 0)  # the files were written just now: trust them anyway
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=1, b=2))

    def run():
        session.run_job_file(job_file, tmp_path / "work", "cpu", (), (None, "8GiB", True, False), echo=print)
        return json.loads((tmp_path / "work" / "cached" / "job.resolved.json").read_text())["runtime"]

    run()
    assert run()["plan_cache"] == "not needed: nothing to do"  # judged unit by unit; saves the plan entry
    made = []
    real = units.plan_units
    monkeypatch.setattr(units, "plan_units", lambda *a, **k: made.append(a) or real(*a, **k))
    assert run()["plan_cache"] == "not needed: nothing to do" and not made
    (tmp_path / "work" / "cached" / "decode" / next(p.name for p in (tmp_path / "work" / "cached" / "decode").glob("*.png"))).unlink()
    assert run().get("plan_cache") != "not needed: nothing to do" and made  # a file changed: judged, planned and remade
    assert len(list((tmp_path / "work" / "cached" / "decode").glob("*.png"))) == 2


def test_a_damaged_plan_cache_is_planned_over(tiny_model, tmp_path, cli_in_process):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=1, b=2))
    (tmp_path / "work" / "cached").mkdir(parents=True)
    (tmp_path / "work" / "cached" / memory.PLAN_CACHE).write_text("{half")
    session.run_job_file(job_file, tmp_path / "work", "cpu", (), (None, "8GiB", True, False), echo=print)
    cache = json.loads((tmp_path / "work" / "cached" / memory.PLAN_CACHE).read_text())
    runtimes = [entry["runtime"] for entry in cache.values() if "runtime" in entry]
    assert len(cache) == 2 and len(runtimes) == 1 and runtimes[0]["stages"]  # and its estimates entry


# ---------------------------------------------------------------------------------------------
# `orchestrate plan` through the plan cache (issue 21, point 2)


def _plan(job_file, workdir, *flags) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["plan", str(job_file), "--workdir", str(workdir), *flags])
    return result.exit_code, result.output


@pytest.fixture
def counted(monkeypatch):
    """The plans `orchestrate plan` makes (choose_for_job calls): a hit makes none."""
    made = []
    real = memory.choose_for_job
    monkeypatch.setattr(memory, "choose_for_job", lambda *a, **k: made.append(a[1:]) or real(*a, **k))
    return made


def test_a_second_plan_is_the_first_from_the_cache_without_torch(tiny_model, tmp_path, cli_in_process):
    """`run` keeps its chosen estimates; `plan` for the same budget then prints, as table and JSON,
    exactly what a traced plan prints, in a fresh process that imports no torch, diffusers or
    transformers, with --device auto meaning the CPU the job last ran on."""
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=1, b=2))
    workdir = tmp_path / "work"
    session.run_job_file(job_file, workdir, "cpu", (), (None, "8GiB", True, False), echo=print)
    traced = {flags: _plan(job_file, tmp_path / "fresh", "--device", "cpu", "--max-ram", "8GiB", *flags) for flags in ((), ("--json",))}
    assert traced[()][0] == traced[("--json",)][0] == 0 and "encode" in traced[()][1]
    assert not (tmp_path / "fresh").exists()  # no job folder: planned, and nothing written
    probe = ("import json, sys\nfrom typer.testing import CliRunner\nfrom orchestrator.cli import app\nout = []\n"
             "for flags in (['--device', 'cpu'], ['--device', 'cpu', '--json'], []):\n"
             f"    r = CliRunner().invoke(app, ['plan', {str(job_file)!r}, '--workdir', {str(workdir)!r}, '--max-ram', '8GiB'] + flags)\n"
             "    out.append([r.exit_code, r.output])\n"
             "print(json.dumps([out, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)]))\n")
    (table, as_json, auto), imported = json.loads(python_probe(probe))
    assert imported == []
    assert table == [0, traced[()][1]] and as_json == [0, traced[("--json",)][1]]
    assert json.loads(as_json[1]) == json.loads(traced[("--json",)][1])
    said = "planned for cpu, the device of the job's last run (--device plans for another)\n"
    assert auto == [0, traced[()][1].replace("memory plan for", said + "memory plan for", 1)]


def test_plan_writes_its_cache_and_each_thing_that_decides_the_plan_replans(tiny_model, tmp_path, counted):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    job_file = write_job(tmp_path, JOB.format(model=model, a=1, b=2))
    workdir = tmp_path / "work"
    assert _plan(job_file, workdir, "--device", "cpu")[0] == 0 and not (workdir / "cached").exists()  # no folder: nothing written
    (workdir / "cached").mkdir(parents=True)

    def replans(*flags) -> bool:
        before = len(counted)
        first = _plan(job_file, workdir, "--device", "cpu", *flags)
        again = _plan(job_file, workdir, "--device", "cpu", *flags)
        assert first[0] == 0 and again == first, (flags, first, again)
        assert len(counted) - before in (0, 1), flags  # the second one came from the cache
        return len(counted) > before

    assert replans() and not replans()  # the first `plan` of the job folder kept its plan there
    assert replans("--json") is False  # the same plan, printed as JSON
    assert replans("--max-ram", "8GiB")
    assert replans("--max-ram", str(8 * 1024**3 + 1))  # the same 64 MiB step, but `plan` prints the exact budget
    assert replans("--max-ram", "8GiB", "--no-tiling")
    assert replans("--max-ram", "8GiB", "--exact")
    assert not replans("--max-ram", "8GiB")  # each of those was kept beside the others
    config = model / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"_class_name"', '"_note": "edited",\n  "_class_name"', 1))
    assert replans()
    job_file.write_text(job_file.read_text().replace('model = ', 'dtype = "bfloat16"\nmodel = ', 1))
    assert replans()
    job_file.write_text(job_file.read_text().replace("width = 64", "width = 128"))
    assert replans()
    assert not replans()


def test_the_plan_key_covers_how_encode_shares_texts_and_the_lora_sets():
    def resolved(pairs, loras=()):
        items = [{"prompt": p, "negative_prompt": n, "guidance_scale": 4.5, "width": 64, "height": 64, "num_inference_steps": 2,
                  "use_resolution_binning": False, **({"loras": list(loras)} if loras else {})} for p, n in pairs]
        return {"model": {"component_hashes": {"encode": "e", "denoise": "d", "decode": "c"}}, "dtype": "float32",
                "device": "cpu", "pipeline": None, "max_sequence_length": 120, "items": items}

    def key(job):
        return memory.plan_key(job, 8 * 1024**3, None, True, False)

    # Five distinct texts either way, but encode keeps the shared negative prompt "n" across units.
    assert key(resolved([("a", "n"), ("b", "m"), ("c", "n")])) != key(resolved([("a", "a"), ("b", "m"), ("c", "n")]))
    lora = {"sha256": "f" * 64, "scale": 1.0, "parameters": 1000}
    assert key(resolved([("a", "n")], [lora])) != key(resolved([("a", "n")]))
    assert key(resolved([("a", "n")], [lora])) != key(resolved([("a", "n")], [dict(lora, parameters=9000)]))


@pytest.mark.parametrize("damage", ["not JSON", "a FIFO", "a list", "wrong shapes", "a bad retry"])
def test_a_damaged_plan_cache_is_a_miss_for_plan(tiny_model, tmp_path, counted, damage):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, a=1, b=2))
    workdir, job_dir = tmp_path / "work", tmp_path / "work" / "cached"
    job_dir.mkdir(parents=True)
    flags = ("--device", "cpu", "--max-ram", "8GiB")
    first = _plan(job_file, workdir, *flags)
    cache_file = job_dir / memory.PLAN_CACHE
    good = json.loads(cache_file.read_text())
    (key, entry), = json.loads(cache_file.read_text()).items()  # a copy to damage
    cache_file.unlink()
    if damage == "not JSON":
        cache_file.write_text('{"estimates-')
    elif damage == "a FIFO":
        os.mkfifo(cache_file)  # POSIX, as the other FIFO tests (the suite runs on Linux)
    elif damage == "a list":
        cache_file.write_text("[]")
    elif damage == "wrong shapes":
        entry["estimates"]["denoise"]["batch_size"] = "1"
        del entry["estimates"]["encode"]["host_kept_bytes"]
        cache_file.write_text(json.dumps({key: entry}))
    else:
        entry["estimates"]["decode"]["retry"] = {"stage": "decode"}
        cache_file.write_text(json.dumps({key: entry}))
    assert _plan(job_file, workdir, *flags) == first and len(counted) == 2  # planned again, same table, exit 0
    assert Path(cache_file).is_file() and json.loads(cache_file.read_text())[key]["estimates"] == good[key]["estimates"]
    assert _plan(job_file, workdir, *flags) == first and len(counted) == 2  # and kept again
