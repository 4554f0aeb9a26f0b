"""How a memory is read: the one type every reader of a memory (test.py, the trainer's validation,
the strength calibration, the memory study) builds its reads and corrections from."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from models.abstention import Decision, corrected, decide
from models.memory import ExternalMemory, refine_with_memory
from utils.errors import UserError

# A checkpoint's "read", in this order; files older than the abstention bounds store the first four.
STORED = ("top_k", "temperature", "strength", "pooling_mean", "min_score", "min_scene")


def parse_strength(flag: str) -> float | None:
    """--strength as a read uses it: "release" (the softmax correction) is None, else a number."""
    if flag == "release":
        return None
    try:
        return float(flag)
    except ValueError:
        raise UserError(f"--strength {flag!r} is neither 'release' nor a number; "
                        "e.g. --strength release or --strength 0.6") from None


@dataclass(frozen=True)
class ReadSettings:
    """How to read a memory and correct an output with what it recalls; the defaults are the
    release's. `top_k` slots weighted by softmax(score / `temperature`); `strength` None is the
    release's softmax correction, a number the gain strength (`refine_with_memory`);
    `pooling_mean` one gain for the three channels; `query_encoder` the query of the memory;
    `min_score`, `min_scene` the abstention bounds (`models.abstention`; None: no bound, the
    release corrects every image)."""

    top_k: int = 1
    temperature: float = 1.0
    strength: float | None = None
    pooling_mean: bool = False
    query_encoder: str | None = None
    min_score: float | None = None
    min_scene: float | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ReadSettings:
        """The settings a memory checkpoint stores (the release's where it stores none)."""
        stored = {k: v for k, v in ckpt.get("read", {}).items() if k in STORED}
        return cls(**stored, query_encoder=ckpt.get("query_encoder"))

    def with_flags(self, args: Any) -> ReadSettings:
        """These settings overridden by the read flags given (`options.add_memory_args`, parsed;
        None is "not given")."""
        given = {"top_k": args.testing_top_k, "temperature": args.temperature,
                 "strength": None if args.strength is None else parse_strength(args.strength),
                 "pooling_mean": args.pooling_mean, "query_encoder": args.query_encoder}
        changes = {k: v for k, v in given.items() if v is not None}
        if args.strength == "release":
            changes["strength"] = None
        if getattr(args, "abstain", None) == "off":
            changes.update(min_score=None, min_scene=None)
        return replace(self, **changes)

    def with_bounds(self, min_score: float | None, min_scene: float | None) -> ReadSettings:
        """These settings with the abstention bounds `min_score` and `min_scene`."""
        return replace(self, min_score=min_score, min_scene=min_scene)

    @property
    def abstains(self) -> bool:
        """Whether this read may leave an image uncorrected."""
        return self.min_score is not None or self.min_scene is not None

    def decide(self, score: float, scene_match: float | None) -> Decision:
        """Whether an image whose read scores `score` and whose scene match is `scene_match` is
        corrected (`models.abstention.decide`)."""
        return decide(score, scene_match, self.min_score, self.min_scene)

    def corrects(self, scores: np.ndarray, scene_matches: np.ndarray | None) -> np.ndarray:
        """`decide`'s verdict for many reads at once: (N,) True where an image is corrected."""
        return corrected(scores, scene_matches, self.min_score, self.min_scene)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's "read" entry (the query encoder is stored beside it); bounds only when
        set, so a read without abstention is stored as before them."""
        stored = {f.name: getattr(self, f.name) for f in fields(self) if f.name in STORED}
        return {k: v for k, v in stored.items() if v is not None or k not in ("min_score", "min_scene")}

    @property
    def strength_flag(self) -> float | str:
        """The --strength value that reads this way ("release" for the softmax correction)."""
        return "release" if self.strength is None else self.strength

    def recall(self, memory: ExternalMemory, queries: torch.Tensor,
               exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The values (B, 3 p p) `memory` recalls for unit-norm `queries` (B, key_dim)."""
        return memory.read(queries, self.top_k, self.temperature, exclude=exclude)

    def correct(self, enhanced: torch.Tensor, recalled: torch.Tensor, pooling_size: int) -> torch.Tensor:
        """`enhanced` (B, 3, H, W) corrected towards the `recalled` colour (B, 3 p p)."""
        return refine_with_memory(enhanced, recalled, pooling_size, self.pooling_mean, self.strength)
