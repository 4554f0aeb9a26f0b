"""Channels-last ops of the fast path, each choosing its implementation from the `Plan`.

The blocks compute in (B, H, W, C): LayerNorm over channels is then one fused kernel and every
1x1 conv one matrix product, with no layout round trips.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.fast import kernels
from models.fast.policy import Plan


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when `x` is already channels-last in memory."""
    t = x.permute(0, 2, 3, 1)
    return t if t.is_contiguous() else t.contiguous()


def to_nchw(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, C, H, W) view stored channels-last (no copy)."""
    return t.permute(0, 3, 1, 2)


def linear(t: torch.Tensor, weight: torch.Tensor, plan: Plan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """t @ weight^T (+ residual) over the last axis: a bias-free 1x1 conv on (B, H, W, C), with
    the residual added inside the product (oneDNN's product, or one addmm)."""
    if plan.onednn:
        return kernels.onednn_linear(t, weight, residual)
    if residual is None:
        return F.linear(t, weight)
    c = weight.shape[0]
    return torch.addmm(residual.reshape(-1, c), t.reshape(-1, t.shape[-1]), weight.t()).view(residual.shape)


def _kernel_fits(plan: Plan, *ts: torch.Tensor) -> bool:
    return plan.c_kernels and all(t.is_contiguous() and t.shape[-1] % kernels.CHANNEL_MULTIPLE == 0 for t in ts)


def depthwise3x3(weight: torch.Tensor, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Depthwise 3x3 conv with zero padding on (B, H, W, C), `weight` (C, 1, 3, 3)."""
    if _kernel_fits(plan, t):
        return kernels.depthwise3x3(t, weight)
    return to_nhwc(F.conv2d(to_nchw(t), weight, padding=1, groups=weight.shape[0]))


def depthwise3x3_squares(weight: torch.Tensor, t: torch.Tensor, plan: Plan
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`depthwise3x3` and, where the C kernel runs, the per-channel sums of its squares (B, C)
    computed in the same pass (else None)."""
    if _kernel_fits(plan, t):
        return kernels.depthwise3x3_squares(t, weight)
    return depthwise3x3(weight, t, plan), None


def gated_depthwise3x3(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor,
                       plan: Plan) -> torch.Tensor:
    """gelu(depthwise3x3(a, wa)) * depthwise3x3(b, wb) for (B, H, W, P) a and b."""
    if _kernel_fits(plan, a, b):
        return kernels.gated_depthwise3x3(a, b, wa, wb)
    g = F.gelu(depthwise3x3(wa, a, plan))
    b = depthwise3x3(wb, b, plan)
    return g * b if plan.grad else g.mul_(b)
