"""Where a memory's entries come from: the training image behind each slot, by name and as a
small thumbnail of its normal-light target (the image whose colour the slot holds).

A memory checkpoint keeps `sources = {'names': [...], 'thumbnails': uint8 (N, h, w, 3),
'scenes': float32 (N, D)}`, indexed by the training-sample index each slot records
(`ExternalMemory.top_index`); `scenes` are the low-light inputs' scene vectors
(`dataset.scene_groups.scene_vector`), which the abstention rule matches inputs against. Files
written before this (and published ones) have none: their entries read as "unknown" and their
scenes as not known.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

SOURCE_THUMB_HW = (24, 36)  # height, width: 2.6 KB of uint8 RGB, the 2:3 shape of LOL's 400x600 images
UNKNOWN = "unknown"


def thumbnail(img: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) image reduced to SOURCE_THUMB_HW by area averaging."""
    h, w = SOURCE_THUMB_HW
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_AREA)


def sources_payload(names: list[str], targets: list[np.ndarray], scenes: np.ndarray | None = None) -> dict[str, Any]:
    """The checkpoint's `sources`: the names of the training samples (index = sample index),
    thumbnails of their uint8 normal-light targets and, where given, their inputs' scene vectors."""
    thumbs = np.stack([thumbnail(t) for t in targets]) if targets else np.zeros((0, *SOURCE_THUMB_HW, 3), np.uint8)
    payload = {"names": list(names), "thumbnails": torch.from_numpy(thumbs)}
    if scenes is not None:
        payload["scenes"] = torch.from_numpy(np.asarray(scenes, dtype=np.float32))
    return payload


class EntrySources:
    """Name and thumbnail of the training sample behind each sample index of one memory."""

    def __init__(self, ckpt: dict[str, Any]):
        src = ckpt.get("sources") or {}
        self.names: list[str] = list(src.get("names", []))
        thumbs = src.get("thumbnails")
        self.thumbnails = thumbs.numpy() if isinstance(thumbs, torch.Tensor) else None
        scenes = src.get("scenes")
        self.scenes: np.ndarray | None = scenes.numpy() if isinstance(scenes, torch.Tensor) else None

    def name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else UNKNOWN

    def thumbnail(self, index: int) -> np.ndarray | None:
        """The (h, w, 3) uint8 thumbnail of sample `index`, None when unknown."""
        if self.thumbnails is None or not 0 <= index < len(self.thumbnails):
            return None
        return self.thumbnails[index]
