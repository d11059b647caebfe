"""Denoise stage: prompt embeddings -> latents.

Reads:  <job_dir>/job.resolved.json, <job_dir>/encode/<key>.safetensors (checked against records);
        for img2img items also imagencode/<key>.safetensors and the inpainting mask (stages/img2img.py)
Writes: <job_dir>/denoise/<item>.safetensors (`latents` [1, C, H/f, W/f]) and <item>.json, its
        record, which names the latent shape, the VAE scale factor and the requested and binned sizes.
Loads:  PixArtTransformer2DModel (with its items' LoRA adapters, stages/lora.py) and the scheduler only;
        the VAE's config.json is read for its scale factor (a pipeline without its VAE assumes 8), never its weights.

Example: python -m stages.denoise workdir/beach

The loop mirrors `PixArtAlphaPipeline.__call__` steps 4-7 line for line, with one generator per
item (drawn on the CPU, so the noise is the same on every machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import artifacts, backends, contract, entry, family, files, img2img, lora, measure, records, resolved, units


def vae_scale_factor(model_path: str) -> int:
    """2 ** (number of VAE blocks - 1), read from vae/config.json as the pipeline does."""
    config = resolved.read_model_config(Path(model_path) / "vae" / "config.json")
    return 2 ** (len(config["block_out_channels"]) - 1)


def binned_size(sample_size: int, height: int, width: int, pipeline: str | None = None) -> tuple[int, int]:
    """The aspect-ratio bin the family's pipeline maps (height, width) to (pipeline step 1)."""
    try:
        return family.binned_size(pipeline, sample_size, height, width)
    except ValueError as exc:
        raise contract.JobFileError(f"denoise: {exc}; set use_resolution_binning = false in the job file") from None


