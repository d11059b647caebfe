"""`orchestrate`: the command line. Thin: parsing and printing only; the work is in job/plan/runner."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import signal
from dataclasses import dataclass
from pathlib import Path

import typer

from orchestrator.jobfile import job as jobfile
from orchestrator.planning.plan import describe_stage, plan_job
from orchestrator.planning.prepare import describe_model, last_run_device, prepare_job, resolve_device
from orchestrator.executors.runner import StageFailedError, run_job, summary_table
from stages.contract import ALL_STAGES, STAGES, ArtifactError, JobFileError, ResourceError
from stages.files import shown_path
from stages.measure import format_bytes

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # never dump tensors or prompts in a traceback
    help="Run PixArt-alpha text-to-image jobs as three one-model stage processes: encode, denoise, decode.",
)

WORKDIR = typer.Option(Path("workdir"), "--workdir", help="Where job folders are made: <workdir>/<job name>/.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps | xpu | xpu:N (auto: torch's current accelerator, else cpu; ROCm GPUs are cuda).")
MAX_VRAM = typer.Option(None, "--max-vram", help="Device memory budget, e.g. 2GiB (CUDA default: free memory minus a margin).")
MAX_RAM = typer.Option(None, "--max-ram", help="Host memory budget, e.g. 8GiB; on --device cpu it is the budget.")
NO_TILING = typer.Option(False, "--no-tiling", help="Fail instead of tiling a decode that fits only tiled.")
NO_STORE = typer.Option(False, "--no-store", help="Neither take nor add prompt embeddings in the workdir's embedding store (<workdir>/.store/encode).")
EXACT = typer.Option(False, "--exact", help="Plan for parity with the diffusers pipeline: denoise batch 1 (decode is untiled whenever it fits).")


@dataclass(frozen=True)
class JobOptions:
    """What every command about one job takes: the job file, where it runs, and the memory flags."""

    job_file: Path
    workdir: Path
    device: str
    max_vram: str | None
    max_ram: str | None
    no_tiling: bool
    exact: bool

    @property
    def memory(self) -> tuple:
        """(--max-vram, --max-ram, tiling allowed, --exact), as the planner takes them."""
        return (self.max_vram, self.max_ram, not self.no_tiling, self.exact)


_JOB_OPTIONS = (  # name, type, typer parameter: JobOptions' fields, in the order --help shows them
    ("job_file", Path, typer.Argument(..., help="The job's TOML file.")),
    ("workdir", Path, WORKDIR),
    ("device", str, DEVICE),
    ("max_vram", str, MAX_VRAM),
    ("max_ram", str, MAX_RAM),
    ("no_tiling", bool, NO_TILING),
    ("exact", bool, EXACT),
)


def job_command(command=None, *, job_file=None):
    """Give `command(job, ...)` the options shared by every job command, gathered in one JobOptions:
    its own arguments come first (e.g. `stage NAME JOB_FILE`), then the shared ones, then its own
    options. `@job_command(job_file=typer.Argument(...))` words the job file's help otherwise."""
    if command is None:
        return functools.partial(job_command, job_file=job_file)
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "job"]
    shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                                default=job_file if name == "job_file" and job_file is not None else default)
              for name, kind, default in _JOB_OPTIONS]
    arguments = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        return command(JobOptions(**{name: kwargs.pop(name) for name, _, _ in _JOB_OPTIONS}), **kwargs)

    wrapper.__signature__ = inspect.Signature(arguments + shared + [p for p in own if p not in arguments])
    return wrapper


