"""`orchestrate convert`: a component's pickle weights (.bin) to safetensors, verified (one checkpoint file: checkpoint.py).

The stages load safetensors only, never pickles (a pickle can run code when loaded). Some models
are published as .bin only, e.g. the PixArt-α DMD transformer. This reads each .bin with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers and refuses anything
else, writes the safetensors file diffusers/transformers would have written (atomically), reads it
back and compares every tensor (name, dtype, shape, values) with the pickle's, and rewrites a
sharded index to point at the new files. The .bin files are left where they are.

Names: diffusion_pytorch_model[-0000i-of-0000n].bin -> diffusion_pytorch_model[...].safetensors,
pytorch_model[...].bin -> model[...].safetensors; *.bin.index.json -> *.safetensors.index.json.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from stages.contract import JobFileError
from stages.files import MAX_CONFIG_BYTES, publish, publish_json, read_json_limited
from stages.measure import format_bytes


def _target_name(name: str) -> str:
    stem = name[: -len(".bin")]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def refusal_reason(exc: BaseException) -> str:
    """torch.load's reason for refusing a file, in one line: the paragraphs of its message that say
    what was found (e.g. "Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked."), without its boilerplate on weights_only and its documentation link."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(exc).strip()) if p.strip()]
    kept = [re.sub(r"^.*WeightsUnpickler error:\s*", "", p) for p in paragraphs
            if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(p for p in kept if p) or " ".join(paragraphs) or "no reason given"


def load_pickle_weights(path: Path):
    """torch.load(weights_only=True) of `path` (tensors and plain containers only), or a one-line
    JobFileError with torch's reason. The one place the project unpickles anything."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: noise beside the one-line verdict
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors, or a damaged file
        raise JobFileError(f"convert: {path} is not a plain tensor checkpoint; torch.load(weights_only=True) refused it "
                           f"({type(exc).__name__}: {refusal_reason(exc)}); not converted") from None


def _read_indexes(folder: Path) -> list[tuple[Path, dict]]:
    """Every *.bin.index.json of `folder`, checked before anything is written: JSON with a
    weight_map of tensor name -> shard file, each shard present in the folder."""
    indexes = []
    for index in sorted(folder.glob("*.bin.index.json")):
        data = read_json_limited(index, "convert: shard index", MAX_CONFIG_BYTES, fix="nothing was converted; download the index again")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise JobFileError(f"convert: shard index {index} has no weight_map of tensor name -> shard file; nothing was converted; download the index again")
        missing = sorted({v for v in weight_map.values() if "/" in v or not (folder / v).is_file()})
        if missing:
            raise JobFileError(f"convert: shard index {index} names shards that are not in {folder} ({', '.join(repr(m) for m in missing[:3])}"
                               f"{', ...' if len(missing) > 3 else ''}); nothing was converted; download the missing shards")
        indexes.append((index, data))
    return indexes


def convert_folder(folder: Path, force: bool = False) -> list[str]:
    """Convert every .bin weight file in `folder` (a component folder such as model/transformer);
    returns what was done, one line per file. JobFileError on anything it cannot do safely."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    if not folder.is_dir():
        raise JobFileError(f"convert: {folder} is not a folder; give a component folder such as model/transformer")
    bins = sorted(p for p in folder.glob("*.bin") if p.is_file())
    if not bins:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".ckpt"))
        raise JobFileError(f"convert: {folder} holds no .bin weight files (found: {', '.join(found) or 'none'}); "
                           f"give the component folder that holds them, e.g. model/transformer")
    indexes = _read_indexes(folder)  # before any file is written
    done = []
    for path in bins:
        target = folder / _target_name(path.name)
        if target.exists() and not force:
            done.append(f"{path.name}: {target.name} already exists; left alone (--force converts again)")
            continue
        state = load_pickle_weights(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise JobFileError(f"convert: {path} does not hold a flat name -> tensor mapping; not converted")
        # Tied weights share storage, which safetensors refuses: each tensor gets its own copy.
        tensors = {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}
        publish(target, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": path.name}))
        back = load_file(str(target))
        for name, tensor in state.items():
            other = back.get(name)
            if other is None or other.dtype != tensor.dtype or other.shape != tensor.shape or not torch.equal(other, tensor):
                target.unlink()
                raise JobFileError(f"convert: {target.name} does not read back equal to {path.name} at {name!r}; removed it")
        if set(back) != set(state):
            target.unlink()
            raise JobFileError(f"convert: {target.name} holds other tensors than {path.name}; removed it")
        size = sum(t.numel() * t.element_size() for t in state.values())
        done.append(f"{path.name} -> {target.name}: {len(state)} tensors, {format_bytes(size)}, verified tensor by tensor")
    for index, data in indexes:
        data["weight_map"] = {k: _target_name(v) if v.endswith(".bin") else v for k, v in data.get("weight_map", {}).items()}
        target = folder / _target_name(index.name[: -len(".index.json")]).replace(".safetensors", ".safetensors.index.json")
        publish_json(target, data)
        done.append(f"{index.name} -> {target.name}: shard names rewritten")
    return done


def convert_path(path: Path, out: Path | None, config: str | None, force: bool) -> list[str]:
    """`orchestrate convert`: a folder's .bin files in place, or one checkpoint file to a transformer
    folder under `out`; the lines saying what was done."""
    if path.is_dir() and (out is not None or config is not None):
        raise JobFileError(f"convert: {path} is a folder; --out and --config are for one checkpoint file")
    if path.is_dir():
        return convert_folder(path, force)
    from orchestrator.tools.checkpoint import convert_checkpoint

    return convert_checkpoint(path, out, config, force)
