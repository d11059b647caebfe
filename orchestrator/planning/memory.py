"""Memory planning: per stage, the fastest strategy whose estimated peak fits the budget.

`orchestrate plan` prints the plan; `orchestrate run` writes it into job.resolved.json's `runtime`
section, which the stages obey (docs/memory.md). The estimates, and what each strategy holds on the
device at its peak, are in orchestrator/planning/estimate.py. Order of preference, fastest first: resident
before stream (encode) or offload (denoise), untiled before tiled 512 px before tiled 256 px; then
the largest batch that fits (encode: texts held together; denoise: 1, 2 or 4 items of one size on
CUDA, always 1 on the CPU, where batching would break bit parity with the one-process pipeline).
"""

from __future__ import annotations

import json
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.planning.estimate import estimate_host_bytes, Estimate, ModelConfigs, estimate_decode, estimate_denoise, estimate_encode
from stages.contract import STAGES, JobFileError
from stages.files import MAX_TEXT_BYTES, read_json_limited
from stages.measure import format_bytes
from stages.resolved import component_folder, uses_guidance

KIB, MIB, GIB = 1024, 1024**2, 1024**3
# Not in peak_bytes, since max_memory_allocated does not see it: the CUDA context of each stage
# process (kernels, cuBLAS/cuDNN handles; ~0.3-0.6 GiB with lazy module loading). default_budget
# reads free memory in a fresh process, whose own context is already out of it, so it is not
# subtracted again there; a user choosing --max-vram for a small card should leave it out.
CUDA_CONTEXT_BYTES = 512 * MIB
# default_budget also keeps this share of the free memory back for allocator fragmentation.
CUDA_SAFETY_FRACTION = 0.05
# On MPS the GPU and the CPU share one memory, so --max-vram and --max-ram are one budget. Its
# default starts from Metal's recommended working set (torch.mps.recommended_max_memory(), the
# device's recommendedMaxWorkingSetSize: what macOS lets the GPU hold before it pages, about two
# thirds of the RAM on an 8 GB Mac and three quarters on larger ones), capped at the RAM less
# MACOS_RESERVE_BYTES (the system, a browser and the window server, which the working set does
# not subtract), less MPS_PROCESS_BYTES: the stage process's own interpreter, torch and libraries
# (0.5-1 GiB of host RSS before any model, summaries' host_rss_at_start_bytes), which on unified
# memory come out of the same pool. An 8 GB Mac: min(5.33, 8 - 2.5) - 1 = 4.33 GiB.
MACOS_RESERVE_BYTES = 2560 * 1024**2
MPS_PROCESS_BYTES = 1024**3
# Query chunks the planner tries, largest first, when a backend runs attention's plain path
# (stages/backends.py): 1024 quarters the score matrix at 1024 px (4096 tokens), 64 cuts it 64-fold.
ATTENTION_CHUNKS = (1024, 256, 64)
DENOISE_BATCH_SIZES = (1, 2, 4)
TILE_SIZES = (512, 256)  # tried in this order when the untiled decode does not fit

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KIB, "m": 1000**2, "mb": 1000**2, "mib": MIB,
          "g": 1000**3, "gb": 1000**3, "gib": GIB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'2GiB', '1.5GB', '512MiB' or '2048' (bytes) -> bytes; JobFileError on anything else."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or unit in ("ki", "mi", "gi", "ti"):
        raise JobFileError(f"memory size {text!r} is not understood; write e.g. 2GiB, 1.5GB, 512MiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise JobFileError(f"memory size {text!r} must be more than 0 bytes")
    return value


def default_budget(device: str) -> int | None:
    """The budget when none is given: on CUDA 95% of the memory a fresh process sees free (5% kept
    back for allocator fragmentation). That process has made its CUDA context before asking, so
    the context a stage will make is already out of the figure and is not subtracted twice. On the
    CPU None (unlimited), so the defaults stay the fastest and bit-exact; give --max-ram to plan
    for host RAM. XPU as CUDA; MPS: one pool for GPU and CPU (MACOS_RESERVE_BYTES)."""
    kind, _, index = device.partition(":")
    if kind == "mps":
        recommended, ram = _mps_memory()
        return min(recommended, ram - MACOS_RESERVE_BYTES) - MPS_PROCESS_BYTES
    if kind not in ("cuda", "xpu"):
        return None
    return budget_from_free(_cuda_free_bytes(int(index or 0)) if kind == "cuda" else _device_free_bytes("xpu", int(index or 0)))


def budget_from_free(free_bytes: int) -> int:
    return int(free_bytes * (1 - CUDA_SAFETY_FRACTION))


def budget_source(device: str, max_vram: str | None, max_ram: str | None, budget_bytes: int | None) -> str:
    """How the budget was chosen, for `plan` and `run` to say."""
    if budget_bytes is None:
        return "no budget: every stage resident, untiled"
    if device.startswith("mps"):
        return _mps_budget_source(max_vram, max_ram)
    if device.startswith(("cuda", "xpu")):
        if max_vram is not None:
            return f"--max-vram {max_vram}"
        free = round(budget_bytes / (1 - CUDA_SAFETY_FRACTION))
        return (f"default: 95% of the {format_bytes(free)} a fresh process sees free on {device} "
                f"(its {'CUDA' if device.startswith('cuda') else 'XPU'} context, like each stage's, already out of it; "
                f"5% kept for fragmentation)")
    return f"--max-ram {max_ram}" if max_ram is not None else f"--max-vram {max_vram} (host memory on the CPU)"


def _mps_budget_source(max_vram: str | None, max_ram: str | None) -> str:
    given = [f"{flag} {value}" for flag, value in (("--max-vram", max_vram), ("--max-ram", max_ram)) if value is not None]
    if given:
        return " and ".join(given) + (": one pool on MPS (unified memory), the smaller taken" if len(given) > 1 else
                                      " (MPS: GPU and CPU share this one pool)")
    recommended, ram = _mps_memory()
    return (f"default: Metal's recommended working set {format_bytes(recommended)} (torch.mps.recommended_max_memory()), at most "
            f"the RAM {format_bytes(ram)} less {format_bytes(MACOS_RESERVE_BYTES)} for macOS, less {format_bytes(MPS_PROCESS_BYTES)} "
            f"for the stage process itself: one pool for GPU and CPU")


def _mps_memory() -> tuple[int, int]:
    """(Metal's recommended working set, the machine's RAM). Asked here: MPS has no per-process
    context worth keeping out of the orchestrator."""
    import psutil
    import torch

    return torch.mps.recommended_max_memory(), psutil.virtual_memory().total


def _cuda_free_bytes(index: int) -> int:
    return _device_free_bytes("cuda", index)


def _device_free_bytes(kind: str, index: int) -> int:
    """Free device memory of cuda:N or xpu:N, asked in a child process: a CUDA (or XPU) context
    made here would stay alive (and take ~0.5 GiB) in the orchestrator while the stages run."""
    import subprocess
    import sys

    code = f"import torch; print(torch.{kind}.mem_get_info({index})[0])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=False)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise JobFileError(f"cannot read the free memory of {kind}:{index} ({said}); give --max-vram")
    return int(result.stdout.strip())


def attention_path(device: str) -> str:
    """`fused` where SDPA has a kernel whose memory grows linearly with the tokens (CUDA's flash and
    memory-efficient kernels; the CPU's flash kernel, fp32/bf16/fp16 in torch 2.13), else `plain`:
    the whole score matrix [B, heads, queries, keys] is made. MPS's SDPA is the plain path; so is
    ROCm's on consumer cards (aotriton's flash kernel covers MI200/MI300 only unless
    TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL is set); XPU is counted plain until measured on one."""
    from orchestrator.planning.prepare import device_kind

    return "fused" if device_kind(device) in ("cpu", "cuda") else "plain"


@dataclass(frozen=True)
class NoFit:
    """No strategy of a stage fits; `smallest` is the least peak any of them needs."""

    stage: str
    smallest: Estimate



# ---------------------------------------------------------------------------------------------
# What the job asks of each stage


def _texts(items: list[dict]) -> list[str]:
    """The distinct texts encode runs through T5: prompts, and negative prompts with guidance."""
    texts = {}
    for item in items:
        texts[item["prompt"]] = None
        if uses_guidance(item):
            texts[item["negative_prompt"]] = None
    return list(texts)


def _encode_units_texts(items: list[dict]) -> list[list[str]]:
    """The texts of each encode unit (one per distinct prompt and negative prompt), in job order."""
    units: dict[tuple, list[str]] = {}
    for item in items:
        negative = item["negative_prompt"] if uses_guidance(item) else None
        units.setdefault((item["prompt"], negative), [t for t in (item["prompt"], negative) if t is not None])
    return list(units.values())


def _latent_size(item: dict, sample_size: int, pipeline: str | None) -> tuple[int, int]:
    if not item["use_resolution_binning"]:
        return item["height"], item["width"]
    from stages.denoise import binned_size

    return binned_size(sample_size, item["height"], item["width"], pipeline)


def model_roots(resolved: dict) -> dict:
    """{component: folder holding <component>/} of a resolved job (base model or [job.components]);
    configs only, never a download of weights."""
    return {part: component_folder(resolved, part) for part in ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")}


# ---------------------------------------------------------------------------------------------
# Choosing


def choose_strategies(model_path, dtype: str, device_type: str, items: list[dict], max_sequence_length: int,
                      budget_bytes: int | None, allow_tiling: bool = True, exact: bool = False,
                      host_budget_bytes: int | None = None, pipeline: str | None = None) -> dict:
    """Per stage the fastest Estimate that fits the budget, or a NoFit: resident before stream or
    offload, untiled before tiled 512 before tiled 256, then the largest batch that fits. `exact`
    (--exact) keeps denoise at batch 1, as the pipeline computes each image, for parity checks."""
    plain = attention_path(device_type) == "plain"
    device_type = device_type.partition(":")[0]
    model = ModelConfigs.read(model_path if isinstance(model_path, dict) else Path(model_path))
    sample_size = json.loads(model.denoise)["sample_size"]
    texts = len(_texts(items))
    binned = [(item, *_latent_size(item, sample_size, pipeline)) for item in items]
    denoise_shapes = sorted({(h, w, uses_guidance(item)) for item, h, w in binned})
    decode_shapes = sorted({(h, w, (item["height"], item["width"]) if item["use_resolution_binning"] else None)
                            for item, h, w in binned}, key=repr)
    groups: dict[tuple, int] = {}
    for item, h, w in binned:
        key = (h, w, item["num_inference_steps"], item["guidance_scale"], tuple(item.get("timesteps") or ()),
               tuple((lora["sha256"], lora["scale"]) for lora in item.get("loras") or ()))  # denoise batches one LoRA set
        groups[key] = groups.get(key, 0) + 1

    def fits(estimate: Estimate) -> bool:
        if budget_bytes is not None and pool_bytes(model, dtype, device_type, estimate) > budget_bytes:
            return False
        # On CUDA --max-ram also bounds what a strategy keeps on the host (on the CPU it is the budget).
        return not (device_type in ("cuda", "xpu") and host_budget_bytes is not None
                    and estimate_host_bytes(model, dtype, estimate) > host_budget_bytes)

    # Encode: the first strategy that fits one text, then as many texts as fit (all without a budget).
    # Besides its batch, encode keeps the embeddings of texts a later unit uses again (a shared
    # negative prompt; stages/embedding_cache.py): most_held for one text at a time, and a stream
    # batch encoded ahead adds at most its own texts to that.
    from stages.embedding_cache import most_held

    recurring = most_held(_encode_units_texts(items), 1, stream=False)
    encode = []
    for strategy in ("resident", "stream"):
        def candidate(batch: int) -> Estimate:
            kept = recurring + (batch if strategy == "stream" else 0)
            return estimate_encode(model, dtype, device_type, strategy, batch, max_sequence_length, kept)

        low, high = (texts, texts) if budget_bytes is None else (1, texts)
        while low < high:  # the largest batch that fits; peaks grow with it
            mid = (low + high + 1) // 2
            if fits(candidate(mid)):
                low = mid
            else:
                high = mid - 1
        encode.append(candidate(low))
    # Denoise: batch 1 on the CPU (bit parity with the one-process pipeline) and without a budget.
    largest_group = max(groups.values())
    sizes = [b for b in DENOISE_BATCH_SIZES if b <= largest_group] if device_type == "cuda" and budget_bytes is not None and not exact else [1]
    # On a plain-path backend each strategy is tried whole, then with attention in query chunks
    # (stages/backends.py: the same pixels, a smaller score matrix), before the next strategy.
    chunks = (None, *ATTENTION_CHUNKS) if plain else (None,)
    denoise = [estimate_denoise(model, dtype, device_type, strategy, b, denoise_shapes, max_sequence_length, plain, chunk)
               for strategy, b in [("resident", b) for b in reversed(sizes)] + [("offload", 1)] for chunk in chunks]
    # LoRA adapters (stages/lora.py): every distinct one the job uses is injected once, unmerged, and
    # peft keeps adapter weights in float32 whatever the model's dtype; counted whole under each strategy.
    adapters = {lora["sha256"]: lora.get("parameters", 0) * 4 for item in items for lora in item.get("loras") or ()}
    denoise = [dataclasses.replace(d, weights_bytes=d.weights_bytes + sum(adapters.values())) for d in denoise]
    # Decode: tiled only when the untiled decode does not fit, and never with --no-tiling; on a
    # plain-path backend chunked attention first (same pixels, where tiling changes them slightly).
    decode = [estimate_decode(model, dtype, device_type, None, decode_shapes, plain, chunk) for chunk in chunks]
    if allow_tiling and not any(fits(d) for d in decode):
        decode += [estimate_decode(model, dtype, device_type, tile, decode_shapes, plain) for tile in TILE_SIZES]
    chosen = {}
    for stage, candidates in (("encode", encode), ("denoise", denoise), ("decode", decode)):
        fitting = [c for c in candidates if fits(c)]
        chosen[stage] = fitting[0] if fitting else NoFit(stage, min(candidates, key=lambda c: c.peak_bytes))
    # A 16-bit VAE can overflow (NaN/inf); decode then redoes that item with the VAE in float32
    # (stages/decode.py). Plan that retry too: the chosen tiling if it fits in float32, else a
    # smaller tile, else the smallest (the stage reports an out-of-memory then, items kept).
    if dtype != "float32" and budget_bytes is not None and not isinstance(chosen["decode"], NoFit):
        tiles = [None, *TILE_SIZES] if allow_tiling else [None]
        start = tiles.index(chosen["decode"].tile_size) if chosen["decode"].tile_size in tiles else 0
        chunk = chosen["decode"].attention_chunk  # the untiled retry keeps it; tiles are small enough whole
        retries = [estimate_decode(model, "float32", device_type, tile, decode_shapes, plain, None if tile else chunk)
                   for tile in tiles[start:]]
        retry = next((r for r in retries if budget_bytes is None or r.peak_bytes <= budget_bytes), retries[-1])
        chosen["decode"] = dataclasses.replace(chosen["decode"], retry=retry)
    return chosen


def pool_bytes(model: ModelConfigs, dtype: str, device_type: str, estimate: Estimate) -> int:
    """What a strategy takes from the budget: its device peak; on MPS (one pool for GPU and CPU)
    also the weights it keeps in host memory, which is the same memory there: a streamed T5's
    embedding table and read-ahead block, an offloaded transformer's blocks. So on a Mac offloading
    never looks like a saving; a resident model's host copy is gone once it is on the GPU."""
    if device_type.partition(":")[0] != "mps" or estimate.strategy not in ("stream", "offload"):
        return estimate.peak_bytes
    return estimate.peak_bytes + estimate_host_bytes(model, dtype, estimate)


def no_fit_message(chosen: dict, budget_bytes: int, allow_tiling: bool, host_budget_bytes: int | None = None) -> str:
    failed = [c for c in chosen.values() if isinstance(c, NoFit)]
    first = failed[0]
    if budget_bytes is None or first.smallest.peak_bytes <= budget_bytes:  # the device fits: the host does not (CUDA --max-ram)
        return (f"{first.stage}: no strategy that fits the device budget of {format_bytes(budget_bytes)} also fits the host "
                f"budget of {format_bytes(host_budget_bytes)} (--max-ram; weights loaded or kept on the host, see "
                f"docs/memory.md); raise --max-ram, or change --max-vram so {first.stage} can use another strategy")
    need = max(c.smallest.peak_bytes if isinstance(c, NoFit) else c.peak_bytes for c in chosen.values())
    hint = " (tiling is off: drop --no-tiling to let decode tile)" if first.stage == "decode" and not allow_tiling else ""
    return (f"{first.stage}: no strategy fits the budget of {format_bytes(budget_bytes)}; its smallest, "
            f"{_describe(first.smallest)}, needs {format_bytes(first.smallest.peak_bytes)}{hint}; the smallest workable "
            f"budget for this job is {format_bytes(need)} ({need} bytes): raise --max-vram/--max-ram to at least that")


def runtime_section(chosen: dict, device_type: str, budget_bytes: int | None, host_budget_bytes: int | None) -> dict:
    """The `runtime` section of job.resolved.json (docs/memory.md)."""
    return {
        "device_type": device_type.partition(":")[0],
        "budget_bytes": budget_bytes,
        "host_budget_bytes": host_budget_bytes,
        "stages": {stage: estimate.runtime_entry() for stage, estimate in chosen.items()},
    }


def plan_json(chosen: dict, device_type: str, budget_bytes: int | None, host_budget_bytes: int | None) -> dict:
    """What `orchestrate plan --json` prints: the runtime section, each stage with its peak's parts."""
    plan = runtime_section(chosen, device_type, budget_bytes, host_budget_bytes)
    for stage, estimate in chosen.items():
        plan["stages"][stage].update(weights_bytes=estimate.weights_bytes, activation_bytes=estimate.activation_bytes,
                                     workspace_bytes=estimate.workspace_bytes)
    return plan


def plan_memory(model_path, dtype: str, device_type: str, items: list[dict], max_sequence_length: int,
                budget_bytes: int | None, host_budget_bytes: int | None, allow_tiling: bool = True, exact: bool = False,
                pipeline: str | None = None) -> dict:
    """The runtime section for this job and budget, with the chosen estimates (`estimates`, which
    remember_plan keeps for `orchestrate plan`); JobFileError naming the stage and the smallest
    workable budget when a stage fits under none of its strategies."""
    chosen = choose_strategies(model_path, dtype, device_type, items, max_sequence_length, budget_bytes, allow_tiling, exact,
                               host_budget_bytes, pipeline)
    if any(isinstance(c, NoFit) for c in chosen.values()):
        raise JobFileError(no_fit_message(chosen, budget_bytes, allow_tiling, host_budget_bytes))
    return dict(runtime_section(chosen, device_type, budget_bytes, host_budget_bytes), estimates=estimates_json(chosen))


def budgets(device: str, max_vram: str | None, max_ram: str | None) -> tuple[int | None, int | None]:
    """(budget_bytes, host_budget_bytes) from the CLI flags: on CUDA and XPU --max-vram or the
    default; on MPS one pool (unified memory): the smaller of the two, else the default; on the CPU
    --max-ram, else --max-vram, else unlimited."""
    vram = parse_size(max_vram) if max_vram is not None else None
    ram = parse_size(max_ram) if max_ram is not None else None
    if device.startswith("mps"):
        given = [size for size in (vram, ram) if size is not None]
        return (min(given) if given else default_budget(device)), None
    if device.startswith(("cuda", "xpu")):
        return (vram if vram is not None else default_budget(device)), ram
    return (ram if ram is not None else vram), ram


def choose_for_job(resolved: dict, budget_bytes: int | None, allow_tiling: bool = True, exact: bool = False,
                   host_budget_bytes: int | None = None) -> dict:
    """choose_strategies for a resolved job (job.resolved.json's content)."""
    return choose_strategies(model_roots(resolved), resolved["dtype"], resolved["device"], resolved["items"],
                             resolved["max_sequence_length"], budget_bytes, allow_tiling, exact, host_budget_bytes,
                             resolved.get("pipeline"))


def runtime_for_job(resolved: dict, max_vram: str | None, max_ram: str | None, allow_tiling: bool = True,
                    exact: bool = False, job_dir: Path | None = None) -> dict:
    """The runtime section `orchestrate run` writes. Without a budget (the CPU without --max-ram or
    --max-vram) it is empty, which means the defaults, and nothing is estimated: `run` and `status`
    then stay fast and never import torch for planning. With `job_dir`, a plan made before for the
    same model, dtype, device, shapes, flags and budget (to 64 MiB) is taken from its plan cache."""
    budget_bytes, host_budget_bytes = budgets(resolved["device"], max_vram, max_ram)
    if budget_bytes is None:
        return {}
    key = plan_key(resolved, budget_bytes, host_budget_bytes, allow_tiling, exact)
    cached = (_read_plan_cache(job_dir).get(key) or {}).get("runtime") if job_dir is not None else None
    if isinstance(cached, dict) and cached.get("stages"):
        runtime = dict(cached, budget_bytes=budget_bytes, host_budget_bytes=host_budget_bytes, plan_cache="hit")
    else:
        # Planned for the budget rounded down to 64 MiB, so the plan holds for any budget the key covers.
        runtime = plan_memory(model_roots(resolved), resolved["dtype"], resolved["device"], resolved["items"],
                              resolved["max_sequence_length"], _floor(budget_bytes), _floor(host_budget_bytes), allow_tiling, exact,
                              resolved.get("pipeline"))
        runtime.update(budget_bytes=budget_bytes, host_budget_bytes=host_budget_bytes)
    runtime["plan_key"] = key  # `orchestrate run` remembers the plan under it (remember_plan)
    runtime["budget_source"] = budget_source(resolved["device"], max_vram, max_ram, budget_bytes)
    return runtime


# ---------------------------------------------------------------------------------------------
# The plan cache (<job_dir>/plan-cache.json)

PLAN_CACHE = "plan-cache.json"
PLAN_CACHE_ENTRIES = 32  # the most recent plans kept


def _floor(nbytes: int | None) -> int | None:
    return None if nbytes is None else max(nbytes // (64 * MIB), 1) * 64 * MIB


def _code_version() -> str:
    """The planner's sources and the libraries its estimates trace: a change in any replans."""
    import hashlib
    from importlib import metadata

    digest = hashlib.sha256()
    for name in ("estimate.py", "memory.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    for package in ("torch", "diffusers", "transformers"):
        try:
            digest.update(f"{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()[:16]


def plan_key(resolved: dict, budget_bytes: int, host_budget_bytes: int | None, allow_tiling: bool, exact: bool) -> str:
    """What decides a plan: the model (per-stage hashes), dtype, device type, family and tokens, the
    texts' count and how many encode keeps at once, each item's shape, steps and LoRA set, the
    budgets rounded down to 64 MiB, the flags and the planner's code version."""
    import hashlib

    from stages.embedding_cache import most_held

    items = resolved["items"]
    # Tuples counted, then the few distinct ones as JSON: two json.dumps per item took 0.4 s at 100,000 items, this 0.1 s.
    shapes, groups = set(), {}
    for i in items:
        steps = tuple(i.get("timesteps") or ())
        shapes.add((i["width"], i["height"], i["use_resolution_binning"], i["num_inference_steps"], uses_guidance(i), steps))
        # As choose_strategies groups denoise batches: one LoRA set per batch, and every adapter's size counted.
        group = (i["width"], i["height"], i["num_inference_steps"], i["guidance_scale"], steps,
                 tuple((lora["sha256"], lora["scale"], lora.get("parameters", 0)) for lora in i.get("loras") or ()))
        groups[group] = groups.get(group, 0) + 1
    shapes = sorted(json.dumps(shape) for shape in shapes)
    groups = sorted(json.dumps([group, count]) for group, count in groups.items())
    key = {"model": resolved["model"]["component_hashes"], "dtype": resolved["dtype"], "device": _device_kind(resolved["device"]),
           "pipeline": resolved.get("pipeline"), "tokens": resolved["max_sequence_length"], "texts": len(_texts(items)),
           "kept": most_held(_encode_units_texts(items), 1, stream=False),  # the texts' sharing, not only their count
           "shapes": shapes, "groups": groups, "budget": _floor(budget_bytes), "host": _floor(host_budget_bytes),
           "tiling": allow_tiling, "exact": exact, "code": _code_version()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def estimates_key(key: str, budget_bytes: int | None, host_budget_bytes: int | None) -> str:
    """The plan cache key of the chosen estimates `orchestrate plan` prints: plan_key's, with the
    exact budgets, since `plan` prints them and whether a strategy fits depends on them."""
    import hashlib

    return "estimates-" + hashlib.sha256(json.dumps([key, budget_bytes, host_budget_bytes]).encode()).hexdigest()[:20]


def _device_kind(device: str) -> str:
    from orchestrator.planning.prepare import device_kind

    return device_kind(device)


def _read_plan_cache(job_dir: Path) -> dict:
    try:
        data = read_json_limited(Path(job_dir) / PLAN_CACHE, "plan cache", MAX_TEXT_BYTES)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, JobFileError):
        return {}  # none yet, or damaged (not JSON, not a regular file): plan again


def remember_plan(job_dir: Path, runtime: dict) -> None:
    """Keep a freshly made plan in the job folder's plan cache (`orchestrate run` calls this once
    the folder exists): its runtime section, and its chosen estimates for `orchestrate plan` under
    the budgets it was planned for (rounded down to 64 MiB)."""
    if runtime.get("plan_key") and runtime.get("plan_cache") is None and Path(job_dir).is_dir():
        key = runtime["plan_key"]
        entries = {key: {"runtime": {k: v for k, v in runtime.items() if k not in ("budget_source", "plan_cache", "flags")}}}
        if _estimates_from_json(runtime.get("estimates")) is not None:
            floors = _floor(runtime.get("budget_bytes")), _floor(runtime.get("host_budget_bytes"))
            entries[estimates_key(key, *floors)] = {"estimates": runtime["estimates"]}
        _write_plan_cache(job_dir, entries)


def choose_for_plan(resolved: dict, job_dir: Path, budget_bytes: int | None, allow_tiling: bool = True, exact: bool = False,
                    host_budget_bytes: int | None = None) -> dict:
    """choose_for_job for `orchestrate plan`, through the job folder's plan cache: a hit reads the
    chosen estimates back and imports no torch (issue 21); a miss plans and, when the job folder
    exists, keeps them there. A cache, so a write that fails or races costs only a later replan."""
    from stages.contract import ArtifactError, ResourceError

    key = estimates_key(plan_key(resolved, budget_bytes, host_budget_bytes, allow_tiling, exact), budget_bytes, host_budget_bytes)
    entry = _read_plan_cache(job_dir).get(key)
    cached = _estimates_from_json(entry.get("estimates")) if isinstance(entry, dict) else None
    if cached is not None:
        return cached
    chosen = choose_for_job(resolved, budget_bytes, allow_tiling, exact, host_budget_bytes)
    if Path(job_dir).is_dir():
        try:
            _write_plan_cache(job_dir, {key: {"estimates": estimates_json(chosen)}})
        except (OSError, ArtifactError, ResourceError):
            pass  # e.g. a read-only job folder: `plan` still prints its plan
    return chosen


def estimates_json(chosen: dict) -> dict:
    """choose_strategies' result as JSON: per stage its Estimate's fields, or {"no_fit": smallest}."""
    return {stage: {"no_fit": dataclasses.asdict(c.smallest)} if isinstance(c, NoFit) else dataclasses.asdict(c)
            for stage, c in chosen.items()}


_ESTIMATE_INTS = ("batch_size", "weights_bytes", "activation_bytes", "workspace_bytes", "host_kept_bytes")
_STRATEGIES = {"encode": ("resident", "stream"), "denoise": ("resident", "offload"), "decode": ("full", "tiled")}


def _estimates_from_json(data) -> dict | None:
    """estimates_json read back, or None (a miss) for anything of another shape."""
    if not isinstance(data, dict) or set(data) != set(STAGES):
        return None
    chosen = {}
    for stage in STAGES:  # choose_strategies' order, which `plan` prints in
        value = data[stage]
        no_fit = isinstance(value, dict) and set(value) == {"no_fit"}
        estimate = _estimate_from_json(value["no_fit"] if no_fit else value, stage)
        if estimate is None:
            return None
        chosen[stage] = NoFit(stage, estimate) if no_fit else estimate
    return chosen


def _estimate_from_json(data, stage: str, nested: bool = False) -> Estimate | None:
    """One Estimate of `stage` read back strictly (every field, ints as ints, a known strategy), or None."""
    fields = [field.name for field in dataclasses.fields(Estimate)]
    if not isinstance(data, dict) or sorted(data) != sorted(fields) or data["stage"] != stage or data["strategy"] not in _STRATEGIES[stage]:
        return None
    if not all(type(data[k]) is int and data[k] >= 0 for k in _ESTIMATE_INTS):
        return None
    if not all(data[k] is None or (type(data[k]) is int and data[k] > 0) for k in ("tile_size", "attention_chunk")):
        return None
    retry = None
    if data["retry"] is not None:  # decode's float32 retry, one level deep
        retry = None if nested else _estimate_from_json(data["retry"], stage, nested=True)
        if retry is None:
            return None
    return Estimate(**dict(data, retry=retry))


def _write_plan_cache(job_dir: Path, entries: dict) -> None:
    """Atomic, like every file here; the newest PLAN_CACHE_ENTRIES entries are kept."""
    import time

    from stages.files import publish_json

    cache = {k: v for k, v in _read_plan_cache(job_dir).items() if isinstance(v, dict)}
    now = time.time()
    cache.update({key: dict(entry, at=now) for key, entry in entries.items()})
    newest = sorted(cache, key=lambda k: cache[k].get("at", 0) if isinstance(cache[k].get("at", 0), (int, float)) else 0)[-PLAN_CACHE_ENTRIES:]
    publish_json(Path(job_dir) / PLAN_CACHE, {k: cache[k] for k in newest})


# ---------------------------------------------------------------------------------------------
# Printing


def _strategy_name(estimate: Estimate) -> str:
    name = f"tiled {estimate.tile_size} px" if estimate.tile_size else estimate.strategy
    return name + (f", attention {estimate.attention_chunk} queries at a time" if estimate.attention_chunk else "")


def _describe(estimate: Estimate) -> str:
    return f"{_strategy_name(estimate)}, batch {estimate.batch_size}"


def format_plan(chosen: dict, budget_bytes: int | None) -> str:
    """The `orchestrate plan` table: per stage the strategy, batch and the peak's parts."""
    header = ("stage", "strategy", "batch", "weights", "activations", "workspace", "peak", "fits")
    rows = [header]
    for stage, estimate in chosen.items():
        fits = "yes"
        if isinstance(estimate, NoFit):
            estimate, fits = estimate.smallest, "NO: nothing fits"
        rows.append((stage, _strategy_name(estimate), str(estimate.batch_size), format_bytes(estimate.weights_bytes),
                     format_bytes(estimate.activation_bytes), format_bytes(estimate.workspace_bytes),
                     format_bytes(estimate.peak_bytes), fits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    retry = getattr(chosen.get("decode"), "retry", None)
    if retry is not None:
        fits = "fits" if budget_bytes is None or retry.peak_bytes <= budget_bytes else "does NOT fit: such an item would fail out of memory"
        table += (f"\ndecode retry in float32 (only for an item whose 16-bit decode overflows): {_strategy_name(retry)}, "
                  f"peak {format_bytes(retry.peak_bytes)}, {fits}")
    return table


def describe_runtime(runtime: dict) -> str:
    """One line for `orchestrate run`: the budget and each stage's strategy."""
    if not runtime.get("stages"):
        return "memory: no budget; every stage resident, untiled"
    parts = []
    for stage, entry in runtime["stages"].items():
        name = f"tiled {entry['tile_size']} px" if entry.get("tile_size") else entry["strategy"]
        name += f", attention {entry['attention_chunk']} queries at a time" if entry.get("attention_chunk") else ""
        parts.append(f"{stage} {name} (batch {entry['batch_size']}, ~{format_bytes(entry['peak_bytes'])})")
    source = f" ({runtime['budget_source']})" if runtime.get("budget_source") else ""
    return f"memory: budget {format_bytes(runtime['budget_bytes'])}{source}: " + ", ".join(parts)
