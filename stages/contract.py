"""The contract between stages: the resolved job, work units, records, hashing and atomic writes.

This is the only code the three stage processes share, and the orchestrator uses the same functions
to say what is up to date, so the two can never disagree. It holds no model code and imports no
torch at module level (the orchestrator's `status` stays fast).

An item of a stage is up to date when its record exists with the current format version and a
valid checksum, its params equal the current resolved ones, its input hashes equal the upstream
records' output hashes, and every output exists with the recorded hash (STYLE.md, "Up to date").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
STAGES = ("encode", "denoise", "decode")
RESOLVED_JOB = "job.resolved.json"
TMP_PREFIX = ".tmp-"
# Exit codes shared by stages and orchestrator: 2 is an expected, explained failure (bad input,
# bad artifact); 3 is a resource failure (out of memory, disk full) that keeps finished items.
EXIT_USER_ERROR = 2
EXIT_RESOURCE_ERROR = 3
EXIT_INTERRUPTED = 130


class JobFileError(Exception):
    """The job file or the job's model cannot be used as given."""


class ArtifactError(Exception):
    """An upstream artifact or record is missing, corrupt or does not match."""


class ResourceError(Exception):
    """A stage ran out of memory or disk; finished items are kept."""


# ---------------------------------------------------------------------------------------------
# Hashing and atomic writes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Content hash of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj) -> str:
    """Stable JSON text: sorted keys, no spaces; what params and checksums are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def short_hash(obj) -> str:
    return sha256_bytes(canonical_json(obj).encode())[:16]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, write) -> None:
    """Write `path` atomically: `write(tmp_path)` fills a temporary file in the same folder, which
    is flushed to disk and renamed into place. On any failure the temporary file is removed, so a
    reader sees either the old file, the complete new one, or none."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        reason = _write_error_reason(exc)
        if reason:
            raise ResourceError(f"could not write {path}: {reason}; free disk space or fix the folder, then run again") from exc
        raise


def _write_error_reason(exc: BaseException) -> str | None:
    """What the OS said when a write failed, or None for other errors. safetensors' Rust writer
    reports a full disk as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return exc.strerror or str(exc)
    match = re.search(r"I/O error: (.+)|IoError\((.+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return (match.group(1) or match.group(2)) if match else None


def safetensors_metadata(stage: str, key: str) -> dict:
    """ONE str->str entry: safetensors keeps metadata in a hash map whose order varies between
    processes, so two keys would make byte-different files (and hashes) for equal tensors."""
    return {"artifact": f"{stage}/{key}"}


def publish_bytes(path: Path, data: bytes) -> None:
    publish(path, lambda tmp: Path(tmp).write_bytes(data))


def publish_json(path: Path, obj) -> None:
    publish_bytes(path, (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())


def remove_temp_files(directory: Path, keys=None) -> list[Path]:
    """Delete half-written files left by an interrupted writer (call under the stage lock). With
    `keys` (a shard's units), only the temporary files of those units' artifacts and records
    (`.tmp-<pid>-<key>.<ext>`): shards of one stage run side by side, each writing its own."""
    removed = []
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*"):
        target = re.sub(r"^\d+-", "", tmp.name[len(TMP_PREFIX):])  # publish names it .tmp-<pid>-<name>
        if keys is not None and target.rsplit(".", 1)[0] not in keys:
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str, shared: bool = False):
    """Hold an flock on `lock_path` (written with our pid) or fail naming the holder's pid.
    The kernel drops the lock when its process dies, so a lock left by a killed run is taken over.
    `shared`: many holders at once (the shards of one stage), none while an exclusive one holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)  # without touching the file: the holder's pid stays readable
        raise JobFileError(
            f"{what} is already running (pid {holder}, lock {lock_path}); wait for it to finish "
            f"or stop it, then run again"
        ) from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()) and not shared:
            logging.getLogger(__name__).info("taking over the lock left by pid %s (no longer running)", previous)
        if not (shared and previous):  # a shared lock keeps the first holder's pid: it may be a live fellow shard's
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if not shared or os.pread(fd, 64, 0).decode(errors="replace").strip() == str(os.getpid()):
                os.ftruncate(fd, 0)
        os.close(fd)


UNIT_LOCKS = ".units.lock"


