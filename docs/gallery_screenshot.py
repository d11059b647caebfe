"""Regenerates docs/gallery.png, the README's picture of a job's gallery page: `orchestrate demo`
run in a scratch folder (tiny random-weight model, CPU), then its index.html opened from file:// in
headless Chromium (Debian's `chromium` package, driven by Playwright, as tests/test_gallery.py
does) and screenshotted whole.

Reads:  nothing (the demo builds its model offline)
Writes: docs/gallery.png (or --out)

Example: python docs/gallery_screenshot.py      # about 40 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(workdir: Path) -> Path:
    """`orchestrate demo` in `workdir`, as a user runs it; returns its gallery page."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "orchestrator.cli", "demo", "--workdir", str(workdir), "--device", "cpu"]
    result = subprocess.run(command, cwd=workdir.parent, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: orchestrate demo failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return workdir / "demo" / "index.html"


def screenshot_page(page_path: Path, out: Path, width: int) -> None:
    """The whole page at `width` CSS pixels, in Debian's chromium."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(executable, os.X_OK):
        raise SystemExit("error: chromium not found; install Debian's package with `apt-get install -y chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        broken = page.eval_on_selector_all("article.item img", "els => els.filter(e => !e.naturalWidth).length")
        if broken:
            raise SystemExit(f"error: {broken} images of {page_path} did not load")
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png", help="where the screenshot goes")
    parser.add_argument("--width", type=int, default=1000, help="page width in CSS pixels")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        page_path = run_demo(Path(scratch) / "workdir")
        screenshot_page(page_path, args.out, args.width)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
