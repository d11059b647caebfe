"""The PixArt family (issue 7): a PixArt-Σ model runs as `PixArtSigmaPipeline` does, bit for bit on
the CPU in float32, through the same three stages; the family is detected from the model (the Σ
base repo's model_index names PixArtAlphaPipeline: a trap) or named in the job; composed models
take components from other folders or hub repos, and each stage fetches only its own.

Tiny Σ twins (orchestrator/tools/tiny.py, family="sigma"): sample_size 128 (the 1024 bins) and 256 (the
2048 bins, the 2K model), no micro-conditions, an SDXL-style VAE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import family
from tests.conftest import load_png, resolved_items, run_inprocess, write_job

REFERENCE_CONFIGS = Path(__file__).resolve().parent.parent / "orchestrator" / "reference_configs"
# 38 words, ~8 pieces each in the tiny vocabulary: well over Σ's 300 tokens (asserted below).
LONG_PROMPT = " ".join(["a watercolor painting of a lighthouse by the sea at sunset with an owl reading a book"] * 12)


@pytest.fixture(scope="module")
def tiny_sigma(tmp_path_factory) -> Path:
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "sigma", family="sigma", sample_size=128)


@pytest.fixture(scope="module")
def tiny_sigma_2k(tmp_path_factory) -> Path:
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "sigma-2k", seed=1, family="sigma", sample_size=256)


def sigma_pipe(path: Path, **components):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(path, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, item: dict) -> np.ndarray:
    """What the family's own pipeline makes for an item: its defaults (max_sequence_length too)."""
    image = pipe(
        item["prompt"], negative_prompt=item["negative_prompt"], width=item["width"], height=item["height"],
        guidance_scale=item["guidance_scale"], num_inference_steps=item["num_inference_steps"],
        use_resolution_binning=item["use_resolution_binning"], generator=torch.Generator("cpu").manual_seed(item["seed"]),
    ).images[0]
    return np.asarray(image.convert("RGB"))


def assert_parity(job_dir: Path, pipe) -> None:
    for item in resolved_items(job_dir):
        ours, theirs = load_png(job_dir / item["image"]), reference_image(pipe, item)
        assert ours.shape == theirs.shape == (item["height"], item["width"], 3), item["id"]
        assert np.array_equal(ours, theirs), f"{item['id']}: max diff {np.abs(ours.astype(int) - theirs).max()}"


SIGMA_JOB = """
[job]
name = "sigma"
model = "{model}"

[defaults]
num_inference_steps = 3
width = 128
height = 96
use_resolution_binning = false

[[generation]]   # guidance, the default negative prompt
prompt = "A cute cat riding a horse http://x.y #moon"
seed = 1

[[generation]]   # a prompt longer than Σ's 300 tokens: truncated there, as the pipeline does
prompt = "{long_prompt}"
guidance_scale = 1.0
seed = 2

[[generation]]   # non-square through Σ's 1024 bins: 600x1000 -> a bin, resized back
prompt = "city skyline at night with neon lights and rain"
negative_prompt = "blurry"
width = 600
height = 1000
use_resolution_binning = true
num_inference_steps = 2
seed = 3

[[generation]]   # one step: Σ takes step()[0] (α's pipeline takes [1] and raises with DPM-Solver)
prompt = "a red apple on a wooden table"
num_inference_steps = 1
seed = 4
"""


def test_sigma_matches_its_pipeline_bit_for_bit(tiny_sigma, tmp_path):
    from transformers import T5Tokenizer

    assert len(T5Tokenizer.from_pretrained(tiny_sigma, subfolder="tokenizer")(LONG_PROMPT).input_ids) > 300
    job_dir, _, _ = run_inprocess(write_job(tmp_path, SIGMA_JOB.format(model=tiny_sigma, long_prompt=LONG_PROMPT)), tmp_path / "work")
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert resolved["pipeline"] == family.SIGMA and resolved["pipeline_source"] == "the transformer config (use_additional_conditions: false)"
    assert resolved["max_sequence_length"] == 300  # Σ's default, not α's 120
    from safetensors.torch import load_file

    embeds = [load_file(str(p)) for p in (job_dir / "encode").glob("*.safetensors")]
    assert {tuple(e["prompt_embeds"].shape[:2]) for e in embeds} == {(1, 300)}
    denoise_record = json.loads(next((job_dir / "denoise").glob("0002-*.json")).read_text())
    assert denoise_record["params"]["pipeline"] == family.SIGMA
    assert denoise_record["binned_size"] != denoise_record["requested_size"]  # the bin was really used
    assert_parity(job_dir, sigma_pipe(tiny_sigma))


