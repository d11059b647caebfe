"""GPU benchmark: our staged pipeline under VRAM budgets vs the diffusers baselines, full-size model.

Reads:  nothing but the reference configs (the model is built here with random weights)
Writes: gpu_bench.md (tables), gpu_bench.json (every number), gpu_bench.log (all output) into
        --out, else $OUT (the device tool brings that folder back), else bench/results/; all three
        are rewritten after every run, so a bench killed half way still leaves the rows it finished
Runs:   1. bench/fullsize.py: PixArt-XL-2-1024-MS with random fp16 weights (~11 GB) in --work
        2. a queue of 4 prompts, 1024x1024, 20 steps, guidance 4.5, each run from scratch in its own
           folder, in this order (the most important first; the table keeps it):
             ours, no budget flag           `orchestrate run job.toml --device cuda` (default budget)
             diffusers, all resident        bench/pipeline_run.py: the reference for pixels and latents
             ours, no budget flag, --exact  denoise at batch 1, as the pipeline: the parity row
             ours --max-vram 8GiB / 2GiB / 1GiB
             diffusers, model CPU offload   enable_model_cpu_offload: what a user would pick instead
             diffusers, sequential CPU offload   enable_sequential_cpu_offload: likewise, the smallest
        3. the tables: per stage peak allocated/reserved and seconds (from each run's
           <stage>/summary.json and records), seconds per image, first-image latency, the GPU's
           peak memory used (NVML), and latents and pixels compared with the all-resident pipeline
           (max |difference|, PSNR). The summary table is printed last.

Example: bash bench/gpu.sh              # CUDA machine, within 9 minutes (one device call of 10)
         bash bench/gpu.sh --quick      # 2 prompts, 10 steps, the five most important rows: ~5 minutes
         bash bench/gpu.sh --smoke      # CPU, tiny model, 128x128, 2 steps: the same code, ~2 minutes

Every run is isolated: it has its own time limit (capped by what the whole bench has left), and a
run that fails, is killed or times out becomes a row that says so; a run that cannot start in time
is listed as skipped. SIGTERM/SIGINT to the bench kills the run in flight and still writes the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

PROMPTS = [
    "pirate ship trapped in a cosmic maelstrom nebula",
    "a small cactus with a happy face in the sahara desert",
    "an astronaut riding a green horse on the moon, highly detailed",
    "a watercolor painting of a lighthouse by the sea at sunset",
]
# device, image side, steps, prompts, binning (1024x1024 is a bin of its own), fullsize.py flags,
# time limit for everything (s), the least time worth starting a run with, the rows to run.
SETTINGS = {
    "gpu": {"device": "cuda", "size": 1024, "steps": 20, "prompts": 4, "binning": True, "build": [], "time_limit": 540, "min_run": 40,
            "sigma_size": 2048},
    "quick": {"device": "cuda", "size": 1024, "steps": 10, "prompts": 2, "binning": True, "build": [], "time_limit": 290, "min_run": 30,
              "rows": 5},
    "smoke": {"device": "cpu", "size": 128, "steps": 2, "prompts": 4, "binning": False, "build": ["--tiny-smoke", "--device", "cpu"],
              "time_limit": 900, "min_run": 5, "sigma_size": 128},
}
# Each run: name (the table's row), what runs, and its own time limit in seconds (the smoke run on
# a busy 2-core CPU needs as long). Sequential offload moves every submodule per forward: last, longest.
RUNS = [
    {"name": "ours, no budget flag", "kind": "ours", "budget": None, "limit": 150},
    {"name": "diffusers, all resident", "kind": "pipeline", "offload": None, "limit": 120},
    {"name": "ours, no budget flag, --exact", "kind": "ours", "budget": None, "exact": True, "limit": 150},
    {"name": "ours --max-vram 8GiB", "kind": "ours", "budget": "8GiB", "limit": 150},
    {"name": "ours --max-vram 2GiB", "kind": "ours", "budget": "2GiB", "limit": 200},
    {"name": "ours --max-vram 1GiB", "kind": "ours", "budget": "1GiB", "limit": 240},
    {"name": "diffusers, model CPU offload", "kind": "pipeline", "offload": "model", "limit": 150},
    {"name": "diffusers, sequential CPU offload", "kind": "pipeline", "offload": "sequential", "limit": 180, "cuda_only": True},
    # PixArt-Σ 2K at 2048x2048 (16,384 latent tokens), composed as users compose it: the Σ-2K
    # transformer and the SDXL-style VAE built here, T5 taken from the α model above.
    {"name": "Σ-2K: ours, no budget flag", "kind": "ours", "budget": None, "model": "sigma", "limit": 150},
    {"name": "Σ-2K: diffusers, all resident", "kind": "pipeline", "offload": None, "model": "sigma", "limit": 120},
    {"name": "Σ-2K: ours --max-vram 4GiB", "kind": "ours", "budget": "4GiB", "model": "sigma", "limit": 200},
]
REFERENCE = "diffusers, all resident"
REFERENCES = {"alpha": REFERENCE, "sigma": "Σ-2K: diffusers, all resident"}
NO_BUDGET_FLAGS = "skipped: this `orchestrate run` has no --max-vram (budget flags not landed yet)"


def run_specs(mode: str = "gpu") -> list[dict]:
    """The runs of this mode, in order of importance (executed and shown in this order)."""
    specs = [dict(spec) for spec in RUNS[: SETTINGS[mode].get("rows", len(RUNS))]]
    for spec in specs:
        spec.setdefault("model", "alpha")
        spec["slug"] = (spec["name"].replace("Σ-2K: ", "sigma2k-").replace("diffusers, ", "diffusers-").replace("ours --max-vram ", "ours-")
                        .replace("ours, no budget flag", "ours-default").replace(", --exact", "-exact").replace(" ", "-"))
    return specs


def job_items(settings: dict, model: str = "alpha") -> list[dict]:
    """The queue: 4 prompts at the α size; for Σ-2K one prompt at 2048x2048 (a bin of its own)."""
    if model == "sigma":
        side = settings["sigma_size"]
        return [{"prompt": PROMPTS[0], "negative_prompt": "", "seed": 42, "width": side, "height": side, "guidance_scale": 4.5,
                 "num_inference_steps": settings["steps"], "use_resolution_binning": settings["binning"]}]
    return [
        {"prompt": p, "negative_prompt": "", "seed": 42 + n, "width": settings["size"], "height": settings["size"], "guidance_scale": 4.5,
         "num_inference_steps": settings["steps"], "use_resolution_binning": settings["binning"]}
        for n, p in enumerate(PROMPTS[: settings["prompts"]])
    ]


def write_job(path: Path, model: Path, items: list[dict], name: str = "bench", text_encoder_from: Path | None = None) -> None:
    # Composed: T5 from the α model folder (the same T5-XXL).
    components = {"text_encoder": text_encoder_from, "tokenizer": text_encoder_from} if text_encoder_from is not None else None
    common.write_job(path, model, items, name, "bench/gpu_bench.py", components)


# ---------------------------------------------------------------------------------------------
# Running


class GpuMemorySampler:
    """Peak GPU memory used (every process, CUDA contexts included, which the PyTorch allocator's
    peaks leave out) while a run is in flight: NVML through nvidia-ml-py every 20 ms, else one-shot
    `nvidia-smi` queries every 200 ms (each a complete answer: a long-running `nvidia-smi -lms`
    loses its block-buffered output when stopped), else nothing."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.peak_mib = None
        self.source = None
        self._stop = threading.Event()
        self._thread = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.source = "NVML"
        except Exception:  # no nvidia-ml-py, no driver: fall back
            self.source = "nvidia-smi" if shutil.which("nvidia-smi") else None

    def sample_mib(self) -> int | None:
        """Memory used on the GPU now, MiB."""
        if self.source == "NVML":
            try:
                return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used // 2**20
            except Exception:
                return None
        if self.source == "nvidia-smi":
            query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            try:
                out = subprocess.run(query, capture_output=True, encoding="utf-8", errors="replace", timeout=10)
                return int(out.stdout.strip().splitlines()[0])
            except (subprocess.SubprocessError, OSError, ValueError, IndexError):
                return None
        return None

    def _note(self, value: int | None) -> None:
        if value is not None:
            self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)

    def _loop(self) -> None:
        interval = 0.02 if self.source == "NVML" else 0.2
        while not self._stop.wait(interval):
            self._note(self.sample_mib())

    def __enter__(self):
        if self.source:
            self._note(self.sample_mib())
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=15)


