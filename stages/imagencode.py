"""Imagencode stage: start pictures (img2img, inpainting) -> the VAE posterior's mean and std.

Reads:  <job_dir>/job.resolved.json and each item's picture (`init_image`, checked against the hash
        the job was resolved with)
Writes: <job_dir>/imagencode/<key>.safetensors (`mean`, `std` [1, C, H/f, W/f]) and <key>.json,
        one per distinct (picture content, size, VAE, dtype, tiling), shared by every item using it
Loads:  AutoencoderKL only, and drops its decoder after loading (the encoder runs).

Example: python -m stages.imagencode workdir/beach

Matches what diffusers' img2img and inpaint pipelines do before sampling: the picture through
`VaeImageProcessor.preprocess(image, height, width)` (the binned size with binning on), then
`vae.encode(image).latent_dist`. Sampling needs the item's generator, so denoise does it from the
stored mean and std (stages/img2img.py), drawing exactly what `latent_dist.sample(generator)` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import backends, entry, files, img2img, measure, records, resolved


def load_encoder(job: dict, device, tile_size: int | None = None):
    """The VAE without its decoder; with `tile_size`, diffusers' tiled encoding (as decode tiles)."""
    from stages.decode import load_vae

    vae = load_vae(job, device, tile_size)
    vae.decoder = None  # never called by encode(); frees its weights
    vae.post_quant_conv = None
    return vae


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    from diffusers import AutoencoderKL  # noqa: F401  imported before the memory baseline
    from safetensors.torch import save_file

    device = entry.open_device(job)
    dtype = resolved.torch_dtype(job["dtype"])
    items = {item["id"]: item for item in job["items"]}
    vae_config = resolved.read_model_config(resolved.component_root(job, "vae") / "vae" / "config.json")
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    # Every picture is read and checked before the VAE loads (a changed file is one line, exit 2).
    pictures = {unit.key: img2img.read_picture("imagencode", items[unit.items[0]], "init_image") for unit in todo}
    plan = job.get("runtime", {}).get("stages", {}).get("decode", {})  # the VAE's plan: encoding is no heavier than decoding
    tile_size = plan.get("tile_size") if plan.get("strategy") == "tiled" else None
    clock = measure.Clock()
    host_rss_at_start = measure.reset_peak_memory(device)
    with entry.oom_guard(job, *todo):
        vae = load_encoder(job, device, tile_size)
    backends.use_chunked_attention(vae, plan.get("attention_chunk"))
    load_seconds = clock.seconds()
    log.info("imagencode: %d pictures, %s", len(todo), f"tiled, {tile_size} px tiles" if tile_size else "untiled")
    context = records.record_context(job, "decode", device)  # the VAE's files decide both stages
    progress = entry.Progress("imagencode", len(todo), log)
    for n, unit in enumerate(todo, 1):
        started = measure.Clock()
        height, width = unit.params["height"], unit.params["width"]
        with entry.oom_guard(job, unit):
            image = img2img.preprocess_image(pictures[unit.key], height, width, scale).to(device=device, dtype=dtype)  # [1, 3, H, W]
            posterior = vae.encode(image).latent_dist
            # (a channel slice of the VAE's moments: channels innermost, but not dense)
            channels_last = posterior.mean.shape[1] > 1 and posterior.mean.stride(1) == 1
            tensors = {"mean": posterior.mean.to("cpu").contiguous().clone(), "std": posterior.std.to("cpu").contiguous().clone()}  # [1, C, H/f, W/f]
        out = job_dir / "imagencode" / f"{unit.key}.safetensors"
        files.publish(out, lambda tmp: save_file(tensors, str(tmp), metadata=files.safetensors_metadata("imagencode", unit.key)))
        source = Path(items[unit.items[0]]["init_image"])
        records.write_record(unit.record_path(job_dir), {
            "stage": "imagencode",
            "key": unit.key,
            "items": list(unit.items),
            "params": unit.params,
            "inputs": {str(source): unit.params["init_image_sha256"]},
            "outputs": {out.name: records.output_entry(out, tensors["mean"].shape, tensors["mean"].dtype)},
            "latent_shape": list(tensors["mean"].shape),
            "vae_scale_factor": scale,
            # The posterior's memory layout as the VAE gave it (safetensors stores it contiguous):
            # denoise restores it, since the pipelines' latents carry it into the transformer.
            "channels_last": channels_last,
            "scaling_factor": vae_config.get("scaling_factor", 0.18215),
            "strategy": {"strategy": "tiled" if tile_size else "full", "tile_size": tile_size},
            **context,
            "seconds": started.seconds(),
            "peak": measure.peak_memory(device),
        })
        progress.item(1, "imagencode: %d/%d %s -> %s %.2f s", n, len(todo), source.name, out.relative_to(job_dir), started.seconds())
    progress.close()
    return {"load_seconds": load_seconds, "peak": measure.peak_memory(device), "host_rss_at_start_bytes": host_rss_at_start}


def main(argv: list[str] | None = None) -> int:
    return entry.stage_main("imagencode", make_units, argv,
                            imports=("diffusers.models.autoencoders.autoencoder_kl", "diffusers.image_processor", "safetensors.torch"))


if __name__ == "__main__":
    sys.exit(main())
