"""The benchmark scripts run and report what they claim (tiny sizes; timings are not checked)."""
from __future__ import annotations

import json

import pytest

from conftest import run_script
from models.fast import kernels

pytestmark = pytest.mark.slow  # runs the benchmark scripts


def json_rows(*args: str) -> list[dict]:
    proc = run_script(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bench_inference_rows():
    """One row per variant with latency, peak memory and FLOP count, plus the memory-module row."""
    rows = json_rows("benchmarks/bench_inference.py", "--presets", "emnet_tiny:8", "--height", "32",
                      "--width", "48", "--runs", "1", "--warmup", "0", "--mem_size", "50", "--json")
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"fast", "torch_ops", "reference", "memory 50"}
    for name in ("fast", "torch_ops", "reference"):
        r = by_variant[name]
        assert r["sec"] > 0 and r["peak_mib"] > 0 and r["images_per_sec"] == 1 / r["sec"]
    assert by_variant["fast"]["gflop"] == by_variant["reference"]["gflop"] > 0
    available = kernels.library() is not None or kernels.onednn_available()
    assert by_variant["fast"]["cpu_kernels"] == available
    assert not by_variant["torch_ops"]["cpu_kernels"], "EMNET_CPU_KERNELS=0 did not reach the worker"
    assert all(by_variant["memory 50"][k] > 0 for k in ("query_sec", "read_sec", "correct_sec"))


def test_bench_large_image_streamed_matches_full():
    """The streamed forward with many strips gives the one-piece output (bundled weights)."""
    (row,) = json_rows("benchmarks/bench_large_image.py", "--width", "96", "--height", "64",
                        "--strip_pixels", "600")
    assert row["max_abs_diff_8bit"] <= 1
    assert row["psnr_streamed_vs_full"] >= 60
