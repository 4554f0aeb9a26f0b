"""Large images: the streamed (bounded-memory) enhancer against the one-piece forward.

Runs the bundled enhancer on one image resized to --width x --height, first streamed, then in
one piece, and prints both times, the process's peak memory after each, the max abs difference
and the PSNR between the two 8-bit outputs. Pick a size where the one-piece forward still fits;
for sizes where it does not, pass --streamed_only.

    python benchmarks/bench_large_image.py --image ../shared/data/LOL-v1/eval15/low/1.png
    python benchmarks/bench_large_image.py --width 4000 --height 3000 --streamed_only
Set GLIBC_TUNABLES as test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import fast  # noqa: E402
from models.inference import pad_for_network  # noqa: E402
from models.loading import load_enhancer  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.bundled import BUNDLED_ENHANCER  # noqa: E402
from utils.device import peak_memory_mib, resolve_device  # noqa: E402
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8  # noqa: E402
from utils.metrics import psnr  # noqa: E402


def test_image(path: str | None, width: int, height: int) -> np.ndarray:
    """The image at `path` resized to width x height, or smooth random colours without one."""
    if path:
        return cv2.resize(read_image(path), (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    rng = np.random.default_rng(0)
    small = rng.random((max(height // 64, 2), max(width // 64, 2), 3), dtype=np.float32) * 0.2
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def run(model, x: torch.Tensor, strip_pixels: int, device: torch.device) -> tuple[np.ndarray, float, float]:
    """`enhance` with row strips of `strip_pixels` pixels (0: whole maps): output, seconds, peak MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        padded, (rows, cols) = pad_for_network(x)
        y = fast.forward(model, padded, fast.plan_for(model, padded, strip_pixels))[..., rows, cols]
    out = to_uint8(tensor_to_image(y))
    return out, time.perf_counter() - start, peak_memory_mib(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER))
    p.add_argument("--image", default=None, help="a low-light image to resize (default: random)")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1200)
    p.add_argument("--strip_pixels", type=int, default=2 ** 18, help="pixels per strip of the streamed run")
    p.add_argument("--streamed_only", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = resolve_device(args.device)
    model, _ = load_enhancer(args.weights, None, None)
    model.to(device)
    x = image_to_tensor(test_image(args.image, args.width, args.height)).to(device)
    streamed, t_s, m_s = run(model, x, args.strip_pixels, device)
    row = {"size": f"{args.width}x{args.height}", "device": str(device), "threads": torch.get_num_threads(),
           "strip_pixels": args.strip_pixels, "streamed_sec": t_s, "streamed_peak_mib": m_s}
    if not args.streamed_only:
        full, t_f, m_f = run(model, x, 0, device)
        row.update(full_sec=t_f, full_peak_mib=m_f,
                   max_abs_diff_8bit=int(np.abs(full.astype(int) - streamed.astype(int)).max()),
                   psnr_streamed_vs_full=psnr(streamed, full))
    print(json.dumps(row))


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    main()
