"""Decode stage: latents -> PNG images.

Reads:  <job_dir>/job.resolved.json, <job_dir>/denoise/<item>.safetensors and its record (latent
        shape, VAE scale factor, requested and binned sizes)
Writes: <job_dir>/decode/<item>.png (generation parameters in PNG text chunks), <item>.thumb.webp (at
        most 256 px, for the gallery's grid) and <item>.json
Loads:  AutoencoderKL only.

Example: python -m stages.decode workdir/beach

Matches `PixArtAlphaPipeline.__call__` after the loop: `vae.decode(latents / scaling_factor)`, then,
with resolution binning, `resize_and_crop_tensor` on the float tensor back to the requested size
(resizing the PIL image instead is off by up to 51 levels), then `postprocess`.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from stages import artifacts, backends, contract, entry, files, measure, records, resolved, units


def load_vae(job: dict, device, tile_size: int | None = None):
    """The VAE; with `tile_size`, diffusers' tiled decoding over tiles of that many pixels
    (25% overlap, blended), which bounds activation memory but changes pixels slightly."""
    import torch
    from diffusers import AutoencoderKL

    root = resolved.component_root(job, "vae")
    with entry.loading("decode", root, "vae"):
        from stages.weights import check_complete

        check_complete(AutoencoderKL, Path(root) / "vae")
        vae = AutoencoderKL.from_pretrained(
            root, subfolder="vae", torch_dtype=resolved.torch_dtype(job["dtype"]), use_safetensors=True
        ).to(device).eval()
    if tile_size:
        set_tiling(vae, tile_size)
    torch.set_grad_enabled(False)
    return vae


def set_tiling(vae, tile_size: int | None) -> None:
    """diffusers' tiled decoding over tiles of `tile_size` pixels, or none."""
    if tile_size:
        vae.enable_tiling()
        vae.tile_sample_min_size = tile_size
        vae.tile_latent_min_size = tile_size // 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        vae.disable_tiling()


def decode_latents(vae, latents, denoise_record: dict, retry_tile_size: int | None = None, log=None):
    """(PIL image at the requested size, whether the VAE was upcast) for one item's latents
    [1, C, h, w]. A 16-bit VAE can overflow (the SDXL VAE does in fp16; the pipelines ignore
    `force_upcast`) and decode NaN/inf, which would be a black image: that item is decoded again
    with the VAE in float32 (tiled as the plan's `upcast_retry` says), and the caller records it."""
    import torch
    from diffusers.image_processor import PixArtImageProcessor

    processor = PixArtImageProcessor(vae_scale_factor=denoise_record["vae_scale_factor"])
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]  # [1, 3, H, W]
    upcast = not torch.isfinite(image).all() and vae.dtype != torch.float32
    if upcast:
        if log is not None:
            log.warning("decode: %s overflowed in %s (NaN/inf); decoding it again with the VAE in float32", denoise_record["key"],
                        str(vae.dtype).replace("torch.", ""))
        dtype, tile_size = vae.dtype, vae.tile_sample_min_size if vae.use_tiling else None
        vae.to(torch.float32)  # 16-bit values are exact in float32, and back again
        set_tiling(vae, retry_tile_size)
        try:
            image = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            vae.to(dtype)
            set_tiling(vae, tile_size)
    if not torch.isfinite(image).all():
        raise contract.ArtifactError(
            f"decode: item {denoise_record['key']} decodes to NaN/inf even with the VAE in float32: its latents are broken; "
            f"remake them with `orchestrate run JOB.toml --force denoise`"
        )
    if denoise_record["params"]["use_resolution_binning"]:
        requested = denoise_record["requested_size"]
        image = processor.resize_and_crop_tensor(image, requested["width"], requested["height"])
    return processor.postprocess(image, output_type="pil")[0], upcast


