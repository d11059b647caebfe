"""What a rerun with nothing to do costs (issue 11, point 3): the demo model on the CPU, every
command a fresh process, as a user types it.

Reads:  nothing (builds the tiny demo model in --work)
Writes: noop.md (the table) and noop.json into --out, else $OUT, else bench/results/

Rows, each timed --repeat times after one run that made every image:
  - `orchestrate --help`: the floor (interpreter, typer, our imports)
  - `orchestrate run demo.toml --device cpu`: no budget, so nothing is ever planned
  - `orchestrate run demo.toml --device cpu --max-ram 8GiB`: a budget; the rerun reuses the previous
    plan (nothing to do), where it used to plan again
  - `orchestrate plan demo.toml --device cpu --max-ram 8GiB`: what planning itself costs, for scale

Example: python bench/noop.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    clock = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=common.subprocess_env(), capture_output=True, encoding="utf-8", errors="replace")
    seconds = time.perf_counter() - clock
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return seconds, result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time no-op reruns of the demo job on the CPU.")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="model and job folders (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="noop-"))
    work.mkdir(parents=True, exist_ok=True)
    out = common.results_dir(args.out)
    sys.path.insert(0, str(common.ROOT))
    from orchestrator.tools.tiny import DEMO_JOB, save_tiny_model

    if not (work / "demo-model" / "model_index.json").exists():
        save_tiny_model(work / "demo-model")
    (work / "demo.toml").write_text(DEMO_JOB, encoding="utf-8")
    (work / "budget.toml").write_text(DEMO_JOB.replace('name = "demo"', 'name = "budget"'), encoding="utf-8")
    orchestrate = common.orchestrate_command()
    rows = {
        "orchestrate --help (the floor)": orchestrate + ["--help"],
        "run, no budget": orchestrate + ["run", "demo.toml", "--device", "cpu", "--workdir", "w"],
        "run --max-ram 8GiB": orchestrate + ["run", "budget.toml", "--device", "cpu", "--workdir", "w", "--max-ram", "8GiB"],
        "plan --max-ram 8GiB (planning alone)": orchestrate + ["plan", "budget.toml", "--device", "cpu", "--workdir", "w", "--max-ram", "8GiB"],
    }
    for name in ("run, no budget", "run --max-ram 8GiB"):  # make every image first
        timed(rows[name], work)
    times, said = {}, {}
    for _ in range(args.repeat):  # interleaved, so load on the machine hits every row alike
        for name, command in rows.items():
            seconds, stdout = timed(command, work)
            times.setdefault(name, []).append(seconds)
            lines = stdout.strip().splitlines() or [""]  # after "nothing to do" comes the gallery's path
            said[name] = next((line for line in lines if line.startswith("nothing to do")), lines[-1])
    for name in ("run, no budget", "run --max-ram 8GiB"):
        assert said[name].startswith("nothing to do"), (name, said[name])
    floor = statistics.median(times["orchestrate --help (the floor)"])
    lines = ["| command (fresh process, demo model, CPU) | median s | min s | max s | x the floor | what it said |", "|---|---|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {min(values):.2f} | {max(values):.2f} | {median / floor:.2f} | {said[name][:70]} |")
    info = common.machine()
    text = "\n".join([
        "# No-op reruns: what `orchestrate run` costs when every image is up to date",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info.get('torch')}, diffusers {info.get('diffusers')}; "
        f"{args.repeat} repetitions, interleaved; `python bench/noop.py --repeat {args.repeat}`",
        "- job: the demo job (3 images on the tiny model); each row after one run that made every image",
        "",
        *lines,
        "",
    ])
    (out / "noop.md").write_text(text, encoding="utf-8")
    (out / "noop.json").write_text(json.dumps({"machine": info, "times": times, "last_lines": said}, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
