"""The EMNet enhancer: a Restormer-style transformer U-Net (EMNET.md, "Enhancer").

Module and parameter names follow the published checkpoints exactly, so `model_lolv1.pth` loads
unchanged (after its `module.` prefix is stripped).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_kernels, streaming
from models.layout import depthwise3x3, linear, pointwise, to_nchw, to_nhwc


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
    """LayerNorm over the channel axis of a (B, C, H, W) tensor, with weight and bias.

    Same math as Restormer's "WithBias" LayerNorm, which reshapes to (B, HW, C): here that layout
    is the one the blocks keep, so it is one fused `F.layer_norm`. The parameters live in `.body`
    to match the published names.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.body = _Affine(dim)
        self.eps = eps

    def nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise (B, H, W, C)."""
        return F.layer_norm(t, (t.shape[-1],), self.body.weight, self.body.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))


class _Affine(nn.Module):
    """Holds the LayerNorm's weight and bias under the published names."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


# A single-head, single-image q k^T is one tall, thin product; split over pixels into a batch of
# two it ran ~1.5x faster on the 2-core CPU (one product per core). Same sums up to rounding.
PIXEL_SPLITS = 2


class MDTA(nn.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, global over space.

    Per head, attn = softmax(normalise(q) normalise(k)^T * temperature) with q, k L2-normalised over
    all pixels. The only global quantities are the sums over pixels q k^T, |q|^2 and |k|^2
    (`statistics`), so the attention can be computed from them in one piece or accumulated over
    row strips of a large image (models/streaming.py) with the same result.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def qkv_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """q, k, v of a normalised (B, H, W, C) input, concatenated: (B, H, W, 3C)."""
        return depthwise3x3(self.qkv_dwconv.weight, pointwise(self.qkv, t))

    def value_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """Only v (B, H, W, C): the last third of `qkv_nhwc`, at a third of the cost."""
        c = t.shape[-1]
        v = linear(t, self.qkv.weight.flatten(1)[2 * c:])
        return depthwise3x3(self.qkv_dwconv.weight[2 * c:], v)

    def statistics(self, qkv: torch.Tensor, squares: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over pixels, per head: q k^T (B, heads, C/h, C/h), |q|^2 and |k|^2 (B, heads, C/h).

        `squares` (B, 3C), the per-channel sums of qkv^2, saves computing them here.
        """
        b, h, w, c3 = qkv.shape
        d = c3 // (3 * self.heads)
        q, k, _ = qkv.view(b, h * w, 3, self.heads, d).unbind(2)  # (B, HW, heads, C/h)
        q, k = q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3)  # (B, heads, C/h, HW), (B, heads, HW, C/h)
        if b * self.heads == 1 and (h * w) % PIXEL_SPLITS == 0:
            parts = qkv.view(PIXEL_SPLITS, -1, c3)  # strided views: no copies
            gram = torch.bmm(parts[..., :d].transpose(1, 2), parts[..., d:2 * d]).sum(0).view(1, 1, d, d)
        else:
            gram = q @ k
        if squares is None:
            return gram, q.square().sum(-1), k.square().sum(-2)
        squares = squares.view(b, 3, self.heads, d)
        return gram, squares[:, 0], squares[:, 1]

    def attention(self, gram: torch.Tensor, q_sq: torch.Tensor, k_sq: torch.Tensor) -> torch.Tensor:
        """softmax(normalise(q) normalise(k)^T * temperature) from `statistics`: (B, heads, C/h, C/h).

        max(|x|, 1e-12) as in F.normalize; clamping the square keeps the gradient finite at 0.
        """
        q_norm = q_sq.clamp_min(1e-24).sqrt()
        k_norm = k_sq.clamp_min(1e-24).sqrt()
        cos = gram / (q_norm[..., :, None] * k_norm[..., None, :])
        return (cos * self.temperature).softmax(dim=-1)

    def mix(self, attn: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """project_out(attn v) (+ residual) for v (B, H, W, C): (B, H, W, C).

        The attention is one (C/h x C/h) matrix per head and image and the projection a 1x1 conv,
        so both fold into one (C x C) matrix per image: one matrix product per pixel, not two. The
        residual is added inside that product.
        """
        b, h, w, c = v.shape
        proj = self.project_out.weight.view(c, self.heads, c // self.heads)  # (out, heads, C/h)
        fused = torch.einsum("onj,bnjk->bnko", proj, attn).reshape(b, c, c)  # (B, in, out)
        v = v.reshape(b, h * w, c)
        if residual is None:
            return (v @ fused).view(b, h, w, c)
        return torch.baddbmm(residual.reshape(b, h * w, c), v, fused).view(b, h, w, c)

    def nhwc(self, t: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MDTA of a normalised (B, H, W, C) input (+ residual)."""
        qkv = pointwise(self.qkv, t)
        if cpu_kernels.applies((qkv,), (self.qkv_dwconv.weight,)):
            qkv, squares = cpu_kernels.depthwise3x3_squares(qkv, self.qkv_dwconv.weight)
        else:
            qkv, squares = depthwise3x3(self.qkv_dwconv.weight, qkv), None
        attn = self.attention(*self.statistics(qkv, squares))
        return self.mix(attn, qkv[..., 2 * t.shape[-1]:], residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))


GEMM_MULTIPLE = 16  # matrix products with widths that are multiples of 16 run ~2x faster on CPU


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network: gelu(a) * b after a depthwise 3x3 conv.

    On the CPU the hidden width int(dim * 2.66) (85, 170, ...) is zero-padded to a multiple of 16
    inside the forward: the padded channels are exactly 0 (gelu(0) * 0), so the output is unchanged
    and the matrix products are ~2x faster. The stored weights keep the published shapes.
    """

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def padded_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(project_in (2P, C), dwconv (2P, 1, 3, 3), project_out (C, P)) with hidden padded to P."""
        hidden = self.project_out.weight.shape[1]
        extra = -hidden % GEMM_MULTIPLE if self.project_in.weight.device.type == "cpu" else 0
        if not extra:  # GPU libraries have no such penalty; skip the copies
            return self.project_in.weight.flatten(1), self.dwconv.weight, self.project_out.weight.flatten(1)
        w_in = F.pad(self.project_in.weight.view(2, hidden, -1), (0, 0, 0, extra)).flatten(0, 1)
        w_dw = F.pad(self.dwconv.weight.view(2, hidden, 9), (0, 0, 0, extra)).view(-1, 1, 3, 3)
        w_out = F.pad(self.project_out.weight.flatten(1), (0, extra))
        return w_in, w_dw, w_out

    def nhwc(self, t: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """GDFN of a normalised (B, H, W, C) input (+ residual, added inside the last product)."""
        w_in, w_dw, w_out = self.padded_weights()
        p = w_out.shape[1]
        a, b = linear(t, w_in[:p]), linear(t, w_in[p:])  # halves kept apart: contiguous memory
        if cpu_kernels.applies((a, b), (w_dw,)):
            g = cpu_kernels.gated_depthwise3x3(a, b, w_dw[:p], w_dw[p:])
        else:
            g = F.gelu(depthwise3x3(w_dw[:p], a))
            b = depthwise3x3(w_dw[p:], b)
            g = g * b if torch.is_grad_enabled() else g.mul_(b)
        del a, b  # two hidden-width maps, freed before the last product allocates its output
        return linear(g, w_out, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then x + GDFN(LN(x)). Computed channels-last; the output is a (B, C, H, W)
    view of channels-last memory, so the next block needs no copy."""

    def __init__(self, dim: int, heads: int, expansion: float):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = MDTA(dim, heads)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GDFN(dim, expansion)

    def nhwc(self, t: torch.Tensor) -> torch.Tensor:
        t = self.attn.nhwc(self.norm1.nhwc(t), residual=t)
        return self.ffn.nhwc(self.norm2.nhwc(t), residual=t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.nhwc(to_nhwc(x)))


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
    """The enhancer U-Net. Input and output are RGB in [0, 1]; H and W must be multiples of 8
    (use `enhance` in `models.inference` for any size).

    Without gradients, inputs of more than `stream_pixels` pixels are computed in row strips of
    about `strip_pixels` pixels (models/streaming.py): the same result in bounded memory, e.g. a
    12-megapixel photo on a 24 GiB CPU machine. Both are plain attributes; set them per instance.
    """

    stream_pixels: int = 2 ** 21
    strip_pixels: int = 2 ** 18

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
        """Encoder features [level1, level2, level3, latent] at strides 1, 2, 4, 8.

        The memory's `enhancer` query encoder reads the last one.
        """
        if self._streams(x):
            return streaming.forward_features(self, x, self.strip_pixels)
        e1 = self.encoder_level1(self.patch_embed(x))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        latent = self.latent(self.down3_4(e3))
        return [e1, e2, e3, latent]

    def forward_head(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder, refinement and global residual, from `forward_features` of the same input."""
        if self._streams(x):
            return streaming.forward_head(self, x, features, self.strip_pixels)
        e1, e2, e3, latent = features
        d = self.decoder_latent(latent)
        d = self.reduce_chan_level3(torch.cat([self.up4_3(d), e3], 1))
        d = self.decoder_level3(d)
        d = self.reduce_chan_level2(torch.cat([self.up3_2(d), e2], 1))
        d = self.decoder_level2(d)
        d = torch.cat([self.up2_1(d), e1], 1)  # 2C channels, no reduction
        d = self.refinement(self.decoder_level1(d))
        return self.output(d) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x, self.forward_features(x))

    def _streams(self, x: torch.Tensor) -> bool:
        return not torch.is_grad_enabled() and x.shape[-2] * x.shape[-1] > self.stream_pixels
