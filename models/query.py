"""Query encoders of the external memory: an image -> one unit-norm descriptor per image.

- `enhancer` (default, offline): per-channel mean and std of the frozen enhancer's deepest encoder
  features (`forward_features`), 16 * C values (512 for the published C = 32).
- `resnet18`: the original release's frozen ImageNet ResNet-18 without its classifier (512-d), on
  the ImageNet-normalised input; its weights come from a local file, never a download.
An optional learnable `QueryHead` maps either descriptor before it reaches the memory.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.enhancer import EMNetEnhancer
from models.inference import pad_to_multiple
from utils.errors import UserError
from utils.local_weights import find_local_weights

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
QUERY_ENCODERS = ("enhancer", "resnet18")


class EnhancerQuery(nn.Module):
    """Mean and std over space of the enhancer's latent features, L2-normalised."""

    def __init__(self, enhancer: EMNetEnhancer):
        super().__init__()
        self.enhancer = enhancer
        self.dim = 16 * enhancer.config.embed_dim

    CHUNK = 16  # images per encoder pass: bounds memory for the training batches of 128 crops

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._describe(part) for part in x.split(self.CHUNK)])

    def _describe(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.enhancer.forward_features(pad_to_multiple(x)[0])[-1]  # (B, 8C, h, w)
        flat = latent.flatten(2)
        desc = torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)  # (B, 16C)
        return F.normalize(desc.float(), dim=1)


class ResNet18Query(nn.Module):
    """Frozen ImageNet ResNet-18 features (512-d), L2-normalised, as in the original release."""

    dim = 512

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.load_state_dict(state_dict)
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def train(self, mode: bool = True) -> "ResNet18Query":
        return super().train(False)  # always frozen (BatchNorm in eval mode)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((x - self.mean) / self.std).float(), dim=1)


def find_resnet18_weights(path: str | None) -> Path:
    """The local ResNet-18 weights file (`--query_weights` or the torch hub cache)."""
    return find_local_weights(path, RESNET18_FILE, "--query_encoder resnet18", "ResNet-18", "--query_weights",
                              "use --query_encoder enhancer")


def build_query_encoder(name: str, enhancer: EMNetEnhancer | None, weights: str | None) -> nn.Module:
    """The frozen query encoder `name`; `enhancer` is needed for name == 'enhancer'."""
    if name == "enhancer":
        if enhancer is None:
            raise UserError("--query_encoder enhancer needs the enhancer's --weights")
        return EnhancerQuery(enhancer)
    if name == "resnet18":
        path = find_resnet18_weights(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged or foreign file
            raise UserError(f"cannot load {path} ({type(err).__name__}): the file is corrupt or not a "
                            "PyTorch state_dict; pass the file of torchvision.models.resnet18") from None
        try:
            return ResNet18Query(state)
        except (RuntimeError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a torchvision resnet18 state_dict ({type(err).__name__}); "
                            "pass the file of torchvision.models.resnet18") from None
    raise UserError(f"unknown --query_encoder {name!r}; choose one of {QUERY_ENCODERS}")


class QueryHead(nn.Module):
    """Learnable map of the frozen descriptor: x + W x (W starts at zero, so training starts
    from the plain descriptor), then L2-normalised."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q + self.proj(q), dim=1)


def threshold_triplet_loss(query: torch.Tensor, memory_key: torch.Tensor, memory_value: torch.Tensor,
                           target_value: torch.Tensor, threshold: float, margin: float) -> torch.Tensor:
    """Threshold triplet loss of memory-augmented colorization (Yoo et al., CVPR 2019).

    For each query: positive = its highest-scoring slot whose value is within `threshold` (mean
    absolute difference) of the sample's target value, negative = its highest-scoring slot that
    is not; loss = mean relu(s_neg - s_pos + margin) over queries that have both.
    """
    scores = query @ memory_key.t()  # (B, M)
    close = (memory_value[None] - target_value[:, None]).abs().mean(dim=2) < threshold  # (B, M)
    has_both = close.any(dim=1) & (~close).any(dim=1)
    if not has_both.any():
        return query.sum() * 0
    neg_inf = torch.finfo(scores.dtype).min
    s_pos = scores.masked_fill(~close, neg_inf).max(dim=1).values
    s_neg = scores.masked_fill(close, neg_inf).max(dim=1).values
    return F.relu(s_neg - s_pos + margin)[has_both].mean()
