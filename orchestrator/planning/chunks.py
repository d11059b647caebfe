"""How many items each denoise and decode process gets in a chunked run (`orchestrate run --chunk`).

A chunked run encodes the whole queue (one T5 pass), then alternates denoise and decode over
chunks of items, each chunk still one process per model, so the first images exist after the first
chunk instead of after the whole queue. Each extra chunk costs one more model load per stage; the
default keeps those extra loads at about `OVERHEAD` of the run:

    extra = (chunks - 1) * (fixed_denoise + fixed_decode) <= OVERHEAD * total

where `fixed_*` is what a stage process costs regardless of its items (load, set-up, exit) and
`total` is the run's time. The first chunk is a quarter of the others, so the first images come
after a small share of the queue. Both costs come from the stages' own summaries when the job has run before
(`<stage>/summary.json`: seconds, load_seconds, units_done, and the runner's wall_seconds and
processes), else from the weights' size (`estimate_costs`). During a run the next chunk's size is
recomputed before each chunk from what this run measured so far. `--chunk N` fixes every chunk at N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from stages.artifacts import read_json
from stages.resolved import component_folder, uses_guidance

OVERHEAD = 0.03  # the share of the run that extra model loads may cost (issue 10)

# Before anything was measured: a stage process's fixed cost is its start-up plus reading its
# weights; its per-item cost is its arithmetic at a modest throughput. Rough on purpose: the first
# chunk measures the real ones, and the chunk size is recomputed from them.
PROCESS_SECONDS = 1.0  # set-up and exit not overlapped by the next process's warm start
LOAD_BYTES_PER_SECOND = 1.0e9  # safetensors from a local disk into memory, with construction
FLOPS = {"cpu": 5.0e10, "cuda": 5.0e13, "mps": 5.0e12, "xpu": 2.0e13}
VAE_FLOPS_PER_PIXEL = 2.4e6  # the SD/PixArt VAE decoder (49.5M parameters): ~2.5 TFLOP at 1024x1024
VAE_FULL_BYTES = 334_640_000  # that VAE's float32 weights on disk (83.7M parameters, encoder too)


@dataclass(frozen=True)
class StageCost:
    """What one stage process costs: `fixed` seconds whatever its items, `per_item` seconds each."""

    fixed: float
    per_item: float
    measured: bool


def measured_cost(summary: dict) -> StageCost | None:
    """The cost a stage summary shows (merged over a chunked run's processes), if it made items."""
    done = summary.get("units_done") or 0
    if done <= 0 or "seconds" not in summary:
        return None
    processes = summary.get("processes", 1)
    item_seconds = max(summary["seconds"] - summary.get("load_seconds", 0.0), 0.0)
    wall = summary.get("wall_seconds", summary["seconds"])
    return StageCost(max(wall - item_seconds, 0.0) / processes, item_seconds / done, True)


def read_cost(job_dir: Path, stage: str) -> StageCost | None:
    """The measured cost in the stage's summary.json from an earlier run, if there is one."""
    try:
        return measured_cost(read_json(Path(job_dir) / stage / "summary.json"))  # a FIFO there: never opened
    except (OSError, ValueError):
        return None


def _weight_bytes(job: dict, part: str) -> int:
    """The component's safetensors bytes on disk (0 when its weights are not here yet)."""
    folder = component_folder(job, part) / part
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def estimate_costs(job: dict) -> dict[str, StageCost]:
    """Denoise and decode costs from the weights' size and the items' shapes, before any measurement."""
    device = job.get("device", "cpu").split(":")[0]
    flops = FLOPS.get(device, FLOPS["cpu"])
    dtype_bytes = 4 if job.get("dtype") == "float32" else 2
    transformer, vae = _weight_bytes(job, "transformer"), _weight_bytes(job, "vae")
    items = job["items"] or [{}]
    denoise_flops, decode_flops = 0.0, 0.0
    for item in items:
        h, w = item.get("height", 1024), item.get("width", 1024)
        tokens = (h // 16) * (w // 16)  # latents at /8, patches of 2
        passes = item.get("num_inference_steps", 20) * (2 if item and uses_guidance(item) else 1)
        denoise_flops += 2 * (transformer / dtype_bytes) * tokens * passes
        decode_flops += VAE_FLOPS_PER_PIXEL * h * w * (vae / VAE_FULL_BYTES) * (4 / dtype_bytes)
    return {
        "denoise": StageCost(PROCESS_SECONDS + transformer / LOAD_BYTES_PER_SECOND, denoise_flops / len(items) / flops, False),
        "decode": StageCost(PROCESS_SECONDS + vae / LOAD_BYTES_PER_SECOND, decode_flops / len(items) / flops, False),
    }


def max_chunks(items: int, costs: dict[str, StageCost]) -> int:
    """The most chunks whose extra process costs stay within OVERHEAD of the run (>= 1)."""
    fixed = costs["denoise"].fixed + costs["decode"].fixed
    work = items * (costs["denoise"].per_item + costs["decode"].per_item)
    if items <= 1 or fixed <= 0:
        return max(1, items)
    # (chunks - 1) * fixed <= OVERHEAD * (work + chunks * fixed), solved for chunks
    return max(1, min(items, math.floor((OVERHEAD * work + fixed) / ((1 - OVERHEAD) * fixed))))


def next_chunk(total: int, made: int, remaining: int, costs: dict[str, StageCost]) -> int:
    """Items for the next chunk, `made` chunks into a run of `total` items with `remaining` left.
    The run gets max_chunks(total) chunks in all; the first is a quarter of the others (at least
    one item), so the first images come after a small share of the queue at no extra load; the
    rest share what is left evenly. Recomputed before every chunk, with the costs measured so far."""
    chunks = max_chunks(total, costs)
    if chunks <= 1:
        return remaining
    if made == 0:
        return min(remaining, max(1, math.ceil(math.ceil(total / chunks) / 4)))
    return math.ceil(remaining / max(1, chunks - made))


def extra_share(total: int, chunks: int, costs: dict[str, StageCost]) -> float:
    """The share of the run that `chunks - 1` extra process costs take."""
    fixed = costs["denoise"].fixed + costs["decode"].fixed
    work = total * (costs["denoise"].per_item + costs["decode"].per_item)
    return (chunks - 1) * fixed / max(work + chunks * fixed, 1e-9)


def merge_summaries(summaries: list[tuple[dict, float]]) -> dict:
    """One stage's summary over its chunk processes: counts and seconds add up, peaks take the
    maximum; `(summary, wall seconds)` pairs, in run order."""
    merged: dict = {}
    for summary, wall in summaries:
        if not merged:
            merged = dict(summary, peak=dict(summary.get("peak") or {}), processes=0, wall_seconds=0.0)  # the caller's summary stays as it is
        else:
            for key in ("units_done", "units_up_to_date", "seconds", "load_seconds", "weight_bytes_moved", "vae_upcasts"):
                if key in summary:
                    merged[key] = merged.get(key, 0) + summary[key]
            peaks = merged.setdefault("peak", {})
            for key, value in summary.get("peak", {}).items():
                if isinstance(value, (int, float)) and key != "host_peak_rss_bytes":
                    peaks[key] = max(peaks.get(key) or 0, value)
            # The budget compares one process's host peak with its own start (runner.measured_peak):
            # keep the pair of the process that added the most.
            host, start = summary.get("peak", {}).get("host_peak_rss_bytes"), summary.get("host_rss_at_start_bytes")
            if host is not None and start is not None:
                if host - start > peaks.get("host_peak_rss_bytes", 0) - merged.get("host_rss_at_start_bytes", 0):
                    peaks["host_peak_rss_bytes"], merged["host_rss_at_start_bytes"] = host, start
        merged["processes"] += 1
        merged["wall_seconds"] = round(merged["wall_seconds"] + wall, 3)
    for key in ("seconds", "load_seconds"):
        if key in merged:
            merged[key] = round(merged[key], 3)
    return merged
