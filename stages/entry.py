"""The stage process: arguments, device, logging, out-of-memory and interrupt handling, unit selection."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from stages.artifacts import clear_damaged
from stages.contract import EXIT_INTERRUPTED, EXIT_RESOURCE_ERROR, EXIT_USER_ERROR, RESOLVED_JOB, ArtifactError, JobFileError, ResourceError
from stages.files import publish_json, remove_temp_files
from stages.locks import stage_lock
from stages.measure import Clock, format_bytes
from stages.resolved import read_job
from stages.units import Unit, pick_units, plan_units, unit_status


def setup_logging(job_dir: Path, stage: str) -> logging.Logger:
    """Log to stderr and to `<stage>/stage.log` (appended, so earlier attempts stay readable)."""
    stage_dir = Path(job_dir) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    clear_damaged(stage_dir / "stage.log", logging.getLogger(__name__), stage)  # appending to a FIFO would block forever
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: not record.name.startswith(ITEM_LOG))  # per-item lines: stage.log only
    for handler, level in ((console, logging.INFO), (logging.FileHandler(stage_dir / "stage.log", encoding="utf-8"), logging.DEBUG)):
        handler.setFormatter(fmt)
        handler.setLevel(level)
        root.addHandler(handler)
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"stages.{stage}")


# The logger of per-item lines ("decode: 41/1000 <item> -> decode/<item>.png 0.12 s"): they go to the
# stage's stage.log only. On the console a 10,000-item run would print one per item and stage (40,054
# lines, issue 21); the console gets the Progress of each stage instead.
ITEM_LOG = "stages.items"
# At most one console progress line per stage this often when stderr is not a terminal (a CI log,
# a file): a line every few seconds shows a run is alive without burying the lines that matter.
PROGRESS_SECONDS = 5.0


class Progress:
    """A stage's progress over its units: on a terminal one tqdm bar (count, rate, ETA); otherwise
    a line at most every PROGRESS_SECONDS and one at the end. `item()` logs its line to stage.log only."""

    def __init__(self, stage: str, total: int, log: logging.Logger, stream=None, clock=time.monotonic) -> None:
        self.stage, self.total, self.log, self.clock = stage, total, log, clock
        self.items = logging.getLogger(f"{ITEM_LOG}.{stage}")
        self.done = 0
        self.started = self.shown = clock()
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=stage, unit="item", file=stream, dynamic_ncols=True, position=0)

    def note(self, message: str, *args) -> None:
        """A line for stage.log only (e.g. a denoise step)."""
        self.items.info(message, *args)

    def item(self, count: int, message: str, *args) -> None:
        """`count` more units made; `message % args` goes to stage.log only."""
        self.items.info(message, *args)
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done < self.total and self.clock() - self.shown >= PROGRESS_SECONDS:
            self.shown = self.clock()
            self._line()

    def close(self) -> None:
        """The last line (or the finished bar)."""
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()

    def _line(self) -> None:
        seconds = self.clock() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        if self.done < self.total:
            eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate else ""
            self.log.info("%s: %d/%d items, %.1f items/s%s", self.stage, self.done, self.total, rate, eta)
        else:
            self.log.info("%s: %d/%d items in %.1f s, %.1f items/s", self.stage, self.done, self.total, seconds, rate)


@contextlib.contextmanager
def loading(stage: str, model_path: str, part: str):
    """Turn a failed from_pretrained (missing or damaged files) into a one-line JobFileError."""
    try:
        yield
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobFileError(
            f"{stage}: cannot load {part} from {model_path}/{part} ({first_line}); check that the model folder is complete "
            f"(config plus .safetensors weights)"
        ) from exc


# What a library says when it could not get memory, besides torch.OutOfMemoryError: cuBLAS and
# cuDNN fail their own allocations with these statuses (a RuntimeError from torch), MPS and ROCm
# say "out of memory".
OUT_OF_MEMORY_SAYINGS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                         "cudnn_status_not_enough_workspace", "hipblas_status_alloc_failed")


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError (host), or a RuntimeError from cuBLAS, cuDNN or a
    backend saying it could not allocate."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(say in str(exc).lower() for say in OUT_OF_MEMORY_SAYINGS)


def open_device(job: dict):
    """The stage's torch.device. On CUDA (ROCm too) and XPU: make it the current device (so that a
    stage on cuda:1 creates no context on GPU 0 and group offloading's side stream is on the right
    card), and cap this process at the job's memory budget, so that going over it is an
    out-of-memory error the stage reports (exit 3, finished items kept) rather than memory taken
    from the card silently. On MPS the same cap, as a share of Metal's recommended working set."""
    import torch

    device = torch.device(job["device"])
    budget = (job.get("runtime") or {}).get("budget_bytes")
    if device.type == "mps":
        if budget:
            # torch.mps takes the fraction of recommended_max_memory() and refuses more than 2.0.
            torch.mps.set_per_process_memory_fraction(min(2.0, budget / torch.mps.recommended_max_memory()))
        return device
    if device.type not in ("cuda", "xpu"):
        return device
    backend = getattr(torch, device.type)  # torch.cuda and torch.xpu share these calls
    if device.index is None:
        device = torch.device(device.type, backend.current_device())
    backend.set_device(device)
    if budget:
        total = backend.get_device_properties(device).total_memory
        backend.set_per_process_memory_fraction(min(1.0, budget / total), device)
    return device


