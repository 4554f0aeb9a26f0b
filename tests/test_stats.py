"""utils/stats.py: the bootstrap confidence interval of a mean."""
from __future__ import annotations

import numpy as np
import pytest

from utils.stats import bootstrap_ci


def test_bootstrap_interval():
    x = np.random.default_rng(1).normal(0.5, 1.0, 400)
    mean, lo, hi = bootstrap_ci(x)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    assert 0.15 < hi - lo < 0.25  # about 2 * 1.96 / sqrt(400)
    assert bootstrap_ci(x) == (mean, lo, hi)  # fixed seed: reruns agree
    _, lo5, hi5 = bootstrap_ci(x[:15])
    assert hi5 - lo5 > hi - lo
