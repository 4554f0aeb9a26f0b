"""Border frame: does the enhancer's output carry a frame along the image borders?

For each reflected margin in --margins (0 = the original code's behaviour), enhances every image
of --input_dir (a LOL-style folder, or a flat folder of photos) and prints per margin:
- the PSNR of the outer 3-pixel frame and of the interior (only where ground truth exists),
- the edge ratio (`utils.metrics.edge_ratio`: how much the outermost rows/columns differ from
  their neighbours, relative to inner rows; natural photos give about 1), mean and max,
- seconds per image (the margin's cost).

    python benchmarks/border_frame.py --input_dir ../shared/data/LOL-v1/eval15 --margins 0 8
    python benchmarks/border_frame.py --input_dir datasets/demo --margins 0 8 --json out.json
Set GLIBC_TUNABLES as test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.paired_folder import read_pair  # noqa: E402
from dataset.pairing import find_pairs  # noqa: E402
from models.inference import enhance  # noqa: E402
from models.loading import load_enhancer  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.bundled import BUNDLED_ENHANCER  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8  # noqa: E402
from utils.metrics import edge_ratio, frame_psnr  # noqa: E402


def measure(model, pairs, device, margin: int) -> dict:
    """Frame/interior PSNR, edge ratios and seconds per image at one margin."""
    frames, inners, ratios, gt_ratios, seconds = [], [], [], [], []
    for pair in pairs:
        low, high = read_pair(pair)
        start = time.perf_counter()
        out = to_uint8(tensor_to_image(enhance(model, image_to_tensor(low).to(device), margin)))
        seconds.append(time.perf_counter() - start)
        ratios.append(edge_ratio(out))
        if high is not None:
            frame, inner = frame_psnr(out, to_uint8(high))
            frames.append(frame)
            inners.append(inner)
            gt_ratios.append(edge_ratio(to_uint8(high)))
    row = {"margin": margin, "images": len(pairs), "edge_ratio_mean": float(np.mean(ratios)),
           "edge_ratio_max": float(np.max(ratios)), "sec_per_image": float(np.median(seconds))}
    if frames:
        row.update(frame_psnr=float(np.mean(frames)), interior_psnr=float(np.mean(inners)),
                   gt_edge_ratio_mean=float(np.mean(gt_ratios)))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="LOL-style folder or a flat folder of photos")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER))
    p.add_argument("--margins", type=int, nargs="+", default=[0, 8])
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    device = resolve_device(args.device)
    model, _ = load_enhancer(args.weights, None, None)
    model.to(device).eval()
    pairs = find_pairs(args.input_dir, require_high=False)[: args.limit]
    rows = [measure(model, pairs, device, m) for m in args.margins]
    cols = ["margin", "images", "frame_psnr", "interior_psnr", "edge_ratio_mean", "edge_ratio_max",
            "gt_edge_ratio_mean", "sec_per_image"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    main()
