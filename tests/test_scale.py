"""A queue's length costs memory and time in proportion, never more (issue 21): encode keeps an
embedding only while a later unit needs it, a run reads each record and hashes each output once,
and a job holds up to 100,000 images with a per-entry guard on `count`. Counts, not timings:
bench/scale.py measures the seconds and the peaks."""

from __future__ import annotations


import pytest

from orchestrator.jobfile import job as jobfile
from orchestrator.planning.plan import plan_job
from orchestrator.executors.runner import run_job
from stages import records
from stages.contract import JobFileError
from stages.embedding_cache import EmbeddingCache, most_held
from stages.files import publish_json
from stages.resolved import read_job
from tests.conftest import count_reads_and_hashes, inprocess_stage, run_inprocess, write_job

# Ten prompts with guidance and one shared negative prompt; "a cat" comes back at the end with
# another negative, so its embedding must outlive the nine units between its two uses.
JOB = """
[job]
name = "scale"
model = "{model}"
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 1
guidance_scale = 4.5
negative_prompt = "blurry"
seed = 3
{entries}
"""
PROMPTS = ["a cat"] + [f"a picture number {i}" for i in range(1, 10)]


def _entries(extra: str = "") -> str:
    body = "".join(f'[[generation]]\nprompt = "{p}"\n' for p in PROMPTS)
    return body + '[[generation]]\nprompt = "a cat"\nnegative_prompt = "dark"\n' + extra


def test_embedding_cache_drops_a_text_after_its_last_use():
    units = [["a", "neg"], ["b", "neg"], ["a", "other"], ["c", "neg"]]
    cache = EmbeddingCache(units)
    seen = []
    for texts in units:
        for text in cache.missing(texts):
            cache.put(text, (text,))
        cache.done(texts)
        seen.append(sorted(cache.held))
    # "a" lives until unit 3, "neg" until unit 4, "b" and "other" only for their own unit.
    assert seen == [["a", "neg"], ["a", "neg"], ["neg"], []]
    assert cache.most == 3 == most_held(units, 1, stream=False)
    # Stream: a batch of 2 texts is encoded ahead; still bounded by the batch plus what recurs.
    assert most_held(units, 2, stream=True) == 4  # unit 2 encodes "b" with "other" ahead, "a" and "neg" kept
    assert most_held([[f"p{i}", "neg"] for i in range(1000)], 8, stream=True) == 9  # not 1001


