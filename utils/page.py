"""RESULT_DIR/index.html: the interactive results page of an evaluation.

One file that opens from file:// with no network: the CSS and JavaScript of `utils/page_assets/`
are inlined, the images are relative links. On top, the summary (means, their 95% intervals and
the mem - ori differences; with a memory, how many images it brightened, darkened or left
unchanged); then a table of the metrics.csv columns plus mem - ori per metric and the memory's
effect per image (gain per channel, brightness, the best score's percentile: with or without
ground truth), sortable by any column (numbers as numbers, names in natural order: 1, 22, 111,
146); then a viewer of one photo at a time: a before/after slider between any two of low, ori, mem
and ground truth, zoom panes that show the same region of every stage at 1:1 or 2x, what the
memory changed and recalled, links to the full-size files. Keys: left/right arrows move the slider, n/p go to the
next/previous photo. Loaded with `#selftest`, the page loads its self-test driver from
`RESULT_DIR/selftest.js` (written beside it, not inlined: the page as readers open it carries no
test code), which drives the page and writes a JSON verdict into `<pre id="selftest">` (read back
by the browser test).
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

import numpy as np

from utils.atomic import atomic_write_text
from utils.image_io import write_image
from utils.memory_effect import EFFECT_NOTE, effect_columns, effect_line
from utils.previews import PREVIEW_SIDE, ImagePair, PageImage, write_previews
from utils.report import PAIRED, csv_row

ASSETS = Path(__file__).resolve().parent / "page_assets"
SELFTEST = "selftest.js"  # the self-test driver, beside index.html; page.js loads it by this name
STAGE_TITLES = {"low": "low (input)", "ori": "ori (enhancer)", "mem": "mem (memory)", "gt": "ground truth"}


def natural_key(name: str) -> list[Any]:
    """Sort key that orders digit runs as numbers: 1, 22, 111, 146, a2, a10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t]


def diff_columns(columns: Sequence[str]) -> list[str]:
    """`mem_minus_ori_<m>` for each paired metric whose ori and mem columns are both present."""
    return [f"mem_minus_ori_{m}" for m in PAIRED if f"ori_{m}" in columns and f"mem_{m}" in columns]


