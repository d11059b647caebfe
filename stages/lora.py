"""LoRA adapters for the denoise stage's transformer: read, checked against the model, applied with peft.

Formats (docs/lora.md), all read as safetensors, never pickle:
- a PEFT adapter folder: adapter_config.json (r, lora_alpha, rank/alpha patterns) and
  adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight` (what peft's
  `save_pretrained` and PixArt's train_pixart_lora_hf.py write);
- a diffusers-style single file: `transformer.<module>.lora_A.weight` / `lora_B.weight`, or
  `.lora.down.weight` / `.lora.up.weight`, with an optional `<module>.alpha` (diffusers' training
  scripts, SimpleTuner); without alpha the scale is 1 per unit of `scale`, as diffusers does;
- OneTrainer's PixArt LoRAs in each of its three layouts: kohya style (`lora_transformer_<module with
  underscores>.lora_down.weight`, `.alpha`), "diffusers" (`lora_transformer.<module>...`) and "omi"
  (`transformer.blocks.N.attn.qkv.0...`, PixArt's original names, mapped as OneTrainer maps them).

`inspect_lora` checks a LoRA from its safetensors header and the transformer's config.json alone (the
transformer is built on the meta device: no weights load), so a bad LoRA is refused at job
resolution with one line. `apply_loras` injects every adapter the stage's items use into the
loaded transformer with peft (`inject_adapter_in_model`, `set_peft_model_state_dict`), unmerged;
`activate` switches between LoRA sets (and scales) between batches, so the base weights load once.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from stages.contract import JobFileError
from stages.files import sha256_file

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
# Key ends, per format, mapped to peft's names.
_ENDS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B",
         ".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
# Key prefixes of LoRAs for other model families, to name the family in the refusal.
_FOREIGN = (("lora_unet_", "a Stable Diffusion UNet (kohya)"), ("unet.", "a Stable Diffusion UNet"),
            ("double_blocks", "Flux"), ("single_transformer_blocks", "Flux"), ("transformer.single_", "Flux"),
            ("lora_te", "a text encoder"), ("text_encoder", "a text encoder"), ("down_blocks", "a UNet"))


def _header(file: Path) -> dict:
    """The safetensors header of `file` ({key: {dtype, shape, data_offsets}}), or a one-line JobFileError."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
            size = f.seek(0, 2)
    except FileNotFoundError:
        raise JobFileError(f"LoRA {file}: not found; check 'path' in loras (a relative path starts at the job file)") from None
    except (OSError, ValueError) as exc:
        raise JobFileError(f"LoRA {file}: not a readable safetensors file ({exc}); give a .safetensors LoRA or a PEFT adapter folder") from None
    header.pop("__metadata__", None)
    if not isinstance(header, dict) or any(not isinstance(v, dict) or "shape" not in v for v in header.values()):
        raise JobFileError(f"LoRA {file}: its safetensors header is damaged; download or save the LoRA again")
    end = max((v.get("data_offsets", [0, 0])[1] for v in header.values()), default=0)
    if 8 + length + end > size:
        raise JobFileError(f"LoRA {file}: truncated ({size} bytes, the header promises {8 + length + end}); download or save it again")
    return header


def locate(path: Path) -> tuple[str, Path, dict | None]:
    """(format, weights file, peft config or None) of a LoRA file or folder."""
    if path.is_dir():
        config_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if not config_file.is_file() or not weights.is_file():
            found = sorted(p.name for p in path.iterdir())[:5]
            raise JobFileError(f"LoRA {path}: a folder needs {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter; found: "
                               f"{', '.join(found) or 'nothing'}); name the .safetensors file itself for a single-file LoRA")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            assert isinstance(config, dict)
        except (OSError, ValueError, AssertionError):
            raise JobFileError(f"LoRA {config_file}: not a JSON object; save the adapter again with peft's save_pretrained") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise JobFileError(f"LoRA {config_file}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters are supported")
        return "peft", weights, config
    if not path.is_file():  # is_file: a regular file only, so a FIFO is never opened (it would block the read)
        if path.exists():
            raise JobFileError(f"LoRA {path}: not a regular file (a FIFO, device or socket); name a .safetensors file or a PEFT folder")
        raise JobFileError(f"LoRA {path}: not found; check 'path' in loras (a relative path starts at the job file)")
    return "diffusers", path, None


