"""Downscaled JPEG previews of every stage of an evaluated image, for the results page.

`RESULT_DIR/previews/<stage>/<name>.jpg` (stage: low, ori, mem, gt) is at most PREVIEW_SIDE pixels
on its longer side, so a page of 100 large photos loads quickly; the page links the full-size
files (ori/ and mem/ PNGs, the pair's low and high files) and reads them only for the zoom.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence
from urllib.parse import quote

import cv2
import numpy as np

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.image_io import read_image, to_uint8

PREVIEW_SIDE = 1024  # longer side of a preview, in pixels
JPEG_QUALITY = 90


class ImagePair(Protocol):
    """What the previews need of a pair (`dataset.pairing.ImagePair` has it)."""

    name: str
    low: Path
    high: Path | None


@dataclass
class PageImage:
    """One photo of the page: its size and, per stage, the relative URLs of preview and full file."""

    name: str
    width: int
    height: int
    preview: dict[str, str] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)


def stage_files(result_dir: Path, pair: ImagePair, stages: Sequence[str]) -> dict[str, Path]:
    """Full-size file of each stage that exists: low, the `stages` saved in result_dir, gt."""
    files = {"low": Path(pair.low)}
    for stage in stages:
        path = Path(result_dir) / stage / f"{pair.name}.png"
        if path.is_file():
            files[stage] = path
    if pair.high is not None:
        files["gt"] = Path(pair.high)
    return files


def url(result_dir: Path, path: Path) -> str:
    """`path` as a percent-encoded URL relative to `result_dir` (the page's folder)."""
    return quote(Path(os.path.relpath(Path(path).resolve(), Path(result_dir).resolve())).as_posix())


def downscale(img: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """`img` with its longer side reduced to `side` by area averaging (unchanged when smaller)."""
    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    scale = side / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def write_previews(result_dir: Path, pair: ImagePair, stages: Sequence[str] = ("ori", "mem")) -> PageImage:
    """Write the previews of one pair (see the module docstring) and return its `PageImage`."""
    result_dir = Path(result_dir)
    files = stage_files(result_dir, pair, stages)
    image = None
    for stage, path in files.items():
        img = to_uint8(read_image(path))
        if image is None:
            image = PageImage(pair.name, img.shape[1], img.shape[0])
        preview = result_dir / "previews" / stage / f"{pair.name}.jpg"
        preview.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(downscale(img)[:, :, ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise UserError(f"cannot encode a preview of {path}; check that the file is an image")
        atomic_write(preview, buf.tobytes())
        image.preview[stage] = url(result_dir, preview)
        image.full[stage] = url(result_dir, path)
    return image