def png_bytes(image, metadata: dict) -> bytes:
    """PNG with one text chunk per generation parameter, plus them all as JSON under 'pixart'."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in sorted(metadata.items()):
        info.add_text(key, json.dumps(value) if not isinstance(value, str) else value)
    info.add_text("pixart", files.canonical_json(metadata))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# The gallery grid's thumbnails: at most this many pixels a side (the grid's cards are about 220 px
# wide), WebP at this quality: a few KB each, so 10,000 of them load as fast as one page of PNGs.
THUMBNAIL_SIZE = 256
THUMBNAIL_QUALITY = 80


def thumbnail_bytes(image) -> bytes:
    """The image shrunk to fit THUMBNAIL_SIZE (never enlarged), as WebP; PIL's encoder gives the
    same bytes for the same pixels, so a remade thumbnail keeps its hash."""
    from PIL import Image

    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buffer.getvalue()


def publish_thumbnail(job_dir: Path, unit, image) -> tuple[Path, tuple]:
    """Write the unit's thumbnail beside its PNG: (path, its [height, width, 3] shape)."""
    from PIL import Image

    path = job_dir / "decode" / units.thumbnail_name(unit.key)
    data = thumbnail_bytes(image)
    files.publish_bytes(path, data)
    with Image.open(io.BytesIO(data)) as small:
        return path, (small.height, small.width, 3)


def add_missing_thumbnails(job_dir: Path, todo: list, log) -> list:
    """Units decoded by a version without thumbnails (all else up to date) get theirs from the PNG
    on disk, and their record lists it; no VAE is loaded for them. Returns the units still to do."""
    from dataclasses import replace

    from PIL import Image

    rest = []
    for unit in todo:
        ok, _ = units.unit_status(job_dir, replace(unit, outputs=unit.outputs[:1]))  # up to date as the older version saw it
        if not ok:
            rest.append(unit)
            continue
        record, _ = records.read_record(unit.record_path(job_dir))
        with Image.open(job_dir / "decode" / unit.outputs[0]) as image:
            path, shape = publish_thumbnail(job_dir, unit, image)
        outputs = dict(record["outputs"], **{path.name: records.output_entry(path, shape, "uint8")})
        records.write_record(unit.record_path(job_dir), {k: v for k, v in record.items() if k not in ("checksum", "format")} | {"outputs": outputs})
        log.info("decode: %s: thumbnail added to an image made without one", unit.key)
    return rest


def _decode_fields(denoise_record: dict) -> dict:
    """What decode uses of a denoise record (decode_latents, artifacts.latents_expected): all
    records are checked before the VAE loads, and whole ones were 10 KB each, +23% of the
    stage's peak RSS at 10,000 items (issue 21)."""
    params = denoise_record.get("params") or {}
    return {"key": denoise_record.get("key"), "vae_scale_factor": denoise_record.get("vae_scale_factor"),
            "binned_size": denoise_record.get("binned_size"), "requested_size": denoise_record.get("requested_size"),
            "params": {"use_resolution_binning": params.get("use_resolution_binning")}}


