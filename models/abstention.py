"""Per image, whether the memory corrects or abstains.

A memory recalls a colour for any input, also for a scene it has never seen, where the recalled
colour belongs to an unrelated training image: on held-out scenes the correction gains nothing
reliable (README, "Does the memory help?"). An abstention rule lets it correct only inputs that
resemble what filled it, by two measures of one image:
- the *scene match*: the best correlation of the input's grey low-light thumbnail
  (`dataset.scene_groups.scene_vector`) with the thumbnails of the memory's training inputs;
- the *score*: the read's top-1 cosine score.
The memory corrects when each bound the rule sets is exceeded. The bounds are fitted on the
memory's own training images, each read with every slot of its own scene group hidden and matched
against the other groups only: the fit sees how unseen scenes score and what correcting them gains,
and lets the memory correct an unseen scene only where that gain is reliably above zero. Where it
is not, the bound lands above every unseen scene's value, and only inputs that match a training
scene better than any unseen scene did are corrected.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dataset.scene_groups import scene_vector
from models.memory import ExternalMemory
from utils.image_io import tensor_to_image, to_uint8
from utils.metrics import psnr

if TYPE_CHECKING:
    from models.read_settings import ReadSettings
RULES = ("off", "score", "scene", "both")  # which bounds a fitted rule sets
BOTH_GRID = 41  # candidate bounds per measure for "both": quantiles 0, 1/40, .., 1 of the observed values


@dataclass(frozen=True)
class Decision:
    """What the memory did with one image and why."""

    corrected: bool
    reason: str


def decide(score: float, scene_match: float | None, min_score: float | None,
           min_scene: float | None) -> Decision:
    """Correct unless the score or the scene match is at or below its bound (None: no bound)."""
    failed = []
    if min_scene is not None and not scene_match > min_scene:
        failed.append(f"scene match {scene_match:.3f} <= {min_scene:.3f} (a scene it has not seen)")
    if min_score is not None and not score > min_score:
        failed.append(f"score {score:.4f} <= {min_score:.4f}")
    if failed:
        return Decision(False, "abstained: " + "; ".join(failed))
    if min_scene is None and min_score is None:
        return Decision(True, "corrected: no abstention rule")
    passed = ([f"scene match {scene_match:.3f} > {min_scene:.3f}"] if min_scene is not None else []) + \
             ([f"score {score:.4f} > {min_score:.4f}"] if min_score is not None else [])
    return Decision(True, "corrected: " + "; ".join(passed))


def corrected(scores: np.ndarray, matches: np.ndarray | None, min_score: float | None,
              min_scene: float | None) -> np.ndarray:
    """(N,) True where `decide` corrects, for many reads at once (fits, validation, the study):
    float64 `scores` and scene `matches` (N,) against the bounds (None: no bound)."""
    on = np.ones(len(scores), dtype=bool)
    if min_score is not None:
        on &= np.asarray(scores, dtype=np.float64) > min_score
    if min_scene is not None:
        on &= np.asarray(matches, dtype=np.float64) > min_scene
    return on


def scene_vectors(low: torch.Tensor) -> np.ndarray:
    """(B, D) scene thumbnails of low-light inputs (B, 3, H, W) in [0, 1], from their 8-bit
    pixels, as the memory's training inputs were described."""
    return np.stack([scene_vector(to_uint8(tensor_to_image(x[None]))) for x in low])


def scene_match(vectors: np.ndarray, known: np.ndarray, hide: np.ndarray | None = None) -> np.ndarray:
    """(B,) best correlation of each scene vector (B, D) with the `known` ones (N, D); `hide`
    (B, N), True where a vector must not see a known one. -1 where none is left."""
    corr = vectors.astype(np.float64) @ known.astype(np.float64).T
    if hide is not None:
        corr = np.where(hide, -np.inf, corr)
    return np.maximum(corr.max(axis=1, initial=-np.inf), -1.0)


def _candidates(values: np.ndarray, used: bool, grid: int | None) -> list[float | None]:
    if not used:
        return [None]
    finite = values[np.isfinite(values)]
    points = np.unique(finite) if grid is None else np.unique(np.quantile(finite, np.linspace(0, 1, grid)))
    return [None, *map(float, points)]


def reliable_gain(gains: np.ndarray) -> bool:
    """Whether correcting images with these PSNR gains helps beyond chance: the 95% lower bound of
    their mean (normal approximation, t = 1.96) is above 0. None or one image is never reliable."""
    if len(gains) < 2:
        return False
    return float(gains.mean() - 1.96 * gains.std(ddof=1) / np.sqrt(len(gains))) > 0


