"""Guards the stage contract, no-op reruns, staleness and resume (STYLE.md "Up to date, rerun,
resume"), using in-process stages through the same planning code as `orchestrate run`."""

from __future__ import annotations

import json
import shutil

import pytest

from stages import contract, files
from tests.conftest import resolved_items, run_inprocess, write_job

JOB = """
[job]
name = "queue"
model = "{model}"

[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2

[[generation]]
prompt = "a red apple on a wooden table"
seed = 1
count = 2

[[generation]]
prompt = "an owl reading a book"
guidance_scale = {guidance}
seed = 5
"""


@pytest.fixture
def job(tiny_model, tmp_path):
    """A finished 3-item job; returns (job_file, workdir, job_dir)."""
    job_file = write_job(tmp_path, JOB.format(model=tiny_model, guidance=4.5))
    job_dir, runs, _ = run_inprocess(job_file, tmp_path / "work")
    assert [r.stage for r in runs] == ["encode", "denoise", "decode"]
    return job_file, tmp_path / "work", job_dir


def made(runs) -> dict:
    return {r.stage: r.summary["units_done"] for r in runs}


# Record keys are a contract with users and later stages: change them deliberately, here.
RECORD_KEYS = {
    "encode": {"checksum", "device", "dtype", "format", "inputs", "items", "key", "model", "outputs", "params", "peak",
               "seconds", "stage", "strategy", "tensors", "versions", "from_store"},  # from_store: issue 11
    "denoise": {"binned_size", "checksum", "device", "dtype", "format", "inputs", "items", "key", "latent_shape", "model",
                "outputs", "params", "peak", "requested_size", "seconds", "seed", "stage", "strategy", "versions", "vae_scale_factor"},
    "decode": {"checksum", "device", "dtype", "format", "inputs", "items", "key", "model", "outputs", "params", "peak",
               "seconds", "stage", "strategy", "tiled", "vae_upcast", "versions"},  # vae_upcast: issue 7
}


def test_records_pin_their_keys_and_list_exactly_the_files_written(job):
    _, _, job_dir = job
    for stage in contract.STAGES:
        folder = job_dir / stage
        records = [json.loads(p.read_text()) for p in folder.glob("*.json") if p.name != "summary.json"]
        assert records, stage
        listed = set()
        for record in records:
            assert set(record) == RECORD_KEYS[stage], stage
            assert record["format"] == contract.FORMAT_VERSION
            for name, meta in record["outputs"].items():
                assert files.sha256_file(folder / name) == meta["sha256"]
                listed.add(name)
        artifacts = {p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".png", ".webp")}
        assert artifacts == listed, f"{stage}: unlisted or missing artifacts"
        assert not list(folder.glob(".tmp-*"))


def test_items_sharing_a_prompt_share_one_embedding(job):
    _, _, job_dir = job
    assert len(list((job_dir / "encode").glob("*.safetensors"))) == 2  # 3 items, 2 prompts


def test_denoise_record_names_every_fact_decode_needs(job):
    _, _, job_dir = job
    item = resolved_items(job_dir)[0]
    record = json.loads((job_dir / "denoise" / f"{item['id']}.json").read_text())
    assert record["vae_scale_factor"] == 8
    assert record["latent_shape"] == [1, 4, 8, 8]
    assert record["requested_size"] == record["binned_size"] == {"height": 64, "width": 64}
    assert record["outputs"][f"{item['id']}.safetensors"]["dtype"] == "float32"


def test_second_run_does_nothing_and_says_so(job):
    job_file, workdir, job_dir = job
    # .state.json is a cache (docs/state.md): the second run may add what the first found too recent to keep.
    before = {p: p.read_bytes() for p in job_dir.rglob("*") if p.is_file() and p.suffix != ".log" and p.name != ".state.json"}
    _, runs, lines = run_inprocess(job_file, workdir)
    assert runs == []
    assert "encode: 2 up to date, 0 to do" in lines
    after = {p: p.read_bytes() for p in before}
    assert before == after


def test_reordering_toml_keys_changes_nothing(job, tiny_model, tmp_path):
    job_file, workdir, _ = job
    shuffled = write_job(tmp_path, f"""
        [defaults]
        num_inference_steps = 2
        use_resolution_binning = false
        height = 64
        width = 64
        [job]
        model = "{tiny_model}"
        name = "queue"
        [[generation]]
        count = 2
        seed = 1
        prompt = "a red apple on a wooden table"
        [[generation]]
        seed = 5
        guidance_scale = 4.5
        prompt = "an owl reading a book"
    """, "shuffled.toml")
    _, runs, _ = run_inprocess(shuffled, workdir)
    assert runs == []


