"""Per-image scores and the result files of an evaluation: metrics.csv, summary.json, result.txt,
and the folder they go to by default (`default_result_dir`)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_write_many
from utils.bundled import BUNDLED_DIR
from utils.memory_effect import effect_columns, effect_line, effect_summary
from utils.metrics import METRIC_CONVENTION, gt_mean_psnr, psnr, ssim
from utils.stats import RESAMPLES, bootstrap_ci

METRICS = ("psnr", "ssim", "gt_mean_psnr")
PAIRED = ("psnr", "ssim", "lpips")  # metrics whose mem - ori difference gets a paired interval
CI_METHOD = (f"percentile bootstrap over images, {RESAMPLES} resamples, seed 0; mem_minus_ori_* pair "
             "each image's mem and ori scores")


def score(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All metrics of one uint8 prediction against its uint8 ground truth."""
    return {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "gt_mean_psnr": gt_mean_psnr(pred, gt)}


def mean_scores(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, float]:
    """Mean of each numeric column over the rows that have it."""
    return {c: float(np.mean([r[c] for r in rows if r.get(c) is not None]))
            for c in columns if any(r.get(c) is not None for r in rows)}


def intervals(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list[float]]:
    """95% bootstrap intervals (`utils.stats.bootstrap_ci`) of every mean column and, where both
    stages were scored, of the paired mem - ori differences `mem_minus_ori_<psnr|ssim|lpips>`."""
    out = {}
    for c in columns:
        values = [r[c] for r in rows if r.get(c) is not None]
        if values:
            out[c] = list(bootstrap_ci(values)[1:])
    for metric, (_, lo, hi) in paired_differences(rows).items():
        out[f"mem_minus_ori_{metric}"] = [lo, hi]
    return out


def paired_differences(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """(mean, low, high) of the per-image mem - ori difference of each PAIRED metric that both
    stages were scored on: its mean and 95% bootstrap interval."""
    out = {}
    for metric in PAIRED:
        diffs = [r[f"mem_{metric}"] - r[f"ori_{metric}"] for r in rows
                 if r.get(f"mem_{metric}") is not None and r.get(f"ori_{metric}") is not None]
        if diffs:
            out[metric] = bootstrap_ci(diffs)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not math.isinf(v) else str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str], means: dict[str, float],
                 ci95: dict[str, list[float]] | None = None) -> str:
    """A fixed-width text table of the rows, their mean and (given `ci95`) the 95% intervals."""
    width = max([len(str(r["name"])) for r in rows] + [7])
    lines = [f"{'image':<{width}}  " + "  ".join(f"{c:>14}" for c in columns)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  " + "  ".join(f"{_fmt(r.get(c, '')):>14}" for c in columns))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{_fmt(means.get(c, '')):>14}" for c in columns))
    if ci95:
        digits = {c: 2 if "psnr" in c else 4 for c in columns}
        cells = [f"{ci95[c][0]:.{digits[c]}f}..{ci95[c][1]:.{digits[c]}f}" if c in ci95 else "" for c in columns]
        lines.append(f"{'95% CI':<{width}}  " + "  ".join(f"{cell:>14}" for cell in cells))
        for metric in PAIRED:
            key = f"mem_minus_ori_{metric}"
            if key in ci95:
                diff = means[f"mem_{metric}"] - means[f"ori_{metric}"]
                lines.append(f"mem - ori {metric.upper()}: {diff:+.4f}, 95% CI [{ci95[key][0]:+.4f}, {ci95[key][1]:+.4f}]")
    return "\n".join(lines)


def effect_block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `memory_effect`: `utils.memory_effect.effect_summary` of the rows that carry
    one, plus `images` (image name -> its columns); empty without a memory."""
    effects = {r["name"]: r["memory_effect"] for r in rows if r.get("memory_effect") is not None}
    if not effects:
        return {}
    return {**effect_summary(list(effects.values())), "images": {n: e.columns() for n, e in effects.items()}}


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as metrics.csv writes it: its memory effect as columns, its recalled entries as
    `name:score` items."""
    out = {**row, **(row["memory_effect"].columns() if row.get("memory_effect") is not None else {})}
    if "recalled" in row:
        out["recalled"] = " ".join(f"{e['name']}:{e['score']:.4f}" for e in row["recalled"])
    return out


