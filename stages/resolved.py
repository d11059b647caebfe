"""The resolved job a stage reads (job.resolved.json), and where each model component lives."""

from __future__ import annotations

import os
import re
from pathlib import Path

from stages.contract import FORMAT_VERSION, RESOLVED_JOB, JobFileError
from stages.files import MAX_TEXT_BYTES, read_json_limited


def read_job(job_dir: Path) -> dict:
    """Read `<job_dir>/job.resolved.json`, the only input a stage takes besides artifacts."""
    path = Path(job_dir) / RESOLVED_JOB
    try:
        job = read_json_limited(path, "resolved job", MAX_TEXT_BYTES, fix="run `orchestrate run JOB.toml` to rewrite it")
    except FileNotFoundError:
        raise JobFileError(f"{path} not found; run `orchestrate run JOB.toml` first to resolve the job") from None
    if not isinstance(job, dict):
        raise JobFileError(f"{path} is not a JSON object; run `orchestrate run JOB.toml` to rewrite it")
    if job.get("format") != FORMAT_VERSION:
        raise JobFileError(
            f"{path} has format {job.get('format')!r}, this code reads {FORMAT_VERSION}; rerun `orchestrate run JOB.toml`"
        )
    return job


def read_model_config(path: Path) -> dict:
    """A model's JSON config (at most 1 MiB, a regular file: never a FIFO or /dev/zero), or a
    one-line JobFileError naming it."""
    config = read_json_limited(path, "model config", fix="the model folder is damaged; download it again")
    if not isinstance(config, dict):
        raise JobFileError(f"model config {path} is not a JSON object; the model folder is damaged; download it again")
    return config


# Names Windows refuses for a file or folder, with any extension ("con.txt" too): a job folder made
# on Linux must still work when copied there.
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))})


def windows_reserved(name: str) -> bool:
    """Windows reserves `name` for a device (CON, NUL, COM1, ... with any extension or trailing spaces)."""
    return name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED


_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug of a prompt: lowercase ASCII words joined by '-', never a name that
    Windows reserves (so 'nul' becomes 'nul-'); no dots, so no trailing dot, and one case only."""
    slug = _NOT_SLUG.sub("-", text.lower()).strip("-")[:max_len].strip("-")
    # Reserved names have at most 4 letters, and a slug has no dot or space to strip.
    return (f"{slug}-" if len(slug) <= 4 and windows_reserved(slug) else slug) or "empty"


def uses_guidance(item: dict) -> bool:
    """Classifier-free guidance is on above 1, as in the diffusers pipeline."""
    return item["guidance_scale"] > 1.0


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
    if part in ("text_encoder", "transformer", "vae"):
        from stages.weights import check_weight_files

        check_weight_files(root / part, part)  # headers only: a truncated file is named before the model loads
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


def torch_dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
