"""Pick the compute device from `--device auto|cpu|cuda|mps`."""
from __future__ import annotations

import torch

from utils.errors import UserError


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: CUDA's allocated peak (reset it with
    torch.cuda.reset_peak_memory_stats), else the peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # POSIX only: imported here so the CPU/MPS paths elsewhere stay portable

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA, then Apple's MPS, then the CPU; an unavailable choice is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this PyTorch has no MPS; use --device cpu")
    return torch.device(name)