STOP = threading.Event()  # set by SIGTERM/SIGINT: no new runs; the runs in flight are killed
LIVE: set[int] = set()  # process groups of the runs in flight
LIVE_LOCK = threading.Lock()


def stop_everything(signum, frame) -> None:
    """Signal handler: kill the runs in flight (their whole process groups) and start no more; the
    bench then writes its tables with those rows marked interrupted."""
    STOP.set()
    with LIVE_LOCK:
        for group in list(LIVE):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_logged(command: list[str], log_path: Path, timeout: float) -> dict:
    """Run in its own process group; on timeout the group (ours) is killed. Wall seconds and exit
    code: the process's, or 'timeout', or 'interrupted' (the bench was stopped meanwhile)."""
    start_epoch, clock = time.time(), time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        with LIVE_LOCK:
            if STOP.is_set():
                return {"start_epoch": start_epoch, "wall": 0.0, "exit": "interrupted"}
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=common.subprocess_env(), cwd=common.ROOT,
                                       start_new_session=True)
            LIVE.add(process.pid)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = "timeout"
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            with LIVE_LOCK:
                LIVE.discard(process.pid)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the run left behind in its group
        except ProcessLookupError:
            pass
        if STOP.is_set() and code != 0:
            code = "interrupted"
        if code in ("timeout", "interrupted"):
            log.write(f"\n[bench] {code} after {time.perf_counter() - clock:.1f} s (limit {timeout:.0f} s): process group killed\n")
    return {"start_epoch": start_epoch, "wall": round(time.perf_counter() - clock, 2), "exit": code}


