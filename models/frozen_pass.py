"""What the memory needs of one frozen enhancer pass, computed once per image and kept on disk.

The memory never changes the enhancer, so its output and features for a training pair are the
same in every memory run. `FrozenPass` holds them for one pair: the enhancer output, the ground
truth, per-level feature statistics (every enhancer query descriptor is made from these) and the
latent map (for descriptors of 128-px crops). `cached_passes` computes the missing ones and
reads the rest, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset.paired_folder import read_pair
from dataset.pairing import ImagePair
from models import fast
from models.inference import BORDER_MARGIN, enhance_with_features
from models.query import describe
from utils.checkpoint import save_checkpoint
from utils.image_io import image_to_tensor, to_uint8

CACHE_VERSION = 1


@dataclass
class FrozenPass:
    """One pair through the frozen enhancer. Tensors are on the CPU."""

    name: str
    ori: torch.Tensor  # (3, H, W) float16 enhancer output in [0, 1]
    high: np.ndarray  # (H, W, 3) uint8 ground truth
    level_mean: list[torch.Tensor]  # per encoder level: (C_l,) mean over space
    level_std: list[torch.Tensor]  # per encoder level: (C_l,) std over space
    latent: torch.Tensor  # (8C, h, w) float16 deepest encoder features (stride 8)

    def to_dict(self) -> dict:
        return {"name": self.name, "ori": self.ori, "high": torch.from_numpy(self.high),
                "level_mean": self.level_mean, "level_std": self.level_std, "latent": self.latent,
                "version": CACHE_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "FrozenPass":
        return cls(d["name"], d["ori"], d["high"].numpy(), d["level_mean"], d["level_std"], d["latent"])


@torch.no_grad()
def frozen_pass(enhancer: torch.nn.Module, pair: ImagePair, device: torch.device,
                margin: int = BORDER_MARGIN) -> FrozenPass:
    """Run one pair through the enhancer (the same path as `test.py`)."""
    low, high = read_pair(pair)
    y, features = enhance_with_features(enhancer, image_to_tensor(low).to(device), margin)
    means, stds = fast.feature_statistics(features)
    return FrozenPass(pair.name, y[0].half().cpu(), to_uint8(high),
                      [m[0].cpu() for m in means], [s[0].cpu() for s in stds],
                      features[-1][0].half().cpu())


def describe_passes(passes: list[FrozenPass], kind: str) -> torch.Tensor:
    """The enhancer descriptors `kind` (N, D) of cached passes: the queries test.py computes."""
    levels = range(len(passes[0].level_mean))
    return describe([torch.stack([fp.level_mean[i] for fp in passes]) for i in levels],
                    [torch.stack([fp.level_std[i] for fp in passes]) for i in levels], kind)


def cache_key(weights: str | Path, margin: int) -> str:
    """Names a cache by the enhancer file's bytes, the margin and the cache format."""
    digest = hashlib.sha1(Path(weights).read_bytes()).hexdigest()[:12]
    return f"{digest}_m{margin}_v{CACHE_VERSION}"


def cache_size(cache_dir: Path) -> tuple[int, int]:
    """(files, bytes) of the cached passes in `cache_dir` (0, 0 when it does not exist)."""
    files = list(cache_dir.glob("*.pt")) if cache_dir.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


def cached_passes(enhancer: torch.nn.Module, pairs: list[ImagePair], device: torch.device,
                  cache_dir: Path, margin: int = BORDER_MARGIN, desc: str = "enhancer pass"
                  ) -> list[FrozenPass]:
    """`frozen_pass` of every pair, read from `cache_dir/<name>.pt` where present, else computed
    and written there (atomically).

    The missing passes are all computed before any is read back: kept results interleaved with
    the forward's large temporaries fragmented the CPU heap (with the scripts' GLIBC_TUNABLES it
    is never trimmed) until a 395-pair run was killed at 24 GB.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"{pair.name}.pt" for pair in pairs]
    missing = [(pair, path) for pair, path in zip(pairs, paths) if not path.is_file()]
    for pair, path in tqdm(missing, desc=desc, unit="img", disable=not missing):
        save_checkpoint(path, frozen_pass(enhancer, pair, device, margin).to_dict())
    return [FrozenPass.from_dict(torch.load(path, map_location="cpu", weights_only=False)) for path in paths]
