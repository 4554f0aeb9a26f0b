"""A fold's memory, written from its training passes with the update rule of `train_memory.py`."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.memory_kfold.statistics import PassStatistics
from benchmarks.memory_kfold.variants import Variant
from models.frozen_pass import FrozenPass, describe_passes
from models.inference import MULTIPLE
from models.memory import ExternalMemory, MemoryConfig, pooled_value


def crop_samples(fp: FrozenPass, crop: int, p: int, margin: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random `crop`-px crop of a pair: its descriptor (from the latent map's window over the
    crop, i.e. the crop seen in the context of its whole image) and its target's pooled value.
    The crop is aligned to the latent grid (stride 8)."""
    h, w = fp.high.shape[:2]
    s = MULTIPLE
    y0 = int(rng.integers(0, (h - crop) // s + 1)) * s
    x0 = int(rng.integers(0, (w - crop) // s + 1)) * s
    ly, lx = (y0 + margin) // s, (x0 + margin) // s
    window = fp.latent[:, ly:ly + crop // s, lx:lx + crop // s].float().flatten(1)  # (8C, crop/8 * crop/8)
    query = F.normalize(torch.cat([window.mean(1), window.std(1, unbiased=False)]), dim=0)
    patch = torch.from_numpy(fp.high[y0:y0 + crop, x0:x0 + crop]).permute(2, 0, 1)[None].float() / 255
    return query, pooled_value(patch, p)[0]


def _epochs(variant: Variant, passes: list[FrozenPass], stats: PassStatistics, margin: int, seed: int) -> list:
    """(queries, values, sample indices) of each pass over the training passes."""
    p = variant.pooling_size
    if variant.entries == "images":
        queries = describe_passes(passes, variant.query)
        values = torch.cat([stats.target_value(fp, p, variant.value) for fp in passes])
        return [(queries, values, torch.arange(len(passes)))]
    if variant.entries != "crops":
        raise ValueError(f"unknown entries {variant.entries!r}")
    if variant.query != "enhancer" or variant.value != "colour":
        raise ValueError("crop entries are studied with the enhancer query only")
    rng = np.random.default_rng(seed)
    epochs = []
    for _ in range(variant.epochs):
        order = rng.permutation(len(passes))
        qv = [crop_samples(passes[i], variant.crop, p, margin, rng) for i in order]
        epochs.append((torch.stack([q for q, _ in qv]), torch.stack([v for _, v in qv]), torch.as_tensor(order)))
    return epochs


def fill(variant: Variant, passes: list[FrozenPass], stats: PassStatistics, margin: int, seed: int,
         after_epoch: Callable[[int, ExternalMemory], None] | None = None) -> ExternalMemory:
    """A memory written from `passes` (sample index = position in the list) with the update rule;
    `after_epoch(epoch, memory)` is called after each pass over them."""
    epochs = _epochs(variant, passes, stats, margin, seed)
    config = MemoryConfig(key_dim=epochs[0][0].shape[1], pooling_size=variant.pooling_size)
    memory = ExternalMemory(config, torch.Generator().manual_seed(seed))
    for epoch, (queries, values, index) in enumerate(epochs, 1):
        for part in range(0, len(index), 128):  # the release's batch of 128
            sl = slice(part, part + 128)
            memory.update(queries[sl], values[sl], index[sl])
        if after_epoch is not None:
            after_epoch(epoch, memory)
    return memory