@contextlib.contextmanager
def oom_guard(job: dict, *units: Unit):
    """Turn running out of memory while making `units` into a ResourceError naming the stage, the
    items, the memory budget and what to change. Units published before stay done (exit 3, resume)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        stage, items = units[0].stage, [item for unit in units for item in unit.items]
        budget = (job.get("runtime") or {}).get("budget_bytes")
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        named = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        raise ResourceError(
            f"{stage}: out of memory on item{'s' if len(items) > 1 else ''} {named} "
            f"(budget {format_bytes(budget) if budget is not None else 'no budget set'}; {said}); lower --max-vram so "
            f"the plan switches {stage} to a lighter strategy, or enable tiling (leave out --no-tiling); finished items are kept, "
            f"run again to resume"
        ) from exc


# Unary float ops that ATen hands to oneMKL's vector math library (VML) for contiguous float32 and
# float64 tensors on x86 (aten/src/ATen/cpu/vml.h, `IMPLEMENT_VML_MKL`), plus cosh/sinh/erfinv,
# which some torch versions route there too. Calling one that is not routed to VML costs nothing.
VML_OPS = ("abs", "acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "log", "log10",
           "log1p", "log2", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")


def warm_up_math_kernels() -> None:
    """Resolve oneMKL's VML kernel dispatch for every VML op, in this thread, before any model work.

    oneMKL 2024.2 (statically linked into torch 2.x x86 wheels) picks each VML function's kernel
    lazily on its first call. When that first call runs on several intra-op threads at once, one
    thread's chunk can be computed by the low-accuracy kernel although ATen asks for VML_HA
    (pytorch/pytorch#188792; fixed upstream by the same warm-up, pytorch/pytorch#188791). The first
    sizable VML call of a PixArt stage is the transformer's sin-cos position table, computed once
    at construction (float64 sin/cos over 4096 x dim/4 values) and kept as a buffer, so about one
    fresh denoise process in ten ran with a slightly different table and gave different latents for
    every item. A 1-element call never goes parallel (ATen's grain is 2048), so after this every
    later call, threaded or not, uses the dispatch MKL resolves here. Outputs of later calls are
    bitwise what an unaffected process computes; it takes about a millisecond."""
    import torch

    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(x)


def select_units(job_dir: Path, job: dict, stage: str, force: bool, log: logging.Logger,
                 wanted: list[str] | None = None) -> tuple[list[Unit], int]:
    """The units of `stage` to make now (all when forced), and how many were up to date; with
    `wanted` (`--units`), only among those."""
    units = pick_units(plan_units(job, only=stage)[stage], stage, wanted)
    todo = []
    for unit in units:
        ok, why = (False, "forced") if force else unit_status(job_dir, unit)
        if not ok:
            log.debug("%s: %s to do (%s)", stage, unit.key, why)
            todo.append(unit)
    log.info("%s: %d to do, %d up to date", stage, len(todo), len(units) - len(todo))
    return todo, len(units) - len(todo)


def clear_unit_paths(job_dir: Path, stage: str, todo: list[Unit], log: logging.Logger) -> None:
    """Before making `todo`: a FIFO, folder, link or other non-regular entry where one of their
    artifacts or records belongs is damaged and removed (the link itself, never its target), or,
    when it cannot be, an ArtifactError naming it (a rename could not replace it anyway)."""
    for unit in todo:
        for path in (*(Path(job_dir) / stage / name for name in unit.outputs), unit.record_path(job_dir)):
            if not clear_damaged(path, log, stage):
                raise ArtifactError(f"{stage}: {path} is not a regular file and cannot be removed; remove it by hand, then run again")


def wait_for_go(imports: tuple[str, ...]) -> tuple[bool, list[str] | None]:
    """Import the stage's libraries, then block until stdin says `go` (True) or closes (False);
    `go --units KEY,...` also names the units (a chunked run knows them only then).
    The orchestrator starts the next stage this way while the current one works, so the next
    process's start-up (seconds of imports) overlaps it; nothing is loaded or written before `go`,
    and torch never touches the GPU before it, so one model at a time still holds."""
    import importlib

    try:
        for name in imports:
            importlib.import_module(name)
        warm_up_math_kernels()  # while we wait anyway; see its docstring
        words = sys.stdin.readline().split()
    except KeyboardInterrupt:
        return False, None
    except Exception:
        if _INTERRUPTS:  # a library's import machinery turned our KeyboardInterrupt into another error
            return False, None
        raise
    if words[:1] != ["go"]:
        return False, None
    return True, (_unit_list(words[2]) if words[1:2] == ["--units"] and len(words) > 2 else None)


# What stops a stage: Ctrl-C, a scheduler, a closed terminal (POSIX only), and on Windows
# Ctrl-Break, which the orchestrator sends there instead of SIGINT (stages/lifeline.py).
def stop_signals() -> tuple[int, ...]:
    """The stop signals this platform has."""
    return tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None), getattr(signal, "SIGBREAK", None)) if s is not None)


# Signals received (SIGINT, SIGTERM, SIGHUP, SIGBREAK). A KeyboardInterrupt raised inside an import can come
# out as another exception (numpy's lazy attributes, transformers' and diffusers' lazy modules wrap
# it in RecursionError / ModuleNotFoundError / RuntimeError); with a signal on record, any error is
# the interruption, reported as one (exit 130, one line), not a traceback.
_INTERRUPTS: list[int] = []


def _interrupted(signum, frame) -> None:
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _unit_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        import argparse

        raise argparse.ArgumentTypeError("give at least one unit key, e.g. --units 0003-a-red-apple")
    return names


def stage_main(stage: str, make_units, argv: list[str] | None = None, imports: tuple[str, ...] = ()) -> int:
    """Run one stage process: `make_units(job, job_dir, todo, log)` loads the model and makes the
    units, publishing each artifact and then its record; this wrapper does everything else.
    `imports` are the modules to load ahead under `--wait`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage of a resolved job.")
    parser.add_argument("job_dir", type=Path, help="the job's folder, e.g. workdir/beach")
    parser.add_argument("--force", action="store_true", help="remake every unit, even those up to date")
    parser.add_argument("--units", type=_unit_list, default=None, metavar="KEY,KEY,...",
                        help="make only these units (item ids; encode also takes its own keys), e.g. 0003-a-red-apple")
    parser.add_argument("--summary", type=Path, default=None, metavar="FILE",
                        help="write this run's summary.json here (default <stage>/summary.json; shards running at once each name their own)")
    parser.add_argument("--wait", action="store_true", help="import libraries, then wait for a line `go` on stdin "
                        "before reading or writing anything (used by orchestrate to overlap start-up with the previous stage)")
    args = parser.parse_args(argv)
    for signum in stop_signals():  # Ctrl-C, a scheduler, a closed terminal, Ctrl-Break: cleanup, exit 130
        signal.signal(signum, _interrupted)
    if args.wait:
        go, units = wait_for_go(("torch", "diffusers", "transformers", *imports))
        if not go:
            return 0
        args.units = units or args.units
    job_dir = args.job_dir.resolve()
    if not (job_dir / RESOLVED_JOB).exists():
        print(f"error: {job_dir / RESOLVED_JOB} not found; run `orchestrate run JOB.toml` to resolve the job first", file=sys.stderr)
        return EXIT_USER_ERROR
    log = setup_logging(job_dir, stage)
    clock = Clock()
    keys = None if args.units is None else set()  # a shard's cleanup touches only its own units' files
    try:
        job = read_job(job_dir)
        owned = None if args.units is None else pick_units(plan_units(job, only=stage)[stage], stage, args.units)
        keys = None if owned is None else {unit.key for unit in owned}
        with stage_lock(job_dir, stage, owned):
            for tmp in remove_temp_files(job_dir / stage, keys):
                log.info("%s: removed half-written %s", stage, tmp.name)
            todo, fresh = select_units(job_dir, job, stage, args.force, log, args.units)
            clear_unit_paths(job_dir, stage, todo, log)
            job["forced"] = args.force  # e.g. encode then makes every unit itself, never from the store
            summary = {"stage": stage, "units_done": 0, "units_up_to_date": fresh}
            if todo:
                warm_up_math_kernels()  # before any model is built: the same bits in every fresh process
                summary.update(make_units(job, job_dir, todo, log) or {})
                summary["units_done"] = len(todo)
            else:
                log.info("%s: all %d up to date, nothing to do", stage, fresh)
            summary["seconds"] = clock.seconds()
            summary_path = (args.summary or job_dir / stage / "summary.json").absolute()
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            publish_json(summary_path, summary)
            log.info(
                "%s: done %d, up to date %d, %.1f s (load %.1f s), peak %s",
                stage, summary["units_done"], fresh, summary["seconds"], summary.get("load_seconds", 0.0),
                format_bytes(summary.get("peak", {}).get("device_max_allocated_bytes", summary.get("peak", {}).get("host_peak_rss_bytes"))),
            )
        return 0
    except (JobFileError, ArtifactError, ResourceError) as exc:
        if _INTERRUPTS:  # e.g. a load cut short by the signal: the interruption is the news
            return _stop_interrupted(job_dir, stage, log, keys)
        log.error("error: %s", exc)
        return EXIT_RESOURCE_ERROR if isinstance(exc, ResourceError) else EXIT_USER_ERROR
    except Exception:
        if not _INTERRUPTS:
            raise
        return _stop_interrupted(job_dir, stage, log, keys)
    except KeyboardInterrupt:
        return _stop_interrupted(job_dir, stage, log, keys)


def _stop_interrupted(job_dir: Path, stage: str, log, keys=None) -> int:
    """After Ctrl-C, SIGTERM or SIGHUP: remove half-written files, say how to resume, exit 130."""
    # Ctrl-C reaches us twice (from the terminal and forwarded by the orchestrator): the second
    # must not cut this cleanup short.
    twice = (signal.SIGINT, getattr(signal, "SIGBREAK", None))
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in twice if signum is not None}
    try:
        remove_temp_files(job_dir / stage, keys)
        log.warning("%s: interrupted; finished items are kept, run the same command again to resume", stage)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_INTERRUPTED
