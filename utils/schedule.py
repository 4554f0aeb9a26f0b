"""Learning-rate schedule of the published recipe, per iteration."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_iters: int, total_iters: int,
                  min_lr: float = 1e-6) -> LambdaLR:
    """Linear warm-up from ~0 to the optimizer's lr over `warmup_iters`, then cosine decay to
    `min_lr` at `total_iters`. A pure function of the iteration, so resuming is exact."""
    base = optimizer.param_groups[0]["lr"]
    floor = min(min_lr / base, 1.0)

    def factor(it: int) -> float:
        if it < warmup_iters:
            return (it + 1) / warmup_iters
        span = max(total_iters - warmup_iters, 1)
        t = min((it - warmup_iters) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)
