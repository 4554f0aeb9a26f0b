"""The study's files (study.csv, study.json) and its console table."""
from __future__ import annotations

import json
from pathlib import Path

from utils.atomic import atomic_write_text

CSV_KEYS = ["variant", "images", "psnr_gain", "psnr_ci_low", "psnr_ci_high", "ssim_gain", "ssim_ci_low",
            "ssim_ci_high", "images_improved", "images_corrected", "random_psnr_gain", "random_psnr_ci_low",
            "random_psnr_ci_high", "random_images_improved"]


def _interval(r: dict, prefix: str, digits: int) -> str:
    if f"{prefix}_gain" not in r:
        return "-"
    return (f"{r[f'{prefix}_gain']:+.{digits}f} [{r[f'{prefix}_ci_low']:+.{digits}f}, "
            f"{r[f'{prefix}_ci_high']:+.{digits}f}]")


TIE_DB = 0.05  # grouped gains this close count as tied; the random gain breaks the tie


def choose(rows: list[dict]) -> str | None:
    """The variant (not a bound) with the best grouped PSNR gain; among those within TIE_DB of it,
    the one with the best random-fold gain."""
    studied = [r for r in rows if not r["variant"].startswith("bound")]
    if not studied:
        return None
    top = max(r["psnr_gain"] for r in studied)
    tied = [r for r in studied if r["psnr_gain"] >= top - TIE_DB]
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
