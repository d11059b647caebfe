"""bench/gpu.sh --smoke: the GPU benchmark's whole path (model build, `orchestrate run` under each
budget, the diffusers baselines, latents and pixels compared, tables) on the CPU with a tiny model,
so a lent GPU's one call is not spent finding a bug in the script. One run is given a 3 s limit and
must become a row that says so while every other row is complete (issue 8, point 1: one failed run
used to lose every table). Starts ~20 real processes: about 1.5-2 minutes here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)
import gpu_bench  # noqa: E402

ROWS = (  # in order of importance: the table keeps it (issue 8, point 10)
    "ours, no budget flag",
    "diffusers, all resident",
    "ours, no budget flag, --exact",
    "ours --max-vram 8GiB",
    "ours --max-vram 2GiB",
    "ours --max-vram 1GiB",
    "diffusers, model CPU offload",
    "diffusers, sequential CPU offload",
    "Σ-2K: ours, no budget flag",  # PixArt-Σ 2K composed on T5 of the α model (issue 7)
    "Σ-2K: diffusers, all resident",
    "Σ-2K: ours --max-vram 4GiB",
)


def table_rows(markdown: str) -> list[list[str]]:
    """The summary table's rows, cells stripped, in order."""
    rows = []
    for line in markdown.split("## Summary", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ROWS:
            rows.append(cells)
    return rows


def test_gpu_bench_smoke_prints_its_table_with_all_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--run-timeout", "ours-1GiB=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    markdown = (out / "gpu_bench.md").read_text()
    assert result.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1]), "the table must be printed last"
    assert {p.name for p in out.iterdir()} == {"gpu_bench.md", "gpu_bench.json", "gpu_bench.log"}  # the device tool brings back 8 at most
    assert "IN PROGRESS" not in markdown

    rows = table_rows(markdown)
    assert [r[0] for r in rows] == list(ROWS)
    header = gpu_bench.SUMMARY_HEADER
    for cells in rows:
        row = dict(zip(header, cells))
        name = row["run"]
        if name == "ours --max-vram 1GiB":  # killed at its own 3 s limit: a row that says so, nothing lost elsewhere
            assert row["notes"].startswith("TIMED OUT at 3 s"), row
            assert row["images"].endswith("/4") and row["images"] != "4/4", row
            continue
        if name == "diffusers, sequential CPU offload":
            assert row["notes"].startswith("skipped on the CPU"), row
            continue
        assert row["images"] == ("1/1" if name.startswith("Σ-2K") else "4/4"), row  # every image made
        if name in ("diffusers, all resident", "Σ-2K: diffusers, all resident"):
            assert row["pixels vs resident pipeline"] == "(reference)", row
        else:  # fp32 on the CPU, batch 1 (no CUDA budget batches here): the exact defaults, latents and pixels
            assert row["pixels vs resident pipeline"] == ("1/1 equal" if name.startswith("Σ-2K") else "4/4 equal"), row
            assert row["latents max abs diff"] == "0 (equal)", row

    report = json.loads((out / "gpu_bench.json").read_text())
    assert report["final"] is True
    ours = report["runs"]["ours, no budget flag"]
    assert list(ours["stages"]) == ["encode", "denoise", "decode"]
    for stage in ours["stages"].values():  # read from the records and summaries
        assert stage["units"] >= 1 and stage["compute"] > 0 and stage["peak"]["host_peak_rss_bytes"] > 0
    assert report["runs"]["diffusers, all resident"]["report"]["components"]["denoise"]["calls"] == 4 * 2  # 4 images x 2 steps
    assert report["runs"]["ours --max-vram 1GiB"]["exit"] == "timeout"
    sigma = report["runs"]["Σ-2K: ours, no budget flag"]
    resolved = json.loads((Path(sigma["log"]).parent / "bench-sigma" / "job.resolved.json").read_text())
    assert resolved["pipeline"] == "PixArtSigmaPipeline" and set(resolved["model"]["components"]) == {"text_encoder", "tokenizer"}


