"""Simple and published baselines on a LOL-style folder, scored exactly as test.py scores, and
optionally corrected by our external memory (test.py's plug-and-play --enhanced_dir mode).

    python benchmarks/baselines.py --input_dir datasets/LOL-v1/eval15
    python benchmarks/baselines.py --input_dir datasets/LOL-v1/eval15 \
        --mem_weights pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth

Writes RESULT_DIR/<method>/<name>.png (8-bit, rounded), with a memory RESULT_DIR/<method>_mem/
(test.py's output), and the table in RESULT_DIR/baselines.md and baselines.json. Methods and
their fixed parameters: models/baselines.py. Set GLIBC_TUNABLES as test_script.sh does on Linux.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.paired_folder import read_pair  # noqa: E402
from dataset.pairing import ImagePair, find_pairs  # noqa: E402
from models import baselines  # noqa: E402
from models.evaluate import evaluate_pairs, match_enhanced  # noqa: E402
from options import add_device_arg  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402
from utils.bundled import BUNDLED_ENHANCER  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import (  # noqa: E402
    UserError,
    run_cli,
    writable_dir,  # noqa: E402
)
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8, write_image  # noqa: E402
from utils.metrics import METRIC_CONVENTION  # noqa: E402
from utils.report import METRICS, mean_scores  # noqa: E402

METHODS = ("input", "gamma", "clahe", "lime", "zerodce")
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


@dataclass(frozen=True)
class Method:
    """A baseline: its name, a one-line description with its parameters, and the image function."""

    name: str
    description: str
    run: Callable[[np.ndarray], np.ndarray]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="folder with low/ and high/ (e.g. LOL-v1/eval15)")
    p.add_argument("--result_dir", default="./log_eval/baselines", help="where outputs and tables go")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--mem_weights", default=None,
                   help="external memory checkpoint: adds the '+memory' columns (runs test.py per method)")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER),
                   help="enhancer checkpoint for the memory's enhancer query (test.py --weights)")
    p.add_argument("--zerodce_weights", default=None,
                   help="Zero-DCE checkpoint (default: the one inside the installed neuro-low-light package)")
    add_device_arg(p)
    return p


def parse_methods(text: str) -> list[str]:
    """The requested method names in order, without repeats; unknown names are a UserError."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise UserError(f"--methods {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METHODS)}")
    return names


def zerodce_method(weights: str | None, device: torch.device) -> Method:
    path = baselines.find_zerodce_weights(weights)
    model = baselines.load_zerodce(path).to(device)

    @torch.no_grad()
    def run(img: np.ndarray) -> np.ndarray:
        return tensor_to_image(model(image_to_tensor(img).to(device)))

    return Method("zerodce", f"Zero-DCE (Guo et al., CVPR 2020), {model.iterations} LE iterations, "
                  f"weights {path}", run)


def build_method(name: str, args: argparse.Namespace, device: torch.device) -> Method:
    lp = baselines.LimeParams()
    if name == "input":
        return Method(name, "the low-light input itself", lambda img: img)
    if name == "gamma":
        return Method(name, f"gamma correction, out = in ** {baselines.GAMMA_EXPONENT:.4f} (1/2.2)",
                      baselines.gamma_correction)
    if name == "clahe":
        return Method(name, f"OpenCV CLAHE on L of 8-bit LAB, clipLimit {baselines.CLAHE_CLIP_LIMIT}, "
                      f"tileGridSize {baselines.CLAHE_TILE_GRID}", baselines.clahe)
    if name == "lime":
        return Method(name, f"LIME (Guo et al., TIP 2017), sped-up solver, strategy III, alpha {lp.alpha}, "
                      f"sigma {lp.sigma}, gamma {lp.gamma}, eps {lp.eps}, no denoising", baselines.lime)
    return zerodce_method(args.zerodce_weights, device)


def enhance_folder(method: Method, pairs: list[ImagePair], out_dir: Path) -> float:
    """Write method(low) for every pair to out_dir/<name>.png (8-bit, rounded); seconds spent."""
    seconds = 0.0
    for pair in tqdm(pairs, desc=method.name, unit="img", leave=False):
        low, _ = read_pair(pair)
        start = time.perf_counter()
        out = method.run(low)
        seconds += time.perf_counter() - start
        write_image(out_dir / f"{pair.name}.png", to_uint8(out))
    return seconds


