"""The study's files (study.csv, study.json) and its console table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.atomic import atomic_write_text
from utils.stats import bootstrap_ci

CSV_KEYS = ["variant", "images", "psnr_gain", "psnr_ci_low", "psnr_ci_high", "ssim_gain", "ssim_ci_low",
            "ssim_ci_high", "images_improved", "images_corrected", "random_psnr_gain", "random_psnr_ci_low",
            "random_psnr_ci_high", "random_images_improved"]


def _interval(r: dict, prefix: str, digits: int) -> str:
    if f"{prefix}_gain" not in r:
        return "-"
    return (f"{r[f'{prefix}_gain']:+.{digits}f} [{r[f'{prefix}_ci_low']:+.{digits}f}, "
            f"{r[f'{prefix}_ci_high']:+.{digits}f}]")


GROUPED_FLOOR_DB = -0.1  # a read may lower new scenes by at most this much (its grouped 95% lower bound)


def tied_with(best: dict, other: dict) -> bool:
    """Whether `other` is not measurably worse than `best` on the grouped folds: the 95% bootstrap
    interval of their per-image paired difference (best - other) reaches 0."""
    diff = np.array(best["per_image_psnr_gain"]) - np.array(other["per_image_psnr_gain"])
    return bootstrap_ci(diff)[1] <= 0


def choose(rows: list[dict]) -> str | None:
    """The read to ship: among the variants (not bounds) whose grouped 95% lower bound is at least
    GROUPED_FLOOR_DB (all, if none is), the best grouped PSNR gain; among those tied with it
    (`tied_with`), the best random-fold gain."""
    studied = [r for r in rows if not r["variant"].startswith("bound")]
    if not studied:
        return None
    eligible = [r for r in studied if r["psnr_ci_low"] >= GROUPED_FLOOR_DB] or studied
    best = max(eligible, key=lambda r: r["psnr_gain"])
    tied = [r for r in eligible if tied_with(best, r)]
    return max(tied, key=lambda r: r.get("random_psnr_gain", -float("inf")))["variant"]


def format_rows(rows: list[dict]) -> str:
    """The table: per variant the grouped PSNR and SSIM gains with intervals, images improved and
    corrected, and the random-fold PSNR gain."""
    lines = [f"{'variant':<62} {'grouped PSNR gain [95% CI]':>26} {'SSIM gain [95% CI]':>30} {'improved':>9} "
             f"{'corrected':>9} {'random PSNR gain [95% CI]':>26}"]
    for r in rows:
        lines.append(f"{r['variant']:<62} {_interval(r, 'psnr', 3):>26} {_interval(r, 'ssim', 4):>30} "
                     f"{r['images_improved']:>4}/{r['images']} {r['images_corrected']:>4}/{r['images']} "
                     f"{_interval(r, 'random_psnr', 3):>26}")
    return "\n".join(lines)


def format_fits(rows: list[dict]) -> str:
    """What each fitted variant chose in each grouped fold (strengths, thresholds, bounds)."""
    def short(fit: dict) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fit.items())

    return "\n".join(f"{r['variant']}: " + " | ".join(short(f) for f in r["fitted_per_fold"])
                     for r in rows if r.get("fitted_per_fold"))


def write_study(out: Path, report: dict) -> tuple[Path, Path]:
    """study.json (everything) and study.csv (a row per variant), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "study.csv", "\n".join([",".join(CSV_KEYS)] + [
        ",".join(f'"{r[k]}"' if k == "variant" else str(r.get(k, "")) for k in CSV_KEYS)
        for r in report["rows"]]) + "\n")
    return out / "study.csv", out / "study.json"
