"""Enhance one photo exactly as `test.py` does, for the demo app (app.py).

`PhotoRunner` loads an enhancer and, optionally, its memory with test.py's flags and runs the
one evaluation loop (`models.evaluate.evaluate_pairs`) on a single image, so the app's ori and
mem PNGs, and what the memory changed (`utils.memory_effect.MemoryEffect`), are test.py's. The
PNGs are named `<photo>_ori.png` and `<photo>_mem.png`, so that both downloads keep their stage.
Photos larger than `max_pixels` are refused in one line; smaller large photos follow the memory
budget (--max_memory) as in test.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset.pairing import ImagePair
from models.evaluate import evaluate_pairs
from models.loading import check_memory_flags, check_model_files, load_enhancer, load_memory
from models.refiner import MemoryRefiner, refiner_from_flags
from utils.errors import UserError
from utils.image_io import decode_stored
from utils.memory_effect import MemoryEffect


@dataclass
class PhotoResult:
    """Paths of the enhancer (ori) and memory (mem, None without a memory) PNGs, the memory's
    recalled entries, what it changed (None without a memory) and the photo's size."""

    ori: Path
    mem: Path | None
    recalled: list[dict[str, Any]]
    width: int
    height: int
    effect: MemoryEffect | None = None


def check_photo(path: str | Path | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image at `path`; a one-line UserError for no file, an empty file,
    a non-image or a photo over `max_pixels`."""
    if path is None:
        raise UserError("no photo: upload an image (PNG, JPEG, WebP, BMP, TIFF) or pick an example")
    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path.name} is an empty file (0 bytes): upload the photo again")
    try:
        with Image.open(path) as im:  # the header only: a huge photo is refused before it is decoded
            w, h = im.size
    except Image.DecompressionBombError:
        w = h = int(Image.MAX_IMAGE_PIXELS ** 0.5 * 2)  # more pixels than Pillow will open
    except (UnidentifiedImageError, OSError):
        w = h = 0  # a format Pillow does not know: OpenCV decides below
    if h * w <= max_pixels:
        try:
            h, w = decode_stored(path).shape[:2]
        except UserError:
            raise UserError(f"{path.name} is not an image this demo can read: upload a PNG, JPEG, WebP, BMP "
                            "or TIFF photo") from None
    if h * w > max_pixels:
        raise UserError(f"{path.name} is {w}x{h} ({h * w / 1e6:.1f} megapixels), over this demo's limit of "
                        f"{max_pixels / 1e6:.1f}: run `python test.py --input_dir {path.name}` (large photos in "
                        "strips within --max_memory) or start app.py with a larger --max_pixels")
    return w, h


class PhotoRunner:
    """An enhancer and optional memory, loaded once, run on single photos."""

    def __init__(self, args: Any, device: torch.device):
        """`args`: test.py's flags for the enhancer and memory (`options.add_trained_model_args`,
        `options.add_memory_build_args`), parsed."""
        self.device = device
        check_model_files(args.weights, args.mem_weights, args.query_weights)
        self.model, _ = load_enhancer(args.weights, args.arch, args.embed_dim)
        self.model.to(device)
        self.refiner: MemoryRefiner | None = None
        if args.mem_weights:
            memory, ckpt = load_memory(args.mem_weights)
            check_memory_flags(args.mem_size, args.K_feat_dim, args.V_feat_dim, memory.config,
                               f"memory {args.mem_weights}")
            self.refiner = refiner_from_flags(memory, ckpt, args, self.model).to(device)
        self.margin = args.border_margin

    def thumbnail(self, index: int) -> np.ndarray | None:
        """The recalled training image's thumbnail, None where the memory stores none."""
        return self.refiner.sources.thumbnail(index) if self.refiner is not None else None

    def run(self, photo: str | Path | None, out_dir: Path, max_pixels: int) -> PhotoResult:
        """Enhance `photo` into `out_dir/<stem>_ori.png` (and `out_dir/<stem>_mem.png`)."""
        w, h = check_photo(photo, max_pixels)
        photo = Path(photo)
        stages = ("ori", "mem") if self.refiner is not None else ("ori",)
        for s in stages:
            (out_dir / s).mkdir(parents=True, exist_ok=True)
        (row,) = evaluate_pairs(self.model, [ImagePair(photo.stem, photo, None)], self.device, refiner=self.refiner,
                                ori_dir=out_dir / "ori", mem_dir=out_dir / "mem" if self.refiner else None,
                                progress=False, margin=self.margin)
        files = {s: (out_dir / s / f"{photo.stem}.png").replace(out_dir / f"{photo.stem}_{s}.png") for s in stages}
        return PhotoResult(files["ori"], files.get("mem"), row.get("recalled", []), w, h, row.get("memory_effect"))
