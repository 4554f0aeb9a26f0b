"""Datasets over `ImagePair`s: whole images for evaluation, random crops for training."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.augment import random_crop, random_dihedral
from dataset.pairing import ImagePair
from utils.errors import UserError
from utils.image_io import decode_stored, read_image, read_image_compact, to_float


def read_pair(pair: ImagePair, compact: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode both images of a pair (`compact`: as `read_image_compact`, else float32); different
    sizes are a UserError naming the two files."""
    read = read_image_compact if compact else read_image
    low = read(pair.low)
    if pair.high is None:
        return low, None
    high = read(pair.high)
    if low.shape != high.shape:
        raise UserError(f"{pair.low} is {low.shape[1]}x{low.shape[0]} but {pair.high} is "
                        f"{high.shape[1]}x{high.shape[0]}; the two images of a pair must have one size")
    return low, high


def _size(path: Path) -> str:
    return "x".join(map(str, decode_stored(path).shape[1::-1]))  # "WxH"


def check_inputs(pairs: list[ImagePair], enhanced: dict[str, Path] | None = None) -> None:
    """Decode every image of `pairs` (and each pair's image in `enhanced`) before any output is
    written: one UserError lists every file that does not decode and every pair whose images
    differ in size, so a bad file can no longer stop a run halfway.

    A full decode by the run's own reader, not a header check: it also finds truncated files,
    and costs ~10 ms per 600x400 PNG on a 2-core CPU, under 1 % of the enhancer's time for it.
    """
    unreadable, mismatched = [], []
    for pair in pairs:
        sizes = {}
        for path in filter(None, (pair.low, pair.high, (enhanced or {}).get(pair.name))):
            try:
                sizes[path] = _size(path)
            except UserError:
                unreadable.append(str(path))
        low = sizes.get(pair.low)
        mismatched += [f"{pair.low} is {low} but {path} is {size}" for path, size in sizes.items() if low and size != low]
    problems = ([f"cannot read {len(unreadable)} image(s) (missing, truncated or not images): "
                 f"{', '.join(unreadable)}"] if unreadable else []) + mismatched
    if problems:
        raise UserError(f"{'; '.join(problems)}; replace or remove them (a pair's images must have one size)")


def read_training_set(pairs: list[ImagePair], patch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Both images of every training pair as `read_image_compact` gives them (uint8 for 8-bit
    files), one pair at a time: a caller that converts them holds one copy of the set, not two.
    An empty set, a pair without ground truth or an image smaller than the patch is a UserError
    naming the file."""
    if not pairs:
        raise UserError("the training set is empty; check --train_dir")
    for pair in pairs:
        low, high = read_pair(pair, compact=True)
        if high is None:
            raise UserError(f"{pair.low} has no ground truth image; training needs low/ and high/")
        h, w = low.shape[:2]
        if h < patch_size or w < patch_size:
            raise UserError(f"{pair.low} is {w}x{h}, smaller than --train_ps {patch_size}; "
                            "use a smaller --train_ps or remove the image")
        yield low, high


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class PairedImages(Dataset):
    """Whole images, decoded on access: `(low, high, name)` with (3, H, W) tensors in [0, 1].

    `high` is an empty tensor for pairs without ground truth.
    """

    def __init__(self, pairs: list[ImagePair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        low, high = read_pair(self.pairs[i])
        return _chw(low), (_chw(high) if high is not None else torch.empty(0)), self.pairs[i].name


class PairedCrops(Dataset):
    """Training samples: a random `patch_size` crop (every valid offset equally likely) of a pair,
    then one of the 8 flips/rotations, as float32 in [0, 1] (`read_image`'s values). One sample
    per pair per epoch, as in the original.

    All pairs are decoded once into RAM as stored (`read_training_set`) so epochs cost no PNG
    decoding: our485's 395 pairs (600x400) take 0.53 GB as uint8; as float32 they took 2.1 GB,
    and twice that while being converted. Images smaller than the patch are a UserError.
    """

    def __init__(self, pairs: list[ImagePair], patch_size: int):
        self.pairs = pairs
        self.patch_size = patch_size
        self.images = [tuple(map(_chw, images)) for images in read_training_set(pairs, patch_size)]

    @property
    def nbytes(self) -> int:
        """The memory the decoded pairs hold."""
        return sum(img.nbytes for images in self.images for img in images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = random_dihedral(*random_crop(*self.images[i], self.patch_size))
        return _as_float(low), _as_float(high)


def _as_float(crop: torch.Tensor) -> torch.Tensor:
    """A crop of a compactly held image as float32 in [0, 1] (`to_float`, as `read_image`)."""
    return crop if crop.is_floating_point() else torch.from_numpy(to_float(crop.numpy()))


class WithIndex(Dataset):
    """Any dataset's samples followed by their index (the memory records which sample wrote a slot)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return (*self.dataset[i], i)