def write_report(result_dir: Path, rows: list[dict[str, Any]], columns: list[str],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.csv (a row per image), summary.json and result.txt (means with their 95%
    bootstrap intervals, `ci95`; the mean and interval of each paired mem - ori difference,
    `mem_minus_ori`); return the summary. Rows with `recalled` (the memory's best
    entries, `models.evaluate.evaluate_pairs`) add a `recalled` column of `name:score` items to
    metrics.csv and a `recalled` map (image name -> entries) to summary.json. Rows with a
    `memory_effect` add its columns to metrics.csv (`utils.memory_effect.MemoryEffect.columns`),
    a `memory_effect` block to summary.json (`effect_block`) and the console line to result.txt.

    The three are written to temporary names first and renamed together, so earlier results are
    replaced whole, and a fault while writing (a full disk) replaces none of them.
    """
    means = mean_scores(rows, columns)
    ci95 = intervals(rows, columns)
    diffs = {m: {"mean": mean, "ci95": [lo, hi]} for m, (mean, lo, hi) in paired_differences(rows).items()}
    recalled = {r["name"]: r["recalled"] for r in rows if "recalled" in r}
    effects = effect_block(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", *columns, *effect_columns(rows), *(["recalled"] if recalled else [])],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows([csv_row(r) for r in rows])
    summary = {"convention": METRIC_CONVENTION, "num_images": len(rows), "mean": means, "ci95": ci95,
               "ci95_method": CI_METHOD, **({"mem_minus_ori": diffs} if diffs else {}), **meta,
               **({"memory_effect": effects} if effects else {}), **({"recalled": recalled} if recalled else {})}
    text = "\n".join([f"{k}: {v}" for k, v in meta.items()] + [f"metric convention: {METRIC_CONVENTION}",
                      f"images: {len(rows)}", f"intervals: {CI_METHOD}"] +
                     [f"mean {c}: {_fmt(v)}" + (f" (95% CI {ci95[c][0]:.4f} .. {ci95[c][1]:.4f})" if c in ci95 else "")
                      for c, v in means.items()] +
                     [f"mem_minus_ori_{m}: {d['mean']:+.4f} (95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})"
                      for m, d in diffs.items()] +
                     ([effect_line([r["memory_effect"] for r in rows if r.get("memory_effect") is not None])]
                      if effects else []))
    atomic_write_many([(result_dir / "metrics.csv", buf.getvalue().encode()),
                       (result_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode()),
                       (result_dir / "result.txt", (text + "\n").encode())])
    return summary


def run_label(path: str | Path) -> str:
    """A result-folder name for a weights file: the stem of a bundled file (`pre_trained_logs/`,
    named uniquely), else the stem and a fingerprint of the bytes (`model_best-1a2b3c4d`), so that
    two trained runs' `model_best.pth` never share a folder. A folder (`--enhanced_dir`) or a
    missing file: its stem."""
    path = Path(path)
    if not path.is_file() or path.resolve().is_relative_to(BUNDLED_DIR):
        return path.stem
    digest = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.stem}-{digest.hexdigest()[:8]}"


def default_result_dir(input_dir: str | Path, source: str | Path, mem_weights: str | Path | None) -> Path:
    """log_eval/<input name>/<weights or --enhanced_dir label>[+<memory label>] (`run_label`):
    runs of other weights or memories on the same input never replace each other's results."""
    run = run_label(source) + (f"+{run_label(mem_weights)}" if mem_weights else "")
    given = Path(input_dir).resolve()
    return Path("log_eval") / (given.stem if given.is_file() else given.name) / run
