"""The job's gallery: `<job_dir>/index.html`, an offline page, and its data in `<job_dir>/gallery/`.

A grid of thumbnails (decode/<item>.thumb.webp, made by the decode stage), items of one generation
entry (`count`) grouped under their prompt, filtered by prompt text and by state (done, to do,
stale, failed); a click opens the item: the full image, its parameters, its stage timings and its
`[[generation]]` block to copy. An item without an image shows to do / stale / failed and why. A
header gives the job's totals and each stage's measured peak memory against the budget and its
seconds, as an inline SVG chart.

Sizes: index.html holds the header and the script, never the items, so it stays small (about 30 KB)
at any job size; the items are in gallery/items-NNNN.js, PART_SIZE per file, which the page loads
with <script src> (Chromium refuses fetch() on file://). A refresh after a chunk remakes only the
files that hold the chunk's items (gallery/manifest.json says what the others count).

The page shows the job as last run: the items of `job.resolved.json`, judged by the same test as
`orchestrate status` (orchestrator/planning/plan.py, stages/units.py unit_status). It is data, not code:
the data files are JSON (ASCII) handed to the one script, which puts every text in with
textContent; user texts are isolated (bidi) and show control and bidi characters as `\\u202e`;
a Content-Security-Policy allows the inline script by its hash and the data files of the page's
folder, nothing from the network. Written by `orchestrate run` after the stages (also after a
failed or interrupted run, and after each chunk) and by `orchestrate gallery JOB.toml`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import marshal
import os
import re
from pathlib import Path
from urllib.parse import quote

from orchestrator.planning.plan import UnitState, plan_job
from orchestrator.executors.runner import measured_peak
from stages.artifacts import read_json
from stages.contract import RESOLVED_JOB, STAGES, JobFileError, ResourceError
from stages.files import canonical_json, publish_bytes, read_bytes_limited, sha256_bytes, shown_path
from stages.measure import format_bytes
from stages.records import RecordReader, read_record, stat_key
from stages.resolved import read_job
from stages.units import plan_units, thumbnail_name, unit_status

PAGE = "index.html"
DATA_DIR = "gallery"  # beside index.html: the items' data, PART_SIZE items per file, and manifest.json
MANIFEST = "manifest.json"
FINGERPRINTS = "fingerprints.json"  # per data file: what it shows, so a render keeps what did not change
# Items per data file. A refresh after a chunk rewrites only the files holding the chunk's items, so
# it costs about max(chunk, PART_SIZE) items, not the job; 500 items are about 0.5 MB of data.
PART_SIZE = 500
# Each data file has a fingerprint in gallery/fingerprints.json of what it shows (_part_fingerprint): a render
# keeps a file whose fingerprint is unchanged without reading its items' records, so a no-op rerun
# reads no record for the page either. Bump when _item_data's output changes.
PART_VERSION = 1
# Cards added to the grid at a time, as the user scrolls (10,000 cards at once would take seconds).
BATCH = 120

# The page's only inline script. It reads the items from the data files (`gallery/items-*.js`,
# loaded by <script src> before it: Chromium blocks fetch() of a file:// URL, but allows a script
# of the same folder under `script-src 'self'`), draws the grid a batch at a time as the user
# scrolls, filters it, opens one item in a dialog and copies a <pre> to the clipboard. Every text
# goes in with textContent, never as HTML.
_SCRIPT = """
(function () {
  "use strict";
  var parts = (window.galleryParts || []).slice().sort(function (a, b) { return a.part - b.part; });
  var items = [], byId = {};
  parts.forEach(function (p) { p.items.forEach(function (item) { items.push(item); byId[item.id] = item; }); });
  var grid = document.getElementById("grid"), more = document.getElementById("more");
  var textBox = document.getElementById("filter-text"), stateBox = document.getElementById("filter-state");
  var shown = document.getElementById("shown"), dialog = document.getElementById("detail");
  var runs = [], run = 0, at = 0, box = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function user(tag, cls, text) { var e = el(tag, cls + " user", text); e.dir = "auto"; return e; }
  function picture(item, full) {
    if (item.state !== "done") {
      var box = el("div", "placeholder " + item.state.replace(" ", "-"));
      box.appendChild(el("strong", "", item.state));
      box.appendChild(user("span", "why", item.why));
      return box;
    }
    var img = el("img", full ? "image" : "thumb");
    img.src = full ? item.image : item.thumb;
    var size = full ? item.size : item.thumb_size;
    img.width = size[0]; img.height = size[1];
    img.alt = item.title;
    if (!full) { img.loading = "lazy"; return img; }
    var link = el("a", "full");
    link.href = item.href; link.title = "open full size";
    link.appendChild(img);
    return link;
  }
  function card(item) {
    var art = el("article", "item " + item.state.replace(" ", "-"));
    art.id = "item-" + item.id;
    var open = el("button", "open");
    open.type = "button";
    open.setAttribute("data-id", item.id);
    open.appendChild(picture(item, false));
    art.appendChild(open);
    art.appendChild(user("div", "prompt", item.title));
    art.appendChild(el("div", "id", item.id));
    return art;
  }
  function select() {
    var text = textBox.value.toLowerCase(), state = stateBox.value, count = 0;
    runs = []; run = 0; at = 0; box = null;
    items.forEach(function (item) {
      if ((state !== "all" && item.state !== state) || (text && item.search.indexOf(text) < 0)) { return; }
      var last = runs[runs.length - 1];
      if (last && last.group === item.group) { last.items.push(item); } else { runs.push({group: item.group, items: [item]}); }
      count += 1;
    });
    grid.replaceChildren();
    shown.textContent = count === items.length ? "all " + count + " images" : count + " of " + items.length + " images";
    draw();
  }
  function draw() {
    var left = BATCH_SIZE;
    while (left > 0 && run < runs.length) {
      var r = runs[run];
      if (at === 0) {
        var section = el("section", "group"), heading = el("h2");
        heading.appendChild(user("bdi", "title", r.items[0].title || "(empty prompt)"));
        heading.appendChild(el("span", "count", " (" + r.items.length + " image" + (r.items.length > 1 ? "s" : "") + ")"));
        section.appendChild(heading);
        box = el("div", "items");
        section.appendChild(box);
        grid.appendChild(section);
      }
      while (left > 0 && at < r.items.length) { box.appendChild(card(r.items[at])); at += 1; left -= 1; }
      if (at === r.items.length) { run += 1; at = 0; }
    }
    more.hidden = run >= runs.length;
    watcher.unobserve(more);
    if (!more.hidden) { watcher.observe(more); }  // observing again reports at once if it is still in view
  }
  var watcher = new IntersectionObserver(function (entries) {
    if (entries.some(function (e) { return e.isIntersecting; })) { draw(); }
  }, {rootMargin: "1200px 0px"});
  function open(item) {
    var pic = document.getElementById("detail-picture");
    pic.replaceChildren(picture(item, true));
    pic.className = item.sources ? "with-sources" : "";
    (item.sources || []).forEach(function (s) {  // img2img: the start picture and mask, beside the result
      var fig = el("figure", "source"), img = el("img", "source");
      img.src = s[1]; img.alt = s[0];
      fig.appendChild(img); fig.appendChild(user("figcaption", "", s[0]));
      pic.appendChild(fig);
    });
    document.getElementById("detail-title").textContent = item.title || "(empty prompt)";
    document.getElementById("detail-id").textContent = item.id;
    var list = document.getElementById("detail-fields");
    list.replaceChildren();
    item.fields.forEach(function (f) { list.appendChild(el("dt", "", f[0])); list.appendChild(user("dd", "", f[1])); });
    document.getElementById("detail-toml").textContent = item.toml;
    document.getElementById("detail-copy").textContent = "Copy as [[generation]]";
    dialog.setAttribute("data-id", item.id);
    if (!dialog.open) { dialog.showModal(); }
  }
  function selectText(pre) {
    var range = document.createRange();
    range.selectNodeContents(pre);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try { return document.execCommand("copy"); } catch (error) { return false; }
  }
  document.addEventListener("click", function (event) {
    var opener = event.target.closest("button.open");
    if (opener) { open(byId[opener.getAttribute("data-id")]); return; }
    if (event.target.closest("button.close")) { dialog.close(); return; }
    var button = event.target.closest("button.copy");
    if (!button) { return; }
    var pre = document.getElementById(button.getAttribute("data-for"));
    var done = function (ok) { button.textContent = ok ? "Copied" : "Selected: press Ctrl+C"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(pre.textContent).then(function () { done(true); }, function () { done(selectText(pre)); });
    } else {
      done(selectText(pre));
    }
  });
  var timer = null;
  textBox.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(select, 150); });
  stateBox.addEventListener("change", select);
  select();
})();
""".replace("BATCH_SIZE", str(BATCH))

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1em 2em; color: #1d1d1f; background: #fafafa; }
h1 { margin: 0.2em 0; } h2 { font-size: 1.05em; margin: 1.4em 0 0.4em; overflow-wrap: anywhere; }
h2 .count { color: #666; font-weight: normal; }
.user { unicode-bidi: isolate; }
.totals { margin: 0.3em 0; } .outcome { padding: 0.4em 0.8em; border-radius: 4px; background: #fde2e1; overflow-wrap: anywhere; }
table.stages { border-collapse: collapse; margin: 0.6em 0; } table.stages th, table.stages td { padding: 0.15em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
.filters { position: sticky; top: 0; z-index: 1; display: flex; gap: 0.8em; align-items: center; padding: 0.5em 0; background: #fafafa; border-bottom: 1px solid #ddd; }
.filters input { flex: 0 1 24em; padding: 0.3em; } #shown { color: #666; }
.items { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 0.8em; }
.item { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; min-width: 0; }
button.open { display: block; width: 100%; padding: 0; border: 0; background: none; cursor: zoom-in; }
img.thumb { display: block; width: 100%; height: auto; aspect-ratio: auto; background: #eee; }
.item .prompt { margin-top: 0.3em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.placeholder { display: flex; flex-direction: column; justify-content: center; min-height: 140px; padding: 0.8em; border-radius: 4px; background: #eee; overflow-wrap: anywhere; text-align: left; font: inherit; }
.placeholder.failed { background: #fde2e1; } .placeholder.stale { background: #fff3cd; }
.placeholder strong { font-size: 1.1em; text-transform: uppercase; }
.id { font-family: ui-monospace, monospace; font-size: 0.8em; color: #666; overflow-wrap: anywhere; }
#more { padding: 2em; text-align: center; color: #666; }
dialog { max-width: min(1100px, 94vw); max-height: 94vh; border: 1px solid #999; border-radius: 8px; padding: 1em 1.2em; }
dialog h3 { margin: 0 2em 0.3em 0; overflow-wrap: anywhere; }
dialog img.image { display: block; max-width: 100%; max-height: 60vh; width: auto; height: auto; margin: 0.5em auto; }
button.close { position: absolute; top: 0.6em; right: 0.8em; cursor: pointer; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.1em 0.8em; margin: 0.6em 0; }
dt { color: #666; } dd { margin: 0; overflow-wrap: anywhere; white-space: pre-wrap; }
pre { background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; margin: 0.4em 0; unicode-bidi: isolate; }
button.copy { cursor: pointer; }
#detail-picture.with-sources { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: flex-start; }
figure.source { margin: 0.5em 0; } img.source { display: block; max-width: 30vw; max-height: 40vh; }
svg text { font: 12px system-ui, sans-serif; }
"""