def test_sigma_2k_matches_its_pipeline_with_the_2048_bins(tiny_sigma_2k, tmp_path):
    """sample_size 256 selects ASPECT_RATIO_2048_BIN (α has no such table: its pipeline raises)."""
    body = f"""
    [job]
    name = "sigma-2k"
    model = "{tiny_sigma_2k}"
    [[generation]]
    prompt = "pirate ship trapped in a cosmic maelstrom nebula"
    width = 64
    height = 64
    use_resolution_binning = false
    num_inference_steps = 2
    seed = 7
    [[generation]]   # 300x200 -> a 2048 bin (2K pixels a side), resized back
    prompt = "a forest of giant mushrooms under a purple sky"
    width = 300
    height = 200
    guidance_scale = 1.0
    num_inference_steps = 1
    seed = 8
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    record = json.loads(next((job_dir / "denoise").glob("0001-*.json")).read_text())
    assert record["binned_size"]["width"] * record["binned_size"]["height"] > 1800**2, record["binned_size"]
    assert_parity(job_dir, sigma_pipe(tiny_sigma_2k))


def test_alpha_stays_alpha(tiny_model, tmp_path):
    """The α tiny model: detected from model_index.json, 120 tokens, and its denoise params carry
    no `pipeline` key, so artifacts made before families existed stay valid."""
    body = f"""
    [job]
    model = "{tiny_model}"
    [[generation]]
    prompt = "an owl"
    width = 64
    height = 64
    use_resolution_binning = false
    num_inference_steps = 1
    seed = 1
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert (resolved["pipeline"], resolved["pipeline_source"], resolved["max_sequence_length"]) == (family.ALPHA, "model_index.json", 120)
    record = json.loads(next(p for p in (job_dir / "denoise").glob("*.json") if p.name != "summary.json").read_text())
    assert "pipeline" not in record["params"]


def read(folder: Path, part: str) -> dict:
    path = folder / part if part == "model_index.json" else folder / part / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.parametrize(("repo", "transformer_repo", "expected", "why"), [
    ("PixArt-XL-2-1024-MS", None, family.ALPHA, "model_index.json"),
    ("PixArt-XL-2-512x512", None, family.ALPHA, "model_index.json"),
    ("PixArt-Sigma-XL-2-1024-MS", None, family.SIGMA, "the transformer config (use_additional_conditions: false)"),
    # The Σ base repo names PixArtAlphaPipeline; its SDXL VAE gives it away (Σ-512 has no other sign).
    ("pixart_sigma_sdxlvae_T5_diffusers", "PixArt-Sigma-XL-2-512-MS", family.SIGMA, "the SDXL VAE"),
    ("pixart_sigma_sdxlvae_T5_diffusers", "PixArt-Sigma-XL-2-2K-MS", family.SIGMA, "the transformer config"),
    ("pixart_sigma_sdxlvae_T5_diffusers", "PixArt-Sigma-XL-2-256x256", family.SIGMA, "the SDXL VAE"),
    ("PixArt-XL-2-1024-MS", "PixArt-LCM-XL-2-1024-MS", family.ALPHA, "model_index.json"),
])
def test_the_family_is_detected_from_the_real_configs(repo, transformer_repo, expected, why):
    root = REFERENCE_CONFIGS  # copied from ../shared/reference-configs (SOURCES.md says where each came from)
    transformer = read(root / (transformer_repo or repo), "transformer") or read(REFERENCE_CONFIGS / "PixArt-XL-2-1024-MS", "transformer")
    pipeline, reason = family.detect(None, read(root / repo, "model_index.json"), transformer, read(root / repo, "vae"))
    assert pipeline == expected and reason.startswith(why), (pipeline, reason)
    assert family.detect(family.ALPHA, {}, transformer, {}) == (family.ALPHA, "the job's 'pipeline' key")


