"""utils.allocator: every entry script keeps freed memory on the heap and never mmaps, as the shell
scripts' GLIBC_TUNABLES do, even when started as `python script.py` without them."""
from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's (Linux)")

# Run in a child without GLIBC_TUNABLES: optionally run an entry script (its --help), then malloc a
# 256 MiB block and report whether glibc served it with mmap and whether its free kept it on the heap.
PROBE = """
import ctypes, runpy, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
script = sys.argv[1]
if script == "tune":
    from utils.allocator import tune_allocator
    assert tune_allocator()
elif script != "none":
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
block = libc.malloc(256 << 20)
mmapped = libc.mallinfo2().hblkhd >= 256 << 20
libc.free(block)
kept = libc.mallinfo2().keepcost >= 256 << 20
print(f"RESULT mmapped={mmapped} kept={kept}")
"""

ENTRY_SCRIPTS = ["test.py", "train_enhancer.py", "train_memory.py", "export_onnx.py", "enhance_video.py"]


def probe(script: str, tunables: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", PROBE, script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@glibc_only
def test_tune_allocator_keeps_freed_memory_and_never_mmaps():
    assert probe("none") == "RESULT mmapped=True kept=False"  # glibc's defaults: what made torch slow
    assert probe("tune") == "RESULT mmapped=False kept=True"


@glibc_only
def test_a_user_glibc_tunables_malloc_setting_is_left_alone():
    assert probe("test.py", "glibc.malloc.mmap_max=65536") == "RESULT mmapped=True kept=False"


@glibc_only
@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_script_tunes_the_allocator_when_run_directly(script):
    assert probe(script) == "RESULT mmapped=False kept=True"


def test_every_entry_point_tunes_the_allocator_before_anything_else():
    """Every script with a __main__ block that runs torch calls tune_allocator() first there."""
    scripts = [*ENTRY_SCRIPTS, *(f"benchmarks/{p.name}" for p in sorted((REPO / "benchmarks").glob("*.py"))
                                 if p.name != "bench_peak_memory.py")]  # that one only times children
    for name in scripts:
        tree = ast.parse((REPO / name).read_text())
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert main_blocks, name
        first = main_blocks[-1].body[0]
        assert ast.unparse(first) == "tune_allocator()", f"{name}: the __main__ block starts with {ast.unparse(first)}"
