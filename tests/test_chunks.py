"""Guards chunked runs (`orchestrate run --chunk`, orchestrator/planning/chunks.py): the queue is encoded
once, then denoise and decode alternate over chunks of items, so the first PNGs exist before the
later items are denoised; the images are byte-identical to a one-process-per-stage run; an
interrupted chunked run resumes without redoing a finished unit; the default chunk size keeps the
extra model loads within 3% of the run; and a real subprocess run hands each warm-started stage
its units on the `go` line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.planning import chunks
from orchestrator.planning.chunks import StageCost
from tests.conftest import inprocess_stage, resolved_items, run_inprocess, tree_state, write_job

JOB = """
[job]
name = "chunks"
model = "{model}"

[defaults]
num_inference_steps = 2
width = 64
height = 64
use_resolution_binning = false

[[generation]]
prompt = "a red apple on a wooden table"
seed = 1
count = 3

[[generation]]
prompt = "an owl reading a book in a cozy library"
seed = 7
guidance_scale = 1.0
width = 96

[[generation]]
prompt = "a lighthouse by the sea"
seed = 9
"""


def _files(job_dir, suffix: str) -> dict:
    return {p.name: p.read_bytes() for p in sorted((job_dir / "decode").glob(f"*{suffix}"))}


def test_chunked_run_makes_first_images_early_and_identical(tiny_model, tmp_path):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    whole_dir, _, _ = run_inprocess(job_file, tmp_path / "whole", chunk=0)
    calls = []

    def launch(stage, job_dir, force, echo, units=None):
        pngs = sorted(p.stem for p in (job_dir / "decode").glob("*.png"))
        latents = sorted(p.stem for p in (job_dir / "denoise").glob("*.safetensors"))
        calls.append((stage, units, pngs, latents))
        return inprocess_stage(stage, job_dir, force, echo, units)

    job_dir, runs, lines = run_inprocess(job_file, tmp_path / "chunked", chunk=2, launch=launch)
    ids = [item["id"] for item in resolved_items(job_dir)]
    assert [(stage, units) for stage, units, _, _ in calls] == [
        ("encode", None),
        ("denoise", ids[0:2]), ("decode", ids[0:2]),
        ("denoise", ids[2:4]), ("decode", ids[2:4]),
        ("denoise", ids[4:5]), ("decode", ids[4:5]),
    ]
    # When the second denoise chunk starts, the first chunk's images exist and no later latents do.
    assert calls[3][2] == ids[0:2] and calls[3][3] == ids[0:2]
    assert "chunks of 2 items (--chunk)" in lines
    assert _files(job_dir, ".png") == _files(whole_dir, ".png") and len(_files(job_dir, ".png")) == 5
    # One summary per stage for the whole run, over its processes.
    summary = json.loads((job_dir / "denoise" / "summary.json").read_text())
    assert (summary["processes"], summary["units_done"]) == (3, 5)


@pytest.mark.platforms
def test_interrupted_chunked_run_resumes_without_redoing(tiny_model, tmp_path):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    started = []

    def launch_then_stop(stage, job_dir, force, echo, units=None):
        started.append(stage)
        if started.count("denoise") == 2:
            raise KeyboardInterrupt  # Ctrl-C as the second chunk starts
        return inprocess_stage(stage, job_dir, force, echo, units)

    with pytest.raises(KeyboardInterrupt):
        run_inprocess(job_file, tmp_path / "work", chunk=2, launch=launch_then_stop)
    job_dir = tmp_path / "work" / "chunks"
    ids = [item["id"] for item in resolved_items(job_dir)]
    assert sorted(p.stem for p in (job_dir / "decode").glob("*.png")) == ids[0:2]
    before = tree_state(job_dir)
    _, runs, lines = run_inprocess(job_file, tmp_path / "work", chunk=2)
    after = tree_state(job_dir)
    for name, state in before.items():  # nothing finished was made again
        if name.endswith((".json", ".safetensors", ".png")) and "summary" not in name and not name.startswith("job."):
            assert after[name] == state, name
    assert "denoise: 2 up to date, 3 to do" in lines
    made = {r.stage: r.summary["units_done"] for r in runs if r.stage != "encode"}
    assert made == {"denoise": 1, "decode": 1}  # the last run's last process; the merged summary has 3
    merged = json.loads((job_dir / "decode" / "summary.json").read_text())
    assert (merged["processes"], merged["units_done"]) == (2, 3)


def test_merging_summaries_leaves_them_as_they_were():
    """The runner merges the same processes' summaries again before each chunk: nothing may change
    under it, or a process's host peak would no longer match its own start."""
    first = {"units_done": 2, "seconds": 3.0, "peak": {"host_peak_rss_bytes": 500}, "host_rss_at_start_bytes": 400}
    second = {"units_done": 1, "seconds": 2.0, "peak": {"host_peak_rss_bytes": 900}, "host_rss_at_start_bytes": 300}
    kept = json.dumps([first, second], sort_keys=True)
    merged = chunks.merge_summaries([(first, 4.0), (second, 3.0)])
    assert json.dumps([first, second], sort_keys=True) == kept
    assert (merged["peak"]["host_peak_rss_bytes"], merged["host_rss_at_start_bytes"], merged["units_done"], merged["processes"]) == (900, 300, 3, 2)