def _csp_hash(text: str) -> str:
    """The Content-Security-Policy source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# 'self' lets in the data files beside the page (on file://, Chromium counts the page's own folder
# tree as 'self'); the inline script only by its hash. Subresource-integrity hashes on the data
# files would be tighter, but Chromium refuses them on file:// (they need a CORS request).
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_STYLE)}; "
        f"script-src {_csp_hash(_SCRIPT)} 'self'; base-uri 'none'; form-action 'none'")


def _e(value) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


# Characters that are invisible or move other text when shown: C0 and C1 controls, the bidi marks,
# embeddings, overrides and isolates (U+202E reverses everything after it), line and paragraph
# separators. The page shows each as a visible `\u202e`; the copy block escapes them the same way,
# which TOML reads back as the exact character.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def display_text(value) -> str:
    """`value` as shown on the page: every hidden or text-moving character as a visible `\\uXXXX`."""
    return _HIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))


def _u(value) -> str:
    """User text (a prompt, a name, a path) for HTML: hidden characters shown, then escaped."""
    return _e(display_text(value))


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and hidden characters (_HIDDEN) escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif _HIDDEN.fullmatch(char):
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def generation_block(item: dict, job: dict) -> str:
    """The item as a job-file `[[generation]]` entry (count 1, its own seed) that makes the same
    image in a job with the same [job] table, which the comment line names."""
    from stages import family

    settings = [f"model = {toml_string(job['model']['given'])}", f"dtype = {toml_string(job['dtype'])}"]
    if job.get("scheduler"):
        settings.append(f"scheduler = {toml_string(job['scheduler'])}")
    if not job.get("clean_caption", True):
        settings.append("clean_caption = false")
    if job.get("max_sequence_length") not in (None, family.of(job.get("pipeline")).max_sequence_length):
        settings.append(f"max_sequence_length = {int(job['max_sequence_length'])}")
    if job["model"].get("components"):
        settings.append(f"and the [job.components] of job {job['name']}")
    lines = [
        f"# item {item['id']} of job {job['name']}",
        f"# same image in a job whose [job] has {', '.join(settings)}",
        "[[generation]]",
        f"prompt = {toml_string(item['prompt'])}",
        f"negative_prompt = {toml_string(item['negative_prompt'])}",
        f"seed = {int(item['seed'])}",
        f"width = {int(item['width'])}",
        f"height = {int(item['height'])}",
        f"guidance_scale = {float(item['guidance_scale'])!r}",
        f"num_inference_steps = {int(item['num_inference_steps'])}",
        f"use_resolution_binning = {'true' if item['use_resolution_binning'] else 'false'}",
    ]
    if item.get("timesteps"):
        lines.append(f"timesteps = [{', '.join(str(int(t)) for t in item['timesteps'])}]")
    if item.get("init_image"):
        lines += [f"image = {toml_string(item['init_image'])}", f"strength = {float(item['strength'])!r}"]
        if item.get("mask_image"):
            lines.append(f"mask = {toml_string(item['mask_image'])}")
    if item.get("loras"):  # local ones by absolute path, so the block works from any job file
        lines.append("loras = [" + ", ".join(f"{{ path = {toml_string(lora['given'] if lora.get('hub') else lora['path'])}, "
                                              f"scale = {float(lora['scale'])!r} }}" for lora in item["loras"]) + "]")
    return "\n".join(lines) + "\n"


def _subset_states(job_dir: Path, job: dict, only: set[str]) -> dict[str, list[UnitState]]:
    """The states plan_job gives, for the units of the items in `only` alone (a refresh after a
    chunk reads those items' records, not the job's)."""
    # Only these items' units: planning all 10,000 would cost more than the rest of a refresh. An
    # encode unit then lists only the items of `only` that share it; _item_states counts its record's.
    units = plan_units(dict(job, items=[item for item in job["items"] if item["id"] in only]))
    pending: set[tuple[str, str]] = set()
    states: dict[str, list[UnitState]] = {}
    for stage in STAGES:
        states[stage] = []
        for unit in units[stage]:
            waiting = [f"{up} reruns" for up, key in unit.inputs if (up, key) in pending]
            ok, why = (False, ", ".join(waiting)) if waiting else unit_status(job_dir, unit)
            has_record = ok or read_record(unit.record_path(job_dir))[0] is not None
            if not ok:
                pending.add((stage, unit.key))
            states[stage].append(UnitState(unit, "done" if ok else ("stale" if has_record else "to do"), why))
    return states


def _item_states(job_dir: Path, job: dict, outcome: str | None, states: dict | None = None,
                 only: set[str] | None = None) -> dict[str, dict]:
    """Per item id (all, or those in `only`): state (done, to do, stale, failed), why, and where
    its done units' records are ("sources"; _read_records reads them). `states`: plan_job's result
    (render_gallery's), or None with `only` (the units of those items are judged here)."""
    if only is not None:
        states = _subset_states(job_dir, job, only)
    root = str(job_dir)  # the paths as plan_job's unit_status makes them (its stats are keyed by them)
    wanted = [item["id"] for item in job["items"] if only is None or item["id"] in only]
    by_item: dict[str, dict] = {item_id: {"records": {}, "sources": {}, "pending": None} for item_id in wanted}
    first_pending = None
    for stage in STAGES:
        for s in states[stage]:
            for item_id in s.unit.items:
                entry = by_item.get(item_id)
                if entry is None:
                    continue
                if s.state == "done":  # its record is read by _read_records, only for the data files remade
                    # A plan that kept the records it read (a UnitState with a `record`) hands them over.
                    entry["sources"][stage] = (f"{root}{os.sep}{stage}{os.sep}{s.unit.key}.json", len(s.unit.items),
                                               getattr(s, "record", None))
                elif entry["pending"] is None:
                    entry["pending"] = (stage, s.unit.key, s.state, s.reason)
                    first_pending = first_pending or stage
    job_ids = set(by_item) | {s.unit.key for s in states["encode"]}
    named = {key for key in job_ids if outcome and key in outcome}
    for item_id, entry in by_item.items():
        if entry["pending"] is None:
            entry.update(state="done", why="")
            continue
        stage, key, state, reason = entry["pending"]
        # The stage a failed run stopped in is the first with work left; its items named by the
        # error (or all of them, when it names none) failed, the rest were not reached.
        if outcome and outcome.startswith("failed") and stage == first_pending and (item_id in named or key in named or not named):
            entry.update(state="failed", why=outcome.removeprefix("failed: "))
        else:
            entry.update(state=state, why=f"{stage}: {reason}")
    return by_item


def _read_records(entries: list[dict]) -> None:
    """Fill each entry's "records" (stage -> record) from its "sources"; a shared encode record is
    read once."""
    read: dict[str, dict] = {}
    for entry in entries:
        for stage, (path, users, given) in entry["sources"].items():
            if path not in read:
                read[path] = given or read_record(Path(path))[0] or {}
            record = read[path]
            # encode: the items it was made for
            entry["records"][stage] = dict(record, shared_by=len(record.get("items") or ()) or users) if stage == "encode" else record


def _part_fingerprint(job_key: str, items: list[dict], entries: dict, stats: dict) -> str:
    """What a data file's bytes depend on: the job, and per item its state, why, and the stat of
    each record it shows (as stages/records.py's state cache keys them; `stats`: those the plan
    just took, by path). Equal: the file is kept. None (never kept) when a record was handed over
    by the caller rather than read from its file."""
    missing = stats  # a sentinel no stat equals
    rows = []
    for item in items:
        entry = entries[item["id"]]
        stamps = []
        for stage, (path, _, given) in sorted(entry["sources"].items()):
            if given is not None:
                return None
            taken = stats.get(path, missing)
            stamps.append((stage, stat_key(path) if taken is missing else taken))
        rows.append((item["id"], entry["state"], entry["why"], stamps))
    # marshal's version 0, by value, as units.unit_fingerprint: 3x cheaper than repr; only hashed.
    return sha256_bytes(marshal.dumps((PART_VERSION, job_key, rows), 0))[:24]


def _stage_rows(job_dir: Path, job: dict) -> list[dict]:
    """Each stage's last-run numbers from its summary.json, with the peak the budget limits."""
    runtime = job.get("runtime") or {}
    device_type = runtime.get("device_type") or ("cuda" if str(job.get("device", "")).startswith("cuda") else "cpu")
    rows = []
    for stage in STAGES:
        try:
            summary = read_json(job_dir / stage / "summary.json")  # as the runner reads it: a regular file only
        except (OSError, ValueError):
            summary = None
        planned = (runtime.get("stages") or {}).get(stage, {})
        rows.append({
            "stage": stage,
            "summary": summary,
            "peak": measured_peak(summary, device_type) if summary else None,
            "strategy": (summary or {}).get("strategy") or planned.get("strategy"),
        })
    return rows


def _chart(rows: list[dict], budget: int | None) -> str:
    """Inline SVG: per stage, a bar of its measured peak against the budget line, and its seconds."""
    peaks = [row["peak"] for row in rows if row["peak"] is not None]
    scale = max(peaks + ([budget] if budget else []) + [1])
    left, width, bar_h, gap = 70, 420, 18, 10
    height = len(rows) * (bar_h + gap) + 30
    parts = [f'<svg class="chart" role="img" width="{left + width + 260}" height="{height}" '
             f'viewBox="0 0 {left + width + 260} {height}" xmlns="http://www.w3.org/2000/svg">',
             "<title>measured peak memory per stage against the budget, and seconds</title>"]
    for n, row in enumerate(rows):
        y = 10 + n * (bar_h + gap)
        summary = row["summary"]
        parts.append(f'<text x="0" y="{y + 13}">{_e(row["stage"])}</text>')
        if row["peak"] is None:
            parts.append(f'<text x="{left}" y="{y + 13}" fill="#666">{"not run" if summary is None else "no measured peak"}</text>')
            continue
        over = budget is not None and row["peak"] > budget
        bar = max(1, round(width * row["peak"] / scale))
        parts.append(f'<rect class="peak" x="{left}" y="{y}" width="{bar}" height="{bar_h}" fill="{"#d9534f" if over else "#4a90d9"}">'
                     f'<title>{_e(row["stage"])}: measured peak {_e(format_bytes(row["peak"]))}</title></rect>')
        label = f"{format_bytes(row['peak'])}{' of ' + format_bytes(budget) if budget is not None else ''}, {summary.get('seconds', 0):.1f} s"
        parts.append(f'<text x="{left + width + 8}" y="{y + 13}">{_e(label)}</text>')
    if budget is not None:
        x = left + round(width * budget / scale)
        parts.append(f'<line class="budget" x1="{x}" y1="4" x2="{x}" y2="{height - 20}" stroke="#333" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{max(left, x - 60)}" y="{height - 6}">budget {_e(format_bytes(budget))}</text>')
    else:
        parts.append(f'<text x="{left}" y="{height - 6}" fill="#666">no memory budget set</text>')
    parts.append("</svg>")
    return "".join(parts)


def _header(job: dict, rows: list[dict], counts: dict, outcome: str | None) -> str:
    runtime = job.get("runtime") or {}
    budget = runtime.get("budget_bytes")
    model = job["model"]["given"]
    seconds = sum((row["summary"] or {}).get("seconds", 0) for row in rows)
    totals = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    out = [
        f"<h1>job <bdi>{_u(job['name'])}</bdi></h1>",
        f'<p class="totals">{len(job["items"])} images ({_e(totals)}) &middot; model <bdi>{_u(model)}</bdi> ({_e(job.get("pipeline", ""))}'
        f'{", scheduler " + _e(job["scheduler"]) if job.get("scheduler") else ""}) &middot; {_e(job["dtype"])} on {_e(job["device"])} '
        f"&middot; {seconds:.1f} s in the stages' last runs</p>",
    ]
    if outcome:
        out.append(f'<p class="outcome">last run <bdi>{_u(outcome)}</bdi></p>')
    out.append("<table class=\"stages\"><tr><th>stage</th><th>made</th><th>up to date</th><th>seconds</th><th>load s</th>"
               "<th>strategy</th><th>measured peak</th><th>budget</th></tr>")
    for row in rows:
        s = row["summary"] or {}
        cells = [row["stage"], s.get("units_done", "-"), s.get("units_up_to_date", "-"),
                 f"{s['seconds']:.1f}" if "seconds" in s else "-", f"{s['load_seconds']:.1f}" if "load_seconds" in s else "-",
                 row["strategy"] or "-", format_bytes(row["peak"]), format_bytes(budget) if budget is not None else "none"]
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    out.append(_chart(rows, budget))
    return "\n".join(out)


def _size(item: dict, denoise: dict | None) -> str:
    """Requested size, and the binned size the transformer made when binning is on."""
    requested = f"{item['width']}x{item['height']}"
    if not item["use_resolution_binning"]:
        return f"{requested} (no binning)"
    if not denoise or "binned_size" not in denoise:
        return f"{requested} requested (binned when made)"
    binned = denoise["binned_size"]
    return f"{requested} requested, {binned['width']}x{binned['height']} binned"


def _tiling(decode: dict | None) -> str:
    if not decode:
        return "-"
    strategy = decode.get("strategy") or {}
    text = f"tiled {strategy.get('tile_size')} px" if decode.get("tiled") else "untiled"
    return text + (", VAE upcast to float32" if decode.get("vae_upcast") else "")


def _timings(records: dict) -> str:
    parts = []
    for stage in STAGES:
        record = records.get(stage)
        if not record:
            parts.append(f"{stage} -")
            continue
        note = ""
        if stage == "encode":
            note = " (from the store)" if record.get("from_store") else ""
            note += f" (shared by {record['shared_by']})" if record.get("shared_by", 1) > 1 else ""
        parts.append(f"{stage} {record.get('seconds', 0):.2f} s{note}")
    return ", ".join(parts)


def _picture_fields(item: dict) -> list[tuple[str, str]]:
    """img2img's rows: the start picture with its strength and hash, and the mask (none without)."""
    if not item.get("init_image"):
        return []
    rows = [("image", f"{item['init_image']} (strength {item['strength']}, sha256 {item['init_image_sha256'][:12]})")]
    if item.get("mask_image"):
        rows.append(("mask", f"{item['mask_image']} (sha256 {item['mask_image_sha256'][:12]})"))
    return rows


def _item_data(item: dict, entry: dict, job: dict) -> dict:
    """One item as the page's script reads it: every text as shown (display_text), the copy block
    exact (its TOML escapes read back as the prompt), image links with their hash (a remade image
    is not served from the browser's cache)."""
    records = entry["records"]
    steps = f"{item['num_inference_steps']}" + (f" (timesteps {item['timesteps']})" if item.get("timesteps") else "")
    fields = [
        ("prompt", item["prompt"]),
        ("negative prompt", item["negative_prompt"] or "(none)"),
        ("seed", item["seed"]),
        ("size", _size(item, records.get("denoise"))),
        ("steps", steps),
        ("guidance", item["guidance_scale"]),
        *_picture_fields(item),
        ("model", job["model"]["given"]),
        *([("loras", ", ".join(f"{lora['given']} x{lora['scale']:g}" for lora in item["loras"]))] if item.get("loras") else []),
        ("tiling", _tiling(records.get("decode"))),
        ("timings", _timings(records)),
    ]
    data = {
        "id": item["id"],
        "group": item.get("generation"),
        "state": entry["state"],
        "why": display_text(entry["why"]),
        "title": display_text(item["prompt"]),
        "search": item["prompt"].lower(),
        "fields": [[name, display_text(value)] for name, value in fields],
        "toml": generation_block(item, job),
    }
    if item.get("init_image"):  # file: links (the CSP allows them); the script sets them as properties, never as HTML
        data["sources"] = [[display_text(f"{what}: {Path(item[key]).name}"), Path(item[key]).as_uri()]
                           for what, key in (("source", "init_image"), ("mask", "mask_image")) if item.get(key)]
    if entry["state"] == "done":
        outputs = records["decode"].get("outputs") or {}
        image, thumb = outputs[Path(item["image"]).name], outputs[thumbnail_name(item["id"])]
        folder = Path(item["image"]).parent.as_posix()
        data.update(
            href=quote(item["image"]),
            image=quote(item["image"]) + "?v=" + image["sha256"][:12],
            size=[image["shape"][1], image["shape"][0]],
            thumb=quote(f"{folder}/{thumbnail_name(item['id'])}") + "?v=" + thumb["sha256"][:12],
            thumb_size=[thumb["shape"][1], thumb["shape"][0]],
        )
    return data


_COUNTED = ("done", "to do", "stale", "failed")


def _part_js(number: int, items: list[dict]) -> bytes:
    """A data file: JSON (ASCII only, so no character can end the string or the call) handed to
    the page's script; it runs nothing else."""
    payload = json.dumps({"part": number, "items": items}, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return f"(window.galleryParts = window.galleryParts || []).push({payload});\n".encode()


def _read_part(data: bytes) -> dict:
    """The JSON of a data file written by _part_js."""
    text = data.decode()
    return json.loads(text[text.index("(", text.index("push")) + 1 : text.rindex(")")])


def _part_name(number: int) -> str:
    return f"items-{number:04d}.js"


def _job_key(job: dict) -> str:
    """What the items' data depends on besides their records: the job without its runtime plan."""
    return sha256_bytes(canonical_json({k: v for k, v in job.items() if k != "runtime"}).encode())[:16]


def _index_html(job_dir: Path, job: dict, outcome: str | None, manifest: dict) -> str:
    counts = {state: sum(part["counts"].get(state, 0) for part in manifest["parts"]) for state in _COUNTED}
    rows = _stage_rows(job_dir, job)
    rows[-1]["strategy"] = rows[-1]["strategy"] or ", ".join(manifest["tiling"])  # decode's summary does not name it; its records do
    scripts = [f'<script src="{DATA_DIR}/{part["file"]}?v={part["sha256"][:12]}"></script>' for part in manifest["parts"]]
    states = "".join(f'<option value="{_e(state)}">{_e(state)} ({counts[state]})</option>' for state in _COUNTED)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_u(job['name'])}: {counts['done']} of {len(job['items'])} images</title>",
        f"<style>{_STYLE}</style>",
        "</head><body><header>",
        _header(job, rows, counts, outcome),
        "</header>",
        '<div class="filters"><input id="filter-text" type="search" placeholder="filter by prompt" aria-label="filter by prompt">'
        f'<select id="filter-state" aria-label="filter by state"><option value="all">all states</option>{states}</select>'
        '<span id="shown"></span></div>',
        '<main id="grid"></main><div id="more">loading more images</div>',
        '<dialog id="detail"><button class="close" type="button">Close</button><div id="detail-picture"></div>',
        '<h3 id="detail-title" class="user" dir="auto"></h3><div id="detail-id" class="id"></div><dl id="detail-fields"></dl>',
        '<button class="copy" id="detail-copy" type="button" data-for="detail-toml">Copy as [[generation]]</button>'
        '<pre class="toml" id="detail-toml"></pre></dialog>',
        "<noscript><p>The gallery draws its images with its one script; allow scripts for this file.</p></noscript>",
        *scripts,
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
        "",
    ])


