"""The EMNet enhancer: a Restormer-style transformer U-Net (docs/METHOD.md, "The enhancer").

This file is the network as the paper and the original code compute it, in (B, C, H, W) and
plain PyTorch ops, so it reads like the method. Module and parameter names follow the published
checkpoints exactly, so `model_lolv1.pth` loads unchanged (after its `module.` prefix is
stripped). Running it fast (channels-last products, C kernels, row strips for large photos) is
`models/fast/`'s job: it computes the same function from these modules' weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EnhancerConfig:
    """Hyper-parameters of the enhancer. The defaults are the published network (12.5M params)."""

    embed_dim: int = 32
    num_blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    num_refinement_blocks: int = 4
    num_latent_decoder_blocks: int = 1
    ffn_expansion_factor: float = 2.66

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_blocks"] = list(self.num_blocks)
        d["heads"] = list(self.heads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnhancerConfig":
        d = dict(d)
        d["num_blocks"] = tuple(d["num_blocks"])
        d["heads"] = tuple(d["heads"])
        return cls(**d)


# Named architectures for `--arch`. `--embed_dim` is applied on top of each.
ARCH_PRESETS: dict[str, EnhancerConfig] = {
    # The published network (use with --embed_dim 32).
    "emnet_enhancer": EnhancerConfig(),
    # CPU-friendly: same topology, fewer blocks per level.
    "emnet_small": EnhancerConfig(num_blocks=(2, 3, 3, 4), num_refinement_blocks=2),
    # Smallest: one block everywhere; for tests and smoke runs.
    "emnet_tiny": EnhancerConfig(num_blocks=(1, 1, 1, 1), num_refinement_blocks=1),
}


def make_config(arch: str, embed_dim: int) -> EnhancerConfig:
    """The config of a named `--arch` with `--embed_dim` applied."""
    if arch not in ARCH_PRESETS:
        raise KeyError(f"unknown --arch {arch!r}; choose one of {sorted(ARCH_PRESETS)}")
    d = ARCH_PRESETS[arch].to_dict()
    d["embed_dim"] = embed_dim
    return EnhancerConfig.from_dict(d)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of (B, C, H, W), with weight and bias (Restormer's
    "WithBias" LayerNorm). The parameters live in `.body` to match the published names."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.body = _Affine(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        t = F.layer_norm(t, self.body.weight.shape, self.body.weight, self.body.bias, self.eps)
        return t.permute(0, 3, 1, 2)


class _Affine(nn.Module):
    """Holds the LayerNorm's weight and bias under the published names."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class MDTA(nn.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, global over space.

    Per head: q, k, v from a 1x1 conv and a depthwise 3x3 conv; q and k L2-normalised over all
    pixels; attn = softmax(q k^T * temperature), a (C/h x C/h) matrix; out = project_out(attn v).
    """

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
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))  # (B, heads, C/h, HW)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network: 1x1 conv to 2 * hidden, depthwise 3x3 conv, split into
    a and b, gelu(a) * b, 1x1 conv back; hidden = int(dim * expansion)."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)  # (B, hidden, H, W) each
        return self.project_out(F.gelu(a) * b)


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim: int, heads: int, expansion: float):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = MDTA(dim, heads)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GDFN(dim, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 conv from RGB to the embedding dimension."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve H and W, double C: 3x3 conv C -> C/2, then PixelUnshuffle(2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double H and W, halve C: 3x3 conv C -> 2C, then PixelShuffle(2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _stage(n: int, dim: int, heads: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, expansion) for _ in range(n)])


class EMNetEnhancer(nn.Module):
    """The enhancer U-Net. Input and output are RGB in [0, 1], (B, 3, H, W) with H and W multiples
    of 8 (`models.inference.enhance` takes any size and runs the fast path)."""

    def __init__(self, config: EnhancerConfig | None = None):
        super().__init__()
        config = config or EnhancerConfig()
        self.config = config
        c, nb, hd, e = config.embed_dim, config.num_blocks, config.heads, config.ffn_expansion_factor
        self.patch_embed = OverlapPatchEmbed(c)
        self.encoder_level1 = _stage(nb[0], c, hd[0], e)
        self.down1_2 = Downsample(c)
        self.encoder_level2 = _stage(nb[1], c * 2, hd[1], e)
        self.down2_3 = Downsample(c * 2)
        self.encoder_level3 = _stage(nb[2], c * 4, hd[2], e)
        self.down3_4 = Downsample(c * 4)
        self.latent = _stage(nb[3], c * 8, hd[3], e)
        self.decoder_latent = _stage(config.num_latent_decoder_blocks, c * 8, hd[3], e)
        self.up4_3 = Upsample(c * 8)
        self.reduce_chan_level3 = nn.Conv2d(c * 8, c * 4, 1, bias=False)
        self.decoder_level3 = _stage(nb[2], c * 4, hd[2], e)
        self.up3_2 = Upsample(c * 4)
        self.reduce_chan_level2 = nn.Conv2d(c * 4, c * 2, 1, bias=False)
        self.decoder_level2 = _stage(nb[1], c * 2, hd[1], e)
        self.up2_1 = Upsample(c * 2)
        self.decoder_level1 = _stage(nb[0], c * 2, hd[0], e)
        self.refinement = _stage(config.num_refinement_blocks, c * 2, hd[0], e)
        self.output = nn.Conv2d(c * 2, 3, 3, padding=1, bias=False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features [level1 (B, C, H, W), level2 (B, 2C, H/2, W/2), level3 (B, 4C, H/4, W/4),
        latent (B, 8C, H/8, W/8)]; the memory's enhancer query describes them."""
        e1 = self.encoder_level1(self.patch_embed(x))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        latent = self.latent(self.down3_4(e3))
        return [e1, e2, e3, latent]

    def forward_head(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder, refinement and global residual (B, 3, H, W), from `forward_features(x)`."""
        e1, e2, e3, latent = features
        d = self.decoder_latent(latent)  # (B, 8C, H/8, W/8)
        d = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(d), e3], 1)))  # 4C at H/4
        d = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d), e2], 1)))  # 2C at H/2
        d = self.decoder_level1(torch.cat([self.up2_1(d), e1], 1))  # 2C at H: no channel reduction
        return self.output(self.refinement(d)) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x, self.forward_features(x))
