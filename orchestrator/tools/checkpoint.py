"""`orchestrate convert FILE --out DIR`: one checkpoint file to a diffusers transformer/ folder.

Reads PixArt's original releases (PixArt-XL-2-1024-MS.pth, PixArt-Sigma-XL-2-512-MS.pth, ...: keys
x_embedder, t_embedder, t_block, y_embedder, blocks.N.attn.qkv, blocks.N.cross_attn.q_linear /
kv_linear, final_layer; the file may wrap them in `state_dict` or `ema`) or a single diffusers-keyed
transformer .safetensors (community fine-tunes). The original keys are renamed and split exactly as
diffusers' scripts/convert_pixart_{alpha,sigma}_to_diffusers.py do; `y_embedder.y_embedding` (the
learned empty caption, used only to drop captions in training) and the fixed sin-cos `pos_embed`
buffer are dropped there too, since diffusers' model has neither.

The config is one of orchestrator/reference_configs/ chosen by the weights' shapes (depth, widths,
patch and channels, micro-conditions), then by what the file holds beyond them (`pos_embed`'s
length gives the sample size, `y_embedding`'s the caption length: 120 tokens α, 300 Σ), then by the
file name (an official release name, or 256/512/1024/2K and alpha/sigma in it); still ambiguous is
an error listing the choices for `--config NAME` (which also takes a path to a config.json).

DIR gets transformer/config.json, transformer/diffusion_pytorch_model.safetensors and
converted-from.json (source file and sha256, layout, config chosen and why), written in a temporary
folder beside DIR and renamed into place; a non-empty DIR is replaced only with --force.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from pathlib import Path

from stages.contract import JobFileError
from stages.files import MAX_CONFIG_BYTES, publish_json, read_json_limited, sha256_file
from stages.measure import format_bytes

REFERENCE_CONFIGS = Path(__file__).parent.parent / "reference_configs"
CONVERTED_FROM = "converted-from.json"
# The original PixArt's caption embedder holds one learned row per token: 120 for α (T5 at 120
# tokens), 300 for Σ (diffusers' PixArtSigmaPipeline max_sequence_length).
CAPTION_TOKENS = {120: "alpha", 300: "sigma"}
# The diffusers scripts' --image_size (pixels) for each token in a release name; sample_size = px / 8.
_NAME_SIZES = {"256": 256, "512": 512, "1024": 1024, "2k": 2048, "2048": 2048}
# The checkpoints PixArt published in the original layout (issue 19 lists them).
ORIGINAL_RELEASES = ("PixArt-XL-2-1024-MS", "PixArt-XL-2-512x512", "PixArt-Sigma-XL-2-256x256", "PixArt-Sigma-XL-2-512-MS",
                     "PixArt-Sigma-XL-2-1024-MS", "PixArt-Sigma-XL-2-2K-MS")
_ORIGINAL_MARKERS = ("x_embedder.", "t_block.", "blocks.0.attn.qkv.weight", "final_layer.")


def reference_configs() -> dict[str, dict]:
    """Name -> transformer config of every reference config that has one."""
    return {p.parent.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(REFERENCE_CONFIGS.glob("*/transformer/config.json"))}


def family_of(name: str) -> str:
    return "sigma" if "sigma" in name.lower() else "alpha"


def expected_shapes(config: dict) -> dict[str, tuple]:
    """{diffusers key: shape} of PixArtTransformer2DModel(config), built on the meta device (no memory)."""
    return dict(_shapes(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _shapes(config_json: str) -> tuple:
    import torch
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(json.loads(config_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


@functools.lru_cache(maxsize=32)
def _effective(config_json: str) -> str:
    """The config diffusers builds the model from, defaults and derived values filled, metadata left out."""
    import torch
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        config = PixArtTransformer2DModel.from_config(json.loads(config_json)).config
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)


def name_hints(file_name: str) -> tuple[int | None, str | None]:
    """(sample_size, family) the file name states, e.g. 'PixArt-Sigma-XL-2-2K-MS.pth' -> (256, 'sigma')."""
    stem = file_name.lower()
    sizes = {_NAME_SIZES[m] for m in re.findall(r"(?<![0-9a-z])(256|512|1024|2048|2k)(?![0-9])", stem)}
    families = {f for f in ("alpha", "sigma") if f in stem}
    return (sizes.pop() // 8 if len(sizes) == 1 else None), (families.pop() if len(families) == 1 else None)


def choose_config(shapes: dict[str, tuple], file_name: str = "", sample_size: int | None = None, family: str | None = None,
                  configs: dict[str, dict] | None = None) -> tuple[str, str]:
    """(reference config name, why) for weights of these diffusers shapes. `sample_size` and `family`
    are what the weights themselves say (pos_embed, y_embedding), so they filter strictly; the file
    name only narrows a choice it leaves non-empty. JobFileError when none or several remain."""
    configs = reference_configs() if configs is None else configs
    by_shape = [n for n, c in configs.items() if expected_shapes(c) == shapes]
    if not by_shape:
        raise JobFileError(f"convert: {file_name or 'the file'}: its weights' shapes match no reference config "
                           f"({', '.join(configs)}); give the transformer config.json with --config PATH")
    left, why = by_shape, ["the weights' shapes"]
    if sample_size is not None:
        left = [n for n in left if configs[n]["sample_size"] == sample_size]
        why.append(f"pos_embed (sample_size {sample_size})")
    if family is not None:
        left = [n for n in left if family_of(n) == family]
        why.append(f"y_embedding ({'α' if family == 'alpha' else 'Σ'} caption length)")
    exact = [n for n in left if n.lower() == Path(file_name).stem.lower()]
    if exact:
        return exact[0], ", ".join(why + ["the file name"])
    hinted_size, hinted_family = name_hints(Path(file_name).name)
    for keep, what in ((lambda n: configs[n]["sample_size"] == hinted_size, hinted_size), (lambda n: family_of(n) == hinted_family, hinted_family)):
        narrowed = [n for n in left if keep(n)] if what is not None else left
        if narrowed and len(narrowed) < len(left):
            left = narrowed
            why.append("the file name")
    if len(left) > 1 and len({family_of(n) for n in left}) == 1 and len({_effective(json.dumps(configs[n], sort_keys=True)) for n in left}) == 1:
        # One family and one model (e.g. α 512 and its DMD distillation: their configs differ only in
        # metadata): the choice changes nothing, so name the original release among them.
        chosen = sorted(left, key=lambda n: n not in ORIGINAL_RELEASES)[0]
        why.append(f"the same model as {', '.join(n for n in left if n != chosen)}")
        left = [chosen]
    if len(left) == 1:
        return left[0], ", ".join(dict.fromkeys(why))
    choices = left or by_shape
    raise JobFileError(f"convert: {file_name or 'the file'}: cannot tell which config it needs from its weights and name; "
                       f"pass --config NAME, one of: {', '.join(choices)} (or --config PATH to a transformer config.json)")


def weight_hints(shapes: dict[str, tuple]) -> tuple[int | None, str | None]:
    """(sample_size, family) that an original checkpoint's extra tensors state: the sin-cos buffer
    `pos_embed` [1, (sample / patch)^2, hidden] and the empty caption `y_embedder.y_embedding`
    [tokens, caption width] (120 tokens α, 300 Σ)."""
    pos, patch, y = shapes.get("pos_embed"), shapes.get("x_embedder.proj.weight"), shapes.get("y_embedder.y_embedding")
    side = math.isqrt(pos[1]) if pos is not None and len(pos) == 3 else 0
    sample_size = side * patch[-1] if side and side * side == pos[1] and patch is not None and len(patch) == 4 else None
    return sample_size, (CAPTION_TOKENS.get(y[0]) if y is not None and len(y) == 2 else None)


def _read_state(path: Path) -> tuple[dict, str | None]:
    """The file's name -> tensor mapping and the wrapper it was unwrapped from, if any."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # SafetensorError for a damaged header
            raise JobFileError(f"convert: {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); not converted") from None
    else:
        from orchestrator.tools.convert import load_pickle_weights

        state = load_pickle_weights(path)
    wrapper = None
    if isinstance(state, dict):
        # PixArt's training checkpoints keep the model in `state_dict` (what diffusers' scripts read)
        # and sometimes an `ema` copy beside it; the scripts convert state_dict, so it comes first.
        for key in ("state_dict", "ema"):
            if isinstance(state.get(key), dict):
                state, wrapper = state[key], key
                break
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise JobFileError(f"convert: {path} does not hold a flat name -> tensor mapping (nor one under 'state_dict' or 'ema'); not converted")
    return state, wrapper


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def original_to_diffusers(state: dict, path: Path) -> dict:
    """The diffusers keys for PixArt's original ones (the mapping of diffusers' conversion scripts).
    JobFileError naming the first missing or unknown keys."""
    import torch

    src = dict(state)
    out, missing = {}, []

    def take(key):
        if key not in src:
            missing.append(key)
            return None
        return src.pop(key)

    def put(target, source):
        tensor = take(source)
        if tensor is not None:
            out[target] = tensor

    put("pos_embed.proj.weight", "x_embedder.proj.weight")
    put("pos_embed.proj.bias", "x_embedder.proj.bias")
    for i, fc in ((1, "fc1"), (2, "fc2")):
        for p in ("weight", "bias"):
            put(f"caption_projection.linear_{i}.{p}", f"y_embedder.y_proj.{fc}.{p}")
    embedders = [("timestep_embedder", "t_embedder")]
    if any(k.startswith("csize_embedder.") for k in src):  # α 1024-MS's micro-conditions (--micro_condition)
        embedders += [("resolution_embedder", "csize_embedder"), ("aspect_ratio_embedder", "ar_embedder")]
    for name, orig in embedders:
        for i, m in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                put(f"adaln_single.emb.{name}.linear_{i}.{p}", f"{orig}.mlp.{m}.{p}")
    for p in ("weight", "bias"):
        put(f"adaln_single.linear.{p}", f"t_block.1.{p}")
    depth = len({int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))})
    for d in range(depth):
        b, t = f"blocks.{d}", f"transformer_blocks.{d}"
        put(f"{t}.scale_shift_table", f"{b}.scale_shift_table")
        for p in ("weight", "bias"):
            qkv = take(f"{b}.attn.qkv.{p}")
            if qkv is not None:  # [3 * hidden, ...] -> q, k, v
                for name, part in zip(("to_q", "to_k", "to_v"), torch.chunk(qkv, 3, dim=0)):
                    out[f"{t}.attn1.{name}.{p}"] = part
            put(f"{t}.attn1.to_out.0.{p}", f"{b}.attn.proj.{p}")
            if f"{b}.attn.q_norm.{p}" in src:  # Σ trained with --qk_norm
                put(f"{t}.attn1.q_norm.{p}", f"{b}.attn.q_norm.{p}")
                put(f"{t}.attn1.k_norm.{p}", f"{b}.attn.k_norm.{p}")
            put(f"{t}.ff.net.0.proj.{p}", f"{b}.mlp.fc1.{p}")
            put(f"{t}.ff.net.2.{p}", f"{b}.mlp.fc2.{p}")
            put(f"{t}.attn2.to_q.{p}", f"{b}.cross_attn.q_linear.{p}")
            kv = take(f"{b}.cross_attn.kv_linear.{p}")
            if kv is not None:  # [2 * hidden, ...] -> k, v
                for name, part in zip(("to_k", "to_v"), torch.chunk(kv, 2, dim=0)):
                    out[f"{t}.attn2.{name}.{p}"] = part
            put(f"{t}.attn2.to_out.0.{p}", f"{b}.cross_attn.proj.{p}")
    for p in ("weight", "bias"):
        put(f"proj_out.{p}", f"final_layer.linear.{p}")
    put("scale_shift_table", "final_layer.scale_shift_table")
    for unused in ("y_embedder.y_embedding", "pos_embed"):  # dropped by the scripts too
        src.pop(unused, None)
    if missing:
        raise JobFileError(f"convert: {path} lacks keys of PixArt's original layout: {_first(missing)}; not converted")
    if src:
        raise JobFileError(f"convert: {path} has keys that PixArt's original layout does not: {_first(src)}; not converted")
    return out


