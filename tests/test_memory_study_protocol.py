"""The K-fold study's protocol: scene groups stay inside one fold, and nothing a variant fits
ever sees a held-out pair's ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.memory_study import VARIANTS, Variant, fold_corrections, predictability
from dataset.scene_groups import grouped_folds, scene_groups
from models.frozen_pass import FrozenPass

H, W = 16, 24


def scene(seed: int) -> np.ndarray:
    """A smooth random normal-light image (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / W
    img = 0.5 + 0.4 * np.sin(rng.uniform(1, 6) * xx + rng.uniform(0, 6))[..., None] * np.cos(
        rng.uniform(1, 6) * yy + rng.uniform(0, 6))[..., None] * rng.uniform(0.5, 1, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_scene_groups_link_shots_of_one_scene():
    """Exposures of one scene (scaled, slightly noisy copies) share a group; other scenes don't."""
    rng = np.random.default_rng(0)
    base = [scene(s) for s in range(4)]
    shots, truth = [], []
    for s, img in enumerate(base):
        for k in range(s + 1):  # groups of 1..4 shots
            noisy = np.clip(img * (0.7 + 0.1 * k) + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
            shots.append(noisy)
            truth.append(s)
    groups = scene_groups(shots)
    for i in range(len(shots)):
        for j in range(len(shots)):
            assert (groups[i] == groups[j]) == (truth[i] == truth[j])


@pytest.mark.parametrize("k,seed", [(2, 0), (5, 1), (5, 7)])
def test_grouped_folds_never_split_a_group(k, seed):
    """Every group lies in one fold, every fold is used and the sizes stay near-equal."""
    groups = np.random.default_rng(seed).integers(0, 40, 150)
    groups = np.unique(groups, return_inverse=True)[1]
    folds = grouped_folds(groups, k, seed)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    sizes = np.bincount(folds, minlength=k)
    assert sizes.min() > 0 and sizes.max() - sizes.min() <= np.bincount(groups).max()


def fake_pass(i: int, rng: np.random.Generator) -> FrozenPass:
    high = scene(100 + i)
    ori = torch.from_numpy(high).permute(2, 0, 1).float() / 255 * float(rng.uniform(0.4, 1.2))
    dims = (8, 16, 32, 32)
    return FrozenPass(f"p{i}", ori.clamp(0, 1).half(), high,
                      [torch.from_numpy(rng.normal(size=d)).float() for d in dims],
                      [torch.from_numpy(rng.uniform(0.1, 1, d)).float() for d in dims],
                      torch.from_numpy(rng.normal(size=(32, 2, 3))).half())


def poisoned(fp: FrozenPass, level: int) -> FrozenPass:
    """The pass with its ground truth replaced by a flat `level` (the rest unchanged)."""
    return FrozenPass(fp.name, fp.ori, np.full_like(fp.high, level), fp.level_mean, fp.level_std, fp.latent)


FITTED = [v for v in VARIANTS if v.entries == "images" and (v.strength is not None or v.value == "ratio")]


@pytest.mark.parametrize("variant,bound", [(v, None) for v in FITTED] +
                         [(VARIANTS[2], "constant"), (VARIANTS[2], "predictor")],
                         ids=[v.name for v in FITTED] + ["constant", "predictor"])
def test_held_out_ground_truth_never_reaches_what_is_fitted(variant, bound):
    """A fold's corrections of its held-out pairs (recalled colour, strength, fitted settings) stay
    the same when the held-out pairs' ground truth is replaced by noise: it reached no fitted
    part. The oracle bound, which reads it on purpose, changes (the test can fail)."""
    rng = np.random.default_rng(0)
    passes = [fake_pass(i, rng) for i in range(16)]
    train, held = passes[:8], passes[8:]
    groups = np.arange(8) // 2
    a = fold_corrections(variant, train, held, groups, 8, 0, bound)
    for level in (0, 255):
        b = fold_corrections(variant, train, [poisoned(fp, level) for fp in held], groups, 8, 0, bound)
        for ra, rb in zip(a[0], b[0]):
            assert torch.allclose(ra, rb)
        assert a[1] == b[1] and str(a[2]) == str(b[2])
    oracle = fold_corrections(VARIANTS[2], train, [poisoned(fp, 255) for fp in held], groups, 8, 0, "oracle")
    assert not all(torch.allclose(ra, ro) for ra, ro in zip(a[0], oracle[0]))


def test_predictability_is_cross_validated():
    """R^2 of the ratio predictor is finite per channel and at most 1."""
    rng = np.random.default_rng(1)
    passes = [fake_pass(i, rng) for i in range(12)]
    groups = np.arange(12) // 2
    out = predictability(passes, grouped_folds(groups, 3, 0), groups, 0)
    assert len(out["r2_per_channel"]) == 3 and all(np.isfinite(out["r2_per_channel"]))
    assert max(out["r2_per_channel"]) <= 1


def test_variant_names_are_unique():
    assert len({v.name for v in VARIANTS}) == len(VARIANTS) and isinstance(VARIANTS[0], Variant)
