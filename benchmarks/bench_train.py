"""Training speed per preset: iterations/s and peak memory of full training steps (forward,
SSIM + L1 loss, backward, AdamW) on random crops, as train_enhancer.py runs them.

    python benchmarks/bench_train.py                       # CPU presets, batch 4, 128x128
    python benchmarks/bench_train.py --device cuda --amp bf16 --presets emnet_enhancer:32
Set GLIBC_TUNABLES as test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.enhancer import EMNetEnhancer, make_config  # noqa: E402
from utils.device import peak_memory_mib, resolve_device  # noqa: E402
from utils.losses import EnhancementLoss  # noqa: E402

DEFAULT_PRESETS = "emnet_tiny:8,emnet_small:8,emnet_small:16,emnet_enhancer:8,emnet_enhancer:32"


def bench(arch: str, dim: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = EMNetEnhancer(make_config(arch, dim)).to(device).train()
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    loss_fn = EnhancementLoss(l1=1.0, ssim=1.0, lpips=0.0).to(device)
    x = torch.rand(args.batch_size, 3, args.patch, args.patch, device=device)
    y = torch.rand_like(x)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = step_model(x)
        loss, _ = loss_fn(out.float().clamp(0, 1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = peak_memory_mib(device)
    return {"preset": f"{arch}:{dim}", "params": sum(p.numel() for p in model.parameters()),
            "sec_per_iter": sec, "iters_per_sec": 1 / sec, "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated arch:embed_dim")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
          f"{args.batch_size}x{args.patch}x{args.patch}, amp {args.amp}, compile {args.compile}")
    if not args.json:
        print(f"{'preset':<20} {'params':>11} {'s/iter':>8} {'iter/s':>8} {'peak MiB':>9}")
    for spec in args.presets.split(","):
        arch, dim = spec.split(":")
        r = bench(arch, int(dim), args, device)
        print(json.dumps(r) if args.json else
              f"{r['preset']:<20} {r['params']:>11,} {r['sec_per_iter']:>8.3f} {r['iters_per_sec']:>8.2f} "
              f"{r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