def test_a_sigma_base_whose_model_index_names_alpha_is_still_sigma_and_the_key_overrides(tiny_sigma, tmp_path):
    base = tmp_path / "sigma-base"
    shutil.copytree(tiny_sigma, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(dict(index, _class_name="PixArtAlphaPipeline")))
    config = json.loads((base / "transformer" / "config.json").read_text())
    config.pop("use_additional_conditions")  # as Σ-512's config: nothing in it says Σ
    (base / "transformer" / "config.json").write_text(json.dumps(config))
    from orchestrator.jobfile import job as jobfile

    job = jobfile.load_job(write_job(tmp_path, f'[job]\nmodel = "{base}"\n[[generation]]\nprompt = "x"\nseed = 1\n'))
    resolved = jobfile.resolve_job(job, tmp_path / "w", "cpu")
    assert resolved["pipeline"] == family.SIGMA and resolved["pipeline_source"].startswith("the SDXL VAE"), resolved["pipeline_source"]
    assert resolved["max_sequence_length"] == 300
    forced = jobfile.load_job(write_job(tmp_path, f'[job]\nmodel = "{base}"\npipeline = "PixArtAlphaPipeline"\n[[generation]]\nprompt = "x"\nseed = 1\n', "a.toml"))
    resolved = jobfile.resolve_job(forced, tmp_path / "w", "cpu")
    assert (resolved["pipeline"], resolved["max_sequence_length"]) == (family.ALPHA, 120)


def test_an_unknown_pipeline_is_a_one_line_error(tiny_sigma, tmp_path):
    from orchestrator.jobfile import job as jobfile
    from stages.contract import JobFileError

    with pytest.raises(JobFileError, match=r"'pipeline' = 'PixArtSigmaPipelin' is not a PixArt pipeline \(did you mean PixArtSigmaPipeline\?\)"):
        jobfile.load_job(write_job(tmp_path, f'[job]\nmodel = "{tiny_sigma}"\npipeline = "PixArtSigmaPipelin"\n[[generation]]\nprompt = "x"\n'))


# ---------------------------------------------------------------------------------------------
# Composed models


def composed_base(tiny_sigma: Path, folder: Path) -> Path:
    """A Σ base like PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers: everything but a transformer."""
    shutil.copytree(tiny_sigma, folder, ignore=shutil.ignore_patterns("transformer"))
    return folder