def make_units(job: dict, job_dir: Path, todo: list, log) -> dict:
    import torch
    from diffusers import AutoencoderKL  # noqa: F401  imported before the memory baseline
    from diffusers.image_processor import PixArtImageProcessor  # noqa: F401
    from safetensors.torch import load_file

    device = entry.open_device(job)
    dtype = resolved.torch_dtype(job["dtype"])
    todo = add_missing_thumbnails(job_dir, todo, log)
    if not todo:
        return {"load_seconds": 0.0, "peak": measure.peak_memory(device), "vae_upcasts": 0}
    inputs = {}
    for unit in todo:
        (upstream, key), = unit.inputs
        path, digest = units.verified_input(job_dir, "decode", unit, upstream, key)
        record, _ = records.read_record(job_dir / upstream / f"{key}.json")
        inputs[unit.key] = (path, digest, _decode_fields(record))
    vae_config = resolved.read_model_config(resolved.component_root(job, "vae") / "vae" / "config.json")
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    for unit in todo:
        path, _, record = inputs[unit.key]
        if record.get("vae_scale_factor") != scale:
            raise contract.ArtifactError(
                f"decode: item {unit.key} was denoised for a VAE scale factor of {record.get('vae_scale_factor')}, "
                f"but {resolved.component_root(job, 'vae')}/vae has {scale}; rerun denoise with `orchestrate stage denoise JOB.toml`"
            )
        # Names, dtype and [1, C, h/f, w/f] from the header, before the VAE loads.
        artifacts.require(path, artifacts.latents_expected(record, vae_config.get("latent_channels"), scale), lambda why: (
            f"decode: denoise/{path.name} (item {unit.key}) is not what decode expects: {why}; run `orchestrate run JOB.toml --force denoise` "
            f"or delete it and run again"))
    plan = job.get("runtime", {}).get("stages", {}).get("decode", {})
    tile_size = plan.get("tile_size") if plan.get("strategy") == "tiled" else None
    retry_tile_size = (plan.get("upcast_retry") or {}).get("tile_size", tile_size)
    upcasts = 0
    clock = measure.Clock()
    host_rss_at_start = measure.reset_peak_memory(device)
    with entry.oom_guard(job, *todo):  # loading can run out of memory too
        vae = load_vae(job, device, tile_size)
    backends.use_chunked_attention(vae, plan.get("attention_chunk"))  # the mid-block's, where the backend has no fused kernel
    log.info("decode: %d items, %s", len(todo), f"tiled, {tile_size} px tiles" if tile_size else "untiled")
    load_seconds = clock.seconds()
    context = records.record_context(job, "decode", device)
    progress = entry.Progress("decode", len(todo), log)
    for n, unit in enumerate(todo, 1):
        started = measure.Clock()
        in_path, in_hash, denoise_record = inputs[unit.key]
        with entry.oom_guard(job, unit):
            latents = load_file(str(in_path))["latents"].to(device=device, dtype=dtype)  # [1, C, h, w]
            image, upcast = decode_latents(vae, latents, denoise_record, retry_tile_size, log)
        upcasts += upcast
        used_tile = retry_tile_size if upcast else tile_size
        out = job_dir / "decode" / f"{unit.key}.png"
        metadata = dict(unit.params["metadata"], vae_tiling=f"{used_tile} px" if used_tile else "off")
        if upcast:
            metadata["vae_upcast"] = f"float32 ({job['dtype']} overflowed)"
        files.publish_bytes(out, png_bytes(image, metadata))
        thumb, thumb_shape = publish_thumbnail(job_dir, unit, image)
        records.write_record(unit.record_path(job_dir), {
            "stage": "decode",
            "key": unit.key,
            "items": [unit.key],
            "params": unit.params,
            "inputs": {f"denoise/{in_path.name}": in_hash},
            "outputs": {out.name: records.output_entry(out, (image.height, image.width, 3), "uint8"),
                        thumb.name: records.output_entry(thumb, thumb_shape, "uint8")},
            "tiled": bool(used_tile),
            "strategy": {"strategy": "tiled" if used_tile else "full", "tile_size": used_tile},
            "vae_upcast": upcast,
            **context,
            "seconds": started.seconds(),
            "peak": measure.peak_memory(device),
        })
        progress.item(1, "decode: %d/%d %s -> %s %.2f s", n, len(todo), unit.key, out.relative_to(job_dir), started.seconds())
    progress.close()
    return {"load_seconds": load_seconds, "peak": measure.peak_memory(device), "host_rss_at_start_bytes": host_rss_at_start,
            "vae_upcasts": upcasts}


def main(argv: list[str] | None = None) -> int:
    return entry.stage_main("decode", make_units, argv, imports=("diffusers.models.autoencoders.autoencoder_kl", "diffusers.image_processor", "safetensors.torch", "PIL.PngImagePlugin"))


if __name__ == "__main__":
    sys.exit(main())
