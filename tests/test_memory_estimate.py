"""Guards the memory planner (orchestrator/planning/memory.py) and its estimates (orchestrator/planning/estimate.py).

Accuracy: on the CPU, each stage's estimated peak (weights + activations, from fake tensors) is
within 5% of the peak torch.profiler measures while the same work runs on real tensors, for a small
and a medium model: encode resident and streamed, denoise resident, decode untiled and tiled. The
measured runs are written here independently of the estimator: the pipeline's own `encode_prompt`
and `__call__`, a layer-major T5 loop with one block read ahead, and `vae.decode` + `postprocess`.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.planning import estimate
from orchestrator.planning import memory
from orchestrator.cli import app
from orchestrator.tools.tiny import REFERENCE_CONFIGS
from stages.contract import JobFileError
from stages.units import plan_units
from tests.conftest import write_job

TOLERANCE = 0.05  # the bar for estimated vs measured peak
TEXTS = 3  # texts held together in the batched encode runs
GIB = 1024**3
FULL_SIZE = REFERENCE_CONFIGS / "PixArt-XL-2-1024-MS"


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory) -> Path:
    """Wider than the tiny model everywhere, the VAE too (32-128 channels, 2 layers per block)."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from orchestrator.tools.tiny import build_tiny_components

    parts = build_tiny_components()
    torch.manual_seed(0)
    parts["text_encoder"] = T5EncoderModel(T5Config(
        vocab_size=len(parts["tokenizer"]), d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    parts["transformer"] = PixArtTransformer2DModel(
        sample_size=128, num_layers=4, patch_size=2, attention_head_dim=64, num_attention_heads=6, caption_channels=256,
        in_channels=4, cross_attention_dim=384, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    parts["vae"] = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215).eval()
    path = tmp_path_factory.mktemp("models") / "medium"
    PixArtAlphaPipeline(**parts).save_pretrained(path, safe_serialization=True)
    return path


# (fixture, image side in pixels, tile size) per model: small images keep the test fast.
MODELS = {"small": ("tiny_model", 256, 128), "medium": ("medium_model", 384, 256)}


# ---------------------------------------------------------------------------------------------
# Measuring real runs


def profiled_peak(run) -> int:
    """Most bytes allocated at once while `run()` runs, above what was allocated before, from the
    profiler's raw allocation and free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def weight_bytes(module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure_encode(path: Path) -> dict:
    """{label: measured bytes} for encode resident and streamed, 1 and TEXTS texts."""
    from diffusers import PixArtAlphaPipeline
    from transformers import T5EncoderModel, T5Tokenizer
    from transformers.masking_utils import create_bidirectional_mask

    tokenizer = T5Tokenizer.from_pretrained(path, subfolder="tokenizer")
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=None, transformer=None, scheduler=None)

    def resident(n):
        kept = [pipe.encode_prompt(f"text {i}", do_classifier_free_guidance=False, device=torch.device("cpu"),
                                   clean_caption=False, max_sequence_length=120)[:2] for i in range(n)]
        return kept

    def stream(n):  # layer-major; copying a block stands for loading it; the next one is read ahead
        hidden, attention, bias = [], [], []
        for i in range(n):
            tokens = tokenizer(f"text {i}", padding="max_length", max_length=120, truncation=True, return_tensors="pt")
            hidden.append(torch.nn.functional.embedding(tokens.input_ids, t5.shared.weight))
            attention.append(create_bidirectional_mask(config=t5.config, inputs_embeds=hidden[-1], attention_mask=tokens.attention_mask))
            bias.append(None)
        blocks = list(t5.encoder.block)
        ahead = copy.deepcopy(blocks[0])
        for i in range(len(blocks)):
            block, ahead = ahead, (copy.deepcopy(blocks[i + 1]) if i + 1 < len(blocks) else None)
            for t in range(n):
                hidden[t], bias[t], _ = block(hidden[t], attention[t], bias[t], None, None, None, cache=None)
            del block
        norm = copy.deepcopy(t5.encoder.final_layer_norm)
        return [norm(h) for h in hidden]

    with torch.no_grad():
        measured = {f"resident {n}": weight_bytes(t5) + profiled_peak(lambda: resident(n)) for n in (1, TEXTS)}
        measured |= {f"stream {n}": profiled_peak(lambda: stream(n)) for n in (1, TEXTS)}  # weights load inside
    return measured


def measure_denoise(path: Path, side: int) -> int:
    """Three steps (the loop's steady state starts at step 3) of the pipeline with guidance."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32).eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler")
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    embeds = torch.randn(1, 120, transformer.config.caption_channels)
    mask = torch.ones(1, 120, dtype=torch.long)

    def run():
        pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask,
             negative_prompt=None, height=side, width=side, num_inference_steps=3, output_type="latent",
             use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(0))

    with torch.no_grad():
        return weight_bytes(transformer) + profiled_peak(run)


def measure_decode(path: Path, side: int, tile: int) -> dict:
    from diffusers import AutoencoderKL
    from diffusers.image_processor import PixArtImageProcessor

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).eval()
    processor = PixArtImageProcessor(vae_scale_factor=8)
    latents = torch.randn(1, 4, side // 8, side // 8)

    def run():
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        processor.postprocess(image, output_type="pil")

    measured = {}
    with torch.no_grad():
        measured["full"] = weight_bytes(vae) + profiled_peak(run)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
        measured[f"tiled {tile}"] = weight_bytes(vae) + profiled_peak(run)
    return measured


def assert_close(stage: str, estimated: dict, measured: dict) -> None:
    report = {k: f"estimated {estimated[k]}, measured {measured[k]} ({(estimated[k] - measured[k]) / measured[k]:+.2%})" for k in measured}
    bad = {k: line for k, line in report.items() if abs(estimated[k] - measured[k]) > TOLERANCE * measured[k]}
    assert not bad, f"{stage}: estimates off by more than {TOLERANCE:.0%}: {bad} (all: {report})"


def cpu_total(e: estimate.Estimate) -> int:
    assert e.workspace_bytes == 0  # on the CPU everything is in weights and activations
    return e.weights_bytes + e.activation_bytes


# ---------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("size", list(MODELS))
def test_encode_estimates_match_profiler(size, request):
    path = request.getfixturevalue(MODELS[size][0])
    configs = estimate.ModelConfigs.read(path)
    estimated = {f"{s} {n}": cpu_total(estimate.estimate_encode(configs, "float32", "cpu", s, n, 120))
                 for s in ("resident", "stream") for n in (1, TEXTS)}
    assert_close(f"encode ({size})", estimated, measure_encode(path))


@pytest.mark.parametrize("size", list(MODELS))
def test_denoise_estimate_matches_profiler(size, request):
    fixture, side, _ = MODELS[size]
    path = request.getfixturevalue(fixture)
    configs = estimate.ModelConfigs.read(path)
    estimated = cpu_total(estimate.estimate_denoise(configs, "float32", "cpu", "resident", 1, [(side, side, True)], 120))
    assert_close(f"denoise ({size})", {"resident": estimated}, {"resident": measure_denoise(path, side)})


@pytest.mark.parametrize("size", list(MODELS))
def test_decode_estimates_match_profiler(size, request):
    fixture, side, tile = MODELS[size]
    path = request.getfixturevalue(fixture)
    configs = estimate.ModelConfigs.read(path)
    estimated = {"full": cpu_total(estimate.estimate_decode(configs, "float32", "cpu", None, [(side, side, None)])),
                 f"tiled {tile}": cpu_total(estimate.estimate_decode(configs, "float32", "cpu", tile, [(side, side, None)]))}
    assert estimated[f"tiled {tile}"] < estimated["full"]
    assert_close(f"decode ({size})", estimated, measure_decode(path, side, tile))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_text_encoder_weights_as_from_pretrained_loads_them(tiny_model, dtype):
    """fp16 keeps T5's `wo` in fp32 (bf16 does not), and the tied embedding counts once."""
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_model, subfolder="text_encoder", dtype=getattr(torch, dtype))
    configs = estimate.ModelConfigs.read(tiny_model)
    assert estimate.estimate_encode(configs, dtype, "cpu", "resident", 1, 120).weights_bytes == weight_bytes(t5)


# ---------------------------------------------------------------------------------------------
# The full-size model, from its configs alone


def full_size_items(count: int = 1) -> list[dict]:
    return [{"prompt": f"prompt {i}", "negative_prompt": "", "guidance_scale": 4.5, "num_inference_steps": 20,
             "width": 1024, "height": 1024, "use_resolution_binning": True} for i in range(count)]


def test_full_size_peaks_match_the_notes():
    """PIXART-NOTES.md's figures (fp16, 1024 px, weights + activations): 10.77 / 1.36 / 1.66 /
    0.54 / 0.26 GiB."""
    configs = estimate.ModelConfigs.read(FULL_SIZE)
    shapes = [(1024, 1024, (1024, 1024))]
    found = {
        "encode": estimate.estimate_encode(configs, "float16", "cuda", "resident", 1, 120),
        "denoise": estimate.estimate_denoise(configs, "float16", "cuda", "resident", 1, [(1024, 1024, True)], 120),
        "decode": estimate.estimate_decode(configs, "float16", "cuda", None, shapes),
        "tiled 512": estimate.estimate_decode(configs, "float16", "cuda", 512, shapes),
        "tiled 256": estimate.estimate_decode(configs, "float16", "cuda", 256, shapes),
    }
    notes = {"encode": 10.77, "denoise": 1.36, "decode": 1.66, "tiled 512": 0.54, "tiled 256": 0.26}
    for key, gib in notes.items():
        assert (found[key].weights_bytes + found[key].activation_bytes) / GIB == pytest.approx(gib, abs=0.01), key


@pytest.mark.parametrize("budget_gib", [2, 1])
def test_full_size_fits_small_budgets(budget_gib):
    plan = memory.plan_memory(FULL_SIZE, "float16", "cuda", full_size_items(), 120, budget_gib * GIB, None)
    for stage, entry in plan["stages"].items():
        assert entry["peak_bytes"] <= budget_gib * GIB, (stage, entry)
    assert plan["stages"]["encode"]["strategy"] == "stream"
    if budget_gib == 1:
        assert plan["stages"]["denoise"]["strategy"] == "offload"
        assert plan["stages"]["decode"] == {**plan["stages"]["decode"], "strategy": "tiled", "tile_size": 512}


def test_unlimited_budget_is_resident_untiled_with_all_texts():
    plan = memory.plan_memory(FULL_SIZE, "float16", "cuda", full_size_items(3), 120, None, None)
    assert {s: e["strategy"] for s, e in plan["stages"].items()} == {"encode": "resident", "denoise": "resident", "decode": "full"}
    assert plan["stages"]["encode"]["batch_size"] == 4  # 3 prompts and the shared empty negative prompt
    assert plan["stages"]["denoise"]["batch_size"] == 1 and plan["stages"]["decode"]["tile_size"] is None


def test_cuda_batches_equal_items_when_they_fit_and_the_cpu_never():
    items = full_size_items(4)
    for item in items:
        item["prompt"] = "one prompt"
    cuda = memory.plan_memory(FULL_SIZE, "float16", "cuda", items, 120, 24 * GIB, None)["stages"]["denoise"]
    cpu = memory.plan_memory(FULL_SIZE, "float16", "cpu", items, 120, 24 * GIB, None)["stages"]["denoise"]
    assert (cuda["strategy"], cuda["batch_size"], cpu["batch_size"]) == ("resident", 4, 1)


def test_nothing_fits_names_the_stage_and_the_smallest_budget():
    with pytest.raises(JobFileError) as failed:
        memory.plan_memory(FULL_SIZE, "float16", "cuda", full_size_items(), 120, 256 * 1024**2, None)
    message = str(failed.value)
    assert message.startswith("encode: no strategy fits the budget of 256.00 MiB")
    smallest = int(message.split("(")[-1].split(" bytes")[0])
    plan = memory.plan_memory(FULL_SIZE, "float16", "cuda", full_size_items(), 120, smallest, None)
    assert max(e["peak_bytes"] for e in plan["stages"].values()) == smallest
    with pytest.raises(JobFileError, match="decode: .*drop --no-tiling"):
        memory.plan_memory(FULL_SIZE, "float16", "cuda", full_size_items(), 120, GIB, None, allow_tiling=False)


def test_plan_on_a_folder_of_configs_only(tmp_path):
    """`orchestrate plan` reads configs, never weights: the reference folder has none."""
    model = shutil.copytree(FULL_SIZE, tmp_path / "model")
    assert not list(model.rglob("*.safetensors"))
    job = write_job(tmp_path, """
        [job]
        model = "model"
        dtype = "float16"
        [[generation]]
        prompt = "a cat"
        width = 1024
        height = 1024
    """)
    result = CliRunner().invoke(app, ["plan", str(job), "--device", "cpu", "--max-ram", "2GiB", "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "encode   stream" in result.output and "budget 2.00 GiB" in result.output
    assert not (tmp_path / "work").exists()  # plan writes nothing without a job folder (its plan cache goes there)
    failed = CliRunner().invoke(app, ["plan", str(job), "--device", "cpu", "--max-ram", "100MiB", "--workdir", str(tmp_path / "work")])
    assert failed.exit_code == 2 and "NO: nothing fits" in failed.output and "smallest workable budget" in failed.output
    # A GPU job can be planned on a machine without one.
    cuda = CliRunner().invoke(app, ["plan", str(job), "--device", "cuda", "--max-vram", "1GiB", "--json", "--workdir", str(tmp_path / "work")])
    assert cuda.exit_code == 0, cuda.output
    plan = json.loads(cuda.output)
    assert plan["device_type"] == "cuda" and all(e["peak_bytes"] <= GIB for e in plan["stages"].values())


def test_plan_json_shape(tiny_model, tmp_path):
    job = write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [[generation]]
        prompt = "a cat"
        width = 256
        height = 256
    """)
    result = CliRunner().invoke(app, ["plan", str(job), "--device", "cpu", "--max-ram", "1GiB", "--json", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["budget_bytes"] == GIB and set(plan["stages"]) == {"encode", "denoise", "decode"}
    for entry in plan["stages"].values():
        assert {"strategy", "batch_size", "peak_bytes"} <= set(entry)
        assert entry["peak_bytes"] == entry["weights_bytes"] + entry["activation_bytes"] + entry["workspace_bytes"]
    assert plan["stages"]["decode"]["tile_size"] is None


def test_runtime_for_job_is_empty_without_a_budget(tiny_model, tmp_path):
    from orchestrator.jobfile import job as jobfile

    job = jobfile.load_job(write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [[generation]]
        prompt = "a cat"
    """))
    resolved = jobfile.resolve_job(job, tmp_path / "job", "cpu")
    assert memory.runtime_for_job(resolved, None, None) == {}
    runtime = memory.runtime_for_job(resolved, None, "1GiB")
    assert runtime["device_type"] == "cpu" and runtime["budget_bytes"] == runtime["host_budget_bytes"] == GIB
    assert memory.runtime_for_job(resolved, "512MiB", None)["budget_bytes"] == 512 * 1024**2  # --max-vram on the CPU


def test_decode_params_follow_the_planned_tiling_but_not_the_estimate():
    job = {"model": {"component_hashes": {"encode": "e", "denoise": "d", "decode": "c"}, "given": "m"}, "dtype": "float32",
           "clean_caption": False, "max_sequence_length": 120, "runtime": {},
           "items": [{"id": "0000-a", "prompt": "a", "negative_prompt": "", "seed": 1, "width": 256, "height": 256,
                      "guidance_scale": 4.5, "num_inference_steps": 2, "use_resolution_binning": False}]}

    def decode_params(runtime):
        return plan_units({**job, "runtime": runtime})["decode"][0].params["decode"]

    tiled = {"stages": {"decode": {"strategy": "tiled", "tile_size": 512, "batch_size": 1, "peak_bytes": 1}}}
    assert decode_params({}) == {"strategy": "full", "tile_size": None}
    assert decode_params(tiled) == {"strategy": "tiled", "tile_size": 512}
    tiled["stages"]["decode"]["peak_bytes"] = 2
    assert decode_params(tiled) == {"strategy": "tiled", "tile_size": 512}


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * GIB), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 1024**2), ("2048", 2048), ("8 gib", 8 * GIB), ("100kB", 100_000),
])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2 GiBs", "-1GiB", "0", "lots", "1.5.2GB", "2Gi"])
def test_parse_size_rejects(text):
    with pytest.raises(JobFileError, match="memory size"):
        memory.parse_size(text)


