"""Guards LoRA support (issue 19, points 1-4): each format checked before anything loads, images
bit-identical on CPU float32 to diffusers' pipeline whose transformer got the same adapters through
peft, under the resident and the streamed strategy, and exactly the items whose LoRAs change remade."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import load_png, resolved_items, run_inprocess, write_job

# Attention and feed-forward of every block, and one module outside the blocks (streamed: resident).
TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2")


def _modules(tiny_model) -> dict:
    from stages.lora import meta_transformer

    model = meta_transformer(tiny_model / "transformer" / "config.json")
    names = [f"transformer_blocks.{i}.{t}" for i in range(len(model.transformer_blocks)) for t in TARGETS] + ["caption_projection.linear_1"]
    known = dict(model.named_modules())
    return {name: (known[name].in_features, known[name].out_features) for name in names}


def make_lora(tiny_model, seed: int, rank: int = 4, alpha: float = 8.0) -> dict:
    """Random LoRA weights keyed `<module>.lora_A.weight` (peft's names inside the transformer)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in _modules(tiny_model).items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.3
    return {"state": state, "rank": rank, "alpha": alpha, "targets": sorted(_modules(tiny_model))}


def save_peft(lora: dict, folder) -> None:
    """As peft's save_pretrained writes an adapter of a transformer: config + base_model.model.* keys."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["targets"]).save_pretrained(str(folder))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in lora["state"].items()}, str(folder / "adapter_model.safetensors"))


def save_diffusers(lora: dict, file, down_up: bool = True) -> None:
    """A diffusers-style single file: transformer.<module>.lora.down/up (or lora_A/B) and .alpha."""
    from safetensors.torch import save_file

    out = {}
    for key, tensor in lora["state"].items():
        module, part = key.rsplit(".lora_", 1)
        name = ("lora.down" if part.startswith("A") else "lora.up") if down_up else f"lora_{part[0]}"
        out[f"transformer.{module}.{name}.weight"] = tensor.contiguous()
        out[f"transformer.{module}.alpha"] = torch.tensor(lora["alpha"])
    save_file(out, str(file))


OMI = {"attn1.to_q": "attn.qkv.0", "attn1.to_k": "attn.qkv.1", "attn1.to_v": "attn.qkv.2", "attn1.to_out.0": "attn.proj",
       "attn2.to_q": "cross_attn.q_linear", "attn2.to_k": "cross_attn.kv_linear.0", "attn2.to_v": "cross_attn.kv_linear.1",
       "attn2.to_out.0": "cross_attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}


def save_onetrainer(lora: dict, file, layout: str) -> None:
    """OneTrainer's PixArt LoRA layouts: kohya style (`lora_transformer_` + underscores) or "omi"
    (PixArt's original module names under `transformer.`), lora_down/lora_up and alpha."""
    from safetensors.torch import save_file

    out = {}
    for key, tensor in lora["state"].items():
        module, part = key.rsplit(".lora_", 1)
        if layout == "kohya":
            name = "lora_transformer_" + module.replace(".", "_")
        elif module.startswith("transformer_blocks."):
            _, index, rest = module.split(".", 2)
            name = f"transformer.blocks.{index}.{OMI[rest]}"
        else:
            name = {"caption_projection.linear_1": "transformer.y_embedder.y_proj.fc1"}[module]
        out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(lora["alpha"])
    save_file(out, str(file))


def reference_pipe(tiny_model, loras: list[tuple[dict, float]]):
    """diffusers' pipeline whose transformer got `loras` through peft, unmerged, scales set as
    diffusers' set_adapters does (LoraLayer.set_scale)."""
    from diffusers import PixArtAlphaPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for n, (lora, scale) in enumerate(loras):
        name = f"ref{n}"
        inject_adapter_in_model(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["targets"]), pipe.transformer, adapter_name=name)
        set_peft_model_state_dict(pipe.transformer, lora["state"], adapter_name=name)
        names.append((name, scale))
    for module in pipe.transformer.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([n for n, _ in names])
            for n, s in names:
                module.set_scale(n, s)
    return pipe


def reference_image(pipe, item: dict) -> np.ndarray:
    image = pipe(item["prompt"], negative_prompt=item["negative_prompt"], width=item["width"], height=item["height"],
                 guidance_scale=item["guidance_scale"], num_inference_steps=item["num_inference_steps"],
                 use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(item["seed"])).images[0]
    return np.asarray(image.convert("RGB"))


JOB = """
[job]
name = "{name}"
model = "{model}"
[defaults]
num_inference_steps = 2
width = 64
height = 64
use_resolution_binning = false
seed = 7
[[generation]]   # no LoRA
prompt = "a lighthouse at dusk"
[[generation]]   # scale 0
prompt = "a lighthouse at dusk"
loras = [{{ path = "{a}", scale = 0.0 }}]
[[generation]]   # one LoRA
prompt = "a lighthouse at dusk"
loras = [{{ path = "{a}", scale = 0.8 }}]
[[generation]]   # two at once
prompt = "a lighthouse at dusk"
loras = [{{ path = "{a}", scale = 0.8 }}, {{ path = "{b}", scale = -0.5 }}]
"""


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    a, b = make_lora(tiny_model, 1), make_lora(tiny_model, 2, rank=2, alpha=1.0)
    save_peft(a, folder / "a-peft")
    save_peft(b, folder / "b-peft")
    save_diffusers(a, folder / "a.safetensors")
    save_diffusers(b, folder / "b.safetensors", down_up=False)
    save_onetrainer(a, folder / "a-kohya.safetensors", "kohya")
    save_onetrainer(a, folder / "a-omi.safetensors", "omi")
    return folder, a, b


@pytest.mark.parametrize("name, fmt", [("a-kohya.safetensors", "kohya"), ("a-omi.safetensors", "onetrainer-omi"), ("a-peft", "peft")])
def test_each_layout_reads_as_the_diffusers_file(tiny_model, loras, name, fmt):
    """kohya and OneTrainer's "omi" layouts (and a PEFT folder) give the same peft config and
    tensors as the diffusers-style file, whose images test_loras_match_diffusers_with_peft checks."""
    from stages.lora import inspect_lora, meta_transformer, read_lora

    folder, _, _ = loras
    model = meta_transformer(tiny_model / "transformer" / "config.json")
    names = [n for n, _ in model.named_modules()]
    assert inspect_lora(folder / name, model)["format"] == fmt
    config, state = read_lora(folder / name, names)
    reference_config, reference_state = read_lora(folder / "a.safetensors", names)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (reference_config.r, reference_config.lora_alpha,
                                                                           sorted(reference_config.target_modules))
    assert state.keys() == reference_state.keys() and all(torch.equal(state[k], reference_state[k]) for k in state)


@pytest.mark.parametrize("fmt, strategy", [("peft", "resident"), ("diffusers", "resident"), ("peft", "offload")])
def test_loras_match_diffusers_with_peft_bit_for_bit(tiny_model, loras, tmp_path, fmt, strategy):
    folder, a, b = loras
    paths = {"a": folder / "a-peft", "b": folder / "b-peft"} if fmt == "peft" else {"a": folder / "a.safetensors", "b": folder / "b.safetensors"}
    job_file = write_job(tmp_path, JOB.format(name=f"lora-{fmt}", model=tiny_model, **paths))
    runtime = {"stages": {"denoise": {"strategy": strategy, "batch_size": 1}}}
    job_dir, runs, _ = run_inprocess(job_file, tmp_path / "work", runtime=runtime)
    if strategy == "offload":  # really streamed block by block
        assert runs[1].summary["weight_bytes_moved"] > 0
    items = resolved_items(job_dir)
    ours = [load_png(job_dir / item["image"]) for item in items]
    assert np.array_equal(ours[1], ours[0]), "scale 0 must equal no LoRA"
    assert not np.array_equal(ours[2], ours[0]) and not np.array_equal(ours[3], ours[2]), "the LoRAs must change the image"
    for index, sets in ((0, []), (2, [(a, 0.8)]), (3, [(a, 0.8), (b, -0.5)])):
        theirs = reference_image(reference_pipe(tiny_model, sets), items[index])
        assert np.array_equal(ours[index], theirs), f"{items[index]['id']}: max diff {np.abs(ours[index].astype(int) - theirs).max()}"


def test_rescaling_a_lora_remakes_exactly_its_items_and_records_it(tiny_model, loras, tmp_path):
    from orchestrator.jobfile import job as jobfile
    from orchestrator.planning.plan import plan_job
    from orchestrator.planning.prepare import describe_model
    from orchestrator.views.gallery import generation_block

    folder, _, _ = loras
    body = JOB.format(name="stale", model=tiny_model, a=folder / "a.safetensors", b=folder / "b-peft")
    job_file = write_job(tmp_path, body)
    job_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
    items = resolved_items(job_dir)
    from PIL import Image

    with Image.open(job_dir / items[3]["image"]) as image:
        meta = json.loads(image.text["loras"])
    assert meta == [{"path": str(folder / "a.safetensors"), "scale": 0.8}, {"path": str(folder / "b-peft"), "scale": -0.5}]
    block = generation_block(items[3], json.loads((job_dir / "job.resolved.json").read_text()))
    assert f'loras = [{{ path = "{folder / "a.safetensors"}", scale = 0.8 }}, {{ path = "{folder / "b-peft"}", scale = -0.5 }}]' in block
    from orchestrator.views import gallery

    gallery.write_gallery(job_dir, json.loads((job_dir / "job.resolved.json").read_text()))
    shown = "".join(path.read_text() for path in (job_dir / "gallery").glob("items-*.js"))
    assert "a.safetensors x0.8, " in shown and "b-peft x-0.5" in shown  # the details line of item 3
    write_job(tmp_path, body.replace("scale = -0.5", "scale = -0.25"))
    job = jobfile.load_job(job_file)
    resolved = jobfile.resolve_job(job, job_dir, "cpu")
    assert [i["seed"] for i in resolved["items"]] == [i["seed"] for i in items]
    states = plan_job(job_dir, resolved)
    for stage in ("denoise", "decode"):
        stale = [s.unit.key for s in states[stage] if s.state != "done"]
        assert stale == [items[3]["id"]], (stage, stale)
    assert all(s.state == "done" for s in states["encode"])
    assert any("loras" in line and "x-0.25" in line and items[3]["id"] in line for line in describe_model(resolved))


def _resolve(tmp_path, tiny_model, loras_toml: str):
    from orchestrator.jobfile import job as jobfile

    job_file = write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [[generation]]
        prompt = "x"
        loras = {loras_toml}
    """)
    return jobfile.resolve_job(jobfile.load_job(job_file), tmp_path / "work" / "job", "cpu")


def test_bad_loras_are_refused_in_one_line_before_anything_loads(tiny_model, loras, tmp_path):
    from safetensors.torch import save_file

    from stages.contract import JobFileError

    folder, a, _ = loras
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 8)}, str(tmp_path / "sdxl.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 999),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(4, 2)}, str(tmp_path / "shape.safetensors"))
    save_file({"transformer.transformer_blocks.99.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.transformer_blocks.99.attn1.to_q.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / "deep.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes((folder / "a.safetensors").read_bytes()[:-10])
    (tmp_path / "empty-folder").mkdir()
    if hasattr(os, "mkfifo"):  # POSIX; opening it would block: refused from its type
        os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "adapter_model.safetensors").write_bytes((folder / "a-peft" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "mixed" / "adapter_config.json").write_text((folder / "b-peft" / "adapter_config.json").read_text())
    cases = {
        '[{ path = "missing.safetensors" }]': r"missing.safetensors: not found",
        '[{ path = "sdxl.safetensors" }]': r"sdxl.safetensors: 1 of 1 modules are not in this PixArt transformer \(first: lora_unet_down_blocks_0_attn.lora_down.weight\); it looks like a LoRA for a Stable Diffusion UNet",
        '[{ path = "shape.safetensors" }]': r"shape.safetensors: key 'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' has shape \[2, 999\]",
        '[{ path = "deep.safetensors" }]': r"deep.safetensors: 1 of 1 modules are not in this PixArt transformer \(first: transformer.transformer_blocks.99",
        '[{ path = "trunc.safetensors" }]': r"trunc.safetensors: truncated",
        '[{ path = "empty-folder" }]': r"empty-folder: a folder needs adapter_config.json",
        **({'[{ path = "fifo.safetensors" }]': r"fifo.safetensors: not a regular file"} if hasattr(os, "mkfifo") else {}),
        '[{ path = "mixed" }]': r"mixed/adapter_model.safetensors: key '.*lora_A.weight' has rank 4, but adapter_config.json says r = 2",
        '[{ path = "x.safetensors", scale = "high" }]': r"'scale' = 'high' must be a finite number",
        '[{ file = "x" }]': r"unknown key 'file'",
        f'[{{ path = "{folder / "a-peft"}" }}, {{ path = "{folder / "a-peft"}", scale = 0.5 }}]': r"listed twice",
    }
    for toml, pattern in cases.items():
        with pytest.raises(JobFileError, match=pattern) as caught:
            _resolve(tmp_path, tiny_model, toml)
        assert "\n" not in str(caught.value)


def test_the_plan_counts_the_adapter_bytes(tiny_model, loras, tmp_path):
    from orchestrator.planning.memory import choose_strategies

    folder, a, b = loras
    plain = _resolve(tmp_path, tiny_model, "[]")
    with_two = _resolve(tmp_path, tiny_model, f'[{{ path = "{folder / "a-peft"}" }}, {{ path = "{folder / "b.safetensors"}" }}]')
    params = sum(t.numel() for lora in (a, b) for t in lora["state"].values())

    def denoise_weights(resolved):
        return choose_strategies(tiny_model, "float32", "cpu", resolved["items"], 16, None)["denoise"].weights_bytes

    assert denoise_weights(with_two) - denoise_weights(plain) == params * 4  # peft keeps adapters in float32


def test_defaults_apply_to_every_entry_an_entry_may_clear_them_and_a_bad_lora_exits_2(tiny_model, loras, tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.jobfile import job as jobfile

    folder, _, _ = loras
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "style.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    job_file = write_job(tmp_path, f"""
        [job]
        model = "{tiny_model}"
        [defaults]
        loras = [{{ path = "l/style.safetensors", scale = 0.5 }}]
        [[generation]]
        prompt = "x"
        [[generation]]
        prompt = "y"
        loras = []
    """)
    items = jobfile.resolve_job(jobfile.load_job(job_file), tmp_path / "work" / "job", "cpu")["items"]
    assert [(lora["path"], lora["scale"], lora["format"]) for lora in items[0]["loras"]] == [(str(tmp_path / "l" / "style.safetensors"), 0.5, "diffusers")]
    assert "loras" not in items[1]  # no LoRA: the item's params are as before this feature
    (tmp_path / "l" / "style.safetensors").write_bytes(b"not a safetensors file")
    for command in ("run", "status"):
        result = CliRunner().invoke(app, [command, str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert "LoRA" in result.output and "style.safetensors: not a readable safetensors file" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "work").exists()  # refused before anything was written
