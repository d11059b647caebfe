"""Guards the memory budget on the CPU (where the budget is host RAM): a medium T5 and transformer
run under a budget below their weight size, in real stage processes; the host memory each stage
adds and the weights resident at once stay under the budget, and the outputs equal the
unbudgeted run byte for byte (streaming keeps the batch-1 math)."""

from __future__ import annotations

import pytest

from orchestrator.jobfile import job as jobfile
from orchestrator.executors.runner import run_job
from tests.conftest import write_job

MiB = 2**20
BUDGET = 64 * MiB  # the medium T5 is 128 MiB and the transformer 78 MiB in fp32


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "medium", size="medium")


def weight_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(job_file, job_dir, max_ram: str | None) -> tuple[dict, dict]:
    """`orchestrate run --device cpu [--max-ram X]` with real stage processes (clean peak-RSS
    numbers), planned as the CLI plans it; (summaries by stage, the runtime plan)."""
    from orchestrator.planning.memory import runtime_for_job

    resolved = jobfile.resolve_job(jobfile.load_job(job_file), job_dir, "cpu")
    resolved["runtime"] = runtime_for_job(resolved, None, max_ram)
    return {r.stage: r.summary for r in run_job(job_dir, resolved, lambda line: None)}, resolved["runtime"]


def added_host_memory(summary: dict) -> int:
    """Peak RSS of the stage's model work minus the RSS before it loaded anything."""
    return summary["peak"]["host_peak_rss_bytes"] - summary["host_rss_at_start_bytes"]


def test_medium_model_runs_under_a_budget_below_its_weights(medium_model, tmp_path):
    assert weight_bytes(medium_model / "text_encoder") > 2 * BUDGET
    assert weight_bytes(medium_model / "transformer") > BUDGET
    job_file = write_job(tmp_path, f"""
        [job]
        name = "budget"
        model = "{medium_model}"
        [defaults]
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 2
        [[generation]]
        prompt = "a red apple on a wooden table"
        negative_prompt = "blurry"
        seed = 1
        [[generation]]
        prompt = "an owl reading a book"
        seed = 2
    """)
    plain, _ = run(job_file, tmp_path / "plain" / "budget", None)
    budget, plan = run(job_file, tmp_path / "budgeted" / "budget", "64MiB")
    assert plan["budget_bytes"] == BUDGET
    assert {s: plan["stages"][s]["strategy"] for s in plan["stages"]} == {"encode": "stream", "denoise": "offload", "decode": "full"}

    # The measurement sees the weights: unbudgeted, each stage adds more than its weights.
    assert added_host_memory(plain["encode"]) > weight_bytes(medium_model / "text_encoder")
    assert added_host_memory(plain["denoise"]) > weight_bytes(medium_model / "transformer")
    # Under the budget: host memory added and weights resident at once both stay below it.
    for stage in ("encode", "denoise"):
        assert budget[stage]["strategy"] in ("stream", "offload")
        assert 0 < budget[stage]["peak_resident_weight_bytes"] < BUDGET, stage
        assert added_host_memory(budget[stage]) < BUDGET, (stage, added_host_memory(budget[stage]) / MiB)
    # The planner's estimate of what the stage holds is close to the weights it really held.
    for stage in ("encode", "denoise"):
        assert budget[stage]["peak_resident_weight_bytes"] <= plan["stages"][stage]["peak_bytes"], stage
    # One pass over the T5 weights for the whole queue (3 texts, all in one batch).
    assert budget["encode"]["weight_passes"] == 1
    assert budget["encode"]["weight_bytes_moved"] <= weight_bytes(medium_model / "text_encoder")

    for folder, pattern in (("encode", "*.safetensors"), ("denoise", "*.safetensors"), ("decode", "*.png")):
        names = sorted(p.name for p in (tmp_path / "plain" / "budget" / folder).glob(pattern))
        assert names
        for name in names:
            a = (tmp_path / "plain" / "budget" / folder / name).read_bytes()
            b = (tmp_path / "budgeted" / "budget" / folder / name).read_bytes()
            assert a == b, f"{folder}/{name} differs under the budget"


def test_many_texts_in_small_batches_make_several_passes(medium_model, tmp_path):
    """Batches sized from the budget: 5 texts in batches of 2 take 3 passes over the T5 weights,
    and the embeddings still equal the resident ones."""
    entries = "".join(f'[[generation]]\nprompt = "prompt number {i}"\nguidance_scale = 1.0\nseed = {i}\n' for i in range(5))
    job_file = write_job(tmp_path, f"""
        [job]
        name = "passes"
        model = "{medium_model}"
        [defaults]
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 1
    """ + entries)
    from tests.conftest import run_inprocess

    runtime = {"stages": {"encode": {"strategy": "stream", "batch_size": 2}}}
    streamed, runs, _ = run_inprocess(job_file, tmp_path / "s", runtime=runtime)
    resident, _, _ = run_inprocess(job_file, tmp_path / "r")
    assert runs[0].summary["weight_passes"] == 3
    for artifact in (resident / "encode").glob("*.safetensors"):
        assert artifact.read_bytes() == (streamed / "encode" / artifact.name).read_bytes()
