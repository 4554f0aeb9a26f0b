"""Does the external memory help on images it has never seen? K-fold cross-validation.

The frozen enhancer's output and features for every pair of --train_dir are computed once and
cached (`models/frozen_pass.py`; an interrupted run resumes). The pairs are split into K folds;
for each fold the memory is filled from the other folds only (the same `ExternalMemory.update`
as `train_memory.py`) and read for the held-out fold's whole images, as `test.py` reads it.
Every image is held out exactly once, so each variant is scored on all pairs, none of which
played a part in filling or calibrating the memory that corrected it.

Per variant: the mean mem - ori PSNR and SSIM gain over all held-out images with a 95% bootstrap
interval (images resampled), next to three bounds that no variant can be read without:
- `oracle`: the memory recalls the held-out target's own pooled colour (best possible recall),
- `constant`: it recalls the training folds' mean target colour (no recall at all),
- `none`: no correction (gain 0).

With --test_dir it also reports, as an analysis and never as a result, the gain one would claim
on that set by picking the best of N memory epochs on it, as the original release did.

    python benchmarks/memory_study.py                       # LOL-v1 our485 from ../shared or datasets/
    python benchmarks/memory_study.py --train_dir DIR --folds 5 --test_dir ../shared/data/LOL-v1/eval15
Writes OUT/study.csv and OUT/study.json (default OUT: log/memory_study). The enhancer pass takes
~5 s per 600x400 image on a 2-core CPU; the study itself minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.pairing import find_pairs  # noqa: E402
from models.calibration import calibrate_strength  # noqa: E402
from models.frozen_pass import FrozenPass, cache_key, cached_passes, describe_passes  # noqa: E402
from models.inference import BORDER_MARGIN, MULTIPLE  # noqa: E402
from models.loading import load_enhancer  # noqa: E402
from models.memory import ExternalMemory, MemoryConfig, pooled_value, refine_with_memory  # noqa: E402
from models.options import BUNDLED_ENHANCER  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.image_io import tensor_to_image, to_uint8  # noqa: E402
from utils.metrics import psnr, ssim  # noqa: E402
from utils.stats import bootstrap_ci  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One memory setting. `strength`: None = the release's softmax correction, a number = a fixed
    gain strength, "auto" = calibrated on the training folds (leave-one-out reads)."""

    name: str
    entries: str = "images"  # "crops": 128-px crops, one per image and epoch (the release); "images"
    query: str = "enhancer"
    top_k: int = 1
    temperature: float = 1.0
    pooling_size: int = 1
    pooling_mean: bool = False
    strength: float | str | None = None
    epochs: int = 40  # passes over the training images ("crops" entries only)
    crop: int = 128


VARIANTS = [
    Variant("published: crops, k=1, softmax", entries="crops"),
    Variant("crops, k=16, T=0.01, softmax", entries="crops", top_k=16, temperature=0.01),
    Variant("images, k=1, softmax"),
    Variant("images, k=8, T=0.01, softmax", top_k=8, temperature=0.01),
    Variant("images, levels, k=1, softmax", query="enhancer_levels"),
    Variant("images, levels, k=8, T=0.01, softmax", query="enhancer_levels", top_k=8, temperature=0.01),
    Variant("images, k=8, T=0.01, p=2 mean, softmax", top_k=8, temperature=0.01, pooling_size=2, pooling_mean=True),
    Variant("images, k=1, calibrated", strength="auto"),
    Variant("images, k=8, T=0.01, calibrated", top_k=8, temperature=0.01, strength="auto"),
    Variant("images, levels, k=8, T=0.01, calibrated", query="enhancer_levels", top_k=8, temperature=0.01,
            strength="auto"),
    Variant("crops, k=16, T=0.01, calibrated", entries="crops", top_k=16, temperature=0.01, strength="auto"),
]


def high_tensor(fp: FrozenPass) -> torch.Tensor:
    return torch.from_numpy(fp.high).permute(2, 0, 1)[None].float() / 255