def test_a_composed_model_matches_the_pipeline_built_from_the_same_components(tiny_sigma, tiny_sigma_2k, tmp_path):
    """Base without a transformer + a transformer from another folder: the job file says so in
    diffusers' terms, and the images equal PixArtSigmaPipeline(base, transformer=that one)."""
    from diffusers import PixArtTransformer2DModel

    other = tmp_path / "other-transformer"
    from orchestrator.tools.tiny import save_tiny_model

    save_tiny_model(other, seed=5, family="sigma", sample_size=128)
    base = composed_base(tiny_sigma, tmp_path / "base")
    body = f"""
    [job]
    name = "composed"
    model = "{base}"
    [job.components]
    transformer = "{other}"
    [defaults]
    num_inference_steps = 2
    use_resolution_binning = false
    width = 96
    height = 64
    [[generation]]
    prompt = "an astronaut riding a green horse on the moon"
    seed = 3
    [[generation]]
    prompt = "a cute cat riding a horse at sunset"
    width = 500
    height = 400
    use_resolution_binning = true
    seed = 4
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert resolved["model"]["components"] == {"transformer": {"given": str(other), "path": str(other)}}
    transformer = PixArtTransformer2DModel.from_pretrained(other, subfolder="transformer")
    assert_parity(job_dir, sigma_pipe(base, transformer=transformer))

    # Each component's hash enters only the params of the stages that use it.
    plain = json.loads((run_inprocess(write_job(tmp_path, body.replace(f'[job.components]\n    transformer = "{other}"', "").replace(
        f'model = "{base}"', f'model = "{tiny_sigma}"'), "plain.toml"), tmp_path / "plain")[0] / "job.resolved.json").read_text())
    assert plain["model"]["component_hashes"]["encode"] == resolved["model"]["component_hashes"]["encode"]
    assert plain["model"]["component_hashes"]["decode"] == resolved["model"]["component_hashes"]["decode"]
    assert plain["model"]["component_hashes"]["denoise"] != resolved["model"]["component_hashes"]["denoise"]


def test_composition_errors_are_one_line_and_name_the_fix(tiny_sigma, tmp_path):
    from orchestrator.jobfile import job as jobfile
    from stages.contract import JobFileError

    base = composed_base(tiny_sigma, tmp_path / "base")
    cases = [
        ("", "has no transformer/ folder (found: scheduler, text_encoder, tokenizer, vae); use a complete PixArt diffusers folder, "
             "or name where transformer comes from in [job.components]"),
        (f'[job.components]\ntransformer = "{base}"\n', f"[job.components] transformer = '{base}': {base} has no transformer/ folder"),
        (f'[job.components]\nunet = "{tiny_sigma}"\n', "[job.components]: unknown component 'unet'"),
        ('[job.components]\ntransformer = "./nowhere"\n', "fix 'transformer' in [job.components]"),
    ]
    for n, (extra, message) in enumerate(cases):
        path = write_job(tmp_path, f'[job]\nmodel = "{base}"\n{extra}[[generation]]\nprompt = "x"\nseed = 1\n', f"bad{n}.toml")
        with pytest.raises(JobFileError) as caught:
            jobfile.resolve_job(jobfile.load_job(path), tmp_path / "w", "cpu")
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def hub_snapshot(cache: Path, repo: str, source: Path, parts: list[str], commit: str) -> Path:
    """Put `parts` of `source` into a Hugging Face cache as repo@commit (what `hf download` leaves)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for part in parts:
        target = snapshot / part
        shutil.copytree(source / part, target) if (source / part).is_dir() else shutil.copy(source / part, target)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_components_and_each_stage_fetching_only_its_own(tiny_sigma, tmp_path, monkeypatch):
    """Hub ids for the base and a component, offline from a local cache: the run matches the
    pipeline; with the transformer's weights absent from the cache, encode still runs (it never
    fetches the transformer) and denoise fails with one line saying how to get them."""
    import huggingface_hub.constants

    from orchestrator.jobfile import job as jobfile
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub_snapshot(cache, "tiny/sigma-base", tiny_sigma, ["model_index.json", "text_encoder", "tokenizer", "vae", "scheduler"], "a" * 40)
    snapshot = hub_snapshot(cache, "tiny/sigma-transformer", tiny_sigma, ["transformer"], "b" * 40)
    body = """
    [job]
    name = "hub"
    model = "tiny/sigma-base"
    [job.components]
    transformer = "tiny/sigma-transformer"
    [[generation]]
    prompt = "a small cactus with a happy face"
    width = 64
    height = 64
    use_resolution_binning = false
    num_inference_steps = 2
    seed = 11
    """
    job_file = write_job(tmp_path, body)
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert resolved["model"]["components"]["transformer"]["path"] == str(snapshot)
    assert resolved["pipeline"] == family.SIGMA
    assert_parity(job_dir, sigma_pipe(tiny_sigma))

    for weights in (snapshot / "transformer").glob("*.safetensors"):
        weights.unlink()  # configs only, as the orchestrator fetches them
    from tests.conftest import inprocess_stage

    job = jobfile.load_job(job_file)
    fresh = tmp_path / "fresh"
    resolved = jobfile.resolve_job(job, jobfile.job_dir_for(job, fresh), "cpu")
    assert resolved["model"]["component_hashes"]["denoise"].isalnum()  # hashed from configs and the commit
    from orchestrator.executors.runner import run_job

    lines: list[str] = []
    fresh_dir = jobfile.job_dir_for(job, fresh)
    with pytest.raises(RuntimeError, match="stage denoise exited 2"):
        run_job(fresh_dir, resolved, lines.append, launch=inprocess_stage)
    assert any((fresh_dir / "encode").glob("*.safetensors")), "encode needs no transformer weights"
    errors = [line for line in (fresh_dir / "denoise" / "stage.log").read_text().splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot fetch transformer weights of tiny/sigma-transformer@bbbbbbbbbbbb" in errors[0], errors
    assert "hf download tiny/sigma-transformer" in errors[0]


# ---------------------------------------------------------------------------------------------
# Distillations and schedulers


def with_scheduler(model: Path, folder: Path, reference: str) -> Path:
    """A copy of `model` with the scheduler of a real repo (its config and model_index entry)."""
    shutil.copytree(model, folder)
    config = json.loads((REFERENCE_CONFIGS / reference / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def alpha_pipe(path: Path):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lcm_matches_its_pipeline(tiny_model, tmp_path):
    """PixArt-LCM: LCMScheduler from the model folder, 4 steps, guidance 0; and 1 step, where α's
    pipeline takes step()[1] (LCM's denoised sample), which ours must too."""
    lcm = with_scheduler(tiny_model, tmp_path / "lcm", "PixArt-LCM-XL-2-1024-MS")
    body = f"""
    [job]
    name = "lcm"
    model = "{lcm}"
    [defaults]
    guidance_scale = 0.0
    width = 96
    height = 64
    use_resolution_binning = false
    [[generation]]
    prompt = "an astronaut riding a green horse on the moon"
    num_inference_steps = 4
    seed = 21
    [[generation]]
    prompt = "a cute cat riding a horse at sunset"
    num_inference_steps = 1
    seed = 22
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    pipe = alpha_pipe(lcm)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for item in resolved_items(job_dir):
        ours = load_png(job_dir / item["image"])
        theirs = np.asarray(pipe(item["prompt"], width=96, height=64, guidance_scale=0.0, num_inference_steps=item["num_inference_steps"],
                                 use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(item["seed"])).images[0])
        assert np.array_equal(ours, theirs), item["id"]


def test_dmd_style_timesteps_400_one_step_matches_its_pipeline(tmp_path):
    """PixArt-α DMD: a 512 model (sample_size 64: no micro-conditions), DDPMScheduler, run as
    timesteps=[400], one step, guidance 1. The step count comes from the timesteps."""
    from orchestrator.tools.tiny import save_tiny_model

    dmd = with_scheduler(save_tiny_model(tmp_path / "alpha-512", sample_size=64), tmp_path / "dmd", "PixArt-Alpha-DMD-XL-2-512x512")
    body = f"""
    [job]
    name = "dmd"
    model = "{dmd}"
    [[generation]]
    prompt = "a small cactus with a happy face in the sahara desert"
    timesteps = [400]
    guidance_scale = 1.0
    width = 400
    height = 300
    seed = 31
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    (item,) = resolved_items(job_dir)
    assert (item["timesteps"], item["num_inference_steps"]) == ([400], 1)
    record = json.loads((job_dir / "denoise" / f"{item['id']}.json").read_text())
    assert record["params"]["timesteps"] == [400]
    pipe = alpha_pipe(dmd)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    theirs = np.asarray(pipe(item["prompt"], timesteps=[400], guidance_scale=1.0, width=400, height=300,
                             generator=torch.Generator("cpu").manual_seed(31)).images[0])
    assert np.array_equal(load_png(job_dir / item["image"]), theirs)


def test_another_scheduler_by_name_matches_the_pipeline_with_it(tiny_model, tmp_path):
    """[job] scheduler = "EulerAncestralDiscreteScheduler": built with from_config of the model's
    scheduler config, as `pipe.scheduler = Class.from_config(pipe.scheduler.config)`; it draws
    noise in every step, from the item's own generator."""
    from diffusers import EulerAncestralDiscreteScheduler

    body = f"""
    [job]
    name = "euler"
    model = "{tiny_model}"
    scheduler = "EulerAncestralDiscreteScheduler"
    [[generation]]
    prompt = "a forest of giant mushrooms under a purple sky"
    num_inference_steps = 3
    width = 64
    height = 96
    use_resolution_binning = false
    seed = 41
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    (item,) = resolved_items(job_dir)
    assert json.loads((job_dir / "denoise" / f"{item['id']}.json").read_text())["params"]["scheduler"] == "EulerAncestralDiscreteScheduler"
    pipe = alpha_pipe(tiny_model)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = np.asarray(pipe(item["prompt"], num_inference_steps=3, width=64, height=96, use_resolution_binning=False,
                             generator=torch.Generator("cpu").manual_seed(41)).images[0])
    assert np.array_equal(load_png(job_dir / item["image"]), theirs)


@pytest.mark.parametrize(("extra_job", "extra_gen", "message"), [
    ('scheduler = "EulerAncestralDiscreteSchedular"', "", "'EulerAncestralDiscreteSchedular' is not a diffusers scheduler class; did you mean 'EulerAncestralDiscreteScheduler'?"),
    ('scheduler = "PNDMScheduler"', "timesteps = [400]", "'timesteps' needs a scheduler whose set_timesteps takes custom timesteps, and PNDMScheduler does not"),
    ("", "timesteps = [400, 700]", "'timesteps' = [400, 700] is out of range; it must be a list of distinct integers from 999 down to 0, in descending order"),
    ("", 'timesteps = ["400"]', "'timesteps' must be a list of integers, not list ['400']; write e.g. timesteps = [400]"),
])
def test_scheduler_and_timesteps_errors_are_one_line(tiny_model, tmp_path, extra_job, extra_gen, message):
    from orchestrator.jobfile import job as jobfile
    from stages.contract import JobFileError

    path = write_job(tmp_path, f'[job]\nmodel = "{tiny_model}"\n{extra_job}\n[[generation]]\nprompt = "x"\nseed = 1\n{extra_gen}\n')
    with pytest.raises(JobFileError) as caught:
        jobfile.resolve_job(jobfile.load_job(path), tmp_path / "w", "cpu")
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------
# Pickle weights (the DMD transformer is published as .bin)


def test_convert_turns_a_bin_component_into_verified_safetensors(tiny_model, tmp_path):
    """A transformer saved as .bin is refused at run time with the fix named; `orchestrate convert`
    makes the safetensors file (weights_only load, tensor-by-tensor check), and the job then runs
    with the same weights."""
    from diffusers import PixArtTransformer2DModel
    from typer.testing import CliRunner

    from orchestrator.jobfile import job as jobfile
    from orchestrator.cli import app
    from stages.contract import JobFileError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    original = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer")
    shutil.rmtree(model / "transformer")
    original.save_pretrained(model / "transformer", safe_serialization=False)
    assert [p.name for p in (model / "transformer").glob("*.bin")] == ["diffusion_pytorch_model.bin"]
    job_file = write_job(tmp_path, f'[job]\nmodel = "{model}"\n[[generation]]\nprompt = "x"\nseed = 1\n')
    with pytest.raises(JobFileError, match=r"transformer/ has only pickle weights \(diffusion_pytorch_model.bin\).*orchestrate convert .*transformer"):
        jobfile.resolve_job(jobfile.load_job(job_file), tmp_path / "w", "cpu")

    result = CliRunner().invoke(app, ["convert", str(model / "transformer")])
    assert result.exit_code == 0, result.output
    assert "diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors:" in result.output and "verified tensor by tensor" in result.output
    converted = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer", use_safetensors=True)
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(a, b), name
    assert jobfile.resolve_job(jobfile.load_job(job_file), tmp_path / "w", "cpu")["model"]["path"] == str(model)
    again = CliRunner().invoke(app, ["convert", str(model / "transformer")])
    assert "already exists; left alone" in again.output


def test_convert_refuses_a_pickle_that_is_not_plain_tensors(tmp_path):
    """weights_only=True refuses arbitrary objects: nothing is written, one line says why."""
    import pickle

    from typer.testing import CliRunner

    from orchestrator.cli import app

    folder = tmp_path / "transformer"
    folder.mkdir()

    class Payload:  # what a malicious checkpoint would carry
        def __reduce__(self):
            return (print, ("this ran",))

    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    result = CliRunner().invoke(app, ["convert", str(folder)])
    assert result.exit_code == 2 and "this ran" not in result.output
    assert result.stderr.startswith("error: convert: ") and "is not a plain tensor checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# A VAE that overflows in 16-bit


def test_a_vae_that_overflows_in_fp16_is_decoded_again_in_fp32_never_black(tiny_model, tmp_path):
    """A VAE whose first decoder conv makes values over fp16's 65504 (as the original SDXL VAE does
    in fp16) decodes NaN in float16. The item is decoded again with the VAE in float32: the PNG
    equals that float32 decode, and the record, the PNG metadata and the summary say so."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import PixArtImageProcessor
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    vae.save_pretrained(model / "vae", safe_serialization=True)
    body = f"""
    [job]
    name = "overflow"
    model = "{model}"
    dtype = "float16"
    [[generation]]
    prompt = "a lighthouse by the sea"
    width = 64
    height = 64
    use_resolution_binning = false
    num_inference_steps = 2
    seed = 51
    """
    job_dir, runs, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    (item,) = resolved_items(job_dir)
    latents = load_file(str(job_dir / "denoise" / f"{item['id']}.safetensors"))["latents"]
    half = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float16)
    with torch.no_grad():
        assert not torch.isfinite(half.decode(latents / half.config.scaling_factor).sample).all(), "the test VAE must overflow in fp16"
        full = half.to(torch.float32).decode(latents.float() / half.config.scaling_factor).sample
    expected = np.asarray(PixArtImageProcessor(vae_scale_factor=8).postprocess(full, output_type="pil")[0])
    ours = load_png(job_dir / item["image"])
    assert np.array_equal(ours, expected) and ours.std() > 1.0  # the float32 decode, not a flat image
    record = json.loads((job_dir / "decode" / f"{item['id']}.json").read_text())
    assert record["vae_upcast"] is True
    from PIL import Image

    with Image.open(job_dir / item["image"]) as png:
        assert png.text["vae_upcast"] == "float32 (float16 overflowed)"
    assert {r.stage: r.summary for r in runs}["decode"]["vae_upcasts"] == 1


def test_the_fp32_retry_of_decode_is_planned_under_the_budget():
    """The full-size α at 1024x1024 in fp16 under 2 GiB: the float32 retry gets a tiling that fits."""
    from orchestrator.planning import memory

    full_size = REFERENCE_CONFIGS / "PixArt-XL-2-1024-MS"
    item = {"prompt": "x", "negative_prompt": "", "seed": 1, "width": 1024, "height": 1024, "guidance_scale": 4.5,
            "num_inference_steps": 20, "use_resolution_binning": True}
    for budget in (2, 8):
        decode = memory.plan_memory(full_size, "float16", "cuda", [item], 120, budget * 1024**3, None)["stages"]["decode"]
        retry = decode["upcast_retry"]
        assert retry["peak_bytes"] <= budget * 1024**3, (budget, decode)
        assert retry["peak_bytes"] > decode["peak_bytes"] or retry["tile_size"] != decode["tile_size"], decode
    assert "upcast_retry" not in memory.plan_memory(full_size, "float32", "cuda", [item], 120, 8 * 1024**3, None)["stages"]["decode"]


@pytest.mark.platforms
def test_demo_family_sigma_runs_a_tiny_sigma_model(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["demo", "--family", "sigma", "--workdir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tiny random-weight PixArt-Σ model" in result.output
    resolved = json.loads((tmp_path / "demo-sigma" / "job.resolved.json").read_text())
    assert (resolved["pipeline"], resolved["max_sequence_length"]) == (family.SIGMA, 300)
    assert len(list((tmp_path / "demo-sigma" / "decode").glob("*.png"))) == 3
    status = CliRunner().invoke(app, ["status", str(tmp_path / "demo-sigma.toml"), "--workdir", str(tmp_path), "--device", "cpu"])
    assert status.output.startswith("model: PixArt-Σ (PixArtSigmaPipeline, from the transformer config"), status.output
    assert "  transformer  demo-model-sigma\n" in status.output


@pytest.mark.parametrize("sample_size", [32, 64])
def test_sigma_256_and_512_composed_on_the_sigma_base_match_their_pipeline(tmp_path, sample_size):
    """PixArt-Σ 256x256 and 512 are published as a transformer only, composed on the Σ base repo
    (whose model_index names PixArtAlphaPipeline and whose transformer configs say nothing Σ at
    these sizes): detected as Σ by the SDXL VAE, 256 / 512 bins, 300 tokens, bit for bit."""
    from diffusers import PixArtTransformer2DModel

    from orchestrator.tools.tiny import save_tiny_model

    twin = save_tiny_model(tmp_path / f"sigma-{sample_size}", seed=sample_size, family="sigma", sample_size=sample_size)
    config = json.loads((twin / "transformer" / "config.json").read_text())
    config.pop("use_additional_conditions")  # as the real Σ-256/512 configs
    (twin / "transformer" / "config.json").write_text(json.dumps(config))
    base = composed_base(twin, tmp_path / "base")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(dict(index, _class_name="PixArtAlphaPipeline")))
    body = f"""
    [job]
    name = "sigma-{sample_size}"
    model = "{base}"
    [job.components]
    transformer = "{twin}"
    [defaults]
    num_inference_steps = 2
    [[generation]]
    prompt = "{LONG_PROMPT}"
    seed = 61
    [[generation]]
    prompt = "portrait of an old fisherman, oil painting"
    width = {sample_size * 6}
    height = {sample_size * 10}
    guidance_scale = 1.0
    seed = 62
    """
    job_dir, _, _ = run_inprocess(write_job(tmp_path, body), tmp_path / "work")
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    assert resolved["pipeline"] == family.SIGMA and resolved["pipeline_source"].startswith("the SDXL VAE")
    assert [(i["width"], i["height"]) for i in resolved["items"]][0] == (sample_size * 8, sample_size * 8)  # the default size
    transformer = PixArtTransformer2DModel.from_pretrained(twin, subfolder="transformer")
    assert_parity(job_dir, sigma_pipe(base, transformer=transformer))


def test_a_folder_that_is_not_a_pixart_pipeline_is_a_one_line_error(tiny_model, tmp_path):
    from orchestrator.jobfile import job as jobfile
    from stages.contract import JobFileError

    other = tmp_path / "sd"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    path = write_job(tmp_path, f'[job]\nmodel = "{other}"\n[[generation]]\nprompt = "x"\nseed = 1\n')
    with pytest.raises(JobFileError, match=r"model_index.json names 'StableDiffusionPipeline', not a PixArt pipeline \(PixArtAlphaPipeline, PixArtSigmaPipeline\)"):
        jobfile.resolve_job(jobfile.load_job(path), tmp_path / "w", "cpu")
    (other / "model_index.json").write_text(json.dumps(index))
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(JobFileError, match=r"is a 'UNet2DConditionModel' \(norm_type 'ada_norm_single'\), not a PixArt transformer"):
        jobfile.resolve_job(jobfile.load_job(path), tmp_path / "w", "cpu")


@pytest.mark.parametrize(("transformer", "side", "budget", "denoise"), [
    ("PixArt-Sigma-XL-2-2K-MS", 2048, "2GiB", "offload"),
    ("PixArt-Sigma-XL-2-1024-MS", 1024, "2GiB", "resident"),
])
def test_plan_works_for_sigma_from_configs_alone(tmp_path, transformer, side, budget, denoise):
    """`orchestrate plan` on the real configs, no weights anywhere: Σ composed on its base repo."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    base, sigma = REFERENCE_CONFIGS / "pixart_sigma_sdxlvae_T5_diffusers", REFERENCE_CONFIGS / "PixArt-Sigma-XL-2-1024-MS"
    job = write_job(tmp_path, f"""
    [job]
    model = "{base}"
    [job.components]
    text_encoder = "{sigma}"   # the base copy here holds no T5 configs
    tokenizer = "{sigma}"
    transformer = "{REFERENCE_CONFIGS / transformer}"
    [[generation]]
    prompt = "a lighthouse"
    width = {side}
    height = {side}
    """)
    result = CliRunner().invoke(app, ["plan", str(job), "--device", "cuda", "--max-vram", budget, "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("model: PixArt-Σ (PixArtSigmaPipeline, from the transformer config"), result.output
    assert f"  transformer  {REFERENCE_CONFIGS / transformer} ([job.components])" in result.output
    assert next(line for line in result.output.splitlines() if line.startswith("denoise")).split()[1] == denoise
    assert not (tmp_path / "w").exists()
