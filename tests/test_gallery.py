"""The job's gallery page (issue 10, part 2; orchestrator/views/gallery.py), checked in a real browser:
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

from orchestrator.views import gallery
from orchestrator.cli import app
from orchestrator.executors.runner import StageFailedError, run_job
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
    page.wait_for_function(f"() => document.getElementById('detail').open && document.getElementById('detail').getAttribute('data-id') === {json.dumps(item_id)}")
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
    page.wait_for_function("() => Array.from(document.querySelectorAll('img.thumb')).every(e => e.complete)")
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
        page.wait_for_function("() => document.querySelector('#detail img.image').complete")
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
    page.wait_for_function("() => document.getElementById('detail-copy').textContent === 'Copied'")
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
    page.wait_for_function("() => document.querySelector('img.thumb').complete")
    assert third.locator("img.thumb").evaluate("e => e.naturalWidth") == items[2]["width"]
    # The state filter shows the failed item alone; its dialog says why, with no image.
    page.select_option("#filter-state", "failed")
    page.wait_for_function("() => document.querySelectorAll('article.item').length === 1")
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
    from orchestrator.executors.runner import measured_peak

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
    from orchestrator.executors import session

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

    monkeypatch.setattr(session, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=failing))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3 and "out of memory" in result.stderr, result.output
    html = (job_dir / "index.html").read_text()
    assert "last run <bdi>failed: stage denoise failed" in html and '"state":"failed"' in (job_dir / "gallery" / "items-0000.js").read_text()

    def interrupted(stage, job_dir_, force, echo, units=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=interrupted))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "last run <bdi>interrupted" in (job_dir / "index.html").read_text()

    monkeypatch.setattr(session, "run_job", lambda d, r, echo, force, **kw: run_job(d, r, echo, force, **kw, launch=inprocess_stage))
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


# ---------------------------------------------------------------------------------------------
# At scale (issue 21, point 3): a job folder of 10,000 items built without running a model.

COLOURS = ("red", "green", "blue", "amber", "violet", "black", "white", "golden", "silver", "pink")
THINGS = ("apple", "owl", "boat", "castle", "forest", "robot", "teapot", "bridge", "lantern", "whale")


def synthetic_job(folder: Path, model: Path, entries: list[tuple[str, int]], todo=frozenset(), on_disk=None):
    """A job folder whose items are done as the stages would leave them, except the items in
    `todo` (indices into the job's items: no decode record): records with the units' params and input hashes, artifacts with the
    recorded hashes (one 64x64 image and its thumbnail for all). Records are written for the items
    in `on_disk` (all when None); every record is also returned in the states plan_job would give,
    each carrying its record, as a plan that kept them does. (job_dir, resolved job, states)."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from orchestrator.jobfile import job as jobfile
    from stages import decode, files
    from stages.units import plan_units, thumbnail_name

    body = '[job]\nname = "scale"\nmodel = "%s"\n[defaults]\nwidth = 64\nheight = 64\nnum_inference_steps = 1\nuse_resolution_binning = false\n' % model
    body += "".join(f"[[generation]]\nprompt = {toml_string(prompt)}\ncount = {count}\nseed = {n}\n" for n, (prompt, count) in enumerate(entries))
    job = jobfile.load_job(write_job(folder, body))
    job_dir = jobfile.job_dir_for(job, folder / "work")
    resolved = jobfile.resolve_job(job, job_dir, "cpu")
    for stage in ("encode", "denoise", "decode"):
        (job_dir / stage).mkdir(parents=True)
    (job_dir / "job.resolved.json").write_text(json.dumps(resolved))
    image, buffer = Image.new("RGB", (64, 64), (200, 80, 40)), io.BytesIO()
    image.save(buffer, format="PNG")
    png, thumb = buffer.getvalue(), decode.thumbnail_bytes(image)
    units = plan_units(resolved)
    todo = {resolved["items"][n]["id"] for n in todo}
    common = {"seconds": 0.01, "peak": {}, "device": "cpu", "dtype": "float32"}
    hashes, states = {}, {stage: [] for stage in units}

    def made(unit, record, artifacts):
        for name, data in artifacts.items():
            (job_dir / unit.stage / name).write_bytes(data)
        outputs = {name: {"sha256": files.sha256_bytes(data), "bytes": len(data)} for name, data in artifacts.items()}
        if unit.stage == "decode":
            for meta in outputs.values():
                meta.update(shape=[64, 64, 3], dtype="uint8")
        hashes[unit.stage, unit.key] = outputs[unit.outputs[0]]["sha256"]
        record = _record(dict(record, stage=unit.stage, key=unit.key, items=list(unit.items), params=unit.params, outputs=outputs, **common))
        if on_disk is None or not on_disk.isdisjoint(unit.items):
            unit.record_path(job_dir).write_text(json.dumps(record, sort_keys=True))
        states[unit.stage].append(SimpleNamespace(unit=unit, state="done", reason="up to date", record=record))

    for unit in units["encode"]:
        made(unit, {"inputs": {}, "from_store": False}, {unit.outputs[0]: unit.key.encode()})
    for unit in units["denoise"]:
        (_, key), = unit.inputs
        made(unit, {"inputs": {f"encode/{key}.safetensors": hashes["encode", key]}, "binned_size": {"height": 64, "width": 64}},
             {unit.outputs[0]: unit.key.encode()})
    for unit in units["decode"]:
        if unit.key in todo:
            states["decode"].append(SimpleNamespace(unit=unit, state="to do", reason="no record"))
            continue
        made(unit, {"inputs": {f"denoise/{unit.key}.safetensors": hashes["denoise", unit.key]}, "tiled": False,
                    "strategy": {"strategy": "full", "tile_size": None}, "vae_upcast": False},
             {unit.outputs[0]: png, thumbnail_name(unit.key): thumb})
    return job_dir, resolved, states


def _record(record: dict) -> dict:
    """A record as stages/records.write_record writes it: format and self-checksum."""
    from stages.contract import FORMAT_VERSION
    from stages.records import record_checksum

    record = dict(record, format=FORMAT_VERSION)
    return dict(record, checksum=record_checksum(record))


def test_ten_thousand_items_page_is_small_refreshes_by_chunk_scrolls_filters_and_opens(browser, tiny_model_256, tmp_path, monkeypatch):
    """Guards the gallery at 10,000 items: index.html under 1 MB, first paint under 1 s, a refresh
    after a 50-item chunk reads that chunk's records (not the job's) and gives the same files as a
    full render; the grid draws more cards as it scrolls, filters by prompt and by state, and opens
    an item with its full image. The first page is rendered from the caller's plan (states with
    their records), as `orchestrate run` hands it over; planning 10,000 items is bench/scale.py's."""
    import time

    from stages import records, units

    entries = [(f"a {colour} {thing}", 100) for colour in COLOURS for thing in THINGS]  # 100 prompts x 100 seeds
    chunk = range(5000, 5050)
    todo_range = range(7700, 7800)  # one prompt's items, not decoded yet
    job_dir, job, states = synthetic_job(tmp_path, tiny_model_256, entries, todo=set(todo_range), on_disk=set())
    chunk_ids = [item["id"] for item in job["items"][chunk.start:chunk.stop]]
    # The first page: the chunk not decoded yet.
    before = {stage: [s if stage != "decode" or s.unit.key not in chunk_ids else type(s)(unit=s.unit, state="to do", reason="no record")
                      for s in states[stage]] for stage in states}
    clock = time.perf_counter()
    gallery.write_gallery(job_dir, job, states=before)
    rendered = time.perf_counter() - clock
    assert (job_dir / "index.html").stat().st_size < 1_000_000
    assert '"state":"to do"' in (job_dir / "gallery" / "items-0010.js").read_text()

    # The chunk is made: its records appear; the refresh reads only the chunk's records.
    for stage in states:
        for s in states[stage]:
            if set(s.unit.items) & set(chunk_ids) and s.state == "done":
                s.unit.record_path(job_dir).write_text(json.dumps(s.record, sort_keys=True))
    reads = []
    counted = lambda path: (reads.append(path), records.read_record(path))[1]  # noqa: E731
    monkeypatch.setattr(units, "read_record", counted)
    monkeypatch.setattr(gallery, "read_record", counted)
    clock = time.perf_counter()
    gallery.write_gallery(job_dir, job, items=chunk_ids)
    refreshed = time.perf_counter() - clock
    monkeypatch.undo()
    encode_keys = {s.unit.key for s in states["encode"] if set(s.unit.items) & set(chunk_ids)}
    stems = {Path(path).stem for path in reads}  # the reader takes str or Path
    assert reads and stems <= set(chunk_ids) | encode_keys, sorted(stems)[:5]
    full = gallery.render_gallery(job_dir, job, states=states)
    assert all(data == (job_dir / name).read_bytes() for name, data in full.items()), "a refresh differs from a full render"
    print(f"\n10,000 items: render+write from the caller's plan {rendered:.2f} s, refresh after a 50-item chunk {refreshed:.3f} s; "
          f"index.html {(job_dir / 'index.html').stat().st_size} B, data {sum(p.stat().st_size for p in (job_dir / 'gallery').iterdir())} B")
    check_large_page(browser, job_dir, job)


def check_large_page(browser, job_dir: Path, job: dict) -> None:
    """The 10,000-item page in Chromium: first paint, scroll, filter by prompt and by state, open one."""
    from playwright.sync_api import expect

    dialogs: list = []
    page = open_page(browser, job_dir / "index.html", dialogs)
    page.wait_for_selector("article.item")
    paint = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime")
    drawn = page.evaluate("performance.now()")
    print(f"first contentful paint {paint:.0f} ms, grid drawn by {drawn:.0f} ms")
    assert paint < 1000, paint
    expect(page.locator("#shown")).to_have_text("all 10000 images")
    first = page.locator("article.item").count()
    assert 0 < first <= 3 * gallery.BATCH  # drawn a batch at a time, not all 10,000
    # Scrolling draws more cards, and their thumbnails load.
    # Wheel until the grid has grown past three batches (each wheel reaches the bottom the last
    # batch made; a loaded machine may need more than a few before the observer fires).
    for _ in range(100):
        page.mouse.wheel(0, 20000)
        page.wait_for_timeout(150)
        if page.locator("article.item").count() > 3 * first:
            break
    assert page.locator("article.item").count() > 3 * first, "scrolling drew no more cards"
    page.wait_for_function("() => Array.from(document.querySelectorAll('img.thumb')).slice(0, 50).every(e => e.complete && e.naturalWidth === 64)",
                           timeout=60_000)
    # Filter by prompt text: one prompt's 100 items, in one group.
    page.fill("#filter-text", "violet owl")
    expect(page.locator("#shown")).to_have_text("100 of 10000 images")
    assert page.locator("section.group").count() == 1
    assert set(page.locator("article.item .prompt").all_inner_texts()) == {"a violet owl"}
    # Filter by state: the items not decoded yet, with why.
    page.fill("#filter-text", "")
    page.select_option("#filter-state", "to do")
    expect(page.locator("#shown")).to_have_text("100 of 10000 images")
    assert "decode: no record" in page.locator("article.item .placeholder").first.inner_text()
    # Open one image of the chunk the refresh added.
    item = job["items"][5020]
    page.select_option("#filter-state", "done")
    page.fill("#filter-text", item["prompt"])
    expect(page.locator("#shown")).to_have_text("100 of 10000 images")
    dialog = open_item(page, item["id"])
    page.wait_for_function("() => document.querySelector('#detail img.image').complete")
    assert dialog.locator("img.image").evaluate("e => e.naturalWidth") == 64
    assert detail_values(dialog)["seed"] == str(item["seed"])
    assert dialogs == []


@pytest.mark.stress
def test_ten_thousand_items_planned_from_disk(browser, tiny_model_256, tmp_path):
    """The same page with every record on disk and the job planned by plan_job (the gallery's own
    path when no plan is handed over): the same files as from the caller's plan."""
    import time

    entries = [(f"a {colour} {thing}", 100) for colour in COLOURS for thing in THINGS]
    job_dir, job, states = synthetic_job(tmp_path, tiny_model_256, entries, todo=set(range(7700, 7800)))
    clock = time.perf_counter()
    gallery.write_gallery(job_dir, job)
    print(f"\n10,000 items planned and rendered in {time.perf_counter() - clock:.2f} s")
    # The page and its data files are the same bytes. gallery/fingerprints.json differs by design: a
    # render from records read off disk fingerprints every data file (so the next no-op keeps them),
    # one from handed-over records cannot (None: remade next time).
    prints = f"{gallery.DATA_DIR}/{gallery.FINGERPRINTS}"
    full = gallery.render_gallery(job_dir, job, states=states)
    assert all(data == (job_dir / name).read_bytes() for name, data in full.items() if name != prints)
    on_disk = json.loads((job_dir / prints).read_text())["parts"]
    assert len(on_disk) == len(json.loads(full[prints])["parts"]) and all(fingerprint for fingerprint, _ in on_disk)
    check_large_page(browser, job_dir, job)


def test_a_right_to_left_override_in_a_prompt_moves_no_other_text(browser, tiny_model_256, tmp_path):
    """Guards issue 17.11: a prompt ending in U+202E reversed the page's own text after it
    ("(egami 1)"). The text after it reads left to right, the override shows as `\\u202e`, and the
    copy block still reads back as the exact prompt."""
    evil = "an evil prompt \u202e"
    job_dir, job, _ = synthetic_job(tmp_path, tiny_model_256, [(evil, 1), ("a plain prompt", 1)])
    gallery.write_gallery(job_dir, job)
    page = open_page(browser, job_dir / "index.html", [])
    heading = page.locator("section.group h2").first
    assert heading.inner_text() == "an evil prompt \\u202e (1 image)"
    # The characters of "(1 image)" are laid out left to right.
    lefts = heading.locator(".count").evaluate("""e => { const t = e.firstChild, out = [];
        for (let i = 0; i < t.length; i++) { const r = document.createRange(); r.setStart(t, i); r.setEnd(t, i + 1);
          const b = r.getBoundingClientRect(); if (b.width > 0) out.push(b.left); }
        return out; }""")
    assert len(lefts) >= 8 and lefts == sorted(lefts), lefts
    dialog = open_item(page, job["items"][0]["id"])
    assert detail_values(dialog)["prompt"] == "an evil prompt \\u202e"
    assert tomllib.loads(dialog.locator("pre").text_content())["generation"][0]["prompt"] == evil
