"""torch.hub entry points: the enhancer and the memory, with the bundled weights by default.

    enhancer = torch.hub.load("path/to/EMNet-PyTorch", "emnet", source="local")
    refiner = torch.hub.load("path/to/EMNet-PyTorch", "emnet_memory", source="local", enhancer=enhancer)
    with torch.no_grad():                   # low: (B, 3, H, W) RGB in [0, 1], H and W multiples of 8
        ori = enhancer(low).clamp(0, 1)     # the enhancer's output
        mem = refiner(low, ori)             # corrected by the external memory
test.py's exact outputs (any size, the reflected border margin, one encoder pass for both) come
from `models.inference.enhance_with_features` and `refiner(low, ori, features)`.
"""
from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING

import models.loading as _loading
import models.query as _query
import models.refiner as _refiner
import utils.bundled as _bundled

if TYPE_CHECKING:  # names for the annotations only, so that torch.hub.list shows the two entries alone
    from pathlib import Path

    from models.enhancer import EMNetEnhancer
    from models.refiner import MemoryRefiner

dependencies = ["torch", "torchvision", "numpy", "cv2"]

_REPO = _Path(__file__).resolve().parent


def emnet(weights: str | Path | None = None, arch: str | None = None, embed_dim: int | None = None
          ) -> EMNetEnhancer:
    """The EMNet enhancer, in eval mode on the CPU: the bundled published network (dim 32) unless
    `weights` names a checkpoint (ours, or the authors' `model_lolv1.pth`; `arch`/`embed_dim` as
    test.py's flags)."""
    model, _ = _loading.load_enhancer(weights or _REPO / _bundled.BUNDLED_ENHANCER, arch, embed_dim)
    return model


def emnet_memory(weights: str | Path | None = None, enhancer: EMNetEnhancer | None = None,
                 query_weights: str | Path | None = None) -> MemoryRefiner:
    """The memory stage (`models.refiner.MemoryRefiner`), read as its file says: the bundled
    memory unless `weights` names another. A memory queried by enhancer features needs the
    enhancer that filled it: `enhancer` (default: the bundled one; another is checked against the
    memory's fingerprint). `query_weights`: the ImageNet ResNet-18 of the authors' memory files."""
    path = weights or _REPO / _bundled.BUNDLED_MEMORY
    memory, ckpt = _loading.load_memory(path)
    if enhancer is None and ckpt["query_encoder"] in _query.ENHANCER_DESCRIPTORS:
        enhancer = emnet()
    weights_file = str(query_weights) if query_weights else None
    return _refiner.build_refiner(memory, ckpt, path, enhancer, query_weights=weights_file)