@contextlib.contextmanager
def stage_lock(job_dir: Path, stage: str, units: list | None = None):
    """What a stage process holds while it works. The whole stage (`units` None): `<stage>/.lock`,
    exclusively, as always. Some units (`--units`, a shard of the Ray executor): that lock shared,
    so shards of one stage run side by side while a whole-stage run or `orchestrate clean` is
    refused, and one byte per unit of `<stage>/.units.lock` (a POSIX record lock at an offset drawn
    from the unit's key: one file descriptor for any number of units), so no two processes ever
    make the same unit. The kernel drops them all when the process dies."""
    stage_dir = Path(job_dir) / stage
    what = f"stage {stage} of {Path(job_dir).name}"
    if units is None:
        with exclusive_lock(stage_dir / ".lock", what):
            yield
        return
    with exclusive_lock(stage_dir / ".lock", what, shared=True):
        fd = os.open(stage_dir / UNIT_LOCKS, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for unit in units:
                offset = int(sha256_bytes(unit.key.encode())[:12], 16)  # 48 bits: collisions are negligible
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                except OSError:
                    raise JobFileError(
                        f"{stage}: unit {unit.key} is being made by another process (pid {_record_lock_holder(fd, offset)}, "
                        f"lock {stage_dir / UNIT_LOCKS}); wait for it to finish or stop it, then run again"
                    ) from None
            yield
        finally:
            os.close(fd)  # releases every record lock of this file


def _record_lock_holder(fd: int, offset: int) -> str:
    """The pid holding a POSIX record lock at `offset` (F_GETLK; Linux's struct flock), or 'unknown'."""
    import struct

    if not sys.platform.startswith("linux"):  # struct flock's layout differs elsewhere
        return "unknown"
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        return str(pid) if kind != fcntl.F_UNLCK and pid > 0 else "unknown"
    except (OSError, struct.error):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The resolved job


def read_job(job_dir: Path) -> dict:
    """Read `<job_dir>/job.resolved.json`, the only input a stage takes besides artifacts."""
    path = Path(job_dir) / RESOLVED_JOB
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise JobFileError(f"{path} not found; run `orchestrate run JOB.toml` first to resolve the job") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobFileError(f"{path} is not valid JSON ({exc}); run `orchestrate run JOB.toml` to rewrite it") from None
    if job.get("format") != FORMAT_VERSION:
        raise JobFileError(
            f"{path} has format {job.get('format')!r}, this code reads {FORMAT_VERSION}; rerun `orchestrate run JOB.toml`"
        )
    return job


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug of a prompt: lowercase ASCII words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "empty"


def uses_guidance(item: dict) -> bool:
    """Classifier-free guidance is on above 1, as in the diffusers pipeline."""
    return item["guidance_scale"] > 1.0


# ---------------------------------------------------------------------------------------------
# Work units: what each stage makes, from which inputs, with which params


@dataclass(frozen=True)
class Unit:
    """One artifact a stage makes: `key` names its files, `params` decide it, `inputs` feed it."""

    stage: str
    key: str
    params: dict
    inputs: tuple = ()  # (upstream stage, upstream key) pairs
    items: tuple = ()  # ids of the items that use it
    outputs: tuple = field(default=())  # file names, relative to the stage folder

    def record_path(self, job_dir: Path) -> Path:
        return Path(job_dir) / self.stage / f"{self.key}.json"


def encode_params(job: dict, item: dict) -> dict:
    return {
        "model": job["model"]["component_hashes"]["encode"],
        "dtype": job["dtype"],
        "prompt": item["prompt"],
        # Without guidance the pipeline never encodes the negative prompt.
        "negative_prompt": item["negative_prompt"] if uses_guidance(item) else None,
        "clean_caption": job["clean_caption"],
        "max_sequence_length": job["max_sequence_length"],
    }


def encode_key(params: dict) -> str:
    return f"{slugify(params['prompt'], 24)}-{short_hash(params)}"


def decode_strategy(job: dict) -> dict:
    """The planned decode strategy's pixel-relevant fields (docs/memory.md): a tiled decode differs
    slightly from an untiled one, so switching re-decodes; peak_bytes is left out, since a new
    estimate alone must not."""
    planned = (job.get("runtime") or {}).get("stages", {}).get("decode", {})
    return {"strategy": planned.get("strategy", "full"), "tile_size": planned.get("tile_size")}


def plan_units(job: dict) -> dict[str, list[Unit]]:
    """All units of all stages, in job order. Items with equal encode params share one unit."""
    encode: dict[str, Unit] = {}
    denoise, decode = [], []
    for item in job["items"]:
        e_params = encode_params(job, item)
        e_key = encode_key(e_params)
        if e_key in encode:
            prev = encode[e_key]
            encode[e_key] = Unit("encode", e_key, prev.params, items=prev.items + (item["id"],), outputs=prev.outputs)
        else:
            encode[e_key] = Unit("encode", e_key, e_params, items=(item["id"],), outputs=(f"{e_key}.safetensors",))
        d_params = {
            "model": job["model"]["component_hashes"]["denoise"],
            "dtype": job["dtype"],
            **{k: item[k] for k in DENOISE_ITEM_KEYS},
        }
        # Keys that newer jobs may set enter only when set, so older artifacts stay valid.
        if job.get("pipeline", "PixArtAlphaPipeline") != "PixArtAlphaPipeline":
            d_params["pipeline"] = job["pipeline"]
        if job.get("scheduler"):
            d_params["scheduler"] = job["scheduler"]
        if item.get("timesteps"):
            d_params["timesteps"] = item["timesteps"]
        denoise.append(
            Unit("denoise", item["id"], d_params, inputs=(("encode", e_key),), items=(item["id"],),
                 outputs=(f"{item['id']}.safetensors",))
        )
        c_params = {
            "model": job["model"]["component_hashes"]["decode"],
            "dtype": job["dtype"],
            "decode": decode_strategy(job),
            # PNG text metadata carries these, so they decide the file's bytes too.
            "metadata": {k: item[k] for k in ("prompt", "negative_prompt", *DENOISE_ITEM_KEYS)} | {"model": job["model"]["given"]}
                        | {k: v for k, v in (("scheduler", job.get("scheduler")), ("timesteps", item.get("timesteps"))) if v},
        }
        decode.append(
            Unit("decode", item["id"], c_params, inputs=(("denoise", item["id"]),), items=(item["id"],),
                 outputs=(f"{item['id']}.png",))
        )
    return {"encode": list(encode.values()), "denoise": denoise, "decode": decode}


DENOISE_ITEM_KEYS = ("seed", "width", "height", "guidance_scale", "num_inference_steps", "use_resolution_binning")


# ---------------------------------------------------------------------------------------------
# Records


def record_checksum(record: dict) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in record.items() if k != "checksum"}).encode())


