"""The baseline: one process, one `PixArtAlphaPipeline`, a queue of images; reports where time and
memory went. Started as a fresh process by bench/overhead.py and bench/gpu_bench.py, so its wall
time includes interpreter start and imports exactly as `orchestrate run` pays them.

Reads:  --items, a JSON list of {prompt, negative_prompt, seed, width, height, guidance_scale,
        num_inference_steps, use_resolution_binning}; the model folder
Writes: <images>/0000.png, 0001.png, ... (one per item, in order) and --report (JSON); with
        --latents DIR also DIR/0000.safetensors ... (`latents`: the final latents, before the VAE,
        as our denoise stage writes them), for comparing latents and not only pixels

Example: python bench/pipeline_run.py --model /tmp/m --items items.json --images out/ --report r.json --device cuda --offload model

Per component, hooks record seconds and, on CUDA, the peak allocated/reserved bytes while it runs
(the allocator's peak is reset when the component starts): encode = `pipe.encode_prompt` (tokenizer,
clean_caption and T5, as our encode stage's items), denoise = each transformer forward, decode =
`vae.decode` (the pipeline never calls the VAE's forward); all three by wrapping. With
`--offload model`, `enable_model_cpu_offload` moves each model to the GPU inside those windows, so the
weights it moves are counted in that component's peak, as they are in our stages' peaks; with
`--offload sequential`, `enable_sequential_cpu_offload` moves each submodule in for its forward.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

COMPONENTS = {"text_encoder": "encode", "transformer": "denoise", "vae": "decode"}


def instrument(pipe, device) -> dict:
    """Attach timing/peak hooks; returns the dict they fill: {component: {seconds, calls, peak}}."""
    import torch

    cuda = device.type == "cuda"
    stats = {name: {"seconds": 0.0, "calls": 0, "device_max_allocated_bytes": 0, "device_max_reserved_bytes": 0} for name in COMPONENTS}

    def start(name):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        stats[name]["_t"] = time.perf_counter()

    def stop(name):
        if cuda:
            torch.cuda.synchronize(device)
            stats[name]["device_max_allocated_bytes"] = max(stats[name]["device_max_allocated_bytes"], torch.cuda.max_memory_allocated(device))
            stats[name]["device_max_reserved_bytes"] = max(stats[name]["device_max_reserved_bytes"], torch.cuda.max_memory_reserved(device))
        stats[name]["seconds"] += time.perf_counter() - stats[name].pop("_t")
        stats[name]["calls"] += 1

    pipe.transformer.register_forward_pre_hook(lambda *_: start("transformer"))
    pipe.transformer.register_forward_hook(lambda *_: stop("transformer"))

    def timed(name, method):
        def wrapper(*args, **kwargs):
            start(name)
            try:
                return method(*args, **kwargs)
            finally:
                stop(name)
        return wrapper

    # Instance attributes shadow the methods; the originals keep diffusers' offload hooks inside.
    pipe.encode_prompt = timed("text_encoder", pipe.encode_prompt)  # tokenizing, clean_caption, T5
    pipe.vae.decode = timed("vae", pipe.vae.decode)
    return stats


def main(argv: list[str] | None = None) -> int:
    begun = time.perf_counter()
    parser = argparse.ArgumentParser(description="Make a queue of images with one PixArtAlphaPipeline and report timings.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--items", type=Path, required=True, help="JSON list of generation parameters")
    parser.add_argument("--images", type=Path, required=True, help="folder for 0000.png, 0001.png, ...")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--clean-caption", default="true", choices=("true", "false"))
    parser.add_argument("--offload", choices=("model", "sequential"), default=None,
                        help="enable_model_cpu_offload or enable_sequential_cpu_offload instead of all models resident")
    parser.add_argument("--latents", type=Path, default=None, help="folder for each item's final latents (0000.safetensors, ...)")
    parser.add_argument("--pipeline", default="PixArtAlphaPipeline", choices=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
                        help="the family's pipeline class (default PixArtAlphaPipeline)")
    parser.add_argument("--text-encoder-from", type=Path, default=None,
                        help="take tokenizer and text_encoder from this folder (a composed model, as [job.components] does)")
    args = parser.parse_args(argv)
    items = json.loads(args.items.read_text(encoding="utf-8"))
    args.images.mkdir(parents=True, exist_ok=True)
    if args.latents:
        args.latents.mkdir(parents=True, exist_ok=True)
    report = {"mode": f"{args.offload}_cpu_offload" if args.offload else "resident", "device": args.device}

    clock = time.perf_counter()
    import torch

    report["import_torch_seconds"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    import diffusers

    report["import_diffusers_seconds"] = round(time.perf_counter() - clock, 3)
    from stages.entry import warm_up_math_kernels

    warm_up_math_kernels()  # the reference gets the same fix as the stages (docs/determinism.md)

    device = torch.device(args.device)
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "float16")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    report["dtype"] = dtype_name
    clock = time.perf_counter()
    components = {}
    if args.text_encoder_from:
        from transformers import T5EncoderModel, T5Tokenizer

        components = {"tokenizer": T5Tokenizer.from_pretrained(args.text_encoder_from, subfolder="tokenizer"),
                      "text_encoder": T5EncoderModel.from_pretrained(args.text_encoder_from, subfolder="text_encoder", dtype=dtype,
                                                                     use_safetensors=True)}
    pipe = getattr(diffusers, args.pipeline).from_pretrained(args.model, torch_dtype=dtype, use_safetensors=True, **components)
    report["pipeline"] = args.pipeline
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)  # on a CPU the hooks run but move nothing
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        report["device_allocated_after_load_bytes"] = torch.cuda.memory_allocated(device)
    report["load_seconds"] = round(time.perf_counter() - clock, 3)
    pipe.set_progress_bar_config(disable=True)
    stats = instrument(pipe, device)

    calls, saves = [], []
    final = {}

    def keep_latents(step, timestep, latents):  # called after every step; the last call's are the result
        final["latents"] = latents

    for n, item in enumerate(items):
        clock = time.perf_counter()
        image = pipe(
            item["prompt"],
            negative_prompt=item["negative_prompt"],
            width=item["width"],
            height=item["height"],
            guidance_scale=item["guidance_scale"],
            num_inference_steps=item["num_inference_steps"],
            use_resolution_binning=item["use_resolution_binning"],
            clean_caption=args.clean_caption == "true",
            generator=torch.Generator("cpu").manual_seed(item["seed"]),  # as our denoise stage draws noise
            callback=keep_latents if args.latents else None,
        ).images[0]
        calls.append(round(time.perf_counter() - clock, 3))
        clock = time.perf_counter()
        image.save(args.images / f"{n:04d}.png")
        if args.latents:
            from safetensors.torch import save_file

            save_file({"latents": final.pop("latents").to("cpu").contiguous()}, str(args.latents / f"{n:04d}.safetensors"))
        saves.append(round(time.perf_counter() - clock, 3))
    report["call_seconds"] = calls
    report["save_seconds"] = saves
    report["components"] = {COMPONENTS[name]: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()} for name, s in stats.items()}
    report["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        report["device_max_allocated_bytes"] = max(s["device_max_allocated_bytes"] for s in stats.values())
        report["device_max_reserved_bytes"] = max(s["device_max_reserved_bytes"] for s in stats.values())
    report["inside_seconds"] = round(time.perf_counter() - begun, 3)
    args.report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
