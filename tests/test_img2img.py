"""img2img and inpainting (issue 20): the stages' latents equal, bit for bit on CPU float32, a
reference loop assembled in this file from diffusers' own pieces (PixArt's loop, the img2img
pipeline's `get_timesteps` and `retrieve_latents`, the inpaint pipeline's mask processing and
blend); the reference is first shown to reproduce the plain PixArt pipelines bit for bit. Also:
pictures are checked before anything runs, replacing one remakes exactly its items, and a
text-only job never sees the fourth stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import resolved_items, run_inprocess, write_job


@pytest.fixture(scope="module")
def tiny_sigma(tmp_path_factory):
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "sigma", family="sigma", sample_size=128)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 140x100 noisy photo, a second picture of another size, and a mask of the photo's size."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)).save(folder / "photo.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "other.webp", lossless=True)
    mask = np.zeros((100, 140), dtype=np.uint8)
    mask[20:70, 30:100] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def load_pipe(path, sigma: bool, scheduler: str | None = None):
    import diffusers

    pipe = (diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline).from_pretrained(path)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()  # as the pipelines run (the attention kernel may differ with autograd on)
def reference_latents(pipe, item: dict, image=None, mask=None, strength: float = 1.0) -> torch.Tensor:
    """PixArt's `__call__` steps 2-7 with diffusers' img2img / inpaint pieces around them."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionImg2ImgPipeline
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from diffusers.utils.torch_utils import randn_tensor

    alpha = isinstance(pipe, PixArtAlphaPipeline)
    height, width, guidance = item["height"], item["width"], item["guidance_scale"]
    do_cfg = guidance > 1.0
    embeds, attention, negative, negative_attention = pipe.encode_prompt(
        item["prompt"], do_cfg, negative_prompt=item["negative_prompt"], device="cpu", clean_caption=True,
        max_sequence_length=120 if alpha else 300)
    if do_cfg:
        embeds, attention = torch.cat([negative, embeds]), torch.cat([negative_attention, attention])
    scheduler = pipe.scheduler
    timesteps, steps = retrieve_timesteps(scheduler, item["num_inference_steps"], "cpu")
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    shape = (1, pipe.transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    if image is None:
        latents = randn_tensor(shape, generator=generator, device="cpu", dtype=torch.float32) * scheduler.init_noise_sigma
    else:
        timesteps, steps = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
        init = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(image, height=height, width=width)
        image_latents = pipe.vae.config.scaling_factor * retrieve_latents(pipe.vae.encode(init), generator=generator)
        if mask is not None:  # the inpaint pipeline's prepare_latents repeats them to the batch (a copy)
            image_latents = image_latents.repeat(1, 1, 1, 1)
        noise = randn_tensor(shape, generator=generator, device="cpu", dtype=torch.float32)
        if mask is not None and strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(1))
        if mask is not None:
            processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
            mask = torch.nn.functional.interpolate(processor.preprocess(mask, height=height, width=width), size=shape[2:])
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    added = {"resolution": None, "aspect_ratio": None}
    if alpha and pipe.transformer.config.sample_size == 128:
        rows = 2 if do_cfg else 1
        added = {"resolution": torch.tensor([height, width]).repeat(rows, 1).float(),
                 "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).float()}
    if alpha and image is None:
        scheduler.set_begin_index(0)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        noise_pred = pipe.transformer(model_input, encoder_hidden_states=embeds, encoder_attention_mask=attention,
                                      timestep=t[None].expand(model_input.shape[0]), added_cond_kwargs=added, return_dict=False)[0]
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (text - uncond)
        noise_pred = noise_pred.chunk(2, dim=1)[0]  # learned sigma
        out = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)
        # α's 1-step `[1]` (LCM's denoised sample); DPM-Solver returns a 1-tuple, where the project
        # takes `[0]` as Σ does (README: its one deliberate difference, tests/test_parity.py).
        latents = out[1] if alpha and steps == 1 and len(out) > 1 else out[0]
        if mask is not None:
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(proper, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - mask) * proper + mask * latents
    return latents


