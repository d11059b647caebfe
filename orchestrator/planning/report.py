"""`orchestrate plan`: the memory plan of a job from its configs alone, as a table or JSON; runs nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.jobfile import job as jobfile
from orchestrator.planning import memory
from orchestrator.planning.prepare import describe_model, last_run_device, resolve_device
from stages.contract import JobFileError
from stages.measure import format_bytes


def report_plan(job_file: Path, workdir: Path, device: str, max_vram: str | None, max_ram: str | None, tiling: bool, exact: bool,
                json_output: bool, *, echo) -> None:
    """Per stage the strategy, batch size and estimated peak under the budget; a stage that fits in
    no way is a JobFileError, after the table (not after the JSON, which is then not printed)."""
    loaded = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(loaded, workdir)
    # As `status`: auto is the CPU when the last run was there, without importing torch to look for a
    # GPU (a GPU target imports it anyway, for its free memory).
    last_cpu = device == "auto" and last_run_device(job_dir) == "cpu"
    # Planning needs no GPU: with --max-vram, plan for CUDA, XPU or MPS on a machine without one too.
    target = "cpu" if last_cpu else device if max_vram is not None and re.fullmatch(r"(cuda|xpu)(:\d+)?|mps", device) else resolve_device(device)
    resolved = jobfile.resolve_job(loaded, job_dir, target, require_weights=False)
    budget_bytes, host_budget_bytes = memory.budgets(resolved["device"], max_vram, max_ram)
    chosen = memory.choose_for_plan(resolved, job_dir, budget_bytes, tiling, exact, host_budget_bytes)
    failed = any(isinstance(c, memory.NoFit) for c in chosen.values())
    if json_output and not failed:
        plan = memory.plan_json(chosen, resolved["device"], budget_bytes, host_budget_bytes)
        plan["pipeline"] = resolved["pipeline"]
        echo(json.dumps(plan, indent=2))
    elif not json_output:
        for line in describe_model(resolved):
            echo(line)
        if last_cpu:
            echo("planned for cpu, the device of the job's last run (--device plans for another)")
        echo(f"memory plan for {resolved['name']}: {len(resolved['items'])} images, {resolved['dtype']} on {resolved['device']}, "
             f"budget {format_bytes(budget_bytes) if budget_bytes is not None else 'unlimited'} "
             f"({memory.budget_source(resolved['device'], max_vram, max_ram, budget_bytes)})")
        echo(memory.format_plan(chosen, budget_bytes))
        pictures = len({(i["init_image_sha256"], i["image_size"]["height"], i["image_size"]["width"]) for i in resolved["items"] if i.get("init_image")})
        if pictures and not isinstance(chosen.get("decode"), memory.NoFit):  # img2img: the VAE encoder runs under the VAE's plan
            tile = getattr(chosen["decode"], "tile_size", None)
            echo(f"imagencode: {pictures} picture{'s' if pictures > 1 else ''}, the VAE's plan as decode ({f'tiled, {tile} px tiles' if tile else 'untiled'})")
    if failed:
        raise JobFileError(memory.no_fit_message(chosen, budget_bytes, tiling, host_budget_bytes))
