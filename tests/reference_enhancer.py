"""The enhancer written the straightforward way, as the original EMNet/Restormer code computes it:
the formulation of EMNET.md, line by line, with no attention to speed.

It has the same parameter names as `models.enhancer.EMNetEnhancer`, so one state_dict loads into
both. The tests use it to prove that the fast forward computes the same function, and
`benchmarks/bench_inference.py` uses it as the "original code" speed baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.enhancer import EnhancerConfig


class ReferenceLayerNorm(nn.Module):
    """WithBias LayerNorm: reshape (B, C, H, W) -> (B, HW, C), normalise the last axis, reshape back."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = _ReferenceAffine(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, keepdim=True, unbiased=False)
        t = (t - mu) / torch.sqrt(var + 1e-5) * self.body.weight + self.body.bias
        return t.transpose(1, 2).reshape(b, c, h, w)


class _ReferenceAffine(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class ReferenceAttention(nn.Module):
    """MDTA: 1x1 conv to 3C, depthwise 3x3, per head softmax(norm(q) norm(k)^T * t) v, 1x1 out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class ReferenceFeedForward(nn.Module):
    """GDFN: 1x1 conv to 2 * hidden, depthwise 3x3, gelu(a) * b, 1x1 conv back."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int, expansion: float):
        super().__init__()
        self.norm1 = ReferenceLayerNorm(dim)
        self.attn = ReferenceAttention(dim, heads)
        self.norm2 = ReferenceLayerNorm(dim)
        self.ffn = ReferenceFeedForward(dim, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class _Embed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Resample(nn.Module):
    def __init__(self, conv: nn.Conv2d, shuffle: nn.Module):
        super().__init__()
        self.body = nn.Sequential(conv, shuffle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _down(dim: int) -> _Resample:
    return _Resample(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


def _up(dim: int) -> _Resample:
    return _Resample(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


def _stage(n: int, dim: int, heads: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*[ReferenceBlock(dim, heads, expansion) for _ in range(n)])


class ReferenceEnhancer(nn.Module):
    """The U-Net of EMNET.md, computed in (B, C, H, W) throughout."""

    def __init__(self, config: EnhancerConfig | None = None):
        super().__init__()
        config = config or EnhancerConfig()
        c, nb, hd, e = config.embed_dim, config.num_blocks, config.heads, config.ffn_expansion_factor
        self.patch_embed = _Embed(c)
        self.encoder_level1 = _stage(nb[0], c, hd[0], e)
        self.down1_2 = _down(c)
        self.encoder_level2 = _stage(nb[1], c * 2, hd[1], e)
        self.down2_3 = _down(c * 2)
        self.encoder_level3 = _stage(nb[2], c * 4, hd[2], e)
        self.down3_4 = _down(c * 4)
        self.latent = _stage(nb[3], c * 8, hd[3], e)
        self.decoder_latent = _stage(config.num_latent_decoder_blocks, c * 8, hd[3], e)
        self.up4_3 = _up(c * 8)
        self.reduce_chan_level3 = nn.Conv2d(c * 8, c * 4, 1, bias=False)
        self.decoder_level3 = _stage(nb[2], c * 4, hd[2], e)
        self.up3_2 = _up(c * 4)
        self.reduce_chan_level2 = nn.Conv2d(c * 4, c * 2, 1, bias=False)
        self.decoder_level2 = _stage(nb[1], c * 2, hd[1], e)
        self.up2_1 = _up(c * 2)
        self.decoder_level1 = _stage(nb[0], c * 2, hd[0], e)
        self.refinement = _stage(config.num_refinement_blocks, c * 2, hd[0], e)
        self.output = nn.Conv2d(c * 2, 3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.encoder_level1(self.patch_embed(x))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        d = self.decoder_latent(self.latent(self.down3_4(e3)))
        d = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(d), e3], 1)))
        d = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d), e2], 1)))
        d = self.refinement(self.decoder_level1(torch.cat([self.up2_1(d), e1], 1)))
        return self.output(d) + x