def stage_latents(job_dir, item: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(job_dir / "denoise" / f"{item['id']}.safetensors")["latents"]


ITEM = {"prompt": "a cat on a wall", "negative_prompt": "", "width": 128, "height": 96, "guidance_scale": 4.5, "num_inference_steps": 5, "seed": 7}


@pytest.mark.parametrize("sigma", [False, True], ids=["alpha", "sigma"])
def test_reference_loop_reproduces_the_plain_pipeline(tiny_model, tiny_sigma, sigma):
    pipe = load_pipe(tiny_sigma if sigma else tiny_model, sigma)
    theirs = pipe(ITEM["prompt"], width=128, height=96, num_inference_steps=5, use_resolution_binning=False, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(7)).images
    assert torch.equal(reference_latents(pipe, ITEM), theirs)


HEAD = """
[job]
name = "{name}"
model = "{model}"
{scheduler}
[defaults]
num_inference_steps = {steps}
width = 128
height = 96
use_resolution_binning = false
"""

# (strength, picture, mask, guidance): six items share photo.png; the last item has no picture.
GENERATIONS = [(0.3, "photo.png", None, 4.5), (0.6, "photo.png", None, 1.0), (1.0, "photo.png", None, 4.5),
               (0.6, "photo.png", "mask.png", 4.5), (1.0, "photo.png", "mask.png", 4.5), (0.6, "photo.png", "mask.png", 1.0),
               (0.6, "other.webp", None, 4.5),
               (None, None, None, 4.5)]


def job_body(model, pictures, generations, scheduler=None, steps=5, name="i2i") -> str:
    body = HEAD.format(name=name, model=model, scheduler=f'scheduler = "{scheduler}"' if scheduler else "", steps=steps)
    for seed, (strength, picture, mask, guidance) in enumerate(generations, 1):
        body += f'[[generation]]\nprompt = "a cat on a wall"\nseed = {seed}\nguidance_scale = {guidance}\n'
        if picture:
            body += f'image = "{pictures / picture}"\nstrength = {strength}\n'
        if mask:
            body += f'mask = "{pictures / mask}"\n'
    return body


def run_job_and_compare(tmp_path, model, pictures, sigma: bool, generations, scheduler: str | None = None, steps=5) -> dict:
    from PIL import Image

    job_dir, _, lines = run_inprocess(write_job(tmp_path, job_body(model, pictures, generations, scheduler, steps)), tmp_path / "work")
    pipe = load_pipe(model, sigma, scheduler)
    items = resolved_items(job_dir)
    assert len(items) == len(generations)
    for item in items:
        picture = Image.open(item["init_image"]).convert("RGB") if item.get("init_image") else None
        mask = Image.open(item["mask_image"]) if item.get("mask_image") else None
        theirs = reference_latents(pipe, item, picture, mask, item.get("strength", 1.0))
        assert torch.equal(stage_latents(job_dir, item), theirs), item["id"]
    return {"job_dir": job_dir, "lines": lines}


@pytest.mark.parametrize("sigma", [False, True], ids=["alpha", "sigma"])
def test_img2img_and_inpainting_match_diffusers_bit_for_bit(tiny_model, tiny_sigma, pictures, tmp_path, sigma):
    """Strengths 0.3, 0.6, 1.0, with and without a mask, six items sharing one picture."""
    run = run_job_and_compare(tmp_path, tiny_sigma if sigma else tiny_model, pictures, sigma, GENERATIONS)
    job_dir = run["job_dir"]
    # Two pictures -> two posteriors; the photo's is shared by the five items that use it.
    records = [json.loads(p.read_text()) for p in (job_dir / "imagencode").glob("*.json") if p.name != "summary.json"]
    assert sorted(len(r["items"]) for r in records) == [1, 6]
    assert "imagencode: 0 up to date, 2 to do" in run["lines"]
    # Each stage process plans its own units only (plan_units' `only`): the same units as the whole plan's.
    from stages.resolved import read_job
    from stages.units import plan_units

    job = read_job(job_dir)
    full = plan_units(job)
    assert all(full.values())
    for stage, units in full.items():
        assert plan_units(job, only=stage) == {**{other: [] for other in full}, stage: units}, stage


def test_lcm_with_an_image(tiny_model, pictures, tmp_path):
    """LCM from a picture: 4 steps at 0.6 run 2; at 2 steps x 0.6 one step runs, where α's rule
    takes LCM's denoised sample (`step()[1]`)."""
    lcm = [(0.6, "photo.png", None, 0.0), (0.6, "photo.png", "mask.png", 0.0)]
    run_job_and_compare(tmp_path, tiny_model, pictures, False, lcm, "LCMScheduler", steps=4)
    (tmp_path / "one").mkdir()
    run_job_and_compare(tmp_path / "one", tiny_model, pictures, False, lcm, "LCMScheduler", steps=2)


def _picture(path, size=(64, 64), seed=0):
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


SMALL = 'width = 64\nheight = 64\nuse_resolution_binning = false\nnum_inference_steps = 2\n'

BAD_PICTURES = [
    ("missing", 'image = "nope.png"\n', ["image", "nope.png does not exist", "PNG, JPEG or WebP"]),
    ("folder", 'image = "pics"\n', ["image", "is a folder, not a regular file"]),
    ("not-a-picture", 'image = "text.png"\n', ["image", "text.png is not a readable picture", "PNG, JPEG or WebP"]),
    ("truncated", 'image = "cut.png"\n', ["image", "cut.png is not a readable picture"]),
    ("gif", 'image = "anim.gif"\n', ["image", "is a GIF file", "PNG, JPEG or WebP"]),
    ("mask-other-size", 'image = "a.png"\nmask = "small.png"\n', ["mask 'small.png' is 32x32 but image 'a.png' is 64x64", "of the image's size"]),
    ("mask-without-image", 'mask = "a.png"\n', ["'mask' needs an 'image'"]),
    ("strength-zero", 'image = "a.png"\nstrength = 0\n', ["'strength' = 0.0 is out of range", "above 0 and at most 1"]),
    ("strength-above-one", 'image = "a.png"\nstrength = 1.5\n', ["'strength' = 1.5 is out of range"]),
    ("strength-no-step", 'image = "a.png"\nstrength = 0.4\n', ["'strength' = 0.4", "num_inference_steps x strength is at least 1"]),
    ("strength-string", 'image = "a.png"\nstrength = "high"\n', ["'strength' must be a float", "strength = 0.8"]),
]


@pytest.mark.parametrize(("fields", "expected"), [c[1:] for c in BAD_PICTURES], ids=[c[0] for c in BAD_PICTURES])
def test_bad_pictures_exit_2_with_one_line_before_anything_runs(tiny_model, tmp_path, fields, expected):
    from PIL import Image

    from tests.test_jobfile import assert_one_line_error, run_cli

    _picture(tmp_path / "a.png")
    _picture(tmp_path / "small.png", (32, 32))
    (tmp_path / "pics").mkdir()
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    Image.new("RGB", (64, 64)).save(tmp_path / "anim.gif")
    job_file = write_job(tmp_path, f'[job]\nmodel = "{tiny_model}"\n[[generation]]\nprompt = "a red apple"\n{SMALL}{fields}')
    assert_one_line_error(run_cli(tmp_path, job_file, []), expected)


def test_replacing_a_picture_remakes_exactly_the_items_using_it(tiny_model, tmp_path):
    """Two items share a.png, one uses b.png (with a mask), one has none: a new a.png remakes a's
    posterior and its two items; the PNGs' metadata names picture, hash and strength."""
    from PIL import Image

    _picture(tmp_path / "a.png")
    _picture(tmp_path / "b.png", seed=1)
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    body = f'[job]\nname = "swap"\nmodel = "{tiny_model}"\n[defaults]\n{SMALL}guidance_scale = 1.0\n'
    for n, extra in enumerate(['image = "a.png"', 'image = "a.png"\nstrength = 0.5', 'image = "b.png"\nmask = "m.png"', ""]):
        body += f'[[generation]]\nprompt = "item {n}"\nseed = {n}\n{extra}\n'
    job_file = write_job(tmp_path, body)
    job_dir, _, lines = run_inprocess(job_file, tmp_path / "work")
    assert "imagencode: 0 up to date, 2 to do" in lines
    with Image.open(job_dir / "decode" / "0002-item-2.png") as png:
        text = png.text
    assert text["init_image"] == "b.png" and text["mask_image"] == "m.png" and text["strength"] == "0.8"
    assert text["init_image_sha256"] == resolved_items(job_dir)[2]["init_image_sha256"]
    assert "init_image" not in Image.open(job_dir / "decode" / "0003-item-3.png").text
    before = {p.name: p.read_bytes() for p in (job_dir / "denoise").glob("*.safetensors")}

    _picture(tmp_path / "a.png", seed=2)
    job_dir, _, lines = run_inprocess(job_file, tmp_path / "work")
    assert "imagencode: 1 up to date, 1 to do" in lines
    assert "denoise: 2 up to date, 2 to do" in lines
    assert [line.split(":")[0] for line in lines if line.startswith("  denoise ")] == ["  denoise 0000-item-0", "  denoise 0001-item-1"]
    assert any("init_image_sha256 changed" in line for line in lines if line.startswith("  denoise 0000"))
    after = {p.name: p.read_bytes() for p in (job_dir / "denoise").glob("*.safetensors")}
    assert [name for name in sorted(after) if after[name] != before[name]] == ["0000-item-0.safetensors", "0001-item-1.safetensors"]
    # `orchestrate clean` lists the old picture's posterior (and its record), nothing else.
    from orchestrator.tools.clean import unused_files
    from stages.resolved import read_job

    unused = unused_files(job_dir, read_job(job_dir))
    assert [p.parent.name for p in unused] == ["imagencode", "imagencode"] and len({p.stem for p in unused}) == 1


def test_a_text_only_job_never_sees_the_fourth_stage(tiny_model, tmp_path):
    job_file = write_job(tmp_path, f'[job]\nname = "plain"\nmodel = "{tiny_model}"\n[[generation]]\nprompt = "a red apple"\nseed = 1\n{SMALL}')
    job_dir, runs, lines = run_inprocess(job_file, tmp_path / "work")
    assert [run.stage for run in runs] == ["encode", "denoise", "decode"]
    assert not any("imagencode" in line for line in lines) and not (job_dir / "imagencode").exists()
    (item,) = resolved_items(job_dir)
    assert not {"init_image", "strength", "mask_image"} & set(item)
    record = json.loads((job_dir / "denoise" / f"{item['id']}.json").read_text())
    assert set(record["inputs"]) == {next(iter(record["inputs"]))} and not {"strength", "init_image_sha256"} & set(record["params"])


def test_the_gallery_shows_source_and_mask_beside_the_result_escaped(tiny_model, tmp_path):
    """Picture names with markup in them: shown as text, loaded as pictures; the copy block holds
    image, strength and mask, and makes the same PNG again."""
    from PIL import Image

    from orchestrator.views import gallery
    from tests.test_gallery import find_chromium, open_item, open_page

    hostile = "<b onmouseover=alert(1)>\"o'k %41"
    _picture(tmp_path / f"{hostile}.png")
    Image.new("L", (64, 64), 0).save(tmp_path / f"{hostile}-mask.png")
    body = (f'[job]\nname = "shown"\nmodel = "{tiny_model}"\n[[generation]]\nprompt = "a red apple"\nseed = 3\n{SMALL}'
            f'image = {json.dumps(hostile + ".png")}\nmask = {json.dumps(hostile + "-mask.png")}\nstrength = 0.5\n')
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    page_path = gallery.write_gallery(job_dir)
    (item,) = resolved_items(job_dir)

    from playwright.sync_api import sync_playwright

    dialogs: list = []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=find_chromium())
        try:
            page = open_page(chromium, page_path, dialogs)
            dialog = open_item(page, item["id"])
            page.wait_for_function("() => [...document.querySelectorAll('img.source')].every(i => i.complete && i.naturalWidth > 0)")
            captions = dialog.locator("figcaption").all_inner_texts()
            loaded = page.evaluate("() => [...document.querySelectorAll('img.source')].map(i => i.naturalWidth)")
            bold = dialog.locator("b").count()
            fields = dict(zip(dialog.locator("dt").all_inner_texts(), dialog.locator("dd").all_inner_texts()))
            dialog.hover()
        finally:
            chromium.close()
    assert captions == [f"source: {hostile}.png", f"mask: {hostile}-mask.png"] and loaded == [64, 64]
    assert bold == 0 and dialogs == []
    assert fields["image"].startswith(str(tmp_path / f"{hostile}.png")) and "strength 0.5" in fields["image"]
    block = gallery.generation_block(item, json.loads((job_dir / "job.resolved.json").read_text()))
    again_dir, _, _ = run_inprocess(write_job(tmp_path, f'[job]\nname = "again"\nmodel = "{tiny_model}"\n' + block, "again.toml"), tmp_path / "work")
    (again,) = resolved_items(again_dir)
    assert (again_dir / again["image"]).read_bytes() == (job_dir / item["image"]).read_bytes()