def crop_samples(fp: FrozenPass, crop: int, p: int, margin: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random `crop`-px crop of a pair: its descriptor (from the latent map's window over the
    crop, i.e. the crop seen in the context of its whole image) and its target's pooled value.
    The crop is aligned to the latent grid (stride 8)."""
    h, w = fp.high.shape[:2]
    s = MULTIPLE
    y0 = int(rng.integers(0, (h - crop) // s + 1)) * s
    x0 = int(rng.integers(0, (w - crop) // s + 1)) * s
    ly, lx = (y0 + margin) // s, (x0 + margin) // s
    window = fp.latent[:, ly:ly + crop // s, lx:lx + crop // s].float().flatten(1)
    query = F.normalize(torch.cat([window.mean(1), window.std(1, unbiased=False)]), dim=0)
    patch = torch.from_numpy(fp.high[y0:y0 + crop, x0:x0 + crop]).permute(2, 0, 1)[None].float() / 255
    value = pooled_value(patch, p)[0]
    return query, value


def fill(variant: Variant, passes: list[FrozenPass], margin: int, seed: int,
         after_epoch: Callable[[int, ExternalMemory], None] | None = None) -> ExternalMemory:
    """A memory written from `passes` (sample index = position in the list) with the update rule;
    `after_epoch(epoch, memory)` is called after each pass over them."""
    p = variant.pooling_size
    if variant.entries == "images":
        queries = describe_passes(passes, variant.query)
        values = torch.cat([pooled_value(high_tensor(fp), p) for fp in passes])
        epochs = [(queries, values, torch.arange(len(passes)))]
    elif variant.entries == "crops":
        if variant.query != "enhancer":
            raise ValueError("crop entries are studied with the enhancer query only")
        rng = np.random.default_rng(seed)
        epochs = []
        for _ in range(variant.epochs):
            order = rng.permutation(len(passes))
            qv = [crop_samples(passes[i], variant.crop, p, margin, rng) for i in order]
            epochs.append((torch.stack([q for q, _ in qv]), torch.stack([v for _, v in qv]),
                           torch.as_tensor(order)))
    else:
        raise ValueError(f"unknown entries {variant.entries!r}")
    config = MemoryConfig(key_dim=epochs[0][0].shape[1], pooling_size=p)
    memory = ExternalMemory(config, torch.Generator().manual_seed(seed))
    for epoch, (queries, values, index) in enumerate(epochs, 1):
        for part in range(0, len(index), 128):  # the release's batch of 128
            sl = slice(part, part + 128)
            memory.update(queries[sl], values[sl], index[sl])
        if after_epoch is not None:
            after_epoch(epoch, memory)
    return memory


def scores(fp: FrozenPass, recalled: torch.Tensor | None, variant: Variant, strength,
           with_ssim: bool) -> tuple[float, float]:
    """(PSNR, SSIM) of the corrected output (the plain output when `recalled` is None)."""
    out = fp.ori[None].float()
    if recalled is not None:
        out = refine_with_memory(out, recalled[None], variant.pooling_size, variant.pooling_mean, strength)
    out8 = to_uint8(tensor_to_image(out))
    return psnr(out8, fp.high), (ssim(out8, fp.high) if with_ssim else math.nan)


def fold_of(n: int, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each of n samples: a seeded permutation cut into k near-equal parts."""
    folds = np.empty(n, dtype=int)
    folds[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return folds


def run_variant(variant: Variant, passes: list[FrozenPass], folds: np.ndarray, margin: int, seed: int,
                bound: str | None, ori_scores: np.ndarray, with_ssim: bool) -> dict:
    """K-fold gains of one variant (or of a bound: 'oracle', 'oracle_full', 'constant')."""
    gains = np.zeros((len(passes), 2))
    strengths = []
    for f in range(folds.max() + 1):
        held = [i for i in range(len(passes)) if folds[i] == f]
        train = [passes[i] for i in range(len(passes)) if folds[i] != f]
        strength = 1.0 if bound == "oracle_full" else variant.strength
        if bound in ("oracle", "oracle_full"):
            recalled = [pooled_value(high_tensor(passes[i]), variant.pooling_size)[0] for i in held]
        elif bound == "constant":
            mean = torch.cat([pooled_value(high_tensor(fp), variant.pooling_size) for fp in train]).mean(0)
            recalled = [mean] * len(held)
        else:
            memory = fill(variant, train, margin, seed + f)
            if strength == "auto":
                strength, _ = calibrate_strength(memory, describe_passes(train, variant.query),
                                                 [fp.ori for fp in train], [fp.high for fp in train],
                                                 variant.top_k, variant.temperature, variant.pooling_mean)
                strengths.append(strength)
            queries = describe_passes([passes[i] for i in held], variant.query)
            recalled = list(memory.read(queries, variant.top_k, variant.temperature))
        for i, r in zip(held, recalled):
            gains[i] = np.array(scores(passes[i], r, variant, strength, with_ssim)) - ori_scores[i]
    row = {"variant": variant.name if bound is None else bound_name(bound), "images": len(passes)}
    for j, metric in enumerate(("psnr", "ssim")):
        if with_ssim or metric == "psnr":
            mean, lo, hi = bootstrap_ci(gains[:, j], seed=seed)
            row.update({f"{metric}_gain": mean, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
    row["images_improved"] = int((gains[:, 0] > 0).sum())
    if strengths:
        row["calibrated_strengths"] = strengths
    row["settings"] = asdict(variant) if bound is None else {}
    row["per_image_psnr_gain"] = gains[:, 0].round(4).tolist()
    return row


def bound_name(bound: str) -> str:
    return {"oracle": "bound: oracle recall, softmax", "oracle_full": "bound: oracle recall, full gain",
            "constant": "bound: constant training mean, softmax"}[bound]


def protocol_inflation(variant: Variant, passes: list[FrozenPass], test: list[FrozenPass], margin: int,
                       seed: int) -> dict:
    """Analysis, not a result: the test-set gain after each of the variant's memory epochs (filled
    from all training passes), and the best of them, which the original release would report."""
    queries = describe_passes(test, variant.query)
    ori = [scores(fp, None, variant, None, False)[0] for fp in test]
    gains = []

    def score_epoch(epoch: int, memory: ExternalMemory) -> None:
        recalled = memory.read(queries, variant.top_k, variant.temperature)
        gains.append(float(np.mean([scores(fp, r, variant, variant.strength, False)[0] - o
                                    for fp, r, o in zip(test, recalled, ori)])))

    fill(variant, passes, margin, seed, score_epoch)
    return {"variant": variant.name, "epochs": variant.epochs, "test_gain_per_epoch": gains,
            "best_of_epochs": max(gains), "best_epoch": int(np.argmax(gains)) + 1,
            "last_epoch": gains[-1], "mean_over_epochs": float(np.mean(gains))}


def default_train_dir() -> str:
    for root in (REPO.parent / "shared" / "data" / "LOL-v1", REPO / "datasets" / "LOL-v1"):
        if (root / "our485").is_dir():
            return str(root / "our485")
    return "./datasets/LOL-v1/our485"


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'variant':<48} {'PSNR gain [95% CI]':>26} {'SSIM gain [95% CI]':>30} {'improved':>9}"]
    for r in rows:
        ps = f"{r['psnr_gain']:+.3f} [{r['psnr_ci_low']:+.3f}, {r['psnr_ci_high']:+.3f}]"
        ss = (f"{r['ssim_gain']:+.4f} [{r['ssim_ci_low']:+.4f}, {r['ssim_ci_high']:+.4f}]"
              if "ssim_gain" in r else "-")
        lines.append(f"{r['variant']:<48} {ps:>26} {ss:>30} {r['images_improved']:>4}/{r['images']}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_dir", default=default_train_dir(), help="LOL-style folder of training pairs")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER), help="the frozen enhancer")
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold cross-validation")
    p.add_argument("--border_margin", type=int, default=BORDER_MARGIN, help="as test.py")
    p.add_argument("--variants", nargs="*", default=None, help="names (or substrings) of variants to run")
    p.add_argument("--no_ssim", action="store_true", help="PSNR only (SSIM is most of the study's time)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs (quick trials)")
    p.add_argument("--test_dir", default=None,
                   help="also the best-of-epochs analysis on this set (e.g. eval15); never used to choose")
    p.add_argument("--cache_dir", default="./log/cache/frozen", help="cached enhancer passes")
    p.add_argument("--out", default="./log/memory_study", help="study.csv and study.json go here")
    p.add_argument("--cache_only", action="store_true", help="only compute the enhancer passes")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    enhancer, _ = load_enhancer(args.weights, None, None)
    enhancer.to(device).eval()
    cache = Path(args.cache_dir) / cache_key(args.weights, args.border_margin)
    pairs = find_pairs(args.train_dir)[: args.limit]
    passes = cached_passes(enhancer, pairs, device, cache, args.border_margin)
    test = (cached_passes(enhancer, find_pairs(args.test_dir), device, cache / "test", args.border_margin,
                          desc="test-set pass") if args.test_dir else None)
    if args.cache_only:
        print(f"{len(passes)} enhancer passes cached in {cache}")
        return
    with_ssim = not args.no_ssim
    ori_scores = np.array([scores(fp, None, VARIANTS[0], None, with_ssim) for fp in
                           tqdm(passes, desc="ori scores", leave=False)])
    folds = fold_of(len(passes), args.folds, args.seed)
    chosen = [v for v in VARIANTS if not args.variants or any(s in v.name for s in args.variants)]
    jobs = [(VARIANTS[2], b) for b in ("oracle", "oracle_full", "constant")] + [(v, None) for v in chosen]
    rows = [run_variant(v, passes, folds, args.border_margin, args.seed, b, ori_scores, with_ssim)
            for v, b in tqdm(jobs, desc="variants")]
    report = {"train_dir": str(args.train_dir), "weights": str(args.weights), "pairs": len(passes),
              "folds": args.folds, "seed": args.seed, "border_margin": args.border_margin,
              "ori_psnr_mean": float(ori_scores[:, 0].mean()), "bootstrap": "10000 resamples of images, seed 0",
              "names": [fp.name for fp in passes], "folds_of_names": folds.tolist(),
              "rows": rows}
    if test is not None:
        report["protocol_inflation"] = protocol_inflation(VARIANTS[0], passes, test, args.border_margin, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(report, indent=2) + "\n")
    keys = ["variant", "images", "psnr_gain", "psnr_ci_low", "psnr_ci_high", "ssim_gain", "ssim_ci_low",
            "ssim_ci_high", "images_improved"]
    atomic_write_text(out / "study.csv", "\n".join([",".join(keys)] + [
        ",".join(f'"{r[k]}"' if k == "variant" else str(r.get(k, "")) for k in keys) for r in rows]) + "\n")
    print(f"{len(passes)} pairs of {args.train_dir}, {args.folds}-fold; enhancer ori PSNR "
          f"{report['ori_psnr_mean']:.3f}; gains mem - ori, 95% bootstrap intervals")
    print(format_rows(rows))
    if test is not None:
        inf = report["protocol_inflation"]
        print(f"analysis (not a result): {inf['variant']} on {args.test_dir}: best of {inf['epochs']} epochs "
              f"{inf['best_of_epochs']:+.3f} dB (epoch {inf['best_epoch']}), last epoch {inf['last_epoch']:+.3f}, "
              f"mean over epochs {inf['mean_over_epochs']:+.3f}")
    print(f"written: {out / 'study.csv'}, {out / 'study.json'}")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))
