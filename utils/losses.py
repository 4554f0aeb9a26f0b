"""Training losses: L1, L2, SSIM (differentiable) and LPIPS(AlexNet), combined by weights.

The published recipe is 1 * (1 - SSIM) + 1 * LPIPS on the clamped output. LPIPS needs ImageNet
AlexNet weights, which are never downloaded here: they come from `--lpips_alexnet PATH` or the
torch hub cache; the LPIPS v0.1 linear weights come from the `lpips` package's files.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.local_weights import find_local_weights

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1


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


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet backbone (Zhang et al., CVPR 2018), frozen; inputs in [0, 1].

    Distance = sum over five ReLU taps of the spatial mean of a learned 1x1 weighting of the
    squared difference of channel-normalised features.
    """

    TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in torchvision's alexnet().features

    def __init__(self, alexnet_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        net.load_state_dict(alexnet_state)
        self.features = net.features[: self.TAPS[-1] + 1]
        self.lins = nn.ModuleList()
        for i, ch in enumerate((64, 192, 384, 256, 256)):
            lin = nn.Conv2d(ch, 1, 1, bias=False)
            lin.weight.data.copy_(linear_state[f"lin{i}.model.1.weight"])
            self.lins.append(lin)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((2 * x - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x) if not isinstance(layer, nn.ReLU) else F.relu(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dist = x.new_zeros(())
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            dist = dist + lin((fx - fy) ** 2).mean()
        return dist


def _lpips_linear_file() -> Path:
    try:
        import lpips  # only for the file of linear weights it ships
    except ImportError:
        raise UserError("LPIPS needs the `lpips` package for its linear weights: pip install lpips, "
                        "or train with --lpips_lambda 0") from None
    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def find_alexnet_weights(path: str | None) -> Path:
    """The local AlexNet weights file (`--lpips_alexnet` or the torch hub cache)."""
    return find_local_weights(path, ALEXNET_FILE, "LPIPS", "AlexNet", "--lpips_alexnet",
                              "train offline with --lpips_lambda 0 --l1_lambda 1 (see README)")


def build_lpips(alexnet_path: str | None) -> LPIPS:
    """LPIPS from local files only."""
    alex = torch.load(find_alexnet_weights(alexnet_path), map_location="cpu", weights_only=True)
    lin = torch.load(_lpips_linear_file(), map_location="cpu", weights_only=True)
    return LPIPS(alex, lin)


class EnhancementLoss(nn.Module):
    """Weighted sum l1 * L1 + l2 * MSE + ssim * (1 - SSIM) + lpips * LPIPS; returns the total
    and the individual terms (for logging). Terms with weight 0 are not computed."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0, ssim: float = 1.0, lpips: float = 1.0,
                 data_range: float = 1.0, lpips_alexnet: str | None = None):
        super().__init__()
        if l1 == l2 == ssim == lpips == 0:
            raise UserError("all loss weights are 0; set at least one of --l1_lambda --l2_lambda "
                            "--ssim_lambda --lpips_lambda")
        self.weights = {"l1": l1, "l2": l2, "ssim": ssim, "lpips": lpips}
        self.data_range = data_range
        self.lpips = build_lpips(lpips_alexnet) if lpips > 0 else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        pred, target = pred.float(), target.float()
        terms: dict[str, torch.Tensor] = {}
        if self.weights["l1"]:
            terms["l1"] = F.l1_loss(pred, target)
        if self.weights["l2"]:
            terms["l2"] = F.mse_loss(pred, target)
        if self.weights["ssim"]:
            terms["ssim"] = 1 - ssim_map_mean(pred, target, self.data_range)
        if self.lpips is not None:
            terms["lpips"] = self.lpips(pred, target)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}