def last_error(log_path: Path) -> str:
    """The last `error:` line of a run's output, for the table's note."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if "error:" in line.lower() or "Error" in line or line.startswith("[bench]")]
    return lines[-1].strip()[:300] if lines else ""


def run_ours(spec: dict, job_file: Path, work: Path, device: str, timeout: float, job_name: str = "bench") -> dict:
    folder = common.fresh_folder(work / "runs" / spec["slug"])
    command = common.orchestrate_command() + ["run", str(job_file), "--workdir", str(folder), "--device", device]
    if spec["budget"]:
        command += ["--max-vram", spec["budget"]]
    if spec.get("exact"):
        command.append("--exact")
    with GpuMemorySampler() as sampler:
        result = run_logged(command, folder / "run.log", timeout)
    result["gpu_peak_mib"] = sampler.peak_mib
    result["log"] = str(folder / "run.log")
    job_dir = folder / job_name
    if result["exit"] != 0:
        result["error"] = last_error(folder / "run.log")
    if not (job_dir / "job.resolved.json").exists():
        return result
    spans = common.stage_spans(job_dir)
    result["stages"] = {}
    for stage in common.STAGES:
        info = common.read_stage(job_dir, stage)
        summary, records = info["summary"], info["records"]
        if not summary and not records:
            continue  # the run ended before this stage wrote anything
        result["stages"][stage] = {
            "strategy": describe_plan(info["plan"]),
            "plan_peak_bytes": info["plan"].get("peak_bytes"),
            "span": spans.get(stage),
            "load": summary.get("load_seconds"),
            "compute": round(sum(r.get("seconds", 0.0) for r in records), 3) if records else None,
            "units": summary.get("units_done"),
            "peak": summary.get("peak", {}),
            "item_seconds": [r.get("seconds") for r in records],
        }
    resolved = json.loads((job_dir / "job.resolved.json").read_text(encoding="utf-8"))
    result["budget_bytes"] = (resolved.get("runtime") or {}).get("budget_bytes")
    result["warnings"] = [line.strip() for line in (folder / "run.log").read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("warning:")]
    items = resolved["items"]
    # Per item, in order; None where the run did not get that far (a failed or killed run).
    result["images"] = [str(job_dir / i["image"]) if (job_dir / i["image"]).exists() else None for i in items]
    result["latents"] = [str(job_dir / "denoise" / f"{i['id']}.safetensors") if (job_dir / "denoise" / f"{i['id']}.safetensors").exists()
                         else None for i in items]
    result["first_image"] = common.first_file_seconds(job_dir / "decode", "*.png", result["start_epoch"])
    return result


def describe_plan(plan: dict) -> str:
    if not plan:
        return "default"
    name = plan.get("strategy", "?")
    if plan.get("tile_size"):
        name += f" {plan['tile_size']}px"
    if plan.get("batch_size", 1) != 1:
        name += f", batch {plan['batch_size']}"
    return name


def run_pipeline(spec: dict, model: Path, items_file: Path, n_items: int, work: Path, device: str, timeout: float,
                 extra: list[str] = ()) -> dict:
    folder = common.fresh_folder(work / "runs" / spec["slug"])
    command = [sys.executable, str(common.ROOT / "bench" / "pipeline_run.py"), "--model", str(model), "--items", str(items_file),
               "--images", str(folder / "images"), "--report", str(folder / "report.json"), "--device", device,
               "--latents", str(folder / "latents"), *extra]
    if spec["offload"]:
        command += ["--offload", spec["offload"]]
    with GpuMemorySampler() as sampler:
        result = run_logged(command, folder / "run.log", timeout)
    result["gpu_peak_mib"] = sampler.peak_mib
    result["log"] = str(folder / "run.log")
    if result["exit"] != 0:
        result["error"] = last_error(folder / "run.log")
    if (folder / "report.json").exists():
        result["report"] = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    result["images"] = [str(p) if p.exists() else None for p in (folder / "images" / f"{n:04d}.png" for n in range(n_items))]
    result["latents"] = [str(p) if p.exists() else None for p in (folder / "latents" / f"{n:04d}.safetensors" for n in range(n_items))]
    result["first_image"] = common.first_file_seconds(folder / "images", "*.png", result["start_epoch"])
    return result


def budget_flags_available() -> bool:
    """Whether this checkout's `orchestrate run` takes --max-vram (docs/memory.md)."""
    out = subprocess.run(common.orchestrate_command() + ["run", "--help"], capture_output=True, encoding="utf-8", errors="replace", env=common.subprocess_env(),
                         cwd=common.ROOT)
    return "--max-vram" in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Comparing with the reference


