"""glibc's allocator tuned for PyTorch from inside the process, however a script is started.

By default glibc serves large blocks with mmap and returns freed memory to the OS at once, so
every CPU forward page-faults its multi-MB tensors in anew: `python test.py` on eval15 ran 1.9x
slower than the same command under the shell scripts' `GLIBC_TUNABLES` (no mmap, no trimming).
`tune_allocator` sets the same two settings with `mallopt` (`M_MMAP_MAX` = 0, `M_TRIM_THRESHOLD` =
-1, which glibc documents as "never trim"), on Linux with glibc only; elsewhere it does nothing.
A `GLIBC_TUNABLES` that names malloc settings is the user's choice and is left alone.
`models/fast/heap.py` still hands freed memory back when the input size changes.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep freed memory on the heap and never mmap (call at the start of an entry script, before
    the first tensor). True when both settings were applied."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
