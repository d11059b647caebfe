"""GPU benchmark: our staged pipeline under VRAM budgets vs the diffusers baselines, full-size model.

Reads:  nothing but the reference configs (the model is built here with random weights)
Writes: gpu_bench.md (tables), gpu_bench.json (every number), gpu_bench.log (all output) into
        --out, else $OUT (the device tool brings that folder back), else bench/results/
Runs:   1. bench/fullsize.py: PixArt-XL-2-1024-MS with random fp16 weights (~11 GB) in --work
        2. a queue of 4 prompts, 1024x1024, 20 steps, guidance 4.5, each of these from scratch:
           `orchestrate run job.toml --device cuda --max-vram 1GiB` (and 2GiB, 6GiB, no flag)
           bench/pipeline_run.py: one PixArtAlphaPipeline, all models resident on the GPU
           bench/pipeline_run.py --offload: the same with enable_model_cpu_offload
        3. the tables: per stage peak allocated/reserved and seconds (from each run's
           <stage>/summary.json and records), seconds per image, first-image latency, pixels
           compared with the all-resident pipeline. The summary table is printed last.

Example: bash bench/gpu.sh            # CUDA machine, fits in 10 minutes on an H100
         bash bench/gpu.sh --smoke    # CPU, tiny model, 128x128, 2 steps: the same code, ~1-2 minutes

Runs are executed in order of importance (unlimited, the two baselines, then 6, 2, 1 GiB) under a
time limit: a run that cannot start in time is listed as skipped rather than cutting the table off.
"""

from __future__ import annotations

import argparse
import json
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
SETTINGS = {
    # device, image side, steps, binning (1024x1024 is a bin of its own), fullsize.py flags, time limit (s)
    "gpu": {"device": "cuda", "size": 1024, "steps": 20, "binning": True, "build": [], "time_limit": 540, "min_run": 40},
    "smoke": {"device": "cpu", "size": 128, "steps": 2, "binning": False, "build": ["--tiny-smoke", "--device", "cpu"], "time_limit": 300, "min_run": 5},
}
BUDGETS = ["1GiB", "2GiB", "6GiB", None]  # None: no flag (the default budget: free memory less a margin)
NO_BUDGET_FLAGS = "skipped: this `orchestrate run` has no --max-vram (budget flags not landed yet)"


def run_specs() -> list[dict]:
    """All runs, in the order the table shows them; `priority` is the order they are executed in."""
    specs = [{"name": f"ours --max-vram {b}" if b else "ours, no budget flag", "kind": "ours", "budget": b,
              "priority": {None: 0, "6GiB": 3, "2GiB": 4, "1GiB": 5}[b]} for b in BUDGETS]
    specs.append({"name": "diffusers, all resident", "kind": "pipeline", "offload": False, "priority": 1})
    specs.append({"name": "diffusers, model CPU offload", "kind": "pipeline", "offload": True, "priority": 2})
    for spec in specs:
        spec["slug"] = spec["name"].replace("diffusers, ", "diffusers-").replace("ours --max-vram ", "ours-").replace("ours, no budget flag", "ours-default").replace(" ", "-")
    return specs


def job_items(settings: dict) -> list[dict]:
    return [
        {"prompt": p, "negative_prompt": "", "seed": 42 + n, "width": settings["size"], "height": settings["size"], "guidance_scale": 4.5,
         "num_inference_steps": settings["steps"], "use_resolution_binning": settings["binning"]}
        for n, p in enumerate(PROMPTS)
    ]


def write_job(path: Path, model: Path, items: list[dict]) -> None:
    common.write_job(path, model, items, "bench", "bench/gpu_bench.py")


# ---------------------------------------------------------------------------------------------
# Running


class GpuMemorySampler:
    """Peak of `nvidia-smi`'s memory.used while a run is in flight (CUDA contexts included, which
    the PyTorch allocator's peaks leave out). Does nothing where nvidia-smi is missing."""

    def __init__(self) -> None:
        self.peak_mib = None
        self._process = None
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                value = int(line.strip().splitlines()[0])
            except (ValueError, IndexError):
                continue
            self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._thread.join(timeout=5)