def test_ray_shards_imagencode_and_denoise_waits_for_the_posteriors_it_reads():
    """The Ray plan: imagencode shards like encode (one per worker), and each denoise shard needs
    the posteriors of its items (so it never starts before they exist); a text-only todo has none."""
    from orchestrator.executors.ray_executor import make_shards
    from stages.units import Unit

    posterior = [Unit("imagencode", f"p{n}", {}, items=(f"i{n}",)) for n in range(3)]
    todo = {"encode": [Unit("encode", "e", {}, items=("i0", "i1", "i2", "t"))], "imagencode": posterior,
            "denoise": [Unit("denoise", f"i{n}", {}, inputs=(("encode", "e"), ("imagencode", f"p{n}")), items=(f"i{n}",)) for n in range(3)]
            + [Unit("denoise", "t", {}, inputs=(("encode", "e"),), items=("t",))],
            "decode": []}
    shards = make_shards(todo, workers=2)
    pictures = [s for s in shards if s.stage == "imagencode"]
    assert [len(s.units) for s in pictures] == [2, 1]
    for shard in (s for s in shards if s.stage == "denoise"):
        for unit in shard.units:
            assert set(unit.inputs) <= shard.needs
    assert not [s for s in make_shards(dict(todo, imagencode=[], denoise=todo["denoise"][3:]), workers=2) if s.stage == "imagencode"]


def test_a_picture_changed_after_resolving_is_one_line_exit_2_in_the_stage(tiny_model, tmp_path, capsys):
    """The stages check the picture's hash again: a stage run by hand after the file changed
    refuses it (exit 2, one line naming it), and keeps what it made before."""
    from PIL import Image

    from stages import denoise, imagencode

    _picture(tmp_path / "a.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    body = f'[job]\nname = "changed"\nmodel = "{tiny_model}"\n[[generation]]\nprompt = "x"\nseed = 1\n{SMALL}image = "a.png"\nmask = "m.png"\n'
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    made = {p: p.read_bytes() for p in (job_dir / "imagencode").glob("*.safetensors")}
    _picture(tmp_path / "a.png", seed=5)
    Image.new("L", (64, 64), 0).save(tmp_path / "m.png")
    capsys.readouterr()
    assert imagencode.main([str(job_dir), "--force"]) == 2
    assert denoise.main([str(job_dir), "--force"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 2 and "a.png changed since the job was resolved" in errors[0] and "m.png changed" in errors[1], errors
    assert {p: p.read_bytes() for p in (job_dir / "imagencode").glob("*.safetensors")} == made