def load_transformer(job: dict, device, strategy: str = "resident", items: list[dict] = ()):
    """The transformer placed as the plan says, with the LoRAs of `items` injected (inactive;
    stages/lora.py), and a factory for fresh schedulers of the class the model folder names.
    Returns (transformer, new_scheduler, streaming loader or None)."""
    import diffusers
    import torch
    from diffusers import PixArtTransformer2DModel

    path = resolved.component_root(job, "transformer")
    dtype = resolved.torch_dtype(job["dtype"])
    loader = None
    with entry.loading("denoise", path, "transformer"):
        if strategy == "offload" and device.type == "cpu":
            # On the CPU under a memory budget: the small modules stay resident, and each block's
            # weights are read from safetensors just before it runs and dropped after it.
            from stages.weights import streamed_model

            transformer, loader = streamed_model(PixArtTransformer2DModel, Path(path) / "transformer", "transformer_blocks", dtype, device)
            if any(item.get("loras") for item in items):  # blocks on meta: their adapters join each block's weights as it loads
                loader.adjust = lora.stream_adjuster(lora.apply_loras(transformer, items))
        else:
            from stages.weights import check_complete

            check_complete(PixArtTransformer2DModel, Path(path) / "transformer")
            transformer = PixArtTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype, use_safetensors=True
            ).eval()
            if any(item.get("loras") for item in items):  # before offloading, so the adapters move with their blocks
                lora.apply_loras(transformer, items)
            if strategy == "offload":
                # diffusers' group offloading: weights wait in host memory, one block at a time is
                # on the GPU, and the next block is copied on a side stream while this one computes.
                try:
                    transformer.enable_group_offload(
                        onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                        num_blocks_per_group=1, use_stream=device.type == "cuda",
                    )
                except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
                    raise contract.ResourceError(
                        f"denoise: diffusers group offloading failed ({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__}); "
                        f"it needs diffusers >= 0.33 (installed {diffusers.__version__}): upgrade diffusers, or raise --max-vram so "
                        f"the transformer stays resident"
                    ) from exc
            else:
                transformer.to(device)
    scheduler_path = resolved.component_root(job, "scheduler")
    scheduler_config = resolved.read_model_config(scheduler_path / "scheduler" / "scheduler_config.json")
    # The model's scheduler, or the job's override built from the model's scheduler config (as
    # `Class.from_config(pipe.scheduler.config)`).
    scheduler_class = getattr(diffusers, str(job.get("scheduler") or scheduler_config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise contract.JobFileError(
            f"denoise: {scheduler_path}/scheduler/scheduler_config.json names an unknown scheduler {scheduler_config.get('_class_name')!r}; "
            f"use a diffusers scheduler class such as DPMSolverMultistepScheduler"
        )
    torch.set_grad_enabled(False)
    return transformer, lambda: scheduler_class.from_config(scheduler_config), loader


def generate_latents(transformer, scheduler, embeds: list[dict], items: list[dict], height: int, width: int, scale: int, device, dtype,
                     pipeline: str | None = None, sources: list[dict] | None = None):
    """Denoise a batch of items that share size, steps and guidance; each keeps its own generator.
    Steps 4-7 of the family's pipeline `__call__` (stages/family.py says where α and Σ differ).
    `sources` (img2img, one per item: the posterior's `mean` and `std`, `scaling_factor`, and for
    inpainting `mask` [1, 1, h, w]) start from a picture as diffusers' img2img/inpaint pipelines do.
    Yield (step, total, latents [B, C, h, w]) after each step; the last yield is the result."""
    import inspect

    import torch
    from diffusers.utils.torch_utils import randn_tensor

    batch = len(items)
    guidance = items[0]["guidance_scale"]
    do_cfg = guidance > 1.0
    prompt_embeds = torch.cat([e["prompt_embeds"] for e in embeds]).to(device=device, dtype=dtype)  # [B, seq, dim]
    prompt_attention_mask = torch.cat([e["prompt_attention_mask"] for e in embeds]).to(device)  # [B, seq]
    if do_cfg:  # the pipeline's order: all negatives, then all prompts
        negative = torch.cat([e["negative_prompt_embeds"] for e in embeds]).to(device=device, dtype=dtype)
        prompt_embeds = torch.cat([negative, prompt_embeds])  # [2B, seq, dim]
        prompt_attention_mask = torch.cat([torch.cat([e["negative_prompt_attention_mask"] for e in embeds]).to(device), prompt_attention_mask])
    # 4. Prepare timesteps (custom ones set the step count, as in the pipeline).
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps

    custom = items[0].get("timesteps")
    timesteps, steps = retrieve_timesteps(scheduler, None if custom else items[0]["num_inference_steps"], device, custom)
    if sources:  # img2img: the schedule's tail, by strength (the pipeline's get_timesteps)
        timesteps, steps = img2img.get_timesteps(scheduler, steps, items[0]["strength"])
    # 5. Prepare latents: one CPU generator per item, so an image never depends on its neighbours.
    generators = [torch.Generator("cpu").manual_seed(item["seed"]) for item in items]
    generator = generators[0] if batch == 1 else generators
    channels = transformer.config.in_channels
    inpaint = bool(sources) and sources[0].get("mask") is not None
    if sources:  # the picture's latents sampled, then the noise, per generator; mixed as the pipelines do
        latents, image_latents, noise = img2img.prepare_latents(
            scheduler, sources, generators, (batch, channels, height // scale, width // scale), timesteps, sources[0]["scaling_factor"],
            inpaint, items[0]["strength"], device, dtype)
        mask = torch.cat([s["mask"] for s in sources]).to(device=device, dtype=dtype) if inpaint else None  # [B, 1, h, w]
    else:
        latents = randn_tensor((batch, channels, height // scale, width // scale), generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma  # [B, C, h, w]
    # 6. Prepare extra step kwargs (DPM-Solver takes the generator) and the micro-conditions.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    rules = family.of(pipeline)
    added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
    if transformer.config.sample_size == rules.micro_conditions_at:  # α at 128 only; Σ never
        rows = batch * (2 if do_cfg else 1)
        resolution = torch.tensor([height, width]).repeat(rows, 1).to(dtype=dtype, device=device)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(rows, 1).to(dtype=dtype, device=device)
        added_cond_kwargs = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    backends.place_position_table(transformer, height, width, scale, device)  # no float64 on MPS and XPU
    # 7. Denoising loop.
    if rules.set_begin_index and hasattr(scheduler, "set_begin_index") and not sources:  # α's pipeline does, Σ's does not; img2img set it
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
        out = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)
        # The 1-step rule: α's pipeline takes `[1]` when steps == 1 (LCM's denoised sample), which
        # raises IndexError for DPM-Solver (its step returns a 1-tuple): there we take `[0]`, the
        # previous sample, as Σ's pipeline always does (README: the one deliberate difference).
        latents = out[rules.one_step_index] if steps == 1 and len(out) > rules.one_step_index else out[0]
        if inpaint:  # keep what the mask keeps
            latents = img2img.blend_known(scheduler, latents, image_latents, noise, mask, timesteps, i)
        yield i + 1, len(timesteps), latents


def _source(job: dict, item: dict, posterior: Path, scale: int) -> dict:
    """An img2img item's start: the posterior's mean and std, the VAE's scaling factor, and the
    inpainting mask at the latent size (None without one)."""
    from safetensors.torch import load_file

    tensors = load_file(str(posterior))
    record, _ = records.read_record(posterior.with_suffix(".json"))
    config = resolved.read_model_config(resolved.component_root(job, "vae") / "vae" / "config.json")
    size = item["image_size"]
    mask = (img2img.preprocess_mask(img2img.read_picture("denoise", item, "mask_image"), size["height"], size["width"], scale)
            if item.get("mask_image") else None)
    return {"mean": tensors["mean"], "std": tensors["std"], "channels_last": bool(record and record.get("channels_last")),
            "scaling_factor": config.get("scaling_factor", 0.18215), "mask": mask}


def read_embeddings(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _batches(todo: list, items: dict, sizes: dict, batch_size: int) -> list[list]:
    """Groups of up to batch_size units whose items share size, steps and guidance (job order
    within a group; independence makes the order of groups irrelevant to the images)."""
    def shape_of(unit):
        item = items[unit.key]
        return (sizes[unit.key], item["num_inference_steps"], item["guidance_scale"], tuple(item.get("timesteps") or ()),
                item.get("strength") if item.get("init_image") else None, bool(item.get("mask_image")), lora.lora_set(item))

    order = {shape: n for n, shape in reversed(list(enumerate(map(shape_of, todo))))}
    groups: list[list] = []
    for unit in sorted(todo, key=lambda u: order[shape_of(u)]):
        shape = shape_of(unit)
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and last[0][0] == shape:
            last.append((shape, unit))
        else:
            groups.append([(shape, unit)])
    return [[unit for _, unit in group] for group in groups]


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    import torch
    from diffusers import PixArtTransformer2DModel  # noqa: F401  imported before the memory baseline
    from safetensors.torch import save_file

    device = entry.open_device(job)
    dtype = resolved.torch_dtype(job["dtype"])
    plan = job.get("runtime", {}).get("stages", {}).get("denoise", {})
    strategy, batch_size = plan.get("strategy", "resident"), max(1, plan.get("batch_size") or 1)
    items = {item["id"]: item for item in job["items"]}
    scale = vae_scale_factor(resolved.component_root(job, "vae"))
    sample_size = resolved.read_model_config(resolved.component_root(job, "transformer") / "transformer" / "config.json")["sample_size"]
    # Check every input before loading the model (diffusers' check_inputs comes first too).
    inputs, sizes = {}, {}
    width = artifacts.embedding_width(job, "transformer")
    pictures = {}
    for unit in todo:
        (upstream, key), *picture = unit.inputs
        inputs[unit.key] = units.verified_input(job_dir, "denoise", unit, upstream, key)
        if picture:  # img2img: the picture's posterior, and the mask read and checked now, before the model loads
            (p_stage, p_key), = picture
            pictures[unit.key] = units.verified_input(job_dir, "denoise", unit, p_stage, p_key)
            if items[unit.key].get("mask_image"):  # (the tensors load per batch: 10,000 posteriors would not fit)
                img2img.read_picture("denoise", items[unit.key], "mask_image")
        item = items[unit.key]
        # Names, dtype and [1, max_sequence_length, caption_channels] from the header, before any load.
        artifacts.require(inputs[unit.key][0], artifacts.embeddings_expected(units.encode_params(job, item), job["dtype"], width), lambda why: (
            f"denoise: {upstream}/{key}.safetensors (item {unit.key}) is not what denoise expects: {why}; run `orchestrate run JOB.toml --force encode` "
            f"or delete it and run again"))
        # 1. Resolution binning: the latents are made at the bin; decode resizes back.
        sizes[unit.key] = (binned_size(sample_size, item["height"], item["width"], job.get("pipeline"))
                           if item["use_resolution_binning"] else (item["height"], item["width"]))
    clock = measure.Clock()
    host_rss_at_start = measure.reset_peak_memory(device)
    with entry.oom_guard(job, *todo):  # loading can run out of memory too
        transformer, new_scheduler, loader = load_transformer(job, device, strategy, [items[unit.key] for unit in todo])
    backends.use_chunked_attention(transformer, plan.get("attention_chunk"))  # the plan's, where the backend has no fused kernel
    load_seconds = clock.seconds()
    context = records.record_context(job, "denoise", device)
    log.info("denoise: %d items, strategy %s, batch size %d", len(todo), strategy, batch_size)
    progress = entry.Progress("denoise", len(todo), log)
    done = 0
    for group in _batches(todo, items, sizes, batch_size):
        started = measure.Clock()
        height, width = sizes[group[0].key]
        group_items = [items[unit.key] for unit in group]
        embeds = [read_embeddings(inputs[unit.key][0]) for unit in group]
        sources = [_source(job, items[unit.key], pictures[unit.key][0], scale) for unit in group] if group[0].key in pictures else None
        name = group[0].key if len(group) == 1 else f"{group[0].key} +{len(group) - 1}"
        bar = None
        if progress.bar is not None:  # the steps of this item, under the stage's bar
            from tqdm import tqdm

            bar = tqdm(total=group_items[0]["num_inference_steps"], desc=f"  {name}", leave=False, position=1)
        latents = None
        if any(item.get("loras") for item in items.values()):
            lora.activate(transformer, lora.lora_set(group_items[0]))  # a batch shares its LoRA set (_batches)
        with entry.oom_guard(job, *group):
            for step, total, latents in generate_latents(transformer, new_scheduler(), embeds, group_items, height, width, scale, device, dtype,
                                                         job.get("pipeline"), sources):
                if bar is not None:
                    bar.update()
                elif step == total or step % max(1, total // 4) == 0:
                    progress.note("denoise: %s step %d/%d", name, step, total)
        if bar is not None:
            bar.close()
        latents = latents.to("cpu")
        for b, unit in enumerate(group):
            item = items[unit.key]
            one = latents[b : b + 1].contiguous().clone()  # [1, C, h, w]
            in_path, in_hash = inputs[unit.key]
            out = job_dir / "denoise" / f"{unit.key}.safetensors"
            files.publish(out, lambda tmp: save_file({"latents": one}, str(tmp), metadata=files.safetensors_metadata("denoise", unit.key)))
            records.write_record(unit.record_path(job_dir), {
                "stage": "denoise",
                "key": unit.key,
                "items": [unit.key],
                "params": unit.params,
                "inputs": {f"encode/{in_path.name}": in_hash,
                           **({f"imagencode/{pictures[unit.key][0].name}": pictures[unit.key][1]} if unit.key in pictures else {})},
                "outputs": {out.name: records.output_entry(out, one.shape, one.dtype)},
                "requested_size": {"height": item["height"], "width": item["width"]},
                "binned_size": {"height": height, "width": width},
                "latent_shape": list(one.shape),
                "vae_scale_factor": scale,
                "seed": item["seed"],
                "strategy": {"strategy": strategy, "batch_size": batch_size, "batched_with": len(group)},
                **context,
                "seconds": round(started.seconds() / len(group), 3),
                "peak": measure.peak_memory(device),
            })
        done += len(group)
        progress.item(len(group), "denoise: %d/%d %s %dx%d %.2f s", done, len(todo), name, width, height, started.seconds())
    progress.close()
    summary = {"load_seconds": load_seconds, "peak": measure.peak_memory(device), "host_rss_at_start_bytes": host_rss_at_start, "strategy": strategy, "batch_size": batch_size}
    if loader is not None:
        loader.close()
        summary.update(weight_bytes_moved=loader.bytes_moved, peak_resident_weight_bytes=loader.peak_resident)
    return summary


def main(argv: list[str] | None = None) -> int:
    return entry.stage_main("denoise", make_units, argv, imports=("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "diffusers.models.transformers.pixart_transformer_2d", "safetensors.torch"))


if __name__ == "__main__":
    sys.exit(main())