# OneTrainer's PixArt LoRAs (modules/util/convert/lora/convert_pixart_lora.py there): its "omi" layout
# names modules as PixArt's original code does, under `transformer.`; these are diffusers' names for them.
_OMI_BLOCK = {"attn.qkv.0": "attn1.to_q", "attn.qkv.1": "attn1.to_k", "attn.qkv.2": "attn1.to_v", "attn.proj": "attn1.to_out.0",
              "cross_attn.q_linear": "attn2.to_q", "cross_attn.kv_linear.0": "attn2.to_k", "cross_attn.kv_linear.1": "attn2.to_v",
              "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_OMI_TOP = {"ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1", "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
            "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1", "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
            "y_embedder.y_proj.fc1": "caption_projection.linear_1", "y_embedder.y_proj.fc2": "caption_projection.linear_2",
            "x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out"}
_OMI_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _module_name(name: str, underscored: dict) -> tuple[str, str]:
    """(format, diffusers module name) of a key with its LoRA suffix removed."""
    if name.startswith("base_model.model."):  # peft's save_pretrained of the transformer
        return "peft", name[len("base_model.model."):]
    if name.startswith("lora_transformer."):  # OneTrainer "diffusers"
        return "onetrainer", name[len("lora_transformer."):]
    if name.startswith("lora_transformer_"):  # kohya style (OneTrainer "legacy diffusers"): dots as underscores
        return "kohya", underscored.get(name[len("lora_transformer_"):], name)
    if name.startswith("transformer."):
        rest = name[len("transformer."):]
        block = _OMI_BLOCK_KEY.fullmatch(rest)
        if block and block.group(2) in _OMI_BLOCK:  # OneTrainer "omi": PixArt's original names
            return "onetrainer-omi", f"transformer_blocks.{block.group(1)}.{_OMI_BLOCK[block.group(2)]}"
        if rest in _OMI_TOP:
            return "onetrainer-omi", _OMI_TOP[rest]
        return "diffusers", rest
    return "diffusers", name


def _modules(header: dict, file: Path, names) -> tuple[str, dict]:
    """(format, {module name in the transformer: {"A": key, "B": key, "alpha": key?}}) from the
    header's keys; `names`: the transformer's module names (kohya keys spell them with underscores)."""
    underscored = {name.replace(".", "_"): name for name in names}
    modules: dict[str, dict] = {}
    formats = set()
    for key in header:
        end = next((e for e in _ENDS if key.endswith(e)), None)
        if end is None:
            family = next((what for start, what in _FOREIGN if key.startswith(start) or f".{start}" in key), None)
            raise JobFileError(f"LoRA {file}: key {key!r} is not a LoRA weight of a PixArt transformer"
                               + (f"; it looks like a LoRA for {family}" if family else "")
                               + "; use a LoRA trained for PixArt (PEFT folder, diffusers-style, kohya or OneTrainer file)")
        fmt, name = _module_name(key[: -len(end)], underscored)
        formats.add(fmt)
        modules.setdefault(name, {})[_ENDS[end]] = key
    if not modules:
        raise JobFileError(f"LoRA {file}: holds no tensors; save the LoRA again")
    return "+".join(sorted(formats)), modules


def meta_transformer(transformer_config: Path):
    """The transformer of `transformer_config` (config.json) on the meta device: its module names
    and shapes, no weights."""
    import torch
    from diffusers import PixArtTransformer2DModel

    config = PixArtTransformer2DModel.load_config(str(transformer_config.parent))
    with torch.device("meta"):
        return PixArtTransformer2DModel.from_config(config)


