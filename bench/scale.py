"""What a queue's length costs (issue 21): 100 to 100,000 images on the tiny model, CPU, 64x64, one
step, so that our own overhead shows. Every command is a fresh process, as a user types it.

Reads:  nothing (builds the tiny model and the jobs in --work)
Writes: scale.md (the table, with the ratios) and scale.json into --out, else $OUT, else bench/results/

Per size:
  - generated (sizes up to --generate): `orchestrate run`: wall seconds, per stage seconds per item
    and peak host RSS (the stages' summary.json), encode's most embeddings held, the orchestrator's
    own peak RSS (VmHWM, polled), console lines;
  - larger sizes are not generated: each stage's records and artifacts are cloned from the
    generated job of --template items (same bytes, records rewritten for each unit: params,
    inputs, outputs, checksum), so a rerun checks as many real files as a generated job has;
  - then, --repeat times each: `orchestrate run` with nothing to do, `status`, `plan`, `gallery`
    (wall seconds, peak RSS), and the gallery page's size. The first no-op run of a cloned job
    finds no state cache (<job>/.state.json, stages/records.py) and reads every record; it is
    shown apart, and the median is of runs with the cache it saved.

A job folder already complete in --work is reused (its generation figures are those of the run
that made it, as its summary.json files say), so a long size can be generated once, e.g. in the
background, and measured later.

Example: python bench/scale.py --sizes 100,1000,10000,100000 --generate 1000 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

WORDS = "red blue green small large old new quiet bright dark cat dog ship tree house river mountain bird car lamp".split()
JOB = """[job]
name = "s{n}"
model = "model"

[defaults]
num_inference_steps = 1
width = 64
height = 64
use_resolution_binning = false
guidance_scale = 1.0
seed = 1

