"""`orchestrate`: the command line, a table of commands; each body hands its work to its folder's module.

The run flow (`run`, `demo`, `stage`): executors/session.py; `status`: views/status.py; `plan`:
planning/report.py; `clean`, `convert`, `demo`'s tiny model: tools/. Here: the options, the one-line
errors and exit codes, and the signals.
"""

from __future__ import annotations

import functools
import gc
import inspect
import signal
from dataclasses import dataclass
from pathlib import Path

import typer

from orchestrator.executors import session
from orchestrator.executors.runner import StageFailedError
from orchestrator.views.status import show_status
from stages.contract import ArtifactError, JobFileError, ResourceError
from stages.entry import stop_signals
from stages.files import shown_path

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
    session.check_run_flags(force, chunk, executor, ray_address, gpus_per_task)
    session.run_job_file(job.job_file, job.workdir, job.device, tuple(force), job.memory, not no_store, chunk, model,
                         (executor, ray_address, gpus_per_task), echo=echo)


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
    session.rerun_stage(name, units, job.job_file, job.workdir, job.device, job.memory, not no_store, echo=echo)


@app.command()
@expected_errors
@job_command
def status(job: JobOptions) -> None:
    """Per stage and item: done, to do, or stale and why. Runs nothing. Give the memory flags of
    `run`: the decode strategy they plan (tiled or not) is part of decode's params. With
    --device auto (the default) the job is judged for the device of its last run, if it had one.

    Example: orchestrate status job.toml
    """
    show_status(job.job_file, job.workdir, job.device, job.memory, echo=echo)


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
    from orchestrator.planning.report import report_plan

    report_plan(job.job_file, job.workdir, job.device, job.max_vram, job.max_ram, not job.no_tiling, job.exact, json_output, echo=echo)


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
    from orchestrator.tools.clean import clean_job_file

    clean_job_file(job_file, workdir, device, yes, store, echo)


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
    from orchestrator.tools.convert import convert_path

    for line in convert_path(path, out, config, force):
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
    from orchestrator.tools.tiny import write_demo_job

    session.run_job_file(write_demo_job(workdir, family, echo), workdir, device, (), echo=echo)


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
    stops = [signum for signum in stop_signals() if signum != signal.SIGINT]  # Ctrl-C is Python's KeyboardInterrupt already
    for signum in stops:
        signal.signal(signum, _terminate)
    try:
        app()
    finally:  # the work is over: a signal during interpreter shutdown (handlers back to default) must not kill it
        for signum in stops:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
