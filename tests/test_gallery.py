"""The job's gallery page (issue 10, part 2; orchestrator/gallery.py), checked in a real browser:
headless Chromium from Debian's package (`apt-get install -y chromium`) driven by Playwright, the
page opened from file:// as a user would. Guards: every image loads, every text shows as written,
hostile prompts stay text (no dialog, no injected element, one script), the copy block is valid
TOML that makes the same image, missing images say to do / stale / failed and why, the chart
shows peaks against the budget, and the page is written by `orchestrate run` (also after a failed
or interrupted run) and `orchestrate gallery`."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import gallery
from orchestrator.cli import app
from orchestrator.runner import StageFailedError, run_job
from tests.conftest import inprocess_stage, resolved_items, run_inprocess, toml_string, tree_state, write_job

HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPT_BREAK = "</script><script>alert(1)</script>"
ODD = 'a "quoted" & \'odd\' prompt \\ with ünïcode ✓ and {{braces}}'


def find_chromium() -> str:
    """Debian's chromium, or fail (not skip: the browser checks are part of the suite)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        pytest.fail("chromium not found: install Debian's package with `apt-get install -y chromium` (the gallery tests drive it)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright (its own browser download is not used)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (it is in the test extra)", pytrace=False)
    executable = find_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


def open_page(browser, path: Path, dialogs: list):
    """A fresh page at `path` (file://), every dialog recorded and dismissed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page


@pytest.fixture(scope="module")
def made(tiny_model_256, tmp_path_factory):
    """A finished job with hostile and odd prompts, a count of 2, a binned size and a negative
    prompt: (job file, job dir)."""
    folder = tmp_path_factory.mktemp("gallery")
    job_file = write_job(folder, f"""
        [job]
        name = "gallery"
        model = "{tiny_model_256}"
        [defaults]
        num_inference_steps = 2
        width = 64
        height = 64
        use_resolution_binning = false
        [[generation]]
        prompt = {toml_string(HOSTILE)}
        negative_prompt = {toml_string(SCRIPT_BREAK)}
        seed = 11
        count = 2
        [[generation]]
        prompt = {toml_string(ODD)}
        seed = 5
        guidance_scale = 6.5
        width = 200
        height = 120
        use_resolution_binning = true
    """)
    job_dir, _, _ = run_inprocess(job_file, folder / "work")
    return job_file, job_dir


def open_item(page, item_id: str):
    """Click an item's thumbnail (or placeholder) in the grid: its dialog, open."""
    page.locator(f'article[id="item-{item_id}"] button.open').click()
    dialog = page.locator("dialog#detail")
    page.wait_for_function(f"document.getElementById('detail').open && document.getElementById('detail').getAttribute('data-id') === {json.dumps(item_id)}")
    return dialog


def detail_values(dialog) -> dict:
    return dict(zip(dialog.locator("dt").all_inner_texts(), dialog.locator("dd").all_inner_texts()))


def test_the_page_shows_every_image_and_text_and_runs_nothing_from_the_data(browser, made, tmp_path):
    job_file, job_dir = made
    result = CliRunner().invoke(app, ["gallery", str(job_file), "--workdir", str(job_dir.parent)])
    assert result.exit_code == 0, result.output
    page_path = job_dir / "index.html"
    assert f"gallery: {os.path.relpath(page_path)}" in result.stdout
    items = resolved_items(job_dir)
    model = json.loads((job_dir / "job.resolved.json").read_text())["model"]["given"]
    dialogs: list = []
    page = open_page(browser, page_path, dialogs)
    page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)
    assert (tmp_path / "gallery.png").stat().st_size > 0

    # Every item's thumbnail loaded from decode/<item>.thumb.webp, at its size (these are under 256 px).
    page.wait_for_function("Array.from(document.querySelectorAll('img.thumb')).every(e => e.complete)")
    thumbs = page.eval_on_selector_all("article.item img.thumb", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight, e.getAttribute('src').split('?')[0]])")
    assert thumbs == [[True, i["width"], i["height"], f"decode/{i['id']}.thumb.webp"] for i in items], thumbs
    # The hostile texts are text: nothing ran, nothing was injected, the scripts are ours.
    assert dialogs == []
    assert page.locator('img[src="x"]').count() == 0
    sources = page.eval_on_selector_all("script", "els => els.map(e => e.getAttribute('src'))")
    assert [s.split("?")[0] if s else s for s in sources] == ["gallery/items-0000.js", None], sources
    assert page.locator("h2").first.inner_text().startswith(HOSTILE)
    for item in items:
        dialog = open_item(page, item["id"])
        values = detail_values(dialog)
        assert dialog.locator("#detail-title").inner_text() == item["prompt"]
        assert values["prompt"] == item["prompt"]
        assert values["negative prompt"] == (item["negative_prompt"] or "(none)")
        assert values["seed"] == str(item["seed"])
        assert values["steps"] == "2" and values["model"] == model
        assert values["guidance"] == str(item["guidance_scale"])
        assert all(f"{stage} " in values["timings"] and f"{stage} -" not in values["timings"] for stage in ("encode", "denoise", "decode"))
        denoise = json.loads((job_dir / "denoise" / f"{item['id']}.json").read_text())
        binned = denoise["binned_size"]
        if item["use_resolution_binning"]:
            assert values["size"] == f"{item['width']}x{item['height']} requested, {binned['width']}x{binned['height']} binned"
        else:
            assert values["size"] == f"{item['width']}x{item['height']} (no binning)"
        assert values["tiling"] == "untiled"
        # The dialog shows the full image, from its PNG.
        page.wait_for_function("document.querySelector('#detail img.image').complete")
        assert dialog.locator("img.image").evaluate("e => [e.naturalWidth, e.naturalHeight]") == [item["width"], item["height"]]
        dialog.locator("button.close").click()
    # Items of one entry (count = 2) are grouped under their prompt.
    assert page.locator("section.group").count() == 2
    assert page.locator("section.group").first.locator("article.item").count() == 2
    # The header: totals and the chart, one peak bar per stage that ran.
    assert f"{len(items)} images ({len(items)} done)" in page.locator("p.totals").inner_text()
    assert page.locator("svg.chart rect.peak").count() == 3

    # One click copies the item's [[generation]] block, valid TOML with its seed and parameters.
    second = items[1]
    dialog = open_item(page, second["id"])
    dialog.locator("button.copy").click()
    page.wait_for_function("document.getElementById('detail-copy').textContent === 'Copied'")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == dialog.locator("pre").text_content() == gallery.generation_block(second, json.loads((job_dir / "job.resolved.json").read_text()))
    (entry,) = tomllib.loads(copied)["generation"]
    assert entry == {k: second[k] for k in ("prompt", "negative_prompt", "seed", "width", "height", "guidance_scale",
                                            "num_inference_steps", "use_resolution_binning")}

    # Clicking the image in the dialog opens it full size.
    dialog.locator("a.full").click()
    page.wait_for_load_state("load")
    assert page.url == (job_dir / second["image"]).resolve().as_uri()
    assert page.evaluate("document.images[0].naturalWidth") == second["width"]
    assert dialogs == []


