"""The CPU kernels behind the fast path: C kernels for the depthwise 3x3 convs (built and loaded
here) and oneDNN's matrix product for the 1x1 convs. Whether they run is `policy.py`'s decision.

Why: on a CPU, PyTorch's depthwise conv (oneDNN) runs at about a fifth of the machine's peak, the
GDFN gate gelu(a) * b costs two more passes over the widest tensors of the network, and the BLAS
call behind F.linear is ~1.3x slower than oneDNN's product for the network's tall, narrow
matrices. The kernels in `models/fast/csrc/dwconv.c` keep each pixel's channels in vector registers and
fuse the gate.

The C library is compiled once per machine with the system C compiler (`$CC`, else `cc`, `gcc` or
`clang`) into the kernel cache (`utils.config.kernel_cache_dir`, default `~/.cache/emnet-pytorch`), checked
against PyTorch on a small input, and loaded with ctypes. Without a compiler, if the check fails,
or with the kernels switched off (`utils.config.cpu_kernels_enabled`), `library()` is None and the fast path uses PyTorch ops: same outputs, slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from utils import config

SOURCE = Path(__file__).with_name("csrc") / "dwconv.c"
CHANNEL_MULTIPLE = 16  # the kernels handle 16 channels per vector: other counts use PyTorch ops
# Tried in order: the first that compiles and passes the check is used.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3", "-mcpu=native"),
    ("-O3",),
)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU model and features, so a cache shared between machines never loads a binary built
    with `-march=native` for another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    """Compile SOURCE to `target` atomically (temp file, then rename). True on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        if done.returncode == 0:
            os.replace(tmp, target)
            return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dw3x3.argtypes = [p, p, p, i64, i64, i64, i64, i32]
    lib.dw3x3_squares.argtypes = [p, p, p, p, i64, i64, i64, i64, i32]
    lib.gated_dw3x3.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.dw3x3.restype = lib.dw3x3_squares.restype = lib.gated_dw3x3.restype = None
    return lib


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or fail the check."""
    if not config.cpu_kernels_enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C compiler found: the CPU forward uses PyTorch's depthwise conv (slower)")
        return None
    source = SOURCE.read_bytes()
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        path = config.kernel_cache_dir() / f"dwconv-{key}.so"
        if not path.exists() and not _build(compiler, flags, path):
            continue
        try:
            lib = _bind(ctypes.CDLL(str(path)))
        except OSError:
            continue
        if _passes_check(lib):
            return lib
    warnings.warn(f"could not build {SOURCE.name} with {compiler}: the CPU forward uses PyTorch ops (slower)")
    return None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) -> contiguous (9, C), the kernels' weight layout."""
    return weight.detach().reshape(weight.shape[0], 9).t().contiguous()


def depthwise3x3(t: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Depthwise 3x3 conv, zero padding, of (N, H, W, C) `t` with `weight` (C, 1, 3, 3)."""
    n, h, w, c = t.shape
    taps, out = _taps(weight), torch.empty_like(t)  # named: the memory must outlive the call
    (lib or library()).dw3x3(_ptr(t), _ptr(taps), _ptr(out), n, h, w, c, torch.get_num_threads())
    return out


def depthwise3x3_squares(t: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`depthwise3x3(t, weight)` and the sum of its squares over pixels, (N, C), in one pass."""
    n, h, w, c = t.shape
    threads = torch.get_num_threads()
    taps, out = _taps(weight), torch.empty_like(t)
    partial = torch.zeros(threads, n, c, dtype=torch.float64)  # one slice per thread, summed here
    (lib or library()).dw3x3_squares(_ptr(t), _ptr(taps), _ptr(out), _ptr(partial), n, h, w, c, threads)
    return out, partial.sum(0).to(t.dtype)


def gated_depthwise3x3(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor,
                       lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """gelu(depthwise3x3(a, wa)) * depthwise3x3(b, wb), the GDFN gate, for (N, H, W, C) a and b."""
    n, h, w, c = a.shape
    taps_a, taps_b, out = _taps(wa), _taps(wb), torch.empty_like(a)
    (lib or library()).gated_dw3x3(_ptr(a), _ptr(b), _ptr(taps_a), _ptr(taps_b), _ptr(out), n, h, w, c,
                                   torch.get_num_threads())
    return out


def _passes_check(lib: ctypes.CDLL) -> bool:
    """All three kernels match PyTorch on a small input with borders (guards against a bad build)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 5, 7, 32, generator=g) for _ in range(2))
    wa, wb = (torch.randn(32, 1, 3, 3, generator=g) for _ in range(2))
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # first use may be under --amp
        conv_a = F.conv2d(a.permute(0, 3, 1, 2), wa, padding=1, groups=32).permute(0, 2, 3, 1)
        conv_b = F.conv2d(b.permute(0, 3, 1, 2), wb, padding=1, groups=32).permute(0, 2, 3, 1)
        out, squares = depthwise3x3_squares(a, wa, lib)
        return (torch.allclose(depthwise3x3(a, wa, lib), conv_a, rtol=1e-5, atol=1e-5)
                and torch.allclose(out, conv_a, rtol=1e-5, atol=1e-5)
                and torch.allclose(squares, conv_a.square().sum((1, 2)), rtol=1e-5)
                and torch.allclose(gated_depthwise3x3(a, b, wa, wb, lib), F.gelu(conv_a) * conv_b,
                                   rtol=1e-5, atol=1e-5))


@lru_cache(maxsize=None)
def onednn_available() -> bool:
    """oneDNN's fp32 matrix product (the op PyTorch's compiler emits for CPU linears) is in this
    build of PyTorch and agrees with F.linear. Off with the CPU kernels (`utils.config`)."""
    if not config.cpu_kernels_enabled() or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(37, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(37, 40, generator=g)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # first use may be under --amp
        try:
            plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            added = torch.ops.mkldnn._linear_pointwise.binary(x, r, w, None, "add")
        except (AttributeError, RuntimeError, NotImplementedError):
            return False
        expected = F.linear(x, w)
    return torch.allclose(plain, expected, atol=1e-5) and torch.allclose(added, expected + r, atol=1e-5)


def onednn_linear(t: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """t @ weight^T (+ residual) over the last axis with oneDNN: about 1.3x faster on this kind of
    CPU than the BLAS call behind F.linear for the network's tall, narrow products."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(t, weight, None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(t, residual, weight, None, "add")
