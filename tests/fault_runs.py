"""Helpers for the fault tests (test_atomic, test_signals, test_folder_lock,
test_report_papercuts, test_train_enhancer_resume): a file-size limit on a child, a script started
in the background with a test-only prelude and reaped whatever happens, and incompressible pairs."""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from train_runs import subprocess_env

from conftest import REPO, run_script, write_png


def limited(limit_bytes: int):
    """A preexec_fn: the child may write no file larger than `limit_bytes` (then EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def run_limited(*argv, limit_bytes: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """conftest.run_script on one thread; with `limit_bytes`, the child may write no larger file."""
    return run_script(*argv, timeout=timeout, env_extra={"OMP_NUM_THREADS": "1"},
                      preexec_fn=limited(limit_bytes) if limit_bytes else None)


def slowed(module: str, name: str, seconds: float) -> str:
    """A prelude for `start_script`: every call of `module.name` waits `seconds` first (a slow
    disk or a slow forward, so a test can signal the script while that call is under way)."""
    return (f"import time, {module} as _module_{name}\n_plain_{name} = _module_{name}.{name}\n"
            f"def _slow_{name}(*args, **kwargs):\n    time.sleep({seconds})\n"
            f"    return _plain_{name}(*args, **kwargs)\n_module_{name}.{name} = _slow_{name}\n")


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def noisy_pairs(root: Path, names, size=(32, 48), seed=0) -> Path:
    """Pairs of random pixels: their PNGs do not compress (about 3 bytes per pixel)."""
    rng = np.random.default_rng(seed)
    for name in names:
        for side in ("low", "high"):
            write_png(root / side / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def start_script(script: str, *args, prelude: str = "") -> subprocess.Popen:
    """`python SCRIPT ARGS` in a subprocess; `prelude` runs first in it (test-only patches)."""
    argv = [script, *map(str, args)]
    code = (f"import runpy, sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = {argv!r}\n"
            f"{prelude}\nrunpy.run_path({script!r}, run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.002) -> None:
    """Waits for `cond()` while `proc` still runs; fails with its stderr tail if it ended first."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            tail = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it was awaited: {tail}")
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(poll)


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kills `proc` on leaving the block if it still runs, so a failed wait leaves no child behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
