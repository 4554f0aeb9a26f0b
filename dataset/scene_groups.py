"""Which pairs of a folder show the same scene, so a cross-validation can keep a scene on one side.

LOL holds several shots of one scene (other exposures of the same view, often one normal-light
target shared by several pairs). Two pairs are linked when the correlation of small grey
thumbnails (16 x 24, area-averaged, mean removed) of their normal-light images is at least
`threshold`; a scene group is a connected set of links. On the 395 LOL-v1 our485 pairs the
nearest-neighbour correlations split into two clusters, below 0.85 and above 0.92, with only two
pairs between: 0.9 (the default) gives 207 groups, and any threshold from 0.8 to 0.95 gives 204-209.
"""
from __future__ import annotations

import cv2
import numpy as np

from dataset.pairing import ImagePair
from utils.image_io import read_image_compact, to_uint8

SCENE_THUMB_HW = (16, 24)  # height, width of the grey thumbnail that identifies a scene
DEFAULT_THRESHOLD = 0.9


def scene_vector(img: np.ndarray) -> np.ndarray:
    """A uint8 RGB (H, W, 3) image -> its unit-norm, zero-mean grey thumbnail (384,)."""
    grey = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY).astype(np.float32)
    t = cv2.resize(grey, SCENE_THUMB_HW[::-1], interpolation=cv2.INTER_AREA).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-8)


def input_scenes(pairs: list[ImagePair]) -> np.ndarray:
    """(N, D) scene vectors of the pairs' low-light inputs, from their 8-bit pixels: what a memory
    stores of its training inputs to tell a scene it has seen (`models.abstention`)."""
    return np.stack([scene_vector(to_uint8(read_image_compact(pair.low))) for pair in pairs])


def scene_groups(targets: list[np.ndarray], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Group number (0..G-1, in order of first appearance) of each normal-light image: the
    connected components of thumbnail correlation >= `threshold`."""
    v = np.stack([scene_vector(t) for t in targets])
    linked = v @ v.T >= threshold
    parent = np.arange(len(v))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        parent[root(i)] = root(j)
    roots = [root(i) for i in range(len(v))]
    number = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return np.array([number[r] for r in roots])


def grouped_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each sample with every group inside one fold: the groups in a
    seeded random order, largest first (a stable sort), each put into the fold with the fewest
    samples so far, so the folds stay near-equal in size."""
    ids = np.random.default_rng(seed).permutation(groups.max() + 1)
    sizes = np.bincount(groups)
    order = sorted(ids, key=lambda g: -sizes[g])
    fill, fold_of_group = np.zeros(k, dtype=int), np.empty(len(sizes), dtype=int)
    for g in order:
        f = int(np.argmin(fill))
        fold_of_group[g] = f
        fill[f] += sizes[g]
    return fold_of_group[groups]
