"""Read a model's safetensors weights one module at a time, for the streaming strategies.

The encode stage streams T5 blocks (layer-major: every text passes a block while it is resident) and
the denoise stage streams transformer blocks on the CPU under a host-memory budget. Both need the
same three things, kept here so the two stage files stay self-contained otherwise: a key -> file
index over (possibly sharded) safetensors, the dtype rules of `from_pretrained`, and a loader that
reads the next block in a background thread while the current one computes.

Weights never exist whole in memory: a block is read, cast, used and dropped (moved to `meta`).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from stages.contract import JobFileError
from stages.files import read_json_limited

# safetensors' own cap on the JSON header (safetensors/src/tensor.rs, N_LEN check): 100 MB.
MAX_HEADER_BYTES = 100_000_000


def safetensors_damage(file: Path) -> str | None:
    """Why a .safetensors file cannot load, judged from its header alone, or None. The format: an
    8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then
    the data, which the offsets must fill exactly (safetensors refuses a file with bytes missing or
    left over). Reads the header only: a truncated 10 GB T5 is found in milliseconds, before it loads."""
    info = os.stat(file)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    size = info.st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes, shorter than a header"
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            return f"cut short or not safetensors (header of {length:,} bytes claimed, file {size:,} bytes)"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry.get("data_offsets", [0, 0])[1] for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)]
    if not all(isinstance(end, int) for end in ends):
        return "its header holds offsets that are not integers"
    data = size - 8 - length
    if max(ends, default=0) != data:
        return (f"cut short: its tensors need {max(ends, default=0):,} bytes of data, the file holds {data:,}"
                if max(ends, default=0) > data else f"{data - max(ends, default=0):,} bytes past its last tensor")
    return None


def check_weight_files(folder: Path, what: str) -> None:
    """A one-line JobFileError naming the first damaged .safetensors file in `folder` (a component
    folder such as <model>/text_encoder) and the fix; `what` names who asks (e.g. "encode")."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        reason = safetensors_damage(file)
        if reason is not None:
            raise JobFileError(f"{what}: weight file {file} is damaged ({reason}); download it again (or convert it again)")


def missing_parameters(model, present) -> list[str]:
    """The parameters of `model` (built on meta: no memory) that no key in `present` holds. Tied
    parameters (T5's `shared` and `encoder.embed_tokens`) count as held when any of their names is."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return sorted(group[0] for group in names.values() if not any(name in present for name in group))


def header_keys(folder: Path) -> set[str]:
    """The tensor names the safetensors in `folder` hold, from the shard index or the JSON headers
    alone (safetensors_damage has checked their framing; a header that lies about a tensor's bytes
    is left for the loader to report, as before)."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json_limited(indexes[0], "weight index", fix="the model folder is damaged; download it again").get("weight_map")
        return set(weight_map) if isinstance(weight_map, dict) else set()
    keys: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, MAX_HEADER_BYTES)))
        keys.update(k for k in header if k != "__metadata__")
    return keys


def require_complete(model, folder: Path) -> None:
    """A ValueError naming the first tensors `model` needs that the safetensors in `folder` lack.
    Checked from the headers before loading: a file without some tensor would otherwise load with
    those weights random (transformers initializes them) or left on `meta` (diffusers), and an image
    made from random weights is worse than an error."""
    missing = missing_parameters(model, header_keys(folder))
    if missing:
        raise ValueError(f"its weights lack {len(missing)} tensor(s) the model needs, first {', '.join(missing[:3])}")


def check_complete(model_class, folder: Path, config=None) -> None:
    """require_complete for a model of `model_class` with the config in `folder` (diffusers models
    by default; pass `config` for a transformers model). Builds the model on meta, so it costs no memory."""
    import torch

    with torch.device("meta"):
        model = model_class(config) if config is not None else model_class.from_config(model_class.load_config(folder))
    require_complete(model, folder)


class WeightIndex:
    """Which safetensors file holds each key of a model folder (sharded or not)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        self.files: dict[str, Path] = {}
        if indexes:
            weight_map = read_json_limited(indexes[0], "weight index", fix="the model folder is damaged; download it again").get("weight_map")
            if not isinstance(weight_map, dict):
                raise JobFileError(f"weight index {indexes[0]} has no weight_map; the model folder is damaged; download it again")
            for key, name in weight_map.items():
                self.files[key] = folder / name
        else:
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self.files.update({key: file for key in f.keys()})
        if not self.files:
            raise FileNotFoundError(f"no .safetensors weights in {folder}")

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.files if k.startswith(prefix)]

    def read(self, prefix: str, cast) -> dict:
        """{key without prefix: tensor} for every key under `prefix`, each passed through `cast`."""
        return {key[len(prefix):]: tensor for key, tensor in self.read_keys(self.keys(prefix), cast).items()}

    def read_keys(self, keys: list[str], cast) -> dict:
        """{key: tensor} for the given keys, grouped by file, each passed through `cast`."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in file_keys:
                    out[key] = cast(key, f.get_tensor(key))
        return out


