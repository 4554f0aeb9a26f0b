"""What the memory did to one image, readable without ground truth: the gain per channel, the
mean brightness before and after, and how the best recalled score ranks among the memory's own
training reads (so that a score of 0.99 can be read as typical or as low).

Computed on the 8-bit ori and mem images as written, so anyone can check the numbers from the
PNG files. `MemoryEffect.columns` is the one place that names the per-image fields: metrics.csv,
summary.json, the results page and the demo app all show what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

UNCHANGED_PCT = 0.5  # |mean brightness change| below this many percent counts as unchanged
DIRECTIONS = ("brightened", "darkened", "unchanged")
PERCENTILE_MEANING = ("recall_percentile: the percentage of the memory's own training reads whose best score is at "
                      "most this image's best score (each written slot's key read against the slots of the other "
                      "training samples, leave-one-out); low means the image matches the memory less well "
                      "than its training images match each other")


EFFECT_NOTE = ("gain_r/g/b: mean of mem / mean of ori per channel; ori_brightness, mem_brightness: the mean 8-bit "
               f"level over all pixels and channels; brightness_effect: unchanged when |brightness_change_pct| < "
               f"{UNCHANGED_PCT:g}; recall_score: the best recalled entry's cosine score; {PERCENTILE_MEANING}; "
               "memory: corrected, or abstained (left as the enhancer made it) where the memory's rule says it has "
               "not seen the scene, memory_reason: why")


def ratio(new: float, old: float) -> float:
    """new / old; 1 when both are 0, inf when only old is."""
    if old > 0:
        return new / old
    return 1.0 if new == 0 else float("inf")


class ScoreReference:
    """The best scores of a memory's own training reads (`ExternalMemory.leave_one_out_scores`),
    sorted, to rank a new read's score."""

    def __init__(self, scores: np.ndarray):
        self.scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())

    def percentile(self, score: float) -> float | None:
        """The percentage (0-100, one decimal) of reference scores <= `score`; None without any."""
        if not len(self.scores):
            return None
        return round(100.0 * float(np.searchsorted(self.scores, score, side="right")) / len(self.scores), 1)


@dataclass(frozen=True)
class MemoryEffect:
    """The memory's effect on one image: `gain` (mem mean / ori mean per R, G, B), the mean 8-bit
    level over all pixels and channels before (`ori_brightness`) and after (`mem_brightness`), and
    the best recalled entry's cosine score and its percentile among the memory's own reads (None
    where the memory named no entry); whether the memory `corrected` the image or abstained, and
    the `reason` it gives (`models.abstention`; empty for a refiner that never abstains)."""

    gain: tuple[float, float, float]
    ori_brightness: float
    mem_brightness: float
    recall_score: float | None = None
    recall_percentile: float | None = None
    corrected: bool = True
    reason: str = ""

    @property
    def brightness_change_pct(self) -> float:
        return 100.0 * (ratio(self.mem_brightness, self.ori_brightness) - 1.0)

    @property
    def direction(self) -> str:
        """"brightened", "darkened", or "unchanged" when |brightness change| < UNCHANGED_PCT %."""
        change = self.brightness_change_pct
        if abs(change) < UNCHANGED_PCT:
            return "unchanged"
        return "brightened" if change > 0 else "darkened"

    def columns(self) -> dict[str, Any]:
        """The per-image fields in the order metrics.csv and the page's table show them."""
        return {"gain_r": round(self.gain[0], 4), "gain_g": round(self.gain[1], 4), "gain_b": round(self.gain[2], 4),
                "ori_brightness": round(self.ori_brightness, 2), "mem_brightness": round(self.mem_brightness, 2),
                "brightness_change_pct": round(self.brightness_change_pct, 2), "brightness_effect": self.direction,
                "recall_score": self.recall_score, "recall_percentile": self.recall_percentile,
                "memory": "corrected" if self.corrected else "abstained", "memory_reason": self.reason}

    def describe(self) -> str:
        """One line for a reader: gains, brightness ori -> mem, the best recalled score in context."""
        gains = " ".join(f"{c} {g:.3f}" for c, g in zip("RGB", self.gain))
        text = (f"gain {gains}; brightness {self.ori_brightness:.1f} -> {self.mem_brightness:.1f} "
                f"({self.brightness_change_pct:+.1f}%, {self.direction})")
        if self.recall_score is not None:
            rank = f", percentile {self.recall_percentile:g} of the memory's own reads" \
                if self.recall_percentile is not None else ""
            text += f"; best recalled score {self.recall_score:.4f}{rank}"
        return text + (f"; {self.reason}" if self.reason else "")


def measure_effect(ori8: np.ndarray, mem8: np.ndarray, recalled: Sequence[dict[str, Any]] = (),
                   corrected: bool = True, reason: str = "") -> MemoryEffect:
    """The effect of the memory that turned the uint8 RGB image `ori8` into `mem8` (same shape);
    `recalled` its best entries, best first (`score`, optional `percentile`); `corrected` and
    `reason` its decision for the image."""
    if ori8.shape != mem8.shape:
        raise ValueError(f"ori {ori8.shape} and mem {mem8.shape} images differ in shape")
    ori = ori8.reshape(-1, ori8.shape[-1]).astype(np.float64).mean(axis=0)
    mem = mem8.reshape(-1, mem8.shape[-1]).astype(np.float64).mean(axis=0)
    best = recalled[0] if recalled else {}
    return MemoryEffect(tuple(ratio(float(m), float(o)) for m, o in zip(mem, ori)), float(ori.mean()),
                        float(mem.mean()), best.get("score"), best.get("percentile"), corrected, reason)


def effect_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The effect columns of rows that carry a `memory_effect` (none when no row does)."""
    first = next((r["memory_effect"] for r in rows if r.get("memory_effect") is not None), None)
    return list(first.columns()) if first is not None else []


def effect_summary(effects: Sequence[MemoryEffect]) -> dict[str, Any]:
    """summary.json's `memory_effect` block (without the per-image map): counts per direction,
    the tolerance, the mean of every numeric column and what the percentile means."""
    columns = [e.columns() for e in effects]
    numeric = [k for k, v in columns[0].items() if isinstance(v, (int, float))] if columns else []
    means = {k: round(float(np.mean(vals)), 4) for k in numeric
             if (vals := [c[k] for c in columns if c[k] is not None])}
    return {"counts": {d: sum(e.direction == d for e in effects) for d in DIRECTIONS},
            "abstained": sum(not e.corrected for e in effects),
            "unchanged_below_pct": UNCHANGED_PCT, "mean": means, "recall_percentile": PERCENTILE_MEANING}


def effect_line(effects: Sequence[MemoryEffect]) -> str:
    """The console's summary: how many images the memory brightened, darkened or left unchanged."""
    counts = {d: sum(e.direction == d for e in effects) for d in DIRECTIONS}
    return (f"memory effect on {len(effects)} images: brightened {counts['brightened']}, darkened "
            f"{counts['darkened']}, unchanged {counts['unchanged']} (unchanged: |mean brightness change| "
            f"< {UNCHANGED_PCT:g}%); abstained on {sum(not e.corrected for e in effects)} (scenes it has not seen)")
