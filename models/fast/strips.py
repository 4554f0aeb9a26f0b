"""Exact enhancer inference on photos whose activations do not fit in memory at once: the
`RowStrips` runner of `unet.py`.

The enhancer's attention is global: each block's MDTA needs, per head, three sums over all pixels
(q k^T, |q|^2, |k|^2). Everything else is local: 1x1 convs, LayerNorm, gelu and the 3x3 convs,
which only need one neighbouring row on each side. So each block runs in two passes over row
strips of its input, never holding more than one strip's intermediate tensors:
  1. accumulate the attention sums over all strips (one halo row each side for the 3x3 conv);
  2. with the finished attention, compute each strip's output (two halo rows: one for the v conv,
     one for the feed-forward's conv).
Only the blocks' inputs and outputs are held whole (C x H x W each). The result equals the
whole-image forward up to floating-point summation order (tests/test_fast_forward.py).

Whole maps on the CPU live in anonymous memory maps rather than on the malloc heap: with the
GLIBC_TUNABLES setting the scripts use (no mmap, no trimming) freed multi-GB maps of different sizes
were never reused or returned, and a 12-megapixel photo grew past 22 GB; mapped, they are returned
on free. When even the held maps exceed the memory budget (`plan.spill`), they are kept on disk
(`spill.py`) and every step hands back the rows it has read or written.
"""
from __future__ import annotations

import mmap
from typing import Iterator

import torch
from torch import nn

from models.enhancer import TransformerBlock
from models.fast import spill
from models.fast.blocks import attention, gdfn, layer_norm, mix, query_key, statistics, value
from models.fast.ops import linear, to_nchw, to_nhwc
from models.fast.policy import Plan

MAPPED_BYTES = 64 * 2**20  # whole maps at least this large are memory-mapped on the CPU


def row_spans(height: int, width: int, strip_pixels: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges covering `height`, each of about `strip_pixels` pixels and an even
    number of rows (so 2x pixel (un)shuffles stay aligned)."""
    rows = max(2, strip_pixels // max(width, 1) // 2 * 2)
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)


def empty_map(like: torch.Tensor, shape: tuple[int, ...], on_disk: bool = False) -> torch.Tensor:
    """An uninitialised tensor of `like`'s dtype and device; large CPU ones memory-mapped,
    `on_disk` in the spill folder."""
    nbytes = like.element_size()
    for n in shape:
        nbytes *= n
    if like.device.type != "cpu" or nbytes < MAPPED_BYTES:
        return like.new_empty(shape)
    if on_disk:
        return spill.empty(shape, like.dtype)
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    return torch.frombuffer(mmap.mmap(-1, nbytes, **private), dtype=like.dtype).view(shape)


def _halo(r0: int, r1: int, height: int, halo: int) -> tuple[int, int]:
    return max(r0 - halo, 0), min(r1 + halo, height)


class RowStrips:
    """Every step of `unet.py` over row strips: `plan.strip_pixels` pixels on maps of `channels`
    channels (the first level), proportionally fewer on wider maps, so that a strip's working
    memory is about the same at every level."""

    def __init__(self, plan: Plan, channels: int):
        self.plan = plan
        self.strip_pixels = plan.strip_pixels
        self.channels = channels

    def _spans(self, t: torch.Tensor) -> list[tuple[int, int]]:
        _, height, width, channels = t.shape
        return list(row_spans(height, width, max(1, self.strip_pixels * self.channels // channels)))

    def _new(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return empty_map(like, shape, on_disk=self.plan.spill)

    def _done(self, *views: torch.Tensor) -> None:
        """Rows a step has finished reading or writing leave the process's memory when spilled."""
        if self.plan.spill:
            for v in views:
                spill.release(v)

    def block(self, blk: TransformerBlock, t: torch.Tensor) -> torch.Tensor:
        """One transformer block over row strips; the same result as `blocks.block`."""
        height = t.shape[1]
        spans = self._spans(t)
        sums = None
        for r0, r1 in spans:
            a, b = _halo(r0, r1, height, 1)
            qk, _ = query_key(blk.attn, layer_norm(blk.norm1, t[:, a:b]), self.plan)
            part = statistics(blk.attn, qk[:, r0 - a:r1 - a])
            sums = part if sums is None else tuple(s + p for s, p in zip(sums, part))
            self._done(t[:, a:b])
        weights = attention(blk.attn, *sums)
        out = self._new(t, t.shape)
        for r0, r1 in spans:
            a, b = _halo(r0, r1, height, 2)
            piece = t[:, a:b]
            y = mix(blk.attn, weights, value(blk.attn, layer_norm(blk.norm1, piece), self.plan), self.plan, residual=piece)
            ya, _ = _halo(r0, r1, height, 1)  # y is exact on [r0 - 1, r1 + 1) (clipped to the image)
            y = y[:, ya - a:min(r1 + 1, height) - a]
            z = gdfn(blk.ffn, layer_norm(blk.norm2, y), self.plan, residual=y)
            out[:, r0:r1] = z[:, r0 - ya:r1 - ya]
            self._done(piece, out[:, r0:r1])
        return out

    def stage(self, blocks: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            t = self.block(blk, t)
        return t

    def conv3x3(self, conv: nn.Conv2d, t: torch.Tensor, shuffle: nn.Module | None = None) -> torch.Tensor:
        """`shuffle(conv(t))` strip by strip (one halo row each side)."""
        bsz, height = t.shape[:2]
        out = None
        for r0, r1 in self._spans(t):
            a, b = _halo(r0, r1, height, 1)
            y = conv(to_nchw(t[:, a:b]))[:, :, r0 - a:r1 - a]
            y = to_nhwc(shuffle(y) if shuffle is not None else y)
            scale = y.shape[1] / (r1 - r0)  # output/input height ratio
            if out is None:
                out = self._new(t, (bsz, int(height * scale), y.shape[2], y.shape[3]))
            out[:, int(r0 * scale):int(r1 * scale)] = y
            self._done(t[:, a:b], out[:, int(r0 * scale):int(r1 * scale)])
        return out

    def merge(self, up: nn.Sequential, d: torch.Tensor, skip: torch.Tensor, reduce: nn.Conv2d | None) -> torch.Tensor:
        """reduce(cat(up(d), skip)) (or the plain concatenation), strip by strip at `d`'s level."""
        bsz, height, width, _ = d.shape
        conv, shuffle = up
        out = None
        for r0, r1 in self._spans(d):
            a, b = _halo(r0, r1, height, 1)
            y = to_nhwc(shuffle(conv(to_nchw(d[:, a:b]))[:, :, r0 - a:r1 - a]))
            y = torch.cat([y, skip[:, 2 * r0:2 * r1]], dim=-1)
            if reduce is not None:
                y = linear(y, reduce.weight.flatten(1), self.plan)
            if out is None:
                out = self._new(d, (bsz, 2 * height, 2 * width, y.shape[-1]))
            out[:, 2 * r0:2 * r1] = y
            self._done(d[:, a:b], skip[:, 2 * r0:2 * r1], out[:, 2 * r0:2 * r1])
        return out

    def output(self, conv: nn.Conv2d, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(self.conv3x3(conv, d).add_(to_nhwc(x)))
