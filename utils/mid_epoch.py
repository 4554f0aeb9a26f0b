"""Where a DataLoader epoch stopped, so that --resume continues with its next batch.

A run stopped inside an epoch (a stop signal) stores `MidEpoch.state`: the batches used, the
sampler's generator and torch's RNG as they were when the epoch began, and the epoch's running
counts. The resumed run rewinds both to the epoch's start, draws the same order and crops again for
the used batches without training on them, then takes torch's RNG as it was at the stop: the
following batches are the ones an uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Any

import torch


class MidEpoch:
    """The position inside the current epoch; `resumed` is a checkpoint's `state()` or None."""

    def __init__(self, resumed: dict[str, Any] | None = None):
        self.resumed = resumed
        self.replay: dict[str, Any] | None = None  # the resumed epoch's, while its used batches pass
        self.start: dict[str, torch.Tensor] = {}

    def start_epoch(self, generator: torch.Generator) -> dict[str, Any]:
        """Call before iterating the loader; returns the epoch's running counts to continue
        (`matched`, `written`, `losses`: zeros and [] for a fresh epoch). A resumed epoch first
        rewinds `generator` and torch's RNG to the epoch's start."""
        self.replay, self.resumed = self.resumed, None
        if self.replay is not None:
            generator.set_state(self.replay["sampler_rng"])
            torch.set_rng_state(self.replay["epoch_rng"])
        self.start = {"sampler_rng": generator.get_state(), "epoch_rng": torch.get_rng_state()}
        counts = self.replay["counts"] if self.replay is not None else {"matched": 0, "written": 0, "losses": []}
        return {**counts, "losses": list(counts["losses"])}

    def used_before(self, batch_number: int) -> bool:
        """Whether batch `batch_number` (1-based) was trained on before the stop; at the last such
        batch, torch's RNG becomes the stopped run's."""
        if self.replay is None or batch_number > self.replay["batches"]:
            return False
        if batch_number == self.replay["batches"]:
            torch.set_rng_state(self.replay["rng"])
            self.replay = None
        return True

    def state(self, batches: int, matched: int, written: int, losses: list[float]) -> dict[str, Any]:
        """What a checkpoint written after `batches` batches of this epoch stores (`in_epoch`)."""
        return {**self.start, "batches": batches, "rng": torch.get_rng_state(),
                "counts": {"matched": matched, "written": written, "losses": list(losses)}}
