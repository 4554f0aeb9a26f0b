"""Run the enhancer on images of any size.

The network runs on the fast path (`models/fast/`), which picks whole-image maps or row strips
for the memory budget. Two paddings happen around the network: a reflected `margin` on every side, so that the
convolutions' zero padding falls outside the picture (without it the outer rows and columns come
out as a thin coloured frame), and a pad to a multiple of 8 at the bottom/right for the three 2x
downsamplings. Both are cropped off the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import fast
from models.enhancer import EMNetEnhancer
from utils.errors import UserError

MULTIPLE = 8  # three 2x downsamplings
BORDER_MARGIN = 8  # default reflected margin (pixels per side); 0 = the original code's behaviour


def check_border_margin(margin: int) -> None:
    """A negative --border_margin is a UserError (0 is the original code's behaviour)."""
    if margin < 0:
        raise UserError(f"--border_margin {margin} must be >= 0 (0 = the original code)")


def _pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflect padding where the image is large enough, replicate otherwise (e.g. a 1x1 image)."""
    if not (left or right or top or bottom):
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(x, (left, right, top, bottom), mode=mode)


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> tuple[torch.Tensor, int, int]:
    """Pad (B, C, H, W) at the bottom/right up to multiples of `multiple`.

    Returns the padded tensor and the original H, W.
    """
    h, w = x.shape[-2:]
    return _pad(x, 0, (-w) % multiple, 0, (-h) % multiple), h, w


def pad_for_network(x: torch.Tensor, margin: int = BORDER_MARGIN) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """The network's input for (B, 3, H, W) of any size: a reflected `margin` on every side, then
    padded to multiples of 8. Returns it and the (rows, columns) slices of the original image."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    h, w = x.shape[-2:]
    x = _pad(x, margin, margin, margin, margin)
    x, _, _ = pad_to_multiple(x)
    return x, (slice(margin, margin + h), slice(margin, margin + w))


@torch.no_grad()
def enhance_with_features(model: EMNetEnhancer, x: torch.Tensor, margin: int = BORDER_MARGIN
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`enhance` plus the encoder features of the same pass (of the padded input), so the
    memory's enhancer query needs no second encoder pass."""
    padded, (rows, cols) = pad_for_network(x, margin)
    plan = fast.plan_for(model, padded)
    features = fast.forward_features(model, padded, plan)
    y = fast.forward_head(model, padded, features, plan)[..., rows, cols]
    return y.float().clamp(0, 1), features


@torch.no_grad()
def enhance(model: EMNetEnhancer, x: torch.Tensor, margin: int = BORDER_MARGIN) -> torch.Tensor:
    """Enhance a (B, 3, H, W) batch in [0, 1] of any H, W; the output has the input's size, is
    clamped to [0, 1] and is float32 (also under a bf16 autocast)."""
    padded, (rows, cols) = pad_for_network(x, margin)
    return fast.forward(model, padded)[..., rows, cols].float().clamp(0, 1)
