"""From a job file and the command line's flags to the resolved job a run writes: the device, the
embedding store and the memory plan, reused when nothing is left to do (docs/memory.md)."""

from __future__ import annotations

from pathlib import Path

from orchestrator import job as jobfile
from stages.contract import STAGES, JobFileError


def describe_model(resolved: dict) -> list[str]:
    """The family the job runs as (and why), and where each component comes from."""
    from stages import family

    model = resolved["model"]
    components = model.get("components") or {}
    chosen = family.of(resolved.get("pipeline"))
    lines = [f"model: {chosen.name} ({chosen.pipeline}, from {resolved.get('pipeline_source', 'the default')}); "
             f"{resolved['max_sequence_length']} tokens"]
    for part in ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"):
        where = f"{components[part]['given']} ([job.components])" if part in components else model["given"]
        lines.append(f"  {part:<12} {where}")
    return lines


def resolve_device(device: str) -> str:
    """`auto` becomes cuda when torch sees a GPU; anything else is checked, not guessed."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise JobFileError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise JobFileError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu or install a CUDA build of torch")
    return device


def prepare_job(job_file: Path, workdir: Path, device: str, memory: tuple = (None, None, True, False),
             store: bool = True, model: str | None = None) -> tuple[Path, dict]:
    """The job dir and resolved job; `memory` (--max-vram, --max-ram, tiling allowed) plans its
    runtime section; `store` names the workdir's embedding store (stages/store.py) in it; `model`
    is --model, for a prompt list (.txt) given instead of a job file."""
    job = jobfile.load_job(job_file, model)
    job_dir = jobfile.job_dir_for(job, workdir)
    resolved = jobfile.resolve_job(job, job_dir, resolve_device(device))
    resolved["embedding_store"] = str(Path(workdir).resolve() / ".store" / "encode") if store else None
    from orchestrator.memory import runtime_for_job

    flags = {"max_vram": memory[0], "max_ram": memory[1], "tiling": memory[2], "exact": memory[3]}
    if resolved["device"] != "cpu" or memory[0] is not None or memory[1] is not None:  # a budget: planning would run
        reused = runtime_if_nothing_to_do(job_dir, resolved, flags)
        if reused is not None:
            resolved["runtime"] = reused
            return job_dir, resolved
    resolved["runtime"] = runtime_for_job(resolved, *memory, job_dir=job_dir)  # docs/memory.md
    if resolved["runtime"]:
        resolved["runtime"]["flags"] = flags
    return job_dir, resolved


def runtime_if_nothing_to_do(job_dir: Path, resolved: dict, flags: dict) -> dict | None:
    """The previous run's runtime section when the same job with the same memory flags has nothing
    left to do under it: a no-op rerun neither plans nor asks the GPU for its free memory."""
    import json

    try:
        previous = json.loads((job_dir / "job.resolved.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    runtime = previous.get("runtime") or {}
    same = {k: v for k, v in previous.items() if k != "runtime"} == {k: v for k, v in resolved.items() if k != "runtime"}
    if not same or not runtime.get("stages") or runtime.get("flags") != flags:
        return None
    from stages.units import plan_units, unit_status

    units = plan_units(dict(resolved, runtime=runtime))  # in stage order: the first stale unit ends the check
    if not all(unit_status(job_dir, unit)[0] for stage in STAGES for unit in units[stage]):
        return None
    return dict(runtime, plan_cache="not needed: nothing to do")
