"""Executing `models/enhancer.py` fast: the same function, computed from the same weights.

- `policy.py` decides, per input, which implementation runs (device, dtype, gradients, the
  `EMNET_CPU_KERNELS` switch, the memory budget of `budget.py`);
- `kernels.py` builds and loads the C kernels (and wraps oneDNN's product);
- `heap.py` returns freed memory to the OS when the input size changes;
- `spill.py` keeps the strip runner's whole maps on disk when they exceed the budget (callers ask
  `feature_statistics`, which reads spilled maps in chunks, never the files);
- `ops.py` and `blocks.py` compute the transformer block channels-last;
- `unet.py` holds the U-Net wiring once, followed on whole maps (`unet.WholeMaps`) or over row
  strips (`strips.RowStrips`).
Switches (the CPU kernels, the memory budget) live in `utils/config.py`.
Entry points take the plain model: `forward`, `forward_features`, `forward_head`,
`feature_statistics` and `FastForward`, a module to train through (gradients flow through the channels-last PyTorch ops).
"""
from __future__ import annotations

import torch
from torch import nn

from models.enhancer import EMNetEnhancer
from models.fast import heap, spill, unet
from models.fast.ops import to_nchw, to_nhwc
from models.fast.policy import Plan, plan_for
from models.fast.strips import RowStrips


def _runner(plan: Plan, model: EMNetEnhancer) -> unet.Runner:
    return RowStrips(plan, model.config.embed_dim) if plan.strips else unet.WholeMaps(plan)


def forward_features(model: EMNetEnhancer, x: torch.Tensor, plan: Plan | None = None) -> list[torch.Tensor]:
    """`model.forward_features(x)`, fast: (B, C_l, h, w) views of channels-last maps."""
    plan = plan or plan_for(model, x)
    if x.device.type == "cpu" and not plan.grad and not torch.compiler.is_compiling():
        heap.settle(tuple(x.shape))
    return [to_nchw(f) for f in unet.features(model, x, _runner(plan, model))]


def forward_head(model: EMNetEnhancer, x: torch.Tensor, features: list[torch.Tensor],
                 plan: Plan | None = None) -> torch.Tensor:
    """`model.forward_head(x, features)`, fast."""
    plan = plan or plan_for(model, x)
    return unet.head(model, x, [to_nhwc(f) for f in features], _runner(plan, model))


def forward(model: EMNetEnhancer, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
    """`model(x)`, fast."""
    plan = plan or plan_for(model, x)
    return forward_head(model, x, forward_features(model, x, plan), plan)


def feature_statistics(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the mean and the std over space of (B, C_l, h, w) features (`forward_features`'s):
    two lists of (B, C_l) float32 tensors. Maps spilled to disk are read in row chunks."""
    if any(spill.is_spilled(f) for f in features):
        stats = [spill.chunk_statistics(f) for f in features]
        return [mean for mean, _ in stats], [std for _, std in stats]
    flat = [f.float().flatten(2) for f in features]
    return [f.mean(dim=2) for f in flat], [f.std(dim=2, unbiased=False) for f in flat]


class FastForward(nn.Module):
    """`model` whose forward runs the fast path: what the trainer wraps (also in DDP). Its
    state_dict is the model's, under `model.`; save `.model` itself."""

    def __init__(self, model: EMNetEnhancer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x)
