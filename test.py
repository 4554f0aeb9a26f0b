"""Enhance a LOL-style folder with a trained EMNet, correct it with the external memory, score.

Writes RESULT_DIR/ori/<name>.png (the enhancer) and, with --mem_weights, RESULT_DIR/mem/<name>.png
(after the memory) when --save_images is given, plus RESULT_DIR/metrics.csv (one row per image),
summary.json and result.txt (means; a run stopped by Ctrl-C or SIGTERM writes them for the images
already done); a second run into the same RESULT_DIR meanwhile is refused
(utils/folder_lock.py). Without a high/ folder the images are only enhanced. With a
memory, metrics.csv and summary.json name its best entries for each image (`recalled`) and what it
changed (gain per channel, brightness, the best score's percentile: utils/memory_effect.py), and
the console says how many images it brightened, darkened or left unchanged.
--pictures also writes RESULT_DIR/strips/<name>.jpg (low | ori | mem | ground truth) and index.html.
--enhanced_dir DIR takes another method's outputs instead of our enhancer (plug-and-play). Example:
    python test.py --weights pre_trained_logs/enhancer/model_lolv1.pth --arch emnet_enhancer --embed_dim 32 \
        --input_dir datasets/LOL-v1/eval15 --save_images     # -> log_eval/eval15/model_lolv1/
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dataset.paired_folder import check_inputs
from dataset.pairing import find_pairs
from models.enhancer import EMNetEnhancer
from models.evaluate import evaluate_pairs, match_enhanced
from models.inference import check_border_margin
from models.loading import check_memory_flags, check_model_files, describe_config, load_enhancer, load_memory
from models.query import ENHANCER_DESCRIPTORS
from models.refiner import MemoryRefiner, refiner_from_flags
from options import (
    HelpFormatter,
    add_device_arg,
    add_max_memory_arg,
    add_memory_build_args,
    add_trained_model_args,
    set_memory_budget,
)
from utils.allocator import tune_allocator
from utils.device import resolve_device
from utils.errors import UserError, run_cli, writable_dir
from utils.folder_lock import FolderLock, first_missing
from utils.memory_effect import effect_line
from utils.perceptual import LPIPS_CONVENTION, build_lpips
from utils.pictures import write_pictures
from utils.report import METRICS, default_result_dir, format_table, write_report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="EMNet evaluation: enhancer (ori) and memory (mem) outputs and metrics",
                                formatter_class=HelpFormatter)
    p.add_argument("--input_dir", required=True,
                   help="folder with low/ (and high/ for metrics), a flat folder of images, or one image file")
    p.add_argument("--result_dir", default=None,
                   help="where results are written; default log_eval/<input name>/<weights label>[+<memory label>], "
                        "a label being a bundled file's name, else the name and a fingerprint of the bytes")
    p.add_argument("--enhanced_dir", default=None,
                   help="outputs of any other method, named like the inputs: refined by the memory "
                        "instead of running our enhancer")
    p.add_argument("--save_images", action="store_true", help="write the output images")
    p.add_argument("--pictures", action="store_true",
                   help="also write strips/<name>.jpg (low | ori | mem | ground truth) and index.html "
                        "(implies --save_images)")
    add_max_memory_arg(p)
    p.add_argument("--lpips", action="store_true",
                   help="also score LPIPS v0.1 (AlexNet; lower is better): ori_lpips / mem_lpips columns")
    p.add_argument("--lpips_alexnet", default=None,
                   help="torchvision's alexnet-owt-7be5be79.pth for --lpips; default: the torch hub "
                        "cache, downloaded once")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16 autocast for the networks: faster on recent GPUs and on CPUs with bf16 "
                        "instructions; scores move slightly (eval15 on a CPU: -0.03 dB ori, -0.007 dB mem)")
    add_trained_model_args(p, "external memory checkpoint: adds mem results")
    add_memory_build_args(p, shape_from_file=True)
    add_device_arg(p)
    return p


def load_models(args: argparse.Namespace, device: torch.device, enhanced: dict[str, Path] | None
                ) -> tuple[EMNetEnhancer | None, MemoryRefiner | None, dict[str, Any]]:
    """The enhancer (None where --enhanced_dir replaces it and the memory's query does not need
    it) and the memory's refiner (None without --mem_weights), on `device`, and what summary.json
    says of them."""
    memory, mem_ckpt = load_memory(args.mem_weights) if args.mem_weights else (None, {})
    if memory is not None:
        check_memory_flags(args.mem_size, args.K_feat_dim, args.V_feat_dim, memory.config, f"memory {args.mem_weights}")
    model, meta = None, {"input_dir": str(args.input_dir)}
    if enhanced is None or mem_ckpt.get("query_encoder") in ENHANCER_DESCRIPTORS:
        model, ckpt = load_enhancer(args.weights, args.arch, args.embed_dim)
        model.to(device)
        meta.update(weights=str(args.weights), model=describe_config(model.config),
                    checkpoint_epoch=ckpt.get("epoch"))
    refiner = None
    if memory is not None:
        refiner = refiner_from_flags(memory, mem_ckpt, args, model).to(device)
        read = refiner.read
        meta.update(mem_weights=str(args.mem_weights), query_encoder=read.query_encoder,
                    testing_top_k=read.top_k, temperature=read.temperature, strength=read.strength_flag,
                    pooling_mean=read.pooling_mean)
    if enhanced is not None:
        meta["enhanced_dir"] = str(args.enhanced_dir)
    return model, refiner, meta


def main(args: argparse.Namespace) -> None:
    args.save_images = args.save_images or args.pictures
    check_border_margin(args.border_margin)
    set_memory_budget(args.max_memory)
    device = resolve_device(args.device)
    check_model_files(None if args.enhanced_dir else args.weights, args.mem_weights, args.query_weights)
    pairs = find_pairs(args.input_dir, require_high=False)
    enhanced = match_enhanced(pairs, args.enhanced_dir) if args.enhanced_dir else None
    if enhanced is not None and not args.mem_weights:
        raise UserError("--enhanced_dir needs --mem_weights: the memory is what refines those images")
    check_inputs(pairs, enhanced)  # every bad image at once, before anything is written
    lpips = build_lpips(args.lpips_alexnet, "drop --lpips").to(device) if args.lpips else None
    model, refiner, meta = load_models(args, device, enhanced)
    result_dir = Path(args.result_dir or default_result_dir(
        args.input_dir, args.enhanced_dir or args.weights, args.mem_weights))
    created = first_missing(result_dir)
    lock = FolderLock(writable_dir(result_dir, "--result_dir"), "--result_dir", created)  # one run per folder
    stages = ["ori", "mem"] if refiner is not None else ["ori"]
    metrics = [*METRICS, "lpips"] if lpips is not None else list(METRICS)
    columns = [f"{s}_{m}" for s in stages for m in metrics] if pairs[0].high is not None else []
    if lpips is not None:
        meta["lpips_convention"] = LPIPS_CONVENTION
    if not columns:
        print(f"no ground truth (high/) in {args.input_dir}: the images are enhanced only, no metrics")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        out = {s: writable_dir(result_dir / s, "--result_dir") if args.save_images else None for s in stages}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            evaluate_pairs(model, pairs, device, refiner=refiner, enhanced=enhanced, ori_dir=out["ori"],
                           mem_dir=out.get("mem"), margin=args.border_margin, lpips=lpips, rows=rows)
    except BaseException as stop:
        if not rows:  # nothing done: leave neither the folder this run made nor its lock
            lock.abandon()
        elif isinstance(stop, KeyboardInterrupt):  # Ctrl-C or SIGTERM (run_cli): keep the images done
            write_report(result_dir, rows, columns, {**meta, "stopped_early": f"{len(rows)} of {len(pairs)} images"})
            print(f"stopped early: {result_dir / 'metrics.csv'} has the {len(rows)} of {len(pairs)} images done",
                  file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    meta.update(border_margin=args.border_margin, device=str(device), amp=args.amp, seconds=round(seconds, 2))
    summary = write_report(result_dir, rows, columns, meta)
    if columns:
        print(format_table(rows, columns, summary["mean"], summary["ci95"]))
    if summary.get("memory_effect"):
        print(effect_line([r["memory_effect"] for r in rows if "memory_effect" in r]))
    print(f"{len(rows)} images in {seconds:.1f} s on {device}; results in {result_dir}")
    if args.pictures:
        page = write_pictures(result_dir, pairs, rows, columns, summary, stages,
                              refiner.sources.thumbnail if refiner is not None else None)
        print(f"pictures: {result_dir / 'strips'}/<name>.jpg; open {page} in a browser")
    lock.release()


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))
