"""EMNet's external memory (docs/METHOD.md, "The memory"): key/value banks written from the training set
and read at test time to correct an enhancer's colours.

A slot holds a key (a unit-norm query descriptor of a low-light training sample: a crop, as in the
release, or a whole image), a value (the p x p average-pooled RGB of that sample's normal-light
target), an age and the index of the training sample that wrote it. All four are buffers: they move with `.to(device)` and save with the module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MemoryConfig:
    """Published setting: 9000 slots, 512-d keys, p = 1 (a colour mean per slot)."""

    mem_size: int = 9000
    key_dim: int = 512
    pooling_size: int = 1
    threshold: float = 1e-5  # a query "matches" its top-1 slot when mean |value diff| is below
    age_noise: float = 4.0  # uniform noise added to ages when choosing slots to overwrite

    @property
    def value_dim(self) -> int:
        return 3 * self.pooling_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def pooled_value(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3 * p * p): the p x p adaptive average pool, channel-major."""
    return F.adaptive_avg_pool2d(img, p).flatten(1)


class ExternalMemory(nn.Module):
    """Key/value memory with the update rule and top-k read of docs/METHOD.md."""

    def __init__(self, config: MemoryConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        m, k = config.mem_size, config.key_dim
        key = torch.empty(m, k).uniform_(-0.01, 0.01, generator=generator)
        self.register_buffer("key", F.normalize(key, dim=1))
        self.register_buffer("value", torch.rand(m, config.value_dim, generator=generator))
        self.register_buffer("age", torch.zeros(m))
        self.register_buffer("top_index", torch.full((m,), -1, dtype=torch.long))

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Cosine scores (B, mem_size) of unit-norm queries against all keys."""
        return query @ self.key.t()

    @torch.no_grad()
    def update(self, query: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Write one batch: (B, key_dim) unit-norm queries, (B, value_dim) target values, (B,)
        training-sample indices. Returns the boolean "matched" mask (B,).

        1. each query's top-1 slot; 2. it matches when mean |slot value - target value| < threshold;
        3. all ages grow by 1; 4. matched slots move towards their queries: key = normalise(key +
        sum of the queries that matched it; several queries on one slot all count), age = 0;
        5. each unmatched query overwrites one of the oldest slots (ranked by age + uniform noise in
        [-age_noise, age_noise], distinct slots, matched slots excluded): key, value, index, age 0.
        When more queries are unmatched than there are free slots, the last ones win.
        Correct for B = 1.
        """
        top1 = self.scores(query).argmax(dim=1)
        matched = (self.value[top1] - value).abs().mean(dim=1) < self.config.threshold
        self.age += 1
        if matched.any():
            slots = top1[matched]
            self.key.index_add_(0, slots, query[matched])
            self.key[slots] = F.normalize(self.key[slots], dim=1)
            self.age[slots] = 0
        new = (~matched).nonzero(as_tuple=True)[0]
        if new.numel():
            noise = torch.empty_like(self.age).uniform_(-self.config.age_noise, self.config.age_noise)
            rank = self.age + noise
            if matched.any():
                rank[top1[matched]] = -float("inf")
            free = int(torch.isfinite(rank).sum())
            new = new[new.numel() - free:]  # the last `free` ones (none when free == 0)
            slots = rank.topk(new.numel()).indices
            self.key[slots] = query[new]
            self.value[slots] = value[new]
            self.top_index[slots] = index[new]
            self.age[slots] = 0
        return matched

    def ranked(self, query: torch.Tensor, top_k: int, hide: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, slots), each (B, k), of the `top_k` best slots per unit-norm query (B, key_dim),
        best first: the one ranking every read of a memory uses.

        Slots never written (`top_index` -1, still random) are masked once any slot is written
        (a memory with none written ranks its random slots, as the release reads a fresh bank).
        `hide` (B, mem_size), True where a query must not see a slot, masks more per query.
        """
        scores = self.scores(query)
        written = self.top_index >= 0
        if written.any():
            scores = scores.masked_fill(~written, -float("inf"))
        if hide is not None:
            scores = scores.masked_fill(hide, -float("inf"))
        return scores.topk(top_k, dim=1)

    def read(self, query: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
             exclude: torch.Tensor | None = None, hide: torch.Tensor | None = None) -> torch.Tensor:
        """Recalled values (B, value_dim): the best slot's value for k = 1, else the mean of the
        top-k slots' values weighted by softmax(score / temperature) (the release: temperature 1).

        Slots are ranked by `ranked`. `exclude` (B,) masks, per query, the slots written by that
        training-sample index (a leave-one-out read of the memory's own training samples); `hide`
        (B, mem_size) masks any other slots per query (e.g. those of the reader's scene).
        """
        if exclude is not None:
            own = self.top_index[None] == exclude[:, None]
            hide = own if hide is None else hide | own
        scores, idx = self.ranked(query, top_k, hide)  # (B, k)
        if top_k == 1:
            return self.value[idx[:, 0]]
        weights = (scores / temperature).softmax(dim=1)
        return (weights[..., None] * self.value[idx]).sum(dim=1)

    @torch.no_grad()
    def leave_one_out_scores(self, chunk: int = 1024) -> torch.Tensor:
        """The memory's own training reads, left one out: for each written slot, the best cosine
        score of its key against the written slots of the other training samples (1-D, on the CPU).

        A reference for a new image's best score (`utils.memory_effect.ScoreReference`). Memories
        with no written slot (`top_index` all -1) read all slots, each against all but itself.
        Slots with nothing left to read against give no score. `chunk` rows at a time bound the
        (chunk, slots) score matrix: 9000 slots x 512-d take a few seconds on a CPU.
        """
        written = self.top_index >= 0
        slots = written.nonzero(as_tuple=True)[0] if written.any() else torch.arange(len(written), device=written.device)
        best = []
        for start in range(0, len(slots), chunk):
            rows = slots[start:start + chunk]
            owner = self.top_index[rows, None]
            hide = (self.top_index[None] == owner) & (owner >= 0)  # the slots of the row's own sample
            hide[torch.arange(len(rows), device=rows.device), rows] = True  # never the slot itself
            best.append(self.ranked(self.key[rows].float(), 1, hide)[0][:, 0])
        found = torch.cat(best) if best else torch.zeros(0)
        return found[torch.isfinite(found)].cpu()


def refine_with_memory(y: torch.Tensor, recalled: torch.Tensor, pooling_size: int,
                       pooling_mean: bool = False, strength: float | None = None) -> torch.Tensor:
    """Correct enhancer outputs y (B, 3, H, W) with recalled values (B, 3 * p * p).

    mu = p x p average pool of y; r = m / mu. The release's correction (`strength` None): per
    channel (a1, a2) = softmax over (mu, m), gain g = a1 + a2 * r, about half-way to r.
    With a `strength` s: g = 1 + s * (r - 1) (s = 1 scales y to the recalled colour, s = 0 leaves
    it), s calibrated on training images. g = 1 when m = mu. With p > 1 the gain map is upsampled
    bilinearly to the image; `pooling_mean` uses one gain for all channels.
    Output = clamp(clamp(y) * g, 0, 1).
    """
    y = y.clamp(0, 1)
    b, p = y.shape[0], pooling_size
    mu = F.adaptive_avg_pool2d(y, p)  # (B, 3, p, p)
    m = recalled.reshape(b, 3, p, p).to(y.dtype)
    ratio = m / mu.clamp_min(1e-6)
    if strength is None:
        a = torch.stack([mu, m]).softmax(dim=0)  # (2, B, 3, p, p)
        gain = a[0] + a[1] * ratio
    else:
        gain = 1 + strength * (ratio - 1)
    if pooling_mean:
        gain = gain.mean(dim=1, keepdim=True)
    if p > 1:
        gain = F.interpolate(gain, size=y.shape[-2:], mode="bilinear", align_corners=False)
    return (y * gain).clamp(0, 1)