def test_exact_keeps_denoise_at_batch_1_where_a_budget_would_batch():
    """--exact (issue 8, point 4): on CUDA under a roomy budget the planner batches same-shaped
    items in denoise (not bitwise batch 1); --exact plans batch 1 and leaves the rest as it was."""
    items = full_size_items(4)
    batched = memory.plan_memory(FULL_SIZE, "float16", "cuda", items, 120, 40 * GIB, None)
    exact = memory.plan_memory(FULL_SIZE, "float16", "cuda", items, 120, 40 * GIB, None, exact=True)
    assert batched["stages"]["denoise"]["batch_size"] > 1
    assert exact["stages"]["denoise"]["batch_size"] == 1
    assert exact["stages"]["decode"] == batched["stages"]["decode"] and exact["stages"]["decode"]["tile_size"] is None


def test_exact_on_the_plan_command(tmp_path):
    job = write_job(tmp_path, f'[job]\nname = "x"\nmodel = "{FULL_SIZE}"\ndtype = "float16"\n'
                    '[[generation]]\nprompt = "a"\ncount = 4\nwidth = 1024\nheight = 1024\n')
    rows = {}
    for flag in ([], ["--exact"]):
        result = CliRunner().invoke(app, ["plan", str(job), "--workdir", str(tmp_path / "w"), "--device", "cuda", "--max-vram", "40GiB", *flag])
        assert result.exit_code == 0, result.output
        rows[bool(flag)] = next(line.split() for line in result.output.splitlines() if line.startswith("denoise"))
    assert rows[False][2] != "1" and rows[True][2] == "1", rows


