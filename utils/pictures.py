"""Pictures of an evaluation: a side-by-side strip per image, then the results page (utils/page.py).

`RESULT_DIR/strips/<name>.jpg` puts low | ori | mem | ground truth next to each other (mem and
ground truth only where they exist), each panel under a dark band with its name and, where there
is ground truth, its PSNR in dB. `RESULT_DIR/index.html` (utils/page.py) is the interactive page:
summary, sortable table, comparison slider, zoom and the memory's recalled entries. Both are made
from the images `test.py` saved in ori/ and mem/ and the pair's low/high files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import cv2
import numpy as np

from utils.errors import UserError
from utils.image_io import read_image, to_uint8, write_image
from utils.metrics import psnr
from utils.page import write_index

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


def write_pictures(result_dir: Path, pairs: list[ImagePair], rows: list[dict[str, Any]],
                   columns: list[str], summary: dict[str, Any], stages: Sequence[str] = ("ori", "mem"),
                   thumbnail_of: Callable[[int], np.ndarray | None] | None = None) -> Path:
    """`write_strips` then the interactive page (`utils.page.write_index`, which writes the
    previews too); returns the index.html path."""
    write_strips(result_dir, pairs, stages)
    return write_index(result_dir, rows, columns, summary, thumbnail_of, pairs, stages)