def compare_latents(ours: list, reference: list) -> float | None:
    """Largest |difference| over the items both runs finished (float32 arithmetic), else None."""
    from safetensors.torch import load_file

    worst = None
    for a, b in zip(ours, reference):
        if a and b:
            x, y = load_file(a)["latents"].float(), load_file(b)["latents"].float()
            diff = float("inf") if x.shape != y.shape else float((x - y).abs().max())
            worst = diff if worst is None else max(worst, diff)
    return worst


def compare_pixels(ours: list, reference: list) -> dict | None:
    """Over the items both runs finished: how many images are equal, the largest |difference| of
    a channel value (0-255), and the lowest PSNR (dB; inf when equal)."""
    import numpy as np

    compared = equal = worst = 0
    lowest = math.inf
    for a, b in zip(ours, reference):
        if not (a and b):
            continue
        x, y = common.load_rgb(a).astype(np.float64), common.load_rgb(b).astype(np.float64)
        compared += 1
        if x.shape != y.shape:
            worst, lowest = 255, 0.0
            continue
        mse = float(((x - y) ** 2).mean())
        equal += mse == 0
        worst = max(worst, int(np.abs(x - y).max()))
        lowest = min(lowest, math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    return {"compared": compared, "equal": equal, "max_abs_diff": worst, "min_psnr_db": lowest} if compared else None


# ---------------------------------------------------------------------------------------------
# Tables


def gib(n) -> str:
    return common.format_bytes(n) if n else "-"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def stage_rows(spec: dict, result: dict) -> list[list]:
    """Per stage (ours) or per component (baselines): strategy, seconds, peaks."""
    rows = []
    if spec["kind"] == "ours":
        for stage, s in (result.get("stages") or {}).items():
            peak = s["peak"]
            rows.append([spec["name"], stage, s["strategy"], fmt(s["span"]), fmt(s["load"]), fmt(s["compute"]),
                         gib(peak.get("device_max_allocated_bytes")), gib(peak.get("device_max_reserved_bytes")),
                         gib(peak.get("host_peak_rss_bytes")), gib(s["plan_peak_bytes"])])
    elif result.get("report"):
        r = result["report"]
        mode = f"{spec['offload']} offload" if spec["offload"] else "resident"
        for n, stage in enumerate(common.STAGES):
            c = r["components"][stage]
            rows.append([spec["name"], stage, mode, "-", fmt(r["load_seconds"] + r["import_diffusers_seconds"]) if n == 0 else "",
                         fmt(c["seconds"]), gib(c.get("device_max_allocated_bytes")), gib(c.get("device_max_reserved_bytes")),
                         gib(r.get("host_peak_rss_bytes")) if n == 0 else "", "-"])
    return rows


def status_note(result: dict) -> str:
    code = result.get("exit")
    if code == 0:
        return ""
    if code == "timeout":
        return f"TIMED OUT at {result.get('wall', 0):.0f} s (its limit): process group killed, rows below are what it finished"
    if code == "interrupted":
        return "INTERRUPTED (the bench was stopped): process group killed"
    return f"FAILED, exit {code}: {result.get('error', '')}"


def summary_row(spec: dict, result: dict, n_images: int, reference: dict | None) -> list:
    if "exit" not in result:  # skipped, or not run yet when the tables are flushed mid-bench
        return [spec["name"]] + ["-"] * (len(SUMMARY_HEADER) - 2) + [result.get("skipped") or "pending: not run yet"]
    images = [p for p in result.get("images") or [] if p]
    made = len(images)
    stages = result.get("stages") or {}
    if spec["kind"] == "ours":
        peaks = [s["peak"] for s in stages.values()]
        compute = sum(s["compute"] or 0 for s in stages.values())
    else:
        r = result.get("report") or {}
        peaks = list((r.get("components") or {}).values())
        compute = sum(r.get("call_seconds") or [])
    orchestrator = "-"
    if len(stages) == 3 and all(s["span"] is not None for s in stages.values()):
        orchestrator = fmt(result["wall"] - sum(s["span"] for s in stages.values()))
    alloc = max((p.get("device_max_allocated_bytes") or 0 for p in peaks), default=0)
    reserved = max((p.get("device_max_reserved_bytes") or 0 for p in peaks), default=0)
    latents = pixels = "-"
    if spec["name"] in REFERENCES.values():
        latents = pixels = "(reference)"
    elif reference:
        worst = compare_latents(result.get("latents") or [], reference.get("latents") or [])
        latents = "-" if worst is None else ("0 (equal)" if worst == 0 else f"{worst:.3g}")
        c = compare_pixels(result.get("images") or [], reference.get("images") or [])
        if c:
            pixels = f"{c['equal']}/{c['compared']} equal"
            if c["equal"] < c["compared"]:
                pixels += f", max diff {c['max_abs_diff']}, PSNR >= {c['min_psnr_db']:.1f} dB"
    notes = [status_note(result)] if result.get("exit") != 0 else []
    budget = result.get("budget_bytes")
    if budget and any(s["peak"].get("device_max_reserved_bytes") for s in stages.values()):  # CUDA; the runner warns too
        over = [k for k, s in stages.items() if (s["peak"].get("device_max_reserved_bytes") or 0) > budget]
        notes.append(f"budget {gib(budget)}: " + (f"OVER in {', '.join(over)}" if over else "reserved within"))
    notes += result.get("warnings") or []
    blank = sum(float(common.load_rgb(p).std()) < 1.0 for p in images)  # NaN latents decode to one flat colour
    if blank:
        notes.append(f"{blank} blank images (NaN?): comparisons mean nothing")
    smi = result.get("gpu_peak_mib")
    return [spec["name"], f"{made}/{n_images}", fmt(result.get("wall")), orchestrator, fmt(result["wall"] / made) if made else "-",
            fmt(compute / made) if made else "-", fmt(result.get("first_image")), gib(alloc), gib(reserved),
            f"{smi / 1024:.2f} GiB" if smi is not None else "-", latents, pixels, "; ".join(notes)]


SUMMARY_HEADER = ["run", "images", "wall s", "orchestrator s", "s/image (wall)", "compute s/image", "first image s", "peak alloc (max stage)",
                  "peak reserved", "GPU used peak", "latents max abs diff", "pixels vs resident pipeline", "notes"]
STAGE_HEADER = ["run", "stage", "strategy", "span s", "load s", "compute s", "peak alloc", "peak reserved", "host peak RSS", "plan estimate"]


def fail(out: Path, message: str, say) -> int:
    """Write the reason where the tables would be, and print it last."""
    (out / "gpu_bench.md").write_text(f"# GPU benchmark: not run\n\n{message}\n", encoding="utf-8")
    say(f"error: {message}")
    return 1


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_run_timeouts(pairs: list[str], specs: list[dict]) -> dict[str, float]:
    """--run-timeout SLUG=SECONDS (repeatable): another time limit for one run."""
    slugs = {s["slug"] for s in specs}
    limits = {}
    for pair in pairs:
        slug, _, seconds = pair.partition("=")
        if slug not in slugs or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"error: --run-timeout {pair!r}: write SLUG=SECONDS with SLUG one of {', '.join(sorted(slugs))}")
        limits[slug] = float(seconds)
    return limits


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Full-size PixArt-alpha on a GPU: our stages under budgets vs diffusers baselines.")
    mode_group = parser.add_mutually_exclusive_group()
    mode_group.add_argument("--smoke", action="store_true", help="CPU, tiny model, 128x128, 2 steps: check the script end to end")
    mode_group.add_argument("--quick", action="store_true", help="GPU, 2 prompts, 10 steps, the 5 most important rows: ~5 minutes with the build")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="model and run folders (default: /tmp/pixart-gpu-bench, smoke: a temp dir)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for everything, build included (default 540; quick 290; smoke 900)")
    parser.add_argument("--run-timeout", action="append", default=[], metavar="SLUG=SECONDS",
                        help="another time limit for one run (e.g. ours-1GiB=60); repeatable")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default 1; smoke 2, since timings do not matter there)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "gpu"
    settings = SETTINGS[mode]
    specs = run_specs(mode)
    run_limits = parse_run_timeouts(args.run_timeout, specs)
    started = time.perf_counter()
    limit = args.time_limit or settings["time_limit"]
    out = common.results_dir(args.out) if (args.out or os.environ.get("OUT") or not args.smoke) else Path(tempfile.mkdtemp(prefix="gpu-bench-out-"))
    work = args.work or (Path(tempfile.mkdtemp(prefix="gpu-bench-")) if args.smoke else Path("/tmp/pixart-gpu-bench"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_bench.log", "w", encoding="utf-8")
    log_lock = threading.Lock()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_everything)

    def say(message: str) -> None:
        print(message, flush=True)
        with log_lock:
            log.write(message + "\n")
            log.flush()

    info = common.machine()
    say(f"machine: {json.dumps(info)}")
    say(f"mode {mode}; work: {work}; results: {out}; time limit {limit:.0f} s")
    notes = []
    has_budgets = budget_flags_available()
    if not has_budgets:
        notes.append(NO_BUDGET_FLAGS + "; those rows are skipped.")
        say("NOTE: " + notes[-1])

    # 0. Fail fast: the libraries import, and on the GPU path torch sees the GPU.
    check = "import torch, diffusers, transformers, ftfy, bs4; print(torch.__version__, torch.cuda.is_available())"
    preflight = subprocess.run([sys.executable, "-c", check], capture_output=True, encoding="utf-8", errors="replace", env=common.subprocess_env())
    say(f"preflight: {preflight.stdout.strip()} {preflight.stderr.strip()[-500:]}")
    if preflight.returncode != 0 or (settings["device"] == "cuda" and not preflight.stdout.strip().endswith("True")):
        return fail(out, "preflight failed: the libraries do not import or torch sees no CUDA GPU (see above)", say)

    # 1. The model (kept in --work: fullsize.py reuses one it already built there).
    model = work / "model"
    say(f"[{time.perf_counter() - started:5.0f} s] building the model: bench/fullsize.py {' '.join(settings['build'])}")
    build = run_logged([sys.executable, str(common.ROOT / "bench" / "fullsize.py"), "--out", str(model)] + settings["build"],
                       work / "build.log", limit - 60)
    build_log = (work / "build.log").read_text(encoding="utf-8", errors="replace")
    build["reused"] = "already built" in build_log
    log.write(build_log)
    say(f"[{time.perf_counter() - started:5.0f} s] build: exit {build['exit']}, {build['wall']:.1f} s" + (" (reused)" if build["reused"] else ""))
    if build["exit"] != 0:
        return fail(out, f"the model could not be built (exit {build['exit']}): {last_error(work / 'build.log')}", say)
    model_report = json.loads((model / "BENCH_MODEL.json").read_text(encoding="utf-8"))

    # 2. The queue and the runs.
    items = job_items(settings)
    items_file = work / "items.json"
    items_file.write_text(json.dumps(items, indent=2), encoding="utf-8")
    job_file = work / "bench.toml"
    write_job(job_file, model, items)
    sigma_items = job_items(settings, "sigma")
    sigma = {"lock": threading.Lock(), "ready": None}  # built on first use: only if a Σ row gets to run

    def sigma_model() -> tuple[Path, Path, Path] | str:
        """(model folder, job file, items file) of the Σ-2K rows, built once; or why it could not be."""
        with sigma["lock"]:
            if sigma["ready"] is None:
                folder = work / "model-sigma2k"
                say(f"[{time.perf_counter() - started:5.0f} s] building the Σ-2K transformer and VAE: bench/fullsize.py --model sigma-2k")
                built = run_logged([sys.executable, str(common.ROOT / "bench" / "fullsize.py"), "--out", str(folder), "--model", "sigma-2k",
                                    "--parts", "transformer,vae"] + settings["build"], work / "build-sigma.log", max(limit - (time.perf_counter() - started) - 30, 5))
                if built["exit"] != 0:
                    sigma["ready"] = f"the Σ-2K model could not be built (exit {built['exit']}): {last_error(work / 'build-sigma.log')}"
                else:
                    job = work / "bench-sigma.toml"
                    write_job(job, folder, sigma_items, "bench-sigma", text_encoder_from=model)
                    items_path = work / "items-sigma.json"
                    items_path.write_text(json.dumps(sigma_items, indent=2), encoding="utf-8")
                    sigma["ready"] = (folder, job, items_path)
                    say(f"[{time.perf_counter() - started:5.0f} s] Σ-2K build: {built['wall']:.1f} s")
            return sigma["ready"]

    sampler = GpuMemorySampler()
    idle_mib = sampler.sample_mib()
    results: dict[str, dict] = {}
    tables_lock = threading.Lock()

    def write_tables(final: bool) -> str:
        """gpu_bench.md and .json from the results so far (pending rows say so); atomic, so a
        bench killed while writing still leaves the previous complete tables."""
        with tables_lock:
            slugs = {s["name"]: s["slug"] for s in specs}

            def reference(spec):
                return results.get(slugs.get(REFERENCES[spec["model"]], ""))

            stage_table = common.markdown_table(STAGE_HEADER, [row for s in specs for row in stage_rows(s, results.get(s["slug"], {}))])
            summary_table = common.markdown_table(SUMMARY_HEADER, [
                summary_row(s, results.get(s["slug"], {}), len(sigma_items if s["model"] == "sigma" else items), reference(s)) for s in specs])
            gpu = info.get("gpu") or "no GPU (CPU run)"
            title = {"smoke": "smoke test (CPU, tiny model)", "quick": "full size on a GPU, quick", "gpu": "full size on a GPU"}[mode]
            header = [
                f"# PixArt {title}: our stages under budgets vs diffusers",
                "",
                f"- machine: {gpu}; {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; torch {info.get('torch')}, "
                f"diffusers {info.get('diffusers')}, transformers {info.get('transformers')}, Python {info['python']}",
                f"- model: PixArt-XL-2-1024-MS architecture ({model_report['preset']} preset), random {model_report['dtype']} weights "
                f"({model_report['bytes'] / 1e9:.2f} GB), built by bench/fullsize.py in {build['wall']:.0f} s (drawn on {model_report['device']})"
                + (" (reused from an earlier call)" if build.get("reused") else ""),
                f"- job: {len(items)} prompts, {settings['size']}x{settings['size']}, {settings['steps']} steps, guidance 4.5 (CFG), "
                f"DPM-Solver++, {'float16' if settings['device'] == 'cuda' else 'float32'} on {settings['device']}; every run from scratch in its own folder",
                f"- Σ-2K rows: PixArt-Σ 2K composed (transformer PixArt-Sigma-XL-2-2K-MS and an SDXL-style VAE built by bench/fullsize.py "
                f"--model sigma-2k, T5 from the α model), 1 prompt at {settings.get('sigma_size')}x{settings.get('sigma_size')}, "
                f"{settings['steps']} steps, compared with PixArtSigmaPipeline on the same components" if any(sp["model"] == "sigma" for sp in specs) else None,
                f"- GPU memory used before the runs: {idle_mib} MiB ({sampler.source})" if idle_mib is not None else "- GPU memory sampling: not available",
                "- peaks: PyTorch allocator maxima per stage process (ours, from summary.json) or per component window "
                "(baselines, see bench/pipeline_run.py); CUDA contexts (~0.5 GiB per process) only in 'GPU used peak' "
                f"({sampler.source or 'not sampled'}: the whole GPU, every process, sampled while the run is in flight)",
                "- latents / pixels: each finished item against the same item of 'diffusers, all resident' (Σ-2K rows: of "
                "'Σ-2K: diffusers, all resident'; latents: the final "
                "latents before the VAE, max |difference|; pixels: equal images, max channel difference 0-255, lowest PSNR)",
                "- span = a stage process's wall time (start, imports, load, compute, records); orchestrator = wall minus the spans "
                "(CLI start, free-memory query, memory plan, staleness checks); first image = from the command's start to the first PNG on disk",
            ] + [f"- note: {n}" for n in notes] + [
                f"- total bench time: {time.perf_counter() - started:.0f} s of {limit:.0f} s"
                + ("" if final else " (IN PROGRESS: rows marked pending have not run yet)")
                + ("; stopped by a signal" if STOP.is_set() else "")]
            text = "\n".join([h for h in header if h is not None] + ["", "## Per stage", "", stage_table, "", "## Summary", "", summary_table, ""])
            write_atomic(out / "gpu_bench.md", text)
            write_atomic(out / "gpu_bench.json", json.dumps({
                "machine": info, "mode": mode, "settings": settings, "items": items, "model": model_report, "build": build,
                "sigma_items": sigma_items, "notes": notes, "idle_gpu_used_mib": idle_mib, "memory_sampler": sampler.source, "final": final,
                "runs": {s["name"]: results.get(s["slug"], {"pending": True}) for s in specs}}, indent=2, default=str) + "\n")
            return text

    def execute(spec: dict) -> None:
        left = limit - (time.perf_counter() - started) - 15  # keep 15 s for the tables
        own = run_limits.get(spec["slug"], spec["limit"])
        try:
            if STOP.is_set():
                results[spec["slug"]] = {"skipped": "skipped: the bench was stopped by a signal"}
            elif spec.get("cuda_only") and settings["device"] == "cpu":
                results[spec["slug"]] = {"skipped": "skipped on the CPU: sequential offload only moves weights to an accelerator "
                                                    "(here accelerate's post_forward also fails with torch 2.13: TypeError in new())"}
            elif spec["kind"] == "ours" and spec["budget"] and not has_budgets:
                results[spec["slug"]] = {"skipped": NO_BUDGET_FLAGS}
            elif left < min(settings["min_run"], own):
                results[spec["slug"]] = {"skipped": f"skipped: the bench's time limit ({limit:.0f} s) was reached"}
                say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: skipped, time limit")
            else:
                built = sigma_model() if spec["model"] == "sigma" else (model, job_file, items_file)
                if isinstance(built, str):
                    raise RuntimeError(built)
                left = limit - (time.perf_counter() - started) - 15  # the Σ build may have taken some
                timeout = min(own, left)
                say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: starting (timeout {timeout:.0f} s)")
                run_model, run_job_file, run_items = built
                if spec["kind"] == "ours":
                    result = run_ours(spec, run_job_file, work, settings["device"], timeout, "bench-sigma" if spec["model"] == "sigma" else "bench")
                else:
                    extra = ["--pipeline", "PixArtSigmaPipeline", "--text-encoder-from", str(model)] if spec["model"] == "sigma" else []
                    result = run_pipeline(spec, run_model, run_items, len(sigma_items if spec["model"] == "sigma" else items), work,
                                          settings["device"], timeout, extra)
                results[spec["slug"]] = result
                say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: exit {result['exit']}, {result['wall']:.1f} s"
                    + (f" ({result['error']})" if result.get("error") else ""))
                with log_lock:
                    log.write(f"\n===== {spec['name']} =====\n" + Path(result["log"]).read_text(encoding="utf-8", errors="replace"))
                    log.flush()
        except Exception as error:  # a bug in the bench itself: this row says so, the others go on
            results[spec["slug"]] = dict(results.get(spec["slug"]) or {}, exit="bench error", wall=0.0,
                                         error=f"{type(error).__name__}: {error}")
            say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: bench error {type(error).__name__}: {error}")
        try:
            write_tables(final=False)
        except Exception as error:
            say(f"warning: could not flush the tables after {spec['name']}: {type(error).__name__}: {error}")

    jobs = args.jobs or (2 if args.smoke else 1)
    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(execute, specs))
    else:
        for spec in specs:
            execute(spec)

    # 3. Tables.
    text = write_tables(final=True)
    log.write("\n" + text)
    log.close()
    if args.smoke and args.work is None:
        common.remove(work)  # a temp dir of ~7 MB per smoke run
    print("\n" + text)  # the table is the last thing printed
    failed = [s["name"] for s in specs if isinstance(results.get(s["slug"], {}).get("exit"), int) and results[s["slug"]]["exit"] != 0]
    return 1 if (failed and args.smoke) or STOP.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
