"""Uncertainty of a mean over few images: the percentile bootstrap."""
from __future__ import annotations

import numpy as np

RESAMPLES = 10000


def bootstrap_ci(values, level: float = 0.95, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap interval at `level`
    (images resampled with replacement, `resamples` times, a fixed seed so reruns agree).

    For a paired comparison pass the per-image differences (e.g. mem - ori PSNR).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
