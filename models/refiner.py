"""The memory stage at test time: query an image, recall a colour value, correct an output."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.enhancer import EMNetEnhancer
from models.memory import ExternalMemory, refine_with_memory
from models.query import QueryHead, build_query_encoder
from utils.errors import UserError


class MemoryRefiner(nn.Module):
    """Frozen query encoder (+ optional learned head) and the memory; corrects any enhancer's output."""

    def __init__(self, encoder: nn.Module, memory: ExternalMemory, head: QueryHead | None = None,
                 top_k: int = 1, pooling_mean: bool = False):
        super().__init__()
        self.encoder, self.memory, self.head = encoder, memory, head
        self.top_k, self.pooling_mean = top_k, pooling_mean

    def query(self, low: torch.Tensor) -> torch.Tensor:
        """Unit-norm queries (B, key_dim) of low-light inputs (B, 3, H, W)."""
        q = self.encoder(low)
        return self.head(q) if self.head is not None else q

    @torch.no_grad()
    def forward(self, low: torch.Tensor, enhanced: torch.Tensor) -> torch.Tensor:
        """The memory-corrected version of `enhanced`, the enhancer output for `low`.

        Always in fp32, also under a bf16 autocast: the top-1 recall picks among thousands of close
        cosine scores, and bf16 rounding picks other slots (-2 dB on eval15 when it did).
        """
        with torch.autocast(low.device.type, enabled=False):
            recalled = self.memory.read(self.query(low.float()), self.top_k)
            return refine_with_memory(enhanced.float(), recalled, self.memory.config.pooling_size,
                                      self.pooling_mean)


def build_refiner(memory: ExternalMemory, ckpt: dict[str, Any], path: str | Path,
                  enhancer: EMNetEnhancer | None, query_encoder: str | None, query_weights: str | None,
                  top_k: int, pooling_mean: bool, pooling_size: int | None = None) -> MemoryRefiner:
    """The refiner of a loaded memory checkpoint (`utils.checkpoint.load_memory`); mismatches
    with the flags or the enhancer are a UserError naming the file."""
    name = ckpt["query_encoder"]
    if query_encoder and query_encoder != name:
        raise UserError(f"memory {path} was written with --query_encoder {name}, not {query_encoder}; "
                        f"use --query_encoder {name}")
    if pooling_size and pooling_size != memory.config.pooling_size:
        raise UserError(f"memory {path} stores p = {memory.config.pooling_size} values, but "
                        f"--pooling_size {pooling_size} was asked for; use {memory.config.pooling_size}")
    stored = ckpt.get("enhancer_config")
    if name == "enhancer" and enhancer is not None and stored and stored != enhancer.config.to_dict():
        raise UserError(f"memory {path} was filled with queries of another enhancer "
                        f"(embed_dim {stored['embed_dim']}); pass the enhancer it was trained on")
    encoder = build_query_encoder(name, enhancer, query_weights)
    if encoder.dim != memory.config.key_dim:
        raise UserError(f"memory {path} has {memory.config.key_dim}-d keys but the {name} query "
                        f"encoder gives {encoder.dim}-d queries; pass the matching enhancer/memory")
    head = None
    if ckpt.get("head_state_dict"):
        head = QueryHead(encoder.dim)
        head.load_state_dict(ckpt["head_state_dict"])
    if not 1 <= top_k <= memory.config.mem_size:
        raise UserError(f"--testing_top_k {top_k} must be between 1 and the mem_size "
                        f"{memory.config.mem_size} of memory {path}")
    return MemoryRefiner(encoder, memory, head, top_k, pooling_mean).eval()
