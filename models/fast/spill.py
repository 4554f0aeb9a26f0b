"""Feature maps kept on disk: what lets a photo whose maps exceed the memory budget run anyway.

The strip runner (`strips.py`) holds each block's input and output whole: about 37 bytes per
pixel and channel of C, 14 GB for a 12-megapixel photo at C = 32. With spilling, those maps are
shared memory maps of unlinked files in the spill folder, and each strip step hands the rows it
has read or written back with `release` (madvise MADV_DONTNEED). The data stay in the file (the
kernel's page cache, written to disk when memory is short), so only the strip being worked on
counts in the process's memory. Reading a released row again faults it back in from the cache.

The folder is the one the environment names (`utils.config.spill_dir_override`), else the system's temporary folder, unless that lives in memory
(tmpfs, as /tmp on Fedora or Arch: spilling there would save nothing), then /var/tmp. Its space is
reserved when a map is made (posix_fallocate), so a full disk is a clear error, not a crash on a
write.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import weakref

import torch

from utils import config
from utils.errors import UserError

PAGE = mmap.PAGESIZE
RAM_FILESYSTEMS = ("tmpfs", "ramfs")
_maps: dict[int, tuple[weakref.ref, int]] = {}  # base address -> (the mapping, its bytes)


def available() -> bool:
    """Whether this platform can spill (shared file mappings and madvise: Linux)."""
    return hasattr(mmap, "MADV_DONTNEED") and hasattr(os, "posix_fallocate")


def filesystem_of(folder: str, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type `folder` lives on (the longest mount point above it), None if unknown."""
    path = os.path.realpath(folder)
    best, kind = "", None
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind


def spill_dir() -> str:
    """The folder spilled maps are written to."""
    chosen = config.spill_dir_override()
    if chosen:
        return chosen
    folder = tempfile.gettempdir()
    if filesystem_of(folder) in RAM_FILESYSTEMS and os.path.isdir("/var/tmp"):
        return "/var/tmp"
    return folder


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory is an unlinked file in `spill_dir()`."""
    count = 1
    for n in shape:
        count *= n
    nbytes = max(count * dtype.itemsize, 1)  # a zero-length file cannot be mapped
    folder = spill_dir()
    try:
        f = tempfile.TemporaryFile(dir=folder, prefix="emnet-spill-")
    except OSError as err:
        raise UserError(f"cannot write a feature map in the spill folder {folder} ({err.strerror}); "
                        "set EMNET_SPILL_DIR to a writable folder with room, or raise --max_memory") from None
    with f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as err:
            raise UserError(f"no room for a {nbytes / 2**30:.1f} GB feature map in {folder} ({err.strerror}); "
                            "free disk space there, set EMNET_SPILL_DIR to a folder with room, "
                            "or raise --max_memory") from None
        mapping = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_SHARED)
    t = torch.frombuffer(mapping, dtype=dtype, count=count)
    base = t.data_ptr()
    ref = weakref.ref(mapping, lambda _, base=base: _maps.pop(base, None))
    _maps[base] = (ref, nbytes)
    return t.view(shape)


def is_spilled(t: torch.Tensor) -> bool:
    """Whether `t`'s memory lies in a live spilled map (never asks a tensor when none is live)."""
    return bool(_maps) and _find(t.data_ptr()) is not None


def chunk_statistics(f: torch.Tensor, chunk_bytes: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std (population) over space of (B, C, h, w) `f`, float32, summed
    in float64 over row chunks of about `chunk_bytes`, each released once read."""
    bsz, channels, height, width = f.shape
    rows = max(1, chunk_bytes // max(bsz * channels * width * f.element_size(), 1))
    total = torch.zeros(bsz, channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for r0 in range(0, height, rows):
        part = f[:, :, r0:r0 + rows].double()
        total += part.sum(dim=(2, 3))
        squares += part.square().sum(dim=(2, 3))
        release(f[:, :, r0:r0 + rows])
    mean = total / (height * width)
    var = (squares / (height * width) - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().float()


def _find(address: int) -> tuple[mmap.mmap, int] | None:
    for base, (ref, nbytes) in list(_maps.items()):
        mapping = ref()
        if mapping is not None and base <= address < base + nbytes:
            return mapping, base
    return None


def release(t: torch.Tensor) -> None:
    """Drop the pages under the view `t` from this process's memory (the data stay in the file):
    the whole pages between its first and last element. No-op for tensors not spilled."""
    if t.numel() == 0:
        return
    found = _find(t.data_ptr())
    if found is None:
        return
    mapping, base = found
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) + 1
    start = t.data_ptr() - base
    end = start + extent * t.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
