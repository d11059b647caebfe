"""The job's gallery page: `<job_dir>/index.html`, one self-contained offline page.

Per item: the image (a relative link to its PNG) or a placeholder saying to do / stale / failed and
why, its parameters, its stage timings, and its `[[generation]]` block to copy; items of one
generation entry (`count`) are grouped. A header gives the job's totals and each stage's measured
peak memory against the budget and its seconds, as an inline SVG chart.

The page shows the job as last run: the items of `job.resolved.json`, judged by the same test as
`orchestrate status` (orchestrator/plan.py, stages/units.py unit_status). It is data, not code:
every text is escaped with html.escape, no data goes into the one script (which only copies a
`<pre>` to the clipboard), and a Content-Security-Policy lets nothing else run or load from the
network. Written by `orchestrate run` after the stages (also after a failed or interrupted run)
and by `orchestrate gallery JOB.toml`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from urllib.parse import quote

from orchestrator.plan import plan_job
from orchestrator.runner import measured_peak
from stages.contract import RESOLVED_JOB, STAGES, JobFileError, ResourceError
from stages.files import publish_bytes, shown_path
from stages.measure import format_bytes
from stages.records import read_record
from stages.resolved import read_job

PAGE = "index.html"

# The page's only script: copies the <pre> a button names. It reads the DOM, never data of its own.
_SCRIPT = """
function selectText(pre) {
  var range = document.createRange();
  range.selectNodeContents(pre);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  try { return document.execCommand("copy"); } catch (error) { return false; }
}
document.addEventListener("click", function (event) {
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
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1em 2em; color: #1d1d1f; background: #fafafa; }
h1 { margin: 0.2em 0; } h2 { font-size: 1.05em; margin: 1.6em 0 0.4em; overflow-wrap: anywhere; }
h2 .count { color: #666; font-weight: normal; }
.totals { margin: 0.3em 0; } .outcome { padding: 0.4em 0.8em; border-radius: 4px; background: #fde2e1; overflow-wrap: anywhere; }
table.stages { border-collapse: collapse; margin: 0.6em 0; } table.stages th, table.stages td { padding: 0.15em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
.items { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }
.item { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.7em; }
.item img { display: block; max-width: 100%; height: auto; margin: 0 auto; image-rendering: auto; }
.placeholder { display: flex; flex-direction: column; justify-content: center; min-height: 180px; padding: 1em; border-radius: 4px; background: #eee; overflow-wrap: anywhere; }
.placeholder.failed { background: #fde2e1; } .placeholder.stale { background: #fff3cd; }
.placeholder strong { font-size: 1.2em; text-transform: uppercase; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.1em 0.8em; margin: 0.6em 0; }
dt { color: #666; } dd { margin: 0; overflow-wrap: anywhere; white-space: pre-wrap; }
.id { font-family: ui-monospace, monospace; font-size: 0.85em; color: #666; overflow-wrap: anywhere; }
pre { background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; margin: 0.4em 0; }
button.copy { cursor: pointer; }
svg text { font: 12px system-ui, sans-serif; }
"""


def _csp_hash(text: str) -> str:
    """The Content-Security-Policy source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_STYLE)}; "
        f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
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
    return "\n".join(lines) + "\n"


def _item_states(job_dir: Path, job: dict, outcome: str | None) -> dict[str, dict]:
    """Per item id: state (done, to do, stale, failed), why, and its units' records when done."""
    states = plan_job(job_dir, job)
    by_item: dict[str, dict] = {item["id"]: {"records": {}, "pending": None} for item in job["items"]}
    first_pending = None
    for stage in STAGES:
        for s in states[stage]:
            for item_id in s.unit.items:
                entry = by_item[item_id]
                if s.state == "done":
                    entry["records"][stage] = read_record(s.unit.record_path(job_dir))[0] or {}
                    if stage == "encode":
                        entry["records"][stage]["shared_by"] = len(s.unit.items)
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


def _stage_rows(job_dir: Path, job: dict) -> list[dict]:
    """Each stage's last-run numbers from its summary.json, with the peak the budget limits."""
    runtime = job.get("runtime") or {}
    device_type = runtime.get("device_type") or ("cuda" if str(job.get("device", "")).startswith("cuda") else "cpu")
    rows = []
    for stage in STAGES:
        try:
            summary = json.loads((job_dir / stage / "summary.json").read_text(encoding="utf-8"))
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
        f"<h1>job {_e(job['name'])}</h1>",
        f'<p class="totals">{len(job["items"])} images ({_e(totals)}) &middot; model {_e(model)} ({_e(job.get("pipeline", ""))}'
        f'{", scheduler " + _e(job["scheduler"]) if job.get("scheduler") else ""}) &middot; {_e(job["dtype"])} on {_e(job["device"])} '
        f"&middot; {seconds:.1f} s in the stages' last runs</p>",
    ]
    if outcome:
        out.append(f'<p class="outcome">last run {_e(outcome)}</p>')
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


def _item_html(item: dict, entry: dict, job: dict) -> str:
    records = entry["records"]
    item_id = item["id"]
    if entry["state"] == "done":
        output = next(iter((records["decode"].get("outputs") or {}).values()), {})
        shape = output.get("shape") or [None, None]
        src = quote(item["image"]) + "?v=" + quote(str(output.get("sha256", ""))[:12])  # a remade image is not served from cache
        size = f' width="{int(shape[1])}" height="{int(shape[0])}"' if shape[0] and shape[1] else ""
        picture = (f'<a class="full" href="{_e(quote(item["image"]))}" title="open full size">'
                   f'<img src="{_e(src)}"{size} alt="{_e(item["prompt"])}" loading="lazy"></a>')
    else:
        picture = (f'<div class="placeholder {_e(entry["state"].replace(" ", "-"))}"><strong>{_e(entry["state"])}</strong>'
                   f"<span>{_e(entry['why'])}</span></div>")
    steps = f"{item['num_inference_steps']}" + (f" (timesteps {item['timesteps']})" if item.get("timesteps") else "")
    fields = [
        ("prompt", item["prompt"]),
        ("negative prompt", item["negative_prompt"] or "(none)"),
        ("seed", item["seed"]),
        ("size", _size(item, records.get("denoise"))),
        ("steps", steps),
        ("guidance", item["guidance_scale"]),
        ("model", job["model"]["given"]),
        ("tiling", _tiling(records.get("decode"))),
        ("timings", _timings(records)),
    ]
    block_id = f"toml-{item_id}"
    return "\n".join([
        f'<article class="item {_e(entry["state"].replace(" ", "-"))}" id="item-{_e(item_id)}">',
        picture,
        f'<div class="id">{_e(item_id)}</div>',
        "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in fields) + "</dl>",
        f'<button class="copy" type="button" data-for="{_e(block_id)}">Copy as [[generation]]</button>',
        f'<pre class="toml" id="{_e(block_id)}">{_e(generation_block(item, job))}</pre>',
        "</article>",
    ])


def render_gallery(job_dir: Path, job: dict, outcome: str | None = None) -> str:
    """The page's HTML for a job folder and its resolved job; `outcome` says how the last run
    ended when it did not finish ("failed: ...", "interrupted ...")."""
    job_dir = Path(job_dir)
    entries = _item_states(job_dir, job, outcome)
    counts = {state: 0 for state in ("done", "to do", "stale", "failed")}
    for entry in entries.values():
        counts[entry["state"]] += 1
    rows = _stage_rows(job_dir, job)
    decoded = sorted({_tiling(entry["records"]["decode"]) for entry in entries.values() if "decode" in entry["records"]})
    rows[-1]["strategy"] = rows[-1]["strategy"] or ", ".join(decoded)  # decode's summary does not name it; its records do
    groups: list[list[dict]] = []
    for item in job["items"]:  # items of one [[generation]] entry (its `count`) are consecutive
        if groups and groups[-1][0].get("generation") == item.get("generation"):
            groups[-1].append(item)
        else:
            groups.append([item])
    body = []
    for group in groups:
        first = group[0]
        body.append(f'<section class="group"><h2>{_e(first["prompt"]) or "(empty prompt)"} '
                    f'<span class="count">({len(group)} image{"s" if len(group) > 1 else ""})</span></h2><div class="items">')
        body += [_item_html(item, entries[item["id"]], job) for item in group]
        body.append("</div></section>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(job['name'])}: {counts['done']} of {len(job['items'])} images</title>",
        f"<style>{_STYLE}</style>",
        "</head><body><header>",
        _header(job, rows, counts, outcome),
        "</header><main>",
        *body,
        "</main>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
        "",
    ])


def write_gallery(job_dir: Path, job: dict | None = None, outcome: str | None = None) -> Path:
    """Write `<job_dir>/index.html` atomically (only when its content changed, so a no-op rerun
    touches nothing); `job` defaults to the folder's job.resolved.json."""
    job_dir = Path(job_dir)
    page = render_gallery(job_dir, job if job is not None else read_job(job_dir), outcome).encode()
    path = job_dir / PAGE
    try:
        if path.read_bytes() == page:
            return path
    except OSError:
        pass
    publish_bytes(path, page)
    return path


def describe_outcome(exc: BaseException) -> str:
    """How a run that raised ended, for the page: "failed: <the one-line error>" or "interrupted"."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: finished items are kept; run the same command again to resume"
    return "failed: " + re.sub(r"\s+", " ", str(exc)).strip()


def write_gallery_after_run(job_dir: Path, job: dict, echo, exc: BaseException | None = None) -> Path | None:
    """After `orchestrate run`: write the page and return its path (None when it could not be
    written, which is one warning line: the images are what the run is for). After a run that
    raised `exc`, the page says how it ended, its path is printed here, and no error of the page
    replaces the run's own."""
    if exc is not None and not Path(job_dir).is_dir():
        return None  # stopped before anything was made: no page to show
    try:
        path = write_gallery(job_dir, job, describe_outcome(exc) if exc is not None else None)
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
    from orchestrator import job as jobfile

    path = Path(job_file)
    # A prompt list's folder is named after the file; its model (--model of run) does not matter here.
    job = jobfile.load_job(path, "-" if path.suffix.lower() == ".txt" else None)
    job_dir = jobfile.job_dir_for(job, workdir)
    if not (job_dir / RESOLVED_JOB).is_file():
        raise JobFileError(f"job folder {job_dir} has no {RESOLVED_JOB}; run `orchestrate run {path}` first, then the page is written")
    return job_dir
