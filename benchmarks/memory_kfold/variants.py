"""The memory settings the study compares, each by name, and the bounds read beside them."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from models.read_settings import ReadSettings


class StrengthRule(Enum):
    """How a variant's correction strength is set."""

    RELEASE = "release"  # the release's softmax correction
    FIXED = "fixed"  # a given gain strength
    CALIBRATED = "calibrated"  # one strength, leave-one-out reads of the training folds (models/calibration.py)
    FITTED = "fitted"  # one strength, training reads with the reader's scene group hidden
    CONFIDENCE = "confidence"  # a strength that grows with the read's top-1 score, fitted as FITTED


@dataclass(frozen=True)
class Strength:
    rule: StrengthRule = StrengthRule.RELEASE
    value: float | None = None  # FIXED only

    @property
    def fitted_on_unseen(self) -> bool:
        """Fitted with training reads that hide the reader's own scene group (`strength.fit_strength`)."""
        return self.rule in (StrengthRule.FITTED, StrengthRule.CONFIDENCE)


RELEASE = Strength()
CALIBRATED = Strength(StrengthRule.CALIBRATED)
FITTED = Strength(StrengthRule.FITTED)
CONFIDENCE = Strength(StrengthRule.CONFIDENCE)


@dataclass(frozen=True)
class Variant:
    """One memory setting. `entries`: "images" (each training pair whole) or "crops" (128-px crops,
    one per image and epoch: the release); `value`: "colour" (the target's pooled colour, the
    release) or "ratio" (the target's pooled colour over the enhancer output's, per channel: the
    read ratio times the held-out output's pooled colour is the recalled colour); `abstain`: the
    abstention rule fitted on the training folds (`models.abstention`), "off" corrects every image."""

    name: str
    entries: str = "images"
    value: str = "colour"
    query: str = "enhancer"
    top_k: int = 1
    temperature: float = 1.0
    pooling_size: int = 1
    pooling_mean: bool = False
    strength: Strength = field(default=RELEASE)
    abstain: str = "off"
    epochs: int = 40  # passes over the training images ("crops" entries only)
    crop: int = 128

    def read(self, strength: float | None) -> ReadSettings:
        """How this variant reads its memory once its strength is resolved to `strength`."""
        return ReadSettings(self.top_k, self.temperature, strength, self.pooling_mean, self.query)

    def settings(self) -> dict:
        """The variant as plain values (study.json)."""
        return {**{k: v for k, v in self.__dict__.items() if k != "strength"},
                "strength": self.strength.rule.value, "strength_value": self.strength.value}


VARIANTS = (
    Variant("published: crops, k=1, softmax", entries="crops"),
    Variant("crops, k=16, T=0.01, softmax", entries="crops", top_k=16, temperature=0.01),
    Variant("images, k=1, softmax"),
    Variant("images, k=8, T=0.01, softmax", top_k=8, temperature=0.01),
    Variant("images, levels, k=1, softmax", query="enhancer_levels"),
    Variant("images, levels, k=8, T=0.01, softmax", query="enhancer_levels", top_k=8, temperature=0.01),
    Variant("images, k=8, T=0.01, p=2 mean, softmax", top_k=8, temperature=0.01, pooling_size=2, pooling_mean=True),
    Variant("images, k=1, calibrated", strength=CALIBRATED),
    Variant("images, k=8, T=0.01, calibrated", top_k=8, temperature=0.01, strength=CALIBRATED),
    Variant("images, levels, k=8, T=0.01, calibrated", query="enhancer_levels", top_k=8, temperature=0.01,
            strength=CALIBRATED),
    Variant("crops, k=16, T=0.01, calibrated", entries="crops", top_k=16, temperature=0.01, strength=CALIBRATED),
    Variant("images, levels, k=1, ratio value, softmax", query="enhancer_levels", value="ratio"),
    Variant("images, levels, k=1, ratio value, fitted strength", query="enhancer_levels", value="ratio",
            strength=FITTED),
    Variant("images, levels, k=1, ratio value, confidence strength", query="enhancer_levels", value="ratio",
            strength=CONFIDENCE),
    Variant("images, levels, k=1, colour value, confidence strength", query="enhancer_levels", strength=CONFIDENCE),
    Variant("images, levels, k=4, T=0.01, ratio value, confidence strength", query="enhancer_levels",
            value="ratio", top_k=4, temperature=0.01, strength=CONFIDENCE),
    Variant("images, levels, k=1, softmax, abstain by score", query="enhancer_levels", abstain="score"),
    Variant("images, levels, k=1, softmax, abstain by scene", query="enhancer_levels", abstain="scene"),
    Variant("images, levels, k=1, softmax, abstain by both", query="enhancer_levels", abstain="both"),
    Variant("images, levels, k=8, T=0.01, softmax, abstain by scene", query="enhancer_levels", top_k=8,
            temperature=0.01, abstain="scene"),
    Variant("images, levels, k=1, strength 1, abstain by scene", query="enhancer_levels",
            strength=Strength(StrengthRule.FIXED, 1.0), abstain="scene"),
)
BY_NAME = {v.name: v for v in VARIANTS}
BOUND_BASE = BY_NAME["images, k=1, softmax"]  # the read the bounds replace the recall of
BOUNDS = {"oracle": "bound: oracle recall, softmax", "oracle_full": "bound: oracle recall, full gain",
          "constant": "bound: constant training mean, softmax",
          "predictor": "bound: ridge predictor of the ratio, full gain"}


def select(patterns: list[str] | None) -> list[Variant]:
    """The variants whose names contain any of `patterns` (all without any)."""
    return [v for v in VARIANTS if not patterns or any(s in v.name for s in patterns)]
