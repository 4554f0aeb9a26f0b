"""The enhancer's U-Net wiring, written once for the fast path and followed by both runners:
`WholeMaps` (here: each step on whole (B, H, W, C) maps) and `strips.RowStrips` (each step over
row strips, for photos whose activations do not fit in memory at once).

A runner (`Runner`) provides the four steps the wiring is made of.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from models.enhancer import EMNetEnhancer
from models.fast.blocks import block
from models.fast.ops import linear, to_nchw, to_nhwc
from models.fast.policy import Plan


class Runner(Protocol):
    """How the U-Net's steps are computed on channels-last (B, H, W, C) maps."""

    def stage(self, blocks: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
        """A sequence of transformer blocks."""

    def conv3x3(self, conv: nn.Conv2d, t: torch.Tensor, shuffle: nn.Module | None = None) -> torch.Tensor:
        """A 3x3 conv, optionally followed by a pixel (un)shuffle."""

    def merge(self, up: nn.Sequential, d: torch.Tensor, skip: torch.Tensor, reduce: nn.Conv2d | None) -> torch.Tensor:
        """Upsample `d`, concatenate the skip connection, optionally reduce with a 1x1 conv."""

    def output(self, conv: nn.Conv2d, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The last 3x3 conv plus the input image: (B, 3, H, W)."""


class WholeMaps:
    """Every step on whole maps."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def stage(self, blocks: nn.Sequential, t: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            t = block(blk, t, self.plan)
        return t

    def conv3x3(self, conv: nn.Conv2d, t: torch.Tensor, shuffle: nn.Module | None = None) -> torch.Tensor:
        y = conv(to_nchw(t))
        return to_nhwc(shuffle(y) if shuffle is not None else y)

    def merge(self, up: nn.Sequential, d: torch.Tensor, skip: torch.Tensor, reduce: nn.Conv2d | None) -> torch.Tensor:
        conv, shuffle = up
        y = torch.cat([self.conv3x3(conv, d, shuffle), skip], dim=-1)
        return linear(y, reduce.weight.flatten(1), self.plan) if reduce is not None else y

    def output(self, conv: nn.Conv2d, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return conv(to_nchw(d)) + x


def features(model: EMNetEnhancer, x: torch.Tensor, run: Runner) -> list[torch.Tensor]:
    """Encoder features [e1, e2, e3, latent] as (B, H, W, C) maps."""
    feats = [run.stage(model.encoder_level1, run.conv3x3(model.patch_embed.proj, to_nhwc(x)))]
    for down, level in ((model.down1_2, model.encoder_level2), (model.down2_3, model.encoder_level3),
                        (model.down3_4, model.latent)):
        conv, unshuffle = down.body
        feats.append(run.stage(level, run.conv3x3(conv, feats[-1], unshuffle)))
    return feats


def head(model: EMNetEnhancer, x: torch.Tensor, feats: list[torch.Tensor], run: Runner) -> torch.Tensor:
    """Decoder, refinement and global residual from `features`: (B, 3, H, W)."""
    e1, e2, e3, latent = feats
    d = run.stage(model.decoder_latent, latent)
    d = run.stage(model.decoder_level3, run.merge(model.up4_3.body, d, e3, model.reduce_chan_level3))
    d = run.stage(model.decoder_level2, run.merge(model.up3_2.body, d, e2, model.reduce_chan_level2))
    d = run.stage(model.decoder_level1, run.merge(model.up2_1.body, d, e1, None))
    d = run.stage(model.refinement, d)
    return run.output(model.output, d, x)