def write_record(path: Path, record: dict) -> None:
    """Publish a record (sorted keys, self-checksum) after its outputs; it marks the unit done."""
    record = dict(record, format=FORMAT_VERSION)
    record["checksum"] = record_checksum(record)
    publish_json(path, record)


def read_record(path: Path) -> tuple[dict | None, str]:
    """(record, "") when valid, else (None, why it is not usable)."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "no record"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None, "record is corrupt (not JSON)"
    if not isinstance(record, dict) or record.get("checksum") != record_checksum(record):
        return None, "record is corrupt (checksum mismatch)"
    if record.get("format") != FORMAT_VERSION:
        return None, f"record format {record.get('format')} != {FORMAT_VERSION}"
    return record, ""


def _diff_params(old: dict, new: dict) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for key in changed[:3]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict) or len(repr(a)) + len(repr(b)) > 60:
            parts.append(f"{key} changed")
        else:
            parts.append(f"{key} {a!r} -> {b!r}")
    return ", ".join(parts) + (" ..." if len(changed) > 3 else "")


def upstream_output_hash(job_dir: Path, stage: str, key: str) -> tuple[str | None, str]:
    """The sha256 the upstream record lists for its artifact, or (None, why not)."""
    record, why = read_record(Path(job_dir) / stage / f"{key}.json")
    if record is None:
        return None, f"{stage} {key}: {why}"
    outputs = record.get("outputs", {})
    if len(outputs) != 1:
        return None, f"{stage} {key}: record lists {len(outputs)} outputs"
    return next(iter(outputs.values()))["sha256"], ""


def unit_status(job_dir: Path, unit: Unit, check_outputs: bool = True) -> tuple[bool, str]:
    """(up to date, reason). Compares content hashes, never mtimes."""
    job_dir = Path(job_dir)
    record, why = read_record(unit.record_path(job_dir))
    if record is None:
        return False, why
    if record.get("params") != unit.params:
        return False, _diff_params(record.get("params") or {}, unit.params)
    recorded_inputs = record.get("inputs", {})
    for stage, key in unit.inputs:
        expected, why = upstream_output_hash(job_dir, stage, key)
        name = f"{stage}/{key}.safetensors"
        if expected is None or recorded_inputs.get(name) != expected:
            return False, f"input {name} changed"
    if set(record.get("outputs", {})) != set(unit.outputs):
        return False, "outputs differ from the expected files"
    if check_outputs:
        for name, meta in record["outputs"].items():
            path = job_dir / unit.stage / name
            if not path.exists():
                return False, f"{name} is missing"
            if sha256_file(path) != meta["sha256"]:
                return False, f"{name} is corrupt (sha256 mismatch)"
    return True, "up to date"


def verified_input(job_dir: Path, stage_name: str, unit: Unit, upstream: str, key: str) -> tuple[Path, str]:
    """Path and hash of an upstream artifact after checking it against its record, or ArtifactError."""
    job_dir = Path(job_dir)
    expected, why = upstream_output_hash(job_dir, upstream, key)
    path = job_dir / upstream / f"{key}.safetensors"
    fix = f"run `orchestrate run {job_dir / 'job.toml'}` (or `orchestrate run` on your job file) to rebuild {upstream}"
    if expected is None:
        raise ArtifactError(f"{stage_name}: missing {upstream} artifact for item {unit.key} ({why}); {fix}")
    if not path.exists():
        raise ArtifactError(f"{stage_name}: {upstream} artifact {path} for item {unit.key} is missing; {fix}")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{stage_name}: {upstream} artifact {path} for item {unit.key} does not match its record; {fix}")
    return path, actual


def output_entry(path: Path, shape=None, dtype=None) -> dict:
    entry = {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}
    if shape is not None:
        entry["shape"] = list(shape)
    if dtype is not None:
        entry["dtype"] = str(dtype).replace("torch.", "")
    return entry


# ---------------------------------------------------------------------------------------------
# Process helpers for stage entry points


def component_folder(job: dict, part: str) -> Path:
    """The folder holding <part>/ for this job: the base model's, or the one [job.components] names."""
    entry = (job["model"].get("components") or {}).get(part)
    return Path(entry["path"] if entry else job["model"]["path"])


