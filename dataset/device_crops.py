"""Training crops drawn on the training device: the pairs live there as uint8, so a batch costs a
few index computations and one gather instead of a DataLoader round trip through host memory.

The samples follow `PairedCrops`: each pair once per epoch (a fresh permutation, the last partial
batch dropped), a crop at any valid offset with equal probability, then one of the 8
flips/rotations of `dataset.augment.dihedral`, the same for the low and the high image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dataset.augment import dihedral
from dataset.paired_folder import read_training_set
from dataset.pairing import ImagePair
from utils.image_io import to_uint8

_DRAW_RANGE = 2**62  # offsets are draws in [0, 2**62) modulo the offset count: a bias below 1e-15


def _chw_uint8(img: np.ndarray) -> torch.Tensor:
    as_uint8 = to_uint8(img)  # 16-bit and float files rounded
    return torch.from_numpy(np.ascontiguousarray(as_uint8.transpose(2, 0, 1)))  # (3, H, W)


def read_training_pairs(pairs: list[ImagePair], patch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode every pair as uint8 (3, H, W) tensors, with `PairedCrops`' checks (empty set, no
    ground truth, an image smaller than the patch). 16-bit files are rounded to 8 bits."""
    return [tuple(map(_chw_uint8, images)) for images in read_training_set(pairs, patch_size)]


def dihedral_sources(patch_size: int) -> torch.Tensor:
    """(8, 2, ps, ps) int64: for mode m and output pixel (i, j), the (row, col) of the crop pixel
    that `dihedral(crop, m)` puts there. Built with `dihedral` itself, so the two always agree."""
    rows, cols = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), indexing="ij")
    grid = torch.stack([rows, cols])  # (2, ps, ps): each pixel holds its own position
    return torch.stack([dihedral(grid, mode) for mode in range(8)])


class DeviceCrops:
    """Random `patch_size` crops of uint8 image pairs held on `device`; `sample` draws a batch there.

    The images of all sizes are stored flat, one buffer per side, so one gather serves a batch of
    mixed sizes. Randomness comes from a `torch.Generator` on `device` seeded with `seed`;
    `state_dict`/`load_state_dict` carry it and the epoch's permutation through a checkpoint.
    `shard=(rank, world_size)`: every process draws the same global batch and keeps its slice, so
    the ranks see disjoint pairs, as with a DistributedSampler.
    """

    def __init__(self, images: list[tuple[torch.Tensor, torch.Tensor]], patch_size: int,
                 device: torch.device | str, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        if not images:
            raise ValueError("DeviceCrops needs at least one image pair")
        for low, high in images:
            if low.dtype != torch.uint8 or low.shape != high.shape or low.dim() != 3 or low.shape[0] != 3:
                raise ValueError(f"pairs must be two uint8 (3, H, W) tensors of one size, got "
                                 f"{tuple(low.shape)} {low.dtype} and {tuple(high.shape)} {high.dtype}")
            if min(low.shape[1:]) < patch_size:
                raise ValueError(f"image {tuple(low.shape)} is smaller than the patch {patch_size}")
        self.device = torch.device(device)
        self.patch_size = patch_size
        self.rank, self.world_size = shard
        sizes = [low.numel() for low, _ in images]
        self.low = torch.cat([low.reshape(-1) for low, _ in images]).to(self.device)  # (sum 3HW,)
        self.high = torch.cat([high.reshape(-1) for _, high in images]).to(self.device)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.start = torch.as_tensor(starts, dtype=torch.int64, device=self.device)  # (N,)
        self.height = torch.tensor([low.shape[1] for low, _ in images], device=self.device)  # (N,)
        self.width = torch.tensor([low.shape[2] for low, _ in images], device=self.device)  # (N,)
        self.sources = dihedral_sources(patch_size).to(self.device)  # (8, 2, ps, ps)
        self.channel = torch.arange(3, device=self.device)  # (3,)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.int64, device=self.device)  # this epoch's permutation
        self.position = len(self)  # pairs of `order` used so far: none left, the first draw permutes

    @classmethod
    def from_pairs(cls, pairs: list[ImagePair], patch_size: int, device: torch.device | str,
                   seed: int = 0, shard: tuple[int, int] = (0, 1)) -> DeviceCrops:
        """Decode `pairs` (`read_training_pairs`) and move them to `device`."""
        return cls(read_training_pairs(pairs, patch_size), patch_size, device, seed, shard)

    def __len__(self) -> int:
        return len(self.height)

    @property
    def nbytes(self) -> int:
        """The memory the pairs take on `device`."""
        return self.low.nbytes + self.high.nbytes

    def iters_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch of the global `batch_size` (the last partial batch is dropped)."""
        return len(self) // batch_size

    def _next_pairs(self, batch_size: int) -> torch.Tensor:
        if self.position + batch_size > len(self):  # epoch done: a new permutation
            self.order = torch.randperm(len(self), generator=self.generator, device=self.device)
            self.position = 0
        idx = self.order[self.position:self.position + batch_size]
        self.position += batch_size
        return idx

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of a global batch of `batch_size` crops: (low, high) float32 in
        [0, 1], each (batch_size // world_size, 3, ps, ps). No host synchronisation."""
        if batch_size % self.world_size or not 0 < batch_size <= len(self):
            raise ValueError(f"batch {batch_size} must split over {self.world_size} processes and "
                             f"be at most the {len(self)} pairs")
        idx = self._next_pairs(batch_size)  # (B,)
        draws = torch.randint(0, _DRAW_RANGE, (3, batch_size), generator=self.generator, device=self.device)
        share = batch_size // self.world_size
        keep = slice(self.rank * share, (self.rank + 1) * share)
        idx, draws = idx[keep], draws[:, keep]  # (b,), (3, b)
        ps = self.patch_size
        h, w = self.height[idx], self.width[idx]  # (b,)
        top = draws[0] % (h - ps + 1)
        left = draws[1] % (w - ps + 1)
        mode = draws[2] % 8
        src = self.sources[mode]  # (b, 2, ps, ps): crop row/col under each sample's transform
        rows = top[:, None, None] + src[:, 0]  # (b, ps, ps)
        cols = left[:, None, None] + src[:, 1]
        pixel = rows * w[:, None, None] + cols  # (b, ps, ps) offset inside one channel
        plane = self.channel[None, :] * (h * w)[:, None]  # (b, 3)
        flat = self.start[idx][:, None, None, None] + plane[:, :, None, None] + pixel[:, None]  # (b, 3, ps, ps)
        return self.low[flat].float() / 255, self.high[flat].float() / 255

    def state_dict(self) -> dict[str, Any]:
        """Generator state, permutation and position: what `load_state_dict` needs to continue."""
        return {"generator": self.generator.get_state(), "order": self.order.clone(),
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.device)
        self.position = int(state["position"])
