"""What the Ray executor costs and gains (issue 9): the same 32-image queue with the local executor,
Ray with 1 worker and Ray with 2 workers, on the CPU.

Reads:  nothing (builds the moderate-width random PixArt-alpha of bench/overhead.py in --work)
Writes: ray_scaling.md (the table) and ray_scaling.json into --out, else $OUT, else bench/results/

Each run is a fresh `orchestrate run job.toml --device cpu` from an empty workdir, as a user types
it; the Ray runs add `--executor ray --ray-address ADDR` and join a cluster started beforehand with
`ray start --head --num-cpus N` (N workers: one task per CPU; joined with `--ray-address auto`), as on a real cluster, which is up
before the job; its start-up time is reported apart. Torch uses 1 thread per process everywhere
(`--threads`; Ray does the same for 1-CPU tasks), so N workers use N cores. Reported per run: wall
seconds, seconds to the first PNG, that as a share of the wall time, the ratio to the local wall
time, and whether the 32 images equal the local run's.

Example: python bench/ray_scaling.py --work /tmp/pixart-bench-ray
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import common
from overhead import PROMPTS, ensure_model


def job_items(size: int, steps: int, per_prompt: int) -> list[dict]:
    """8 prompts x `per_prompt` seeds (a queue reuses prompts: 8 encode units for 32 images)."""
    return [{"prompt": p, "negative_prompt": "", "seed": 2000 + 10 * n, "count": per_prompt, "width": size, "height": size,
             "guidance_scale": 4.5, "num_inference_steps": steps, "use_resolution_binning": False} for n, p in enumerate(PROMPTS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(workers: int, threads: int, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    """`ray start --head --num-cpus N --block` in the background; (process, address, seconds to ready)."""
    ray_cli = Path(sys.executable).parent / "ray"
    port = free_port()
    clock = time.perf_counter()
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", f"--num-cpus={workers}", "--num-gpus=0",
                                "--include-dashboard=false", "--disable-usage-stats", "--block"],
                               stdout=log, stderr=subprocess.STDOUT, env=common.subprocess_env(threads))
    # `auto`: the cluster `ray start` just recorded in /tmp/ray/ray_current_cluster (one at a time
    # here). With Ray 2.60 on this machine an explicit host:port failed to connect where `auto` did not.
    address = "auto"
    probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
             f"assert ray.cluster_resources().get('CPU') == {workers}; ray.shutdown()"]
    deadline = time.monotonic() + 120
    while not _answers(probe, threads):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_cluster(process)
            raise SystemExit(f"error: the Ray cluster did not start; see {log_path}")
        time.sleep(0.5)
    return process, address, round(time.perf_counter() - clock, 2)


def _answers(probe: list[str], threads: int) -> bool:
    """The probe connected; a probe started before `ray start` wrote the new address may wait on the
    previous (stopped) cluster forever, so each try gets 30 s."""
    try:
        return subprocess.run(probe, capture_output=True, env=common.subprocess_env(threads), timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def stop_cluster(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def timed_run(command: list[str], workdir: Path, threads: int) -> dict:
    """One `orchestrate run` from an empty workdir: wall seconds, seconds to the first PNG, images."""
    common.fresh_folder(workdir)
    start_epoch, clock = time.time(), time.perf_counter()
    with open(workdir / "orchestrate.log", "w", encoding="utf-8") as log:
        code = subprocess.run(command + ["--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT,
                              env=common.subprocess_env(threads), cwd=common.ROOT).returncode
    wall = round(time.perf_counter() - clock, 2)
    if code != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... exited {code}; see {workdir / 'orchestrate.log'}")
    job_dir = workdir / "scaling"
    items = json.loads((job_dir / "job.resolved.json").read_text(encoding="utf-8"))["items"]
    first = common.first_file_seconds(job_dir / "decode", "*.png", start_epoch)
    return {"wall": wall, "first_image": first, "images": [str(job_dir / i["image"]) for i in items]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local executor vs Ray with 1 and 2 workers, same 32-image queue, CPU.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-bench-ray"), help="model and run folders")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else bench/results)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (no binning)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt (8 prompts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args(argv)
    out = common.results_dir(args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.work)
    items = job_items(args.size, args.steps, args.per_prompt)
    job_file = args.work / "scaling.toml"
    common.write_job(job_file, model, items, "scaling", "bench/ray_scaling.py")
    run = common.orchestrate_command() + ["run", str(job_file), "--device", "cpu"]

    rows = {}
    load_before = os.getloadavg()[0]
    print("local executor ...", flush=True)
    rows["local"] = timed_run(run, args.work / "local", args.threads)
    for workers in (1, 2):
        print(f"ray, {workers} worker(s): starting the cluster ...", flush=True)
        cluster, address, started = start_cluster(workers, args.threads, args.work / f"ray-{workers}-cluster.log")
        try:
            rows[f"ray {workers}"] = timed_run(run + ["--executor", "ray", "--ray-address", address], args.work / f"ray-{workers}", args.threads)
        finally:
            stop_cluster(cluster)
        rows[f"ray {workers}"]["cluster_start"] = started
    load_after = os.getloadavg()[0]

    local = rows["local"]
    table = []
    for name, row in rows.items():
        same = common.compare_images(row["images"], local["images"])
        table.append([name if name == "local" else f"ray, {name.split()[1]} worker{'s' if name != 'ray 1' else ''}",
                      f"{row['wall']:.1f}", f"{row['wall'] / local['wall']:.2f}x", f"{row['first_image']:.1f}",
                      f"{row['first_image'] / row['wall']:.0%}", f"{row.get('cluster_start', 0):.1f}" if "cluster_start" in row else "-",
                      f"{same['equal']}/{len(local['images'])}"])
    header = ["executor", "wall s", "x local", "first image s", "first image / wall", "cluster start s (apart)", "images equal to local"]
    info = common.machine()
    text = "\n".join([
        "# Ray executor scaling: the same 32-image queue, local vs Ray with 1 and 2 workers",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info.get('torch')}; load average {load_before:.1f} before, "
        f"{load_after:.1f} after; `python bench/ray_scaling.py`",
        f"- job: {len(items) * args.per_prompt} images ({len(items)} prompts x {args.per_prompt} seeds), {args.size}x{args.size}, "
        f"{args.steps} steps, CFG 4.5; the moderate-width random PixArt-alpha of bench/overhead.py (float32, CPU); "
        f"{args.threads} torch thread per process",
        "- each run a fresh `orchestrate run` from an empty workdir; Ray runs join a cluster started before (`ray start --head "
        "--num-cpus N`), whose start-up is shown apart",
        "",
        common.markdown_table(header, table),
        "",
    ])
    (out / "ray_scaling.md").write_text(text, encoding="utf-8")
    (out / "ray_scaling.json").write_text(json.dumps({"machine": info, "rows": rows, "load": [load_before, load_after]}, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