def dtype_rule(dtype, keep_fp32: list[str] | None):
    """Cast like `from_pretrained(dtype=...)`: floating tensors to `dtype`, except modules named
    in the model's `_keep_in_fp32_modules`, which transformers keeps in fp32 under float16 only
    (T5's `wo`; see PIXART-NOTES.md)."""
    import torch

    keep = tuple(keep_fp32 or ())

    def cast(key: str, tensor):
        if not tensor.is_floating_point():
            return tensor
        if dtype == torch.float16 and any(part in keep for part in key.split(".")):
            return tensor.to(torch.float32)
        return tensor.to(dtype)

    return cast


class BlockLoader:
    """Loads module weights by key prefix onto a device, reading the next one ahead in a thread.
    Counts the bytes it moves and the most weight bytes resident at once."""

    def __init__(self, index: WeightIndex, cast, device) -> None:
        self.index, self.cast, self.device = index, cast, device
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[str, Future] = {}
        self.bytes_moved = 0
        self.resident = 0
        self.peak_resident = 0
        self.adjust = None  # (prefix, module, state) -> state: a LoRA'd block's keys (stages/lora.py)

    def prefetch(self, prefix: str) -> None:
        if prefix not in self.pending:
            self.pending[prefix] = self.pool.submit(self.index.read, prefix, self.cast)

    def materialise(self, module, prefix: str, resident_extra: int = 0) -> int:
        """Give `module` (on meta) its real weights; returns their size in bytes."""
        self.prefetch(prefix)
        state = self.pending.pop(prefix).result()
        if self.adjust is not None:
            state = self.adjust(prefix, module, state)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        module.load_state_dict({k: v.to(self.device) for k, v in state.items()}, assign=True, strict=True)
        self.bytes_moved += nbytes
        self.resident += nbytes
        # On the CPU the block read ahead sits in the same memory, so it counts (blocks are equal-sized).
        ahead = len(self.pending) * nbytes if str(self.device) == "cpu" else 0
        self.peak_resident = max(self.peak_resident, self.resident + resident_extra + ahead)
        return nbytes

    def release(self, module, nbytes: int) -> None:
        module.to("meta")
        self.resident -= nbytes

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def stream_blocks(blocks: list[tuple[str, object]], loader: BlockLoader, resident_bytes: int = 0) -> None:
    """Hooks that load each block's weights just before its forward and drop them after, reading
    the next block (cyclically, for the next denoising step) while this one computes."""
    order = [prefix for prefix, _ in blocks]
    sizes: dict[int, int] = {}

    def before(i):
        def hook(module, args, kwargs=None):
            loader.prefetch(order[(i + 1) % len(order)])
            sizes[i] = loader.materialise(module, order[i], resident_bytes)
        return hook

    def after(i):
        def hook(module, args, output):
            loader.release(module, sizes.pop(i))
        return hook

    for i, (_, module) in enumerate(blocks):
        module.register_forward_pre_hook(before(i))
        module.register_forward_hook(after(i))


def streamed_model(model_class, folder: Path, blocks_name: str, dtype, device):
    """A diffusers model whose modules outside `blocks_name` (a ModuleList) are loaded as usual and
    whose blocks are streamed by `stream_blocks`. Returns (model, its BlockLoader)."""
    import logging

    from accelerate import init_empty_weights

    config = model_class.load_config(folder)
    with init_empty_weights():  # parameters on meta; buffers (e.g. a sin-cos pos_embed) computed for real
        model = model_class.from_config(config)
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # `.to()` warns about an empty fp32 list
    model = model.to(dtype).eval()  # from_pretrained casts buffers to the dtype too
    quiet.setLevel(level)
    index = WeightIndex(folder)
    require_complete(model, folder)  # a block's tensor missing would otherwise fail mid-run
    cast = dtype_rule(dtype, model_class._keep_in_fp32_modules)
    prefix = f"{blocks_name}."
    resident = index.read_keys([k for k in index.files if not k.startswith(prefix)], cast)
    missing, unexpected = model.load_state_dict(resident, assign=True, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise ValueError(f"{folder} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    loader = BlockLoader(index, cast, device)
    resident_bytes = sum(t.numel() * t.element_size() for t in resident.values())
    blocks = [(f"{prefix}{i}.", block) for i, block in enumerate(getattr(model, blocks_name))]
    stream_blocks(blocks, loader, resident_bytes)
    return model, loader