def fit_bounds(rule: str, gains: np.ndarray, scores: np.ndarray, matches: np.ndarray
               ) -> tuple[float | None, float | None]:
    """(min_score, min_scene) of `rule` that maximise the summed PSNR gain of the images it would
    correct: `gains` (N,) what correcting each image gains, `scores` and `matches` (N,) its
    measures, all from reads of unseen scenes. Candidate bounds are the observed values (a bound at
    the largest abstains on every one). A candidate that corrects any image must gain reliably on
    those it corrects (`reliable_gain`): the argmax of a sum over thousands of thresholds otherwise
    follows noise, and corrects new scenes where nothing shows that it helps. Ties go to the rule
    that corrects fewer images, then to the one with fewer bounds."""
    if rule not in RULES or rule == "off":
        raise ValueError(f"no bounds to fit for rule {rule!r}")
    grid = BOTH_GRID if rule == "both" else None
    best, chosen = None, (None, None)
    for lo_score, lo_scene in itertools.product(_candidates(scores, rule in ("score", "both"), grid),
                                                _candidates(matches, rule in ("scene", "both"), grid)):
        on = corrected(scores, matches, lo_score, lo_scene)
        if on.any() and not reliable_gain(gains[on]):
            continue
        # the most gain; then the fewest images corrected; then the fewest bounds
        key = (round(float(gains[on].sum()), 9), -int(on.sum()), -((lo_score is not None) + (lo_scene is not None)))
        if best is None or key > best:
            best, chosen = key, (lo_score, lo_scene)
    return chosen


def unseen_reads(memory: ExternalMemory, queries: torch.Tensor, groups: np.ndarray, top_k: int,
                 temperature: float) -> tuple[torch.Tensor, np.ndarray]:
    """(recalled values (N, V), top-1 scores (N,)) of the memory's training samples 0..N-1, each
    read with every slot written by a sample of its own scene group hidden."""
    group = torch.as_tensor(groups)
    slot_group = group[memory.top_index.clamp_min(0)]
    hide = slot_group[None] == group[:, None]
    best, _ = memory.ranked(queries, 1, hide)
    recalled = memory.read(queries, top_k, temperature, hide=hide)
    return recalled, best[:, 0].double().numpy()


def correction_gains(ori: list[torch.Tensor], high: list[np.ndarray], recalled: torch.Tensor,
                     correct) -> np.ndarray:
    """(N,) PSNR gain (rounded 8-bit, the project's convention) of correcting each enhancer output
    (3, H, W) with its recalled value, `correct(y (1, 3, H, W), recalled (1, V))` as read."""
    gains = []
    for y, r, h in zip(ori, recalled, high):
        y = y[None].float()
        gains.append(psnr(to_uint8(tensor_to_image(correct(y, r[None]))), h) - psnr(to_uint8(tensor_to_image(y)), h))
    return np.nan_to_num(np.array(gains), posinf=0.0, neginf=0.0)


def fit_abstention(rule: str, memory: ExternalMemory, queries: torch.Tensor, groups: np.ndarray,
                   scenes: np.ndarray, ori: list[torch.Tensor], high: list[np.ndarray], read: ReadSettings
                   ) -> tuple[ReadSettings, dict]:
    """`read` with the bounds of `rule` fitted on the memory's training samples 0..N-1: their
    queries (N, D) as read at test time, scene `groups` (N,) (`dataset.scene_groups`), low-light
    scene vectors (N, D'), enhancer outputs and uint8 targets. Each sample is read and matched with
    its own scene group hidden. Also returns what the fit saw, for the log."""
    recalled, scores = unseen_reads(memory, queries, groups, read.top_k, read.temperature)
    gains = correction_gains(ori, high, recalled,
                             lambda y, r: read.correct(y, r, memory.config.pooling_size))
    matches = scene_match(scenes, scenes, hide=groups[:, None] == groups[None])
    min_score, min_scene = fit_bounds(rule, gains, scores, matches)
    fitted = read.with_bounds(min_score, min_scene)
    on = corrected(scores, matches, min_score, min_scene)
    return fitted, {"rule": rule, "min_score": min_score, "min_scene": min_scene,
                    "unseen_reads": len(gains), "corrected": int(on.sum()),
                    "mean_gain_all": float(gains.mean()), "mean_gain_with_rule": float(np.where(on, gains, 0).mean())}
