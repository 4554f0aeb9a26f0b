"""Enhance a LOL-style folder with a trained EMNet and score the results.

Writes RESULT_DIR/ori/<name>.png (with --save_images), RESULT_DIR/metrics.csv (one row per
image), RESULT_DIR/summary.json and RESULT_DIR/result.txt (means). Without a high/ folder the
images are only enhanced. Example:
    python test.py --weights pre_trained_logs/enhancer/model_lolv1.pth --arch emnet_enhancer --embed_dim 32 \
        --input_dir datasets/LOL-v1/eval15 --result_dir log_eval/lolv1 --save_images
"""
from __future__ import annotations

import argparse
import time

from dataset.pairing import find_pairs
from utils.checkpoint import describe_config, load_enhancer
from utils.device import resolve_device
from utils.errors import UserError, run_cli
from utils.evaluate import evaluate_pairs
from utils.options import add_device_arg, add_enhancer_args, add_memory_args, writable_dir
from utils.report import METRICS, format_table, write_report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="EMNet evaluation: enhancer outputs (ori) and metrics")
    p.add_argument("--input_dir", required=True,
                   help="folder with low/ (and high/ for metrics), or a flat folder of images")
    p.add_argument("--result_dir", default="./log_eval/lolv1", help="where results are written")
    p.add_argument("--weights", default="./pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth",
                   help="enhancer checkpoint: ours or the published {'epoch','state_dict'} format")
    p.add_argument("--save_images", action="store_true", help="write the enhanced images")
    add_enhancer_args(p, defaults_from_checkpoint=True)
    add_memory_args(p)
    add_device_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    if args.mem_weights:
        raise UserError("--mem_weights: the external memory is not part of this version yet; "
                        "drop the flag to get the enhancer's (ori) results")
    device = resolve_device(args.device)
    pairs = find_pairs(args.input_dir, require_high=False)
    result_dir = writable_dir(args.result_dir, "--result_dir")
    model, ckpt = load_enhancer(args.weights, args.arch, args.embed_dim)
    model.to(device)
    ori_dir = writable_dir(result_dir / "ori", "--result_dir") if args.save_images else None

    has_gt = pairs[0].high is not None
    columns = [f"ori_{m}" for m in METRICS] if has_gt else []
    start = time.perf_counter()
    rows = evaluate_pairs(model, pairs, device, out_dir=ori_dir)
    seconds = time.perf_counter() - start

    meta = {"weights": str(args.weights), "model": describe_config(model.config),
            "checkpoint_epoch": ckpt.get("epoch"), "input_dir": str(args.input_dir),
            "device": str(device), "seconds": round(seconds, 2)}
    summary = write_report(result_dir, rows, columns, meta)
    if columns:
        print(format_table(rows, columns, summary["mean"]))
    print(f"{len(rows)} images in {seconds:.1f} s on {device}; results in {result_dir}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