def with_diffs(row: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """`row` plus its mem - ori value for each of `diff_columns(columns)` it has both scores of."""
    out = dict(row)
    for key in diff_columns(columns):
        metric = key.removeprefix("mem_minus_ori_")
        mem, ori = row.get(f"mem_{metric}"), row.get(f"ori_{metric}")
        if mem is not None and ori is not None:
            out[key] = mem - ori
    return out


def _cell(column: str, value: Any, as_stored: bool = False) -> str:
    """One table cell: text for words (kept without `data-v`, so they sort as text), else a number
    with its sort key, shown to 4 decimals (`as_stored`: as short as its stored rounding allows);
    mem - ori differences coloured by sign."""
    if isinstance(value, str):
        return f"<td>{html.escape(value)}</td>"
    v, text = _num(value)
    if as_stored and value is not None:
        text = f"{value:g}"
    cls = "num"
    if column.startswith("mem_minus") and v not in ("", "inf"):
        cls += " pos" if float(v) > 0 else " neg" if float(v) < 0 else ""
    return f'<td class="{cls}" data-v="{v}">{text}</td>'


def _num(value: Any) -> tuple[str, str]:
    """(data-v attribute, shown text) of a table cell."""
    if value is None:
        return "", ""
    if isinstance(value, float) and math.isinf(value):
        return "inf", "inf"
    return repr(float(value)), f"{value:.4f}"


def _foot(value: Any) -> str:
    """A footer cell: a mean, or the text of a word column's summary."""
    return f"<td>{html.escape(value)}</td>" if isinstance(value, str) else f'<td class="num">{_num(value)[1]}</td>'


def metrics_table(rows: list[dict[str, Any]], columns: list[str], means: dict[str, Any],
                  effects: Sequence[str] = ()) -> str:
    """The sortable table: name, the metric columns, mem - ori, then the memory's `effects`
    columns (`utils.memory_effect.MemoryEffect.columns`); a row per image (natural name order,
    `data-i` = its index in `rows`) and the means (or a word column's summary) in the footer."""
    cols = [*columns, *diff_columns(columns), *effects]
    head = "".join(f'<th class="sortable" data-col="{html.escape(c)}">{html.escape(c.replace("mem_minus_ori_", "mem - ori "))}</th>'
                   for c in ["name", *cols])
    order = sorted(range(len(rows)), key=lambda i: natural_key(str(rows[i]["name"])))
    body = []
    for i in order:
        r = with_diffs(csv_row(rows[i]), columns)
        cells = "".join(_cell(c, r.get(c), c in effects) for c in cols)
        body.append(f'<tr data-i="{i}"><td>{html.escape(str(r["name"]))}</td>{cells}</tr>')
    foot = "".join(_foot(means.get(c)) for c in cols)
    return (f'<table id="metrics">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + f'\n</tbody>\n<tfoot><tr class="mean"><td>mean</td>{foot}</tr></tfoot>\n</table>')


def effect_means(summary: dict[str, Any]) -> dict[str, Any]:
    """The footer of the effect columns: summary.json's `memory_effect` means, and the counts per
    direction under `brightness_effect`."""
    block = summary.get("memory_effect")
    if not block:
        return {}
    counts = ", ".join(f"{n} {d}" for d, n in block["counts"].items())
    return {**block["mean"], "brightness_effect": counts}


def all_means(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's means plus `mem_minus_ori_<m>`, the mean of each paired difference."""
    diffs = {f"mem_minus_ori_{m}": d["mean"] for m, d in summary.get("mem_minus_ori", {}).items()}
    return {**summary.get("mean", {}), **diffs}


def summary_list(summary: dict[str, Any], columns: list[str]) -> str:
    """The means with their 95% intervals and the mem - ori lines (mean and interval) as HTML."""
    means, ci95 = all_means(summary), summary.get("ci95", {})
    items = []
    for c in [*columns, *diff_columns(columns)]:
        if c not in means:
            continue
        interval = f", 95% CI [{ci95[c][0]:.4f}, {ci95[c][1]:.4f}]" if c in ci95 else ""
        label = c.replace("mem_minus_ori_", "mem - ori ")
        value = f"{means[c]:+.4f}" if c.startswith("mem_minus") else f"{means[c]:.4f}"
        items.append(f"<li><b>{html.escape(label)}</b>: {value}{interval}</li>")
    return '<ul class="summary">' + "".join(items) + "</ul>"


def effect_intro(rows: list[dict[str, Any]]) -> str:
    """The console's line on what the memory did (brightened, darkened, unchanged) and what the
    effect columns mean, as HTML."""
    line = effect_line([r["memory_effect"] for r in rows if r.get("memory_effect") is not None])
    return (f'<p><b>{html.escape(line)}</b></p>'
            f'<p class="note">What the memory changed, per image: {html.escape(EFFECT_NOTE)}.</p>')


def _recalled(result_dir: Path, entries: list[dict[str, Any]],
              thumbnail_of: Callable[[int], np.ndarray | None] | None) -> list[dict[str, Any]]:
    """The memory's best entries for one image (name, score, its percentile among the memory's own
    reads) with the relative URL of each thumbnail (written to recalled/ once per training sample;
    None where the memory stores none)."""
    out = []
    for e in entries:
        thumb = thumbnail_of(e["index"]) if thumbnail_of is not None else None
        rel = None
        if thumb is not None:
            rel = f"recalled/{e['index']}_{e['name']}.png"
            if not (result_dir / rel).is_file():
                (result_dir / "recalled").mkdir(exist_ok=True)
                write_image(result_dir / rel, thumb)
            rel = quote(rel)
        out.append({"name": str(e["name"]), "score": float(e["score"]), "percentile": e.get("percentile"),
                    "thumb": rel})
    return out


def page_data(result_dir: Path, rows: list[dict[str, Any]], images: dict[str, PageImage],
              thumbnail_of: Callable[[int], np.ndarray | None] | None) -> dict[str, Any]:
    """What the page's script reads: the stages present and, per row with previews, its files,
    size and recalled entries (in the order of `rows`, which the table's `data-i` indexes)."""
    stages = [s for s in STAGE_TITLES if any(s in im.preview for im in images.values())]
    data_images = []
    for r in rows:
        im = images.get(str(r["name"]))
        if im is None:
            continue
        recalled = _recalled(result_dir, r["recalled"], thumbnail_of) if r.get("recalled") else None
        effect = r["memory_effect"].describe() if r.get("memory_effect") is not None else None
        data_images.append({"name": im.name, "w": im.width, "h": im.height, "preview": im.preview,
                            "full": im.full, "recalled": recalled, "effect": effect})
    stages = [s for s in stages if all(s in im["preview"] for im in data_images)]
    right = "mem" if "mem" in stages else "ori"
    left = "ori" if right == "mem" else "low"
    return {"stages": [{"key": s, "title": STAGE_TITLES[s]} for s in stages],
            "default_left": left, "default_right": right, "images": data_images}


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside <script>: no "</" or "<!--" can end or confuse the element."""
    return json.dumps(data).replace("<", "\\u003c")


VIEWER = """<section id="viewer">
<div class="bar"><button id="prev" type="button">&larr; previous (p)</button>
<button id="next" type="button">next (n) &rarr;</button><b id="name"></b></div>
<div class="bar">left <select id="left" aria-label="left side"></select> right
<select id="right" aria-label="right side"></select>
<span class="note">drag the slider or press <kbd>&larr;</kbd> <kbd>&rarr;</kbd>
(<kbd>shift</kbd> for larger steps); hover to zoom, click to hold the zoom</span></div>
<div id="compare"><img id="right-img" alt=""><img id="left-img" alt="">
<div id="divider" class="divider"></div><span id="left-tag" class="tag" style="left:4px"></span>
<span id="right-tag" class="tag" style="right:4px"></span><div id="mark" class="mark"></div></div>
<input id="slider" type="range" min="0" max="100" step="1" value="50" aria-label="comparison slider">
<div class="bar">zoom <button id="zoom1" type="button">1:1</button><button id="zoom2" type="button">2x</button>
<span id="zoom-where" class="note"></span></div>
<div id="zooms"></div>
<div class="bar note" id="links"></div>
<div id="effect" class="note" hidden></div>
<div id="recalled" class="recalled" hidden></div>
</section>"""


def write_index(result_dir: Path, rows: list[dict[str, Any]], columns: list[str], summary: dict[str, Any],
                thumbnail_of: Callable[[int], np.ndarray | None] | None = None,
                pairs: Sequence[ImagePair] = (), stages: Sequence[str] = ("ori", "mem")) -> Path:
    """Write previews of `pairs` (`utils.previews`), `result_dir/index.html` and its self-test
    driver `result_dir/selftest.js` (see the module docstring) for `rows` (metrics.csv's rows;
    `columns` its metric columns, `summary` what `utils.report.write_report` returned); return
    the page's path."""
    result_dir = Path(result_dir)
    images = {p.name: write_previews(result_dir, p, stages) for p in pairs}
    data = page_data(result_dir, rows, images, thumbnail_of)
    info = [f"{k}: {summary[k]}" for k in ("input_dir", "weights", "mem_weights", "enhanced_dir", "device")
            if summary.get(k) is not None]
    title = f"EMNet results: {html.escape(result_dir.name)}"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{title}</title>", f"<style>{(ASSETS / 'page.css').read_text()}</style></head><body>",
             f"<h1>{title}</h1>", f'<p class="note">{"<br>".join(html.escape(line) for line in info)}</p>',
             f"<h2>Metrics ({summary.get('num_images', len(rows))} images)</h2>"]
    effects = effect_columns(rows)
    if columns:
        parts += [summary_list(summary, columns),
                  f'<p class="note">Intervals: {html.escape(str(summary.get("ci95_method", "")))}. '
                  f'Convention: {html.escape(str(summary.get("convention", "")))}. '
                  "Click a column to sort, a row to view the photo.</p>"]
    else:
        parts.append('<p class="note">No ground truth (high/): the images are enhanced only, no metrics.</p>')
    if effects:
        parts.append(effect_intro(rows))
    if columns or effects or data["images"]:
        parts.append(metrics_table(rows, columns, {**all_means(summary), **effect_means(summary)}, effects))
    if data["images"]:
        shown = " | ".join(s["title"] for s in data["stages"])
        parts += ["<h2>Images</h2>", f'<p class="note">Stages: {html.escape(shown)}. Previews at most '
                  f"{PREVIEW_SIDE} px; the links open the full-size files.</p>", VIEWER]
    parts += [f'<script id="data" type="application/json">{_script_json(data)}</script>',
              f"<script>{(ASSETS / 'page.js').read_text()}</script>", "</body></html>"]
    atomic_write_text(result_dir / SELFTEST, (ASSETS / SELFTEST).read_text())
    path = result_dir / "index.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