def test_a_bench_stopped_by_sigterm_still_writes_its_tables(tmp_path):
    """The device tool (or a user) may stop the bench at any moment: the run in flight is killed
    with its process group and the tables say what finished and what was interrupted."""
    import signal
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    process = subprocess.Popen(["bash", "bench/gpu.sh", "--smoke", "--jobs", "1", "--out", str(out), "--work", str(work)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (work / "runs" / "diffusers-all-resident" / "run.log").exists():
        time.sleep(0.2)  # the first run is over; the second is in flight
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output[-3000:]
    markdown = (out / "gpu_bench.md").read_text()
    rows = {r[0]: dict(zip(gpu_bench.SUMMARY_HEADER, r)) for r in table_rows(markdown)}
    assert rows["ours, no budget flag"]["images"] == "4/4", rows
    assert rows["diffusers, all resident"]["notes"].startswith("INTERRUPTED"), rows
    assert all(rows[name]["notes"].startswith("skipped") for name in ROWS[2:]), rows
    assert "stopped by a signal" in markdown
    leftover = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes of the stopped bench still running: {leftover}"


def test_published_files_leave_out_writes_in_flight(tmp_path):
    """bench/common.py reads only published files: a `.tmp-*` file (a write in flight, or left by a
    killed stage) would be half a JSON or PNG."""
    (tmp_path / "0001.json").write_text("{}")
    (tmp_path / ".tmp-123-0002.json").write_text("{half")
    assert [p.name for p in common.published(tmp_path, "*.json")] == ["0001.json"]


def test_a_run_folder_is_recreated_over_leftovers(tmp_path, monkeypatch):
    """A second bench call with the same --work: a run folder that cannot be removed (a file still
    open, a read-only tree) is moved aside, and the run gets an empty folder instead of failing."""
    folder = tmp_path / "runs" / "ours-1GiB"
    (folder / "bench").mkdir(parents=True)
    (folder / "run.log").write_text("old")
    assert list(common.fresh_folder(folder).iterdir()) == []
    (folder / "run.log").write_text("old again")
    monkeypatch.setattr(common, "remove", lambda path: None)  # removal fails silently, as rmtree(ignore_errors=True) may
    assert list(common.fresh_folder(folder).iterdir()) == []
    assert [p.name.split(".old-")[0] for p in (tmp_path / "runs").iterdir() if ".old-" in p.name] == ["ours-1GiB"]


@pytest.mark.parametrize("mode, rows", [("gpu", 11), ("quick", 5), ("smoke", 11)])
def test_rows_run_in_order_of_importance_each_with_its_own_limit(mode, rows):
    specs = gpu_bench.run_specs(mode)
    assert [s["name"] for s in specs] == list(ROWS[:rows])
    assert all(s["limit"] > 0 for s in specs)
    quick = gpu_bench.SETTINGS["quick"]
    assert quick["time_limit"] <= 300 and quick["device"] == "cuda"  # --quick fits in 5 minutes, the build included


def test_psnr_and_max_difference_of_images(tmp_path):
    import numpy as np
    from PIL import Image

    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # one channel value off by 10: MSE 100/192
    for name, array in (("a.png", a), ("b.png", b)):
        Image.fromarray(array).save(tmp_path / name)
    same = gpu_bench.compare_pixels([str(tmp_path / "a.png")], [str(tmp_path / "a.png")])
    assert same == {"compared": 1, "equal": 1, "max_abs_diff": 0, "min_psnr_db": float("inf")}
    near = gpu_bench.compare_pixels([str(tmp_path / "b.png"), None], [str(tmp_path / "a.png"), str(tmp_path / "a.png")])
    assert near["compared"] == 1 and near["equal"] == 0 and near["max_abs_diff"] == 10
    assert abs(near["min_psnr_db"] - 10 * np.log10(255**2 / (100 / 192))) < 1e-9


def test_gpu_memory_sampler_reads_nvml_and_keeps_the_peak(monkeypatch):
    """Issue 8, point 9: the sampler reads NVML (nvidia-ml-py) in a thread, so stopping it loses
    nothing (nvidia-smi -lms kept its output block-buffered and lost it when terminated)."""
    import time
    import types

    readings = iter([100, 300, 2500, 700] + [650] * 10000)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: ("gpu", index),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=next(readings) * 2**20),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with gpu_bench.GpuMemorySampler() as sampler:
        time.sleep(0.3)  # ~15 samples at 20 ms
    assert sampler.source == "NVML" and sampler.peak_mib == 2500


def test_gpu_memory_sampler_without_nvml_or_nvidia_smi_samples_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(gpu_bench.shutil, "which", lambda name: None)
    with gpu_bench.GpuMemorySampler() as sampler:
        pass
    assert sampler.source is None and sampler.peak_mib is None and sampler.sample_mib() is None


@pytest.mark.parametrize("model", ["alpha-1024", "alpha-512", "lcm-1024", "sigma-1024", "sigma-512", "sigma-2k"])
def test_fullsize_builds_every_family_member_from_the_real_configs(model):
    """bench/fullsize.py --model: the full-size configs of each member hold together (T5 width =
    caption channels) and keep the member's own architecture (sample_size, Σ's conditions)."""
    import fullsize

    configs = fullsize.model_configs("full", None, model)
    dit = configs["transformer"]
    assert dit["caption_channels"] == configs["text_encoder"]["d_model"] == 4096
    assert dit["sample_size"] == {"alpha-512": 64, "sigma-512": 64, "sigma-2k": 256}.get(model, 128)
    assert (dit.get("use_additional_conditions") is False) == (model in ("sigma-1024", "sigma-2k"))
    assert configs["vae"]["scaling_factor"] == (0.13025 if model.startswith("sigma") else 0.18215)


def test_scale_bench_generates_clones_and_tables_at_a_tiny_size(tmp_path):
    """bench/scale.py (issue 21) end to end at 2 and 5 items: the 2 are generated, the 5 cloned
    from them; every command runs as a fresh process; the cloned job is up to date (its no-op
    rerun says so, which the bench asserts) and the table has both sizes."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, "bench/scale.py", "--sizes", "2,5", "--generate", "2", "--template", "2", "--repeat", "1",
                             "--work", str(work), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "scale.json").read_text())["results"]
    assert data["2"]["generated"] == "now" and data["5"]["generated"] == "no: cloned from s2"
    assert data["2"]["stages"]["encode"]["units_done"] == 2 and data["2"]["stages"]["encode"]["embeddings_held_max"] == 1
    assert len(list((work / "w" / "s5" / "decode").glob("*.png"))) == 5
    markdown = (out / "scale.md").read_text()
    assert "| 2 items" in markdown and "| 5 items" in markdown and "no-op rerun, s (median)" in markdown


def test_lora_bench_smoke_writes_its_table(tmp_path):
    """bench/lora.py --smoke: the 6 runs (none, one, three LoRAs; resident and streamed) on the tiny
    model, stages in-process; every streamed image equals the resident one (~15 s)."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "bench/lora.py", "--smoke", "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    markdown = (out / "lora.md").read_text()
    rows = [cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| "))
            if cells[0] in ("resident", "streamed")]
    assert [(r[0], r[1]) for r in rows] == [(s, n) for s in ("resident", "streamed") for n in ("0", "1", "3")]
    assert all(r[-1] == "1/1" for r in rows), rows
    results = json.loads((out / "lora.json").read_text())
    assert [f["loras"] for f in results["forwards"]] == [0, 1, 3] and all(f["forward_cpu_seconds"] > 0 for f in results["forwards"])
    runs = results["runs"]
    assert [r["loras"] for r in runs] == [0, 1, 3, 0, 1, 3] and all(r["denoise_seconds_per_image"] > 0 for r in runs)
