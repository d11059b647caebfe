"""What a stage accepts as an artifact: regular files only, with the tensors, dtypes and shapes it expects.

Anything in a job folder or the embedding store where an artifact or record belongs that is not a
regular file (a FIFO, device, socket, folder or symbolic link) is damaged (issue 17, points 3-4):
it is never opened for reading (opening a FIFO blocks until a writer comes, i.e. forever), and
`clear_damaged` removes it, the link itself and never its target. A safetensors file is checked
against what the stage expects from its header alone (8-byte length, then JSON), so a truncated,
empty or huge sparse file costs a few bytes to refuse, never a load (point 5).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

from stages.contract import ArtifactError

# safetensors' own limit on its JSON header (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# safetensors' names for the torch dtypes the stages write.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64"}
LATENT_DTYPES = ("F32", "F16", "BF16")


def not_regular(path: Path) -> str:
    """"" for a regular file, else what is there instead ("missing", "a FIFO", ...); never follows a link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: Path) -> int:
    """A read-only fd on `path`, only if it is a regular file: checked with lstat before opening,
    then opened without following a link and without blocking (so a FIFO swapped in between the
    two is refused too, not waited on). Raises ArtifactError naming what is there instead."""
    kind = not_regular(path)
    if kind:
        raise ArtifactError(f"{path}: {kind}, not a regular file" if kind != "missing" else f"{path}: missing")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def clear_damaged(path: Path, log, where: str) -> bool:
    """Remove whatever non-regular entry sits at `path` (a link itself, never its target; a folder
    with what is in it). True when `path` is now free or a regular file; False, with a warning,
    when it cannot be removed (the caller then skips it)."""
    kind = not_regular(path)
    if kind in ("", "missing"):
        return True
    try:
        if kind == "a folder":
            shutil.rmtree(path)  # removes links inside as links (never follows them)
        else:
            os.unlink(path)
    except OSError as exc:
        log.warning("%s: %s is %s and cannot be removed (%s); skipping it", where, path, kind, exc.strerror)
        return False
    log.warning("%s: %s was %s, not a regular file: damaged, removed", where, path, kind)
    return True


def read_header(path: Path) -> dict:
    """The safetensors header of `path` as {name: {"dtype", "shape"}} after checking that every
    tensor's bytes lie inside the file; ArtifactError says what is wrong (empty, truncated, ...)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path}: {'empty' if size == 0 else 'truncated'} ({size} bytes), not a safetensors file")
            length = int.from_bytes(head, "little")
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ArtifactError(f"{path}: no valid safetensors header (header length {length}, file {size} bytes)")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ArtifactError(f"{path}: no valid safetensors header (not JSON)") from None
    finally:
        os.close(fd)
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: no valid safetensors header")
    header.pop("__metadata__", None)
    data = size - 8 - length
    tensors = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            count = 1
            for n in shape:
                count *= n
            ok = 0 <= begin <= end <= data and end - begin == count * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{path}: tensor {name} truncated or malformed (safetensors header)")
        tensors[name] = {"dtype": info["dtype"], "shape": shape}
    return tensors


def embeddings_expected(params: dict, dtype: str, width: int) -> dict:
    """{name: (safetensors dtype, shape)} of an encode artifact (diffusers' encode_prompt):
    `prompt_embeds` [1, max_sequence_length, width] in the job's dtype, `prompt_attention_mask`
    [1, max_sequence_length] int64, and the `negative_` pair when the item uses guidance."""
    tokens = params["max_sequence_length"]
    expected = {}
    for prefix, text in (("", params["prompt"]), ("negative_", params["negative_prompt"])):
        if text is not None:
            expected[f"{prefix}prompt_embeds"] = (SAFETENSORS_DTYPES[dtype], [1, tokens, width])
            expected[f"{prefix}prompt_attention_mask"] = ("I64", [1, tokens])
    return expected


def latents_expected(denoise_record: dict, channels, scale: int) -> dict:
    """{name: (dtypes, shape)} of a denoise artifact: `latents` [1, C, h/f, w/f] for the binned size
    the record names, C the VAE's `latent_channels`, f its scale factor; any float dtype (decode
    casts to its own). ArtifactError when the record does not say the size."""
    size = denoise_record.get("binned_size")
    try:
        shape = [1, int(channels), int(size["height"]) // scale, int(size["width"]) // scale]
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"denoise record {denoise_record.get('key')} gives no binned size or the VAE config no latent_channels") from None
    return {"latents": (LATENT_DTYPES, shape)}


def mismatch(path: Path, expected: dict) -> str:
    """"" when `path` holds exactly the tensors `expected` ({name: (dtype or tuple of dtypes,
    shape)}), else what differs, e.g. "prompt_embeds [1,7,32], expected [1,120,32]"."""
    try:
        found = read_header(path)
    except ArtifactError as exc:
        return str(exc).replace(f"{path}: ", "", 1)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        return f"no tensor {', '.join(missing)}"
    if extra:
        return f"unexpected tensor {', '.join(extra)}"
    for name, (dtype, shape) in expected.items():
        got = found[name]
        if got["shape"] != list(shape):
            return f"{name} [{','.join(map(str, got['shape']))}], expected [{','.join(map(str, shape))}]"
        allowed = (dtype,) if isinstance(dtype, str) else tuple(dtype)
        if got["dtype"] not in allowed:
            return f"{name} is {got['dtype']}, expected {' or '.join(allowed)}"
    return ""


def require(path: Path, expected: dict, message) -> None:
    """ArtifactError(message(why)) when `path` is not what `expected` says (see `mismatch`)."""
    why = mismatch(path, expected)
    if why:
        raise ArtifactError(message(why))


def embedding_width(job: dict, part: str = "text_encoder") -> int | None:
    """The width of the prompt embeddings from a config: T5's `d_model` (encode, the store) or the
    transformer's `caption_channels` (denoise, whose input it is); None when the config says none."""
    from stages.resolved import component_folder

    key = "d_model" if part == "text_encoder" else "caption_channels"
    value = config_value(component_folder(job, part) / part, key)
    return value if isinstance(value, int) else None


def read_json(path: Path, limit: int = 16 << 20):
    """The JSON in a small regular file (a summary, a resolved job); ValueError for anything else,
    so callers that already treat bad JSON as absent need no new case. A FIFO is never opened."""
    try:
        fd = open_regular(path)
    except ArtifactError as exc:
        raise ValueError(str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: over {limit} bytes")
    return json.loads(data)


def config_value(folder: Path, key: str):
    """One value of a model component's config.json (a regular file only), or None."""
    with contextlib.suppress(ArtifactError, OSError, ValueError):
        fd = open_regular(Path(folder) / "config.json")
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read(1 << 20)).get(key)
    return None
