"""Guards issue 17, points 3-5: hostile file-system states in the embedding store and job folders.

A FIFO, folder, socket or symbolic link where an artifact or record belongs is damaged: never opened
(a FIFO blocks its reader forever), removed (the link itself, never its target), and the unit made
again. A store artifact whose tensors are not what the model makes (names, dtype, shapes, checked
from the safetensors header) is damaged too, even with a matching record; in a job folder it is a
one-line error naming the file, exit 2. Every case ends in images equal to a clean run's, or one
line; none touches the sentinel files planted outside the job folder and store. Runs that could
hang without the fix are real CLI subprocesses with a `timeout=`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.executors import session
from stages import denoise, decode, records
from stages.files import sha256_file
from tests.conftest import resolved_items, tree_state, write_job

ROOT = Path(__file__).resolve().parent.parent
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
seed = 1
[[generation]]
prompt = "a red apple on a wooden table"
guidance_scale = 1.0
seed = 2
"""
OWL, APPLE = "an owl", "a red apple"  # with guidance (negative tensors too), without
OWL_ITEM, APPLE_ITEM = "0000-an-owl-reading-a-book-in-a-cozy-library", "0001-a-red-apple-on-a-wooden-table"


def write(tmp_path: Path, model: Path, name: str) -> Path:
    return write_job(tmp_path, JOB.format(name=name, model=model), f"{name}.toml")


def run_inprocess(job_file: Path, workdir: Path) -> Path:
    """`orchestrate run` through session.run_job_file, stages in this process (conftest's cli_in_process)."""
    from orchestrator.executors.runner import run_job
    from tests.conftest import inprocess_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "run_job", lambda job_dir, resolved, echo, force, **kw: run_job(job_dir, resolved, echo, force, launch=inprocess_stage, **kw))
        session.run_job_file(job_file, workdir, "cpu", (), echo=print)
    return workdir / job_file.stem


def images(job_dir: Path) -> dict[str, bytes]:
    return {item["id"]: (job_dir / item["image"]).read_bytes() for item in resolved_items(job_dir)}


def summary(job_dir: Path, stage: str) -> dict:
    return json.loads((job_dir / stage / "summary.json").read_text())


@pytest.fixture(scope="module")
def first(tiny_model, tmp_path_factory):
    """One clean run of the job with the store on: its images are the reference, its store and
    folder are copied by each case."""
    base = tmp_path_factory.mktemp("hostile")
    workdir = base / "work"
    job_dir = run_inprocess(write(base, tiny_model, "first"), workdir)
    return {"workdir": workdir, "images": images(job_dir), "model": tiny_model}


@pytest.fixture
def case(first, tmp_path):
    """A copy of the clean workdir (store and job folder), and sentinels outside both whose bytes
    and mtimes must survive: {workdir, store, job, outside, keys: {OWL: key, APPLE: key}}."""
    workdir = tmp_path / "work"
    shutil.copytree(first["workdir"], workdir, symlinks=True)
    store = workdir / ".store" / "encode"
    keys = {}
    for record in store.glob("*.json"):
        prompt = json.loads(record.read_text())["params"]["prompt"]
        keys[OWL if prompt.startswith(OWL) else APPLE] = record.stem
    outside = tmp_path / "outside"
    outside.mkdir()
    for key in keys.values():  # copies with the right bytes: what a planted link points at
        shutil.copy2(store / f"{key}.safetensors", outside / f"{key}.safetensors")
        shutil.copy2(store / f"{key}.json", outside / f"{key}.json")
    shutil.copy2(workdir / "first" / "decode" / f"{OWL_ITEM}.png", outside / f"{OWL_ITEM}.png")
    (outside / "sentinel.txt").write_text("must survive")
    before = tree_state(outside), {p.name: p.read_bytes() for p in outside.iterdir()}
    yield {"workdir": workdir, "store": store, "job": workdir / "first", "outside": outside, "keys": keys,
           "job_file": write(tmp_path, first["model"], "second"), "first_file": write(tmp_path, first["model"], "first"),
           "reference": first["images"]}
    assert (tree_state(outside), {p.name: p.read_bytes() for p in outside.iterdir()}) == before, "a file outside was touched"


# --- helpers that plant a hostile state -------------------------------------------------------


def plant(path: Path, kind: str, outside: Path | None = None) -> None:
    """Replace `path` with a FIFO, a folder (holding a file), a link to its namesake in `outside`
    (a copy with the right bytes), an empty file, its first 100 bytes, or a 2 GiB sparse file."""
    data = path.read_bytes() if path.is_file() else b""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("x")
    elif kind == "symlink":
        path.symlink_to(outside / path.name)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:100])
    elif kind == "sparse":
        path.write_bytes(b"")
        os.truncate(path, 2 << 30)  # no disk used: reads as zeros
    else:
        raise ValueError(kind)


