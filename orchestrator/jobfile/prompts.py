"""Prompt lists: a text file with one prompt per line, as a job file's `prompts_file` or on its own.

A `[[generation]]` entry may give `prompts_file = "prompts.txt"` (relative to the job file) instead
of `prompt`; each prompt line becomes one generation with the entry's other keys (orchestrator/jobfile/job.py
expands it). `orchestrate run prompts.txt --model MODEL` runs a list on its own: it is read as the job
file `[job] model = MODEL` + `[[generation]] prompts_file = "prompts.txt"`, named after the file.

The format: UTF-8 text, one prompt per line; blank lines and lines whose first non-blank character
is `#` are skipped; leading and trailing blanks of a line are not part of its prompt.
"""

from __future__ import annotations

from pathlib import Path

from stages.contract import JobFileError
from stages.files import MAX_TEXT_BYTES, read_bytes_limited


def _shown(path) -> str:
    """A path as it can be printed on one line (escapes newlines and the like)."""
    return repr(str(path))[1:-1]


def read_prompt_lines(path: Path, where: str) -> list[tuple[int, str]]:
    """The prompts of a prompt list as (line number, prompt), or a one-line JobFileError naming
    the file and line; `where` says who named the file (e.g. "job.toml [[generation]] #2"; "" for
    a list run on its own)."""
    path = Path(path)
    where = f"{where}: " if where else ""
    try:
        if path.is_dir():
            raise JobFileError(f"{where}prompt list {_shown(path)} is a folder, not a file; check the path (relative to the job file)")
        # Regular files of at most 64 MiB only: a FIFO would hang the run, a 2 GB sparse file fill memory.
        data = read_bytes_limited(path, MAX_TEXT_BYTES, f"{where}prompt list", fix="give a regular UTF-8 text file (split a larger list)")
    except FileNotFoundError:
        raise JobFileError(f"{where}prompt list {_shown(path)} not found; check the path (relative to the job file)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise JobFileError(f"{where}prompt list {_shown(path)} cannot be read ({_shown(exc)}); check the path") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first prompt
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise JobFileError(
            f"{_shown(path)} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
            f"save the prompt list as UTF-8"
        ) from None
    prompts = []
    # split("\n"), not splitlines(): line numbers then match what an editor shows (splitlines also
    # breaks at form feeds, U+2028 and others).
    for number, line in enumerate(text.split("\n"), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            prompts.append((number, prompt))
    if not prompts:
        raise JobFileError(
            f"{where}prompt list {_shown(path)} has no prompts (only blank lines and # comments); write one prompt per line"
        )
    return prompts


def prompt_list_tables(path: Path, model: str | None) -> dict:
    """The job-file tables a bare prompt list stands for: `[job] model` from --model, one
    `[[generation]]` reading the list, every other value at its default."""
    path = Path(path)
    if model is None or not model.strip():
        raise JobFileError(
            f"{_shown(path)} is a prompt list, which names no model; give one: "
            f"`orchestrate run {_shown(path)} --model PixArt-alpha/PixArt-XL-2-1024-MS` (a hub id or a local folder)"
        )
    local = Path(model).expanduser()
    if model.startswith((".", "/", "~")) or local.exists():
        # --model is relative to where the command runs, not to the prompt list's folder.
        if not local.is_dir():
            raise JobFileError(f"--model {_shown(model)}: folder {_shown(local.resolve())} does not exist; give a local diffusers folder or a hub id")
        model = str(local.resolve())
    return {"job": {"model": model}, "generation": [{"prompts_file": path.name}]}
