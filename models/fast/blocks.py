"""The transformer block of `models/enhancer.py`, computed fast from the same modules' weights.

Channels-last (B, H, W, C) throughout. The attention needs only three sums over pixels, per head:
q k^T, |q|^2 and |k|^2 (`statistics`), so it can be computed in one piece or accumulated over row
strips (`strips.py`) with the same result. The attention and MDTA's output projection fold into
one C x C matrix per image, and the residual adds happen inside the last matrix products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.enhancer import GDFN, MDTA, ChannelLayerNorm, TransformerBlock
from models.fast.ops import depthwise3x3, depthwise3x3_squares, gated_depthwise3x3, linear
from models.fast.policy import Plan

GEMM_MULTIPLE = 16  # matrix products with widths that are multiples of 16 run ~2x faster on CPU
# A single-head, single-image q k^T is one tall, thin product; split over pixels into a batch of
# two it runs ~1.5x faster on a 2-core CPU (one product per core). Same sums up to rounding.
PIXEL_SPLITS = 2


def layer_norm(norm: ChannelLayerNorm, t: torch.Tensor) -> torch.Tensor:
    """`norm` of (B, H, W, C): one fused kernel."""
    return F.layer_norm(t, (t.shape[-1],), norm.body.weight, norm.body.bias, norm.eps)


def query_key(attn: MDTA, t: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q and k of a normalised (B, H, W, C) input, concatenated: (B, H, W, 2C), and, where the C
    kernel runs, the per-channel sums of their squares (B, 2C) from the same pass (else None)."""
    c = t.shape[-1]
    w = attn.qkv.weight.flatten(1)[:2 * c]
    return depthwise3x3_squares(attn.qkv_dwconv.weight[:2 * c], linear(t, w, plan), plan)


def value(attn: MDTA, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """v of a normalised (B, H, W, C) input: (B, H, W, C), contiguous apart from q and k, so the
    output projection reads it as one dense matrix."""
    c = t.shape[-1]
    v = linear(t, attn.qkv.weight.flatten(1)[2 * c:], plan)
    return depthwise3x3(attn.qkv_dwconv.weight[2 * c:], v, plan)


def statistics(attn: MDTA, qk: torch.Tensor, squares: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over pixels, per head: q k^T (B, heads, C/h, C/h), |q|^2 and |k|^2 (B, heads, C/h).

    `squares` (B, 2C), the per-channel sums of qk^2 from the C kernel, saves computing them here.
    """
    b, h, w, c2 = qk.shape
    d = c2 // (2 * attn.heads)
    q, k = qk.view(b, h * w, 2, attn.heads, d).unbind(2)  # (B, HW, heads, C/h)
    q, k = q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3)  # (B, heads, C/h, HW), (B, heads, HW, C/h)
    if b * attn.heads == 1 and (h * w) % PIXEL_SPLITS == 0:
        parts = qk.view(PIXEL_SPLITS, -1, c2)  # strided views: no copies
        gram = torch.bmm(parts[..., :d].transpose(1, 2), parts[..., d:]).sum(0).view(1, 1, d, d)
    else:
        gram = q @ k
    if squares is None:
        return gram, q.square().sum(-1), k.square().sum(-2)
    squares = squares.view(b, 2, attn.heads, d)
    return gram, squares[:, 0], squares[:, 1]


def attention(attn: MDTA, gram: torch.Tensor, q_sq: torch.Tensor, k_sq: torch.Tensor) -> torch.Tensor:
    """softmax(normalise(q) normalise(k)^T * temperature) from `statistics`: (B, heads, C/h, C/h).

    max(|x|, 1e-12) as in F.normalize; clamping the square keeps the gradient finite at 0.
    """
    q_norm = q_sq.clamp_min(1e-24).sqrt()
    k_norm = k_sq.clamp_min(1e-24).sqrt()
    cos = gram / (q_norm[..., :, None] * k_norm[..., None, :])
    return (cos * attn.temperature).softmax(dim=-1)


def mix(attn: MDTA, weights: torch.Tensor, v: torch.Tensor, plan: Plan,
        residual: torch.Tensor | None = None) -> torch.Tensor:
    """project_out(attention v) (+ residual) for v (B, H, W, C): one (C x C) matrix per image, a
    1x1 conv's product for a single image."""
    b, h, w, c = v.shape
    proj = attn.project_out.weight.view(c, attn.heads, c // attn.heads)  # (out, heads, C/h)
    fused = torch.einsum("onj,bnjk->bnko", proj, weights).reshape(b, c, c)  # (B, in, out)
    if b == 1:
        return linear(v, fused[0].t().contiguous(), plan, residual)
    v = v.reshape(b, h * w, c)
    if residual is None:
        return (v @ fused).view(b, h, w, c)
    return torch.baddbmm(residual.reshape(b, h * w, c), v, fused).view(b, h, w, c)


def mdta(attn: MDTA, t: torch.Tensor, plan: Plan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """MDTA of a normalised (B, H, W, C) input (+ residual)."""
    weights = attention(attn, *statistics(attn, *query_key(attn, t, plan)))
    return mix(attn, weights, value(attn, t, plan), plan, residual)


def gdfn_weights(ffn: GDFN, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(project_in (2P, C), dwconv (2P, 1, 3, 3), project_out (C, P)); with `plan.gemm_pad` the
    hidden width is zero-padded to a multiple of 16 (the padded channels are exactly 0)."""
    hidden = ffn.project_out.weight.shape[1]
    extra = -hidden % GEMM_MULTIPLE if plan.gemm_pad else 0
    if not extra:
        return ffn.project_in.weight.flatten(1), ffn.dwconv.weight, ffn.project_out.weight.flatten(1)
    w_in = F.pad(ffn.project_in.weight.view(2, hidden, -1), (0, 0, 0, extra)).flatten(0, 1)
    w_dw = F.pad(ffn.dwconv.weight.view(2, hidden, 9), (0, 0, 0, extra)).view(-1, 1, 3, 3)
    w_out = F.pad(ffn.project_out.weight.flatten(1), (0, extra))
    return w_in, w_dw, w_out


def gdfn(ffn: GDFN, t: torch.Tensor, plan: Plan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """GDFN of a normalised (B, H, W, C) input (+ residual, added inside the last product)."""
    w_in, w_dw, w_out = gdfn_weights(ffn, plan)
    p = w_out.shape[1]
    a, b = linear(t, w_in[:p], plan), linear(t, w_in[p:], plan)  # halves kept apart: contiguous memory
    g = gated_depthwise3x3(a, b, w_dw[:p], w_dw[p:], plan)
    del a, b  # two hidden-width maps, freed before the last product allocates its output
    return linear(g, w_out, plan, residual)


def block(blk: TransformerBlock, t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """x + MDTA(LN(x)), then x + GDFN(LN(x)), on (B, H, W, C)."""
    t = mdta(blk.attn, layer_norm(blk.norm1, t), plan, residual=t)
    return gdfn(blk.ffn, layer_norm(blk.norm2, t), plan, residual=t)
