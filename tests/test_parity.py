"""Guards the quality bar: images made by the three stages through files equal, pixel for pixel,
what one `PixArtAlphaPipeline` call returns for the same model, parameters and seed (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import load_png, resolved_items, run_inprocess, write_job

# Each generation exercises one path of the pipeline; all run in one job, so the test also shows
# that an image does not depend on the other items of its queue.
PARITY_JOB = """
[job]
name = "parity"
model = "{model}"
clean_caption = {clean_caption}

[defaults]
num_inference_steps = 3
width = 128
height = 96
use_resolution_binning = false

[[generation]]   # guidance, default negative prompt, caption cleaning of a URL and a hashtag
prompt = "A cute cat riding a horse http://x.y #moon"
seed = 1

[[generation]]   # guidance <= 1: no CFG, no negative prompt encoded
prompt = "A cute cat riding a horse http://x.y #moon"
guidance_scale = 1.0
seed = 2

[[generation]]   # a real negative prompt, a higher guidance, another unbinned size
prompt = "an owl reading a book in a cozy library"
negative_prompt = "blurry, low quality"
guidance_scale = 7.0
width = 160
height = 128
seed = 3

[[generation]]   # the empty prompt
prompt = ""
seed = 4

[[generation]]   # non-square through resolution binning: 600x1000 -> 768x1280 bin, resized back
prompt = "city skyline at night with neon lights and rain"
width = 600
height = 1000
use_resolution_binning = true
num_inference_steps = 2
seed = 5

[[generation]]   # count: seeds 10 and 11
prompt = "a red apple on a wooden table"
count = 2
seed = 10
"""


def reference_image(pipe, item: dict, clean_caption: bool) -> np.ndarray:
    image = pipe(
        item["prompt"],
        negative_prompt=item["negative_prompt"],
        width=item["width"],
        height=item["height"],
        guidance_scale=item["guidance_scale"],
        num_inference_steps=item["num_inference_steps"],
        use_resolution_binning=item["use_resolution_binning"],
        clean_caption=clean_caption,
        generator=torch.Generator("cpu").manual_seed(item["seed"]),
    ).images[0]
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def reference_pipe(tiny_model):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.platforms
@pytest.mark.parametrize("clean_caption", [True, False])
def test_stages_match_pipeline_bit_for_bit(tiny_model, reference_pipe, tmp_path, clean_caption):
    job_file = write_job(tmp_path, PARITY_JOB.format(model=tiny_model, clean_caption=str(clean_caption).lower()))
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    items = resolved_items(job_dir)
    assert [i["seed"] for i in items] == [1, 2, 3, 4, 5, 10, 11]
    for item in items:
        ours = load_png(job_dir / item["image"])
        theirs = reference_image(reference_pipe, item, clean_caption)
        assert ours.shape == (item["height"], item["width"], 3), item["id"]
        assert np.array_equal(ours, theirs), f"{item['id']}: max diff {np.abs(ours.astype(int) - theirs).max()}"


def test_clean_caption_changes_the_embedding(tiny_model, tmp_path):
    """clean_caption really runs (beautifulsoup4 and ftfy installed), so the URL prompt differs."""
    from safetensors.torch import load_file

    embeds = {}
    for flag in ("true", "false"):
        job_file = write_job(tmp_path, f"""
            [job]
            name = "cc-{flag}"
            model = "{tiny_model}"
            clean_caption = {flag}
            [[generation]]
            prompt = "a cute cat riding a horse http://x.y #moon"
            guidance_scale = 1.0
            width = 64
            height = 64
            use_resolution_binning = false
            num_inference_steps = 1
            seed = 1
        """)
        job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
        (artifact,) = (job_dir / "encode").glob("*.safetensors")
        embeds[flag] = load_file(artifact)["prompt_attention_mask"]
    # "...horse http://x.y #moon" -> "...horse moon": fewer tokens survive cleaning.
    assert embeds["true"].sum() < embeds["false"].sum()


def test_one_step_does_not_crash_and_matches_the_fixed_reference(tiny_model, reference_pipe, tmp_path):
    """diffusers' pipeline raises IndexError at num_inference_steps=1 with DPM-Solver (it takes
    `step(...)[1]`). Ours must make the image the pipeline would make with `[0]`."""
    item = {"prompt": "a watercolor painting of a lighthouse", "negative_prompt": "", "width": 64, "height": 64,
            "guidance_scale": 4.5, "num_inference_steps": 1, "use_resolution_binning": False, "seed": 9}
    with pytest.raises(IndexError):
        reference_image(reference_pipe, item, True)

    job_file = write_job(tmp_path, f"""
        [job]
        name = "one-step"
        model = "{tiny_model}"
        [[generation]]
        prompt = "{item['prompt']}"
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 1
        seed = 9
    """)
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    ours = load_png(job_dir / resolved_items(job_dir)[0]["image"])

    scheduler = reference_pipe.scheduler
    original_step = scheduler.step

    def step_returning_pair(*args, **kwargs):  # what the pipeline's `[1]` expects to find
        out = original_step(*args, **kwargs)
        return out if kwargs.get("return_dict", True) else (out[0], out[0])

    scheduler.step = step_returning_pair
    try:
        theirs = reference_image(reference_pipe, item, True)
    finally:
        del scheduler.step
    assert np.array_equal(ours, theirs)


def test_image_does_not_depend_on_queue_order(tiny_model, tmp_path):
    """The same (prompt, seed) gives the same PNG bytes whatever its neighbours and position."""
    body = """
        [job]
        name = "{name}"
        model = "{model}"
        [defaults]
        width = 64
        height = 64
        use_resolution_binning = false
        num_inference_steps = 2
        {entries}
    """
    a = '[[generation]]\nprompt = "a red apple"\nseed = 3\n'
    b = '[[generation]]\nprompt = "a forest of giant mushrooms"\nseed = 4\ncount = 2\n'
    first, _, _ = run_inprocess(write_job(tmp_path, body.format(name="ab", model=tiny_model, entries=a + b), "ab.toml"), tmp_path / "w")
    second, _, _ = run_inprocess(write_job(tmp_path, body.format(name="ba", model=tiny_model, entries=b + a), "ba.toml"), tmp_path / "w")
    by_key = lambda d: {(i["prompt"], i["seed"]): (d / i["image"]).read_bytes() for i in resolved_items(d)}  # noqa: E731
    assert by_key(first) == by_key(second)
    assert len(by_key(first)) == 3