def test_encode_holds_the_texts_in_use_not_the_queue(tiny_model, tmp_path):
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, entries=_entries()))
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, tmp_path / "work")
    resolved = jobfile.resolve_job(job, job_dir, "cpu")
    job_dir.mkdir(parents=True)  # encode alone, as `python -m stages.encode` runs it
    publish_json(job_dir / "job.resolved.json", resolved)
    summary = inprocess_stage("encode", job_dir, False, print).summary
    texts = len(set(PROMPTS) | {"blurry", "dark"})
    assert summary["units_done"] == 11 and texts == 12
    # At most: the prompt in hand, the shared negative, and "a cat" kept for its second use.
    assert summary["embeddings_held_max"] == 3 == most_held([[p, "blurry"] for p in PROMPTS] + [["a cat", "dark"]], 1, False)


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A job of 11 items, every stage done."""
    tmp = tmp_path_factory.mktemp("scale")
    job_file = write_job(tmp, JOB.format(model=tiny_model, entries=_entries()))
    job_dir, _, _ = run_inprocess(job_file, tmp / "work")
    return job_dir


@pytest.mark.parametrize("chunk", [None, 0])
def test_a_run_with_nothing_to_do_reads_each_record_and_hashes_each_output_once(finished, monkeypatch, chunk):
    job_dir = finished
    resolved = read_job(job_dir)
    (job_dir / records.STATE_FILE).unlink(missing_ok=True)  # cold: tests/test_state.py has the warm case
    reads, hashes = count_reads_and_hashes(monkeypatch)
    lines, plans = [], []
    runs = run_job(job_dir, resolved, lines.append, chunk=chunk, launch=lambda *a: pytest.fail("nothing should run"), plans=plans)
    assert runs == [] and "decode: 11 up to date, 0 to do" in lines
    expected = {str(p) for stage in ("encode", "denoise", "decode") for p in (job_dir / stage).glob("*.json") if p.name != "summary.json"}
    assert len(expected) == 11 + 11 + 11  # "a cat" with two negatives is two encode units
    assert set(reads) == expected and set(reads.values()) == {1}, reads.most_common(3)
    outputs = {str(p) for p in job_dir.glob("*/*") if p.suffix in (".safetensors", ".png", ".webp")}
    assert set(hashes) == outputs and set(hashes.values()) == {1}, hashes.most_common(3)
    # The plan the run leaves is handed back (for the gallery), not made again.
    assert [s.state for states in plans[0].values() for s in states] == ["done"] * 33


def test_a_changed_record_is_read_again_within_the_run(finished, monkeypatch):
    """The run's reader keeps verdicts, not trust: a record rewritten within the run (as a stage
    rewrites it) is read and judged anew when the job is planned again."""
    job_dir = finished
    job, reader = read_job(job_dir), records.RecordReader()
    (job_dir / records.STATE_FILE).unlink(missing_ok=True)  # what is kept across runs: tests/test_state.py
    reads, _ = count_reads_and_hashes(monkeypatch)
    path = next((job_dir / "decode").glob("0000*.json"))
    plan_job(job_dir, job, reader)
    plan_job(job_dir, job, reader)
    assert reads[str(path)] == 1
    text = path.read_text()
    path.write_text(text.replace('"format": 1', '"format": 1 '))  # same meaning, one byte longer
    try:
        assert plan_job(job_dir, job, reader)["decode"][0].state == "done" and reads[str(path)] == 2
        path.write_text(text.replace('"format": 1', '"format": 2'))  # an edit the checksum catches
        state = plan_job(job_dir, job, reader)["decode"][0]
        assert (state.state, state.reason, reads[str(path)]) == ("to do", "record is corrupt (checksum mismatch)", 3)
    finally:
        path.write_text(text)
    assert plan_job(job_dir, job, reader)["decode"][0].state == "done"


def test_a_job_holds_100000_images(tmp_path):
    entries = "".join(f'[[generation]]\nprompt = "p{i}"\ncount = 10000\nseed = {i}\n' for i in range(10))
    job = jobfile.load_job(write_job(tmp_path, f'[job]\nname = "big"\nmodel = "m"\n{entries}'))
    assert sum(g.count for g in job.generations) == jobfile.MAX_ITEMS == 100_000
    over = entries + '[[generation]]\nprompt = "one more"\n'
    with pytest.raises(JobFileError, match=r"#11: the queue would hold 100001 images, more than 100000"):
        jobfile.load_job(write_job(tmp_path, f'[job]\nname = "big"\nmodel = "m"\n{over}'))


def test_a_typo_in_one_entrys_count_is_refused_naming_the_entry(tmp_path):
    body = '[job]\nname = "typo"\nmodel = "m"\n[[generation]]\nprompt = "a"\n[[generation]]\nprompt = "b"\ncount = 20000\n'
    with pytest.raises(JobFileError) as caught:
        jobfile.load_job(write_job(tmp_path, body))
    message = str(caught.value)
    assert "\n" not in message and "[[generation]] #2" in message and "'count' = 20000" in message
    assert "between 1 and 10000 per entry" in message and "repeat the entry" in message


def test_a_stream_batch_adds_at_most_its_own_texts_to_what_encode_keeps():
    """The memory plan's bound (orchestrator/planning/memory.py): held while streaming <= held one text at a
    time + the batch, over random queues with shared and recurring texts."""
    import random

    rng = random.Random(21)
    for _ in range(200):
        texts = [f"t{i}" for i in range(rng.randint(1, 12))]
        units = [rng.sample(texts, rng.randint(1, min(2, len(texts)))) for _ in range(rng.randint(1, 15))]
        units = list({tuple(u): u for u in units}.values())
        for batch in (1, 2, 3, 8):
            assert most_held(units, batch, stream=True) <= most_held(units, 1, stream=False) + batch, (units, batch)


def test_the_memory_plan_counts_the_embeddings_encode_keeps(tiny_model, monkeypatch):
    import json

    from orchestrator.planning import estimate
    from orchestrator.planning import memory

    configs = estimate.ModelConfigs.read(tiny_model)
    d_model = json.loads(configs.encode)["d_model"]
    plain, kept = (estimate.estimate_encode(configs, "float32", "cpu", "resident", 1, 120, k) for k in (0, 3))
    assert kept.activation_bytes - plain.activation_bytes == 3 * 120 * (d_model * 4 + 8)  # on the CPU the host is the budget
    on_cuda = estimate.estimate_encode(configs, "float16", "cuda", "stream", 1, 120, 3)
    assert on_cuda.host_kept_bytes == 3 * 120 * (d_model * 2 + 8)
    assert estimate.estimate_host_bytes(configs, "float16", on_cuda) == estimate.estimate_host_bytes(
        configs, "float16", estimate.estimate_encode(configs, "float16", "cuda", "stream", 1, 120)) + on_cuda.host_kept_bytes
    # 1,000 prompts with one shared negative: the plan counts 2 kept texts (+ the stream batch), not 1,001.
    asked = []
    real = memory.estimate_encode
    monkeypatch.setattr(memory, "estimate_encode", lambda *a: asked.append((a[3], a[4], a[6])) or real(*a))
    items = [{"prompt": f"p{i}", "negative_prompt": "blurry", "guidance_scale": 4.5, "height": 64, "width": 64,
              "use_resolution_binning": False, "num_inference_steps": 1} for i in range(1000)]
    memory.choose_strategies(tiny_model, "float32", "cpu", items, 120, 8 << 30)
    assert {kept for strategy, batch, kept in asked if strategy == "resident"} == {2}
    assert all(kept == 2 + batch for strategy, batch, kept in asked if strategy == "stream")
