"""Per-image scores and the result files of an evaluation: metrics.csv, summary.json, result.txt."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_write_text
from utils.metrics import METRIC_CONVENTION, gt_mean_psnr, psnr, ssim

METRICS = ("psnr", "ssim", "gt_mean_psnr")


def score(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All metrics of one uint8 prediction against its uint8 ground truth."""
    return {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "gt_mean_psnr": gt_mean_psnr(pred, gt)}


def mean_scores(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, float]:
    """Mean of each numeric column over the rows that have it."""
    return {c: float(np.mean([r[c] for r in rows if r.get(c) is not None]))
            for c in columns if any(r.get(c) is not None for r in rows)}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not math.isinf(v) else str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str], means: dict[str, float]) -> str:
    """A fixed-width text table of the rows and their mean."""
    width = max([len(str(r["name"])) for r in rows] + [7])
    lines = [f"{'image':<{width}}  " + "  ".join(f"{c:>14}" for c in columns)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  " + "  ".join(f"{_fmt(r.get(c, '')):>14}" for c in columns))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{_fmt(means.get(c, '')):>14}" for c in columns))
    return "\n".join(lines)


def write_report(result_dir: Path, rows: list[dict[str, Any]], columns: list[str],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.csv (a row per image), summary.json and result.txt (means); return the summary.

    Every file is written to a temporary name and renamed, so earlier results are replaced whole.
    """
    means = mean_scores(rows, columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", *columns], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(result_dir / "metrics.csv", buf.getvalue())
    summary = {"convention": METRIC_CONVENTION, "num_images": len(rows), "mean": means, **meta}
    atomic_write_text(result_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    text = "\n".join([f"{k}: {v}" for k, v in meta.items()] + [f"metric convention: {METRIC_CONVENTION}",
                      f"images: {len(rows)}"] + [f"mean {c}: {_fmt(v)}" for c, v in means.items()])
    atomic_write_text(result_dir / "result.txt", text + "\n")
    return summary