def test_host_memory_is_planned_on_cuda_too():
    """Issue 8, point 8: on CUDA, --max-ram bounds the weights a stage keeps on the host. The
    resident T5 loads straight to the device (0 on the host); a streamed one keeps its embedding
    table and a read-ahead block there; the transformer (resident: loaded, then moved; offload:
    kept) and the VAE pass through the host whole. A box with little RAM is an error naming it."""
    configs = estimate.ModelConfigs.read(FULL_SIZE)
    items = full_size_items()
    resident_t5 = estimate.estimate_encode(configs, "float16", "cuda", "resident", 1, 120)
    streamed_t5 = estimate.estimate_encode(configs, "float16", "cuda", "stream", 1, 120)
    assert estimate.estimate_host_bytes(configs, "float16", resident_t5) == 0
    # the 32128 x 4096 fp16 embedding (0.25 GiB) and one block (0.44 GiB: its wo stays fp32)
    assert 0.6 * GIB < estimate.estimate_host_bytes(configs, "float16", streamed_t5) < 0.75 * GIB
    transformer = estimate.estimate_host_bytes(configs, "float16", estimate.estimate_denoise(configs, "float16", "cuda", "resident", 1, [(128, 128, True)], 120))
    assert 1.1 * GIB < transformer < 1.3 * GIB  # PixArt-XL-2's 611 M parameters in fp16
    # 24 GiB card, 16 GiB box: everything resident, as without --max-ram.
    roomy = memory.plan_memory(FULL_SIZE, "float16", "cuda", items, 120, 24 * GIB, 16 * GIB)
    assert {s: e["strategy"] for s, e in roomy["stages"].items()} == {"encode": "resident", "denoise": "resident", "decode": "full"}
    # 2 GiB card streams T5; a 256 MiB box cannot hold its embedding table, nor the transformer.
    with pytest.raises(JobFileError, match=r"^encode: no strategy that fits the device budget of 2\.00 GiB also fits the host budget of 256\.00 MiB"):
        memory.plan_memory(FULL_SIZE, "float16", "cuda", items, 120, 2 * GIB, 256 * 1024**2)
    # On the CPU --max-ram is the budget itself; the host rule does not apply twice.
    assert memory.plan_memory(FULL_SIZE, "float16", "cpu", items, 120, 24 * GIB, 24 * GIB)["stages"]["denoise"]["strategy"] == "resident"