def test_a_copied_block_makes_the_same_image(made, tiny_model_256, tmp_path):
    """Guards the copy block: pasted under its job's [job] table it is a job that makes the
    byte-identical PNG (same seed, size, steps, guidance, binning, prompts)."""
    _, job_dir = made
    resolved = json.loads((job_dir / "job.resolved.json").read_text())
    for item in (resolved["items"][1], resolved["items"][2]):  # the count's second seed; the binned one
        block = gallery.generation_block(item, resolved)
        job_file = write_job(tmp_path, f'[job]\nname = "again"\nmodel = "{tiny_model_256}"\ndtype = "float32"\n' + block, name="again.toml")
        again_dir, _, _ = run_inprocess(job_file, tmp_path / "work")
        (again,) = resolved_items(again_dir)
        assert (again_dir / again["image"]).read_bytes() == (job_dir / item["image"]).read_bytes(), item["id"]


def test_missing_images_say_to_do_stale_or_failed_and_why(browser, made, tmp_path):
    """Guards the placeholders, judged as `orchestrate status` judges: a damaged PNG is stale, an
    item whose record is gone is to do, and after a failed run the item the error names failed."""
    _, made_dir = made
    job_dir = tmp_path / "gallery"
    shutil.copytree(made_dir, job_dir)
    job = json.loads((job_dir / "job.resolved.json").read_text())
    items = job["items"]
    (job_dir / items[0]["image"]).write_bytes(b"not a png")
    (job_dir / "denoise" / f"{items[1]['id']}.json").unlink()
    outcome = f"failed: stage denoise failed (exit 3): denoise: out of memory on item {items[1]['id']} (budget 1 GiB); lower --max-vram"
    gallery.write_gallery(job_dir, job, outcome)
    dialogs: list = []
    page = open_page(browser, job_dir / "index.html", dialogs)
    first, second, third = (page.locator(f'article[id="item-{i["id"]}"]') for i in items)
    assert first.locator(".placeholder strong").inner_text().lower() == "stale"
    assert f"decode: {items[0]['id']}.png is corrupt (sha256 mismatch)" in first.locator(".placeholder").inner_text()
    assert second.locator(".placeholder strong").inner_text().lower() == "failed"
    assert "out of memory on item" in second.locator(".placeholder").inner_text()
    page.wait_for_function("document.querySelector('img.thumb').complete")
    assert third.locator("img.thumb").evaluate("e => e.naturalWidth") == items[2]["width"]
    # The state filter shows the failed item alone; its dialog says why, with no image.
    page.select_option("#filter-state", "failed")
    page.wait_for_function("document.querySelectorAll('article.item').length === 1")
    dialog = open_item(page, items[1]["id"])
    assert "out of memory on item" in dialog.locator(".placeholder").inner_text() and dialog.locator("img").count() == 0
    assert "failed: stage denoise failed" in page.locator("p.outcome").inner_text()
    assert "1 done, 1 stale, 1 failed" in page.locator("p.totals").inner_text()

    # Without the failure: the item with no denoise record is simply to do, with the reason.
    gallery.write_gallery(job_dir, job)
    page = open_page(browser, job_dir / "index.html", dialogs)
    second = page.locator(f'article[id="item-{items[1]["id"]}"]')
    assert second.locator(".placeholder strong").inner_text().lower() == "to do"
    assert "denoise: no record" in second.locator(".placeholder").inner_text()
    assert dialogs == []


