"""How a memory is read: the one type every reader of a memory (test.py, the trainer's validation,
the strength calibration, the memory study) builds its reads and corrections from."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from models.memory import ExternalMemory, refine_with_memory
from utils.errors import UserError

STORED = ("top_k", "temperature", "strength", "pooling_mean")  # a checkpoint's "read", in this order


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
    `pooling_mean` one gain for the three channels; `query_encoder` the query of the memory."""

    top_k: int = 1
    temperature: float = 1.0
    strength: float | None = None
    pooling_mean: bool = False
    query_encoder: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ReadSettings:
        """The settings a memory checkpoint stores (the release's where it stores none)."""
        stored = {k: v for k, v in ckpt.get("read", {}).items() if k in STORED}
        return cls(**stored, query_encoder=ckpt.get("query_encoder"))

    def with_flags(self, args: argparse.Namespace) -> ReadSettings:
        """These settings overridden by the read flags given (`models.options.add_memory_args`;
        None is "not given")."""
        given = {"top_k": args.testing_top_k, "temperature": args.temperature,
                 "strength": None if args.strength is None else parse_strength(args.strength),
                 "pooling_mean": args.pooling_mean, "query_encoder": args.query_encoder}
        changes = {k: v for k, v in given.items() if v is not None}
        if args.strength == "release":
            changes["strength"] = None
        return replace(self, **changes)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's "read" entry (the query encoder is stored beside it)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in STORED}

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