def inspect_lora(path: Path, model) -> dict:
    """Check a LoRA against `model` (meta_transformer's) from its header: every module exists and is
    a Linear, A is [r, in], B is [out, r]. Returns {format, file, sha256, bytes, rank, targets}.
    Raises JobFileError naming the file and the first offending keys."""
    import torch

    fmt, file, config = locate(Path(path))
    header = _header(file)
    known = dict(model.named_modules())
    detected, modules = _modules(header, file, known)
    missing = [m for m in modules if m not in known]
    if missing:
        family = next((what for start, what in _FOREIGN if any(m.startswith(start) or f".{start}" in m for m in missing)), None)
        raise JobFileError(
            f"LoRA {file}: {len(missing)} of {len(modules)} modules are not in this PixArt transformer (first: "
            f"{', '.join(modules[m].get('A') or next(iter(modules[m].values())) for m in missing[:3])})"
            + (f"; it looks like a LoRA for {family}" if family else "; it is for another model or family")
            + "; use a LoRA trained for this model")
    ranks = {}
    for name, keys in modules.items():
        layer = known[name]
        a, b = header.get(keys.get("A", ""), {}).get("shape"), header.get(keys.get("B", ""), {}).get("shape")
        if a is None or b is None:
            raise JobFileError(f"LoRA {file}: module {name} has no {'lora_A (down)' if a is None else 'lora_B (up)'} weight; the LoRA is incomplete")
        if not isinstance(layer, torch.nn.Linear):
            raise JobFileError(f"LoRA {file}: key {keys['A']!r} targets {name}, a {type(layer).__name__}; only Linear layers take a LoRA here")
        if len(a) != 2 or len(b) != 2 or a[1] != layer.in_features or b[0] != layer.out_features or a[0] != b[1]:
            raise JobFileError(f"LoRA {file}: key {keys['A']!r} has shape {a} and {keys['B']!r} {b}, which do not fit {name} "
                               f"(Linear {layer.in_features} -> {layer.out_features}: expected [r, {layer.in_features}] and "
                               f"[{layer.out_features}, r]); it was trained for another model size")
        ranks[name] = a[0]
        if config is not None and not config.get("rank_pattern") and a[0] != config.get("r", a[0]):
            raise JobFileError(f"LoRA {file}: key {keys['A']!r} has rank {a[0]}, but {PEFT_CONFIG} says r = {config.get('r')}; "
                               f"the folder mixes two adapters: save it again")
    nbytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values() if "data_offsets" in v)
    parameters = sum(math.prod(header[keys[part]]["shape"]) for keys in modules.values() for part in ("A", "B"))
    digest = sha256_file(file)
    if config is not None:  # the config decides alpha and ranks: it is part of the LoRA's identity
        import hashlib

        digest = hashlib.sha256((digest + json.dumps(config, sort_keys=True)).encode()).hexdigest()
    return {"format": "peft" if fmt == "peft" else detected, "file": str(file), "sha256": digest, "bytes": nbytes, "parameters": parameters, "rank": max(ranks.values()), "modules": len(modules)}


def lora_config(fmt: str, file: Path, config: dict | None, modules: dict, tensors: dict):
    """peft's LoraConfig for one LoRA: a PEFT folder's own, else r and alpha per module from the
    weights (alpha = rank where the file has none, so its scale is 1)."""
    from peft import LoraConfig

    if config is not None:
        keep = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
        keep["target_modules"] = sorted(modules)  # exact names: peft's suffix match of a short name is wider
        keep.pop("modules_to_save", None)
        return LoraConfig(**keep)
    ranks = {name: tensors[keys["A"]].shape[0] for name, keys in modules.items()}
    alphas = {name: float(tensors[keys["alpha"]].item()) if "alpha" in keys else float(ranks[name]) for name, keys in modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    # Patterns are regexes matched at the end of a module name: escaped, anchored at a dot.
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules), lora_dropout=0.0,
                      rank_pattern={f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
                      alpha_pattern={f"^{re.escape(n)}": v for n, v in alphas.items() if v != alpha})


