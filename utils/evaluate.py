"""The one evaluation loop: enhance pairs, optionally save the outputs, score against ground truth.

Used by `test.py` and by the trainer's validation, so both score the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dataset.paired_folder import read_pair
from dataset.pairing import ImagePair
from models.inference import enhance
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8, write_image
from utils.report import score


def evaluate_pairs(model: nn.Module, pairs: list[ImagePair], device: torch.device,
                   out_dir: Path | None = None, prefix: str = "ori_", progress: bool = True,
                   ) -> list[dict[str, Any]]:
    """One row per pair: `name` and, where ground truth exists, `<prefix>psnr/ssim/gt_mean_psnr`.

    With `out_dir`, each output is written as `<out_dir>/<name>.png`.
    """
    rows = []
    was_training = model.training
    model.eval()
    for pair in tqdm(pairs, desc="enhance", unit="img", disable=not progress, leave=False):
        low, high = read_pair(pair)
        out8 = to_uint8(tensor_to_image(enhance(model, image_to_tensor(low).to(device))))
        if out_dir is not None:
            write_image(out_dir / f"{pair.name}.png", out8)
        row: dict[str, Any] = {"name": pair.name}
        if high is not None:
            row.update({f"{prefix}{k}": v for k, v in score(out8, to_uint8(high)).items()})
        rows.append(row)
    model.train(was_training)
    return rows
