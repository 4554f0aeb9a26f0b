"""Paired augmentations. Randomness comes from torch's RNG, so a seeded (and resumed) run, and
each DataLoader worker (seeded by PyTorch from the base seed), is reproducible."""
from __future__ import annotations

import torch


def random_crop(low: torch.Tensor, high: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `size` x `size` crop of two (C, H, W) tensors; every offset, the last included,
    is equally likely."""
    h, w = low.shape[-2:]
    top = int(torch.randint(0, h - size + 1, ()))
    left = int(torch.randint(0, w - size + 1, ()))
    return (low[:, top:top + size, left:left + size], high[:, top:top + size, left:left + size])


def dihedral(x: torch.Tensor, mode: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a (C, H, W) tensor: `mode` 0-3 rotate by 90*mode degrees,
    4-7 do the same after a vertical flip."""
    if mode >= 4:
        x = x.flip(-2)
    return torch.rot90(x, mode % 4, dims=(-2, -1))


def random_dihedral(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip/rotation of both images (contiguous copies)."""
    mode = int(torch.randint(0, 8, ()))
    return dihedral(low, mode).contiguous(), dihedral(high, mode).contiguous()