def idle_gpu_used_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    try:
        return int(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def run_logged(command: list[str], log_path: Path, timeout: float) -> dict:
    """Run in its own process group; on timeout the group (ours) is killed. Wall seconds, exit code."""
    start_epoch, clock = time.time(), time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=common.subprocess_env(), cwd=common.ROOT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    return {"start_epoch": start_epoch, "wall": round(time.perf_counter() - clock, 2), "exit": code}


def last_error(log_path: Path) -> str:
    """The last `error:` line of a run's output, for the table's note."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "error:" in line.lower() or "Error" in line]
    return lines[-1].strip()[:300] if lines else ""


def run_ours(spec: dict, job_file: Path, work: Path, device: str, timeout: float) -> dict:
    folder = work / "runs" / spec["slug"]
    common.remove(folder)
    folder.mkdir(parents=True)
    command = common.orchestrate_command() + ["run", str(job_file), "--workdir", str(folder), "--device", device]
    if spec["budget"]:
        command += ["--max-vram", spec["budget"]]
    with GpuMemorySampler() as sampler:
        result = run_logged(command, folder / "run.log", timeout)
    result["nvidia_smi_peak_mib"] = sampler.peak_mib
    result["log"] = str(folder / "run.log")
    job_dir = folder / "bench"
    if result["exit"] != 0:
        result["error"] = last_error(folder / "run.log")
    if not (job_dir / "job.resolved.json").exists():
        return result
    spans = common.stage_spans(job_dir)
    result["stages"] = {}
    for stage in common.STAGES:
        info = common.read_stage(job_dir, stage)
        summary, records = info["summary"], info["records"]
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
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    result["budget_bytes"] = (resolved.get("runtime") or {}).get("budget_bytes")
    result["warnings"] = [line.strip() for line in (folder / "run.log").read_text(errors="replace").splitlines() if line.startswith("warning:")]
    items = resolved["items"]
    result["images"] = [str(job_dir / i["image"]) for i in items]
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


def run_pipeline(spec: dict, model: Path, items_file: Path, work: Path, device: str, timeout: float) -> dict:
    folder = work / "runs" / spec["slug"]
    common.remove(folder)
    folder.mkdir(parents=True)
    command = [sys.executable, str(common.ROOT / "bench" / "pipeline_run.py"), "--model", str(model), "--items", str(items_file),
               "--images", str(folder / "images"), "--report", str(folder / "report.json"), "--device", device]
    if spec["offload"]:
        command.append("--offload")
    with GpuMemorySampler() as sampler:
        result = run_logged(command, folder / "run.log", timeout)
    result["nvidia_smi_peak_mib"] = sampler.peak_mib
    result["log"] = str(folder / "run.log")
    if result["exit"] != 0:
        result["error"] = last_error(folder / "run.log")
    if (folder / "report.json").exists():
        result["report"] = json.loads((folder / "report.json").read_text())
    result["images"] = [str(p) for p in sorted((folder / "images").glob("*.png"))]
    result["first_image"] = common.first_file_seconds(folder / "images", "*.png", result["start_epoch"])
    return result


def budget_flags_available() -> bool:
    """Whether this checkout's `orchestrate run` takes --max-vram (docs/memory.md)."""
    out = subprocess.run(common.orchestrate_command() + ["run", "--help"], capture_output=True, text=True, env=common.subprocess_env(),
                         cwd=common.ROOT)
    return "--max-vram" in out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Tables


def gib(n) -> str:
    return common.format_bytes(n) if n else "-"


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
        mode = "offload" if spec["offload"] else "resident"
        for n, stage in enumerate(common.STAGES):
            c = r["components"][stage]
            rows.append([spec["name"], stage, mode, "-", fmt(r["load_seconds"] + r["import_diffusers_seconds"]) if n == 0 else "",
                         fmt(c["seconds"]), gib(c.get("device_max_allocated_bytes")), gib(c.get("device_max_reserved_bytes")),
                         gib(r.get("host_peak_rss_bytes")) if n == 0 else "", "-"])
    return rows


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def summary_row(spec: dict, result: dict, n_images: int, reference: list[str] | None) -> list:
    if result.get("skipped"):
        return [spec["name"]] + ["-"] * (len(SUMMARY_HEADER) - 2) + [result["skipped"]]
    images = result.get("images") or []
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
    if stages and all(s["span"] is not None for s in stages.values()):
        orchestrator = fmt(result["wall"] - sum(s["span"] for s in stages.values()))
    alloc = max((p.get("device_max_allocated_bytes") or 0 for p in peaks), default=0)
    reserved = max((p.get("device_max_reserved_bytes") or 0 for p in peaks), default=0)
    pixels = "-"
    if reference and images and reference != images:
        c = common.compare_images(images, reference)
        pixels = f"{c['equal']}/{c['compared']} equal" + (f", max diff {c['max_abs_diff']}" if c["equal"] < c["compared"] else "")
    elif reference == images and images:
        pixels = "(reference)"
    notes = [] if result.get("exit") == 0 else [f"exit {result.get('exit')}: {result.get('error', '')}"]
    budget = result.get("budget_bytes")
    if budget and any(s["peak"].get("device_max_reserved_bytes") for s in stages.values()):  # CUDA; the runner warns too
        over = [k for k, s in stages.items() if (s["peak"].get("device_max_reserved_bytes") or 0) > budget]
        notes.append(f"budget {gib(budget)}: " + (f"OVER in {', '.join(over)}" if over else "reserved within"))
    notes += result.get("warnings") or []
    blank = sum(float(common.load_rgb(p).std()) < 1.0 for p in images)  # NaN latents decode to one flat colour
    if blank:
        notes.append(f"{blank} blank images (NaN?): pixel comparisons mean nothing")
    note = "; ".join(notes)
    smi = result.get("nvidia_smi_peak_mib")
    return [spec["name"], f"{made}/{n_images}", fmt(result.get("wall")), orchestrator, fmt(result["wall"] / made) if made else "-",
            fmt(compute / made) if made else "-", fmt(result.get("first_image")), gib(alloc), gib(reserved),
            f"{smi / 1024:.2f} GiB" if smi is not None else "-", pixels + (f"; {note}" if note else "")]


SUMMARY_HEADER = ["run", "images", "wall s", "orchestrator s", "s/image (wall)", "compute s/image", "first image s", "peak alloc (max stage)",
                  "peak reserved", "nvidia-smi peak", "pixels vs resident pipeline / notes"]
STAGE_HEADER = ["run", "stage", "strategy", "span s", "load s", "compute s", "peak alloc", "peak reserved", "host peak RSS", "plan estimate"]


def fail(out: Path, message: str, say) -> int:
    """Write the reason where the tables would be, and print it last."""
    (out / "gpu_bench.md").write_text(f"# GPU benchmark: not run\n\n{message}\n")
    say(f"error: {message}")
    return 1


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Full-size PixArt-alpha on a GPU: our stages under budgets vs diffusers baselines.")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 128x128, 2 steps: check the script end to end")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="model and run folders (default: /tmp/pixart-gpu-bench, smoke: a temp dir)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for everything, build included (default 540; smoke 300)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default 1; smoke 2, since timings do not matter there)")
    args = parser.parse_args(argv)
    settings = SETTINGS["smoke" if args.smoke else "gpu"]
    started = time.perf_counter()
    limit = args.time_limit or settings["time_limit"]
    out = common.results_dir(args.out) if (args.out or os.environ.get("OUT") or not args.smoke) else Path(tempfile.mkdtemp(prefix="gpu-bench-out-"))
    work = args.work or (Path(tempfile.mkdtemp(prefix="gpu-bench-")) if args.smoke else Path("/tmp/pixart-gpu-bench"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_bench.log", "w")

    def say(message: str) -> None:
        print(message, flush=True)
        log.write(message + "\n")
        log.flush()

    info = common.machine()
    say(f"machine: {json.dumps(info)}")
    say(f"work: {work}; results: {out}; time limit {limit:.0f} s")
    notes = []
    has_budgets = budget_flags_available()
    if not has_budgets:
        notes.append(NO_BUDGET_FLAGS + "; those rows are skipped.")
        say("NOTE: " + notes[-1])

    # 0. Fail fast: the libraries import, and on the GPU path torch sees the GPU.
    check = "import torch, diffusers, transformers, ftfy, bs4; print(torch.__version__, torch.cuda.is_available())"
    preflight = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=common.subprocess_env())
    say(f"preflight: {preflight.stdout.strip()} {preflight.stderr.strip()[-500:]}")
    if preflight.returncode != 0 or (settings["device"] == "cuda" and not preflight.stdout.strip().endswith("True")):
        return fail(out, "preflight failed: the libraries do not import or torch sees no CUDA GPU (see above)", say)

    # 1. The model.
    model = work / "model"
    say(f"[{time.perf_counter() - started:5.0f} s] building the model: bench/fullsize.py {' '.join(settings['build'])}")
    build = run_logged([sys.executable, str(common.ROOT / "bench" / "fullsize.py"), "--out", str(model)] + settings["build"],
                       work / "build.log", limit - 60)
    log.write((work / "build.log").read_text(errors="replace"))
    say(f"[{time.perf_counter() - started:5.0f} s] build: exit {build['exit']}, {build['wall']:.1f} s")
    if build["exit"] != 0:
        return fail(out, f"the model could not be built (exit {build['exit']}): {last_error(work / 'build.log')}", say)
    model_report = json.loads((model / "BENCH_MODEL.json").read_text())

    # 2. The queue and the runs.
    items = job_items(settings)
    items_file = work / "items.json"
    items_file.write_text(json.dumps(items, indent=2))
    job_file = work / "bench.toml"
    write_job(job_file, model, items)
    idle_mib = idle_gpu_used_mib()
    specs = run_specs()
    results: dict[str, dict] = {}

    def execute(spec: dict) -> None:
        left = limit - (time.perf_counter() - started) - 15  # keep 15 s for the tables
        if spec["kind"] == "ours" and spec["budget"] and not has_budgets:
            results[spec["slug"]] = {"skipped": NO_BUDGET_FLAGS}
            return
        if left < settings["min_run"]:
            results[spec["slug"]] = {"skipped": f"skipped: time limit ({limit:.0f} s) reached"}
            say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: skipped, time limit")
            return
        say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: starting (timeout {left:.0f} s)")
        if spec["kind"] == "ours":
            result = run_ours(spec, job_file, work, settings["device"], left)
        else:
            result = run_pipeline(spec, model, items_file, work, settings["device"], left)
        results[spec["slug"]] = result
        say(f"[{time.perf_counter() - started:5.0f} s] {spec['name']}: exit {result['exit']}, {result['wall']:.1f} s"
            + (f" ({result['error']})" if result.get("error") else ""))

    ordered = sorted(specs, key=lambda s: s["priority"])
    jobs = args.jobs or (2 if args.smoke else 1)
    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(execute, ordered))
    else:
        for spec in ordered:
            execute(spec)
    for spec in ordered:  # every run's own output, in execution order
        result = results[spec["slug"]]
        if result.get("log"):
            log.write(f"\n===== {spec['name']} =====\n" + Path(result["log"]).read_text(errors="replace"))

    # 3. Tables.
    reference = results.get("diffusers-all-resident", {}).get("images")
    stage_table = common.markdown_table(STAGE_HEADER, [row for s in specs for row in stage_rows(s, results[s["slug"]])])
    summary_table = common.markdown_table(SUMMARY_HEADER, [summary_row(s, results[s["slug"]], len(items), reference) for s in specs])
    gpu = info.get("gpu") or "no GPU (CPU run)"
    header = [
        f"# PixArt-alpha {'smoke test (CPU, tiny model)' if args.smoke else 'full size on a GPU'}: our stages under budgets vs diffusers",
        "",
        f"- machine: {gpu}; {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; torch {info.get('torch')}, "
        f"diffusers {info.get('diffusers')}, transformers {info.get('transformers')}, Python {info['python']}",
        f"- model: PixArt-XL-2-1024-MS architecture ({model_report['preset']} preset), random {model_report['dtype']} weights "
        f"({model_report['bytes'] / 1e9:.2f} GB), built by bench/fullsize.py in {build['wall']:.0f} s (drawn on {model_report['device']})",
        f"- job: {len(items)} prompts, {settings['size']}x{settings['size']}, {settings['steps']} steps, guidance 4.5 (CFG), "
        f"DPM-Solver++, {'float16' if settings['device'] == 'cuda' else 'float32'} on {settings['device']}; every run from scratch in its own folder",
        f"- idle GPU memory used before the runs (nvidia-smi): {idle_mib} MiB" if idle_mib is not None else "- nvidia-smi: not available",
        "- peaks: PyTorch allocator maxima per stage process (ours, from summary.json) or per component window "
        "(baselines, see bench/pipeline_run.py); CUDA contexts (~0.5 GiB per process) only in the nvidia-smi column",
        "- span = a stage process's wall time (start, imports, load, compute, records); orchestrator = wall minus the spans "
        "(CLI start, free-memory query, memory plan, staleness checks); first image = from the command's start to the first PNG on disk",
    ] + [f"- note: {n}" for n in notes] + [f"- total bench time: {time.perf_counter() - started:.0f} s of {limit:.0f} s"]
    text = "\n".join(header + ["", "## Per stage", "", stage_table, "", "## Summary", "", summary_table, ""])
    (out / "gpu_bench.md").write_text(text)
    (out / "gpu_bench.json").write_text(json.dumps({"machine": info, "settings": settings, "items": items, "model": model_report,
                                                    "build": build, "notes": notes, "idle_gpu_used_mib": idle_mib,
                                                    "runs": {s["name"]: results[s["slug"]] for s in specs}}, indent=2, default=str) + "\n")
    log.write("\n" + text)
    log.close()
    if args.smoke and args.work is None:
        common.remove(work)  # a temp dir of ~7 MB per smoke run
    print("\n" + text)  # the table is the last thing printed
    failed = [s["name"] for s in specs if results[s["slug"]].get("exit") not in (0, None)]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