def check_keys(tensors: dict, shapes: dict[str, tuple], path: Path, config: str) -> None:
    """One line naming the first missing, unknown or misshapen keys against the config's model."""
    missing, unknown = set(shapes) - set(tensors), set(tensors) - set(shapes)
    wrong = sorted(f"{k} {tuple(tensors[k].shape)} (wants {shapes[k]})" for k in set(tensors) & set(shapes) if tuple(tensors[k].shape) != shapes[k])
    for what, keys in (("lacks", missing), ("has unknown keys", unknown)):
        if keys:
            raise JobFileError(f"convert: {path} does not fit config {config}: it {what} {_first(keys)}; not converted")
    if wrong:
        raise JobFileError(f"convert: {path} does not fit config {config}: misshapen {_first(wrong, 2)}; not converted")


def _equal(a, b, torch) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _config_from_option(option: str, configs: dict[str, dict]) -> tuple[str, dict]:
    """--config NAME (a reference config) or PATH (a config.json, or a folder holding one)."""
    if option in configs:
        return option, configs[option]
    path = Path(option)
    if path.is_dir():
        path = path / "config.json" if (path / "config.json").is_file() else path / "transformer" / "config.json"
    if not path.is_file():
        raise JobFileError(f"convert: --config {option!r} is neither a reference config ({', '.join(configs)}) nor a config.json file")
    config = read_json_limited(path, "convert: --config", MAX_CONFIG_BYTES, fix="give a transformer config.json")
    if not isinstance(config, dict) or "num_layers" not in config:
        raise JobFileError(f"convert: --config {path} is not a transformer config (no num_layers); give a transformer config.json")
    return str(path.resolve()), config


