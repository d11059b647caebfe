"""From a job file and the command line's flags to the resolved job a run writes: the device, the
embedding store and the memory plan, reused when nothing is left to do (docs/memory.md)."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.jobfile import job as jobfile
from stages.contract import ALL_STAGES, JobFileError


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
    if resolved.get("device", "cpu") != "cpu":
        lines.append(describe_device(resolved["device"]))
    sets: dict[str, list[str]] = {}  # each LoRA set with the items that use it (denoise applies them)
    for item in resolved.get("items", ()):
        if item.get("loras"):
            sets.setdefault(", ".join(f"{lora['given']} x{lora['scale']:g}" for lora in item["loras"]), []).append(item["id"])
    for shown, ids in sets.items():
        lines.append(f"  loras        {shown} (item{'s' if len(ids) > 1 else ''} {', '.join(ids[:4])}{f' +{len(ids) - 4}' if len(ids) > 4 else ''})")
    return lines


DEVICE_FORMS = "auto, cpu, cuda, cuda:N, mps, xpu, xpu:N"
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?|xpu(:\d+)?)")
# What to say when torch cannot see the backend a --device names (the fix is a different torch build).
_MISSING = {
    "cuda": "torch sees no CUDA or ROCm GPU here; use --device cpu, or install torch's CUDA or ROCm wheel (docs/platforms.md)",
    "mps": "torch sees no Apple GPU (MPS) here: MPS needs an Apple-silicon Mac with macOS 12.3 or later and torch's macOS "
           "wheel; use --device cpu",
    "xpu": "torch sees no Intel GPU (XPU) here; use --device cpu, or install torch's XPU wheel and Intel's GPU driver "
           "(docs/platforms.md)",
}


def backend_available(kind: str) -> bool:
    """Whether this torch can run on `kind` (cuda, mps or xpu) here."""
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def resolve_device(device: str) -> str:
    """`auto` becomes torch's current accelerator (cuda, mps or xpu) when there is one, else cpu;
    anything else is checked, not guessed."""
    if not _DEVICE.fullmatch(device) and device != "auto":
        raise JobFileError(f"--device {device!r} is not one of {DEVICE_FORMS}")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if accelerator is not None:
            found = accelerator.current_accelerator()
            # An accelerator this project has no path for (e.g. a Meta MTIA) leaves the CPU.
            return found.type if found is not None and found.type in _MISSING else "cpu"
        return next((kind for kind in ("cuda", "mps", "xpu") if backend_available(kind)), "cpu")
    kind = device.partition(":")[0]
    if not backend_available(kind):
        raise JobFileError(f"--device {device}: {_MISSING[kind]}")
    return device


def device_kind(device: str) -> str:
    """cpu, cuda, rocm, mps or xpu: ROCm builds of torch run AMD GPUs as `cuda` with
    torch.version.hip set. Only a CUDA device imports torch to ask."""
    kind = device.partition(":")[0]
    if kind != "cuda":
        return kind
    import torch

    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def describe_device(device: str) -> str:
    """One line for `status` and `plan`: the device and the backend torch runs it with."""
    import torch

    kind = device_kind(device)
    cuda = f"NVIDIA CUDA {torch.version.cuda}" if torch.version.cuda else "CUDA (planned only: this torch has no CUDA)"
    said = {"cuda": cuda, "rocm": f"AMD ROCm (HIP {torch.version.hip}), as torch's cuda device",
            "mps": "Apple Metal (MPS), memory shared with the CPU", "xpu": "Intel GPU (XPU)"}[kind]
    return f"device: {device}: {said}"


def last_run_device(job_dir: Path) -> str | None:
    """The device the job's last run used (its job.resolved.json), when it names one validly."""
    from stages.resolved import read_job

    try:
        device = read_job(job_dir).get("device")
    except (OSError, ValueError, JobFileError):
        return None
    return device if isinstance(device, str) and _DEVICE.fullmatch(device) else None


def prepare_job(job_file: Path, workdir: Path, device: str, memory: tuple = (None, None, True, False),
             store: bool = True, model: str | None = None, reader=None, as_last_run: bool = False) -> tuple[Path, dict]:
    """The job dir and resolved job; `memory` (--max-vram, --max-ram, tiling allowed) plans its
    runtime section; `store` names the workdir's embedding store (stages/store.py) in it; `model`
    is --model, for a prompt list (.txt) given instead of a job file; `reader`: the run's
    records.RecordReader, so the records checked here are not read again by the run.
    `as_last_run` (status): `auto` is the device of the job's last run when there was one, as
    `clean` takes it, so judging a job never imports torch to look for a GPU."""
    job = jobfile.load_job(job_file, model)
    job_dir = jobfile.job_dir_for(job, workdir)
    last = last_run_device(job_dir) if as_last_run and device == "auto" else None
    resolved = jobfile.resolve_job(job, job_dir, last or resolve_device(device))
    resolved["embedding_store"] = str(Path(workdir).resolve() / ".store" / "encode") if store else None
    from orchestrator.planning.memory import runtime_for_job

    flags = {"max_vram": memory[0], "max_ram": memory[1], "tiling": memory[2], "exact": memory[3]}
    if resolved["device"] != "cpu" or memory[0] is not None or memory[1] is not None:  # a budget: planning would run
        reused = runtime_if_nothing_to_do(job_dir, resolved, flags, reader)
        if reused is not None:
            resolved["runtime"] = reused
            return job_dir, resolved
    resolved["runtime"] = runtime_for_job(resolved, *memory, job_dir=job_dir)  # docs/memory.md
    if resolved["runtime"]:
        resolved["runtime"]["flags"] = flags
    return job_dir, resolved


def runtime_if_nothing_to_do(job_dir: Path, resolved: dict, flags: dict, reader=None) -> dict | None:
    """The previous run's runtime section when the same job with the same memory flags has nothing
    left to do under it: a no-op rerun neither plans nor asks the GPU for its free memory."""
    from stages.artifacts import read_json
    from stages.files import MAX_TEXT_BYTES

    try:  # never opened when not a regular file: a FIFO there would block the read forever
        previous = read_json(job_dir / "job.resolved.json", MAX_TEXT_BYTES)
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict):
        return None
    runtime = previous.get("runtime") or {}
    same = {k: v for k, v in previous.items() if k != "runtime"} == {k: v for k, v in resolved.items() if k != "runtime"}
    if not same or not runtime.get("stages") or runtime.get("flags") != flags:
        return None
    from stages.records import RecordReader
    from orchestrator.planning.plan import plan_key
    from stages.units import plan_units, unit_status

    reader = reader if reader is not None else RecordReader()
    reader.attach(job_dir)  # the job's state cache: judged by stat, as the run's plan will (docs/state.md)
    reused = dict(runtime, plan_cache="not needed: nothing to do")
    key = plan_key(dict(resolved, runtime=reused))
    if key is not None and reader.plan_done(key) is not None:  # the plan entry: every unit done, no file changed
        return reused
    units = plan_units(dict(resolved, runtime=runtime))  # in stage order: the first stale unit ends the check
    if not all(unit_status(job_dir, unit, reader=reader)[0] for stage in ALL_STAGES for unit in units.get(stage, ())):
        return None
    return reused
