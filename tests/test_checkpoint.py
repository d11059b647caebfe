"""`orchestrate convert FILE --out DIR` (issue 19, point 5): single-file checkpoints to a transformer/ folder.

The tiny twins are written in PixArt's original key layout by `to_original` below, the inverse of
diffusers' conversion scripts written out independently, so a wrong rename, split order or dropped
key in orchestrator/tools/checkpoint.py shows as unequal weights or a different image.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.tools import checkpoint
from stages.contract import JobFileError
from tests.conftest import load_png, resolved_items, run_inprocess, write_job


@pytest.fixture(scope="module")
def tiny_sigma(tmp_path_factory):
    from orchestrator.tools.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sigma", family="sigma", sample_size=64)


def diffusers_state(model) -> dict:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer", use_safetensors=True).state_dict()


def to_original(sd: dict, y_tokens: int, pos_tokens: int | None = None) -> dict:
    """PixArt's original keys for a diffusers state dict: q, k, v joined into attn.qkv, k, v into
    cross_attn.kv_linear, plus the learned empty caption and (optionally) the sin-cos buffer."""
    o = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
         "t_block.1.weight": sd["adaln_single.linear.weight"], "t_block.1.bias": sd["adaln_single.linear.bias"],
         "final_layer.linear.weight": sd["proj_out.weight"], "final_layer.linear.bias": sd["proj_out.bias"],
         "final_layer.scale_shift_table": sd["scale_shift_table"]}
    for p in ("weight", "bias"):
        o[f"y_embedder.y_proj.fc1.{p}"] = sd[f"caption_projection.linear_1.{p}"]
        o[f"y_embedder.y_proj.fc2.{p}"] = sd[f"caption_projection.linear_2.{p}"]
        for name, orig in (("timestep_embedder", "t_embedder"), ("resolution_embedder", "csize_embedder"), ("aspect_ratio_embedder", "ar_embedder")):
            if f"adaln_single.emb.{name}.linear_1.{p}" in sd:
                o[f"{orig}.mlp.0.{p}"] = sd[f"adaln_single.emb.{name}.linear_1.{p}"]
                o[f"{orig}.mlp.2.{p}"] = sd[f"adaln_single.emb.{name}.linear_2.{p}"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for d in range(depth):
        t, b = f"transformer_blocks.{d}", f"blocks.{d}"
        o[f"{b}.scale_shift_table"] = sd[f"{t}.scale_shift_table"]
        for p in ("weight", "bias"):
            o[f"{b}.attn.qkv.{p}"] = torch.cat([sd[f"{t}.attn1.to_{x}.{p}"] for x in "qkv"])
            o[f"{b}.attn.proj.{p}"] = sd[f"{t}.attn1.to_out.0.{p}"]
            o[f"{b}.mlp.fc1.{p}"] = sd[f"{t}.ff.net.0.proj.{p}"]
            o[f"{b}.mlp.fc2.{p}"] = sd[f"{t}.ff.net.2.{p}"]
            o[f"{b}.cross_attn.q_linear.{p}"] = sd[f"{t}.attn2.to_q.{p}"]
            o[f"{b}.cross_attn.kv_linear.{p}"] = torch.cat([sd[f"{t}.attn2.to_k.{p}"], sd[f"{t}.attn2.to_v.{p}"]])
            o[f"{b}.cross_attn.proj.{p}"] = sd[f"{t}.attn2.to_out.0.{p}"]
    hidden, caption = sd["caption_projection.linear_1.weight"].shape
    o["y_embedder.y_embedding"] = torch.randn(y_tokens, caption)  # [tokens, caption width]
    if pos_tokens:
        o["pos_embed"] = torch.randn(1, pos_tokens, hidden)  # [1, (sample / patch)^2, hidden]
    return {k: v.clone() for k, v in o.items()}


def convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def job_body(model, transformer=None) -> str:
    components = f'[job.components]\ntransformer = "{transformer}"\n' if transformer else ""
    return (f'[job]\nname = "ckpt"\nmodel = "{model}"\n{components}[defaults]\nnum_inference_steps = 2\nuse_resolution_binning = false\n'
            'width = 64\nheight = 64\n[[generation]]\nprompt = "a cute cat riding a horse at sunset"\nseed = 7\n')


def assert_same_images(model, out, tmp_path):
    """The job with [job.components] transformer = out makes the same PNGs, bit for bit, as with the model's own."""
    base, _, _ = run_inprocess(write_job(tmp_path, job_body(model), "base.toml"), tmp_path / "base")
    conv, _, _ = run_inprocess(write_job(tmp_path, job_body(model, out), "conv.toml"), tmp_path / "conv")
    for a, b in zip(resolved_items(base), resolved_items(conv), strict=True):
        assert np.array_equal(load_png(base / a["image"]), load_png(conv / b["image"])), a["id"]


