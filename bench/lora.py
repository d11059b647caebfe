"""What LoRA adapters cost per image (issue 19, point 6): none, one and three LoRAs, with the
transformer resident and streamed block by block, same images otherwise.

Reads:  nothing but the reference configs; builds its own random-weight model (bench/overhead.py's
        moderate-width PixArt-alpha) and random rank-16 LoRAs on every attention and feed-forward
        Linear of every block (diffusers-style single files)
Writes: bench/results/lora.md and lora.json (or --out), work files under --work

Example: python bench/lora.py                 # ~12 min on a 2-core CPU (3 rounds)
         python bench/lora.py --smoke         # the tiny model, stages in-process: checks the script in ~30 s

Each of the 6 jobs runs the product path (resolved job, three stage processes, the runner) with the
denoise strategy set in the job's runtime plan, as `orchestrate run` writes it; the per-image cost is
the denoise records' own seconds (the median over the images), and the load seconds come from the
denoise summary, so encode and decode do not blur the comparison. Torch runs 1 thread per process
(--threads), as in the other CPU benches. Adapters are applied unmerged (stages/lora.py): each
adapted Linear adds two thin matmuls per call, which is the cost measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
PROMPT = "a watercolor painting of a lighthouse by the sea"


def make_loras(model: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` random diffusers-style LoRA files for `model`'s transformer."""
    import torch
    from safetensors.torch import save_file

    from stages.lora import meta_transformer

    transformer = meta_transformer(model / "transformer" / "config.json")
    modules = dict(transformer.named_modules())
    paths = []
    for n in range(count):
        gen = torch.Generator().manual_seed(100 + n)
        state = {}
        for i in range(len(transformer.transformer_blocks)):
            for target in TARGETS:
                layer = modules[f"transformer_blocks.{i}.{target}"]
                key = f"transformer.transformer_blocks.{i}.{target}"
                state[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.02
                state[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.02
        path = folder / f"lora-{n}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths


def in_process(stage: str, job_dir: Path, force: bool, echo, units=None):
    """A stage's `main` run in this process (--smoke only: 18 interpreter starts would be most of it)."""
    import importlib

    from orchestrator.executors.runner import StageRun

    started = time.perf_counter()
    code = importlib.import_module(f"stages.{stage}").main([str(job_dir)] + (["--force"] if force else []) + (["--units", ",".join(units)] if units else []))
    if code != 0:
        raise RuntimeError(f"stage {stage} exited {code}")
    return StageRun(stage, time.perf_counter() - started, json.loads((job_dir / stage / "summary.json").read_text(encoding="utf-8")))


def run_one(model: Path, work: Path, name: str, loras: list[Path], strategy: str, args) -> dict:
    """One job: `images` images of one prompt, distinct seeds, under `strategy`; its denoise figures."""
    from orchestrator.executors.runner import run_job
    from orchestrator.jobfile import job as jobfile

    folder = common.fresh_folder(work / name)
    lines = ["# Written by bench/lora.py", "[job]", f'name = "{name}"', f'model = "{model}"', "", "[defaults]",
             f"width = {args.size}", f"height = {args.size}", f"num_inference_steps = {args.steps}", "use_resolution_binning = false"]
    if loras:
        lines.append("loras = [" + ", ".join(f'{{ path = "{p}", scale = 0.7 }}' for p in loras) + "]")
    for i in range(args.images):
        lines += ["", "[[generation]]", f'prompt = "{PROMPT}"', f"seed = {i}"]
    job_file = folder / "job.toml"
    job_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, folder / "work")
    resolved = jobfile.resolve_job(job, job_dir, args.device, runtime={"stages": {"denoise": {"strategy": strategy, "batch_size": 1}}})
    started = time.perf_counter()
    with open(folder / "run.log", "w", encoding="utf-8") as log:
        run_job(job_dir, resolved, lambda line: print(line, file=log), launch=in_process if args.smoke else None)
    wall = time.perf_counter() - started
    stage = common.read_stage(job_dir, "denoise")
    seconds = [record["seconds"] for record in stage["records"]]
    return {"name": name, "strategy": strategy, "dtype": resolved["dtype"], "loras": len(loras), "wall_seconds": round(wall, 2),
            "denoise_seconds_per_image": round(statistics.median(seconds), 3), "denoise_seconds_all": seconds,
            "load_seconds": stage["summary"].get("load_seconds"), "weight_bytes_moved": stage["summary"].get("weight_bytes_moved"),
            "images": [str(job_dir / "decode" / f"{item['id']}.png") for item in resolved["items"]]}


def forward_cost(model: Path, loras: list[Path], args) -> list[dict]:
    """CPU seconds (time.process_time: other processes on a shared machine do not count) of one
    transformer forward of the CFG batch at --size, through the stage's own load_transformer and
    lora.activate, with none, one and three LoRAs active; the three alternate, each keeps its least."""
    import torch

    from stages import denoise, lora
    from stages.lora import inspect_lora, meta_transformer

    torch.set_num_threads(args.threads)
    meta = meta_transformer(model / "transformer" / "config.json")
    entries = [{"path": str(p), "scale": 0.7, **inspect_lora(p, meta)} for p in loras]
    sets = {0: (), 1: lora.lora_set({"loras": entries[:1]}), 3: lora.lora_set({"loras": entries})}
    transformer, _, _ = denoise.load_transformer({"model": {"path": str(model)}, "dtype": "float32"}, torch.device("cpu"), "resident",
                                                 [{"loras": entries}])
    config = transformer.config
    side = args.size // 8  # the VAE factor of the models used here
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, config.in_channels, side, side, generator=gen)  # [2B, C, h, w]: CFG doubles the batch
    embeds = torch.randn(2, 120, config.caption_channels, generator=gen)  # [2B, seq, dim]
    mask = torch.ones(2, 120, dtype=torch.long)
    cond = {"resolution": torch.tensor([[args.size, args.size]] * 2, dtype=torch.float32), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    best = {count: float("inf") for count in sets}
    for _ in range(args.forward_repeat):
        for count, active in sets.items():
            lora.activate(transformer, active)
            started = time.process_time()
            transformer(latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=torch.tensor([500, 500]),
                        added_cond_kwargs=cond, return_dict=False)
            best[count] = min(best[count], time.process_time() - started)
    return [{"loras": count, "forward_cpu_seconds": round(best[count], 4), "vs_none": round(best[count] / best[0], 3)} for count in sets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-image cost of none, one and three LoRAs, resident and streamed (CPU).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-bench-lora"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the 6 configurations; each keeps its fastest")
    parser.add_argument("--forward-repeat", type=int, default=20, help="alternating forwards per LoRA count in the CPU-time table")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bench/gpu.sh --lora): there 'offload' is diffusers' group offloading")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder to use instead of the moderate-width random model "
                        "(bench/gpu.sh --lora gives the full-size one bench/fullsize.py builds)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 64 px, 2 steps, 1 image, stages in this process: checks the script")
    args = parser.parse_args(argv)
    os.environ.update(common.subprocess_env(args.threads))
    if args.smoke:
        args.size, args.steps, args.images, args.rank, args.repeat, args.forward_repeat = 64, 2, 1, 4, 1, 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from orchestrator.tools.tiny import save_tiny_model

        model = work / "tiny"
        if not (model / "model_index.json").exists():
            save_tiny_model(model)
    elif args.model is not None:
        model = args.model.resolve()
    else:
        import overhead

        model = overhead.ensure_model(work)
    loras = make_loras(model, common.fresh_folder(work / "loras"), 3, args.rank)
    forwards = forward_cost(model, loras, args)
    print("forward CPU seconds:", forwards, flush=True)
    # Rounds alternate the 6 configurations; each keeps its fastest round (on a shared machine other
    # work only adds time), the others are in lora.json.
    load_before = os.getloadavg()[0]
    runs = []
    for round_ in range(args.repeat):
        for n, (strategy, count) in enumerate((s, c) for s in ("resident", "offload") for c in (0, 1, 3)):
            run = run_one(model, work, f"{strategy}-{count}", loras[:count], strategy, args)
            print(f"round {round_ + 1}: {strategy:<8} {count} LoRA(s): {run['denoise_seconds_per_image']:.3f} s/image", flush=True)
            if round_ == 0:
                runs.append(dict(run, rounds=[run["denoise_seconds_per_image"]]))
            else:
                runs[n]["rounds"].append(run["denoise_seconds_per_image"])
                if run["denoise_seconds_per_image"] < runs[n]["denoise_seconds_per_image"]:
                    runs[n].update({k: v for k, v in run.items() if k != "images"})
    from common import compare_images

    rows = []
    for run in runs:
        base = next(r for r in runs if r["strategy"] == run["strategy"] and r["loras"] == 0)
        resident = next(r for r in runs if r["strategy"] == "resident" and r["loras"] == run["loras"])
        same = compare_images([Path(p) for p in run["images"]], [Path(p) for p in resident["images"]])
        rows.append([run["strategy"] if run["strategy"] == "resident" else "streamed" if args.device == "cpu" else "offloaded", run["loras"], f"{run['denoise_seconds_per_image']:.3f}",
                     f"{run['denoise_seconds_per_image'] / base['denoise_seconds_per_image']:.2f}x", f"{run['load_seconds']:.2f}",
                     common.format_bytes(run["weight_bytes_moved"]) if run["weight_bytes_moved"] else "-",
                     f"{same['equal']}/{len(run['images'])}"])
    header = ["strategy", "LoRAs", f"denoise s/image (median of the images, best of {args.repeat})", "vs none", "load s", "weights streamed", "images = resident's"]
    info = common.machine()
    text = "\n".join([
        "# LoRA cost per image (bench/lora.py)", "",
        f"{'tiny model (smoke)' if args.smoke else str(args.model) if args.model else 'moderate-width PixArt-alpha (bench/overhead.py MEDIUM: 6 blocks x 288 wide)'}, "
        f"{args.size}x{args.size}, {args.steps} steps, CFG, {args.images} images per run, rank-{args.rank} LoRAs on the "
        f"{len(TARGETS)} attention and feed-forward Linears of every block, scale 0.7, {runs[0].get('dtype', 'float32')} on {args.device}, {args.threads} CPU thread(s).",
        f"Machine: {info.get('cpu')}, {info.get('cores')} cores; torch {info.get('torch', '?')}; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (the machine is shared).", "",
        "Transformer forward, CPU seconds (the process's own, so other work on the machine does not count; "
        f"least of {args.forward_repeat} alternating forwards of the CFG batch, resident, the stage's load_transformer and lora.activate):", "",
        common.markdown_table(["LoRAs", "forward CPU s", "vs none"], [[f["loras"], f"{f['forward_cpu_seconds']:.4f}", f"{f['vs_none']:.2f}x"] for f in forwards]), "",
        "Whole runs (product path: resolved job, stage processes), wall seconds per image from the denoise records (wall time: on a loaded shared machine these differ by up to 2x between identical rounds, so read the cost from the CPU-time table above; this one shows that every configuration runs and that streamed images equal resident ones):", "",
        common.markdown_table(header, rows), "",
        f"Command: python bench/lora.py{' --smoke' if args.smoke else ''}{' --device ' + args.device if args.device != 'cpu' else ''} --size {args.size} --steps {args.steps} --images {args.images} --rank {args.rank} --repeat {args.repeat} --forward-repeat {args.forward_repeat}",
    ]) + "\n"
    out = common.results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.md").write_text(text, encoding="utf-8")
    (out / "lora.json").write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "forwards": forwards, "runs": runs}, indent=2) + "\n",
                                   encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
