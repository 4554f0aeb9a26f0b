"""Training speed per preset: iterations/s, crops/s and peak memory of full training steps
(forward, SSIM + L1 loss, backward, AdamW) on random crops, as train_enhancer.py runs them; the
FLOPs of one step (3x the forward's, counted by torch.utils.flop_counter) and, on CUDA, the share of
the GPU's peak they reach.

    python benchmarks/bench_train.py                       # CPU presets, batch 4, 128x128
    python benchmarks/bench_train.py --device cuda --amp bf16 --presets emnet_enhancer:32
    python benchmarks/bench_train.py --device cuda --amp bf16 --data_on_device   # + drawing the crops
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.device_crops import DeviceCrops  # noqa: E402
from models.enhancer import EMNetEnhancer, make_config  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.device import peak_memory_mib, resolve_device  # noqa: E402
from utils.losses import EnhancementLoss  # noqa: E402

DEFAULT_PRESETS = "emnet_tiny:8,emnet_small:8,emnet_small:16,emnet_enhancer:8,emnet_enhancer:32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_crops(args: argparse.Namespace, device: torch.device) -> DeviceCrops:
    """--data_on_device: `--images` random uint8 pairs of 400x600 (LOL's size) on the device."""
    g = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(0, 256, (3, 400, 600), dtype=torch.uint8, generator=g) for _ in range(2))
             for _ in range(args.images)]
    return DeviceCrops(pairs, args.patch, device, seed=0)


def sample_seconds(crops: DeviceCrops, args: argparse.Namespace, device: torch.device) -> float:
    """Median time to draw one batch on the device."""
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        t = time.perf_counter()
        crops.sample(args.batch_size)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(arch: str, dim: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = EMNetEnhancer(make_config(arch, dim)).to(device).train()
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    loss_fn = EnhancementLoss(l1=1.0, ssim=1.0, lpips=0.0).to(device)
    crops = random_crops(args, device) if args.data_on_device else None
    x = torch.rand(args.batch_size, 3, args.patch, args.patch, device=device)
    y = torch.rand_like(x)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def step() -> None:
        low, high = crops.sample(args.batch_size) if crops is not None else (x, y)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = step_model(low)
        loss, _ = loss_fn(out.float().clamp(0, 1), high)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # FLOPs of one step: the forward counted op by op, times 3 for forward + backward. The counter's
    # own convolution_backward formula ignores groups and counted the depthwise convs' backward as
    # dense (~24x the forward for this network), which made the TFLOP/s figures 8x too high.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
    flops = 3 * counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        step()
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = peak_memory_mib(device)
    tflops = flops / sec / 1e12
    row = {"preset": f"{arch}:{dim}", "params": sum(p.numel() for p in model.parameters()),
           "sec_per_iter": sec, "iters_per_sec": 1 / sec, "crops_per_sec": args.batch_size / sec,
           "peak_mib": peak, "gflop_per_step": flops / 1e9, "tflops": tflops,
           "peak_share": tflops / args.peak_tflops if device.type == "cuda" else None}
    if crops is not None:
        row["sample_ms"] = 1000 * sample_seconds(crops, args, device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated arch:embed_dim")
    p.add_argument("--batch_size", type=int, default=4, help="crops per step")
    p.add_argument("--patch", type=int, default=128, help="crop size")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--data_on_device", action="store_true",
                   help="draw each step's crops on the device (DeviceCrops, as train_enhancer.py on "
                        "CUDA) and report the drawing time alone as sample_ms")
    p.add_argument("--images", type=int, default=32, help="random 600x400 pairs for --data_on_device")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="the GPU's peak TFLOP/s for peak_share (989: H100/H200 dense bf16)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
          f"{args.batch_size}x{args.patch}x{args.patch}, amp {args.amp}, compile {args.compile and args.compile_mode}")
    if not args.json:
        print(f"{'preset':<20} {'params':>11} {'s/iter':>8} {'iter/s':>8} {'crops/s':>8} {'GFLOP':>8} "
              f"{'TFLOP/s':>8} {'of peak':>8} {'peak MiB':>9}" + (f" {'sample ms':>9}" if args.data_on_device else ""))
    for spec in args.presets.split(","):
        arch, dim = spec.split(":")
        r = bench(arch, int(dim), args, device)
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else "-"
        print(json.dumps(r) if args.json else
              f"{r['preset']:<20} {r['params']:>11,} {r['sec_per_iter']:>8.3f} {r['iters_per_sec']:>8.2f} "
              f"{r['crops_per_sec']:>8.1f} {r['gflop_per_step']:>8.2f} {r['tflops']:>8.3f} {share:>8} "
              f"{r['peak_mib']:>9.0f}" + (f" {r['sample_ms']:>9.2f}" if "sample_ms" in r else ""), flush=True)


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    main()