def test_changing_guidance_reruns_only_that_items_denoise_and_decode(job, tiny_model, tmp_path):
    job_file, workdir, job_dir = job
    job_file.write_text(JOB.format(model=tiny_model, guidance=6.0))
    _, runs, lines = run_inprocess(job_file, workdir)
    assert made(runs) == {"denoise": 1, "decode": 1}
    assert any("guidance_scale 4.5 -> 6.0" in line for line in lines), lines


def test_changing_a_prompt_reruns_its_encode_too(job, tiny_model, tmp_path):
    job_file, workdir, _ = job
    job_file.write_text(JOB.format(model=tiny_model, guidance=4.5).replace("an owl reading a book", "an owl reading a map"))
    _, runs, _ = run_inprocess(job_file, workdir)
    assert made(runs) == {"encode": 1, "denoise": 1, "decode": 1}


def test_missing_record_reruns_exactly_that_item(job):
    job_file, workdir, job_dir = job
    item = resolved_items(job_dir)[1]
    (job_dir / "denoise" / f"{item['id']}.json").unlink()
    png = job_dir / item["image"]
    old_png = png.read_bytes()
    _, runs, lines = run_inprocess(job_file, workdir)
    # The latents come out identical, so decode sees an unchanged input and stays put.
    assert made(runs) == {"denoise": 1}, lines
    assert png.read_bytes() == old_png


def test_leftover_temporary_file_is_removed_and_not_accepted(job):
    job_file, workdir, job_dir = job
    item = resolved_items(job_dir)[2]
    artifact = job_dir / "denoise" / f"{item['id']}.safetensors"
    leftover = artifact.with_name(f".tmp-999-{artifact.name}")
    leftover.write_bytes(artifact.read_bytes()[:100])  # what a kill mid-write leaves
    (job_dir / "denoise" / f"{item['id']}.json").unlink()
    artifact.unlink()
    _, runs, _ = run_inprocess(job_file, workdir)
    assert made(runs) == {"denoise": 1}
    assert not leftover.exists()
    assert artifact.exists()


def test_same_seed_gives_byte_identical_latents(job, tmp_path):
    job_file, _, job_dir = job
    other_dir, _, _ = run_inprocess(job_file, tmp_path / "other-work")
    for item in resolved_items(job_dir):
        name = f"denoise/{item['id']}.safetensors"
        assert (job_dir / name).read_bytes() == (other_dir / name).read_bytes()


def test_drawn_seed_is_recorded_and_reused(tiny_model, tmp_path):
    job_file = write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [[generation]]
        prompt = "no seed given"
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 1
        count = 2
    """)
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    seeds = [i["seed"] for i in resolved_items(job_dir)]
    assert seeds[1] == seeds[0] + 1
    _, runs, _ = run_inprocess(job_file, tmp_path / "work")
    assert runs == [] and [i["seed"] for i in resolved_items(job_dir)] == seeds


def test_each_stage_loads_only_its_own_weights(job, tiny_model, tmp_path):
    """Delete the other components' weight files: each stage must still run, so it never reads them."""
    _, workdir, job_dir = job
    weights = {"encode": "text_encoder", "denoise": "transformer", "decode": "vae"}
    for stage, own in weights.items():
        model = tmp_path / f"only-{own}"
        shutil.copytree(tiny_model, model)
        for other in set(weights.values()) - {own}:
            for f in (model / other).glob("*.safetensors"):
                f.unlink()
        stage_dir = workdir / f"only-{stage}"
        shutil.copytree(job_dir, stage_dir)  # upstream artifacts from the full run
        resolved = json.loads((stage_dir / contract.RESOLVED_JOB).read_text())
        resolved["model"]["path"] = str(model)
        files.publish_json(stage_dir / contract.RESOLVED_JOB, resolved)
        module = __import__(f"stages.{stage}", fromlist=["main"])
        assert module.main([str(stage_dir), "--force"]) == 0, stage
        # And the same folder really lacks what the other stages need:
        other_stage = next(s for s in weights if s != stage)
        assert __import__(f"stages.{other_stage}", fromlist=["main"]).main([str(stage_dir), "--force"]) != 0