[[generation]]
prompts_file = "p{n}.txt"
"""


def write_job(work: Path, n: int) -> Path:
    """s<n>.toml: n distinct prompts, one image each."""
    lines = [f"a {WORDS[i % 10]} {WORDS[10 + (i // 10) % 10]} number {i}" for i in range(n)]
    (work / f"p{n}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = work / f"s{n}.toml"
    path.write_text(JOB.format(n=n), encoding="utf-8")
    return path


def timed(command: list[str], cwd: Path) -> dict:
    """Wall seconds, the process's peak RSS (VmHWM, polled every 20 ms: monotonic, so the last
    reading is its peak up to then), stdout lines; exits on failure."""
    clock = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=common.subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    peak = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text(encoding="utf-8").splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - clock
    if process.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed ({process.returncode}): {stderr.strip()[-800:]}")
    return {"seconds": seconds, "peak_rss_bytes": peak or None, "lines": stdout.count("\n") + stderr.count("\n"), "stdout": stdout}


def stage_figures(job_dir: Path) -> dict:
    """Per stage, from its summary.json: seconds per item, peak host RSS, encode's most held."""
    out = {}
    for stage in common.STAGES:
        try:
            summary = json.loads((job_dir / stage / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        done = summary.get("units_done") or 0
        out[stage] = {"units_done": done, "seconds": summary.get("seconds"),
                      "seconds_per_item": summary["seconds"] / done if done else None,
                      "peak_rss_bytes": (summary.get("peak") or {}).get("host_peak_rss_bytes"),
                      "embeddings_held_max": summary.get("embeddings_held_max")}
    return out


def clone_job(work: Path, workdir: Path, template: Path, n: int) -> None:
    """Records and artifacts for every unit of s<n>, cloned from the generated `template` job."""
    sys.path.insert(0, str(common.ROOT))
    from orchestrator.jobfile import job as jobfile
    from stages import records
    from stages.files import sha256_bytes
    from stages.units import plan_units

    loaded = jobfile.load_job(work / f"s{n}.toml")
    job_dir = jobfile.job_dir_for(loaded, workdir)
    resolved = jobfile.resolve_job(loaded, job_dir, "cpu", require_weights=False)
    resolved["runtime"] = {}
    hashes: dict[tuple, str] = {}
    for stage, units in plan_units(resolved).items():
        if not units:  # imagencode: text-only jobs have none
            continue
        (job_dir / stage).mkdir(parents=True, exist_ok=True)
        model = json.loads(next(p for p in common.published(template / stage, "*.json") if p.name != "summary.json").read_text(encoding="utf-8"))
        # Each output of the template's unit (decode: the PNG and its thumbnail), by its suffix.
        template_outputs = {name.split(".", 1)[1]: (name, entry) for name, entry in model["outputs"].items()}
        data = {suffix: (template / stage / name).read_bytes() for suffix, (name, _) in template_outputs.items()}
        digests = {suffix: sha256_bytes(blob) for suffix, blob in data.items()}
        for unit in units:
            outputs = {}
            for out in unit.outputs:
                suffix = out.split(".", 1)[1]
                (job_dir / stage / out).write_bytes(data[suffix])
                outputs[out] = dict(template_outputs[suffix][1], sha256=digests[suffix])
            record = dict(model, key=unit.key, items=list(unit.items), params=unit.params, outputs=outputs,
                          inputs={f"{up}/{key}.safetensors": hashes[(up, key)] for up, key in unit.inputs})
            record.pop("checksum", None)
            record["checksum"] = records.record_checksum(record)
            # A plain write, not publish_json's fsync per file: this is the bench's fixture.
            (job_dir / stage / f"{unit.key}.json").write_text(json.dumps(record, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            hashes[(stage, unit.key)] = digests[unit.outputs[0].split(".", 1)[1]]


def measure(args, work: Path) -> dict:
    orchestrate = common.orchestrate_command()
    # The project's bytecode, written now: with PYTHONDONTWRITEBYTECODE set (as on this project's
    # machines) every module changed since its .pyc would be compiled again in each timed command,
    # which an installed package never does.
    import compileall

    for package in ("orchestrator", "stages"):
        compileall.compile_dir(str(common.ROOT / package), quiet=1)
    workdir = work / "w"
    results: dict[int, dict] = {}
    for n in args.sizes:
        job_file = write_job(work, n)
        job_dir = workdir / f"s{n}"
        row: dict = {"items": n}
        flags = ["--device", "cpu", "--workdir", "w"]
        if n <= args.generate:
            run = timed(orchestrate + ["run", job_file.name, *flags], work)
            row["generated"] = "now" if "nothing to do" not in run["stdout"] else "earlier (reused)"
            if row["generated"] == "now":
                row["run"] = {k: v for k, v in run.items() if k != "stdout"}
            row["stages"] = stage_figures(job_dir)
        else:
            if not (job_dir / "decode").is_dir():
                clock = time.perf_counter()
                clone_job(work, workdir, workdir / f"s{args.template}", n)
                row["clone_seconds"] = time.perf_counter() - clock
            row["generated"] = f"no: cloned from s{args.template}"
        commands = {"noop": ["run", job_file.name, *flags], "status": ["status", job_file.name, *flags],
                    "plan": ["plan", job_file.name, *flags], "gallery": ["gallery", job_file.name, "--workdir", "w"]}
        for name, command in commands.items():
            runs = [timed(orchestrate + command, work) for _ in range(args.repeat)]
            if name == "noop":
                assert all("nothing to do" in r["stdout"] for r in runs), runs[0]["stdout"][-500:]
            row[name] = {"seconds": [r["seconds"] for r in runs], "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in runs) or None,
                         "lines": runs[0]["lines"]}
        page = job_dir / "index.html"
        row["gallery"]["page_bytes"] = page.stat().st_size if page.exists() else None
        results[n] = row
        print(f"{n} items: done ({row['generated']})", flush=True)
    return results


def _s(value) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def table(results: dict) -> tuple[list[str], list[list]]:
    """Rows: what was measured; columns: the sizes, then 10k/1k and 100k/10k where both exist."""
    sizes = sorted(results)
    rows: list[tuple[str, list]] = []

    def add(name, fn, show=_s):
        values = [fn(results[n]) for n in sizes]
        rows.append((name, values, show))

    def median(key):
        return lambda r: statistics.median(r[key]["seconds"]) if key in r else None

    add("generated", lambda r: r["generated"], str)
    add("whole run, s (generation)", lambda r: r.get("run", {}).get("seconds"))
    for stage in common.STAGES:
        add(f"{stage}: s per item", lambda r, s=stage: r.get("stages", {}).get(s, {}).get("seconds_per_item"), lambda v: "-" if v is None else f"{v * 1000:.1f} ms")
        add(f"{stage}: peak host RSS", lambda r, s=stage: r.get("stages", {}).get(s, {}).get("peak_rss_bytes"), common.format_bytes)
    add("encode: most embeddings held", lambda r: r.get("stages", {}).get("encode", {}).get("embeddings_held_max"), lambda v: "-" if v is None else str(v))
    add("orchestrator peak RSS (generation run)", lambda r: r.get("run", {}).get("peak_rss_bytes"), common.format_bytes)
    add("console lines of run (not a TTY)", lambda r: r.get("run", {}).get("lines"), lambda v: "-" if v is None else str(v))
    add("no-op rerun, first, s (state cache cold)", lambda r: r["noop"]["seconds"][0])
    add("no-op rerun, s (median)", median("noop"))
    add("no-op rerun peak RSS", lambda r: r["noop"]["peak_rss_bytes"], common.format_bytes)
    add("status, s (median)", median("status"))
    add("status peak RSS", lambda r: r["status"]["peak_rss_bytes"], common.format_bytes)
    add("plan, first, s (no plan cache yet)", lambda r: r["plan"]["seconds"][0])
    add("plan, s (median)", median("plan"))
    add("gallery render, s (median)", median("gallery"))
    add("gallery index.html", lambda r: r["gallery"]["page_bytes"], lambda v: "-" if v is None else f"{v / 1e6:.2f} MB")
    pairs = [(b, a) for a, b in ((1000, 10000), (10000, 100000)) if a in results and b in results]
    header = ["", *[f"{n:,} items" for n in sizes], *[f"{b // 1000}k / {a // 1000}k" for b, a in pairs]]
    out = []
    for name, values, show in rows:
        by_size = dict(zip(sizes, values))
        ratios = [_ratio(by_size[b], by_size[a]) if all(isinstance(by_size[k], (int, float)) for k in (a, b)) else "-" for b, a in pairs]
        out.append([name, *[show(v) if v is not None else "-" for v in values], *ratios])
    return header, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scale: 100 to 100,000 images, tiny model, CPU.")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 10000, 100000])
    parser.add_argument("--generate", type=int, default=1000, help="generate sizes up to this; larger ones are cloned")
    parser.add_argument("--template", type=int, default=100, help="the generated size larger ones are cloned from")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="model and job folders (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(n > args.generate for n in args.sizes) and args.template not in args.sizes:
        parser.error(f"--template {args.template} must be one of --sizes (it is generated first)")
    args.sizes = sorted(args.sizes)
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out = common.results_dir(args.out)
    sys.path.insert(0, str(common.ROOT))
    from orchestrator.tools.tiny import save_tiny_model

    if not (work / "model" / "model_index.json").exists():
        save_tiny_model(work / "model")
    results = measure(args, work)
    header, rows = table(results)
    info = common.machine()
    text = "\n".join([
        "# Scale: what a queue's length costs (issue 21)",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info.get('torch')}, diffusers {info.get('diffusers')}; "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        f"- `python bench/scale.py --sizes {','.join(map(str, args.sizes))} --generate {args.generate} --repeat {args.repeat}`: tiny model, "
        "CPU, 64x64, 1 step, no guidance, distinct prompts; every command a fresh process",
        "- sizes above --generate are not generated: their records and artifacts are cloned from the "
        f"{args.template}-item job (same bytes; records rewritten per unit), so reruns check as many real files",
        "",
        common.markdown_table(header, rows),
        "",
    ])
    (out / "scale.md").write_text(text, encoding="utf-8")
    (out / "scale.json").write_text(json.dumps({"machine": info, "results": {str(k): v for k, v in results.items()}}, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