def component_root(job: dict, part: str) -> Path:
    """component_folder, with the weights there. A component from the hub arrives with its configs
    only (the orchestrator plans from them); its weights are fetched here, by the one stage that
    uses them, so encode never fetches the transformer. Offline (HF_HUB_OFFLINE=1) they must
    already be in the cache."""
    root = component_folder(job, part)
    snapshot = hub_snapshot(root)
    if part in ("text_encoder", "transformer", "vae") and snapshot and not any((root / part).glob("*.safetensors")):
        root = _fetch_weights(*snapshot, part)
    return root


def hub_snapshot(root: Path) -> tuple[str, str] | None:
    """('org/name', commit) for a Hugging Face cache snapshot folder
    (<cache>/models--org--name/snapshots/<commit>), else None."""
    repo = Path(root).parent.parent.name
    if Path(root).parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo[len("models--"):].replace("--", "/", 1), Path(root).name


# What a stage fetches from the hub for its component: safetensors weights and configs, never pickles.
HUB_WEIGHT_PATTERNS = ("{part}/*.safetensors", "{part}/*.json")


def _fetch_weights(repo: str, commit: str, part: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo, revision=commit, allow_patterns=[p.format(part=part) for p in HUB_WEIGHT_PATTERNS]))
    except Exception as exc:  # offline and not cached, network errors: many classes
        raise JobFileError(f"cannot fetch {part} weights of {repo}@{commit[:12]} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                           f"download them once with `hf download {repo}`, or use a local folder") from None
    if not any((root / part).glob("*.safetensors")):  # offline: the cache did not have them; online: the repo has none
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise JobFileError(f"cannot fetch {part} weights of {repo}@{commit[:12]}: no {part}/*.safetensors "
                           + ("in the Hugging Face cache and HF_HUB_OFFLINE is set; download them once with "
                              f"`hf download {repo}`, or use a local folder" if offline else
                              "in the repository (weights are loaded from safetensors only, never pickle); "
                              "download the repo and convert it with `orchestrate convert`"))
    return root


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def record_context(job: dict, stage: str, device) -> dict:
    """The fields every record of a stage shares: model (with this stage's config hash),
    library versions, device and dtype. Compute once per stage run."""
    model = job["model"]
    return {
        "model": {"given": model["given"], "path": model["path"], "config_hash": model["component_hashes"][stage]},
        "versions": versions(),
        "device": str(device),
        "dtype": job["dtype"],
    }


def setup_logging(job_dir: Path, stage: str) -> logging.Logger:
    """Log to stderr and to `<stage>/stage.log` (appended, so earlier attempts stay readable)."""
    stage_dir = Path(job_dir) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler, level in ((logging.StreamHandler(sys.stderr), logging.INFO), (logging.FileHandler(stage_dir / "stage.log"), logging.DEBUG)):
        handler.setFormatter(fmt)
        handler.setLevel(level)
        root.addHandler(handler)
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"stages.{stage}")


