"""The job's state cache (<job_dir>/.state.json, stages/records.py): a rerun with nothing to do
stats files and reads no record, a file whose stat changed is hashed again, a damaged cache is
rebuilt, the job's plan entry holds only while the job, the code and every file it lists are
unchanged, and status or a no-op run never imports torch (issue 21). Counts, not timings."""

from __future__ import annotations

import collections
import json
import os
import shutil

import pytest

from orchestrator.executors.runner import StageRun, run_job
from orchestrator.planning import plan as plan_module
from orchestrator.planning.plan import DoneStates, plan_job
from orchestrator.tools.clean import clean
from orchestrator.views import gallery
from stages import records
from stages.resolved import read_job
from tests.conftest import count_reads_and_hashes, python_probe, run_inprocess, write_job

JOB = """
[job]
name = "state"
model = "{model}"
[defaults]
width = 64
height = 64
use_resolution_binning = false
num_inference_steps = 1
guidance_scale = 1.0
seed = 5
[[generation]]
prompt = "a red boat"
count = 2
[[generation]]
prompt = "a green hill"
"""


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """A finished job of 3 items (job file, workdir, job folder), copied by each test."""
    tmp = tmp_path_factory.mktemp("state")
    job_file = write_job(tmp, JOB.format(model=tiny_model))
    job_dir, _, _ = run_inprocess(job_file, tmp / "work")
    return job_file, tmp / "work", job_dir


@pytest.fixture
def job_dir(made, tmp_path, monkeypatch):
    """A copy of the finished job (a copy has new inodes and ctimes: nothing in its cache holds),
    with the racy-entry window off, since the test's files were all written a moment ago."""
    monkeypatch.setattr(records, "RACY_NS", 0)
    copy = tmp_path / "work" / made[2].name
    shutil.copytree(made[2], copy)
    return copy


def _noop_run(job_dir):
    """`orchestrate run` with nothing to do, gallery included: its final plan."""
    plans, lines = [], []
    runs = run_job(job_dir, read_job(job_dir), lines.append, launch=lambda *a: pytest.fail("nothing should run"), plans=plans)
    assert runs == [] and "decode: 3 up to date, 0 to do" in lines
    gallery.write_gallery(job_dir, read_job(job_dir), states=plans[-1])
    return plans[-1]


def test_a_warm_no_op_rerun_reads_no_record_and_hashes_nothing(job_dir, monkeypatch):
    reads, hashes = count_reads_and_hashes(monkeypatch)
    _noop_run(job_dir)  # cold: the copy's stats match nothing kept, so every record is read
    assert len(reads) == 3 + 3 + 2 and len(hashes) == 2 + 3 + 6  # 2 encode units (one shared), decode has PNG + thumbnail
    plan, verdicts, file_hashes = _state(job_dir)
    assert plan["version"] == verdicts["version"] == file_hashes["version"] == records.STATE_VERSION
    assert len(verdicts["verdicts"]) == 8 and len(file_hashes["hashes"]) == 11
    # Every unit done: the plan entry lists each file the verdicts were made from, once.
    assert plan["plan"]["counts"] == {"encode": 2, "denoise": 3, "decode": 3} and len(plan["plan"]["files"].split("\n")) == 2 * 2 + 3 * 2 + 3 * 3
    page = (job_dir / "index.html").read_bytes()
    reads.clear(), hashes.clear()
    lines = []  # which lines of the state file are parsed: the verdicts only when the plan entry does not hold
    real_line = records.RecordReader._state_line
    monkeypatch.setattr(records.RecordReader, "_state_line", lambda self, n, name: lines.append(n) or real_line(self, n, name))
    states = _noop_run(job_dir)  # warm: the plan entry holds, nothing is judged
    assert not reads and not hashes, (reads, hashes)
    assert [s.state for stage in states.values() for s in stage] == ["done"] * 8
    assert (job_dir / "index.html").read_bytes() == page and lines == [0]
    del lines[:]
    plan_job(job_dir, read_job(job_dir))  # `orchestrate status`: a fresh reader, the same cache
    assert not reads and not hashes and lines == [0]


def _state(job_dir) -> list[dict]:
    """The state file's three JSON lines: the plan entry, the verdicts, then the file hashes."""
    return [json.loads(line) for line in (job_dir / records.STATE_FILE).read_text().splitlines()]


