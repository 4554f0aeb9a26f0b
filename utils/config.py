"""The process-wide switches, read or set in this one module: every `EMNET_*` environment
variable, the fast path's memory budget (and the memory the process held before it, which the
budget leaves out) and the input size the heap was last settled for.

Environment variables (read when asked, so a test or a caller may change them):
- `EMNET_CPU_KERNELS=0`: the fast path's C kernels and oneDNN products off (`models/fast/kernels.py`);
- `EMNET_KERNEL_CACHE`: where the C kernels are compiled (default `$XDG_CACHE_HOME/emnet-pytorch`);
- `EMNET_SPILL_DIR`: where feature maps too large for the budget go (`models/fast/spill.py`);
- `EMNET_MAX_MEMORY_GB`: the memory budget when --max_memory is not given (`models/fast/budget.py`);
- `EMNET_NO_DOWNLOAD=1`: never download pretrained weights (`utils/pretrained.py`; the tests set it).
"""
from __future__ import annotations

import os
from pathlib import Path

NO_DOWNLOAD_ENV = "EMNET_NO_DOWNLOAD"

_max_memory_gb: float | None = None  # --max_memory
_baseline_bytes: int | None = None  # resident memory before the first CPU forward
_last_input_shape: tuple[int, ...] | None = None  # of the previous CPU forward (heap trim)


def cpu_kernels_enabled() -> bool:
    """False when EMNET_CPU_KERNELS=0."""
    return os.environ.get("EMNET_CPU_KERNELS", "1") != "0"


def kernel_cache_dir() -> Path:
    """Where compiled kernel libraries are kept."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emnet-pytorch"
    return Path(os.environ.get("EMNET_KERNEL_CACHE", default))


def spill_dir_override() -> str | None:
    """EMNET_SPILL_DIR, or None when it is not set (the spill folder is then chosen)."""
    return os.environ.get("EMNET_SPILL_DIR") or None


def downloads_allowed() -> bool:
    """False when EMNET_NO_DOWNLOAD is set to anything but 0."""
    return os.environ.get(NO_DOWNLOAD_ENV, "") in ("", "0")


def set_max_memory(gb: float | None) -> None:
    """The memory budget in GB for this process (None: the default)."""
    global _max_memory_gb
    if gb is not None and gb <= 0:
        raise ValueError(f"the memory budget must be positive, got {gb} GB")
    _max_memory_gb = gb


def max_memory_gb() -> float:
    """The budget set (--max_memory), else EMNET_MAX_MEMORY_GB, else 0: the device's default."""
    return _max_memory_gb if _max_memory_gb is not None else float(os.environ.get("EMNET_MAX_MEMORY_GB", 0) or 0)


def baseline_bytes() -> int | None:
    """The memory the process held before its first CPU forward (None until measured)."""
    return _baseline_bytes


def set_baseline_bytes(n: int | None) -> None:
    global _baseline_bytes
    _baseline_bytes = n


def input_shape_changed(shape: tuple[int, ...]) -> bool:
    """Record a CPU forward's input shape; whether it differs from the previous one's."""
    global _last_input_shape
    changed = _last_input_shape is not None and shape != _last_input_shape
    _last_input_shape = shape
    return changed