@contextlib.contextmanager
def loading(stage: str, model_path: str, part: str):
    """Turn a failed from_pretrained (missing or damaged files) into a one-line JobFileError."""
    try:
        yield
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobFileError(
            f"{stage}: cannot load {part} from {model_path}/{part} ({first_line}); check that the model folder is complete "
            f"(config plus .safetensors weights)"
        ) from exc


# What a library says when it could not get memory, besides torch.OutOfMemoryError: cuBLAS and
# cuDNN fail their own allocations with these statuses (a RuntimeError from torch), MPS and ROCm
# say "out of memory".
OUT_OF_MEMORY_SAYINGS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                         "cudnn_status_not_enough_workspace", "hipblas_status_alloc_failed")


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError (host), or a RuntimeError from cuBLAS, cuDNN or a
    backend saying it could not allocate."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(say in str(exc).lower() for say in OUT_OF_MEMORY_SAYINGS)


def open_device(job: dict):
    """The stage's torch.device. On CUDA: make it the current device (so that a stage on cuda:1
    creates no context on GPU 0 and group offloading's side stream is on the right card), and cap
    this process at the job's memory budget, so that going over it is an out-of-memory error the
    stage reports (exit 3, finished items kept) rather than memory taken from the card silently."""
    import torch

    device = torch.device(job["device"])
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    budget = (job.get("runtime") or {}).get("budget_bytes")
    if budget:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    return device


