"""Channels-last helpers shared by the enhancer and its streamed (large-image) forward.

The blocks compute in (B, H, W, C): LayerNorm over channels is then one fused kernel and every
1x1 conv is one matrix product, with no layout round trips.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_kernels


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when `x` is already channels-last in memory."""
    t = x.permute(0, 2, 3, 1)
    return t if t.is_contiguous() else t.contiguous()


def to_nchw(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, C, H, W) view stored channels-last (no copy)."""
    return t.permute(0, 3, 1, 2)


def linear(t: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """t @ weight^T (+ residual) over the last axis: a bias-free 1x1 conv on (B, H, W, C).

    Without gradients on a CPU this is oneDNN's product (models/cpu_kernels.py), else F.linear or
    one addmm with the residual added inside.
    """
    if cpu_kernels.onednn_applies((t, weight) if residual is None else (t, weight, residual)):
        return cpu_kernels.onednn_linear(t, weight, residual)
    if residual is None:
        return F.linear(t, weight)
    c = weight.shape[0]
    return torch.addmm(residual.reshape(-1, c), t.reshape(-1, t.shape[-1]), weight.t()).view(residual.shape)


def pointwise(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 conv on (B, H, W, C): one matrix product (PyTorch's CPU 1x1 conv is slower)."""
    return linear(t, conv.weight.flatten(1))


def depthwise3x3(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 conv with zero padding on (B, H, W, C), `weight` (C, 1, 3, 3)."""
    if cpu_kernels.applies((t,), (weight,)):
        return cpu_kernels.depthwise3x3(t, weight)
    return to_nhwc(F.conv2d(to_nchw(t), weight, padding=1, groups=weight.shape[0]))