def _tilings(entries: dict) -> list[str]:
    return sorted({_tiling(entry["records"]["decode"]) for entry in entries.values() if "decode" in entry["records"]})


def render_gallery(job_dir: Path, job: dict, outcome: str | None = None, states: dict | None = None,
                   stats: dict | None = None) -> dict[str, bytes]:
    """The page's files for a job folder and its resolved job, by path relative to the folder:
    index.html, and gallery/items-NNNN.js plus gallery/manifest.json (what a refresh after a chunk
    starts from). `outcome` says how the last run ended when it did not finish ("failed: ...",
    "interrupted ..."); `states` is the caller's plan_job result, so the job is not planned again,
    and `stats` the stats of the records that plan took (records.RecordReader.last_snapshot)."""
    job_dir = Path(job_dir)
    if states is None:
        reader = RecordReader()
        states, stats = plan_job(job_dir, job, reader), reader.last_snapshot
    key = _job_key(job)
    manifest = {"job": key, "part_size": PART_SIZE, "tiling": [], "parts": []}
    old, old_plan = _old_parts(job_dir, key)
    # Made from an equal plan (every item done, no record changed since) and all intact: kept, no item judged.
    identity = getattr(states, "identity", None) if outcome is None else None
    same_plan = identity is not None and old_plan == identity and len(old) == _part_count(job)
    entries = None if same_plan else _item_states(job_dir, job, outcome, states)
    prints = []  # per data file: [fingerprint, tilings], gallery/fingerprints.json
    out: dict[str, bytes] = {}
    for number, start in enumerate(range(0, len(job["items"]), PART_SIZE)):
        chunk = job["items"][start:start + PART_SIZE]
        kept = old.get(number)
        fingerprint = kept[1] if same_plan else _part_fingerprint(key, chunk, entries, stats or {})
        if kept is not None and fingerprint is not None and kept[1] == fingerprint:  # nothing it shows changed: no record read
            part, _, tiling, data = kept
        else:
            _read_records([entries[item["id"]] for item in chunk])
            data = _part_js(number, [_item_data(item, entries[item["id"]], job) for item in chunk])
            counts = {state: 0 for state in _COUNTED}
            for item in chunk:
                counts[entries[item["id"]]["state"]] += 1
            part = {"file": _part_name(number), "sha256": sha256_bytes(data), "counts": counts}
            tiling = _tilings({item["id"]: entries[item["id"]] for item in chunk})
            for item in chunk:  # one part's records at a time: at 10,000 items all of them were ~200 MB
                entries[item["id"]]["records"] = {}
        manifest["parts"].append(part)
        prints.append([fingerprint, tiling])
        manifest["tiling"] = sorted(set(manifest["tiling"]) | set(tiling))
        out[f"{DATA_DIR}/{_part_name(number)}"] = data
    whole = identity is not None and all(fingerprint is not None for fingerprint, _ in prints)
    out[f"{DATA_DIR}/{FINGERPRINTS}"] = _fingerprints_json(key, prints, identity if whole else None)
    out[f"{DATA_DIR}/{MANIFEST}"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    out[PAGE] = _index_html(job_dir, job, outcome, manifest).encode()
    return out


def _part_count(job: dict) -> int:
    """How many data files the job's items fill (PART_SIZE each, the last one partly)."""
    return -(-len(job["items"]) // PART_SIZE)


def _fingerprints_json(key: str, prints: list, plan: str | None = None) -> bytes:
    """`plan`: the identity of the plan (plan.Plan.identity) every data file was made from, when
    one was: a later render from an equal plan keeps them all without judging any item."""
    return (json.dumps({"job": key, "version": PART_VERSION, "parts": prints, "plan": plan}, separators=(",", ":")) + "\n").encode()


def _read_fingerprints(job_dir: Path, key: str, parts: int) -> tuple[list, str | None] | None:
    """gallery/fingerprints.json's [fingerprint, tilings] per data file and the plan they were all
    made from (or None), when it is this job's."""
    try:
        prints = json.loads(_read_own(job_dir / DATA_DIR / FINGERPRINTS))
        if prints["job"] != key or prints["version"] != PART_VERSION or len(prints["parts"]) != parts:
            return None
        if not all(isinstance(fp, (str, type(None))) and isinstance(tiling, list) for fp, tiling in prints["parts"]):
            return None
        plan = prints.get("plan")
        return prints["parts"], plan if isinstance(plan, str) else None
    except (OSError, ValueError, KeyError, TypeError, JobFileError):
        return None


def _old_parts(job_dir: Path, key: str) -> tuple[dict[int, tuple], str | None]:
    """The data files already written for this job, by number: (manifest entry, fingerprint,
    tilings, bytes), each only when its bytes have the sha256 its manifest entry names; and the
    plan they were all made from, when one was."""
    try:
        manifest = json.loads(_read_own(job_dir / DATA_DIR / MANIFEST))
        if manifest["job"] != key or manifest["part_size"] != PART_SIZE:
            return {}, None
        found = _read_fingerprints(job_dir, key, len(manifest["parts"]))
        if found is None:
            return {}, None
        prints, plan = found
        parts = {}
        for number, (part, (fingerprint, tiling)) in enumerate(zip(manifest["parts"], prints)):
            if fingerprint is None or not isinstance(part, dict) or part.get("file") != _part_name(number):
                continue
            data = _read_own(job_dir / DATA_DIR / part["file"])
            if sha256_bytes(data) == part.get("sha256"):
                parts[number] = (part, fingerprint, tiling, data)
        return parts, plan
    except (OSError, ValueError, KeyError, TypeError, JobFileError):
        return {}, None


def _read_own(path: Path) -> bytes:
    """A file the gallery wrote, read only when it is a regular file (never a FIFO's endless wait)."""
    return read_bytes_limited(path, 256 * 2**20, "gallery file")


def _refreshed(job_dir: Path, job: dict, ids: set[str]) -> dict[str, bytes] | None:
    """The files that change when the items `ids` changed (a chunk was made), from the files as
    they are; None when they do not match this job (then the whole page is rendered)."""
    try:
        manifest = json.loads(_read_own(job_dir / DATA_DIR / MANIFEST))
        ok = manifest["job"] == _job_key(job) and manifest["part_size"] == PART_SIZE
        ok = ok and len(manifest["parts"]) == _part_count(job)
    except (OSError, ValueError, KeyError, TypeError, JobFileError):
        return None
    found = _read_fingerprints(job_dir, manifest["job"], len(manifest["parts"])) if ok else None
    if found is None:
        return None
    prints = found[0]
    entries = _item_states(job_dir, job, None, only=ids)
    _read_records(list(entries.values()))
    position = {item["id"]: n for n, item in enumerate(job["items"])}
    touched = sorted({position[item_id] // PART_SIZE for item_id in ids if item_id in position})
    out: dict[str, bytes] = {}
    for number in touched:
        try:
            part = _read_part(_read_own(job_dir / DATA_DIR / _part_name(number)))
        except (OSError, ValueError, JobFileError):
            return None
        chunk = job["items"][number * PART_SIZE:(number + 1) * PART_SIZE]
        old = {data["id"]: data for data in part["items"]}
        if [item["id"] for item in chunk] != list(old):
            return None
        merged = [_item_data(item, entries[item["id"]], job) if item["id"] in entries else old[item["id"]] for item in chunk]
        data = _part_js(number, merged)
        counts = {state: sum(1 for d in merged if d["state"] == state) for state in _COUNTED}
        manifest["parts"][number] = {"file": _part_name(number), "sha256": sha256_bytes(data), "counts": counts}
        # No fingerprint: the next whole render remakes this file once (its other items were not judged here).
        prints[number] = [None, sorted(set(prints[number][1]) | set(_tilings({i: e for i, e in entries.items() if i in old})))]
        out[f"{DATA_DIR}/{_part_name(number)}"] = data
    manifest["tiling"] = sorted(set(manifest["tiling"]) | set(_tilings(entries)))
    out[f"{DATA_DIR}/{FINGERPRINTS}"] = _fingerprints_json(manifest["job"], prints)
    out[f"{DATA_DIR}/{MANIFEST}"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    out[PAGE] = _index_html(job_dir, job, None, manifest).encode()
    return out


def write_gallery(job_dir: Path, job: dict | None = None, outcome: str | None = None, states: dict | None = None,
                  items: list[str] | None = None, stats: dict | None = None) -> Path:
    """Write `<job_dir>/index.html` and its data files atomically, each only when its content
    changed (so a no-op rerun touches nothing), the data before the page that names them; `job`
    defaults to the folder's job.resolved.json. With `items` (the ids a chunk just made), only the
    data files holding them are remade, from the files already there."""
    job_dir = Path(job_dir)
    job = job if job is not None else read_job(job_dir)
    files = (_refreshed(job_dir, job, set(items)) if items is not None and outcome is None else None)
    if files is None:
        files = render_gallery(job_dir, job, outcome, states, stats)
        (job_dir / DATA_DIR).mkdir(exist_ok=True)
        for old in (job_dir / DATA_DIR).glob("items-*.js"):  # a longer job's parts, from before
            if f"{DATA_DIR}/{old.name}" not in files:
                old.unlink()
    for name in sorted(files, key=lambda name: name == PAGE):  # the page last
        path = job_dir / name
        try:
            if _read_own(path) == files[name]:
                continue
        except (OSError, JobFileError):
            pass  # absent, or not a regular file (a FIFO, a folder): replaced by the publish
        publish_bytes(path, files[name])
    return job_dir / PAGE


def describe_outcome(exc: BaseException) -> str:
    """How a run that raised ended, for the page: "failed: <the one-line error>" or "interrupted"."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: finished items are kept; run the same command again to resume"
    return "failed: " + re.sub(r"\s+", " ", str(exc)).strip()


def write_gallery_after_run(job_dir: Path, job: dict, echo, exc: BaseException | None = None, states: dict | None = None,
                            items: list[str] | None = None, stats: dict | None = None) -> Path | None:
    """After `orchestrate run` (or one of its chunks, whose item ids are `items`): write the page
    and return its path (None when it could not be written, which is one warning line: the images
    are what the run is for). After a run that raised `exc`, the page says how it ended, its path is
    printed here, and no error of the page replaces the run's own. `states`: the run's final plan."""
    if exc is not None and not Path(job_dir).is_dir():
        return None  # stopped before anything was made: no page to show
    try:
        path = write_gallery(job_dir, job, describe_outcome(exc) if exc is not None else None, states, items, stats)
    except (OSError, ResourceError) as error:  # a full disk, a read-only folder
        echo(f"warning: gallery page not written ({error})")
        return None
    except Exception as error:
        if exc is None:
            raise  # a bug: keep its traceback
        echo(f"warning: gallery page not written ({type(error).__name__}: {error})")
        return None
    if exc is not None:
        echo(f"gallery: {shown_path(path)}")
    return path


def job_dir_of(job_file: Path, workdir: Path) -> Path:
    """The folder a job file or prompt list runs in, or a one-line JobFileError when nothing ran there."""
    from orchestrator.jobfile import job as jobfile

    path = Path(job_file)
    # A prompt list's folder is named after the file; its model (--model of run) does not matter here.
    job = jobfile.load_job(path, "-" if path.suffix.lower() == ".txt" else None)
    job_dir = jobfile.job_dir_for(job, workdir)
    if not (job_dir / RESOLVED_JOB).is_file():
        raise JobFileError(f"job folder {job_dir} has no {RESOLVED_JOB}; run `orchestrate run {path}` first, then the page is written")
    return job_dir