@contextlib.contextmanager
def oom_guard(job: dict, *units: Unit):
    """Turn running out of memory while making `units` into a ResourceError naming the stage, the
    items, the memory budget and what to change. Units published before stay done (exit 3, resume)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        stage, items = units[0].stage, [item for unit in units for item in unit.items]
        budget = (job.get("runtime") or {}).get("budget_bytes")
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        named = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        raise ResourceError(
            f"{stage}: out of memory on item{'s' if len(items) > 1 else ''} {named} "
            f"(budget {format_bytes(budget) if budget is not None else 'no budget set'}; {said}); lower --max-vram so "
            f"the plan switches {stage} to a lighter strategy, or enable tiling (leave out --no-tiling); finished items are kept, "
            f"run again to resume"
        ) from exc


# Unary float ops that ATen hands to oneMKL's vector math library (VML) for contiguous float32 and
# float64 tensors on x86 (aten/src/ATen/cpu/vml.h, `IMPLEMENT_VML_MKL`), plus cosh/sinh/erfinv,
# which some torch versions route there too. Calling one that is not routed to VML costs nothing.
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "log", "log10",
           "log1p", "log2", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")


def warm_up_math_kernels() -> None:
    """Resolve oneMKL's VML kernel dispatch for every VML op, in this thread, before any model work.

    oneMKL 2024.2 (statically linked into torch 2.x x86 wheels) picks each VML function's kernel
    lazily on its first call. When that first call runs on several intra-op threads at once, one
    thread's chunk can be computed by the low-accuracy kernel although ATen asks for VML_HA
    (pytorch/pytorch#188792; fixed upstream by the same warm-up, pytorch/pytorch#188791). The first
    sizable VML call of a PixArt stage is the transformer's sin-cos position table, computed once
    at construction (float64 sin/cos over 4096 x dim/4 values) and kept as a buffer, so about one
    fresh denoise process in ten ran with a slightly different table and gave different latents for
    every item. A 1-element call never goes parallel (ATen's grain is 2048), so after this every
    later call, threaded or not, uses the dispatch MKL resolves here. Outputs of later calls are
    bitwise what an unaffected process computes; it takes about a millisecond."""
    import torch

    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(x)


def torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def reset_peak_memory(device) -> int:
    """Start measuring a stage's model work: reset the CUDA and host peaks (call it after the
    imports, just before loading weights). Returns the host RSS at this point."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    return current_rss()


def peak_memory(device) -> dict:
    """Peak memory so far: CUDA allocator peaks on a GPU, plus the process's peak RSS always."""
    import torch

    peaks = {"host_peak_rss_bytes": peak_rss()}
    if device.type == "cuda":
        peaks["device_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["device_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so the peak measures this stage's work and
    not the import of torch and friends. Linux only; elsewhere the peak is the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size since the last reset_peak_rss (VmHWM), else since process start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident set size now (Linux /proc), to tell a stage's own memory from the interpreter's."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class Clock:
    """Wall-clock seconds since creation, for records and summaries."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


# ---------------------------------------------------------------------------------------------
# The shared entry point: argument parsing, locking, unit selection, error reporting


def pick_units(units: list[Unit], stage: str, wanted: list[str] | None) -> list[Unit]:
    """The units named in `wanted` (`--units`), in job order; all when None. A name is a unit key,
    or for encode (keyed by text) also the id of an item it serves. Unknown names: JobFileError."""
    if wanted is None:
        return units
    by_name = {unit.key: unit for unit in units}
    for unit in units:
        for item in unit.items:
            by_name.setdefault(item, unit)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        example = ", ".join(unit.key for unit in units[:2])
        raise JobFileError(
            f"{stage}: --units names {len(unknown)} unknown unit{'s' if len(unknown) > 1 else ''} ({', '.join(unknown[:3])}"
            f"{' ...' if len(unknown) > 3 else ''}); use keys from `orchestrate status`, e.g. {example}"
        )
    chosen = {by_name[name].key for name in wanted}
    return [unit for unit in units if unit.key in chosen]


def select_units(job_dir: Path, job: dict, stage: str, force: bool, log: logging.Logger,
                 wanted: list[str] | None = None) -> tuple[list[Unit], int]:
    """The units of `stage` to make now (all when forced), and how many were up to date; with
    `wanted` (`--units`), only among those."""
    units = pick_units(plan_units(job)[stage], stage, wanted)
    todo = []
    for unit in units:
        ok, why = (False, "forced") if force else unit_status(job_dir, unit)
        if not ok:
            log.debug("%s: %s to do (%s)", stage, unit.key, why)
            todo.append(unit)
    log.info("%s: %d to do, %d up to date", stage, len(todo), len(units) - len(todo))
    return todo, len(units) - len(todo)


def wait_for_go(imports: tuple[str, ...]) -> bool:
    """Import the stage's libraries, then block until stdin says `go` (True) or closes (False).
    The orchestrator starts the next stage this way while the current one works, so the next
    process's start-up (seconds of imports) overlaps it; nothing is loaded or written before `go`,
    and torch never touches the GPU before it, so one model at a time still holds."""
    import importlib

    try:
        for name in imports:
            importlib.import_module(name)
        warm_up_math_kernels()  # while we wait anyway; see its docstring
        return sys.stdin.readline().strip() == "go"
    except KeyboardInterrupt:
        return False
    except Exception:
        if _INTERRUPTS:  # a library's import machinery turned our KeyboardInterrupt into another error
            return False
        raise


# Signals received (SIGINT, SIGTERM, SIGHUP). A KeyboardInterrupt raised inside an import can come
# out as another exception (numpy's lazy attributes, transformers' and diffusers' lazy modules wrap
# it in RecursionError / ModuleNotFoundError / RuntimeError); with a signal on record, any error is
# the interruption, reported as one (exit 130, one line), not a traceback.
_INTERRUPTS: list[int] = []


def _interrupted(signum, frame) -> None:
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _unit_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        import argparse

        raise argparse.ArgumentTypeError("give at least one unit key, e.g. --units 0003-a-red-apple")
    return names


def stage_main(stage: str, make_units, argv: list[str] | None = None, imports: tuple[str, ...] = ()) -> int:
    """Run one stage process: `make_units(job, job_dir, todo, log)` loads the model and makes the
    units, publishing each artifact and then its record; this wrapper does everything else.
    `imports` are the modules to load ahead under `--wait`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage of a resolved job.")
    parser.add_argument("job_dir", type=Path, help="the job's folder, e.g. workdir/beach")
    parser.add_argument("--force", action="store_true", help="remake every unit, even those up to date")
    parser.add_argument("--units", type=_unit_list, default=None, metavar="KEY,KEY,...",
                        help="make only these units (item ids; encode also takes its own keys), e.g. 0003-a-red-apple")
    parser.add_argument("--summary", type=Path, default=None, metavar="FILE",
                        help="write this run's summary.json here (default <stage>/summary.json; shards running at once each name their own)")
    parser.add_argument("--wait", action="store_true", help="import libraries, then wait for a line `go` on stdin "
                        "before reading or writing anything (used by orchestrate to overlap start-up with the previous stage)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a scheduler, a closed terminal: cleanup, exit 130
        signal.signal(signum, _interrupted)
    if args.wait and not wait_for_go(("torch", "diffusers", "transformers", *imports)):
        return 0
    job_dir = args.job_dir.resolve()
    if not (job_dir / RESOLVED_JOB).exists():
        print(f"error: {job_dir / RESOLVED_JOB} not found; run `orchestrate run JOB.toml` to resolve the job first", file=sys.stderr)
        return EXIT_USER_ERROR
    log = setup_logging(job_dir, stage)
    clock = Clock()
    keys = None if args.units is None else set()  # a shard's cleanup touches only its own units' files
    try:
        job = read_job(job_dir)
        owned = None if args.units is None else pick_units(plan_units(job)[stage], stage, args.units)
        keys = None if owned is None else {unit.key for unit in owned}
        with stage_lock(job_dir, stage, owned):
            for tmp in remove_temp_files(job_dir / stage, keys):
                log.info("%s: removed half-written %s", stage, tmp.name)
            todo, fresh = select_units(job_dir, job, stage, args.force, log, args.units)
            job["forced"] = args.force  # e.g. encode then makes every unit itself, never from the store
            summary = {"stage": stage, "units_done": 0, "units_up_to_date": fresh}
            if todo:
                warm_up_math_kernels()  # before any model is built: the same bits in every fresh process
                summary.update(make_units(job, job_dir, todo, log) or {})
                summary["units_done"] = len(todo)
            else:
                log.info("%s: all %d up to date, nothing to do", stage, fresh)
            summary["seconds"] = clock.seconds()
            summary_path = (args.summary or job_dir / stage / "summary.json").absolute()
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            publish_json(summary_path, summary)
            log.info(
                "%s: done %d, up to date %d, %.1f s (load %.1f s), peak %s",
                stage, summary["units_done"], fresh, summary["seconds"], summary.get("load_seconds", 0.0),
                format_bytes(summary.get("peak", {}).get("device_max_allocated_bytes", summary.get("peak", {}).get("host_peak_rss_bytes"))),
            )
        return 0
    except (JobFileError, ArtifactError, ResourceError) as exc:
        if _INTERRUPTS:  # e.g. a load cut short by the signal: the interruption is the news
            return _stop_interrupted(job_dir, stage, log, keys)
        log.error("error: %s", exc)
        return EXIT_RESOURCE_ERROR if isinstance(exc, ResourceError) else EXIT_USER_ERROR
    except Exception:
        if not _INTERRUPTS:
            raise
        return _stop_interrupted(job_dir, stage, log, keys)
    except KeyboardInterrupt:
        return _stop_interrupted(job_dir, stage, log, keys)


def _stop_interrupted(job_dir: Path, stage: str, log, keys=None) -> int:
    """After Ctrl-C, SIGTERM or SIGHUP: remove half-written files, say how to resume, exit 130."""
    # Ctrl-C reaches us twice (from the terminal and forwarded by the orchestrator): the second
    # must not cut this cleanup short.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        remove_temp_files(job_dir / stage, keys)
        log.warning("%s: interrupted; finished items are kept, run the same command again to resume", stage)
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED
