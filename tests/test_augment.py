"""dataset/augment.py: random crops reach every offset, and the eight flips/rotations are applied
alike to both images of a pair."""
from __future__ import annotations

import torch

from dataset.augment import dihedral, random_crop, random_dihedral


def test_random_crop_reaches_every_offset():
    """Image 10 wide / 9 high, patch 8: offsets 0, 1, 2 (left) and 0, 1 (top), the last included,
    all appear, and low/high get the same offset."""
    h, w = 9, 10
    low = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    high = -low
    torch.manual_seed(0)
    tops, lefts = set(), set()
    for _ in range(200):
        a, b = random_crop(low, high, 8)
        assert a.shape == (1, 8, 8)
        assert torch.equal(b, -a)
        v = int(a[0, 0, 0])
        tops.add(v // w)
        lefts.add(v % w)
    assert tops == {0, 1}
    assert lefts == {0, 1, 2}


def test_random_crop_full_size():
    """Patch == image size: the crop is the whole image."""
    x = torch.rand(3, 8, 8)
    a, b = random_crop(x, x + 1, 8)
    assert torch.equal(a, x) and torch.equal(b, x + 1)


def test_dihedral_gives_the_eight_transforms():
    """Modes 0..7 are the 8 distinct flips/rotations; mode 0 is the identity."""
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    outs = [dihedral(x, m) for m in range(8)]
    assert torch.equal(outs[0], x)
    keys = {(tuple(o.shape), tuple(o.flatten().tolist())) for o in outs}
    assert len(keys) == 8
    expected = set()
    for flip in (False, True):
        y = x.flip(-1) if flip else x
        for k in range(4):
            r = torch.rot90(y, k, dims=(-2, -1))
            expected.add((tuple(r.shape), tuple(r.flatten().tolist())))
    assert keys == expected


def test_random_dihedral_same_transform_for_both():
    """random_dihedral applies one transform to both images."""
    torch.manual_seed(1)
    x = torch.rand(3, 5, 7)
    for _ in range(20):
        a, b = random_dihedral(x, 2 * x)
        assert torch.equal(b, 2 * a)
