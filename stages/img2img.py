"""img2img and inpainting around PixArt's loop: pictures to tensors, the strength's timesteps, the start latents and the mask blend.

No model here: imagencode (the VAE's encoder) and denoise (the transformer) call these, so both
stages do exactly what diffusers' `StableDiffusionImg2ImgPipeline` and, for a 4-channel model,
`StableDiffusionInpaintPipeline` do (their `get_timesteps`, `prepare_latents` and the loop's blend),
step for step; docs/img2img.md lists the steps.
"""

from __future__ import annotations

from pathlib import Path

from stages import contract, files

# The stages re-read a picture the job file named; the orchestrator checked it is at most this big.
MAX_PICTURE_BYTES = 64 << 20


def read_picture(stage: str, item: dict, key: str):
    """The item's start picture (`init_image`) or mask (`mask_image`) as a PIL image, after checking
    its content is the one the job was resolved with (its hash is in the params)."""
    import io

    from PIL import Image

    path = Path(item[key])
    fix = f"run `orchestrate run` on the job file again so that the items using {path.name} are planned for its new content"
    try:
        data = files.read_bytes_limited(path, MAX_PICTURE_BYTES, f"{stage}: {key.replace('_', ' ')}", contract.ArtifactError, fix)
    except FileNotFoundError:
        raise contract.ArtifactError(f"{stage}: {key.replace('_', ' ')} {path} of item {item['id']} is gone; put it back, or {fix}") from None
    if files.sha256_bytes(data) != item[f"{key}_sha256"]:
        raise contract.ArtifactError(f"{stage}: {key.replace('_', ' ')} {path} changed since the job was resolved; {fix}")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def preprocess_image(image, height: int, width: int, scale: int):
    """`VaeImageProcessor.preprocess(image, height, width)` as both pipelines call it: resized
    (Lanczos), to [-1, 1]. RGB first: a PNG with alpha would otherwise have 4 channels. [1, 3, H, W]"""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=scale).preprocess(image.convert("RGB"), height=height, width=width)


def preprocess_mask(image, height: int, width: int, scale: int):
    """The inpaint pipeline's mask: its mask processor (grayscale, binarized, not normalized), then
    `prepare_mask_latents`' nearest resize to the latent size. [1, 1, H/f, W/f], 1 = repaint."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask = processor.preprocess(image, height=height, width=width)  # [1, 1, H, W]
    return torch.nn.functional.interpolate(mask, size=(height // scale, width // scale))


def get_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The img2img pipeline's `get_timesteps`: the schedule's last `int(steps * strength)` steps,
    the scheduler told where it begins. Returns (timesteps, steps run)."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, num_inference_steps - t_start


def prepare_latents(scheduler, posteriors: list[dict], generators: list, shape: tuple, timesteps, scaling_factor: float,
                    inpaint: bool, strength: float, device, dtype):
    """The pipelines' `prepare_latents`. Per item, with its own generator and in this order: the
    image latents `latent_dist.sample(generator) * scaling_factor` from the stored mean and std,
    then the noise. Start latents: `add_noise(image_latents, noise, timesteps[:1])`; inpainting at
    strength 1 starts from pure noise x `init_noise_sigma`, as its pipeline. Returns (latents,
    image_latents, noise), each [B, C, h, w]."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    image_latents = []
    for posterior, generator in zip(posteriors, generators):
        mean, std = posterior["mean"].to(device), posterior["std"].to(device)  # [1, C, h, w]
        if posterior.get("channels_last"):
            # The VAE gave its posterior in channels-last layout (oneDNN convolutions on the CPU do);
            # the pipelines' latents keep that layout into the transformer, whose kernels then
            # round differently: restore it so the bits are the pipelines'.
            mean, std = mean.to(memory_format=torch.channels_last), std.to(memory_format=torch.channels_last)
        # DiagonalGaussianDistribution.sample: mean + std * randn in the parameters' dtype.
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        image_latents.append(scaling_factor * sample)
    # One generator: the pipelines encode the batch at once (no cat); a list: one by one, then cat.
    image_latents = (image_latents[0] if len(image_latents) == 1 else torch.cat(image_latents, dim=0)).to(device=device, dtype=dtype)
    if inpaint:  # the inpaint pipeline's `image_latents.repeat(batch_size // n, 1, 1, 1)`: a contiguous copy
        image_latents = image_latents.repeat(shape[0] // image_latents.shape[0], 1, 1, 1)
    generator = generators[0] if len(generators) == 1 else generators
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if inpaint and strength == 1.0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(shape[0]))
    return latents, image_latents, noise


def blend_known(scheduler, latents, image_latents, noise, mask, timesteps, i: int):
    """The inpaint loop's step end (4-channel model): outside the mask the latents become the
    image latents noised to the next timestep (unnoised after the last step)."""
    import torch

    init_latents_proper = image_latents
    if i < len(timesteps) - 1:
        init_latents_proper = scheduler.add_noise(init_latents_proper, noise, torch.tensor([timesteps[i + 1]]))
    return (1 - mask) * init_latents_proper + mask * latents
