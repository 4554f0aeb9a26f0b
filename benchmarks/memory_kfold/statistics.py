"""Statistics of cached enhancer passes that the study reads in every fold and variant, computed
once per study run."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from models.frozen_pass import FrozenPass
from models.memory import pooled_value


def high_tensor(fp: FrozenPass) -> torch.Tensor:
    """(1, 3, H, W) ground truth of a pass in [0, 1]."""
    return torch.from_numpy(fp.high).permute(2, 0, 1)[None].float() / 255


def gain_moments(fp: FrozenPass) -> np.ndarray:
    """(4, 3): per channel sum y^2, sum y*gt, sum gt^2 and the pixel count, for the surrogate
    PSNR of a per-channel gain g: MSE = (g^2 A - 2 g B + D) / N (no clamp, no 8-bit rounding)."""
    y = fp.ori.float().flatten(1).double()
    gt = torch.from_numpy(fp.high).permute(2, 0, 1).flatten(1).double() / 255
    return np.stack([(y * y).sum(1), (y * gt).sum(1), (gt * gt).sum(1),
                     torch.full((3,), y.shape[1], dtype=torch.float64)]).astype(np.float64)


def output_stats(fp: FrozenPass) -> np.ndarray:
    """(6,): log of the output's mean colour and its per-channel std."""
    y = fp.ori.float().flatten(1).double()
    return np.concatenate([torch.log(y.mean(1).clamp_min(1e-3)).numpy(), y.std(1).numpy()])


class PassStatistics:
    """Memoised statistics of passes, owned by one study run. Keyed by the pass object itself
    (held alive here), never by name, so a pass with other contents (e.g. another ground truth)
    is computed afresh."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, str], tuple[FrozenPass, object]] = {}

    def _get(self, fp: FrozenPass, kind: str, compute: Callable[[FrozenPass], object]) -> object:
        hit = self._memo.get((id(fp), kind))
        if hit is None or hit[0] is not fp:
            hit = self._memo[(id(fp), kind)] = (fp, compute(fp))
        return hit[1]

    def pooled_high(self, fp: FrozenPass, p: int) -> torch.Tensor:
        """(1, 3 p p) pooled ground truth."""
        return self._get(fp, f"high{p}", lambda f: pooled_value(high_tensor(f), p))

    def pooled_ori(self, fp: FrozenPass, p: int) -> torch.Tensor:
        """(1, 3 p p) pooled enhancer output."""
        return self._get(fp, f"ori{p}", lambda f: pooled_value(f.ori[None].float(), p))

    def moments(self, fp: FrozenPass) -> np.ndarray:
        return self._get(fp, "moments", gain_moments)

    def output_stats(self, fp: FrozenPass) -> np.ndarray:
        return self._get(fp, "output_stats", output_stats)

    def target_value(self, fp: FrozenPass, p: int, kind: str) -> torch.Tensor:
        """(1, 3 p p): the target's pooled colour, or ("ratio") that over the enhancer output's."""
        colour = self.pooled_high(fp, p)
        return colour if kind == "colour" else colour / self.pooled_ori(fp, p).clamp_min(1e-3)