def echo(message: str) -> None:
    typer.echo(message)


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def expected_errors(command):
    """Turn the project's expected failures into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (JobFileError, ArtifactError) as exc:
            _fail(str(exc))
        except ResourceError as exc:
            _fail(str(exc), 3)
        except StageFailedError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            what = {signal.SIGTERM: "terminated (SIGTERM)", getattr(signal, "SIGHUP", None): "hung up (SIGHUP)",
                    getattr(signal, "SIGBREAK", None): "interrupted (Ctrl-Break)"}.get(signum, "interrupted")
            try:
                typer.echo(f"{what}: finished items are kept; run the same command again to resume", err=True)
            except OSError:  # the terminal that hung up is gone
                pass
            raise typer.Exit(128 + signum) from None

    return wrapper


def _gallery_refresher(resolved: dict):
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


def _run(job_file: Path, workdir: Path, device: str, force: tuple[str, ...], memory: tuple = (None, None, True, False),
         store: bool = True, chunk: int | None = None, model: str | None = None, executor: tuple = ("local", None, None)) -> None:
    """`executor`: (name, --ray-address, --gpus-per-task)."""
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
            runs = run_job(job_dir, resolved, echo, force, chunk=chunk, on_images=_gallery_refresher(resolved), reader=reader,
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


@app.command()
@expected_errors
@job_command(job_file=typer.Argument(..., help="The job's TOML file, or a prompt list (.txt, one prompt per line) with --model."))
def run(
    job: JobOptions,
    force: list[str] = typer.Option([], "--force", help="Remake this stage for every item (repeatable)."),
    no_store: bool = NO_STORE,
    chunk: int = typer.Option(None, "--chunk", help="Items per denoise/decode process, so the first images come early "
                              "(default: chosen so extra model loads cost ~3% of the run; 0: the whole queue per stage)."),
    model: str = typer.Option(None, "--model", help="For a prompt list (.txt) only: the model, a hub id or a local folder."),
    executor: str = typer.Option("local", "--executor", help="local (this machine, one stage after another) | ray "
                                 "(shards of each stage as Ray tasks over a cluster; docs/ray.md)."),
    ray_address: str = typer.Option(None, "--ray-address", help="With --executor ray: `auto` or ray://host:port to join "
                                    "a cluster (default: start a local Ray instance)."),
    gpus_per_task: float = typer.Option(None, "--gpus-per-task", help="With --executor ray on CUDA: GPUs per task (default 1; 0.5 = two per GPU)."),
) -> None:
    """Run the job's stale stages in order; resumes an interrupted run.

    Writes the job's gallery page, <workdir>/<job>/index.html, at the end. A prompt list (.txt)
    runs each line at the default parameters, in the job folder <workdir>/<file name without .txt>.

    Example: orchestrate run job.toml --workdir workdir --max-vram 2GiB
    Example: orchestrate run prompts.txt --model PixArt-alpha/PixArt-XL-2-1024-MS
    Example: orchestrate run job.toml --executor ray --ray-address auto
    """
    for stage in force:
        if stage not in ALL_STAGES:
            raise JobFileError(f"--force {stage!r} is not a stage; use one of {', '.join(STAGES)} (imagencode with img2img)")
    if chunk is not None and chunk < 0:
        raise JobFileError(f"--chunk {chunk} is negative; give a number of items, or 0 for the whole queue per stage")
    from orchestrator.executors.ray_executor import check_executor

    check_executor(executor, ray_address, gpus_per_task)
    if executor == "ray" and chunk is not None:
        raise JobFileError("--chunk is for the local executor; with --executor ray, stages already overlap shard by shard (docs/ray.md)")
    _run(job.job_file, job.workdir, job.device, tuple(force), job.memory, not no_store, chunk, model, (executor, ray_address, gpus_per_task))


@app.command()
@expected_errors
def gallery(
    job_file: Path = typer.Argument(..., help="The job's TOML file, or its prompt list (.txt)."),
    workdir: Path = WORKDIR,
    open_page: bool = typer.Option(False, "--open", help="Open the page in the default web browser."),
) -> None:
    """Write the job's gallery page, <workdir>/<job>/index.html; runs nothing, loads no model.

    The page shows the job folder as last run: per item the image or why it is missing, its
    parameters and timings, and a button that copies its job-file generation block.

    Example: orchestrate gallery job.toml --open
    """
    from orchestrator.views.gallery import job_dir_of, write_gallery

    path = write_gallery(job_dir_of(job_file, workdir))
    echo(f"gallery: {shown_path(path)}")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
@expected_errors
@job_command
def stage(
    job: JobOptions,
    name: str = typer.Argument(..., help="encode | imagencode | denoise | decode"),
    units: str = typer.Option(None, "--units", help="Only these units, comma-separated (item ids; encode also takes its keys)."),
    no_store: bool = NO_STORE,
) -> None:
    """Rerun one stage for every item (forced), or only for --units, for debugging; later stages go stale.

    Example: orchestrate stage denoise job.toml --units 0003-a-red-apple
    """
    if name not in ALL_STAGES:
        raise JobFileError(f"stage {name!r} does not exist; use one of {', '.join(ALL_STAGES)}")
    job_dir, resolved = prepare_job(job.job_file, job.workdir, job.device, job.memory, not no_store)
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
        raise ArtifactError(f"{name}: {missing[0]} is not up to date ({len(missing)} upstream units); run `orchestrate run {job.job_file}` first")
    from orchestrator.executors.runner import run_stage
    from stages.contract import RESOLVED_JOB
    from stages.files import publish_json
    from stages.locks import exclusive_lock

    with exclusive_lock(job_dir / "run.lock", f"job {job_dir.name}"):
        publish_json(job_dir / RESOLVED_JOB, resolved)
        result = run_stage(name, job_dir, True, echo, [u.key for u in chosen] if wanted is not None else None)
    echo(summary_table([result]))


@app.command()
@expected_errors
@job_command
def status(job: JobOptions) -> None:
    """Per stage and item: done, to do, or stale and why. Runs nothing. Give the memory flags of
    `run`: the decode strategy they plan (tiled or not) is part of decode's params. With
    --device auto (the default) the job is judged for the device of its last run, if it had one.

    Example: orchestrate status job.toml
    """
    job_dir, resolved = prepare_job(job.job_file, job.workdir, job.device, job.memory, as_last_run=True)
    for line in describe_model(resolved):
        echo(line)
    if job.device == "auto" and (job_dir / "job.resolved.json").is_file():
        echo(f"judged for {resolved['device']}, the device of the job's last run (--device judges it for another)")
    states = plan_job(job_dir, resolved)
    for name in states:  # imagencode only with img2img items
        for line in describe_stage(name, states[name], limit=10_000):
            echo(line)


@app.command("plan")
@expected_errors
@job_command
def plan_memory(
    job: JobOptions,
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON instead of a table."),
) -> None:
    """Per stage: the strategy, batch size and estimated peak memory under the budget, from the
    model's configs alone (no weights are read). Runs nothing; writes only its plan cache in an
    existing job folder (<workdir>/<job>/plan-cache.json), so asking again costs no planning. With
    --device auto a job whose last run was on the CPU is planned for the CPU.

    Example: orchestrate plan job.toml --max-vram 2GiB
    """
    import json
    import re

    from orchestrator.planning import memory

    loaded = jobfile.load_job(job.job_file)
    job_dir = jobfile.job_dir_for(loaded, job.workdir)
    # As `status`: auto is the CPU when the last run was there, without importing torch to look for a
    # GPU (a GPU target imports it anyway, for its free memory).
    last_cpu = job.device == "auto" and last_run_device(job_dir) == "cpu"
    # Planning needs no GPU: with --max-vram, plan for CUDA, XPU or MPS on a machine without one too.
    target = "cpu" if last_cpu else job.device if job.max_vram is not None and re.fullmatch(r"(cuda|xpu)(:\d+)?|mps", job.device) else resolve_device(job.device)
    resolved = jobfile.resolve_job(loaded, job_dir, target, require_weights=False)
    budget_bytes, host_budget_bytes = memory.budgets(resolved["device"], job.max_vram, job.max_ram)
    chosen = memory.choose_for_plan(resolved, job_dir, budget_bytes, not job.no_tiling, job.exact, host_budget_bytes)
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
             f"({memory.budget_source(resolved['device'], job.max_vram, job.max_ram, budget_bytes)})")
        echo(memory.format_plan(chosen, budget_bytes))
        pictures = len({(i["init_image_sha256"], i["image_size"]["height"], i["image_size"]["width"]) for i in resolved["items"] if i.get("init_image")})
        if pictures and not isinstance(chosen.get("decode"), memory.NoFit):  # img2img: the VAE encoder runs under the VAE's plan
            tile = getattr(chosen["decode"], "tile_size", None)
            echo(f"imagencode: {pictures} picture{'s' if pictures > 1 else ''}, the VAE's plan as decode ({f'tiled, {tile} px tiles' if tile else 'untiled'})")
    if failed:
        raise JobFileError(memory.no_fit_message(chosen, budget_bytes, not job.no_tiling, host_budget_bytes))


@app.command()
@expected_errors
def clean(
    job_file: Path = typer.Argument(..., help="The job's TOML file."),
    workdir: Path = WORKDIR,
    device: str = typer.Option("auto", "--device", help="As for run (auto: the device of the job's last run), since it decides the dtype."),
    yes: bool = typer.Option(False, "--yes", help="Remove what is listed (without it, only list)."),
    store: bool = typer.Option(False, "--store", help="Also clean embedding-store entries that no job folder in the workdir holds."),
) -> None:
    """List the files of a job that no current item uses (embeddings of edited prompts, latents and
    images of removed items, half-written files), with sizes; remove them with --yes. Never touches
    what a current item uses, nor anything while a run or stage holds the job.

    Example: orchestrate clean job.toml --yes --store
    """
    from orchestrator.tools.clean import clean as clean_job

    job = jobfile.load_job(job_file)
    job_dir = jobfile.job_dir_for(job, workdir)
    if not job_dir.is_dir():
        raise JobFileError(f"job folder {job_dir} does not exist; nothing was run for {job_file} in {workdir}")
    if device == "auto":
        device = last_run_device(job_dir) or device
    resolved = jobfile.resolve_job(job, job_dir, resolve_device(device), require_weights=False)
    clean_job(job_dir, resolved, Path(workdir).resolve(), yes, store, echo)


@app.command()
@expected_errors
def convert(
    path: Path = typer.Argument(..., help="A component folder holding .bin weights, or one checkpoint file (.pth or .safetensors)."),
    out: Path = typer.Option(None, "--out", help="For a FILE: the folder to write (it gets transformer/ and converted-from.json)."),
    config: str = typer.Option(None, "--config", help="For a FILE: a reference config name, or a transformer config.json, when the weights do not say."),
    force: bool = typer.Option(False, "--force", help="Convert again where a .safetensors file exists; for a FILE, replace a non-empty --out."),
) -> None:
    """Convert pickle weights to the .safetensors the stages load (they never load pickles).

    A FOLDER: each .bin is read with torch.load(weights_only=True), written atomically beside it,
    read back and compared tensor by tensor; the .bin files are kept. A FILE (PixArt's original
    .pth release, or a single diffusers-keyed .safetensors): written as a diffusers transformer/
    folder under --out, to name as the job file's transformer component (docs/convert.md).

    Example: orchestrate convert models/PixArt-Alpha-DMD-XL-2-512x512/transformer
    Example: orchestrate convert PixArt-Sigma-XL-2-1024-MS.pth --out models/sigma-1024
    """
    from orchestrator.tools.checkpoint import convert_checkpoint
    from orchestrator.tools.convert import convert_folder

    if path.is_dir() and (out is not None or config is not None):
        raise JobFileError(f"convert: {path} is a folder; --out and --config are for one checkpoint file")
    for line in convert_folder(path, force) if path.is_dir() else convert_checkpoint(path, out, config, force):
        echo(line)


@app.command()
@expected_errors
def demo(
    workdir: Path = WORKDIR,
    device: str = DEVICE,
    family: str = typer.Option("alpha", "--family", help="alpha (PixArt-α, 1024 bins) or sigma (PixArt-Σ: 300 tokens, SDXL-style VAE)."),
) -> None:
    """Build a tiny random-weight PixArt model offline and run a small job on it.

    The images are noise-like (random weights); the demo shows the whole pipeline working.
    Example: orchestrate demo --family sigma
    """
    from orchestrator.tools.tiny import DEMO_JOB, save_tiny_model

    if family not in ("alpha", "sigma"):
        raise JobFileError(f"--family {family!r} is not alpha or sigma")
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = "" if family == "alpha" else f"-{family}"
    model = workdir / f"demo-model{suffix}"
    if not (model / "model_index.json").exists():
        echo(f"building a tiny random-weight PixArt-{'α' if family == 'alpha' else 'Σ'} model in {shown_path(model)}")
        save_tiny_model(model, family=family)
    job_file = workdir / f"demo{suffix}.toml"
    job_file.write_text(DEMO_JOB.replace('name = "demo"', f'name = "demo{suffix}"').replace('model = "demo-model"', f'model = "demo-model{suffix}"'), encoding="utf-8")
    echo(f"job file: {shown_path(job_file)}")
    _run(job_file, workdir, device, ())




class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the orchestrator: handled like Ctrl-C (the running stage is told to
    stop, one line, exit 128 + the signal's number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def main() -> None:
    # Planning a 10,000-item job makes ~500,000 small objects, few of them in cycles: the default
    # collection every 700 allocations was a sixth of a no-op rerun's time (issue 21).
    gc.set_threshold(100_000, 20, 20)
    # A scheduler, a closed terminal (POSIX), Ctrl-Break (Windows): like Ctrl-C.
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None), getattr(signal, "SIGBREAK", None)):
        if signum is not None:
            signal.signal(signum, _terminate)
    app()


if __name__ == "__main__":
    main()