def test_the_chart_draws_peaks_against_the_budget(browser, made, tmp_path):
    """Guards the header chart: with a budget, a budget line, and a stage over it drawn red."""
    _, made_dir = made
    job_dir = tmp_path / "gallery"
    shutil.copytree(made_dir, job_dir)
    job = json.loads((job_dir / "job.resolved.json").read_text())
    from orchestrator.runner import measured_peak

    peaks = {s: measured_peak(json.loads((job_dir / s / "summary.json").read_text()), "cpu") for s in ("encode", "denoise", "decode")}
    budget = sorted(peaks.values())[1]  # the largest peak is over it, the smallest under it
    gallery.write_gallery(job_dir, dict(job, runtime={"budget_bytes": budget, "device_type": "cpu"}))
    page = open_page(browser, job_dir / "index.html", [])
    assert page.locator("svg.chart line.budget").count() == 1
    fills = page.eval_on_selector_all("svg.chart rect.peak", "els => els.map(e => e.getAttribute('fill'))")
    over = [peaks[s] > budget for s in ("encode", "denoise", "decode")]
    assert fills == ["#d9534f" if o else "#4a90d9" for o in over] and any(over) and not all(over)


def test_run_writes_the_page_also_when_a_stage_fails_or_is_interrupted(tiny_model_256, tmp_path, monkeypatch):
    """Guards the hook in `orchestrate run`: after a stage failure (exit code kept) and after an
    interrupt (exit 130) the page is there and says so; a finished run's page shows every image,
    and a no-op rerun leaves the page untouched."""
    from orchestrator import cli

    job_file = write_job(tmp_path, f"""
        [job]
        name = "hook"
        model = "{tiny_model_256}"
        [[generation]]
        prompt = "a red apple"
        seed = 1
        num_inference_steps = 2
        width = 64
        height = 64
        use_resolution_binning = false
    """)
    job_dir = tmp_path / "work" / "hook"
    args = ["run", str(job_file), "--workdir", str(tmp_path / "work"), "--device", "cpu"]

    def failing(stage, job_dir_, force, echo, units=None):
        if stage == "denoise":
            raise StageFailedError("stage denoise failed (exit 3): denoise: out of memory on item 0000-a-red-apple", 3)
        return inprocess_stage(stage, job_dir_, force, echo, units)

    monkeypatch.setattr(cli, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=failing))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3 and "out of memory" in result.stderr, result.output
    html = (job_dir / "index.html").read_text()
    assert "last run <bdi>failed: stage denoise failed" in html and '"state":"failed"' in (job_dir / "gallery" / "items-0000.js").read_text()

    def interrupted(stage, job_dir_, force, echo, units=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=interrupted))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "last run <bdi>interrupted" in (job_dir / "index.html").read_text()

    monkeypatch.setattr(cli, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=inprocess_stage))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "gallery: " in result.stdout, result.output
    html, data = (job_dir / "index.html").read_text(), (job_dir / "gallery" / "items-0000.js").read_text()
    assert 'class="outcome"' not in html and '"state":"done"' in data and '"image":"decode/0000-a-red-apple.png?v=' in data
    assert '"thumb":"decode/0000-a-red-apple.thumb.webp?v=' in data
    before = tree_state(job_dir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "nothing to do" in result.stdout
    after = tree_state(job_dir)
    assert {k: v for k, v in after.items() if k.startswith(("index.html", "gallery/"))} == \
        {k: v for k, v in before.items() if k.startswith(("index.html", "gallery/"))}


def test_gallery_of_a_job_never_run_is_one_line(tiny_model_256, tmp_path):
    job_file = write_job(tmp_path, f'[job]\nmodel = "{tiny_model_256}"\n[[generation]]\nprompt = "x"\n')
    result = CliRunner().invoke(app, ["gallery", str(job_file), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "has no job.resolved.json" in line and f"orchestrate run {job_file}" in line, line
    assert not (tmp_path / "work").exists()


def test_the_readme_test_command_installs_chromium_before_the_suite():
    """Guards the README's test command (which .ci/run runs as written): the browser the gallery
    tests need is installed, when missing, before pytest starts."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    install = "command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)"
    assert install in command and command.index(install) < command.index("pytest")


def test_without_chromium_the_browser_tests_fail_saying_how_to_install_it(monkeypatch):
    """Guards the fixture: no chromium is a failure (a skipped browser check would hide a broken
    page), one line naming the package to install."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(pytest.fail.Exception) as failure:
        find_chromium()
    (line,) = str(failure.value).splitlines()
    assert "chromium not found" in line and "apt-get install -y chromium" in line
