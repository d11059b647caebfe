"""How early the first image arrives (issue 10, point 1): the same 24-image queue made by
`orchestrate run --chunk 0` (one denoise and one decode process for the whole queue) and by the
default chunked run (denoise and decode alternate over chunks of items, orchestrator/planning/chunks.py).

Reads:  nothing but the reference configs; builds the narrowed random model of bench/overhead.py
Writes: bench/results/first_image.md and first_image.json (or --out), work files under --work

Example: python bench/first_image.py --repeat 2    # ~8 min on a 2-core CPU

Each run starts from an empty workdir except the job's `<stage>/summary.json` files are not
carried over either: the default run's chunk size comes from the weights-size estimate for its
first chunk, then from what that chunk measured (a second run of the same job would start from the
first run's measurements). Time to the first PNG is its mtime minus the command's start; the wall
time includes everything (encode, start-ups, the orchestrator). Both sides alternate, and the
table gives the fastest of each (other work on a shared machine only ever adds time), with the
images compared by bytes (the chunking must not change a single pixel).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import common
import overhead

ITEMS = 24
SIZE, STEPS = 256, 12


def job_items() -> list[dict]:
    """24 generations: the 8 prompts of bench/overhead.py, each at three seeds."""
    return [
        {"prompt": p, "negative_prompt": "", "seed": 2000 + n, "width": SIZE, "height": SIZE, "guidance_scale": 4.5,
         "num_inference_steps": STEPS, "use_resolution_binning": False}
        for n, p in enumerate(overhead.PROMPTS * (ITEMS // len(overhead.PROMPTS)))
    ]


def run(job_file: Path, workdir: Path, chunk: list[str], threads: int) -> dict:
    result = overhead.timed_run(common.orchestrate_command() + ["run", str(job_file), "--workdir", str(workdir), "--device", "cpu", *chunk],
                                common.fresh_folder(workdir) / "orchestrate.log", threads)
    job_dir = workdir / "first-image"
    pngs = common.published(job_dir / "decode", "*.png")
    if len(pngs) != ITEMS:
        raise RuntimeError(f"{len(pngs)} images made, expected {ITEMS}; see {workdir / 'orchestrate.log'}")
    said = (workdir / "orchestrate.log").read_text(encoding="utf-8")
    result.update(first_image=common.first_file_seconds(job_dir / "decode", "*.png", result["start_epoch"]),
                  chunks=[str(len(units.split(","))) for units in re.findall(r"^> python -m stages\.denoise .* --units (\S+)$", said, re.M)],
                  processes={stage: said.count(f"> python -m stages.{stage} ") for stage in common.STAGES},
                  images=[str(p) for p in pngs])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time to the first image: --chunk 0 vs the default chunked run.")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench/overhead.py)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-first-image"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = overhead.ensure_model(args.work)
    job_file = args.work / "job.toml"
    common.write_job(job_file, model, job_items(), "first-image", "bench/first_image.py")
    sides = {"--chunk 0 (whole queue per stage)": ["--chunk", "0"], "default (chunked)": []}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for n in range(args.repeat):
        for name, flags in sides.items():
            results[name].append(run(job_file, args.work / f"run-{len(results[name])}-{'chunk0' if flags else 'default'}", flags, args.threads))
            print(f"{name}: wall {results[name][-1]['wall']} s, first image {results[name][-1]['first_image']} s", flush=True)
    best = {name: min(runs, key=lambda r: r["wall"]) for name, runs in results.items()}
    base, chunked = best["--chunk 0 (whole queue per stage)"], best["default (chunked)"]
    same = common.compare_images(base["images"], chunked["images"])
    rows = []
    for name, r in best.items():
        rows.append([name, f"{r['wall']:.1f}", f"{r['first_image']:.1f}", f"{r['first_image'] / r['wall']:.0%}",
                     f"{r['wall'] / base['wall']:.3f}", f"{r['first_image'] / base['first_image']:.2f}",
                     ", ".join(r["chunks"]) or "-", f"{r['processes']['denoise']} / {r['processes']['decode']}"])
    info = common.machine()
    text = "\n".join([
        "# Time to the first image: one process per stage vs chunked runs",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info.get('torch')}, diffusers {info.get('diffusers')}; "
        f"{args.threads} torch thread(s); fastest of {args.repeat} alternated runs per side; `python bench/first_image.py --repeat {args.repeat}`",
        f"- job: {ITEMS} images {SIZE}x{SIZE}, {STEPS} steps, guidance 4.5, on the narrowed random PixArt-alpha of bench/overhead.py "
        f"(float32, CPU); each run from an empty workdir",
        "- goal (issue 10): first image before 25% of the wall time, total within 1.05x of --chunk 0",
        f"- images equal between the two sides: {same['equal']} of {same['compared']} (max abs diff {same['max_abs_diff']})",
        "",
        common.markdown_table(["run", "wall s", "first image s", "first / wall", "wall ratio", "first-image ratio", "chunk sizes (denoise --units)", "denoise / decode processes"], rows),
        "",
    ])
    out = common.results_dir(args.out)
    (out / "first_image.md").write_text(text, encoding="utf-8")
    (out / "first_image.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0 if same["equal"] == same["compared"] == ITEMS else 1


if __name__ == "__main__":
    sys.exit(main())
