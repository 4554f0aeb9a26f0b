"""A memory budget for inference: whole-image maps or row strips, and how tall the strips are.

The fast forward's peak memory grows with the pixels and the embedding width C. Measured on the
2-core CPU with the published weights (peak RSS minus the RSS before the forward, 2026-11-29):
- whole image: 207 bytes per pixel and channel of C typically, up to 291 (the heap's use varies
  from run to run: the largest of 19 runs at 616x416 and 664x496);
- row strips: the block inputs/outputs and skip maps held whole, 31-37 bytes per pixel and C, plus
  54-77 bytes per strip pixel and C (1032x776 at 2^17-2^19 strip pixels, 2000x1504 at 236,000;
  strips on wider maps have proportionally fewer pixels).
When even the held maps exceed the budget, they are spilled to disk (`spill.py`): then only the
strip and the 3-channel maps (input, output) stay in memory, RESIDENT_BYTES per pixel.
The budget is `--max_memory` GB, else the environment's (`utils.config.max_memory_gb`), else on the CPU
min(4 GB, half the memory available), on CUDA 80 % of the free device memory. On the CPU it bounds
the whole process but a trainer's decoded training set: what the process held before its first
forward (PyTorch, the weights: ~0.8 GB) is taken off it.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from models.fast import spill
from utils import config

WHOLE_BYTES = 300  # per pixel and channel of C, whole-image forward (the worst case measured)
HELD_BYTES = 45  # per pixel and channel of C, maps held whole by the strip runner
STRIP_BYTES = 100  # per strip pixel and channel of C
RESIDENT_BYTES = 64  # per pixel (not per channel): input, output and their copies, with spilled maps
# Pixels per strip. Each strip recomputes two halo rows on each side: below ~2^17 pixels that costs
# more than it saves (1032x776: 22.8 s at 2^14, 19.2 s at 2^17, 16.2 s whole); larger strips are
# no faster and only cost memory (1032x776: 19.1-20.4 s at 2^17, 18.9-19.0 s at 2^18, 19.1 s at 2^19).
MIN_STRIP, MAX_STRIP = 2 ** 17, 2 ** 18
CPU_DEFAULT_GB = 4.0

def measure_baseline(held: int = 0) -> None:
    """Take what this process holds now as spent before its forwards (their budget is what the total
    leaves), but for `held` bytes kept for the whole run: a trainer's decoded training set, which
    must not shrink validation's budget. The trainers call it before their first step: the heap
    those steps free and keep (GLIBC_TUNABLES/mallopt: never trimmed) is reused by the validation
    forwards, and counting it left them no budget at all."""
    config.set_baseline_bytes(max(_resident_bytes() - held, 0))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def budget_bytes(device: torch.device) -> float:
    """The memory the forward of one batch may use on `device`."""
    gb = config.max_memory_gb()
    if device.type == "cuda":
        return gb * 2 ** 30 if gb else 0.8 * torch.cuda.mem_get_info(device)[0]
    if gb:
        total = gb * 2 ** 30
    else:
        available = _available_bytes()
        total = min(CPU_DEFAULT_GB * 2 ** 30, available / 2) if available else CPU_DEFAULT_GB * 2 ** 30
    if config.baseline_bytes() is None:  # measured once: later, freed forward memory kept by the heap would count
        config.set_baseline_bytes(_resident_bytes())
    return max(total - config.baseline_bytes(), 0.0)


def plan_strips(model: nn.Module, x: torch.Tensor) -> tuple[int, bool] | None:
    """None when the whole-image forward of `x` fits the budget, else (pixels per row strip, at
    least MIN_STRIP; whether the held maps go to disk). When the held maps do not fit and cannot be
    spilled (not Linux, or not the CPU), a warning says how much memory the input needs."""
    c = model.config.embed_dim
    pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
    budget = budget_bytes(x.device)
    if WHOLE_BYTES * c * pixels <= budget:
        return None
    held = HELD_BYTES * c * pixels
    on_disk = held + STRIP_BYTES * c * MIN_STRIP > budget and x.device.type == "cpu" and spill.available()
    spare = budget - (RESIDENT_BYTES * pixels if on_disk else held)
    strip = int(min(max(spare / (STRIP_BYTES * c), MIN_STRIP), MAX_STRIP))
    need = (RESIDENT_BYTES if on_disk else HELD_BYTES * c) * pixels + STRIP_BYTES * strip * c
    if need > budget:
        warnings.warn(f"a {x.shape[-1]}x{x.shape[-2]} input needs about {need / 2**30:.1f} GB for the enhancer "
                      f"({'its strips' if on_disk else 'its feature maps alone'}), over the "
                      f"{budget / 2**30:.1f} GB budget (--max_memory); it runs anyway", stacklevel=2)
    return strip, on_disk
