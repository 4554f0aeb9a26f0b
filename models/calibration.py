"""Calibrating the memory's correction strength on its own training images.

A memory read for one of its training images would find that image's own slot and recall its
target exactly; unseen images are recalled with errors. So each training image is read with the
slots it wrote left out (`ExternalMemory.read(exclude=...)`), and the gain strength s of
`refine_with_memory` is the one of a fixed grid with the best mean PSNR over those reads. s = 0
(no correction) is on the grid: a memory that cannot recall well is switched off, not trusted.
"""
from __future__ import annotations

import numpy as np
import torch

from models.memory import ExternalMemory, refine_with_memory
from utils.image_io import tensor_to_image, to_uint8
from utils.metrics import psnr

STRENGTHS = tuple(round(0.1 * i, 1) for i in range(13))  # 0.0 .. 1.2


def calibrate_strength(memory: ExternalMemory, queries: torch.Tensor, ori: list[torch.Tensor],
                       high: list[np.ndarray], top_k: int, temperature: float,
                       pooling_mean: bool) -> tuple[float, dict[float, float]]:
    """(best strength, mean PSNR per strength) over training images i = 0..N-1, whose slots in
    `memory` carry `top_index` i. `queries` (N, D) as read at test time, `ori` the enhancer
    outputs (3, H, W) in [0, 1], `high` the uint8 (H, W, 3) targets."""
    recalled = memory.read(queries, top_k, temperature, exclude=torch.arange(len(ori), device=queries.device))
    p = memory.config.pooling_size
    curve = {}
    for s in STRENGTHS:
        curve[s] = float(np.mean([
            psnr(to_uint8(tensor_to_image(refine_with_memory(y[None].float(), r[None].cpu(), p, pooling_mean, s))), h)
            for y, r, h in zip(ori, recalled, high)]))
    return max(curve, key=lambda s: (curve[s], -s)), curve
