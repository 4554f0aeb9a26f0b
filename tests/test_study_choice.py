"""benchmarks/memory_kfold/report.choose: the read to ship is the best on new scenes among those
that harm them by at most the floor, and a read not measurably worse there wins on known scenes."""
from __future__ import annotations

import numpy as np

from benchmarks.memory_kfold.report import choose


def row(name: str, gains: np.ndarray, ci_low: float, random_gain: float) -> dict:
    return {"variant": name, "psnr_gain": float(gains.mean()), "psnr_ci_low": ci_low,
            "per_image_psnr_gain": gains.tolist(), "random_psnr_gain": random_gain}


def test_choice_respects_the_floor_then_breaks_ties_on_known_scenes():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, 200)
    rows = [
        row("bound: oracle recall, softmax", base + 3, 2.9, 3.0),  # bounds are never chosen
        row("risky: best mean, too low a floor", base + 0.5, -0.3, 1.0),
        row("best eligible", base + 0.10, -0.05, 0.2),
        row("tied with it, better on known scenes", base + 0.09 + rng.normal(0, 0.2, 200), -0.08, 0.8),
        row("measurably worse, best on known scenes", base - 0.2, -0.09, 0.9),
    ]
    assert choose(rows) == "tied with it, better on known scenes"
    assert choose(rows[:3]) == "best eligible"
    assert choose([rows[1]]) == "risky: best mean, too low a floor"  # none eligible: all are
