"""The memory planner's choices for the full-size PixArt-XL-2-1024-MS at 1024x1024, per budget.

Reads:  orchestrator/reference_configs/PixArt-XL-2-1024-MS/ (the real configs; no weights are read
        or needed: every model is built on fake tensors, nothing is allocated)
Writes: bench/results/memory_plan.md and memory_plan.json: per budget (unlimited, 8, 4, 2, 1 GiB)
        and stage, the strategy, batch size and estimated peak device memory with its parts.

Example: python bench/memory_plan.py

Assumes what `orchestrate run --device cuda --max-vram B` plans for one 1024x1024 image with
guidance (CFG batch 2) in fp16: a CUDA device, T5 with fp32 `wo`, 120 tokens. Peaks are what
torch.cuda.max_memory_allocated would show; the CUDA context (~0.5 GiB) comes on top.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from orchestrator.planning import memory  # noqa: E402
from orchestrator.tools.tiny import REFERENCE_CONFIGS  # noqa: E402
from stages.measure import format_bytes  # noqa: E402

MODEL = REFERENCE_CONFIGS / "PixArt-XL-2-1024-MS"
BUDGETS = (None, 8 * memory.GIB, 4 * memory.GIB, 2 * memory.GIB, 1 * memory.GIB)
ITEM = {"prompt": "a small cactus with a happy face in the sahara desert", "negative_prompt": "", "guidance_scale": 4.5,
        "num_inference_steps": 20, "width": 1024, "height": 1024, "use_resolution_binning": True}


def main() -> None:
    started = time.perf_counter()
    plans, rows = [], []
    for budget in BUDGETS:
        chosen = memory.choose_strategies(MODEL, "float16", "cuda", [ITEM], 120, budget)
        plan = memory.plan_json(chosen, "cuda", budget, None)
        plans.append(plan)
        for stage, entry in plan["stages"].items():
            name = f"tiled {entry['tile_size']} px" if entry.get("tile_size") else entry["strategy"]
            fits = budget is None or entry["peak_bytes"] <= budget
            rows.append([format_bytes(budget) if budget else "unlimited", stage, name, entry["batch_size"],
                         format_bytes(entry["weights_bytes"]), format_bytes(entry["activation_bytes"]),
                         format_bytes(entry["workspace_bytes"]), format_bytes(entry["peak_bytes"]), "yes" if fits else "NO"])
    seconds = time.perf_counter() - started
    table = markdown_table(["budget", "stage", "strategy", "batch", "weights", "activations", "workspace", "peak", "fits"], rows)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "memory_plan.md").write_text(
        "# Memory plan: PixArt-XL-2-1024-MS, 1024x1024, fp16, CUDA, one image with guidance\n\n"
        "Made by `python bench/memory_plan.py` from the real configs alone (fake tensors; nothing allocated).\n"
        "Peak = weights + activations + workspace (cuBLAS 32 MiB; decode adds 64 MiB for cuDNN), as\n"
        "torch.cuda.max_memory_allocated counts it; the CUDA context (~0.5 GiB) is not included.\n\n"
        f"{table}\n\nPlanned all budgets in {seconds:.1f} s (imports included).\n",
        encoding="utf-8",
    )
    (results / "memory_plan.json").write_text(json.dumps({"model": "PixArt-XL-2-1024-MS", "size": "1024x1024", "dtype": "float16",
                                                          "device_type": "cuda", "plans": plans}, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(f"\nplanned in {seconds:.1f} s; wrote {results / 'memory_plan.md'} and memory_plan.json")


if __name__ == "__main__":
    main()
