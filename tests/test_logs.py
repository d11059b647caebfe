"""Console output at scale (issue 21, point 4; stages/entry.py Progress): per-item lines go to the
stage's stage.log only; the console gets, per stage, a tqdm bar (count, rate, ETA) on a terminal
or, when not a terminal, a progress line at most every PROGRESS_SECONDS and one at the end."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

from stages import entry
from tests.conftest import run_inprocess, write_job


class _Clock:
    """A clock the test moves: each item takes `step` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _logged(tmp_path: Path, monkeypatch, stream) -> tuple:
    monkeypatch.setattr(sys, "stderr", stream)
    log = entry.setup_logging(tmp_path, "decode")
    return log, tmp_path / "decode" / "stage.log"


def test_without_a_terminal_the_console_gets_a_line_every_few_seconds_and_the_log_every_item(tmp_path, monkeypatch):
    """1,000 items at 0.1 s each (100 s): at most one console line per PROGRESS_SECONDS plus the
    last; stage.log holds all 1,000 per-item lines (the console none)."""
    console = io.StringIO()
    log, stage_log = _logged(tmp_path, monkeypatch, console)
    clock = _Clock()
    progress = entry.Progress("decode", 1000, log, clock=clock)
    assert progress.bar is None
    for n in range(1, 1001):
        clock.now += 0.1
        progress.item(1, "decode: %d/%d item-%04d -> decode/item-%04d.png 0.10 s", n, 1000, n, n)
    progress.close()
    lines = console.getvalue().splitlines()
    assert 1 < len(lines) <= 100 / entry.PROGRESS_SECONDS + 1, lines
    assert all("items/s" in line and "item-" not in line for line in lines), lines
    assert "ETA" in lines[0] and "decode: 1000/1000 items in 100.0 s, 10.0 items/s" in lines[-1]
    logged = stage_log.read_text().splitlines()
    assert sum("-> decode/item-" in line for line in logged) == 1000
    assert all(line in "\n".join(logged) for line in lines)  # the progress lines are in the log too


def test_on_a_terminal_one_bar_per_stage_with_count_rate_and_eta(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    console = Terminal()
    log, stage_log = _logged(tmp_path, monkeypatch, console)
    progress = entry.Progress("decode", 40, log, stream=console)
    assert progress.bar is not None
    for n in range(1, 41):
        progress.item(1, "decode: %d/%d item-%04d", n, 40, n)
    progress.close()
    bar = console.getvalue().replace("\r", "\n").splitlines()
    final = [line for line in bar if "40/40" in line]
    assert final and final[-1].startswith("decode: 100%") and "item/s" in final[-1] and "<00:00" in final[-1], bar[-3:]
    assert "item-0001" not in console.getvalue()
    assert sum("decode: " in line and "item-" in line for line in stage_log.read_text().splitlines()) == 40


def test_a_run_of_many_items_prints_a_bounded_number_of_lines(tiny_model, tmp_path, capsys):
    """`orchestrate run` of 32 items (stages in-process, output not a terminal): no per-item line on
    the console (there were 5 per item: 5,054 lines at 1,000 items), at most one progress line per
    PROGRESS_SECONDS of each stage plus its last; each stage's stage.log holds one line per item."""
    n = 32
    job_file = write_job(tmp_path, f'[job]\nname = "many"\nmodel = "{tiny_model}"\n[defaults]\nwidth = 64\nheight = 64\n'
                         'num_inference_steps = 1\nuse_resolution_binning = false\n'
                         + "".join(f'[[generation]]\nprompt = "a small picture number {i}"\n' for i in range(n)))
    capsys.readouterr()
    job_dir, runs, echoed = run_inprocess(job_file, tmp_path / "work")
    captured = capsys.readouterr()
    console = echoed + captured.out.splitlines() + captured.err.splitlines()
    per_item = [line for line in console if re.search(r"(encode|denoise|decode): \d+/\d+ (?!items)", line)]
    assert per_item == [], per_item[:3]
    for run in runs:
        shown = [line for line in console if re.search(rf"{run.stage}: \d+/{n} items", line)]
        assert 1 <= len(shown) <= run.seconds / entry.PROGRESS_SECONDS + 1, shown
        assert f"{run.stage}: {n}/{n} items in" in shown[-1]
    others = [line for line in console if not re.search(r": \d+/\d+ items", line)]
    assert len(others) <= 60, "\n".join(others)  # the decisions (8 units named per stage at most) and summaries
    for stage in ("encode", "denoise", "decode"):
        logged = (job_dir / stage / "stage.log").read_text()
        assert sum(f"{stage}: {k}/{n} " in logged for k in range(1, n + 1)) == n, stage