def _cost(fixed, per_item):
    return StageCost(fixed, per_item, True)


@settings(max_examples=300, deadline=None)
@given(items=st.integers(1, 5000), fixed=st.floats(0.01, 60), per_denoise=st.floats(0.001, 120), per_decode=st.floats(0.001, 30))
def test_default_chunks_keep_extra_loads_within_three_percent(items, fixed, per_denoise, per_decode):
    costs = {"denoise": _cost(fixed, per_denoise), "decode": _cost(fixed / 2, per_decode)}
    sizes, remaining = [], items
    while remaining:
        sizes.append(chunks.next_chunk(items, len(sizes), remaining, costs))
        assert 1 <= sizes[-1] <= remaining
        remaining -= sizes[-1]
    total = items * (per_denoise + per_decode) + len(sizes) * 1.5 * fixed
    assert (len(sizes) - 1) * 1.5 * fixed <= chunks.OVERHEAD * total + 1e-9
    assert len(sizes) == chunks.max_chunks(items, costs)
    if len(sizes) > 1:  # the first chunk is the small one: first images early
        assert sizes[0] <= -(-max(sizes[1:]) // 3)
        # one more chunk would break the 3% rule (the cap is tight)
        more = len(sizes) + 1
        assert more > items or more * 1.5 * fixed - 1.5 * fixed > chunks.OVERHEAD * (total + 1.5 * fixed) - 1e-9


def test_costs_come_from_summaries_then_from_weights(tiny_model, tmp_path):
    job_dir, _, _ = run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work", chunk=2)
    measured = chunks.read_cost(job_dir, "denoise")
    summary = json.loads((job_dir / "denoise" / "summary.json").read_text())
    assert measured.measured and measured.per_item == pytest.approx((summary["seconds"] - summary["load_seconds"]) / 5)
    job = json.loads((job_dir / "job.resolved.json").read_text())
    estimated = chunks.estimate_costs(job)
    transformer_bytes = sum(p.stat().st_size for p in (tiny_model / "transformer").glob("*.safetensors"))
    assert estimated["denoise"].fixed == pytest.approx(chunks.PROCESS_SECONDS + transformer_bytes / chunks.LOAD_BYTES_PER_SECOND)
    assert not estimated["denoise"].measured and estimated["denoise"].per_item > 0


def test_subprocess_chunked_run_hands_units_on_go(tiny_model, tmp_path):
    """The real runner: each denoise/decode process after the first is started ahead (--wait) and
    learns its units from the `go --units ...` line."""
    job_file = write_job(tmp_path, JOB.format(model=tiny_model))
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"]
    result = subprocess.run(command + ["--chunk", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    job_dir = tmp_path / "work" / "chunks"
    ids = [item["id"] for item in resolved_items(job_dir)]
    shown = [line for line in result.stdout.splitlines() if line.startswith("> python -m stages.")]
    assert [line.split()[3] for line in shown] == ["stages.encode"] + ["stages.denoise", "stages.decode"] * 2
    assert shown[3].endswith(f"--units {','.join(ids[3:5])}")
    assert "images: 3 of 5 made in" in result.stdout
    # Each process made exactly its chunk: the decode log says so per process.
    log = (job_dir / "decode" / "stage.log").read_text()
    assert "decode: 3 to do, 0 up to date" in log and "decode: 2 to do, 0 up to date" in log
    assert len(list((job_dir / "decode").glob("*.png"))) == 5
    whole = subprocess.run(command + ["--chunk", "0", "--workdir", str(tmp_path / "whole")], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    assert _files(job_dir, ".png") == _files(tmp_path / "whole" / "chunks", ".png")
    negative = subprocess.run(command + ["--chunk", "-1"], capture_output=True, text=True, timeout=120)
    assert negative.returncode == 2 and "--chunk -1 is negative" in negative.stderr


def test_one_chunk_runs_each_stage_on_its_own_choice_of_units(tiny_model, tmp_path):
    """A chunk that holds the whole queue names no --units: the stage picks its stale units itself."""
    calls = []

    def launch(stage, job_dir, force, echo, units=None):
        calls.append((stage, units))
        return inprocess_stage(stage, job_dir, force, echo, units)

    run_inprocess(write_job(tmp_path, JOB.format(model=tiny_model)), tmp_path / "work", chunk=50, launch=launch)
    assert calls == [("encode", None), ("denoise", None), ("decode", None)]
