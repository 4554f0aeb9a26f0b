"""The K-fold study's protocol: scene groups stay inside one fold, and nothing a variant fits
ever sees a held-out pair's ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.memory_kfold.folds import Corrections, Fold, fold_corrections
from benchmarks.memory_kfold.predictor import predictability
from benchmarks.memory_kfold.statistics import PassStatistics
from benchmarks.memory_kfold.variants import BOUND_BASE, BY_NAME, VARIANTS, StrengthRule
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


def make_fold(train: list[FrozenPass], held: list[FrozenPass]) -> Fold:
    """Scene groups of two shots each, each group's input scene one basis vector; the first half
    of the held-out inputs show training scenes (seen), the rest new ones (orthogonal to all)."""
    basis = np.eye(384)
    groups = np.arange(len(train)) // 2
    half = len(held) // 2
    held_scenes = np.concatenate([basis[:half], basis[100:100 + len(held) - half]])
    return Fold(train, groups, basis[groups], held, held_scenes)


FITTED = [v for v in VARIANTS if v.entries == "images" and
          (v.strength.rule is not StrengthRule.RELEASE or v.value == "ratio" or v.abstain != "off")]
CASES = [(v, None) for v in FITTED] + [(BOUND_BASE, "constant"), (BOUND_BASE, "predictor")]
IDS = [v.name for v in FITTED] + ["constant", "predictor"]


def same(a: Corrections, b: Corrections) -> bool:
    return (all(torch.allclose(ra, rb) for ra, rb in zip(a.recalled, b.recalled)) and a.strengths == b.strengths
            and a.corrected == b.corrected and str(a.fitted) == str(b.fitted))


@pytest.mark.parametrize("variant,bound", CASES, ids=IDS)
def test_held_out_ground_truth_never_reaches_what_is_fitted(variant, bound):
    """A fold's corrections of its held-out pairs (recalled colour, strength, abstention, fitted
    settings) stay the same when the held-out pairs' ground truth is replaced by a flat image:
    it reached no fitted part. The same comparison sees the training pairs' ground truth reach
    them (the control: the test can fail)."""
    rng = np.random.default_rng(0)
    passes = [fake_pass(i, rng) for i in range(16)]
    train, held = passes[:8], passes[8:]
    a = fold_corrections(variant, make_fold(train, held), 8, 0, PassStatistics(), bound)
    for level in (0, 255):
        b = fold_corrections(variant, make_fold(train, [poisoned(fp, level) for fp in held]), 8, 0,
                             PassStatistics(), bound)
        assert same(a, b)
    leaked = fold_corrections(variant, make_fold([poisoned(fp, 255) for fp in train], held), 8, 0,
                              PassStatistics(), bound)
    assert not same(a, leaked)


def perfect_outputs(n: int) -> list[FrozenPass]:
    """Passes whose enhancer outputs equal their targets: any correction towards another scene's
    colour loses."""
    rng = np.random.default_rng(3)
    passes = []
    for i in range(n):
        fp = fake_pass(i, rng)
        passes.append(FrozenPass(fp.name, torch.from_numpy(fp.high).permute(2, 0, 1).half() / 255, fp.high,
                                 fp.level_mean, fp.level_std, fp.latent))
    return passes


def test_fitted_strength_can_switch_the_memory_off():
    """The study's strength grid is calibration's, 0 included: where unseen recall loses, the
    fitted strength is 0 (no correction), not the grid's smallest correction."""
    passes = perfect_outputs(16)
    variant = BY_NAME["images, levels, k=1, ratio value, fitted strength"]
    c = fold_corrections(variant, make_fold(passes[:8], passes[8:]), 8, 0, PassStatistics())
    assert c.fitted["smax"] == 0.0 and set(c.strengths) == {0.0}


def test_abstention_in_a_fold_corrects_seen_scenes_only():
    """Where correcting unseen scenes loses, the rule fitted on the training folds corrects the
    held-out passes whose input scene the training folds hold and leaves the new scenes alone."""
    passes = perfect_outputs(16)
    variant = BY_NAME["images, levels, k=1, softmax, abstain by scene"]
    c = fold_corrections(variant, make_fold(passes[:8], passes[8:]), 8, 0, PassStatistics())
    assert c.fitted["min_scene"] is not None
    assert c.corrected == [True] * 4 + [False] * 4


def test_predictability_tells_a_predictable_correction_from_noise():
    """The cross-validated R^2 is high where the needed correction can be read off the output (its
    targets share one brightness, so the output's brightness gives the gain) and near or below
    zero where the same outputs get their gains shuffled (noise to every feature). The encoder
    statistics are one constant, so the output's statistics are the features that vary."""
    rng = np.random.default_rng(1)
    base = [fake_pass(i, rng) for i in range(24)]
    gains = np.exp(rng.normal(0, 0.3, 24))
    groups = np.arange(24) // 2
    folds = grouped_folds(groups, 3, 0)

    def pair(fp: FrozenPass, target_gain: float, output_gain: float) -> FrozenPass:
        flat = fp.high.astype(np.float64) * (100 / fp.high.mean())  # every target of mean 100
        ori = torch.from_numpy(flat / 255 / output_gain).permute(2, 0, 1).clamp(0, 1)
        high = np.clip(ori.permute(1, 2, 0).numpy() * target_gain * 255, 0, 255).round().astype(np.uint8)
        return FrozenPass(fp.name, ori.half(), high, base[0].level_mean, base[0].level_std, fp.latent)

    predictable = [pair(fp, g, g) for fp, g in zip(base, gains)]
    shuffled = [pair(fp, g, h) for fp, g, h in zip(base, rng.permutation(gains), gains)]
    r2_predictable = predictability(predictable, folds, groups, 0, PassStatistics())["r2_mean"]
    r2_noise = predictability(shuffled, folds, groups, 0, PassStatistics())["r2_mean"]
    assert r2_predictable > 0.8 and r2_noise < 0.2


def test_variant_names_are_unique_and_named():
    assert len(BY_NAME) == len(VARIANTS)
