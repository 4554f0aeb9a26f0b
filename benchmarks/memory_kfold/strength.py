"""Strengths fitted on a fold's training passes, each read as an unseen scene would be."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.memory_kfold.statistics import PassStatistics
from benchmarks.memory_kfold.variants import StrengthRule, Variant
from models.abstention import unseen_reads
from models.calibration import STRENGTHS
from models.frozen_pass import FrozenPass, describe_passes
from models.memory import ExternalMemory

CONFIDENCE_QUANTILES = tuple(q / 10 for q in range(10))
CONFIDENCE_WIDTHS = (1e-6, 0.02, 0.05)


def confidence_strength(score: np.ndarray, smax: float, lo: float, width: float) -> np.ndarray:
    """Strength smax * clip((score - lo) / width, 0, 1): none below `lo`, full from lo + width."""
    return smax * np.clip((score - lo) / width, 0, 1)


def surrogate_psnr(moments: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(N,) PSNR of images with moments (N, 4, 3) (`statistics.gain_moments`) under per-channel
    gains (N, 3)."""
    a, b, d, n = moments[:, 0], moments[:, 1], moments[:, 2], moments[:, 3]
    mse = (gain ** 2 * a - 2 * gain * b + d).sum(1) / n.sum(1)
    return 10 * np.log10(1 / np.maximum(mse, 1e-12))


def fit_strength(variant: Variant, memory: ExternalMemory, train: list[FrozenPass], train_groups: np.ndarray,
                 stats: PassStatistics) -> dict:
    """The strength of `variant` (FITTED: one s; CONFIDENCE: (smax, lo, width)) on the strength
    grid of `models.calibration` (0 included) that maximises the mean surrogate PSNR of the
    training passes, each read from the memory with every slot of its own scene group hidden (as
    a new scene would be read). Sees the training passes only."""
    queries = describe_passes(train, variant.query)
    recalled, top1 = unseen_reads(memory, queries, train_groups, variant.top_k, variant.temperature)
    mu = torch.cat([stats.pooled_ori(fp, 1) for fp in train]).double().numpy()
    ratio = recalled.double().numpy()
    if variant.value != "ratio":
        ratio = ratio / np.maximum(mu, 1e-6)
    moments = np.stack([stats.moments(fp) for fp in train])
    ok = np.isfinite(top1)
    confidence = variant.strength.rule is StrengthRule.CONFIDENCE
    lows = np.quantile(top1[ok], CONFIDENCE_QUANTILES) if confidence else [-np.inf]
    widths = CONFIDENCE_WIDTHS if confidence else [1.0]
    best = None
    for smax in STRENGTHS:
        for lo in lows:
            for width in widths:
                sv = confidence_strength(np.where(ok, top1, -np.inf), smax, lo, width)
                value = surrogate_psnr(moments, 1 + sv[:, None] * (ratio - 1)).mean()
                if best is None or value > best[0]:
                    best = (value, smax, float(lo), width)
    return {"smax": best[1], "lo": best[2], "width": best[3]}
