"""Training losses: L1, L2, SSIM (differentiable) and LPIPS(AlexNet), combined by weights.

The published recipe is 1 * (1 - SSIM) + 1 * LPIPS on the clamped output, with the [0, 1] images
fed to LPIPS unscaled as the original release does (`lpips_scaled=True`: rescaled to [-1, 1],
the input LPIPS was made for). LPIPS
(`utils.perceptual`) needs torchvision's ImageNet AlexNet: `--lpips_alexnet PATH`, the torch hub
cache, or a download into it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.perceptual import build_lpips


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim_map_mean(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of two (B, C, H, W) batches: Gaussian 11x11 window (sigma 1.5), valid
    positions only, per channel, constants K1=0.01, K2=0.03 (Wang et al. 2004)."""
    c = x.shape[1]
    win = _gaussian_window().to(x)[None, None].expand(c, 1, -1, -1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, win, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean()


OFFLINE_RECIPE = "train without it: --lpips_lambda 0 --l1_lambda 1 (see README)"


class EnhancementLoss(nn.Module):
    """Weighted sum l1 * L1 + l2 * MSE + ssim * (1 - SSIM) + lpips * LPIPS; returns the total
    and the individual terms, detached (for logging: `float()` them only when logging, each one is
    a host sync on a GPU). Terms with weight 0 are not computed. Images are in [0, 1] (SSIM's data
    range 1)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0, ssim: float = 1.0, lpips: float = 1.0,
                 lpips_alexnet: str | None = None, lpips_scaled: bool = False):
        super().__init__()
        if l1 == l2 == ssim == lpips == 0:
            raise UserError("all loss weights are 0; set at least one of --l1_lambda --l2_lambda "
                            "--ssim_lambda --lpips_lambda")
        self.weights = {"l1": l1, "l2": l2, "ssim": ssim, "lpips": lpips}
        self.lpips = build_lpips(lpips_alexnet, OFFLINE_RECIPE, lpips_scaled) if lpips > 0 else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred, target = pred.float(), target.float()
        terms: dict[str, torch.Tensor] = {}
        if self.weights["l1"]:
            terms["l1"] = F.l1_loss(pred, target)
        if self.weights["l2"]:
            terms["l2"] = F.mse_loss(pred, target)
        if self.weights["ssim"]:
            terms["ssim"] = 1 - ssim_map_mean(pred, target)
        if self.lpips is not None:
            terms["lpips"] = self.lpips(pred, target)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}

