"""A memory budget for inference: whole-image maps or row strips, and how tall the strips are.

The fast forward's peak memory grows with the pixels and the embedding width C. Measured on the
2-core CPU (peak RSS minus the ~0.5 GB a process holds before the forward, README "Speed"):
- whole image: ~400 * C bytes per pixel (12.8 kB at the published C = 32);
- row strips: the block inputs/outputs and skip maps held whole, ~45 * C bytes per pixel, plus
  the whole-image cost of one strip.
The budget is `--max_memory` GB (`set_max_memory`), else `EMNET_MAX_MEMORY_GB`, else on the CPU
min(4 GB, half the memory available), on CUDA 80 % of the free device memory.
"""
from __future__ import annotations

import os

import torch
from torch import nn

WHOLE_BYTES = 400  # per pixel and channel of C, whole-image forward
HELD_BYTES = 45  # per pixel and channel of C, maps held whole by the strip runner
MIN_STRIP, MAX_STRIP = 2 ** 14, 2 ** 20  # pixels per strip
CPU_DEFAULT_GB = 4.0

_max_memory_gb: float | None = None


def set_max_memory(gb: float | None) -> None:
    """The budget in GB for this process (None: the default)."""
    global _max_memory_gb
    if gb is not None and gb <= 0:
        raise ValueError(f"the memory budget must be positive, got {gb} GB")
    _max_memory_gb = gb


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def budget_bytes(device: torch.device) -> float:
    """The memory the forward of one batch may use on `device`."""
    gb = _max_memory_gb if _max_memory_gb is not None else float(os.environ.get("EMNET_MAX_MEMORY_GB", 0) or 0)
    if gb:
        return gb * 2 ** 30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    available = _available_bytes()
    default = CPU_DEFAULT_GB * 2 ** 30
    return min(default, available / 2) if available else default


def plan_strips(model: nn.Module, x: torch.Tensor) -> int | None:
    """None when the whole-image forward of `x` fits the budget, else the pixels per row strip
    (at least MIN_STRIP: below that the budget cannot be met, and the strips stay that small)."""
    c = model.config.embed_dim
    pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
    budget = budget_bytes(x.device)
    if WHOLE_BYTES * c * pixels <= budget:
        return None
    spare = budget - HELD_BYTES * c * pixels
    return int(min(max(spare / (WHOLE_BYTES * c), MIN_STRIP), MAX_STRIP))
