"""models.fast.heap: with the scripts' GLIBC_TUNABLES (freed memory kept), a change of input size
hands the freed heap back to the OS; same-size inputs never trim."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import GLIBC_TUNABLES, REPO

PROBE = textwrap.dedent("""
    import torch
    from models.fast import heap

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    print(heap.settle((1, 3, 8, 8)), heap.settle((1, 3, 8, 8)))   # first call, same size
    x = torch.ones(256, 2**20)  # 1 GiB on the heap (GLIBC_TUNABLES: no mmap)
    del x
    kept = rss_mb()
    print(heap.settle((1, 3, 8, 16)), kept - rss_mb())   # size changed: trimmed
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_settle_trims_only_when_the_size_changes():
    env = {"GLIBC_TUNABLES": GLIBC_TUNABLES, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == "False False"
    trimmed, released_mb = second.split()
    assert trimmed == "True"
    assert float(released_mb) > 512, "the freed GiB stayed in the process"
