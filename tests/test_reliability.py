"""Reliability (issue 4): corruption is detected, reported by item and rebuilt (point 2); a second
run or a dead run's lock is handled (point 4); out of memory keeps finished items and says what to
change (point 5); write errors leave nothing partial (point 6); a new model or dtype invalidates
everything (point 7); file names and weights are safe (point 8). Kill -9 trials are in test_faults.py,
bad job files in test_jobfile.py."""

from __future__ import annotations

import ast
import errno
import fnmatch
import json
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.jobfile import job as jobfile
from orchestrator.executors import runner
from orchestrator.cli import app
from orchestrator.planning.plan import plan_job
from stages import contract, decode, denoise, encode, entry, files
from stages.contract import EXIT_RESOURCE_ERROR, EXIT_USER_ERROR, STAGES, TMP_PREFIX
from stages.resolved import read_job
from stages.units import plan_units, unit_status
from tests.conftest import artifact_bytes, project_pythonpath, run_inprocess, toml_string, tree_state, write_job

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Six items with six prompts, so each corruption below hits a different encode unit and item.
PROMPTS = [
    "a red apple on a wooden table",
    "an owl reading a book in a cozy library",
    "city skyline at night with neon lights and rain",
    "a forest of giant mushrooms under a purple sky",
    "a watercolor painting of a lighthouse by the sea",
    "a small cactus with a happy face in the sahara desert",
]
JOB_HEAD = """
[job]
name = "rel"
model = "{model}"
{extra}
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 2
"""


def job_text(model, extra: str = "", prompts=PROMPTS) -> str:
    body = JOB_HEAD.format(model=model, extra=extra)
    for n, prompt in enumerate(prompts):
        body += f"\n[[generation]]\nprompt = {toml_string(prompt)}\nseed = {n + 1}\n"
        if n == 1:
            body += 'negative_prompt = "blurry"\n'
        if n == 2:
            body += "guidance_scale = 1.0\n"
    return body


class Reference:
    def __init__(self, root: Path, model: Path) -> None:
        self.job_file = write_job(root, job_text(model))
        self.workdir = root / "reference"
        self.job_dir, _, _ = run_inprocess(self.job_file, self.workdir)
        self.artifacts = artifact_bytes(self.job_dir)
        self.units = plan_units(read_job(self.job_dir))
        self.items = [item["id"] for item in read_job(self.job_dir)["items"]]

    def copy(self, dest: Path, drop=()) -> Path:
        """A copy of the finished reference workdir, without the stage folders in `drop`."""
        shutil.copytree(self.workdir, dest)
        for stage in drop:
            shutil.rmtree(dest / "rel" / stage)
        return dest / "rel"


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reliability"), tiny_model)


def record_identities(job_dir: Path) -> dict[str, tuple]:
    return {rel: state for rel, state in tree_state(job_dir).items() if rel.endswith(".json") and "/" in rel and not rel.endswith("summary.json")}


def temp_files(job_dir: Path) -> list[Path]:
    return sorted(job_dir.rglob(f"{TMP_PREFIX}*"))


def error_lines(job_dir: Path, stage: str) -> list[str]:
    return [line.split("error:", 1)[1].strip() for line in (job_dir / stage / "stage.log").read_text().splitlines() if "error:" in line]


def made(runs) -> dict[str, int]:
    return {run.stage: run.summary["units_done"] for run in runs}


# ---------------------------------------------------------------------------------------------
# 2. Corruption


def corrupt(path: Path, how: str, rng: random.Random) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "bitflip":
        data = bytearray(path.read_bytes())
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
    else:
        path.unlink()


