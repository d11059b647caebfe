"""Overhead of the staged design (issue 2): the same 8 images made by `orchestrate run` (three stage
processes handing off through files, the product path) and by one in-process PixArtAlphaPipeline.

Reads:  nothing but the reference configs; builds its own random-weight model (bench/fullsize.py)
Writes: bench/results/overhead.md and overhead.json (or --out), work files under --work

Example: python bench/overhead.py --repeat 3    # ~5 min on a 2-core CPU

Both sides start as fresh processes, so both pay interpreter start, imports and model loading. The
ratio is staged wall / pipeline wall (target <= 1.2), taken from the fastest of the alternated
repetitions of each side: on a shared machine other work only ever adds time, so the fastest run
is the least disturbed one (medians and CPU seconds of the process trees are shown beside it).
Torch runs 1 thread per process by default (--threads): with 2 OpenMP threads on 2 shared cores,
every parallel op waits at a barrier for a descheduled thread and wall times swing by 2x.
The breakdown splits each side's wall time into the orchestrator, process start + imports, model
load and compute, from the stages' own records and summaries (our side) and the baseline's report
(bench/pipeline_run.py); nothing is estimated. The images are compared with np.array_equal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import fullsize

# A PixArt-alpha of moderate width, so that compute, not process start-up, is most of a run on a
# CPU: the real architectures (gated-GELU T5 with the real 32128 vocabulary, ada-norm-single DiT with
# micro-conditions, 4-block VAE with factor 8), narrowed. Head sizes are the real ones (64, 72).
MEDIUM = {
    "text_encoder": {"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8},
    "transformer": {"num_layers": 6, "attention_head_dim": 72, "num_attention_heads": 4},
    "vae": {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 2},
}
PROMPTS = [
    "pirate ship trapped in a cosmic maelstrom nebula",
    "a small cactus with a happy face in the sahara desert",
    "an astronaut riding a green horse on the moon",
    "a cute cat riding a horse at sunset",
    "a watercolor painting of a lighthouse by the sea",
    "portrait of an old fisherman, oil painting, dramatic light",
    "city skyline at night with neon lights and rain",
    "an owl reading a book in a cozy library",
]


def ensure_model(work: Path) -> Path:
    """The MEDIUM random model in <work>/model, built once (again when MEDIUM changed)."""
    model = Path(work) / "model"
    built = model / "BENCH_MODEL.json"
    if not built.exists() or json.loads(built.read_text(encoding="utf-8")).get("overrides") != MEDIUM:
        print(f"building the moderate-width random model in {model}")
        fullsize.build_model(model, "full", "float32", "cpu", 0, MEDIUM)
    return model


def job_items(size: int, steps: int) -> list[dict]:
    """The 8 generations, one per distinct prompt (so no side gains from shared embeddings)."""
    return [
        {"prompt": p, "negative_prompt": "", "seed": 1000 + n, "width": size, "height": size, "guidance_scale": 4.5,
         "num_inference_steps": steps, "use_resolution_binning": False}
        for n, p in enumerate(PROMPTS)
    ]


def write_job(path: Path, model: Path, items: list[dict]) -> None:
    common.write_job(path, model, items, "overhead", "bench/overhead.py")


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(command: list[str], log_path: Path, threads: int) -> dict:
    """Run to completion; wall and CPU seconds of the whole process tree, output to a log file."""
    cpu = cpu_seconds_of_children()
    start_epoch, clock = time.time(), time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=common.subprocess_env(threads), cwd=common.ROOT).returncode
    wall = time.perf_counter() - clock
    if code != 0:
        raise RuntimeError(f"{command[:3]} exited {code}; see {log_path}")
    return {"start_epoch": start_epoch, "wall": round(wall, 2), "cpu": round(cpu_seconds_of_children() - cpu, 2)}


def run_staged(job_file: Path, workdir: Path, threads: int) -> dict:
    """`orchestrate run` from scratch, and the per-stage breakdown from its published records."""
    common.remove(workdir)
    workdir.mkdir(parents=True)
    result = timed_run(common.orchestrate_command() + ["run", str(job_file), "--workdir", str(workdir), "--device", "cpu"], workdir / "orchestrate.log", threads)
    job_dir = workdir / "overhead"
    spans = common.stage_spans(job_dir)
    stages = {}
    for stage in common.STAGES:
        info = common.read_stage(job_dir, stage)
        summary = info["summary"]
        stages[stage] = {
            "span": spans.get(stage),
            "inside": summary.get("seconds"),  # stage_main's clock: from after start-up to the summary
            "load": summary.get("load_seconds"),
            "compute": round(sum(r.get("seconds", 0.0) for r in info["records"]), 3),
            "units": summary.get("units_done"),
            "host_peak_rss_bytes": summary.get("peak", {}).get("host_peak_rss_bytes"),
        }
    items = json.loads((job_dir / "job.resolved.json").read_text(encoding="utf-8"))["items"]
    result.update(stages=stages, images=[str(job_dir / i["image"]) for i in items],
                  first_image=common.first_file_seconds(job_dir / "decode", "*.png", result["start_epoch"]))
    return result


def run_pipeline(model: Path, items_file: Path, folder: Path, threads: int) -> dict:
    """bench/pipeline_run.py in a fresh process: one PixArtAlphaPipeline, all 8 images."""
    common.remove(folder)
    folder.mkdir(parents=True)
    report = folder / "report.json"
    command = [sys.executable, str(common.ROOT / "bench" / "pipeline_run.py"), "--model", str(model), "--items", str(items_file),
               "--images", str(folder / "images"), "--report", str(report), "--device", "cpu"]
    result = timed_run(command, folder / "pipeline.log", threads)
    result["report"] = json.loads(report.read_text(encoding="utf-8"))
    result["images"] = [str(p) for p in sorted((folder / "images").glob("*.png"))]
    result["first_image"] = common.first_file_seconds(folder / "images", "*.png", result["start_epoch"])
    return result


def breakdown(staged: dict, pipeline: dict) -> list[list]:
    """Rows: part, staged seconds, pipeline seconds, difference (one repetition). Each side's
    parts add up to its wall time; every number is measured in the run itself."""
    s, r = staged["stages"], pipeline["report"]
    calls, saves = sum(r["call_seconds"]), sum(r["save_seconds"])
    comps = r["components"]
    # Ours: what a stage process spends outside its load clock and its items is interpreter start,
    # imports, input checks (sha256 of inputs), the summary and exit. The baseline's parts are
    # timed the same way by bench/pipeline_run.py.
    parts = [
        ("orchestrator process: CLI start, resolve, plan + hash, table", staged["wall"] - sum(s[k]["span"] for k in common.STAGES), 0.0),
        ("process start + imports + input checks + exit", sum(s[k]["span"] - s[k]["load"] - s[k]["compute"] for k in common.STAGES),
         pipeline["wall"] - calls - saves - r["load_seconds"]),
        ("model load (from_pretrained, to device)", sum(s[k]["load"] for k in common.STAGES), r["load_seconds"]),
        ("compute: encode_prompt (ours: + writing the embeddings)", s["encode"]["compute"], comps["encode"]["seconds"]),
        ("compute: denoise (pipeline: rest of each call)", s["denoise"]["compute"], calls - comps["encode"]["seconds"] - comps["decode"]["seconds"]),
        ("compute: decode + PNG (ours: + record)", s["decode"]["compute"], comps["decode"]["seconds"] + saves),
    ]
    rows = [[name, f"{ours:.1f}", f"{theirs:.1f}", f"{ours - theirs:+.1f}"] for name, ours, theirs in parts]
    rows.append(["total (wall)", f"{staged['wall']:.1f}", f"{pipeline['wall']:.1f}", f"{staged['wall'] - pipeline['wall']:+.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Staged orchestrate run vs one in-process PixArtAlphaPipeline, same 8 images, CPU.")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else bench/results)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-bench-overhead"), help="model and run folders")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two sides this many times; medians reported")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (no binning)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of both sides (default 1: on a shared machine, OpenMP threads stall at every "
                             "barrier while another process holds a core, which swamps the comparison; 0 = torch's default)")
    args = parser.parse_args(argv)
    out = common.results_dir(args.out)
    args.work.mkdir(parents=True, exist_ok=True)

    model = ensure_model(args.work)
    report = json.loads((model / "BENCH_MODEL.json").read_text(encoding="utf-8"))
    items = job_items(args.size, args.steps)
    items_file = args.work / "items.json"
    items_file.write_text(json.dumps(items, indent=2), encoding="utf-8")
    job_file = args.work / "overhead.toml"
    write_job(job_file, model, items)

    runs = []
    for n in range(args.repeat):
        load_before = os.getloadavg()[0]
        print(f"[{n + 1}/{args.repeat}] staged: orchestrate run ...", flush=True)
        staged = run_staged(job_file, args.work / f"staged-{n}", args.threads)
        print(f"  {staged['wall']:.1f} s wall, {staged['cpu']:.1f} s CPU")
        print(f"[{n + 1}/{args.repeat}] pipeline: one PixArtAlphaPipeline ...", flush=True)
        pipeline = run_pipeline(model, items_file, args.work / f"pipeline-{n}", args.threads)
        print(f"  {pipeline['wall']:.1f} s wall, {pipeline['cpu']:.1f} s CPU")
        runs.append({"staged": staged, "pipeline": pipeline, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]})

    images = [common.compare_images(r["staged"]["images"], r["pipeline"]["images"]) for r in runs]
    med = lambda side, key: statistics.median(r[side][key] for r in runs)  # noqa: E731
    wall_ratio = med("staged", "wall") / med("pipeline", "wall")
    min_ratio = min(r["staged"]["wall"] for r in runs) / min(r["pipeline"]["wall"] for r in runs)
    cpu_ratio = med("staged", "cpu") / med("pipeline", "cpu")
    fastest = {side: min(r[side]["wall"] for r in runs) for side in ("staged", "pipeline")}
    fixed = fastest["staged"] - fastest["pipeline"]  # seconds the staged design adds, whatever the work
    # The breakdown shows the repetition where both sides ran closest to their fastest (least disturbed).
    best = min(runs, key=lambda r: r["staged"]["wall"] / fastest["staged"] + r["pipeline"]["wall"] / fastest["pipeline"])

    info = common.machine()
    per_rep = ", ".join(f"{r['staged']['wall']:.0f}/{r['pipeline']['wall']:.0f} s = {r['staged']['wall'] / r['pipeline']['wall']:.2f}x" for r in runs)
    loads = ", ".join(f"{r['load_average_before']:.1f}/{r['load_average_after']:.1f}" for r in runs)
    params = {k: v["parameters"] for k, v in report["components"].items() if "parameters" in v}
    cfg = report["configs"]
    model_line = (
        f"random weights, float32, real PixArt-XL-2-1024-MS configs narrowed (bench/fullsize.py): "
        f"T5 encoder d_model {cfg['text_encoder']['d_model']}, {cfg['text_encoder']['num_layers']} layers, d_ff {cfg['text_encoder']['d_ff']}, "
        f"vocab {cfg['text_encoder']['vocab_size']} ({params['text_encoder'] / 1e6:.1f} M params); "
        f"transformer {cfg['transformer']['num_layers']} layers x {cfg['transformer']['num_attention_heads'] * cfg['transformer']['attention_head_dim']} wide "
        f"({params['transformer'] / 1e6:.1f} M); VAE blocks {tuple(cfg['vae']['block_out_channels'])} x {cfg['vae']['layers_per_block']} "
        f"({params['vae'] / 1e6:.1f} M). Real: 4762 M / 611 M / 84 M."
    )
    totals = [
        ["staged: `orchestrate run` (orchestrator + 3 stage processes)", f"{fastest['staged']:.1f}", f"{med('staged', 'wall'):.1f}",
         f"{med('staged', 'cpu'):.1f}", f"{statistics.median(r['staged']['first_image'] for r in runs):.1f}", f"**{min_ratio:.2f}x**",
         f"{wall_ratio:.2f}x", f"{cpu_ratio:.2f}x"],
        ["baseline: one in-process PixArtAlphaPipeline (one process)", f"{fastest['pipeline']:.1f}", f"{med('pipeline', 'wall'):.1f}",
         f"{med('pipeline', 'cpu'):.1f}", f"{statistics.median(r['pipeline']['first_image'] for r in runs):.1f}", "1.00x", "1.00x", "1.00x"],
    ]
    equal = all(i["equal"] == i["compared"] == len(items) for i in images)
    text = "\n".join([
        "# Overhead: staged `orchestrate run` vs one in-process PixArtAlphaPipeline",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, CPU only; torch {info.get('torch')}, "
        f"diffusers {info.get('diffusers')}, transformers {info.get('transformers')}, Python {info['python']}",
        f"- load average (1 min) around the runs: {loads} "
        f"(before/after each repetition; above {info['cores']} means other work shared the CPU)",
        f"- model: {model_line}",
        f"- job: {len(items)} images, {len(items)} distinct prompts, {args.size}x{args.size} (no binning), {args.steps} steps, "
        "guidance 4.5 (CFG, empty negative prompt), DPM-Solver++, clean_caption on, float32, CPU, seeds 1000-1007",
        f"- repetitions: {args.repeat} (sides alternated); both sides start as fresh processes; "
        f"torch threads per process: {args.threads or 'torch default'}" + (" (OMP_NUM_THREADS)" if args.threads else ""),
        "",
        common.markdown_table(["run", "fastest wall s", "median wall s", "median CPU s", "first image s", "ratio (fastest)",
                               "ratio (medians)", "CPU ratio"], totals),
        "",
        f"Target: staged wall <= 1.2x the pipeline: **{'met' if min_ratio <= 1.2 else 'NOT met'}** at {min_ratio:.2f}x, from the fastest "
        f"run of each side (the least disturbed; per repetition: {per_rep}). The staged design adds a fixed {fixed:.1f} s here, whatever "
        f"the work, so on this machine it stays within 1.2x once the one-process run takes {5 * fixed:.0f} s or more "
        f"(this one: {fastest['pipeline']:.0f} s).",
        f"Images: {'all' if equal else 'NOT all'} {len(items)} equal to the pipeline's (np.array_equal): "
        + "; ".join(f"{i['equal']}/{i['compared']} equal, max |diff| {i['max_abs_diff']}" for i in images),
        "",
        "## Where the difference goes (seconds; the least disturbed repetition)",
        "",
        common.markdown_table(["part", "staged", "pipeline", "difference"], breakdown(best["staged"], best["pipeline"])),
        "",
        "Per stage (staged side): span = the stage process's wall time (from job.resolved.json/summary.json file times);",
        "load and compute from its summary.json and per-item records (`seconds`).",
        "",
        common.markdown_table(
            ["stage", "span s", "load s", "compute s", "items", "host peak RSS"],
            [[k, v["span"], v["load"], v["compute"], v["units"], common.format_bytes(v["host_peak_rss_bytes"])] for k, v in best["staged"]["stages"].items()],
        ),
        "",
        f"Baseline process: import torch {best['pipeline']['report']['import_torch_seconds']}, diffusers "
        f"{best['pipeline']['report']['import_diffusers_seconds']}, from_pretrained {best['pipeline']['report']['load_seconds']}, "
        f"8 calls {sum(best['pipeline']['report']['call_seconds']):.1f}.",
        "",
        "Made by `python bench/overhead.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])) + "`.",
    ])
    (out / "overhead.md").write_text(text + "\n", encoding="utf-8")
    (out / "overhead.json").write_text(json.dumps({"machine": info, "model": report, "items": items, "runs": runs,
                                                   "images": images, "wall_ratio": wall_ratio,
                                                   "min_wall_ratio": min_ratio, "fixed_overhead_seconds": fixed, "cpu_ratio": cpu_ratio, "threads": args.threads}, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print(text)
    print(f"\nwritten: {out / 'overhead.md'}, {out / 'overhead.json'}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
