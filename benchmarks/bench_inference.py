"""Inference speed per preset: median latency per image, images/s, peak memory and achieved
GFLOP/s against this machine's measured matrix-product peak, for the fast path (models/fast/) and
for the plain network of models/enhancer.py ("reference": the original code's ops, except its
LayerNorm, which is the fused F.layer_norm here), and the cost of the external memory (query +
read + correction) at mem_size 9000.

    python benchmarks/bench_inference.py                         # CPU, 600x400, all presets
    python benchmarks/bench_inference.py --device cuda --variants fast,bf16,compiled,reference
    python benchmarks/bench_inference.py --json                  # one JSON object per line
Each measurement runs in a fresh process, so its peak memory is its own. Set GLIBC_TUNABLES as
test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import fast  # noqa: E402
from models.enhancer import EMNetEnhancer, make_config  # noqa: E402
from models.inference import enhance_with_features  # noqa: E402
from models.memory import ExternalMemory, MemoryConfig, refine_with_memory  # noqa: E402
from models.provenance import EntrySources, sources_payload  # noqa: E402
from models.query import EnhancerQuery  # noqa: E402
from models.read_settings import ReadSettings  # noqa: E402
from models.refiner import MemoryRefiner  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.device import peak_memory_mib, resolve_device  # noqa: E402

SCENES = 358  # training inputs of the bundled dim-32 memory
DEFAULT_PRESETS = "emnet_tiny:8,emnet_small:16,emnet_enhancer:32"
# fast: the fast path as shipped. torch_ops: the same with EMNET_CPU_KERNELS=0, i.e. without the C
# kernels and oneDNN products of models/fast/kernels.py. reference: the plain network's forward.
# bf16: autocast, GPUs only by default.
VARIANTS = ("fast", "torch_ops", "reference", "compiled", "bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, runs: int) -> tuple[float, float]:
    """(median, first-call) seconds of `fn()` over `runs` calls after `warmup` calls."""
    times = []
    for _ in range(warmup + runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), times[0]


def matmul_peak(device: torch.device, n: int = 2048) -> float:
    """Measured fp32 GFLOP/s of an n x n x n matrix product on `device`."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    sec, _ = timed(lambda: a @ b, device, warmup=2, runs=5)
    return 2 * n ** 3 / sec / 1e9


def count_gflop(config, height: int, width: int) -> float:
    """GFLOP (2 per multiply-add) of one forward, counted on the plain network."""
    from torch.utils.flop_counter import FlopCounterMode

    model = EMNetEnhancer(config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, height, width))
    return counter.get_total_flops() / 1e9


def build(variant: str, arch: str, dim: int, device: torch.device) -> torch.nn.Module:
    """The plain network for "reference", else the fast path around it (compiled for "compiled")."""
    torch.manual_seed(0)
    model = EMNetEnhancer(make_config(arch, dim)).eval().to(device)
    if variant == "reference":
        return model
    net = fast.FastForward(model)
    return torch.compile(net) if variant == "compiled" else net