def assert_same_weights(model, out):
    want, got = diffusers_state(model), diffusers_state(out)
    assert list(want) == list(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


def test_original_alpha_checkpoint_round_trips_to_bit_identical_images(tiny_model, tmp_path):
    """α (micro-conditions) in the original layout, as .safetensors: same weights, same images,
    and the record names the source hash and the config."""
    from safetensors.torch import save_file

    source = tmp_path / "my-alpha.safetensors"
    save_file(to_original(diffusers_state(tiny_model), 120, 64 * 64), str(source))
    out = tmp_path / "converted"
    result = convert(source, "--out", out, "--config", tiny_model / "transformer")
    assert result.exit_code == 0, result.output
    assert "original PixArt keys" in result.output and f'transformer = "{out}"' in result.output
    assert sorted(p.name for p in out.iterdir()) == ["converted-from.json", "transformer"]
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    record = json.loads((out / "converted-from.json").read_text())
    from stages.files import sha256_file

    assert record["source_sha256"] == sha256_file(source) and record["config"] == str((tiny_model / "transformer" / "config.json").resolve())
    assert record["layout"] == "original PixArt" and record["config_chosen_by"] == "--config"
    assert_same_weights(tiny_model, out)
    assert_same_images(tiny_model, out, tmp_path)
    assert not list(tmp_path.glob(".tmp-convert-*"))


def test_original_sigma_pth_under_state_dict_round_trips(tiny_sigma, tmp_path):
    """Σ (no micro-conditions) as a .pth whose tensors sit under `state_dict` beside other entries,
    as PixArt's training checkpoints are saved."""
    source = tmp_path / "PixArt-Sigma-finetune.pth"
    torch.save({"state_dict": to_original(diffusers_state(tiny_sigma), 300), "epoch": 3}, source)
    out = tmp_path / "sigma"
    result = convert(source, "--out", out, "--config", tiny_sigma / "transformer" / "config.json")
    assert result.exit_code == 0, result.output
    assert "under 'state_dict'" in result.output
    assert json.loads((out / "converted-from.json").read_text())["unwrapped"] == "state_dict"
    assert_same_weights(tiny_sigma, out)
    assert_same_images(tiny_sigma, out, tmp_path)


def test_a_diffusers_keyed_single_file_is_checked_and_written(tiny_model, tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "community-finetune.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_state(tiny_model).items()}, str(source))
    out = tmp_path / "community"
    result = convert(source, "--out", out, "--config", tiny_model / "transformer")
    assert result.exit_code == 0, result.output
    assert "(diffusers keys)" in result.output
    assert json.loads((out / "converted-from.json").read_text())["layout"] == "diffusers"
    assert_same_weights(tiny_model, out)


def _one_line(result, *says):
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: convert: "), line
    for s in says:
        assert s in line, line
    return line


def test_refusals_are_one_line_and_write_nothing(tiny_model, tmp_path):
    from safetensors.torch import save_file

    config = tiny_model / "transformer"
    original = to_original(diffusers_state(tiny_model), 120)

    class Payload:  # what a malicious checkpoint carries
        def __reduce__(self):
            return (print, ("this ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": {"x_embedder.proj.weight": Payload()}}))
    result = convert(evil, "--out", tmp_path / "o", "--config", config)
    _one_line(result, "evil.pth", "refused it (UnpicklingError: ", "not converted")
    assert "this ran" not in result.output

    missing = dict(original)
    del missing["blocks.1.attn.proj.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    _one_line(convert(tmp_path / "missing.pth", "--out", tmp_path / "o", "--config", config), "missing.pth", "lacks", "blocks.1.attn.proj.bias")

    unknown = dict(original, **{"blocks.0.attn.lora_up.weight": torch.zeros(2)})
    torch.save(unknown, tmp_path / "unknown.pth")
    _one_line(convert(tmp_path / "unknown.pth", "--out", tmp_path / "o", "--config", config), "unknown.pth", "blocks.0.attn.lora_up.weight")

    wrong = {k: v.contiguous() for k, v in diffusers_state(tiny_model).items()}
    wrong["transformer_blocks.1.attn2.to_k.weight"] = torch.zeros(5, 7)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    _one_line(convert(tmp_path / "wrong.safetensors", "--out", tmp_path / "o", "--config", config),
              "wrong.safetensors", "misshapen transformer_blocks.1.attn2.to_k.weight (5, 7)")

    torch.save({f"module.{k}": v for k, v in original.items()}, tmp_path / "ddp.pth")  # another program's prefix
    _one_line(convert(tmp_path / "ddp.pth", "--out", tmp_path / "o"), "ddp.pth holds neither PixArt's original keys", "e.g. module.ar_embedder.mlp.0.bias")

    torch.save(original, tmp_path / "tiny.pth")  # a twin's shapes: no reference config fits
    _one_line(convert(tmp_path / "tiny.pth", "--out", tmp_path / "o"), "match no reference config", "--config PATH")
    _one_line(convert(tmp_path / "tiny.pth", "--out", tmp_path / "o", "--config", "PixArt-XL-3"), "PixArt-XL-3", "PixArt-Sigma-XL-2-512-MS")
    _one_line(convert(tmp_path / "tiny.pth"), "give the folder to write with --out DIR")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".tmp-convert-*"))


