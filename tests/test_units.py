"""Guards `--units` on the stages and on `orchestrate stage`: only the named units are made, an
item id also names the encode unit serving it, and an unknown key is a one-line error (exit 2)
that touches nothing. Chunked local runs and the Ray executor hand work to stages this way."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from stages import decode, denoise, encode
from tests.conftest import project_pythonpath, resolved_items, run_inprocess, tree_state, write_job

JOB = """
[job]
name = "units"
model = "{model}"

[defaults]
num_inference_steps = 2
width = 64
height = 64
use_resolution_binning = false

[[generation]]
prompt = "a red apple on a wooden table"
seed = 1
count = 2

[[generation]]
prompt = "an owl reading a book in a cozy library"
seed = 3
"""


def _changed(before: dict, after: dict) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


def test_units_remake_only_the_named_items(tiny_model, tmp_path):
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    ids = [item["id"] for item in resolved_items(job_dir)]
    before = tree_state(job_dir)
    assert denoise.main([str(job_dir), "--force", "--units", ids[2]]) == 0
    assert decode.main([str(job_dir), "--force", "--units", f"{ids[0]},{ids[2]}"]) == 0
    changed = {name for name in _changed(before, tree_state(job_dir)) if not name.endswith((".log", "summary.json", ".lock"))}
    assert changed == {f"denoise/{ids[2]}.safetensors", f"denoise/{ids[2]}.json",
                       f"decode/{ids[0]}.png", f"decode/{ids[0]}.thumb.webp", f"decode/{ids[0]}.json",
                       f"decode/{ids[2]}.png", f"decode/{ids[2]}.thumb.webp", f"decode/{ids[2]}.json"}


def test_encode_units_take_an_item_id_or_their_own_key(tiny_model, tmp_path):
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    ids = [item["id"] for item in resolved_items(job_dir)]
    keys = sorted(p.stem for p in (job_dir / "encode").glob("*.safetensors"))
    owl = next(k for k in keys if k.startswith("an-owl"))
    for name in (ids[2], owl):
        before = tree_state(job_dir)
        assert encode.main([str(job_dir), "--force", "--units", name]) == 0
        assert {n for n in _changed(before, tree_state(job_dir)) if n.endswith(".json") and "/" in n and "summary" not in n} == {f"encode/{owl}.json"}


def test_unknown_unit_is_a_one_line_error_and_touches_nothing(tiny_model, tmp_path, capsys):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    before = {k: v for k, v in tree_state(job_dir).items() if not k.endswith((".log", ".lock"))}
    assert denoise.main([str(job_dir), "--units", "0009-no-such-item"]) == 2
    assert "denoise: --units names 1 unknown unit (0009-no-such-item)" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["stage", "decode", str(job_file), "--workdir", str(tmp_path / "work"),
                                      "--device", "cpu", "--units", "nope,0000-a-red-apple-on-a-wooden-table"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown unit (nope)" in errors[0], result.output
    after = {k: v for k, v in tree_state(job_dir).items() if not k.endswith((".log", ".lock"))}
    assert after == before


def test_orchestrate_stage_with_units_runs_the_real_process_for_those_only(tiny_model, tmp_path):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    ids = [item["id"] for item in resolved_items(job_dir)]
    before = tree_state(job_dir)
    result = CliRunner().invoke(app, ["stage", "denoise", str(job_file), "--workdir", str(tmp_path / "work"),
                                      "--device", "cpu", "--units", ids[1]])
    assert result.exit_code == 0, result.output
    assert f"--units {ids[1]}" in result.output  # the printed command, rerunnable by hand
    records = {n for n in _changed(before, tree_state(job_dir)) if n.startswith("denoise/") and n.endswith(".safetensors")}
    assert records == {f"denoise/{ids[1]}.safetensors"}


# ---------------------------------------------------------------------------------------------
# Shards of one stage side by side (the Ray executor runs them at once): per-unit locks, and a
# shard's start-up cleanup touches only its own units' half-written files.

HOLD_UNITS = """
import sys
from pathlib import Path
from stages.locks import stage_lock
from stages.resolved import read_job
from stages.units import plan_units
job_dir, stage, keys = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
units = [u for u in plan_units(read_job(job_dir))[stage] if u.key in keys]
with stage_lock(job_dir, stage, units):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _hold_units(job_dir, stage: str, keys: list[str]):
    """Another process that works on `keys` of `stage` (holds their locks) until its stdin closes."""
    import os
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNITS, str(job_dir), stage, ",".join(keys)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=project_pythonpath()))
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.platforms
def test_shards_of_a_stage_run_side_by_side_but_never_on_the_same_unit(tiny_model, tmp_path, capsys):
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    ids = [item["id"] for item in resolved_items(job_dir)]
    holder = _hold_units(job_dir, "denoise", [ids[0]])
    try:
        before = tree_state(job_dir)
        assert denoise.main([str(job_dir), "--force", "--units", f"{ids[1]},{ids[0]}"]) == 2  # one of its units is taken
        message = capsys.readouterr().err
        assert f"denoise: unit {ids[0]} is being made by another process (pid {holder.pid}" in message, message
        assert denoise.main([str(job_dir), "--force"]) == 2  # nor may the whole stage run
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert {n for n in _changed(before, tree_state(job_dir)) if not n.endswith(".log")} == set()
        assert denoise.main([str(job_dir), "--force", "--units", ids[1]]) == 0  # a disjoint shard runs meanwhile
        assert {n for n in _changed(before, tree_state(job_dir)) if n.endswith(".safetensors")} == {f"denoise/{ids[1]}.safetensors"}
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert denoise.main([str(job_dir), "--force", "--units", ids[0]]) == 0  # released when its holder ended


def test_a_shard_removes_only_its_own_units_half_written_files(tiny_model, tmp_path):
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work")
    ids = [item["id"] for item in resolved_items(job_dir)]
    mine = [job_dir / "denoise" / f".tmp-4242-{ids[0]}.safetensors", job_dir / "denoise" / f".tmp-4242-{ids[0]}.json"]
    others = [job_dir / "denoise" / f".tmp-4343-{ids[1]}.safetensors", job_dir / "denoise" / ".tmp-4343-summary.json"]
    for path in mine + others:
        path.write_bytes(b"half")
    assert denoise.main([str(job_dir), "--units", ids[0], "--summary", str(tmp_path / "shard.json")]) == 0
    assert [p.exists() for p in mine + others] == [False, False, True, True]  # another shard may be writing those
    assert (tmp_path / "shard.json").exists()
    assert denoise.main([str(job_dir)]) == 0  # the whole stage owns every file of its folder
    assert not any(p.exists() for p in others)