def retensor(path: Path, change) -> None:
    """Rewrite the safetensors file at `path` with `change(tensors)` (a new file, so the hard-linked
    twin in the job folder or store keeps its bytes)."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(str(path)))
    path.unlink()
    save_file(tensors, str(path))


def rerecord(record_path: Path, artifact: Path) -> None:
    """Make the record match the artifact's new bytes, checksum included, as an attacker could."""
    record = json.loads(record_path.read_text())
    for drop in ("checksum", "format"):
        record.pop(drop)
    entry = {"sha256": sha256_file(artifact), "bytes": artifact.stat().st_size}
    if "outputs" in record:
        record["outputs"][artifact.name].update(entry)
    else:
        record.update(entry)
    record_path.unlink()
    records.write_record(record_path, record)


TAMPER = {
    "float16": lambda t: {k: (v.half() if v.is_floating_point() else v) for k, v in t.items()},
    "7 tokens": lambda t: {k: v[:, :7].contiguous() for k, v in t.items()},
    "no mask": lambda t: {k: v for k, v in t.items() if "mask" not in k},
    "width 48": lambda t: {k: (v.repeat(1, 1, 2)[:, :, :48].contiguous() if v.dim() == 3 else v) for k, v in t.items()},
}


def damage_store(c: dict, which: str, how: str) -> None:
    store, key = c["store"], c["keys"][which]
    artifact, record = store / f"{key}.safetensors", store / f"{key}.json"
    if how.startswith("record "):
        plant(record, how.split()[1], c["outside"])
    elif how in TAMPER:
        retensor(artifact, TAMPER[how])
        rerecord(record, artifact)
    else:
        plant(artifact, how, c["outside"])
        if how in ("empty", "truncated"):
            rerecord(record, artifact)


# --- the store: damaged entries are removed and made again ------------------------------------

PAIRS = [  # (owl's entry, apple's entry): two cases per run
    ("symlink", "directory"),
    ("empty", "truncated"),
    ("sparse", "float16"),
    ("7 tokens", "no mask"),
    ("width 48", "record symlink"),
]


