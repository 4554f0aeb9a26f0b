"""One variant through the K folds: what each fold's memory does to its held-out passes, and the
gains that makes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.memory_kfold.filling import fill
from benchmarks.memory_kfold.predictor import fit_ratio_predictor, predict_log_ratio
from benchmarks.memory_kfold.statistics import PassStatistics
from benchmarks.memory_kfold.strength import confidence_strength, fit_strength
from benchmarks.memory_kfold.variants import BOUNDS, StrengthRule, Variant
from models.abstention import fit_abstention, scene_match
from models.calibration import calibrate_strength
from models.frozen_pass import FrozenPass, describe_passes
from models.memory import ExternalMemory
from utils.image_io import tensor_to_image, to_uint8
from utils.metrics import psnr, ssim
from utils.stats import bootstrap_ci


@dataclass
class Fold:
    """The passes a fold's memory is filled and fitted from (`train`, their scene `groups` and
    input `scenes`) and the passes it corrects (`held`, their input `held_scenes`)."""

    train: list[FrozenPass]
    groups: np.ndarray
    scenes: np.ndarray
    held: list[FrozenPass]
    held_scenes: np.ndarray


@dataclass
class Corrections:
    """What one fold does to each held-out pass: the recalled colour (3 p p,), the strength and
    whether it corrects at all; and what it fitted."""

    recalled: list[torch.Tensor]
    strengths: list
    corrected: list[bool]
    fitted: dict = field(default_factory=dict)


def scores(fp: FrozenPass, recalled: torch.Tensor | None, variant: Variant, strength: float | None,
           with_ssim: bool) -> tuple[float, float]:
    """(PSNR, SSIM) of the corrected output (the plain output when `recalled` is None)."""
    out = fp.ori[None].float()
    if recalled is not None:
        out = variant.read(strength).correct(out, recalled[None], variant.pooling_size)
    out8 = to_uint8(tensor_to_image(out))
    return psnr(out8, fp.high), (ssim(out8, fp.high) if with_ssim else math.nan)


def _bound(bound: str, fold: Fold, p: int, seed: int, stats: PassStatistics) -> Corrections:
    """The recall of a bound: the held-out target's own colour (oracle), the training mean
    (constant) or the ridge prediction (predictor)."""
    strength = 1.0 if bound in ("oracle_full", "predictor") else None
    fitted: dict = {}
    if bound in ("oracle", "oracle_full"):
        recalled = [stats.pooled_high(fp, p)[0] for fp in fold.held]
    elif bound == "constant":
        mean = torch.cat([stats.pooled_high(fp, p) for fp in fold.train]).mean(0)
        recalled = [mean] * len(fold.held)
    else:
        model = fit_ratio_predictor(fold.train, fold.groups, seed, stats)
        fitted = {"ridge_alpha": model["alpha"]}
        recalled = list(torch.exp(torch.from_numpy(predict_log_ratio(model, fold.held, stats))).float()
                        * torch.cat([stats.pooled_ori(fp, 1) for fp in fold.held]))
    n = len(fold.held)
    return Corrections(recalled, [strength] * n, [True] * n, fitted)


def _abstention(variant: Variant, memory: ExternalMemory, fold: Fold, strength: float | None,
                held_top1: torch.Tensor) -> tuple[list[bool], dict]:
    """Which held-out passes the variant's abstention rule corrects, the rule fitted on the
    training passes read as unseen scenes (`models.abstention.fit_abstention`)."""
    if variant.value != "colour":
        raise ValueError("abstention is studied with colour values only")
    read, fit = fit_abstention(variant.abstain, memory, describe_passes(fold.train, variant.query), fold.groups,
                               fold.scenes, [fp.ori for fp in fold.train], [fp.high for fp in fold.train],
                               variant.read(strength))
    matches = scene_match(fold.held_scenes, fold.scenes)
    corrected = read.corrects(np.asarray(held_top1, dtype=np.float64), matches).tolist()
    return corrected, {k: fit[k] for k in ("min_score", "min_scene", "corrected")}


def fold_corrections(variant: Variant, fold: Fold, margin: int, seed: int, stats: PassStatistics,
                     bound: str | None = None) -> Corrections:
    """What one fold does to its held-out passes. Everything fitted (the memory, strengths,
    confidence thresholds, abstention bounds, the predictor of the `predictor` bound) sees
    `fold.train` only; of `fold.held` only the enhancer's side (output, features, input) is read,
    never the ground truth, except by the `oracle` bounds, which recall it on purpose."""
    p = variant.pooling_size
    if bound is not None:
        return _bound(bound, fold, p, seed, stats)
    memory = fill(variant, fold.train, stats, margin, seed)
    queries = describe_passes(fold.held, variant.query)
    recalled = memory.read(queries, variant.top_k, variant.temperature)
    top1 = memory.ranked(queries, 1)[0][:, 0]
    if variant.value == "ratio":
        recalled = recalled * torch.cat([stats.pooled_ori(fp, p) for fp in fold.held])
    rule, n = variant.strength.rule, len(fold.held)
    strength, fitted = variant.strength.value, {}
    if rule is StrengthRule.CALIBRATED:
        strength, _ = calibrate_strength(memory, describe_passes(fold.train, variant.query),
                                         [fp.ori for fp in fold.train], [fp.high for fp in fold.train],
                                         variant.read(None))
        fitted = {"strength": strength}
    elif variant.strength.fitted_on_unseen:
        fitted = fit_strength(variant, memory, fold.train, fold.groups, stats)
        strengths = confidence_strength(top1.double().numpy(), fitted["smax"], fitted["lo"], fitted["width"])
        return Corrections(list(recalled), list(strengths.astype(float)), [True] * n, fitted)
    corrected = [True] * n
    if variant.abstain != "off":
        corrected, fit = _abstention(variant, memory, fold, strength, top1)
        fitted = {**fitted, **fit}
    return Corrections(list(recalled), [strength] * n, corrected, fitted)


def split(passes: list[FrozenPass], scenes: np.ndarray, groups: np.ndarray, folds: np.ndarray, f: int
          ) -> tuple[list[int], Fold]:
    """The held-out indices of fold `f` and the fold."""
    held = [i for i in range(len(passes)) if folds[i] == f]
    train = [i for i in range(len(passes)) if folds[i] != f]
    return held, Fold([passes[i] for i in train], groups[train], scenes[train],
                      [passes[i] for i in held], scenes[held])


def run_variant(variant: Variant, passes: list[FrozenPass], scenes: np.ndarray, folds: np.ndarray,
                groups: np.ndarray, margin: int, seed: int, bound: str | None, ori_scores: np.ndarray,
                with_ssim: bool, stats: PassStatistics) -> dict:
    """K-fold gains of one variant (or of a bound: a key of `variants.BOUNDS`)."""
    gains = np.zeros((len(passes), 2))
    fitted, corrected = [], 0
    for f in range(folds.max() + 1):
        held, fold = split(passes, scenes, groups, folds, f)
        c = fold_corrections(variant, fold, margin, seed + f, stats, bound)
        fitted.append(c.fitted)
        for i, r, st, on in zip(held, c.recalled, c.strengths, c.corrected):
            gains[i] = np.array(scores(passes[i], r if on else None, variant, st, with_ssim)) - ori_scores[i]
            corrected += on
    row = {"variant": variant.name if bound is None else BOUNDS[bound], "images": len(passes)}
    for j, metric in enumerate(("psnr", "ssim")):
        if with_ssim or metric == "psnr":
            mean, lo, hi = bootstrap_ci(gains[:, j], seed=seed)
            row.update({f"{metric}_gain": mean, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
    row["images_improved"] = int((gains[:, 0] > 0).sum())
    row["images_corrected"] = int(corrected)
    if any(fitted):
        row["fitted_per_fold"] = fitted
    row["settings"] = variant.settings() if bound is None else {}
    row["per_image_psnr_gain"] = gains[:, 0].round(4).tolist()
    return row


def protocol_inflation(variant: Variant, passes: list[FrozenPass], test: list[FrozenPass], margin: int,
                       seed: int, stats: PassStatistics) -> dict:
    """Analysis, not a result: the test-set gain after each of the variant's memory epochs (filled
    from all training passes), and the best of them, which the original release would report."""
    queries = describe_passes(test, variant.query)
    ori = [scores(fp, None, variant, None, False)[0] for fp in test]
    gains = []

    def score_epoch(epoch: int, memory: ExternalMemory) -> None:
        recalled = variant.read(None).recall(memory, queries)  # the strength only corrects
        gains.append(float(np.mean([scores(fp, r, variant, variant.strength.value, False)[0] - o
                                    for fp, r, o in zip(test, recalled, ori)])))

    fill(variant, passes, stats, margin, seed, score_epoch)
    return {"variant": variant.name, "epochs": variant.epochs, "test_gain_per_epoch": gains,
            "best_of_epochs": max(gains), "best_epoch": int(np.argmax(gains)) + 1,
            "last_epoch": gains[-1], "mean_over_epochs": float(np.mean(gains))}
