"""Exact enhancer inference on images whose activations do not fit in memory at once.

The enhancer's attention is global: each block's MDTA needs, per head, three sums over all pixels
(q k^T, |q|^2, |k|^2). Everything else is local: 1x1 convs, LayerNorm, gelu and the 3x3 convs,
which only need one neighbouring row on each side. So each block runs in two passes over row
strips of its input, never holding more than one strip's intermediate tensors:
  1. accumulate the attention sums over all strips (one halo row each side for the 3x3 conv);
  2. with the finished attention, compute each strip's output (two halo rows: one for the v conv,
     one for the feed-forward's conv).
Only the blocks' inputs and outputs are held whole (C x H x W each). The result equals the plain
forward up to floating-point summation order (tests/test_streaming.py).

Tensors here are (B, H, W, C). `strip_pixels` bounds a strip's pixel count at every level.

Whole maps on the CPU live in anonymous memory maps rather than on the malloc heap: with the
GLIBC_TUNABLES setting the scripts use (no mmap, no trimming) freed multi-GB maps of different sizes
were never reused or returned, and a 12-megapixel photo grew past 22 GB; mapped, they are returned
on free. For the same reason the 1x1 convs here are F.linear, not oneDNN (`cpu_kernels.without_onednn`).
"""
from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_kernels
from models.layout import to_nchw, to_nhwc

if TYPE_CHECKING:
    from models.enhancer import EMNetEnhancer, TransformerBlock


def row_spans(height: int, width: int, strip_pixels: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges covering `height`, each of about `strip_pixels` pixels and an even
    number of rows (so 2x pixel (un)shuffles stay aligned)."""
    rows = max(2, strip_pixels // max(width, 1) // 2 * 2)
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)


MAPPED_BYTES = 64 * 2**20  # whole maps at least this large are memory-mapped on the CPU


def empty_map(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of `like`'s dtype and device; large CPU ones memory-mapped."""
    nbytes = like.element_size()
    for n in shape:
        nbytes *= n
    if like.device.type != "cpu" or nbytes < MAPPED_BYTES:
        return like.new_empty(shape)
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    return torch.frombuffer(mmap.mmap(-1, nbytes, **private), dtype=like.dtype).view(shape)


def _halo(r0: int, r1: int, height: int, halo: int) -> tuple[int, int]:
    return max(r0 - halo, 0), min(r1 + halo, height)


def block(blk: "TransformerBlock", t: torch.Tensor, strip_pixels: int) -> torch.Tensor:
    """One transformer block over row strips; the same result as `blk.nhwc(t)`."""
    _, height, width, c = t.shape
    spans = list(row_spans(height, width, strip_pixels))
    sums = None
    for r0, r1 in spans:
        a, b = _halo(r0, r1, height, 1)
        qkv = blk.attn.qkv_nhwc(blk.norm1.nhwc(t[:, a:b]))[:, r0 - a:r1 - a]
        part = blk.attn.statistics(qkv)
        sums = part if sums is None else tuple(s + p for s, p in zip(sums, part))
    attn = blk.attn.attention(*sums)
    out = empty_map(t, t.shape)
    for r0, r1 in spans:
        a, b = _halo(r0, r1, height, 2)
        piece = t[:, a:b]
        y = blk.attn.mix(attn, blk.attn.value_nhwc(blk.norm1.nhwc(piece)), residual=piece)
        ya, _ = _halo(r0, r1, height, 1)  # y is exact on [r0 - 1, r1 + 1) (clipped to the image)
        y = y[:, ya - a:min(r1 + 1, height) - a]
        z = blk.ffn.nhwc(blk.norm2.nhwc(y), residual=y)
        out[:, r0:r1] = z[:, r0 - ya:r1 - ya]
    return out


def stage(blocks: nn.Sequential, t: torch.Tensor, strip_pixels: int) -> torch.Tensor:
    for blk in blocks:
        t = block(blk, t, strip_pixels)
    return t


def _conv3x3_strips(conv: nn.Conv2d, t: torch.Tensor, strip_pixels: int, shuffle: nn.Module | None,
                    scale: float) -> torch.Tensor:
    """`shuffle(conv(t))` over row strips; `scale` is the output/input height ratio."""
    bsz, height, width, _ = t.shape
    out = None
    for r0, r1 in row_spans(height, width, strip_pixels):
        a, b = _halo(r0, r1, height, 1)
        y = conv(to_nchw(t[:, a:b]))[:, :, r0 - a:r1 - a]
        y = to_nhwc(shuffle(y) if shuffle is not None else y)
        if out is None:
            out = empty_map(t, (bsz, int(height * scale), y.shape[2], y.shape[3]))
        out[:, int(r0 * scale):int(r1 * scale)] = y
    return out


def _up_merge(up: nn.Module, d: torch.Tensor, skip: torch.Tensor, reduce: nn.Conv2d | None,
              strip_pixels: int) -> torch.Tensor:
    """reduce(cat(up(d), skip)) (or the plain concatenation), strip by strip at `d`'s level."""
    bsz, height, width, _ = d.shape
    conv, shuffle = up.body
    out = None
    for r0, r1 in row_spans(height, width, strip_pixels):
        a, b = _halo(r0, r1, height, 1)
        y = to_nhwc(shuffle(conv(to_nchw(d[:, a:b]))[:, :, r0 - a:r1 - a]))
        y = torch.cat([y, skip[:, 2 * r0:2 * r1]], dim=-1)
        if reduce is not None:
            y = F.linear(y, reduce.weight.flatten(1))
        if out is None:
            out = empty_map(d, (bsz, 2 * height, 2 * width, y.shape[-1]))
        out[:, 2 * r0:2 * r1] = y
    return out


@torch.no_grad()
@cpu_kernels.without_onednn()
def forward_features(model: "EMNetEnhancer", x: torch.Tensor, strip_pixels: int) -> list[torch.Tensor]:
    """`model.forward_features(x)` with bounded memory."""
    t = _conv3x3_strips(model.patch_embed.proj, to_nhwc(x), strip_pixels, None, 1)
    e1 = stage(model.encoder_level1, t, strip_pixels)
    feats = [e1]
    for down, level in ((model.down1_2, model.encoder_level2), (model.down2_3, model.encoder_level3),
                        (model.down3_4, model.latent)):
        conv, unshuffle = down.body
        feats.append(stage(level, _conv3x3_strips(conv, feats[-1], strip_pixels, unshuffle, 0.5), strip_pixels))
    return [to_nchw(f) for f in feats]


@torch.no_grad()
@cpu_kernels.without_onednn()
def forward_head(model: "EMNetEnhancer", x: torch.Tensor, features: list[torch.Tensor],
                 strip_pixels: int) -> torch.Tensor:
    """`model.forward_head(x, features)` with bounded memory."""
    e1, e2, e3, latent = (to_nhwc(f) for f in features)
    d = stage(model.decoder_latent, latent, strip_pixels)
    d = stage(model.decoder_level3, _up_merge(model.up4_3, d, e3, model.reduce_chan_level3, strip_pixels),
              strip_pixels)
    d = stage(model.decoder_level2, _up_merge(model.up3_2, d, e2, model.reduce_chan_level2, strip_pixels),
              strip_pixels)
    d = stage(model.decoder_level1, _up_merge(model.up2_1, d, e1, None, strip_pixels), strip_pixels)
    d = stage(model.refinement, d, strip_pixels)
    out = _conv3x3_strips(model.output, d, strip_pixels, None, 1)
    return to_nchw(out.add_(to_nhwc(x)))