@pytest.mark.parametrize("owl, apple", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_a_damaged_store_entry_is_removed_and_computed_again(case, owl, apple):
    damage_store(case, OWL, owl)
    damage_store(case, APPLE, apple)
    job_dir = run_inprocess(case["job_file"], case["workdir"])
    assert summary(job_dir, "encode")["from_store"] == 0 and summary(job_dir, "encode")["units_done"] == 2
    log = (job_dir / "encode" / "stage.log").read_text()
    assert log.count("is damaged") == 2 and "computing it again" in log, log
    assert images(job_dir) == case["reference"]
    for key in case["keys"].values():  # the job holds regular files; the store is whole again
        for path in (job_dir / "encode" / f"{key}.safetensors", case["store"] / f"{key}.safetensors", case["store"] / f"{key}.json"):
            assert stat.S_ISREG(os.lstat(path).st_mode), path
        assert (case["store"] / f"{key}.safetensors").read_bytes() == (case["outside"] / f"{key}.safetensors").read_bytes()


def test_a_store_directory_entry_record_is_removed_and_computed_again(case):
    damage_store(case, OWL, "record directory")
    job_dir = run_inprocess(case["job_file"], case["workdir"])
    assert summary(job_dir, "encode")["from_store"] == 1  # the apple's entry is whole: taken
    assert images(job_dir) == case["reference"]
    assert stat.S_ISREG(os.lstat(case["store"] / f"{case['keys'][OWL]}.json").st_mode)


# --- job folders --------------------------------------------------------------------------------


def test_tampered_embeddings_with_a_matching_record_are_one_line_in_denoise(case):
    """Shape [1,7,32] for [1,120,32], and a missing attention mask: exit 2, the file and the fix,
    never a RuntimeError / KeyError traceback; nothing is written."""
    job_dir, key = case["job"], case["keys"][OWL]
    artifact = job_dir / "encode" / f"{key}.safetensors"
    retensor(artifact, TAMPER["7 tokens"])
    rerecord(job_dir / "encode" / f"{key}.json", artifact)
    before = tree_state(job_dir / "denoise")
    assert denoise.main([str(job_dir)]) == 2
    error = (job_dir / "denoise" / "stage.log").read_text().strip().splitlines()[-1]
    assert f"denoise: encode/{key}.safetensors (item {OWL_ITEM}) is not what denoise expects: prompt_embeds [1,7,32], expected [1,120,32]" in error
    assert "orchestrate run JOB.toml --force encode" in error
    retensor(artifact, TAMPER["no mask"])
    rerecord(job_dir / "encode" / f"{key}.json", artifact)
    assert denoise.main([str(job_dir)]) == 2
    assert "no tensor negative_prompt_attention_mask, prompt_attention_mask" in (job_dir / "denoise" / "stage.log").read_text().strip().splitlines()[-1]
    made = lambda state: {k: v for k, v in state.items() if k.endswith((".safetensors", ".json"))}  # not the log or lock
    assert made(tree_state(job_dir / "denoise")) == made(before) != {}


@pytest.mark.parametrize("kind, said", [("empty", "empty (0 bytes), not a safetensors file"),
                                         ("truncated", "no valid safetensors header (header length"),
                                         ("cut", "truncated or malformed (safetensors header)"),
                                         ("sparse", "no valid safetensors header (header length 0")])
def test_a_broken_embedding_file_with_a_matching_record_is_one_line_in_denoise(case, kind, said):
    """Empty, its first 100 bytes, its last 100 bytes cut off, or a sparse file of zeros, each with
    a record rewritten to match:
    a one-line exit 2 from the header alone (a SafetensorError traceback before)."""
    job_dir, key = case["job"], case["keys"][APPLE]
    artifact = job_dir / "encode" / f"{key}.safetensors"
    if kind == "sparse":  # 256 MiB: big enough to show it is never loaded, small enough to hash here
        artifact.unlink()
        artifact.write_bytes(b"")
        os.truncate(artifact, 256 << 20)
    elif kind == "cut":
        data = artifact.read_bytes()
        artifact.unlink()
        artifact.write_bytes(data[:-100])
    else:
        plant(artifact, kind)
    rerecord(job_dir / "encode" / f"{key}.json", artifact)
    assert denoise.main([str(job_dir), "--units", APPLE_ITEM]) == 2
    error = (job_dir / "denoise" / "stage.log").read_text().strip().splitlines()[-1]
    assert f"denoise: encode/{key}.safetensors (item {APPLE_ITEM}) is not what denoise expects: " in error and said in error, error


def test_tampered_latents_with_a_matching_record_are_one_line_in_decode(case):
    job_dir = case["job"]
    artifact = job_dir / "denoise" / f"{APPLE_ITEM}.safetensors"
    retensor(artifact, lambda t: {"latents": t["latents"][:, :, :4].contiguous()})
    rerecord(job_dir / "denoise" / f"{APPLE_ITEM}.json", artifact)
    png = (job_dir / "decode" / f"{APPLE_ITEM}.png").read_bytes()
    assert decode.main([str(job_dir)]) == 2
    error = (job_dir / "decode" / "stage.log").read_text().strip().splitlines()[-1]
    assert f"decode: denoise/{APPLE_ITEM}.safetensors (item {APPLE_ITEM}) is not what decode expects: latents [1,4,4,8], expected [1,4,8,8]" in error
    assert (job_dir / "decode" / f"{APPLE_ITEM}.png").read_bytes() == png  # the finished image stays


def test_tampered_embeddings_without_their_record_are_made_again(case):
    """The record's sha256 no longer matches: encode is stale and remakes the unit (no crash)."""
    job_dir, key = case["job"], case["keys"][APPLE]
    retensor(job_dir / "encode" / f"{key}.safetensors", TAMPER["float16"])
    kept = tree_state(job_dir / "decode")
    run_inprocess(case["first_file"], case["workdir"])
    assert summary(job_dir, "encode")["units_done"] == 1
    assert images(job_dir) == case["reference"]
    assert tree_state(job_dir / "decode") == kept  # equal embeddings: nothing downstream was rewritten


@pytest.mark.parametrize("where, kind", [(f"decode/{OWL_ITEM}.png", "symlink"), (f"denoise/{APPLE_ITEM}.safetensors", "directory"),
                                         ("encode/{apple}.json", "symlink")])
def test_a_job_folder_entry_that_is_not_a_regular_file_is_made_again(case, where, kind):
    job_dir = case["job"]
    path = job_dir / where.format(apple=case["keys"][APPLE])
    elsewhere = case["outside"].parent / "elsewhere"  # the fixture's outside holds the store's twins
    elsewhere.mkdir()
    shutil.copy2(path, elsewhere / path.name)  # read through a link to it, the unit would look up to date
    before = tree_state(elsewhere)
    plant(path, kind, elsewhere)
    run_inprocess(case["first_file"], case["workdir"])
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert images(job_dir) == case["reference"]
    assert tree_state(elsewhere) == before  # a link's target is never removed or changed


# --- what would hang: real subprocesses, with a timeout ----------------------------------------


def orchestrate(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_fifos_in_the_store_and_the_job_folder_never_hang(case):
    """FIFOs for a store record and a store artifact, a job record, a job artifact, a PNG, a stage
    log and the resolved job: `status` reports them, `run` removes them and makes the units again."""
    job_dir, store, owl, apple = case["job"], case["store"], case["keys"][OWL], case["keys"][APPLE]
    kept = tree_state(job_dir / "decode")[f"{APPLE_ITEM}.png"]
    for path in (store / f"{owl}.json", store / f"{apple}.safetensors", job_dir / "encode" / f"{owl}.json",
                 job_dir / "encode" / f"{apple}.safetensors", job_dir / "decode" / f"{OWL_ITEM}.png", job_dir / "denoise" / "stage.log",
                 job_dir / "denoise" / f"{APPLE_ITEM}.json"):
        plant(path, "fifo")
    status = orchestrate("status", str(case["first_file"]), "--workdir", str(case["workdir"]), timeout=120)
    assert status.returncode == 0, status.stderr
    assert "to do (record is damaged (a FIFO, not a regular file))" in status.stdout, status.stdout
    assert f"{apple}.safetensors is damaged (a FIFO, not a regular file)" in status.stdout, status.stdout
    plant(job_dir / "job.resolved.json", "fifo")
    result = orchestrate("run", str(case["first_file"]), "--workdir", str(case["workdir"]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert images(job_dir) == case["reference"]
    assert tree_state(job_dir / "decode")[f"{APPLE_ITEM}.png"] == kept  # a finished image is never rewritten
    for path in job_dir.rglob("*"):
        assert stat.S_ISREG(os.lstat(path).st_mode) or stat.S_ISDIR(os.lstat(path).st_mode), path
    for path in store.iterdir():
        assert stat.S_ISREG(os.lstat(path).st_mode), path


@pytest.mark.stress  # ~20 s of process start-up; the in-process tests above check the same message
def test_tampered_embeddings_in_a_job_are_one_line_exit_2_from_the_stage_process(case):
    """Width 48 for the transformer's caption_channels 32 (a RuntimeError deep in the model before):
    the stage process as the orchestrator starts it exits 2 with one error line (runner.py turns it
    into `error: stage denoise failed (exit 2): ...`, tests/test_cli.py guards that part)."""
    job_dir, key = case["job"], case["keys"][OWL]
    artifact = job_dir / "encode" / f"{key}.safetensors"
    retensor(artifact, TAMPER["width 48"])
    rerecord(job_dir / "encode" / f"{key}.json", artifact)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "stages.denoise", str(job_dir)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "prompt_embeds [1,120,48], expected [1,120,32]" in errors[0], result.stderr
    assert images(job_dir) == case["reference"]  # finished images stay


def test_fifo_summaries_and_a_folder_for_the_resolved_job_are_handled(case):
    """A run with nothing to do reads the stages' summary.json (chunk costs, the gallery's table):
    FIFOs there are skipped, not waited on. A folder where job.resolved.json belongs is one line,
    exit 2 (it was "free disk space", exit 3), and nothing made is touched."""
    from typer.testing import CliRunner

    job_dir = case["job"]
    images_and_records = lambda: {k: v for k, v in tree_state(job_dir / "decode").items() if k.endswith((".png", ".json")) and k != "summary.json"}
    made = images_and_records()
    for stage in ("encode", "denoise", "decode"):
        plant(job_dir / stage / "summary.json", "fifo")
    result = orchestrate("run", str(case["first_file"]), "--workdir", str(case["workdir"]), timeout=120)
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr[-2000:]
    plant(job_dir / "job.resolved.json", "directory")
    refused = CliRunner().invoke(cli.app, ["run", str(case["first_file"]), "--workdir", str(case["workdir"])])
    assert refused.exit_code == 2, refused.output
    assert "Traceback" not in refused.output and [line for line in refused.output.splitlines() if "error" in line] == [
        f"error: {job_dir / 'job.resolved.json'} is a folder where a file belongs; remove it (e.g. `rm -r {job_dir / 'job.resolved.json'}`), then run again"]
    assert images_and_records() == made != {}
