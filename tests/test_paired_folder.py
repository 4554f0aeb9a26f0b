"""dataset/paired_folder.py: reading a pair, the whole-image dataset and the aligned training crops."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import random_rgb, write_png
from dataset.augment import dihedral
from dataset.paired_folder import PairedCrops, PairedImages, read_pair
from dataset.pairing import ImagePair, find_pairs
from utils.errors import UserError
from utils.image_io import read_image


def test_read_pair_size_mismatch_names_both_files(tmp_path):
    """Low and high of different sizes: a UserError naming both files."""
    low = write_png(tmp_path / "low" / "1.png", random_rgb(0, (6, 5)))
    high = write_png(tmp_path / "high" / "1.png", random_rgb(1, (6, 7)))
    with pytest.raises(UserError) as err:
        read_pair(ImagePair("1", low, high))
    assert str(low) in str(err.value) and str(high) in str(err.value)


def test_paired_images(make_pairs):
    """PairedImages yields (3, H, W) float tensors in [0, 1] equal to the files, and the name;
    high is empty without ground truth."""
    root = make_pairs(names=("1",), size=(5, 9))
    low, high, name = PairedImages(find_pairs(root))[0]
    assert name == "1" and low.shape == high.shape == (3, 5, 9) and low.dtype == torch.float32
    np.testing.assert_allclose(low.permute(1, 2, 0).numpy(), read_image(root / "low" / "1.png"))
    root2 = make_pairs(names=("1",), size=(5, 9), high_dir=None)
    low, high, _ = PairedImages(find_pairs(root2, require_high=False))[0]
    assert low.shape == (3, 5, 9) and high.numel() == 0


def test_paired_crops_image_smaller_than_patch(make_pairs):
    """An image smaller than --train_ps is a UserError naming it."""
    root = make_pairs(names=("1",), size=(16, 7))
    with pytest.raises(UserError, match=re.escape(str(root / "low" / "1.png"))):
        PairedCrops(find_pairs(root), 8)


def test_paired_crops_needs_pairs_and_ground_truth(make_pairs):
    """No pairs, or pairs without ground truth, are UserErrors."""
    with pytest.raises(UserError):
        PairedCrops([], 8)
    root = make_pairs(names=("1",), high_dir=None)
    with pytest.raises(UserError, match=re.escape(str(root / "low" / "1.png"))):
        PairedCrops(find_pairs(root, require_high=False), 8)


def _all_dihedral_windows(img: torch.Tensor, size: int) -> list[torch.Tensor]:
    h, w = img.shape[-2:]
    return [dihedral(img[:, t:t + size, c:c + size], m)
            for t in range(h - size + 1) for c in range(w - size + 1) for m in range(8)]


def test_paired_crops_shape_and_alignment(make_pairs):
    """Crops are (3, ps, ps), one flip/rotation of a window of the image with read_image's values
    exactly, and the low and high crops are the same window with the same transform (high = 1 - low
    holds on every crop)."""
    root = make_pairs(names=("a", "b"), size=(11, 13), high_fn=lambda low: 255 - low)
    ds = PairedCrops(find_pairs(root), 8)
    assert len(ds) == 2
    torch.manual_seed(0)
    full_low = torch.from_numpy(read_image(root / "low" / "a.png").transpose(2, 0, 1))
    windows = _all_dihedral_windows(full_low, 8)
    modes_seen = set()
    for _ in range(40):
        low, high = ds[0]
        assert low.shape == high.shape == (3, 8, 8) and low.dtype == torch.float32
        assert low.is_contiguous() and high.is_contiguous()
        torch.testing.assert_close(high, 1 - low, atol=1e-6, rtol=0)
        matches = [i for i, win in enumerate(windows) if torch.equal(win, low)]
        assert matches, "the crop is not a flip/rotation of a window of the image"
        modes_seen.add(matches[0] % 8)
    assert len(modes_seen) >= 6  # the transforms really vary


def test_paired_crops_hold_8_bit_files_as_bytes_and_16_bit_files_whole(make_pairs, tmp_path):
    """The decoded pairs stay in memory for the whole run: an 8-bit pair takes one byte per value
    (a quarter of float32); a 16-bit pair keeps its precision (crops of read_image's values)."""
    root = make_pairs(names=("a", "b"), size=(11, 13))
    assert PairedCrops(find_pairs(root), 8).nbytes == 2 * 2 * 3 * 11 * 13
    deep = np.random.default_rng(3).integers(0, 65536, (9, 10, 3), dtype=np.uint16)
    for side in ("low", "high"):
        write_png(tmp_path / "deep" / side / "d.png", deep)
    low, _ = PairedCrops(find_pairs(tmp_path / "deep"), 9)[0]
    full = torch.from_numpy(read_image(tmp_path / "deep" / "low" / "d.png").transpose(2, 0, 1))
    assert any(torch.equal(win, low) for win in _all_dihedral_windows(full, 9))
