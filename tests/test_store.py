"""The embedding store (issue 11, point 2): prompt embeddings shared by the jobs of a workdir.

A second job with the same prompts and other seeds takes every embedding from the store and never
loads T5 (its log says so), and its images equal those of a job that encoded them itself; a
damaged store entry is detected by its hash, removed and computed again; `--no-store` and a forced
encode leave the store alone."""

from __future__ import annotations

import json

import numpy as np

from orchestrator.executors import session
from stages import encode
from tests.conftest import load_png, resolved_items, write_job

JOB = """
[job]
name = "{name}"
model = "{model}"
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2
[[generation]]
prompt = "an owl reading a book in a cozy library"
negative_prompt = "blurry"
seed = {a}
[[generation]]
prompt = "a red apple on a wooden table"
guidance_scale = 1.0
seed = {b}
"""


def run(tmp_path, workdir, model, name, a, b, store=True, force=()):
    job_file = write_job(tmp_path, JOB.format(name=name, model=model, a=a, b=b), f"{name}.toml")
    session.run_job_file(job_file, workdir, "cpu", force, store=store, echo=print)
    job_dir = workdir / name
    return job_dir, json.loads((job_dir / "encode" / "summary.json").read_text())


def no_t5(*args, **kwargs):
    raise AssertionError("T5 was loaded although every embedding is in the store")


def test_a_second_job_takes_its_embeddings_from_the_store_and_never_loads_t5(tiny_model, tmp_path, monkeypatch, cli_in_process):
    workdir = tmp_path / "work"
    _, first = run(tmp_path, workdir, tiny_model, "first", 1, 2)
    assert first["from_store"] == 0 and first["units_done"] == 2
    store = workdir / ".store" / "encode"
    assert len(list(store.glob("*.safetensors"))) == 2 and len(list(store.glob("*.json"))) == 2

    real_load, real_stream = encode.load_text_encoder, encode.stream_encode
    monkeypatch.setattr(encode, "load_text_encoder", no_t5)
    monkeypatch.setattr(encode, "stream_encode", no_t5)
    second_dir, second = run(tmp_path, workdir, tiny_model, "second", 3, 4)
    assert second["from_store"] == 2 and second["units_done"] == 2 and second["load_seconds"] == 0.0
    log = (second_dir / "encode" / "stage.log").read_text()
    assert "every artifact came from the embedding store; T5 was not loaded" in log
    records = [json.loads(p.read_text()) for p in (second_dir / "encode").glob("*.json") if p.name != "summary.json"]
    assert {r["from_store"] for r in records} == {True} and {r["strategy"]["strategy"] for r in records} == {"store"}
    monkeypatch.setattr(encode, "load_text_encoder", real_load)
    monkeypatch.setattr(encode, "stream_encode", real_stream)

    # The same job encoded by itself, without the store, in another workdir: the same images.
    alone_dir, alone = run(tmp_path, tmp_path / "alone", tiny_model, "second", 3, 4, store=False)
    assert alone["from_store"] == 0 and not (tmp_path / "alone" / ".store").exists()
    for item in resolved_items(second_dir):
        assert np.array_equal(load_png(second_dir / item["image"]), load_png(alone_dir / item["image"])), item["id"]
    assert sorted(p.read_bytes() for p in (second_dir / "encode").glob("*.safetensors")) == \
        sorted(p.read_bytes() for p in (alone_dir / "encode").glob("*.safetensors"))


def test_a_damaged_store_entry_is_detected_by_hash_and_computed_again(tiny_model, tmp_path, cli_in_process):
    workdir = tmp_path / "work"
    first_dir, _ = run(tmp_path, workdir, tiny_model, "first", 1, 2)
    store = workdir / ".store" / "encode"
    victim = sorted(store.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.unlink()  # a new file: the job's own artifact (a hard link before) stays intact
    victim.write_bytes(bytes(data))
    second_dir, second = run(tmp_path, workdir, tiny_model, "second", 3, 4)
    assert second["from_store"] == 1 and second["units_done"] == 2
    assert "is damaged (sha256 mismatch); removed, computing it again" in (second_dir / "encode" / "stage.log").read_text()
    assert (second_dir / "encode" / victim.name).read_bytes() == (first_dir / "encode" / victim.name).read_bytes()
    assert victim.read_bytes() == (first_dir / "encode" / victim.name).read_bytes()  # the entry is whole again


def test_no_store_and_forced_encode_leave_the_store_alone(tiny_model, tmp_path, cli_in_process):
    workdir = tmp_path / "work"
    run(tmp_path, workdir, tiny_model, "first", 1, 2, store=False)
    assert not (workdir / ".store").exists()
    run(tmp_path, workdir, tiny_model, "second", 1, 2)  # fills the store
    _, forced = run(tmp_path, workdir, tiny_model, "second", 1, 2, force=("encode",))
    assert forced["from_store"] == 0 and forced["units_done"] == 2  # --force remakes, never takes
