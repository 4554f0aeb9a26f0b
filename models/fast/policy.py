"""The one place that decides how the enhancer is executed for an input.

- `c_kernels`: the C depthwise kernels (`kernels.py`) on float32 CPU inputs without gradients,
  where they were built (a C compiler exists) and `EMNET_CPU_KERNELS` is not 0; not under a CPU
  autocast (`test.py --amp bf16`), whose bf16 products PyTorch's own ops then run, nor under
  `torch.compile`, which cannot trace them (it compiles the PyTorch ops on whole maps instead);
- `onednn`: oneDNN's matrix products for the 1x1 convs, on the same condition, but not in row
  strips (there, with the scripts' GLIBC_TUNABLES, oneDNN left the heap 2.7 GB larger at 3 MP for
  a ~4 % gain);
- `strips`: row strips of `strip_pixels` (`strips.py`) when the whole-image forward would not fit
  the memory budget (`budget.py`), without gradients only; `spill`: their held maps on disk
  (`spill.py`) when even those do not fit;
- `gemm_pad`: the GDFN's hidden width zero-padded to a multiple of 16 on the CPU, where matrix
  products with such widths run ~2x faster (the padded channels are exactly 0).
Everything else (channels-last layout, fused LayerNorm, folded attention) always applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.fast import kernels
from models.fast.budget import plan_strips
from utils import config


@dataclass(frozen=True)
class Plan:
    """How one forward runs."""

    grad: bool = False
    c_kernels: bool = False
    onednn: bool = False
    gemm_pad: bool = False
    strips: bool = False
    strip_pixels: int = 2 ** 18
    spill: bool = False


def needs_grad(model: nn.Module, x: torch.Tensor) -> bool:
    """True when autograd will record this forward (training, or gradients through the input)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters()))


def plan_for(model: nn.Module, x: torch.Tensor, strip_pixels: int | None = None, spill: bool = False) -> Plan:
    """The plan for `model` on input `x` (B, 3, H, W). `strip_pixels`: None = as the memory
    budget says (`budget.plan_strips`, which also decides `spill`), 0 = whole maps, N = row strips
    of N pixels (`spill`: held maps on disk)."""
    grad = needs_grad(model, x)
    traced = torch.compiler.is_compiling()  # torch.compile: plain PyTorch ops on whole maps, which it fuses
    cpu_fast = (x.device.type == "cpu" and x.dtype == torch.float32 and not grad and config.cpu_kernels_enabled()
                and not torch.is_autocast_enabled("cpu") and not traced)  # the kernels are float32, eager only
    if strip_pixels is None and not grad and not traced:
        strip_pixels, spill = plan_strips(model, x) or (0, False)
    strips = bool(strip_pixels) and not grad
    return Plan(grad=grad, c_kernels=cpu_fast and kernels.library() is not None,
                onednn=cpu_fast and not strips and kernels.onednn_available(),
                gemm_pad=x.device.type == "cpu", strips=strips,
                strip_pixels=strip_pixels if strips else Plan.strip_pixels, spill=strips and spill)
