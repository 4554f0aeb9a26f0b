"""The one evaluation loop: enhance pairs (or read another method's outputs), optionally correct
them with the external memory, save the images, score against ground truth.

Used by `test.py` and by the enhancer trainer's validation, so both score the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dataset.paired_folder import read_pair
from dataset.pairing import ImagePair, name_key
from models.inference import BORDER_MARGIN, enhance, enhance_with_features
from utils.errors import UserError
from utils.image_io import image_to_tensor, is_image_file, read_image, tensor_to_image, to_uint8, write_image
from utils.memory_effect import measure_effect
from utils.report import score

if TYPE_CHECKING:
    from models.refiner import MemoryRefiner


def _scored(row: dict[str, Any], prefix: str, out8, high, lpips: nn.Module | None, device: torch.device) -> None:
    if high is None:
        return
    high8 = to_uint8(high)
    row.update({f"{prefix}{k}": v for k, v in score(out8, high8).items()})
    if lpips is not None:  # on the rounded 8-bit images, as saved
        pred, gt = (image_to_tensor(im.astype(np.float32) / 255.0).to(device) for im in (out8, high8))
        with torch.autocast(device.type, enabled=False):  # a metric: float32 even under --amp
            row[f"{prefix}lpips"] = float(lpips(pred, gt))


@torch.no_grad()
def evaluate_pairs(enhancer: nn.Module | None, pairs: list[ImagePair], device: torch.device, *,
                   refiner: MemoryRefiner | None = None, enhanced: dict[str, Path] | None = None,
                   ori_dir: Path | None = None, mem_dir: Path | None = None,
                   progress: bool = True, margin: int = BORDER_MARGIN,
                   lpips: nn.Module | None = None, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per pair: `name`, and where ground truth exists `ori_psnr/ssim/gt_mean_psnr` (and
    `mem_...` with a `refiner`; `..._lpips` with an `lpips` model, `utils.perceptual.LPIPS`).
    With a refiner, `memory_effect` holds what the memory changed (`utils.memory_effect.MemoryEffect`:
    gain per channel, brightness ori -> mem, ground truth or not, whether it corrected the image or
    abstained, and why) and `recalled` the memory's best entries for the image (training-image
    name, sample index, score and its percentile among the memory's own reads).

    `enhanced` maps pair names to images made by any other method, used instead of `enhancer`
    (the memory's plug-and-play use). Outputs are written to `<ori_dir|mem_dir>/<name>.png`.
    `margin` is the reflected border margin of `models.inference.enhance`. With a refiner the
    memory's enhancer query reuses the features of the enhancer pass.
    Each row is appended to `rows` (a new list when None) once its image is done, so a caller
    keeps the rows of a run stopped early.
    """
    rows = [] if rows is None else rows
    for pair in tqdm(pairs, desc="enhance", unit="img", disable=not progress, leave=False):
        low, high = read_pair(pair)
        x = image_to_tensor(low).to(device)
        features = None
        if enhanced is not None:
            other = read_image(enhanced[pair.name])
            if other.shape != low.shape:
                raise UserError(f"{enhanced[pair.name]} is {other.shape[1]}x{other.shape[0]} but its "
                                f"input {pair.low} is {low.shape[1]}x{low.shape[0]}; sizes must agree")
            y = image_to_tensor(other).to(device)
        elif refiner is not None:
            y, features = enhance_with_features(enhancer, x, margin)
        else:
            y = enhance(enhancer, x, margin)
        ori8 = to_uint8(tensor_to_image(y))
        row: dict[str, Any] = {"name": pair.name}
        _scored(row, "ori_", ori8, high, lpips, device)
        if ori_dir is not None:
            write_image(ori_dir / f"{pair.name}.png", ori8)
        if refiner is not None:
            query = refiner.fp32_query(x, features)  # one query for the recalled entries and the correction
            row["recalled"] = refiner.top_entries(x, query=query)[0]
            out, (decision,) = refiner.refine(x, y, query=query)
            mem8 = to_uint8(tensor_to_image(out))
            row["memory_effect"] = measure_effect(ori8, mem8, row["recalled"], decision.corrected, decision.reason)
            _scored(row, "mem_", mem8, high, lpips, device)
            if mem_dir is not None:
                write_image(mem_dir / f"{pair.name}.png", mem8)
        rows.append(row)
    return rows


def match_enhanced(pairs: list[ImagePair], folder: str | Path) -> dict[str, Path]:
    """Map each pair to the image of the same name (any image extension) in `folder`; missing
    images are a UserError naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--enhanced_dir {folder} does not exist; pass the folder of another method's outputs")
    found = {name_key(f.stem): f for f in folder.iterdir() if f.is_file() and is_image_file(f)}
    missing = [p.name for p in pairs if name_key(p.name) not in found]
    if missing:
        raise UserError(f"--enhanced_dir {folder} lacks images for {len(missing)} inputs "
                        f"(e.g. {', '.join(missing[:3])}); outputs must be named like the inputs")
    return {p.name: found[name_key(p.name)] for p in pairs}