def test_sigma_estimates_match_profiler(tmp_path):
    """PixArt-Σ (issue 7): a Σ twin at sample_size 256 (the 2K model's bins), 300 tokens: encode
    resident and denoise resident (the Σ pipeline: no micro-conditions) within 5% of the profiler."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

    from orchestrator.tools.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "sigma", family="sigma", sample_size=256)
    configs = estimate.ModelConfigs.read(path)
    tokenizer = T5Tokenizer.from_pretrained(path, subfolder="tokenizer")
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32).eval()
    encoder = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=None, transformer=None, scheduler=None)
    transformer = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32).eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler")
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    embeds, mask, side = torch.randn(1, 300, transformer.config.caption_channels), torch.ones(1, 300, dtype=torch.long), 512

    def denoise():
        pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask,
             negative_prompt=None, height=side, width=side, num_inference_steps=3, output_type="latent",
             use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(0))

    with torch.no_grad():
        measured = {
            "encode": weight_bytes(t5) + profiled_peak(lambda: encoder.encode_prompt(
                "text", do_classifier_free_guidance=False, device=torch.device("cpu"), clean_caption=False, max_sequence_length=300)),
            "denoise": weight_bytes(transformer) + profiled_peak(denoise),
        }
    estimated = {
        "encode": cpu_total(estimate.estimate_encode(configs, "float32", "cpu", "resident", 1, 300)),
        "denoise": cpu_total(estimate.estimate_denoise(configs, "float32", "cpu", "resident", 1, [(side, side, True)], 300)),
    }
    assert_close("sigma", estimated, measured)
