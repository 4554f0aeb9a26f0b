"""Pictures of an evaluation: a side-by-side strip per image and an index.html that shows them.

`RESULT_DIR/strips/<name>.jpg` puts low | ori | mem | ground truth next to each other (mem and
ground truth only where they exist), each panel under a dark band with its name and, where there
is ground truth, its PSNR in dB. `RESULT_DIR/index.html` is one self-contained page (inline CSS,
no JavaScript, relative links) with the metrics table and every strip; beside a strip, the
memory's best entries for that image (training-image name, score and, where the memory stores
them, the thumbnails written to `RESULT_DIR/recalled/`). Both are made from the images `test.py`
saved in ori/ and mem/ and the pair's low/high files.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import quote

import cv2
import numpy as np

from utils.atomic import atomic_write_text
from utils.errors import UserError
from utils.image_io import read_image, to_uint8, write_image
from utils.metrics import psnr

STAGE_TITLES = {"ori": "ori (enhancer)", "mem": "mem (memory)"}
BAND_COLOR = (24, 24, 24)  # RGB of the label band
TEXT_COLOR = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


class ImagePair(Protocol):
    """What the pictures need of a pair (`dataset.pairing.ImagePair` has it)."""

    name: str
    low: Path
    high: Path | None


def _read8(path: Path) -> np.ndarray:
    return to_uint8(read_image(path))


def strip_panels(result_dir: Path, pair: ImagePair,
                 stages: Sequence[str] = ("ori", "mem")) -> list[tuple[str, np.ndarray]]:
    """(label, uint8 RGB image) per panel: low, each stage whose `<stage>/<name>.png` exists in
    `result_dir`, then the ground truth when the pair has one. Labels carry the PSNR (dB) against
    the ground truth."""
    low = _read8(pair.low)
    gt = _read8(pair.high) if pair.high is not None else None
    panels = [("low", low)]
    for stage in stages:
        path = Path(result_dir) / stage / f"{pair.name}.png"
        if path.is_file():
            panels.append((STAGE_TITLES.get(stage, stage), _read8(path)))
    for title, img in panels:
        if img.shape != low.shape:
            raise UserError(f"{title} image of {pair.name} is {img.shape[1]}x{img.shape[0]} but its input "
                            f"{pair.low} is {low.shape[1]}x{low.shape[0]}; rerun test.py into a fresh --result_dir")
    if gt is None:
        return panels
    labelled = [(f"{title}  {_db(psnr(img, gt))}", img) for title, img in panels]
    return labelled + [("ground truth", gt)]


def _db(value: float) -> str:
    return "inf dB" if math.isinf(value) else f"{value:.2f} dB"


def _fit_font(text: str, width: int, base_scale: float) -> tuple[float, int]:
    """The largest scale <= base_scale (down to a third of it) at which `text` fits `width`."""
    scale = base_scale
    while scale > base_scale / 3 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width - 8:
        scale *= 0.9
    return scale, max(1, round(scale * 2))


def labelled_panel(label: str, img: np.ndarray) -> np.ndarray:
    """`img` (uint8 RGB, H x W) under a dark band with `label` in white: (H + band, W, 3)."""
    h, w = img.shape[:2]
    base = float(np.clip(max(h, w) / 560, 0.5, 1.2))  # ~0.9 for 512 px, 1.07 for LOL 600x400
    band = round(44 * base)
    scale, thickness = _fit_font(label, w, base)
    top = np.empty((band, w, 3), np.uint8)
    top[:] = BAND_COLOR
    text_h = cv2.getTextSize(label, FONT, scale, thickness)[0][1]
    cv2.putText(top, label, (6, (band + text_h) // 2), FONT, scale, TEXT_COLOR, thickness, cv2.LINE_AA)
    return np.vstack([top, img])


def make_strip(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """The labelled panels side by side; its width is the sum of the panels' widths."""
    return np.hstack([labelled_panel(label, img) for label, img in panels])


def strip_path(result_dir: Path, name: str) -> Path:
    return Path(result_dir) / "strips" / f"{name}.jpg"


