"""Denoise stage: prompt embeddings -> latents.

Reads:  <job_dir>/job.resolved.json, <job_dir>/encode/<key>.safetensors (checked against records)
Writes: <job_dir>/denoise/<item>.safetensors (`latents` [1, C, H/f, W/f]) and <item>.json, its
        record, which names the latent shape, the VAE scale factor and the requested and binned sizes.
Loads:  PixArtTransformer2DModel and the scheduler only; the VAE's config.json is read for its scale
        factor (a pipeline without its VAE assumes 8), never its weights.

Example: python -m stages.denoise workdir/beach

The loop mirrors `PixArtAlphaPipeline.__call__` steps 4-7 line for line, with one generator per
item (drawn on the CPU, so the noise is the same on every machine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages import contract


def vae_scale_factor(model_path: str) -> int:
    """2 ** (number of VAE blocks - 1), read from vae/config.json as the pipeline does."""
    config = json.loads((Path(model_path) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def binned_size(sample_size: int, height: int, width: int) -> tuple[int, int]:
    """The aspect-ratio bin the pipeline maps (height, width) to (pipeline step 1)."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    bins = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}.get(sample_size)
    if bins is None:
        raise contract.JobFileError(
            f"denoise: resolution binning needs a transformer sample_size of 32, 64 or 128, not {sample_size}; "
            f"set use_resolution_binning = false in the job file"
        )
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins)


def load_transformer(job: dict, device):
    """The transformer and a fresh scheduler of the class the model folder names."""
    import diffusers
    import torch
    from diffusers import PixArtTransformer2DModel

    path = job["model"]["path"]
    with contract.loading("denoise", path, "transformer"):
        transformer = PixArtTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=contract.torch_dtype(job["dtype"]), use_safetensors=True
        ).to(device).eval()
    scheduler_config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
    torch.set_grad_enabled(False)
    return transformer, lambda: scheduler_class.from_config(scheduler_config)


def generate_latents(transformer, scheduler, embeds: dict, item: dict, height: int, width: int, scale: int, device, dtype):
    """Yield (step, total, latents) after each step; the last yield holds the final latents."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    guidance = item["guidance_scale"]
    do_cfg = guidance > 1.0
    prompt_embeds = embeds["prompt_embeds"].to(device=device, dtype=dtype)  # [1, seq, dim]
    prompt_attention_mask = embeds["prompt_attention_mask"].to(device)  # [1, seq]
    if do_cfg:
        prompt_embeds = torch.cat([embeds["negative_prompt_embeds"].to(device=device, dtype=dtype), prompt_embeds])  # [2, seq, dim]
        prompt_attention_mask = torch.cat([embeds["negative_prompt_attention_mask"].to(device), prompt_attention_mask])
    # 4. Prepare timesteps.
    steps = item["num_inference_steps"]
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    # 5. Prepare latents: one CPU generator per item, so an image never depends on its neighbours.
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    channels = transformer.config.in_channels
    latents = randn_tensor((1, channels, height // scale, width // scale), generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma  # [1, C, h, w]
    # 6. Prepare extra step kwargs (DPM-Solver takes the generator) and the micro-conditions.
    import inspect

    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
    if transformer.config.sample_size == 128:
        batch = 2 if do_cfg else 1
        resolution = torch.tensor([height, width]).repeat(batch, 1).to(dtype=dtype, device=device)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(batch, 1).to(dtype=dtype, device=device)
        added_cond_kwargs = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    # 7. Denoising loop.
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    for i, t in enumerate(timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        current_timestep = t[None].to(latent_model_input.device) if len(t.shape) == 0 else t
        current_timestep = current_timestep.expand(latent_model_input.shape[0])
        noise_pred = transformer(
            latent_model_input,
            encoder_hidden_states=prompt_embeds,
            encoder_attention_mask=prompt_attention_mask,
            timestep=current_timestep,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        if transformer.config.out_channels // 2 == channels:  # learned sigma
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        # The pipeline takes `[1]` here when steps == 1, which raises IndexError for DPM-Solver
        # (its step returns a 1-tuple); `[0]` is the previous sample for every scheduler.
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        yield i + 1, len(timesteps), latents


def read_embeddings(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    import torch
    from safetensors.torch import save_file

    device = torch.device(job["device"])
    dtype = contract.torch_dtype(job["dtype"])
    items = {item["id"]: item for item in job["items"]}
    scale = vae_scale_factor(job["model"]["path"])
    # Check every input before loading the model (diffusers' check_inputs comes first too).
    inputs = {}
    for unit in todo:
        (upstream, key), = unit.inputs
        inputs[unit.key] = contract.verified_input(job_dir, "denoise", unit, upstream, key)
    clock = contract.Clock()
    contract.reset_peak_memory(device)
    transformer, new_scheduler = load_transformer(job, device)
    load_seconds = clock.seconds()
    sample_size = transformer.config.sample_size
    show_bar = sys.stderr.isatty()
    for n, unit in enumerate(todo, 1):
        item = items[unit.key]
        started = contract.Clock()
        # 1. Resolution binning: the latents are made at the bin; decode resizes back.
        height, width = item["height"], item["width"]
        if item["use_resolution_binning"]:
            height, width = binned_size(sample_size, height, width)
        in_path, in_hash = inputs[unit.key]
        embeds = read_embeddings(in_path)
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=item["num_inference_steps"], desc=f"denoise {n}/{len(todo)} {unit.key}", leave=False)
        latents = None
        for step, total, latents in generate_latents(transformer, new_scheduler(), embeds, item, height, width, scale, device, dtype):
            if bar is not None:
                bar.update()
            elif step == total or step % max(1, total // 4) == 0:
                log.info("denoise: %s step %d/%d", unit.key, step, total)
        if bar is not None:
            bar.close()
        latents = latents.to("cpu").contiguous()  # [1, C, h, w]
        out = job_dir / "denoise" / f"{unit.key}.safetensors"
        contract.publish(out, lambda tmp: save_file({"latents": latents}, str(tmp), metadata=contract.safetensors_metadata("denoise", unit.key)))
        contract.write_record(unit.record_path(job_dir), {
            "stage": "denoise",
            "key": unit.key,
            "items": [unit.key],
            "params": unit.params,
            "inputs": {f"encode/{in_path.name}": in_hash},
            "outputs": {out.name: contract.output_entry(out, latents.shape, latents.dtype)},
            "requested_size": {"height": item["height"], "width": item["width"]},
            "binned_size": {"height": height, "width": width},
            "latent_shape": list(latents.shape),
            "vae_scale_factor": scale,
            "seed": item["seed"],
            "model": {"given": job["model"]["given"], "path": job["model"]["path"], "config_hash": job["model"]["component_hashes"]["denoise"]},
            "versions": contract.versions(),
            "device": str(device),
            "dtype": job["dtype"],
            "seconds": started.seconds(),
            "peak": contract.peak_memory(device),
        })
        log.info("denoise: %d/%d %s %dx%d %.2f s", n, len(todo), unit.key, width, height, started.seconds())
    return {"load_seconds": load_seconds, "peak": contract.peak_memory(device)}


def main(argv: list[str] | None = None) -> int:
    return contract.stage_main("denoise", make_units, argv)


if __name__ == "__main__":
    sys.exit(main())