# What `orchestrate status` must say for each kind of damage.
EXPECTED_REASON = {
    ("artifact", "truncate"): "corrupt (sha256 mismatch)",
    ("artifact", "bitflip"): "corrupt (sha256 mismatch)",
    ("artifact", "delete"): "is missing",
    ("record", "truncate"): "record is corrupt",
    ("record", "bitflip"): "record is corrupt",
    ("record", "delete"): "no record",
}
TARGETS = [(stage, what) for stage in STAGES for what in ("artifact", "record")]


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
def test_corrupt_artifacts_and_records_are_detected_by_item_and_rebuilt(reference, tmp_path, how):
    """Guards point 2: six damaged files per case (an artifact and a record of every stage, each in
    a different item) are reported by item with the reason, rebuilt, and only they are rebuilt;
    the result is byte-identical to the undamaged run."""
    job_dir = reference.copy(tmp_path / "work")
    rng = random.Random(f"corrupt-{how}")
    damaged = {}
    for n, (stage, what) in enumerate(TARGETS):
        unit = reference.units[stage][n]
        path = unit.record_path(job_dir) if what == "record" else job_dir / stage / unit.outputs[0]
        corrupt(path, how, rng)
        damaged[(stage, unit.key)] = (what, reference.items[n])
    untouched = {rel: state for rel, state in record_identities(job_dir).items()
                 if (rel.split("/")[0], rel.split("/")[1][:-5]) not in damaged}

    status = CliRunner().invoke(app, ["status", str(reference.job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert status.exit_code == 0, status.output
    for (stage, key), (what, item) in damaged.items():
        line = next(line for line in status.stdout.splitlines() if line.strip().startswith(f"{stage} {key}"))
        assert item in line and EXPECTED_REASON[(what, how)] in line, line

    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work")
    # Rebuilt artifacts are byte-identical, so the items downstream of them stay up to date.
    assert made(runs) == {"encode": 2, "denoise": 2, "decode": 2}
    assert artifact_bytes(job_dir) == reference.artifacts
    assert {rel: state for rel, state in record_identities(job_dir).items() if rel in untouched} == untouched
    assert all(unit_status(job_dir, u)[0] for units in plan_units(read_job(job_dir)).values() for u in units)


# (upstream stage, damaged file, how, downstream stage run directly)
DIRECT_CASES = [
    ("encode", "artifact", "bitflip", denoise),
    ("encode", "record", "bitflip", denoise),
    ("denoise", "artifact", "truncate", decode),
    ("denoise", "artifact", "delete", decode),
]


@pytest.mark.parametrize(("upstream", "what", "how", "module"), DIRECT_CASES,
                         ids=[f"{u}-{w}-{h}" for u, w, h, _ in DIRECT_CASES])
def test_a_stage_run_by_hand_refuses_a_corrupt_upstream_artifact(reference, tmp_path, upstream, what, how, module):
    """Guards point 2: a damaged upstream file never flows into a later stage, even when that stage
    is run by hand: it exits 2 naming the item and the fix, and writes no artifact."""
    downstream = STAGES[STAGES.index(upstream) + 1]
    job_dir = reference.copy(tmp_path / "work", drop=STAGES[STAGES.index(downstream):])
    unit = reference.units[upstream][3]
    path = unit.record_path(job_dir) if what == "record" else job_dir / upstream / unit.outputs[0]
    corrupt(path, how, random.Random(how))

    assert module.main([str(job_dir)]) == EXIT_USER_ERROR
    (message,) = error_lines(job_dir, downstream)
    assert reference.items[3] in message and "orchestrate run" in message, message
    assert not list((job_dir / downstream).glob("*.safetensors")) and not list((job_dir / downstream).glob("*.png"))


# ---------------------------------------------------------------------------------------------
# 4. Concurrent runs and stale locks

HOLD_LOCK = """
import sys
from stages.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds `path`'s lock until its stdin closes (or it is killed)."""
    env = dict(os.environ, PYTHONPATH=project_pythonpath())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.platforms
def test_a_second_run_of_the_same_job_is_refused_naming_the_first(reference, tmp_path):
    """Guards point 4: while another process holds the job, `orchestrate run` exits 2 with one line
    naming that process's pid and writes nothing."""
    job_dir = reference.copy(tmp_path / "work")
    holder = hold_lock(job_dir / "run.lock")
    try:
        before = tree_state(job_dir)
        result = CliRunner().invoke(app, ["run", str(reference.job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
        assert result.exit_code == EXIT_USER_ERROR
        (line,) = result.stderr.strip().splitlines()
        assert f"pid {holder.pid}" in line and "already running" in line, line
        assert tree_state(job_dir) == before
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.platforms
def test_a_stage_refuses_to_run_while_another_process_holds_it(reference, tmp_path):
    """Guards point 4 at the stage level: `python -m stages.denoise` run twice at once."""
    job_dir = reference.copy(tmp_path / "work")
    holder = hold_lock(job_dir / "denoise" / ".lock")
    try:
        before = {rel: s for rel, s in tree_state(job_dir).items() if not rel.endswith("stage.log")}
        assert denoise.main([str(job_dir), "--force"]) == EXIT_USER_ERROR
        (message,) = error_lines(job_dir, "denoise")
        assert f"pid {holder.pid}" in message, message
        assert {rel: s for rel, s in tree_state(job_dir).items() if not rel.endswith("stage.log")} == before
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.platforms
def test_locks_left_by_killed_processes_are_taken_over(reference, tmp_path, caplog):
    """Guards point 4: a run and a stage killed with -9 leave lock files naming dead pids; the next
    run detects that, says so, and takes both over."""
    job_dir = reference.copy(tmp_path / "work", drop=("decode",))
    holders = [hold_lock(job_dir / "run.lock"), hold_lock(job_dir / "denoise" / ".lock")]
    for holder in holders:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (job_dir / "run.lock.pid").read_text() == str(holders[0].pid)  # the stale pid is still written beside it
    caplog.set_level(logging.INFO)
    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work", force=("denoise",))
    assert made(runs) == {"denoise": 6, "decode": 6}
    assert f"taking over the lock left by pid {holders[0].pid}" in caplog.text
    assert f"taking over the lock left by pid {holders[1].pid}" in (job_dir / "denoise" / "stage.log").read_text()
    assert artifact_bytes(job_dir) == reference.artifacts


# ---------------------------------------------------------------------------------------------
# 5. Out of memory


def fail_on_call(monkeypatch, owner, name: str, fail_at: int, error: BaseException) -> None:
    """Make `owner.name` raise `error` from its `fail_at`-th call on (1-based)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def set_budget(job_dir: Path, budget) -> None:
    job = json.loads((job_dir / "job.resolved.json").read_text())
    job["runtime"] = {"budget_bytes": budget} if budget is not None else {}
    files.publish_json(job_dir / "job.resolved.json", job)


def oom_cases():
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    return [
        # stage, module, patched class and method, failing call (2nd unit), error, budget, its text
        ("encode", encode, T5EncoderModel, "forward", 3, MemoryError(), 6 << 30, "6.00 GiB"),
        ("denoise", denoise, PixArtTransformer2DModel, "forward", 3,
         torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 3 << 29, "1.50 GiB"),
        ("decode", decode, AutoencoderKL, "decode", 2, RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"), None, "no budget set"),
    ]


@pytest.mark.parametrize("case", range(3), ids=["encode-MemoryError", "denoise-OutOfMemoryError", "decode-RuntimeError"])
def test_out_of_memory_names_stage_item_budget_and_hint_and_resumes(reference, tmp_path, monkeypatch, case):
    """Guards point 5: an OOM on the 2nd unit ends the stage with exit 3 and one line naming the
    stage, the item, the budget and the hint; the 1st unit is kept, and the next run makes only
    the rest, byte-identical to a run that never failed."""
    stage, module, owner, method, fail_at, error, budget, budget_text = oom_cases()[case]
    job_dir = reference.copy(tmp_path / "work", drop=STAGES[STAGES.index(stage):])
    set_budget(job_dir, budget)
    fail_on_call(monkeypatch, owner, method, fail_at, error)

    assert module.main([str(job_dir)]) == EXIT_RESOURCE_ERROR
    (message,) = error_lines(job_dir, stage)
    second = reference.units[stage][1]
    assert message.startswith(f"{stage}: out of memory on item {reference.items[1]} (budget {budget_text}"), message
    assert "--max-vram" in message and "tiling" in message and "finished items are kept" in message
    first = reference.units[stage][0]
    assert unit_status(job_dir, first)[0] and not unit_status(job_dir, second)[0]
    assert temp_files(job_dir) == []
    kept = tree_state(first.record_path(job_dir).parent)[first.record_path(job_dir).name]

    monkeypatch.undo()
    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work")
    assert made(runs) == {s: 5 if s == stage else 6 for s in STAGES[STAGES.index(stage):]}
    assert tree_state(first.record_path(job_dir).parent)[first.record_path(job_dir).name] == kept
    assert artifact_bytes(job_dir) == reference.artifacts


OOM_DENOISE = """
import sys, torch
from diffusers import PixArtTransformer2DModel
forward, calls = PixArtTransformer2DModel.forward, [0]
def failing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > 2:  # the 2nd item (2 steps each)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return forward(self, *args, **kwargs)
PixArtTransformer2DModel.forward = failing
from stages import denoise
sys.exit(denoise.main(sys.argv[1:]))
"""


def test_out_of_memory_through_orchestrate_run_exits_3_and_the_rerun_resumes(reference, tmp_path, monkeypatch):
    """Guards point 5 end to end: a real denoise process (OOM injected at its 2nd item) makes
    `orchestrate run` exit 3 with one line naming stage, item, budget and hint; a rerun resumes."""
    job_dir = reference.copy(tmp_path / "work", drop=("denoise", "decode"))
    real_command = runner.stage_command
    monkeypatch.setattr(runner, "stage_command", lambda stage, job_dir, force=False, units=None: (
        [sys.executable, "-c", OOM_DENOISE, str(job_dir)] + (["--units", ",".join(units)] if units else [])
        if stage == "denoise" else real_command(stage, job_dir, force, units)))
    result = CliRunner().invoke(app, ["run", str(reference.job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert result.exit_code == EXIT_RESOURCE_ERROR, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: stage denoise failed (exit 3): denoise: out of memory on item " + reference.items[1]), line
    assert "budget" in line and "--max-vram" in line and "tiling" in line and "run the same command again to resume" in line
    assert "Traceback" not in result.output

    monkeypatch.undo()
    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work")
    assert made(runs) == {"denoise": 5, "decode": 6}
    assert artifact_bytes(job_dir) == reference.artifacts


# ---------------------------------------------------------------------------------------------
# 6. Disk full and write errors


def test_disk_full_during_an_artifact_write_leaves_no_partial_artifact(reference, tmp_path, monkeypatch):
    """Guards point 6: ENOSPC half way through the 2nd latents file: exit 3, one clear line naming
    the file, no temp file, no artifact and no record for that item; the rerun completes."""
    import safetensors.torch

    job_dir = reference.copy(tmp_path / "work", drop=("denoise", "decode"))
    real_save = safetensors.torch.save_file
    calls = [0]

    def save_file(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] == 2:
            data = safetensors.torch.save(tensors, metadata=metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert denoise.main([str(job_dir)]) == EXIT_RESOURCE_ERROR
    second = reference.units["denoise"][1]
    (message,) = error_lines(job_dir, "denoise")
    assert f"could not write {job_dir / 'denoise' / second.outputs[0]}: No space left on device; free disk space" in message
    assert temp_files(job_dir) == []
    assert not (job_dir / "denoise" / second.outputs[0]).exists() and not second.record_path(job_dir).exists()
    assert unit_status(job_dir, reference.units["denoise"][0])[0]

    monkeypatch.undo()
    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work")
    assert made(runs) == {"denoise": 5, "decode": 6}
    assert artifact_bytes(job_dir) == reference.artifacts


def test_write_error_on_a_record_leaves_the_image_unaccepted(reference, tmp_path, monkeypatch):
    """Guards point 6: EIO while writing the 2nd PNG's record: the PNG is in place but, without its
    record, is not accepted; the rerun remakes it and the rest."""
    job_dir = reference.copy(tmp_path / "work", drop=("decode",))
    real_write_bytes = pathlib.Path.write_bytes
    calls = [0]

    def write_bytes(self, data):
        if self.name.startswith(TMP_PREFIX) and self.name.endswith(".json") and self.parent.name == "decode":
            calls[0] += 1
            if calls[0] == 2:
                real_write_bytes(self, data[:100])
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    assert decode.main([str(job_dir)]) == EXIT_RESOURCE_ERROR
    second = reference.units["decode"][1]
    (message,) = error_lines(job_dir, "decode")
    assert f"could not write {second.record_path(job_dir)}: Input/output error" in message, message
    assert temp_files(job_dir) == []
    assert (job_dir / "decode" / second.outputs[0]).exists()
    assert unit_status(job_dir, second) == (False, "no record")

    monkeypatch.undo()
    _, runs, _ = run_inprocess(reference.job_file, tmp_path / "work")
    assert made(runs) == {"decode": 5}
    assert artifact_bytes(job_dir) == reference.artifacts


# ---------------------------------------------------------------------------------------------
# 7. Changing the model or dtype


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """The tiny model again with other random weights: same configs, same file sizes."""
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("other") / "tiny-seed-1", seed=1)


def all_states(job_file: Path, workdir: Path) -> list[tuple]:
    """(unit, planned state, why the unit itself is not up to date) for every unit of the job."""
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, workdir)
    resolved = jobfile.resolve_job(job, job_dir, "cpu")
    return [(s.unit, s.state, unit_status(job_dir, s.unit)) for states in plan_job(job_dir, resolved).values() for s in states]


def assert_none_reused(states, old_encode_units, reason: str) -> None:
    """No unit is up to date: an encode key hashes its params, so the new key names a file never
    made (to do); denoise and decode units keep their keys and are stale for `reason`."""
    old_keys = {unit.key for unit in old_encode_units}
    for unit, state, (ok, why) in states:
        assert not ok, (unit.stage, unit.key)
        if unit.stage == "encode":
            assert state == "to do" and unit.key not in old_keys, (unit.key, state)
        else:
            assert state == "stale" and reason in why, (unit.stage, unit.key, why)


def test_records_name_the_model_config_hash_and_dtype(reference):
    """Guards point 7: every record says which model files (by hash) and dtype made it."""
    job = read_job(reference.job_dir)
    for stage, units in reference.units.items():
        for unit in units:
            record = json.loads(unit.record_path(reference.job_dir).read_text())
            assert record["model"]["config_hash"] == job["model"]["component_hashes"][stage] == record["params"]["model"]
            assert record["dtype"] == record["params"]["dtype"] == "float32"


def test_changing_the_dtype_invalidates_every_artifact(reference, tmp_path):
    """Guards point 7: float32 -> bfloat16 makes every unit of every stage stale, saying why."""
    reference.copy(tmp_path / "work")
    job_file = write_job(tmp_path, job_text(read_job(reference.job_dir)["model"]["path"], extra='dtype = "bfloat16"'))
    states = all_states(job_file, tmp_path / "work")
    assert len(states) == 18
    assert_none_reused(states, reference.units["encode"], "dtype 'float32' -> 'bfloat16'")


@pytest.mark.parametrize("how", ["other-folder", "weights-replaced-in-place"])
def test_changing_the_model_invalidates_every_artifact(tiny_model, other_weights, tmp_path, how):
    """Guards point 7: pointing the job at another model, or replacing the weights in the model
    folder by others of the same shapes (a fine-tune), makes every unit of every stage stale."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    job_file = write_job(tmp_path, job_text(model, prompts=PROMPTS[:2]))
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    old_encode = plan_units(read_job(job_dir))["encode"]
    if how == "other-folder":
        job_file = write_job(tmp_path, job_text(other_weights, prompts=PROMPTS[:2]))
    else:
        for weights in other_weights.glob("*/*.safetensors"):
            shutil.copy(weights, model / weights.relative_to(other_weights))
    states = all_states(job_file, tmp_path / "work")
    assert len(states) == 6
    assert_none_reused(states, old_encode, "model")


# ---------------------------------------------------------------------------------------------
# 8. Safety

HOSTILE_PROMPTS = [
    "../../../../etc/passwd",
    "/tmp/absolute/path",
    "..\\..\\windows\\system32\\evil.dll",
    "$(touch pwned) `rm -rf ~` ; | & > out.txt",
    "nul\u0000byte and\nnew line",
    "..",
    "ñandú 🦜 ☃ 東京",
    "x" * 300,
    "",
]
SAFE_NAME = re.compile(r"^(\d{4}-[a-z0-9-]{1,40}\.(json|safetensors|png|thumb\.webp)|[a-z0-9-]{1,24}-[0-9a-f]{16}\.(json|safetensors)|"
                       r"stage\.log|summary\.json|\.lock)$")


@pytest.mark.platforms
def test_hostile_prompts_make_safe_file_names_inside_the_job_folder(tiny_model, tmp_path):
    """Guards point 8: prompts full of path tricks become `<index>-<slug>` names; every file the run
    writes is inside the job folder, and the model folder is untouched."""
    model_before = tree_state(tiny_model)
    body = JOB_HEAD.format(model=tiny_model, extra="").replace("num_inference_steps = 2", "num_inference_steps = 1")
    for prompt in HOSTILE_PROMPTS:
        body += f"\n[[generation]]\nprompt = {toml_string(prompt)}\nguidance_scale = 1.0\nseed = 1\n"
    job_file = write_job(tmp_path, body)
    before = tree_state(tmp_path)
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    new = sorted(set(tree_state(tmp_path)) - set(before))
    assert new and all(rel.startswith("work/rel/") for rel in new), new
    for rel in new:
        name = rel.split("/")[-1]
        assert rel.count("/") in (2, 3) and (rel.count("/") == 2 or SAFE_NAME.match(name)), rel
    assert len(list((job_dir / "decode").glob("*.png"))) == len(HOSTILE_PROMPTS)
    assert tree_state(tiny_model) == model_before
    assert tree_state(Path("/tmp/absolute")) == {} and not (tmp_path / "pwned").exists()


class PickleTrap:
    """Unpickling this touches `marker`: proof that a pickle file was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_weights_next_to_safetensors_are_never_loaded(tiny_model, tmp_path):
    """Guards point 8: booby-trapped pickle weight files beside the safetensors are never opened."""
    marker = tmp_path / "a-pickle-was-loaded"
    trap = pickle.dumps(PickleTrap(marker))
    pickle.loads(trap)  # the trap works...
    assert marker.exists()
    marker.unlink()
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for name in ("text_encoder/pytorch_model.bin", "transformer/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
                 "transformer/diffusion_pytorch_model.ckpt", "text_encoder/model.pt"):
        (model / name).write_bytes(trap)
    job_file = write_job(tmp_path, job_text(model, prompts=PROMPTS[:1]))
    job_dir, runs, _ = run_inprocess(job_file, tmp_path / "work")
    assert made(runs) == {"encode": 1, "denoise": 1, "decode": 1}
    assert not marker.exists()  # ...and was never sprung


def test_a_component_with_only_pickle_weights_is_refused_before_anything_is_written(tiny_model, tmp_path):
    """Guards points 3 and 8: a transformer folder holding only a pickle is refused with exit 2 and
    one line naming the part, before anything is written or loaded."""
    marker = tmp_path / "a-pickle-was-loaded"
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(PickleTrap(marker)))
    job_file = write_job(tmp_path, job_text(model, prompts=PROMPTS[:1]))
    result = CliRunner().invoke(app, ["run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
    assert result.exit_code == EXIT_USER_ERROR
    (line,) = result.stderr.strip().splitlines()
    assert "transformer/ has only pickle weights (diffusion_pytorch_model.bin)" in line and "safetensors" in line, line
    assert not (tmp_path / "work").exists() and not marker.exists()


def test_weights_are_loaded_from_safetensors_only_and_no_remote_code():
    """Guards point 8 in the source: every model `from_pretrained` passes use_safetensors=True; no
    pickle or remote code anywhere; torch.load only in `orchestrate convert` (never a stage), and
    only with weights_only=True; hub downloads fetch no pickle files."""
    sources = sorted((PROJECT_ROOT / "stages").rglob("*.py")) + sorted((PROJECT_ROOT / "orchestrator").rglob("*.py"))  # subpackages too
    loads = 0
    for source in sources:
        text = source.read_text()
        for banned in ("import pickle", "trust_remote_code", "custom_pipeline", "weights_only=False"):
            assert banned not in text, f"{source.name}: {banned}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                assert source.name == "convert.py", f"{source.name}:{node.lineno} torch.load outside orchestrate convert"
                assert {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only") == "True", f"{source.name}:{node.lineno}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                receiver = ast.unparse(node.func.value)
                if receiver.endswith(("Tokenizer", "Config", "Scheduler")):  # no weights
                    continue
                loads += 1
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("use_safetensors")
                assert flag == "True", f"{source.name}:{node.lineno} {receiver}.from_pretrained without use_safetensors=True"
    assert loads >= 3  # T5, transformer, VAE
    from stages.resolved import HUB_WEIGHT_PATTERNS

    fetched = [*jobfile._HUB_CONFIGS, *(p for part in jobfile.COMPONENTS for p in jobfile.component_patterns(part)),
               *(p.format(part=part) for part in ("text_encoder", "transformer", "vae") for p in HUB_WEIGHT_PATTERNS)]
    for pattern in fetched:  # what the orchestrator and the stages fetch from the hub
        for pickle_name in ("transformer/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin", "vae/model.ckpt", "x/y.pt", "x/y.pkl"):
            assert not fnmatch.fnmatch(pickle_name, pattern), (pattern, pickle_name)


def test_oom_guard_converts_out_of_memory_only(reference):
    """Guards point 5 from the other side: other errors (bugs) keep their type and traceback."""
    job, unit = read_job(reference.job_dir), reference.units["denoise"][0]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with entry.oom_guard(job, unit):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    for error in (torch.OutOfMemoryError("CUDA out of memory."), MemoryError(), RuntimeError("HIP out of memory")):
        with pytest.raises(contract.ResourceError, match=f"denoise: out of memory on item {unit.key} \\(budget no budget set"):
            with entry.oom_guard(job, unit):
                raise error
