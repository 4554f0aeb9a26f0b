"""The predictability bound: a ridge regression of the correction a held-out image needs, from
everything simple its input offers."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.memory_kfold.statistics import PassStatistics
from dataset.scene_groups import grouped_folds
from models.frozen_pass import FrozenPass, describe_passes

RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0)


def predictor_features(passes: list[FrozenPass], stats: PassStatistics) -> np.ndarray:
    """(N, D): the `enhancer_levels` descriptor, the log of the output's mean colour and the
    output's per-channel std."""
    desc = describe_passes(passes, "enhancer_levels").double().numpy()
    return np.concatenate([desc, np.stack([stats.output_stats(fp) for fp in passes])], axis=1)


def log_ratio_target(passes: list[FrozenPass], stats: PassStatistics) -> np.ndarray:
    """(N, 3): log of the target's mean colour over the enhancer output's, per channel."""
    gt = torch.cat([stats.pooled_high(fp, 1) for fp in passes]).double()
    y = torch.cat([stats.pooled_ori(fp, 1) for fp in passes]).double()
    return torch.log(gt.clamp_min(1e-3) / y.clamp_min(1e-3)).numpy()


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> dict:
    mx, sx, my = x.mean(0), x.std(0) + 1e-8, y.mean(0)
    z = (x - mx) / sx
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - my))
    return {"mx": mx, "sx": sx, "my": my, "w": w, "alpha": alpha}


def _predict(model: dict, x: np.ndarray) -> np.ndarray:
    return ((x - model["mx"]) / model["sx"]) @ model["w"] + model["my"]


def fit_ratio_predictor(train: list[FrozenPass], train_groups: np.ndarray, seed: int, stats: PassStatistics) -> dict:
    """Ridge regression of the log ratio on `predictor_features`, its alpha chosen by a grouped
    3-fold split inside the training passes (nested: the held-out fold plays no part)."""
    x, y = predictor_features(train, stats), log_ratio_target(train, stats)
    inner = grouped_folds(train_groups, 3, seed)
    errors = []
    for alpha in RIDGE_ALPHAS:
        sse = 0.0
        for f in range(3):
            m = _ridge(x[inner != f], y[inner != f], alpha)
            sse += float(((_predict(m, x[inner == f]) - y[inner == f]) ** 2).sum())
        errors.append(sse)
    return _ridge(x, y, RIDGE_ALPHAS[int(np.argmin(errors))])


def predict_log_ratio(model: dict, passes: list[FrozenPass], stats: PassStatistics) -> np.ndarray:
    return _predict(model, predictor_features(passes, stats))


def predictability(passes: list[FrozenPass], folds: np.ndarray, groups: np.ndarray, seed: int,
                   stats: PassStatistics) -> dict:
    """Cross-validated R^2 (per channel and mean) of the ridge predictor of the log ratio, each
    fold predicted by a model fitted on the others, against each training part's own mean."""
    y = log_ratio_target(passes, stats)
    pred, base = np.zeros_like(y), np.zeros_like(y)
    for f in range(folds.max() + 1):
        train = [fp for fp, g in zip(passes, folds) if g != f]
        held = [fp for fp, g in zip(passes, folds) if g == f]
        model = fit_ratio_predictor(train, groups[folds != f], seed, stats)
        pred[folds == f] = predict_log_ratio(model, held, stats)
        base[folds == f] = log_ratio_target(train, stats).mean(0)
    r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - base) ** 2).sum(0)
    return {"r2_per_channel": r2.round(4).tolist(), "r2_mean": float(r2.mean())}
