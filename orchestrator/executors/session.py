"""The run flow of a job file, for `orchestrate run`, `demo` and `stage`: prepare, run, gallery, summary.

`run_job_file` is the whole run flow (the CLI parses and prints; this decides what to print);
`rerun_stage` is `orchestrate stage`, one stage forced for every item or for some units. Lines go
to the caller's `echo`, as with `runner.run_job`.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.executors.runner import StageFailedError, run_job, summary_table
from orchestrator.planning.plan import plan_job
from orchestrator.planning.prepare import prepare_job
from stages.contract import ALL_STAGES, STAGES, ArtifactError, JobFileError, ResourceError
from stages.files import shown_path


def check_run_flags(force: list[str], chunk: int | None, executor: str, ray_address: str | None, gpus_per_task: float | None) -> None:
    """`orchestrate run`'s flags that no job file is needed to judge: --force, --chunk, --executor and its options."""
    for stage in force:
        if stage not in ALL_STAGES:
            raise JobFileError(f"--force {stage!r} is not a stage; use one of {', '.join(STAGES)} (imagencode with img2img)")
    if chunk is not None and chunk < 0:
        raise JobFileError(f"--chunk {chunk} is negative; give a number of items, or 0 for the whole queue per stage")
    from orchestrator.executors.ray_executor import check_executor

    check_executor(executor, ray_address, gpus_per_task)
    if executor == "ray" and chunk is not None:
        raise JobFileError("--chunk is for the local executor; with --executor ray, stages already overlap shard by shard (docs/ray.md)")


def _gallery_refresher(resolved: dict, echo):
    """After each decode process of a chunked run: the gallery page again, so the first images show
    there early (its path is said once)."""
    from orchestrator.views.gallery import write_gallery_after_run

    said: list[str] = []

    def refresh(job_dir: Path, items: list[str] | None = None) -> None:
        page = write_gallery_after_run(job_dir, resolved, echo, items=items)  # remakes the chunk's data only
        if page is not None and not said:
            said.append(str(page))
            echo(f"gallery: {shown_path(page)} (refreshed after each chunk)")

    return refresh


def run_job_file(job_file: Path, workdir: Path, device: str, force: tuple[str, ...], memory: tuple = (None, None, True, False),
                 store: bool = True, chunk: int | None = None, model: str | None = None, executor: tuple = ("local", None, None),
                 *, echo) -> None:
    """`orchestrate run`: `memory` is (--max-vram, --max-ram, tiling allowed, --exact), `executor`
    (name, --ray-address, --gpus-per-task)."""
    from orchestrator.views.gallery import write_gallery_after_run
    from stages.records import RecordReader

    reader = RecordReader()  # this run's: each record and output read once (issue 21)
    plans: list = []  # the local executor leaves its final plan here, so the gallery does not plan again
    job_dir, resolved = prepare_job(job_file, workdir, device, memory, store, model, reader)
    echo(f"job {resolved['name']}: {len(resolved['items'])} images, model {resolved['model']['given']}, "
         f"{resolved['dtype']} on {resolved['device']}, folder {shown_path(job_dir)}")
    if resolved["runtime"]:
        from orchestrator.planning.memory import describe_runtime

        echo(describe_runtime(resolved["runtime"]))
    try:
        if executor[0] == "ray":
            from orchestrator.executors.ray_executor import run_job_on_ray

            runs = run_job_on_ray(job_dir, resolved, echo, force, executor[1], executor[2])
        else:
            runs = run_job(job_dir, resolved, echo, force, chunk=chunk, on_images=_gallery_refresher(resolved, echo), reader=reader,
                           plans=plans)
    except (StageFailedError, ResourceError, KeyboardInterrupt) as exc:
        write_gallery_after_run(job_dir, resolved, echo, exc)  # the page says what is missing and why
        raise
    finally:
        from orchestrator.planning.memory import remember_plan

        remember_plan(job_dir, resolved["runtime"])  # a rerun with the same shapes and budget will not plan again
    # The run's final plan and the stats of the records it judged: the page stats nothing again.
    page = write_gallery_after_run(job_dir, resolved, echo, states=plans[-1] if plans else None,
                                   stats=reader.last_snapshot if plans else None)
    if not runs:
        echo(f"nothing to do: all {len(resolved['items'])} images are up to date in {shown_path(job_dir / 'decode')}")
    else:
        echo("")
        echo(summary_table(runs))
        if executor[0] == "ray":
            from orchestrator.executors.ray_executor import worker_table

            echo("")
            echo(worker_table(runs))
        echo(f"images: {shown_path(job_dir / 'decode')}/")
    if page is not None:
        echo(f"gallery: {shown_path(page)}")


def rerun_stage(name: str, units: str | None, job_file: Path, workdir: Path, device: str, memory: tuple, store: bool, *, echo) -> None:
    """`orchestrate stage`: stage `name` forced for every item, or for the comma-separated `units`,
    once every upstream unit they need is up to date."""
    if name not in ALL_STAGES:
        raise JobFileError(f"stage {name!r} does not exist; use one of {', '.join(ALL_STAGES)}")
    job_dir, resolved = prepare_job(job_file, workdir, device, memory, store)
    states = plan_job(job_dir, resolved)
    wanted = [u.strip() for u in units.split(",") if u.strip()] if units is not None else None
    if wanted is not None:
        from stages.units import pick_units

        if not wanted:
            raise JobFileError("--units is empty; give unit keys separated by commas, e.g. --units 0003-a-red-apple")
        chosen = pick_units([s.unit for s in states[name]], name, wanted)
        units_by_key = {(st, u.unit.key): u.unit for st in states for u in states[st]}
        needed, frontier = set(), [inp for unit in chosen for inp in unit.inputs]
        while frontier:  # every upstream unit the chosen ones depend on, transitively
            key = frontier.pop()
            if key not in needed:
                needed.add(key)
                frontier.extend(units_by_key[key].inputs)
    if name not in states:
        raise JobFileError(f"stage {name!r} has nothing to make in this job (imagencode runs only for items with an image)")
    upstream = list(states)[: list(states).index(name)]
    missing = [f"{s} {u.unit.key}" for s in upstream for u in states[s]
               if u.state != "done" and (wanted is None or (s, u.unit.key) in needed)]
    if missing:
        raise ArtifactError(f"{name}: {missing[0]} is not up to date ({len(missing)} upstream units); run `orchestrate run {job_file}` first")
    from orchestrator.executors.runner import run_stage
    from stages.contract import RESOLVED_JOB
    from stages.files import publish_json
    from stages.locks import exclusive_lock

    with exclusive_lock(job_dir / "run.lock", f"job {job_dir.name}"):
        publish_json(job_dir / RESOLVED_JOB, resolved)
        result = run_stage(name, job_dir, True, echo, [u.key for u in chosen] if wanted is not None else None)
    echo(summary_table([result]))
