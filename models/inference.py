"""Run the enhancer on images of any size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MULTIPLE = 8  # three 2x downsamplings


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> tuple[torch.Tensor, int, int]:
    """Pad (B, C, H, W) at the bottom/right up to multiples of `multiple`.

    Reflect padding where the image is large enough, replicate otherwise (e.g. a 1x1 image).
    Returns the padded tensor and the original H, W.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


@torch.no_grad()
def enhance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Enhance a (B, 3, H, W) batch in [0, 1] of any H, W; the output has the input's size, is
    clamped to [0, 1] and is float32 (also under a bf16 autocast)."""
    padded, h, w = pad_to_multiple(x)
    return model(padded)[..., :h, :w].float().clamp(0, 1)
