"""LPIPS v0.1 with an AlexNet backbone (Zhang et al., CVPR 2018): a training loss and a metric.

As a metric the inputs in [0, 1] are scaled to [-1, 1], as the `lpips` package does with
`normalize=True`; as the training loss of the original release they go in as they are (`scale_inputs`
False: its input normalisation, made for [-1, 1], then sees [0, 1] images). The ImageNet
AlexNet comes from torchvision's weights API (`utils.pretrained`) or a local file (`--lpips_alexnet`);
the v0.1 linear weights are the `lpips` package's files.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.pretrained import pretrained_state_dict

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # AlexNet_Weights.IMAGENET1K_V1
ALEXNET_FILE = Path(ALEXNET_URL).name
LPIPS_CONVENTION = ("LPIPS v0.1, AlexNet backbone with the lpips package's linear weights, on the rounded "
                    "8-bit images scaled to [-1, 1] (lpips normalize=True), spatial average; lower is better")


class LPIPS(nn.Module):
    """Frozen LPIPS distance, averaged over the batch.

    Distance = sum over five ReLU taps of the spatial mean of a learned 1x1 weighting of the
    squared difference of channel-normalised features.
    """

    TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in torchvision's alexnet().features

    def __init__(self, alexnet_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor],
                 scale_inputs: bool = True):
        super().__init__()
        self.scale_inputs = scale_inputs
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
        x = ((2 * x - 1 if self.scale_inputs else x) - self.shift) / self.scale
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


def lpips_linear_file() -> Path:
    """The `lpips` package's v0.1 AlexNet linear weights."""
    try:
        import lpips  # only for the file of linear weights it ships
    except ImportError:
        raise UserError("LPIPS needs the `lpips` package for its linear weights: pip install lpips") from None
    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def alexnet_state(path: str | None, fallback: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet AlexNet: `--lpips_alexnet` PATH, the hub cache or a download."""
    return pretrained_state_dict(ALEXNET_URL, path, "AlexNet", "LPIPS", "--lpips_alexnet", fallback)


def build_lpips(alexnet_path: str | None, fallback: str, scale_inputs: bool = True) -> LPIPS:
    """LPIPS with torchvision's AlexNet; `fallback` says how to do without it (in the error).
    `scale_inputs` False feeds [0, 1] images unscaled, as the original release's training loss."""
    alex = alexnet_state(alexnet_path, fallback)
    lin = torch.load(lpips_linear_file(), map_location="cpu", weights_only=True)
    try:
        return LPIPS(alex, lin, scale_inputs)
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"{alexnet_path or ALEXNET_FILE} is not a torchvision alexnet state_dict "
                        f"({type(err).__name__}); pass the file of torchvision.models.alexnet") from None