def read_lora(path: Path, names):
    """(peft LoraConfig, state dict keyed `<module>.lora_A.weight` as set_peft_model_state_dict takes);
    `names`: the transformer's module names."""
    from safetensors.torch import load_file

    fmt, file, config = locate(Path(path))
    _, modules = _modules(_header(file), file, names)
    tensors = load_file(str(file))
    state = {f"{name}.lora_{part}.weight": tensors[keys[part]] for name, keys in modules.items() for part in ("A", "B")}
    return lora_config(fmt, file, config, modules, tensors), state


def adapter_name(lora: dict) -> str:
    """The peft adapter name of a LoRA in the stage: its content hash (one adapter per distinct LoRA)."""
    return f"lora_{lora['sha256'][:16]}"


def lora_set(item: dict) -> tuple:
    """What an item's LoRAs decide: ((adapter name, scale), ...) in the job file's order."""
    return tuple((adapter_name(lora), float(lora["scale"])) for lora in item.get("loras") or ())


def apply_loras(transformer, items: list[dict]) -> dict:
    """Inject every distinct LoRA of `items` into `transformer`, unmerged, all inactive. Returns the
    adapter tensors per module name (for a streamed model, whose blocks are on meta until they run)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    seen, state_all = set(), {}
    for item in items:
        for lora in item.get("loras") or ():
            name = adapter_name(lora)
            if name in seen:
                continue
            seen.add(name)
            config, state = read_lora(Path(lora["path"]), [n for n, _ in transformer.named_modules()])
            with warnings.catch_warnings():
                # Several adapters in one model is the point here (one per distinct LoRA); a streamed
                # model's blocks are on meta, and their adapters join them as they load (stream_adjuster).
                warnings.filterwarnings("ignore", message=".*(Already found a `peft_config`|copying from a non-meta parameter).*")
                inject_adapter_in_model(config, transformer, adapter_name=name)
                set_peft_model_state_dict(transformer, state, adapter_name=name)
            for key, tensor in state.items():  # "<module>.lora_A.weight" -> "<module>.lora_A.<name>.weight"
                state_all[key.replace(".weight", f".{name}.weight")] = tensor
    activate(transformer, ())
    return state_all


def activate(transformer, loras: tuple) -> None:
    """Make `loras` ((adapter name, scale), ...) the active set of every LoRA layer, in that order
    (peft adds each active adapter's output in turn), scaled as diffusers' set_adapters does."""
    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        here = [(n, s) for n, s in loras if n in module.lora_A]
        module.enable_adapters(bool(here))
        if here:
            module.set_adapter([n for n, _ in here])
            for n, s in here:
                module.set_scale(n, s)


def streamed_state(state: dict, prefix: str, module) -> dict:
    """Adapter tensors of the block at `prefix` keyed as its state dict, cast as peft placed them."""
    params = dict(module.named_parameters())
    out = {}
    for key, tensor in state.items():
        if key.startswith(prefix):
            rel = key[len(prefix):]
            out[rel] = tensor.to(dtype=params[rel].dtype) if rel in params else tensor
    return out


def stream_adjuster(state: dict):
    """BlockLoader.adjust for a streamed model with adapters: the file's base keys renamed to the
    wrapped layers' (`to_q.weight` -> `to_q.base_layer.weight`), plus the block's adapter tensors."""
    def adjust(prefix, module, block_state):
        names = {name for name, _ in module.named_parameters()}
        out = {}
        for key, tensor in block_state.items():
            head, _, leaf = key.rpartition(".")
            out[key if key in names or f"{head}.base_layer.{leaf}" not in names else f"{head}.base_layer.{leaf}"] = tensor
        out.update(streamed_state(state, prefix, module))
        return out
    return adjust
