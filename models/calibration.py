"""Calibrating the memory's correction strength on its own training images.

A memory read for one of its training images would find that image's own slot and recall its
target exactly; unseen images are recalled with errors. So each training image is read with the
slots it wrote left out (`ExternalMemory.read(exclude=...)`), and the gain strength s of
`refine_with_memory` is the one of a fixed grid with the best mean PSNR over those reads. s = 0
(no correction) is on the grid: a memory that cannot recall well is switched off, not trusted.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from models.memory import ExternalMemory
from models.read_settings import ReadSettings

STRENGTHS = tuple(round(0.1 * i, 1) for i in range(13))  # 0.0 .. 1.2


def calibrate_strength(memory: ExternalMemory, queries: torch.Tensor, ori: list[torch.Tensor],
                       high: list[np.ndarray], read: ReadSettings) -> tuple[float, dict[float, float]]:
    """(best strength, mean PSNR per strength) over training images i = 0..N-1, whose slots in
    `memory` carry `top_index` i, read as `read` says at every grid strength. `queries` (N, D) as
    read at test time, `ori` the enhancer outputs (3, H, W) in [0, 1], `high` the uint8 (H, W, 3)
    targets."""
    recalled = read.recall(memory, queries, exclude=torch.arange(len(ori), device=queries.device))
    p = memory.config.pooling_size
    per_image = torch.stack([_psnr_per_strength(y.float(), r.cpu(), h, p, read)
                             for y, r, h in zip(ori, recalled, high)])  # (N, strengths)
    curve = dict(zip(STRENGTHS, per_image.mean(dim=0).tolist()))
    return max(curve, key=lambda s: (curve[s], -s)), curve


def _psnr_per_strength(y: torch.Tensor, recalled: torch.Tensor, high: np.ndarray, p: int,
                       read: ReadSettings) -> torch.Tensor:
    """PSNR (the project's convention: rounded 8-bit RGB) of y corrected at every grid strength."""
    target = torch.from_numpy(high).permute(2, 0, 1).double()
    out = torch.cat([replace(read, strength=s).correct(y[None], recalled[None], p) for s in STRENGTHS])
    mse = ((out * 255).round().double() - target).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-12))
