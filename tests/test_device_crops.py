"""dataset.device_crops.DeviceCrops: batches drawn on the device are the crops PairedCrops would
give (a region at a valid offset under one of the 8 flips/rotations, the same for low and high),
every pair once per epoch, seedable and resumable. Each crop is identified by looking it up among
all crops of all pairs (random pixels make every 4x4 crop unique)."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from dataset.augment import dihedral
from dataset.device_crops import DeviceCrops, read_training_pairs
from dataset.paired_folder import read_pair
from dataset.pairing import ImagePair, find_pairs
from utils.errors import UserError

PS = 4


def random_pairs(sizes, seed=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(2))
            for h, w in sizes]


def key(crop: torch.Tensor) -> bytes:
    """A (3, ps, ps) crop, uint8 or float in [0, 1], as bytes."""
    if crop.is_floating_point():
        crop = (crop * 255).round().to(torch.uint8)
    return crop.contiguous().numpy().tobytes()


def catalogue(images, side: int) -> dict[bytes, tuple[int, int, int, int]]:
    """Every crop of every pair under every transform -> (pair, top, left, mode)."""
    found = {}
    count = 0
    for i, pair in enumerate(images):
        img = pair[side]
        h, w = img.shape[1:]
        for top in range(h - PS + 1):
            for left in range(w - PS + 1):
                for mode in range(8):
                    found[key(dihedral(img[:, top:top + PS, left:left + PS], mode))] = (i, top, left, mode)
                    count += 1
    assert len(found) == count, "two crops coincide: the lookup would be ambiguous"
    return found


def locate(crops: DeviceCrops, images, batches: int, batch_size: int) -> list[tuple[int, int, int, int]]:
    """(pair, top, left, mode) of every sample of `batches` batches; low and high must agree."""
    low_cat, high_cat = catalogue(images, 0), catalogue(images, 1)
    out = []
    for _ in range(batches):
        low, high = crops.sample(batch_size)
        assert low.shape == high.shape == (batch_size, 3, PS, PS) and low.dtype == torch.float32
        for lo, hi in zip(low, high):
            assert key(lo) in low_cat, "a low crop that is no transformed region of any pair"
            assert low_cat[key(lo)] == high_cat.get(key(hi)), "low and high crops differ in place or transform"
            out.append(low_cat[key(lo)])
    return out


def test_crops_are_transformed_regions_and_reach_every_offset_and_mode(make_pairs):
    """Pairs of two sizes read from PNG files: every sample is a region of one pair at a valid
    offset under one of the 8 transforms, low and high alike, in [0, 1] as k / 255 exactly; over
    4000 samples every offset of every size (the last ones included) and every mode occurs, none
    grossly more often than the others."""
    roots = [make_pairs(names=("a", "b", "c"), size=(10, 12), seed=1),
             make_pairs(names=("d", "e"), size=(9, 11), seed=2)]
    pairs = [p for root in roots for p in find_pairs(root)]
    images = read_training_pairs(pairs, PS)
    crops = DeviceCrops(images, PS, "cpu", seed=3)
    low, _ = crops.sample(4)
    assert torch.equal(low, (low * 255).round() / 255) and 0 <= low.min() and low.max() <= 1

    samples = locate(crops, images, batches=1000, batch_size=4)
    for shape, members in (((10, 12), {0, 1, 2}), ((9, 11), {3, 4})):
        offsets = Counter((top, left) for i, top, left, _ in samples if i in members)
        every = {(t, s) for t in range(shape[0] - PS + 1) for s in range(shape[1] - PS + 1)}
        assert set(offsets) == every, f"{shape}: offsets never drawn: {sorted(every - set(offsets))}"
        mean = sum(offsets.values()) / len(every)
        assert 0.4 * mean < min(offsets.values()) and max(offsets.values()) < 1.6 * mean, offsets
    modes = Counter(mode for *_, mode in samples)
    assert set(modes) == set(range(8))
    assert 0.8 * len(samples) / 8 < min(modes.values()), modes


def test_each_pair_once_per_epoch():
    """7 pairs in batches of 3: 2 batches per epoch hold 6 different pairs; the dropped pair
    changes from epoch to epoch, so over 40 epochs every pair is used."""
    images = random_pairs([(6, 5)] * 7, seed=4)
    crops = DeviceCrops(images, PS, "cpu", seed=5)
    assert crops.iters_per_epoch(3) == 2
    samples = locate(crops, images, batches=80, batch_size=3)
    epochs = [[s[0] for s in samples[e * 6:(e + 1) * 6]] for e in range(40)]
    assert all(len(set(ids)) == 6 for ids in epochs), epochs
    dropped = [(set(range(7)) - set(ids)).pop() for ids in epochs]
    assert set(dropped) == set(range(7)), dropped


def draws(crops: DeviceCrops, n: int, batch_size: int = 3) -> list[torch.Tensor]:
    return [torch.cat(crops.sample(batch_size)) for _ in range(n)]


def test_seeded_draws_are_reproducible():
    """The same seed gives the same batches; another seed other ones."""
    images = random_pairs([(10, 12)] * 5)
    a = draws(DeviceCrops(images, PS, "cpu", seed=7), 6)
    b = draws(DeviceCrops(images, PS, "cpu", seed=7), 6)
    c = draws(DeviceCrops(images, PS, "cpu", seed=8), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("taken", [0, 1, 2, 3])
def test_state_dict_continues_the_sequence(taken):
    """A sampler built with another seed and loaded with the state saved after `taken` batches
    (start, mid-epoch, epoch boundary; through torch.save/load(weights_only=True), as in a
    checkpoint) draws exactly the batches the original draws next."""
    images = random_pairs([(10, 12)] * 4 + [(9, 11)] * 3)
    first = DeviceCrops(images, PS, "cpu", seed=11)
    draws(first, taken)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    expected = draws(first, 5)
    buf.seek(0)
    second = DeviceCrops(images, PS, "cpu", seed=99)
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(x, y) for x, y in zip(expected, draws(second, 5)))


def test_shards_split_the_global_batch():
    """Two processes (shard 0/2 and 1/2) with one seed get the two halves of the batch that a
    single process draws, so they never train on the same pair in a step."""
    images = random_pairs([(10, 12)] * 6)
    whole = DeviceCrops(images, PS, "cpu", seed=2)
    halves = [DeviceCrops(images, PS, "cpu", seed=2, shard=(rank, 2)) for rank in range(2)]
    for _ in range(4):
        low, high = whole.sample(4)
        parts = [half.sample(4) for half in halves]
        assert torch.equal(low, torch.cat([p[0] for p in parts]))
        assert torch.equal(high, torch.cat([p[1] for p in parts]))


def test_bad_training_sets_are_user_errors(make_pairs, tmp_path):
    """PairedCrops' errors: an empty set, a pair without ground truth, an image below the patch."""
    with pytest.raises(UserError, match="empty"):
        read_training_pairs([], PS)
    root = make_pairs(names=("x",), size=(10, 12))
    lonely = ImagePair("x", root / "low" / "x.png", None)
    with pytest.raises(UserError, match="no ground truth") as err:
        read_training_pairs([lonely], PS)
    assert str(lonely.low) in str(err.value)
    with pytest.raises(UserError, match="--train_ps 11") as err:
        DeviceCrops.from_pairs(find_pairs(root), 11, "cpu")
    assert "12x10" in str(err.value)


def test_uint8_storage_matches_the_decoded_floats(make_pairs):
    """The uint8 tensors are read_pair's float images exactly (8-bit files)."""
    root = make_pairs(names=("p",), size=(10, 12), seed=6)
    (pair,) = find_pairs(root)
    ((low, high),) = read_training_pairs([pair], PS)
    ref_low, ref_high = read_pair(pair)
    assert np.array_equal(low.permute(1, 2, 0).numpy() / np.float32(255), ref_low)
    assert np.array_equal(high.permute(1, 2, 0).numpy() / np.float32(255), ref_high)
