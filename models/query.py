"""Query encoders of the external memory: an image -> one unit-norm descriptor per image.

- `enhancer` (default, offline): per-channel mean and std of the frozen enhancer's deepest encoder
  features (`forward_features`), 16 * C values (512 for the published C = 32).
- `enhancer_levels`: the same statistics of all four encoder levels, each level's part
  L2-normalised so that every level weighs alike, 30 * C values.
- `resnet18`: the original release's frozen ImageNet ResNet-18 without its classifier (512-d), on
  the ImageNet-normalised input; torchvision's weights (`--query_weights`, the hub cache, or a
  download into it, see `utils.pretrained`).
The enhancer descriptors are made from the features of the enhancer pass that produces the
output (`describe_features`), so the memory costs no second encoder pass.
An optional learnable `QueryHead` maps any descriptor before it reaches the memory.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import fast
from models.enhancer import EMNetEnhancer
from models.inference import BORDER_MARGIN, pad_for_network
from utils.errors import UserError
from utils.pretrained import pretrained_state_dict

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1
ENHANCER_DESCRIPTORS = {"enhancer": 16, "enhancer_levels": 30}  # name -> width in units of C
QUERY_ENCODERS = (*ENHANCER_DESCRIPTORS, "resnet18")


def describe(means: list[torch.Tensor], stds: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The unit-norm descriptor `kind` (B, D) from per-level statistics (`fast.feature_statistics`)."""
    if kind == "enhancer":
        return F.normalize(torch.cat([means[-1], stds[-1]], dim=1), dim=1)
    if kind == "enhancer_levels":
        parts = [F.normalize(torch.cat([m, s], dim=1), dim=1) for m, s in zip(means, stds)]
        return F.normalize(torch.cat(parts, dim=1), dim=1)
    raise ValueError(f"unknown enhancer descriptor {kind!r}; choose one of {list(ENHANCER_DESCRIPTORS)}")


def describe_features(features: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The descriptor `kind` of `forward_features` output (one enhancer pass)."""
    return describe(*fast.feature_statistics(features), kind)


class EnhancerQuery(nn.Module):
    """A descriptor of the frozen enhancer's encoder features (of the input padded as `enhance`
    pads it), for inputs without a pass of their own (training crops)."""

    CHUNK = 16  # images per encoder pass: bounds memory for the training batches of 128 crops

    def __init__(self, enhancer: EMNetEnhancer, kind: str = "enhancer", margin: int = BORDER_MARGIN):
        super().__init__()
        self.enhancer, self.kind, self.margin = enhancer, kind, margin
        self.dim = ENHANCER_DESCRIPTORS[kind] * enhancer.config.embed_dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.from_features(fast.forward_features(self.enhancer, pad_for_network(part, self.margin)[0]))
                          for part in x.split(self.CHUNK)])

    def from_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The query of an input whose `forward_features` were computed already."""
        return describe_features(features, self.kind)


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


def build_query_encoder(name: str, enhancer: EMNetEnhancer | None, weights: str | None) -> nn.Module:
    """The frozen query encoder `name`; `enhancer` is needed for the enhancer descriptors."""
    if name in ENHANCER_DESCRIPTORS:
        if enhancer is None:
            raise UserError(f"--query_encoder {name} needs the enhancer's --weights")
        return EnhancerQuery(enhancer, name)
    if name == "resnet18":
        state = pretrained_state_dict(RESNET18_URL, weights, "ResNet-18", "--query_encoder resnet18",
                                      "--query_weights", "use --query_encoder enhancer_levels")
        try:
            return ResNet18Query(state)
        except (RuntimeError, KeyError, TypeError) as err:
            raise UserError(f"{weights or Path(RESNET18_URL).name} is not a torchvision resnet18 state_dict "
                            f"({type(err).__name__}); pass the file of torchvision.models.resnet18") from None
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
