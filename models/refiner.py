"""The memory stage at test time: query an image, recall a colour value, correct an output."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.abstention import Decision, scene_match, scene_vectors
from models.enhancer import EMNetEnhancer
from models.loading import enhancer_fingerprint
from models.memory import ExternalMemory
from models.provenance import EntrySources
from models.query import ENHANCER_DESCRIPTORS, EnhancerQuery, QueryHead, build_query_encoder
from models.read_settings import ReadSettings
from utils.errors import UserError
from utils.memory_effect import ScoreReference


class MemoryRefiner(nn.Module):
    """Frozen query encoder (+ optional learned head) and the memory; corrects any enhancer's
    output as `read` says."""

    def __init__(self, encoder: nn.Module, memory: ExternalMemory, head: QueryHead | None = None,
                 read: ReadSettings = ReadSettings(), sources: EntrySources | None = None):
        super().__init__()
        self.encoder, self.memory, self.head, self.read = encoder, memory, head, read
        self.sources = sources or EntrySources({})
        self._reference: ScoreReference | None = None

    @property
    def score_reference(self) -> ScoreReference:
        """The memory's own training reads (`ExternalMemory.leave_one_out_scores`), computed on
        first use and kept: a refiner's memory does not change."""
        if self._reference is None:
            self._reference = ScoreReference(self.memory.leave_one_out_scores().numpy())
        return self._reference

    def query(self, low: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Unit-norm queries (B, key_dim) of low-light inputs (B, 3, H, W). With the enhancer
        query, `features` (the enhancer pass's `forward_features`) spare a second encoder pass."""
        if features is not None and isinstance(self.encoder, EnhancerQuery):
            q = self.encoder.from_features(features)
        else:
            q = self.encoder(low)
        return self.head(q) if self.head is not None else q

    @torch.no_grad()
    def fp32_query(self, low: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`query` always in fp32, also under a bf16 autocast: the top-k read picks among thousands
        of close cosine scores, and bf16 rounding picks other slots (-2 dB on eval15 when it did)."""
        with torch.autocast(low.device.type, enabled=False):
            features = [f.float() for f in features] if features is not None else None
            return self.query(low.float(), features)

    @torch.no_grad()
    def recall(self, low: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The colour values (B, 3 p p) the memory recalls for low-light inputs (B, 3, H, W)."""
        return self.read.recall(self.memory, self.fp32_query(low, features))

    @torch.no_grad()
    def top_entries(self, low: torch.Tensor, features: list[torch.Tensor] | None = None, n: int = 3,
                    query: torch.Tensor | None = None) -> list[list[dict[str, Any]]]:
        """Per input (B), the `n` best-scoring written slots: their training sample's `name`
        ("unknown" without stored sources), sample `index`, cosine `score` and its `percentile`
        among the memory's own reads (`score_reference`), best first. `query`, when given, is
        the inputs' `fp32_query`."""
        query = self.fp32_query(low, features) if query is None else query
        written = int((self.memory.top_index >= 0).sum())
        best, slots = self.memory.ranked(query, min(n, written or n))
        rank = self.score_reference.percentile
        return [[{"name": self.sources.name(int(self.memory.top_index[j])),
                  "index": int(self.memory.top_index[j]), "score": round(float(s), 4), "percentile": rank(float(s))}
                 for s, j in zip(row_s, row_j)] for row_s, row_j in zip(best, slots)]

    @torch.no_grad()
    def correct(self, enhanced: torch.Tensor, recalled: torch.Tensor) -> torch.Tensor:
        """`enhanced` (B, 3, H, W) corrected towards the `recalled` colour, as this memory reads."""
        return self.read.correct(enhanced.float(), recalled, self.memory.config.pooling_size)

    @torch.no_grad()
    def decide(self, low: torch.Tensor, features: list[torch.Tensor] | None = None,
               query: torch.Tensor | None = None) -> list[Decision]:
        """Per input (B), whether the memory corrects it and why (`ReadSettings.decide`): from
        the read's top-1 score and, where the read has a scene bound, the scene match with the
        memory's stored inputs. `query`, when given, is the inputs' `fp32_query`."""
        query = self.fp32_query(low, features) if query is None else query
        best, _ = self.memory.ranked(query, 1)
        by_scene = self.read.min_scene is not None  # build_refiner: the memory then stores its scenes
        matches = scene_match(scene_vectors(low.cpu()), self.sources.scenes) if by_scene else [None] * len(low)
        return [self.read.decide(float(s), None if m is None else float(m)) for s, m in zip(best[:, 0], matches)]

    @torch.no_grad()
    def refine(self, low: torch.Tensor, enhanced: torch.Tensor, features: list[torch.Tensor] | None = None,
               query: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Decision]]:
        """(output, decisions): `enhanced`, the enhancer output for `low`, corrected where the
        memory decides to and left as it is (clamped to [0, 1]) where it abstains. `query`, when
        given, is the inputs' `fp32_query`."""
        query = self.fp32_query(low, features) if query is None else query
        decisions = self.decide(low, query=query)
        out = self.correct(enhanced, self.read.recall(self.memory, query))
        keep = torch.tensor([not d.corrected for d in decisions], device=out.device)
        if keep.any():
            out = torch.where(keep[:, None, None, None], enhanced.float().clamp(0, 1), out)
        return out, decisions

    def forward(self, low: torch.Tensor, enhanced: torch.Tensor,
                features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The memory-corrected version of `enhanced`, the enhancer output for `low` (unchanged
        where the memory abstains)."""
        if not self.read.abstains:
            return self.correct(enhanced, self.recall(low, features))
        return self.refine(low, enhanced, features)[0]


def check_enhancer(ckpt: dict[str, Any], path: str | Path, enhancer: EMNetEnhancer,
                   enhancer_path: str | Path | None = None) -> None:
    """A memory with enhancer-feature keys must meet the enhancer that filled it: its stored
    `enhancer_fingerprint` (`models.loading.enhancer_fingerprint`) must equal the enhancer's, else
    one UserError line names both files and the fix. Older files without a fingerprint are checked
    by architecture only, with a note on stderr."""
    name = enhancer_path or "the enhancer given"
    fix = (f"train a memory for these weights (train_memory.py --pretrain_weights {name}), or run ori "
           "only with MEM_WEIGHTS= (test.py without --mem_weights)")
    stored_fp, stored_config = ckpt.get("enhancer_fingerprint"), ckpt.get("enhancer_config")
    filled_by = ckpt.get("enhancer_weights", "another enhancer")
    if stored_fp is None:
        if stored_config and stored_config != enhancer.config.to_dict():
            raise UserError(f"memory {path} was filled with the features of {filled_by} (embed_dim "
                            f"{stored_config['embed_dim']}), another architecture than {name}; {fix}")
        print(f"note: memory {path} records no enhancer fingerprint (written before they were stored); "
              f"whether {name} is the enhancer that filled it cannot be checked", file=sys.stderr)
        return
    now = enhancer_fingerprint(enhancer)
    if now != stored_fp:
        raise UserError(f"memory {path} was filled with the features of {filled_by} (fingerprint "
                        f"{stored_fp}), not of {name} (fingerprint {now}): its reads would be meaningless; {fix}")


def build_refiner(memory: ExternalMemory, ckpt: dict[str, Any], path: str | Path,
                  enhancer: EMNetEnhancer | None, read: ReadSettings | None = None,
                  query_weights: str | None = None, pooling_size: int | None = None,
                  enhancer_path: str | Path | None = None) -> MemoryRefiner:
    """The refiner of a loaded memory checkpoint (`models.loading.load_memory`), read as `read`
    says (default: as the checkpoint says); mismatches with the file or the enhancer
    (`check_enhancer`; `enhancer_path` names it in the message) are a UserError naming the file."""
    read = read or ReadSettings.from_checkpoint(ckpt)
    name = ckpt["query_encoder"]
    if read.query_encoder not in (None, name):
        raise UserError(f"memory {path} was written with --query_encoder {name}, not {read.query_encoder}; "
                        f"use --query_encoder {name}")
    if pooling_size and pooling_size != memory.config.pooling_size:
        raise UserError(f"memory {path} stores p = {memory.config.pooling_size} values, but "
                        f"--pooling_size {pooling_size} was asked for; use {memory.config.pooling_size}")
    if name in ENHANCER_DESCRIPTORS and enhancer is not None:
        check_enhancer(ckpt, path, enhancer, enhancer_path)
    encoder = build_query_encoder(name, enhancer, query_weights)
    if encoder.dim != memory.config.key_dim:
        raise UserError(f"memory {path} has {memory.config.key_dim}-d keys but the {name} query "
                        f"encoder gives {encoder.dim}-d queries; pass the matching enhancer/memory")
    head = None
    if ckpt.get("head_state_dict"):
        head = QueryHead(encoder.dim)
        head.load_state_dict(ckpt["head_state_dict"])
    if not 1 <= read.top_k <= memory.config.mem_size:
        raise UserError(f"--testing_top_k {read.top_k} must be between 1 and the mem_size "
                        f"{memory.config.mem_size} of memory {path}")
    if read.temperature <= 0:
        raise UserError(f"--temperature {read.temperature} must be positive")
    sources = EntrySources(ckpt)
    if read.min_scene is not None and sources.scenes is None:
        raise UserError(f"memory {path} abstains by scene match but stores no scenes of its training inputs; "
                        "retrain it with train_memory.py --abstain, or read it with --abstain off")
    return MemoryRefiner(encoder, memory, head, replace(read, query_encoder=name), sources).eval()


def refiner_from_flags(memory: ExternalMemory, ckpt: dict[str, Any], args: Any, enhancer: EMNetEnhancer | None,
                       cannot_abstain: str | None = None) -> MemoryRefiner:
    """`build_refiner` for the memory `args.mem_weights` read as it stores, overridden by the
    flags of `options.add_memory_args`, as every script that reads a memory takes them.
    `cannot_abstain` says why a use corrects every image (the ONNX graph, a video's smoothed
    colour): the read's abstention bounds are then dropped, with a note where they were set."""
    read = ReadSettings.from_checkpoint(ckpt).with_flags(args)
    if cannot_abstain is not None and read.abstains:
        print(f"note: memory {args.mem_weights} abstains on scenes it has not seen; {cannot_abstain}, so it "
              "corrects every image here (as test.py --abstain off)", file=sys.stderr)
        read = read.with_bounds(None, None)
    return build_refiner(memory, ckpt, args.mem_weights, enhancer, read, args.query_weights,
                         args.pooling_size, getattr(args, "weights", None))