def _state_text(verdicts, hashes, version=records.STATE_VERSION, plan=None) -> str:
    return "".join(json.dumps({"version": version, name: value}) + "\n"
                   for name, value in (("plan", plan or {}), ("verdicts", verdicts), ("hashes", hashes)))


def test_racily_clean_verdicts_and_hashes_are_not_saved(job_dir, monkeypatch):
    """A file changed within RACY_NS before the save could change again without changing its
    stat: neither its hash nor a verdict made from it is saved (this process still uses them)."""
    monkeypatch.setattr(records, "RACY_NS", 10**6 * 10**9)  # every file of the copy changed "just now"
    reads, _ = count_reads_and_hashes(monkeypatch)
    _noop_run(job_dir)
    plan, verdicts, hashes = _state(job_dir)
    assert plan["plan"] == {} and verdicts["verdicts"] == {} and hashes["hashes"] == {}
    assert len(reads) == 8  # judged once in this run: its own plans reuse what it learned


def test_a_same_size_rewrite_is_hashed_again_and_found_stale(job_dir, monkeypatch):
    """Different bytes, same size, and the mtime set back as it was: the ctime (and, for most
    writers, the inode) still differs, so the file is hashed again; its content hash decides."""
    _noop_run(job_dir)
    latents = next((job_dir / "denoise").glob("0001-*.safetensors"))
    before = os.stat(latents)
    data = bytearray(latents.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: still a valid file of the same size
    with open(latents, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(latents, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(latents).st_size, os.stat(latents).st_mtime_ns, os.stat(latents).st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    reads, hashes = count_reads_and_hashes(monkeypatch)
    states = plan_job(job_dir, read_job(job_dir))
    assert hashes[str(latents)] == 1
    by_key = {(stage, s.unit.key): s for stage, stage_states in states.items() for s in stage_states}
    item = latents.name.removesuffix(".safetensors")
    assert (by_key["denoise", item].state, by_key["denoise", item].reason) == ("stale", f"{latents.name} is corrupt (sha256 mismatch)")
    assert (by_key["decode", item].state, by_key["decode", item].reason) == ("stale", "denoise reruns")
    assert sum(s.state == "done" for s in by_key.values()) == 6  # the other items are untouched


@pytest.mark.parametrize("damage", ["not json", "wrong types", "damaged entries", "other version", "fifo"])
def test_a_damaged_state_cache_is_rebuilt(job_dir, monkeypatch, damage):
    _noop_run(job_dir)
    path = job_dir / records.STATE_FILE
    good = _state(job_dir)
    verdicts, hashes = good[1]["verdicts"], good[2]["hashes"]
    path.unlink()
    if damage == "fifo":
        os.mkfifo(path)  # never opened: a read would block forever
    else:
        path.write_text({"not json": '{"version": %d, "verdicts": {' % records.STATE_VERSION,
                         "wrong types": _state_text([], []),
                         # entries are checked when used: each damaged one is judged again, and dropped by the next save
                         "damaged entries": _state_text({"y": [1], **{k: 7 for k in verdicts}}, {"x": 1, **{k: "junk" for k in hashes}}),
                         # a stale verdict of another version must not be trusted: it says every unit is stale
                         "other version": _state_text({k: v.rsplit("|", 2)[0] + "|0|lie" for k, v in verdicts.items()}, hashes, version=0),
                         }[damage])
    damaged = None if damage == "fifo" else path.read_bytes()
    reads, _ = count_reads_and_hashes(monkeypatch)
    states = plan_job(job_dir, read_job(job_dir))  # `status`: judged from the records again, writes nothing
    assert [s.state for stage in states.values() for s in stage] == ["done"] * 8
    assert len(reads) == 8 and (path.is_fifo() if damage == "fifo" else path.read_bytes() == damaged)
    _noop_run(job_dir)  # `run` saves it
    assert path.is_file() and _state(job_dir) == good


def test_a_warm_plan_stats_each_file_once_and_the_page_reuses_its_stats(job_dir, monkeypatch):
    """A record is its unit's and its downstream unit's input: the plan stats it once
    (RecordReader.snapshot), and the gallery rendered from that plan stats no record again. The
    plan that then takes the job from its plan entry stats each file once too."""
    _noop_run(job_dir)
    _drop_plan_entry(job_dir)  # judged unit by unit
    stats = collections.Counter()
    real_stat = records.stat_key
    counting = lambda path: stats.update([str(path)]) or real_stat(path)  # noqa: E731
    monkeypatch.setattr(records, "stat_key", counting)
    monkeypatch.setattr(gallery, "stat_key", counting)
    reader = records.RecordReader()
    states = plan_job(job_dir, read_job(job_dir), reader)
    assert [s.state for stage in states.values() for s in stage] == ["done"] * 8
    # 2 encode units (record, embedding), 3 denoise (record, latents), 3 decode (record, PNG, thumbnail)
    assert len(stats) == 2 * 2 + 3 * 2 + 3 * 3 and set(stats.values()) == {1}, stats
    assert set(reader.last_snapshot) == {p for p in stats if p.endswith(".json")}
    assert states.identity is not None  # every unit done: the plan's entry, which the next plan uses
    stats.clear()
    # A plain dict: no plan identity, so the page checks each data file by its fingerprint.
    gallery.render_gallery(job_dir, read_job(job_dir), states=dict(states), stats=reader.last_snapshot)
    assert not stats
    gallery.render_gallery(job_dir, read_job(job_dir), states=dict(states))  # without them, each record is stat'ed
    assert len(stats) == 8 and all(p.endswith(".json") for p in stats)
    reader.save()
    stats.clear()
    held = plan_job(job_dir, read_job(job_dir))
    assert all(isinstance(s, DoneStates) for s in held.values()) and held.identity == states.identity
    assert len(stats) == 2 * 2 + 3 * 2 + 3 * 3 and set(stats.values()) == {1}, stats


def _drop_plan_entry(job_dir) -> None:
    """The state file without its plan entry: the next plan judges unit by unit."""
    _, verdicts, hashes = _state(job_dir)
    (job_dir / records.STATE_FILE).write_text(_state_text(verdicts["verdicts"], hashes["hashes"]))


def _rewrite(path, data: bytes) -> None:
    """New bytes through a new file and a rename, as a restore or a stage writes them."""
    path.with_name("new").write_bytes(data)
    os.replace(path.with_name("new"), path)


@pytest.mark.parametrize("change", ["encode record", "embedding", "latents", "png", "thumbnail", "job", "code", "forged stamp"])
def test_the_plan_entry_holds_only_for_the_same_job_code_and_files(job_dir, monkeypatch, change):
    """A plan takes every unit as done from the job's plan entry only while the job, the code that
    judges it and each file it was judged from are unchanged. Any change: judged unit by unit
    again, and exactly what changed is found stale."""
    _noop_run(job_dir)  # saves the entry (the fixture turns the racy window off)
    job = read_job(job_dir)
    reads, _ = count_reads_and_hashes(monkeypatch)
    assert all(isinstance(s, DoneStates) for s in plan_job(job_dir, job).values()) and not reads
    item = job["items"][1]["id"]  # shares its encode unit with item 0
    encode_key = next(p.stem for p in (job_dir / "encode").glob("a-red-boat-*.json"))
    if change == "encode record":
        (job_dir / "encode" / f"{encode_key}.json").unlink()
    elif change in ("embedding", "latents", "png"):
        path = {"embedding": job_dir / "encode" / f"{encode_key}.safetensors", "latents": job_dir / "denoise" / f"{item}.safetensors",
                "png": job_dir / "decode" / f"{item}.png"}[change]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # same size, other content
        _rewrite(path, bytes(data))
    elif change == "thumbnail":
        (job_dir / "decode" / f"{item}.thumb.webp").unlink()
    elif change == "job":
        job["items"][1] = dict(job["items"][1], seed=job["items"][1]["seed"] + 1)
    elif change == "code":  # another version of the code that makes and judges units
        monkeypatch.setattr(plan_module, "_code_identity", lambda: b"another version")
    else:
        lines = (job_dir / records.STATE_FILE).read_text().splitlines(keepends=True)
        entry = json.loads(lines[0])
        entry["plan"]["stamp"] = format(int(entry["plan"]["stamp"], 16) ^ 1, "x")
        (job_dir / records.STATE_FILE).write_text(json.dumps(entry) + "\n" + "".join(lines[1:]))
    states = plan_job(job_dir, job)
    assert not any(isinstance(s, DoneStates) for s in states.values())  # judged unit by unit
    not_done = {(stage, s.unit.key) for stage, stage_states in states.items() for s in stage_states if s.state != "done"}
    items = {job["items"][0]["id"], item}
    expected = {
        "encode record": {("encode", encode_key)} | {(stage, i) for stage in ("denoise", "decode") for i in items},
        "embedding": {("encode", encode_key)} | {(stage, i) for stage in ("denoise", "decode") for i in items},
        "latents": {("denoise", item), ("decode", item)},
        "png": {("decode", item)},
        "thumbnail": {("decode", item)},
        "job": {("denoise", item), ("decode", item)},
    }.get(change, set())
    assert not_done == expected
    if not expected:  # still all done: the plan has a new entry to save
        assert states.identity is not None and not reads


def test_a_page_made_from_an_equal_plan_judges_no_item(job_dir, monkeypatch):
    """A no-op run whose plan entry holds keeps every data file of the page without judging an
    item, when the page was made from that same plan; a damaged data file is still remade."""
    _noop_run(job_dir)  # its page records the plan it was made from
    page = {path: path.read_bytes() for path in [job_dir / "index.html", *(job_dir / "gallery").iterdir()]}
    real_item_states = gallery._item_states
    monkeypatch.setattr(gallery, "_item_states", lambda *a, **k: pytest.fail("no item is judged"))
    _noop_run(job_dir)
    assert {path: path.read_bytes() for path in page} == page
    data = job_dir / "gallery" / "items-0000.js"
    data.write_bytes(b"damaged")
    monkeypatch.setattr(gallery, "_item_states", real_item_states)
    _noop_run(job_dir)
    assert {path: path.read_bytes() for path in page} == page


def test_force_remakes_every_unit_when_the_plan_entry_holds(job_dir):
    """--force STAGE names every unit of the stage, though the plan took them as done unjudged."""
    _noop_run(job_dir)
    launched, lines = [], []
    launch = lambda stage, _dir, forced, echo, units: launched.append((stage, forced, units)) or StageRun(stage, 0.0, {})  # noqa: E731
    run_job(job_dir, read_job(job_dir), lines.append, force=("decode",), launch=launch)
    assert launched == [("decode", True, None)] and "decode: forced, remaking all 3" in lines


def test_a_unit_fingerprint_depends_on_values_not_on_object_identity(job_dir):
    """A verdict is kept while its unit's fingerprint is equal: params built by another path (a job
    read back from JSON, a string shared by two fields) must give the same fingerprint, and any
    other value another one (pickle, or marshal past version 0, writes shared objects as references)."""
    import dataclasses

    from stages.units import plan_units, unit_fingerprint

    unit = plan_units(read_job(job_dir))["decode"][0]
    shared = "".join(["x"] * 50)  # one object, used twice
    one = dataclasses.replace(unit, params=dict(unit.params, a=shared, b=shared))
    two = dataclasses.replace(unit, params=dict(unit.params, a="".join(["x"] * 50), b="".join(["x"] * 50)))
    assert unit_fingerprint(one) == unit_fingerprint(two)
    for other in (dict(unit.params, a=shared, b=shared + "y"), dict(unit.params, a=shared, b=1), dict(unit.params, a=shared, b=1.0),
                  dict(unit.params, a=shared, b=True)):
        assert unit_fingerprint(dataclasses.replace(unit, params=other)) != unit_fingerprint(one)
    assert len({unit_fingerprint(dataclasses.replace(unit, params=dict(unit.params, b=v))) for v in (1, 1.0, True, "1", None)}) == 5


def test_clean_removes_the_state_cache(job_dir):
    _noop_run(job_dir)
    lines = []
    clean(job_dir, read_job(job_dir), job_dir.parent, True, False, lines.append)
    assert not (job_dir / records.STATE_FILE).exists() and any(records.STATE_FILE in line for line in lines)
    assert (job_dir / "decode").is_dir() and len(list((job_dir / "decode").glob("*.png"))) == 3


def test_status_and_a_no_op_run_import_no_torch(made):
    """The commands that only judge files never load torch, diffusers or transformers (seconds)."""
    job_file, workdir, _ = made
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom orchestrator.cli import app\n"
             "for args in (['status'], ['run'], ['gallery']):\n"
             # status with --device auto: the device of the job's last run, so no torch to look for a GPU
             "    extra = ['--device', 'cpu'] if args == ['run'] else []\n"
             f"    result = CliRunner().invoke(app, args + [{str(job_file)!r}, '--workdir', {str(workdir)!r}] + extra)\n"
             "    assert result.exit_code == 0, result.output\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules))\n")
    assert python_probe(probe) == "[]"