def write_strips(result_dir: Path, pairs: list[ImagePair],
                 stages: Sequence[str] = ("ori", "mem")) -> list[Path]:
    """Write `result_dir/strips/<name>.jpg` for every pair (see `strip_panels`); return the paths."""
    (Path(result_dir) / "strips").mkdir(parents=True, exist_ok=True)
    paths = []
    for pair in pairs:
        path = strip_path(result_dir, pair.name)
        write_image(path, make_strip(strip_panels(result_dir, pair, stages)))
        paths.append(path)
    return paths


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.mean{font-weight:bold;background:#eee}
figure{margin:1.5em 0}figcaption{font-weight:bold;margin:.3em 0}img{max-width:100%;height:auto}
.note{color:#555;font-size:.9em}.recalled{display:flex;gap:.8em;font-size:.85em;color:#444}
.recalled figure{margin:0}.recalled img{width:108px;image-rendering:pixelated}"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return "" if value is None else html.escape(str(value))


def metrics_table(rows: list[dict[str, Any]], columns: list[str], means: dict[str, float]) -> str:
    """The metrics as an HTML table: the columns of metrics.csv, a row per image, then the mean."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["name", *columns])
    body = [f"<tr><td>{html.escape(str(r['name']))}</td>"
            + "".join(f'<td class="num">{_cell(r.get(c))}</td>' for c in columns) + "</tr>" for r in rows]
    body.append('<tr class="mean"><td>mean</td>'
                + "".join(f'<td class="num">{_cell(means.get(c))}</td>' for c in columns) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _recalled(result_dir: Path, entries: list[dict[str, Any]],
              thumbnail_of: Callable[[int], np.ndarray | None] | None) -> str:
    """The memory's best entries for one image as HTML: thumbnail (written to recalled/ once per
    training sample) or "no thumbnail", name and score."""
    items = []
    for e in entries:
        thumb = thumbnail_of(e["index"]) if thumbnail_of is not None else None
        label = f"{html.escape(str(e['name']))} ({e['score']:.3f})"
        if thumb is None:
            items.append(f"<figure>{label}<br>(no thumbnail)</figure>")
            continue
        rel = f"recalled/{e['index']}_{e['name']}.png"
        if not (result_dir / rel).is_file():
            (result_dir / "recalled").mkdir(exist_ok=True)
            write_image(result_dir / rel, thumb)
        items.append(f'<figure><img src="{html.escape(quote(rel))}" alt="{label}"><br>{label}</figure>')
    return f'<div class="recalled"><span>recalled (training image, score):</span>{"".join(items)}</div>'


def _figure(name: str, recalled: str = "") -> str:
    src = html.escape(f"strips/{quote(name)}.jpg")
    return (f'<figure><figcaption>{html.escape(name)}</figcaption>'
            f'<img src="{src}" alt="{html.escape(name)}">{recalled}</figure>')


def write_index(result_dir: Path, rows: list[dict[str, Any]], columns: list[str],
                summary: dict[str, Any], thumbnail_of: Callable[[int], np.ndarray | None] | None = None) -> Path:
    """Write `result_dir/index.html`: the metrics table (with the metric convention of
    `summary`) and the strip of every row that has one in `result_dir/strips/`, with the row's
    `recalled` entries beside it (`thumbnail_of(sample index)` gives their thumbnails); return its path."""
    result_dir = Path(result_dir)
    figures = [_figure(str(r["name"]), _recalled(result_dir, r["recalled"], thumbnail_of) if r.get("recalled") else "")
               for r in rows if strip_path(result_dir, str(r["name"])).is_file()]
    info = [f"{k}: {summary[k]}" for k in ("input_dir", "weights", "mem_weights", "enhanced_dir", "device")
            if summary.get(k) is not None]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>EMNet results: {html.escape(result_dir.name)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>EMNet results: {html.escape(result_dir.name)}</h1>",
             f'<p class="note">{"<br>".join(html.escape(line) for line in info)}</p>',
             f"<h2>Metrics ({summary.get('num_images', len(rows))} images)</h2>"]
    if columns:
        parts += [metrics_table(rows, columns, summary.get("mean", {})),
                  f'<p class="note">Convention: {html.escape(str(summary.get("convention", "")))}</p>']
    else:
        parts.append('<p class="note">No ground truth (high/): no metrics.</p>')
    parts += ["<h2>Images</h2>", '<p class="note">low | ori (enhancer) | mem (memory) | ground truth; '
              "PSNR against the ground truth in each label.</p>", *figures, "</body></html>"]
    path = result_dir / "index.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def write_pictures(result_dir: Path, pairs: list[ImagePair], rows: list[dict[str, Any]],
                   columns: list[str], summary: dict[str, Any], stages: Sequence[str] = ("ori", "mem"),
                   thumbnail_of: Callable[[int], np.ndarray | None] | None = None) -> Path:
    """`write_strips` then `write_index`; returns the index.html path."""
    write_strips(result_dir, pairs, stages)
    return write_index(result_dir, rows, columns, summary, thumbnail_of)