def measure(variant: str, arch: str, dim: int, args: argparse.Namespace) -> dict:
    """One row: runs in the worker process."""
    device = resolve_device(args.device)
    model = build(variant, arch, dim, device)
    x = torch.rand(1, 3, args.height, args.width, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16")

    def forward():
        with torch.no_grad(), autocast:
            model(x)

    sec, first = timed(forward, device, args.warmup, args.runs)
    gflop = count_gflop(make_config(arch, dim), args.height, args.width)
    return {"preset": f"{arch}:{dim}", "variant": variant, "device": str(device),
            "threads": torch.get_num_threads(), "size": f"{args.width}x{args.height}",
            "sec": sec, "first_call_sec": first, "images_per_sec": 1 / sec, "peak_mib": peak_memory_mib(device),
            "gflop": gflop, "gflops": gflop / sec,
            "cpu_kernels": device.type == "cpu" and variant != "reference" and (
                fast.kernels.library() is not None or fast.kernels.onednn_available())}


def measure_memory_module(arch: str, dim: int, args: argparse.Namespace) -> dict:
    """Per-image seconds of the memory's three steps, with a random 9000-slot memory."""
    device = resolve_device(args.device)
    net = build("fast", arch, dim, device)
    model = net.model
    query = EnhancerQuery(model)
    memory = ExternalMemory(MemoryConfig(mem_size=args.mem_size, key_dim=query.dim)).to(device)
    scenes = F.normalize(torch.randn(SCENES, 384), dim=1).numpy()  # the training inputs' scene thumbnails
    refiner = MemoryRefiner(query, memory, read=ReadSettings().with_bounds(None, 0.87),
                            sources=EntrySources({"sources": sources_payload([], [], scenes)}))
    x = torch.rand(1, 3, args.height, args.width, device=device)
    with torch.no_grad():
        y, features = enhance_with_features(model, x)  # the correction's input and the decision's features
        q = refiner.query(x)
        recalled = memory.read(q)
        steps = {"query": lambda: refiner.query(x), "read": lambda: memory.read(q),
                 "correct": lambda: refine_with_memory(y, recalled, memory.config.pooling_size),
                 "decide": lambda: refiner.decide(x, features)}
        out = {name: timed(fn, device, args.warmup, args.runs)[0] for name, fn in steps.items()}
    return {"preset": f"{arch}:{dim}", "variant": f"memory {args.mem_size}", "device": str(device),
            "query_sec": out["query"], "read_sec": out["read"], "correct_sec": out["correct"],
            "decide_sec": out["decide"]}


def run_worker(job: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh process (its own peak memory) and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", job] + [
        a for k, v in (("--device", args.device), ("--height", args.height), ("--width", args.width),
                       ("--runs", args.runs), ("--warmup", args.warmup), ("--mem_size", args.mem_size))
        for a in (k, str(v))]
    env = os.environ.copy()
    if job.startswith("torch_ops:"):
        env["EMNET_CPU_KERNELS"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"job": job, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], peak: float) -> None:
    print(f"{'preset':<18} {'variant':<10} {'s/img':>7} {'img/s':>7} {'peak MiB':>9} {'GFLOP':>7} "
          f"{'GFLOP/s':>8} {'% peak':>7} {'speed-up':>9}")
    base = {r["preset"]: r["sec"] for r in rows if r.get("variant") == "reference" and "sec" in r}
    for r in rows:
        if "error" in r:
            print(f"{r['job']:<29} failed: {r['error']}")
        elif "sec" in r:
            up = f"{base[r['preset']] / r['sec']:.2f}x" if r["preset"] in base else "-"
            print(f"{r['preset']:<18} {r['variant']:<10} {r['sec']:>7.3f} {r['images_per_sec']:>7.2f} "
                  f"{r['peak_mib']:>9.0f} {r['gflop']:>7.1f} {r['gflops']:>8.1f} "
                  f"{100 * r['gflops'] / peak:>6.1f}% {up:>9}")
    for r in rows:
        if "query_sec" in r:
            print(f"{r['preset']:<18} {r['variant']}: query {r['query_sec']:.3f} s, read "
                  f"{r['read_sec'] * 1e3:.2f} ms, correction {r['correct_sec'] * 1e3:.2f} ms, abstention decision "
                  f"(query from the enhancer pass's features, read, scene match against {SCENES} training inputs) {r['decide_sec'] * 1e3:.2f} ms "
                  "per image")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated arch:embed_dim")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated from {','.join(VARIANTS)} (default: fast,torch_ops,reference on "
                        "CPU; fast,reference,bf16 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=400)
    p.add_argument("--width", type=int, default=600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem_size", type=int, default=9000, help="memory slots for the memory-module row")
    p.add_argument("--no_memory", action="store_true", help="skip the memory-module cost")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, arch, dim = args.worker.split(":")
        row = (measure_memory_module(arch, int(dim), args) if kind == "memory"
               else measure(kind, arch, int(dim), args))
        print(json.dumps(row))
        return
    device = resolve_device(args.device)
    variants = (args.variants or ("fast,reference,bf16" if device.type == "cuda" else "fast,torch_ops,reference")).split(",")
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.width}x{args.height}, median of {args.runs} after {args.warmup} warm-up; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s")
    rows = []
    for spec in args.presets.split(","):
        for variant in variants:
            rows.append(run_worker(f"{variant}:{spec}", args))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.no_memory:
        rows.append(run_worker(f"memory:{args.presets.split(',')[-1]}", args))
        if args.json:
            print(json.dumps(rows[-1]))
    if not args.json:
        print_table(rows, peak)


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    main()
