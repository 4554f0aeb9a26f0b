"""The benchmark scripts run and report what they claim (tiny sizes; real timings are not checked:
a fake clock shows what the inference benchmark makes of known ones)."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from benchmarks import bench_inference
from conftest import run_script
from models.fast import kernels


def json_rows(*args: str) -> list[dict]:
    proc = run_script(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


class FakeClock:
    """time.perf_counter that advances only when a forward runs, by the next of `durations`."""

    def __init__(self, durations: list[float]):
        self.now, self.durations, self.inputs = 0.0, list(durations), []

    def __call__(self) -> float:
        return self.now

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        self.now += self.durations.pop(0)


def test_bench_inference_row_from_known_forward_times(monkeypatch):
    """Forwards of 5 s (the warm-up), then 1, 3 and 2 s: the row reports the median of the timed
    three (2 s), so 0.5 images/s, the first call's 5 s, and 2 s per FLOP count; every call sees an
    image of the size asked for."""
    clock = FakeClock([5.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(bench_inference, "build", lambda *_: clock.forward)
    args = argparse.Namespace(device="cpu", height=32, width=48, warmup=1, runs=3)
    row = bench_inference.measure("fast", "emnet_tiny", 8, args)
    assert clock.inputs == [(1, 3, 32, 48)] * 4 and not clock.durations
    assert (row["sec"], row["images_per_sec"], row["first_call_sec"]) == (2.0, 0.5, 5.0)
    assert row["gflop"] > 0 and row["gflops"] == pytest.approx(row["gflop"] / 2.0)
    assert (row["preset"], row["size"]) == ("emnet_tiny:8", "48x32")


@pytest.mark.slow  # runs the benchmark script
def test_bench_inference_rows():
    """One row per variant with latency, peak memory and FLOP count, plus the memory-module row."""
    rows = json_rows("benchmarks/bench_inference.py", "--presets", "emnet_tiny:8", "--height", "32",
                      "--width", "48", "--runs", "1", "--warmup", "0", "--mem_size", "50", "--json")
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"fast", "torch_ops", "reference", "memory 50"}
    for name in ("fast", "torch_ops", "reference"):
        r = by_variant[name]
        assert r["sec"] > 0 and r["peak_mib"] > 0 and r["size"] == "48x32"
    assert by_variant["fast"]["gflop"] == by_variant["reference"]["gflop"] > 0
    available = kernels.library() is not None or kernels.onednn_available()
    assert by_variant["fast"]["cpu_kernels"] == available
    assert not by_variant["torch_ops"]["cpu_kernels"], "EMNET_CPU_KERNELS=0 did not reach the worker"
    assert all(by_variant["memory 50"][k] > 0 for k in ("query_sec", "read_sec", "correct_sec"))


@pytest.mark.slow  # runs the benchmark script
def test_bench_large_image_streamed_matches_full():
    """The streamed forward with many strips gives the one-piece output (bundled weights)."""
    (row,) = json_rows("benchmarks/bench_large_image.py", "--width", "96", "--height", "64",
                        "--strip_pixels", "600")
    assert row["max_abs_diff_8bit"] <= 1
    assert row["psnr_streamed_vs_full"] >= 60