def test_a_non_empty_out_is_replaced_only_with_force(tiny_model, tmp_path):
    torch.save(to_original(diffusers_state(tiny_model), 120), tmp_path / "tiny.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [tmp_path / "tiny.pth", "--out", out, "--config", tiny_model / "transformer"]
    _one_line(convert(*args), "--out", "is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert convert(*args, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["converted-from.json", "transformer"]
    assert not list(tmp_path.glob(".old-convert-*")) and not list(tmp_path.glob(".tmp-convert-*"))


# ---------------------------------------------------------------------------------------------
# Choosing the reference config from {key: shape}, no tensors needed


def test_each_release_name_picks_its_own_reference_config():
    configs = checkpoint.reference_configs()
    assert len(configs) == 7
    for name, config in configs.items():
        assert checkpoint.choose_config(checkpoint.expected_shapes(config), f"{name}.pth")[0] == name


def test_the_weights_decide_where_they_can_and_the_name_or_config_where_they_cannot():
    configs = checkpoint.reference_configs()
    alpha_1024 = checkpoint.expected_shapes(configs["PixArt-XL-2-1024-MS"])  # the only one with micro-conditions
    sigma = checkpoint.expected_shapes(configs["PixArt-Sigma-XL-2-1024-MS"])
    assert checkpoint.choose_config(alpha_1024, "finetune.pth")[0] == "PixArt-XL-2-1024-MS"
    # Σ 256 / 512 / 1024 / 2K share every shape: pos_embed's length or the name tells them apart.
    assert checkpoint.choose_config(sigma, "x.pth", sample_size=256, family="sigma")[0] == "PixArt-Sigma-XL-2-2K-MS"
    assert checkpoint.choose_config(sigma, "my-sigma-512-style.safetensors") == ("PixArt-Sigma-XL-2-512-MS", "the weights' shapes, the file name")
    assert checkpoint.choose_config(sigma, "style.pth", family="sigma", sample_size=32)[0] == "PixArt-Sigma-XL-2-256x256"
    with pytest.raises(JobFileError) as caught:
        checkpoint.choose_config(sigma, "style.pth", family="sigma")
    assert "pass --config NAME, one of: " in str(caught.value)
    for name in ("PixArt-Sigma-XL-2-1024-MS", "PixArt-Sigma-XL-2-256x256", "PixArt-Sigma-XL-2-2K-MS", "PixArt-Sigma-XL-2-512-MS"):
        assert name in str(caught.value)
    assert "PixArt-XL-2-1024-MS" not in str(caught.value)
    # α 512 and its DMD distillation build the same model: the original release is named.
    assert checkpoint.choose_config(sigma, "alpha-512.pth", family="alpha", sample_size=64) == (
        "PixArt-XL-2-512x512", "the weights' shapes, pos_embed (sample_size 64), y_embedding (α caption length), "
                               "the same model as PixArt-Alpha-DMD-XL-2-512x512")
    # Σ 512 builds that model too, but the family decides how the job runs: still a choice to make.
    with pytest.raises(JobFileError, match="one of: PixArt-Alpha-DMD-XL-2-512x512, PixArt-Sigma-XL-2-512-MS, PixArt-XL-2-512x512"):
        checkpoint.choose_config(sigma, "community-512.safetensors")


def test_name_hints():
    assert checkpoint.name_hints("PixArt-Sigma-XL-2-2K-MS.pth") == (256, "sigma")
    assert checkpoint.name_hints("PixArt-XL-2-512x512.pth") == (64, None)
    assert checkpoint.name_hints("model-v1024.pth") == (None, None)  # 'v1024' is a version, not a size


def test_weight_hints_read_pos_embed_and_the_empty_caption():
    """Shapes of PixArt-Sigma-XL-2-2K-MS.pth and PixArt-XL-2-512x512.pth's extra tensors."""
    patch = {"x_embedder.proj.weight": (1152, 4, 2, 2)}
    assert checkpoint.weight_hints({**patch, "pos_embed": (1, 128 * 128, 1152), "y_embedder.y_embedding": (300, 4096)}) == (256, "sigma")
    assert checkpoint.weight_hints({**patch, "pos_embed": (1, 32 * 32, 1152), "y_embedder.y_embedding": (120, 4096)}) == (64, "alpha")
    assert checkpoint.weight_hints({**patch, "y_embedder.y_embedding": (77, 4096)}) == (None, None)


def test_an_ema_only_checkpoint_is_unwrapped(tiny_sigma, tmp_path):
    torch.save({"ema": to_original(diffusers_state(tiny_sigma), 300)}, tmp_path / "ema.pth")
    out = tmp_path / "ema"
    result = convert(tmp_path / "ema.pth", "--out", out, "--config", tiny_sigma / "transformer")
    assert result.exit_code == 0 and "under 'ema'" in result.output, result.output
    assert_same_weights(tiny_sigma, out)