def score_folder(pairs: list[ImagePair], out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-image rows and means of the images in out_dir, with test.py's own loop (its ori_* scores)."""
    rows = evaluate_pairs(None, pairs, torch.device("cpu"), enhanced=match_enhanced(pairs, out_dir),
                          progress=False)
    rows = [{k.removeprefix("ori_"): v for k, v in r.items()} for r in rows]
    return rows, mean_scores(rows, list(METRICS))


def run_memory(method_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """test.py --enhanced_dir method_dir --mem_weights ...: the memory-corrected means."""
    out = method_dir.with_name(f"{method_dir.name}_mem")
    cmd = [sys.executable, str(REPO / "test.py"), "--input_dir", str(Path(args.input_dir).resolve()),
           "--enhanced_dir", str(method_dir.resolve()), "--mem_weights", str(Path(args.mem_weights).resolve()),
           "--weights", str(Path(args.weights).resolve()), "--result_dir", str(out.resolve()),
           "--device", args.device, "--save_images"]
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UserError(f"test.py failed on {method_dir}: {last}")
    mean = json.loads((out / "summary.json").read_text())["mean"]
    return {m: mean[f"mem_{m}"] for m in METRICS}


def check_memory_files(args: argparse.Namespace) -> None:
    """Fail before the baselines run, not after, when a memory run cannot start."""
    for flag, path in (("--mem_weights", args.mem_weights), ("--weights", args.weights)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist; pass the checkpoint's path "
                            "(see pre_trained_logs/README.md)")


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{platform.node()}: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}{gpu}")


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | PSNR | SSIM | GT-mean PSNR | +memory PSNR | +memory SSIM |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        mem = r.get("memory") or {}
        lines.append(f"| {r['method']} | {_cell(r['psnr'], 2)} | {_cell(r['ssim'], 4)} | "
                     f"{_cell(r['gt_mean_psnr'], 2)} | {_cell(mem.get('psnr'), 2)} | {_cell(mem.get('ssim'), 4)} |")
    return "\n".join(lines)


def markdown_report(table: str, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Baselines on {meta['input_dir']}", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- images: {meta['num_images']}", f"- metrics: {METRIC_CONVENTION}"]
    if meta.get("mem_weights"):
        lines.append(f"- memory: `{meta['mem_weights']}` with enhancer `{meta['weights']}` (test.py --enhanced_dir)")
    lines += ["", table, "", "## Methods", ""]
    lines += [f"- `{r['method']}`: {r['description']} ({r['seconds_per_image']:.2f} s/image)" for r in results]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    names = parse_methods(args.methods)
    pairs = find_pairs(args.input_dir)
    device = resolve_device(args.device)
    if args.mem_weights:
        check_memory_files(args)
    methods = [build_method(n, args, device) for n in names]
    result_dir = writable_dir(args.result_dir, "--result_dir")
    start = time.perf_counter()
    results = []
    for method in methods:
        out_dir = writable_dir(result_dir / method.name, "--result_dir")
        seconds = enhance_folder(method, pairs, out_dir)
        rows, means = score_folder(pairs, out_dir)
        result = {"method": method.name, "description": method.description, **means,
                  "seconds_per_image": seconds / len(pairs), "images": rows}
        if args.mem_weights:
            result["memory"] = run_memory(out_dir, args)
        results.append(result)
        mem = result.get("memory")
        print(f"{method.name}: PSNR {means['psnr']:.2f}, SSIM {means['ssim']:.4f} ({seconds / len(pairs):.2f} "
              f"s/image)" + (f"; +memory {mem['psnr']:.2f}, {mem['ssim']:.4f}" if mem else ""), flush=True)
    meta = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(device),
            "command": shlex.join(["python", *sys.argv]), "input_dir": str(args.input_dir),
            "num_images": len(pairs), "convention": METRIC_CONVENTION, "mem_weights": args.mem_weights,
            "weights": args.weights if args.mem_weights else None,
            "seconds": round(time.perf_counter() - start, 1)}
    table = markdown_table(results)
    atomic_write_text(result_dir / "baselines.md", markdown_report(table, results, meta))
    atomic_write_text(result_dir / "baselines.json", json.dumps({**meta, "methods": results}, indent=2) + "\n")
    print(table)
    print(f"{len(pairs)} images, {len(methods)} methods in {meta['seconds']} s; results in {result_dir}")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))