def convert_checkpoint(path: Path, out: Path | None, config_option: str | None = None, force: bool = False) -> list[str]:
    """Convert one checkpoint file into `out`/transformer/; returns the lines to print."""
    from safetensors.torch import save_file

    path = Path(path)
    if out is None:
        raise JobFileError(f"convert: {path} is a file; give the folder to write with --out DIR (it gets transformer/)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobFileError(f"convert: --out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise JobFileError(f"convert: --out {out} is not empty; choose another folder or pass --force to replace it")
    if not path.is_file():
        raise JobFileError(f"convert: {path} does not exist; give a checkpoint file (.pth or .safetensors) or a component folder")
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
        raise JobFileError(f"convert: {path} is not a .pth, .pt, .bin, .ckpt or .safetensors file")

    state, wrapper = _read_state(path)
    original = any(k.startswith(_ORIGINAL_MARKERS) for k in state)
    sample_size, family = weight_hints({k: tuple(v.shape) for k, v in state.items()}) if original else (None, None)
    if not original and not any(k.startswith(("transformer_blocks.", "pos_embed.proj.")) for k in state):
        raise JobFileError(f"convert: {path} holds neither PixArt's original keys (x_embedder, blocks.N...) nor diffusers' "
                           f"(pos_embed.proj, transformer_blocks.N...), e.g. {_first(state)}; not a PixArt transformer checkpoint")
    tensors = original_to_diffusers(state, path) if original else state
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    configs = reference_configs()
    if config_option:
        name, config = _config_from_option(config_option, configs)
        why = "--config"
    else:
        name, why = choose_config(shapes, path.name, sample_size, family, configs)
        config = configs[name]
    check_keys(tensors, expected_shapes(config), path, name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-convert-{os.getpid()}-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "transformer").mkdir(parents=True)
        (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # Chunked q/k/v are views of one storage, which safetensors refuses: each gets its own copy.
        weights = tmp / "transformer" / "diffusion_pytorch_model.safetensors"
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
        import torch
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as back:  # one tensor at a time: peak memory stays at twice the weights
            written = set(back.keys())
            bad = [k for k in tensors if k not in written or not _equal(back.get_tensor(k), tensors[k], torch)]
        if bad or written != set(tensors):
            raise JobFileError(f"convert: {weights.name} does not read back equal to {path.name} at {_first(bad or written ^ set(tensors))}; nothing written")
        record = {"format_version": 1, "source": str(path.resolve()), "source_sha256": sha256_file(path), "source_bytes": path.stat().st_size,
                  "layout": "original PixArt" if original else "diffusers", "unwrapped": wrapper, "config": name, "config_chosen_by": why,
                  "tensors": len(tensors)}
        publish_json(tmp / CONVERTED_FROM, record)
        if out.exists():  # --force (checked above): the old folder goes only once the new one is complete
            old = out.parent / f".old-convert-{os.getpid()}-{out.name}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the old folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return [f"{path.name} ({'original PixArt' if original else 'diffusers'} keys{', under ' + repr(wrapper) if wrapper else ''}): "
            f"config {name} (chosen by {why})",
            f"wrote {out / 'transformer'}: {len(tensors)} tensors, {format_bytes(size)}, verified tensor by tensor; record in {out / CONVERTED_FROM}",
            f'use it as  [job.components] transformer = "{out}"']
