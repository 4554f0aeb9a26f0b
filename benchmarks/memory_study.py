"""Does the external memory help on images it has never seen? K-fold cross-validation.

The frozen enhancer's output and features for every pair of --train_dir are computed once and
cached (`models/frozen_pass.py`; an interrupted run resumes). The pairs are split into K folds;
for each fold the memory is filled from the other folds only (the same `ExternalMemory.update`
as `train_memory.py`) and read for the held-out fold's whole images, as `test.py` reads it.
Everything a variant fits (strengths, confidence thresholds, the ridge predictor) is fitted on the
training folds only (`fold_corrections`). Every image is held out exactly once, so each variant is
scored on all pairs, none of which played a part in filling or calibrating the memory that corrected it.

Protocol: scene-grouped folds (`dataset/scene_groups.py`: pairs whose normal-light thumbnails
correlate >= --group_threshold form one scene group, and a group stays inside one fold), so a
held-out scene is new to the memory; a random K-fold, which lets other shots of a held-out scene
fill its memory, is reported beside it. Variants are chosen by the grouped figure only.

Variants with an abstention rule (`models.abstention`) fit it on the training folds, each training
pass read with its own scene group hidden, and leave the held-out passes it rejects uncorrected.

Per variant: the mean mem - ori PSNR and SSIM gain over all held-out images with a 95% bootstrap
interval (images resampled), next to bounds that no variant can be read without:
- `oracle`: the memory recalls the held-out target's own pooled colour (best possible recall),
- `constant`: it recalls the training folds' mean target colour (no recall at all),
- `predictor`: a ridge regression of log(target mean / output mean) per channel on everything
  simple an input offers (descriptor, output mean and std), with full gain; its cross-validated
  R^2 is reported too (how predictable the target is at all),
- `none`: no correction (gain 0).

With --test_dir it also reports, as an analysis and never as a result, the gain one would claim
on that set by picking the best of N memory epochs on it, as the original release did.

    python benchmarks/memory_study.py                       # LOL-v1 our485 from ../shared or datasets/
    python benchmarks/memory_study.py --train_dir DIR --folds 5 --test_dir ../shared/data/LOL-v1/eval15
Writes OUT/study.csv and OUT/study.json (with the scene groups and both fold assignments; default
OUT: log/memory_study). The enhancer pass takes
~5 s per 600x400 image on a 2-core CPU; the study itself minutes. The code is the package
`benchmarks/memory_kfold/`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory_kfold.folds import protocol_inflation, run_variant, scores  # noqa: E402
from benchmarks.memory_kfold.predictor import predictability  # noqa: E402
from benchmarks.memory_kfold.report import GROUPED_FLOOR_DB, choose, format_fits, format_rows, write_study  # noqa: E402
from benchmarks.memory_kfold.statistics import PassStatistics  # noqa: E402
from benchmarks.memory_kfold.variants import BOUND_BASE, BOUNDS, BY_NAME, select  # noqa: E402
from dataset.pairing import find_pairs  # noqa: E402
from dataset.scene_groups import DEFAULT_THRESHOLD, grouped_folds, input_scenes, scene_groups  # noqa: E402
from models.frozen_pass import cache_key, cached_passes  # noqa: E402
from models.inference import BORDER_MARGIN  # noqa: E402
from models.loading import load_enhancer  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.bundled import BUNDLED_ENHANCER  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import run_cli  # noqa: E402

PUBLISHED = BY_NAME["published: crops, k=1, softmax"]


def default_train_dir() -> str:
    for root in (REPO.parent / "shared" / "data" / "LOL-v1", REPO / "datasets" / "LOL-v1"):
        if (root / "our485").is_dir():
            return str(root / "our485")
    return "./datasets/LOL-v1/our485"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_dir", default=default_train_dir(), help="LOL-style folder of training pairs")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER), help="the frozen enhancer")
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold cross-validation")
    p.add_argument("--group_threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="pairs whose normal-light thumbnails correlate at least this much show one scene "
                        "(dataset/scene_groups.py); a scene group stays inside one fold")
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


def study_rows(args: argparse.Namespace, passes: list, scenes: np.ndarray, groups: np.ndarray,
               protocols: dict[str, np.ndarray], ori_scores: np.ndarray, stats: PassStatistics) -> list[dict]:
    """A row per bound and chosen variant: the grouped figures, the random ones beside them."""
    jobs = [(BOUND_BASE, b) for b in BOUNDS] + [(v, None) for v in select(args.variants)]
    rows = []
    for v, b in tqdm(jobs, desc="variants"):
        row = run_variant(v, passes, scenes, protocols["grouped"], groups, args.border_margin, args.seed, b,
                          ori_scores, not args.no_ssim, stats)
        rnd = run_variant(v, passes, scenes, protocols["random"], groups, args.border_margin, args.seed, b,
                          ori_scores, False, stats)
        row.update({f"random_{k}": rnd[k] for k in ("psnr_gain", "psnr_ci_low", "psnr_ci_high", "images_improved",
                                                   "images_corrected")})
        row["random_fitted_per_fold"] = rnd.get("fitted_per_fold", [])
        rows.append(row)
    return rows


def print_report(args: argparse.Namespace, report: dict) -> None:
    print(f"{report['pairs']} pairs of {args.train_dir} in {report['scene_groups']} scene groups (threshold "
          f"{args.group_threshold}), {args.folds}-fold; enhancer ori PSNR {report['ori_psnr_mean']:.3f}; gains "
          "mem - ori, 95% bootstrap intervals; scene-grouped folds (the figures), random folds beside them")
    print(format_rows(report["rows"]))
    fits = format_fits(report["rows"])
    if fits:
        print("fitted per grouped fold:\n" + fits)
    for name, pr in report["predictability"].items():
        print(f"{name} folds: cross-validated R^2 of the ridge predictor of log(GT mean / output mean) per "
              f"channel {pr['r2_per_channel']} (mean {pr['r2_mean']:.3f})")
    print(f"chosen (grouped 95% lower bound >= {GROUPED_FLOOR_DB} dB, then the best grouped gain; among reads "
          f"whose paired difference to it is not significant, the best random gain): {report['chosen']}")
    if "protocol_inflation" in report:
        inf = report["protocol_inflation"]
        print(f"analysis (not a result): {inf['variant']} on {args.test_dir}: best of {inf['epochs']} epochs "
              f"{inf['best_of_epochs']:+.3f} dB (epoch {inf['best_epoch']}), last epoch {inf['last_epoch']:+.3f}, "
              f"mean over epochs {inf['mean_over_epochs']:+.3f}")


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
    stats = PassStatistics()
    ori_scores = np.array([scores(fp, None, BOUND_BASE, None, not args.no_ssim) for fp in
                           tqdm(passes, desc="ori scores", leave=False)])
    scenes = input_scenes(pairs)
    groups = scene_groups([fp.high for fp in passes], args.group_threshold)
    protocols = {"grouped": grouped_folds(groups, args.folds, args.seed),
                 "random": grouped_folds(np.arange(len(passes)), args.folds, args.seed)}  # each image its own group
    rows = study_rows(args, passes, scenes, groups, protocols, ori_scores, stats)
    report = {"train_dir": str(args.train_dir), "weights": str(args.weights), "pairs": len(passes),
              "folds": args.folds, "seed": args.seed, "border_margin": args.border_margin,
              "ori_psnr_mean": float(ori_scores[:, 0].mean()), "bootstrap": "10000 resamples of images, seed 0",
              "protocol": "grouped (the figures); random K-fold beside it (random_*)",
              "group_threshold": args.group_threshold, "scene_groups": int(groups.max() + 1),
              "names": [fp.name for fp in passes], "groups_of_names": groups.tolist(),
              "folds_of_names": protocols["grouped"].tolist(), "random_folds_of_names": protocols["random"].tolist(),
              "predictability": {p: predictability(passes, f, groups, args.seed, stats) for p, f in protocols.items()},
              "chosen": choose(rows), "grouped_floor_db": GROUPED_FLOOR_DB,
              "rows": rows}
    if test is not None:
        report["protocol_inflation"] = protocol_inflation(PUBLISHED, passes, test, args.border_margin, args.seed, stats)
    written = write_study(Path(args.out), report)
    print_report(args, report)
    print(f"written: {written[0]}, {written[1]}")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))
