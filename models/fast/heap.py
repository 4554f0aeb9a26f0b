"""Handing the freed heap back to the OS when the input size changes (glibc on Linux).

The scripts set GLIBC_TUNABLES so that glibc keeps freed memory (2-3x faster PyTorch on the CPU).
Images of one size reuse that memory exactly; a folder of mixed sizes fragments it, and the
process grew past its largest image's peak. So before a forward whose input size differs from
the previous one, `malloc_trim(0)` returns every free page; same-size runs never pay for it.
"""
from __future__ import annotations

import ctypes
import sys
from functools import lru_cache

from utils import config


@lru_cache(maxsize=None)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def settle(shape: tuple[int, ...]) -> bool:
    """Call before a CPU forward of an input of `shape`; True when the heap was trimmed."""
    changed = config.input_shape_changed(shape)
    trim = _malloc_trim()
    if changed and trim is not None:
        trim(0)
        return True
    return False
