"""Pretrained ImageNet weights from local files only: nothing is downloaded at run time."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.errors import UserError


def find_local_weights(path: str | None, filename: str, needed_by: str, model: str, flag: str,
                       fallback: str) -> Path:
    """`path` if given, else torchvision's `filename` in the torch hub cache
    (`$TORCH_HOME/hub/checkpoints`). Absent: a UserError saying where to put it, which `flag`
    takes a path, and the `fallback` that needs no such file."""
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not candidate.is_file():
        raise UserError(f"{needed_by} needs ImageNet {model} weights and none are at {candidate} (no downloads "
                        f"here): copy torchvision's {filename} there or pass {flag} PATH, or {fallback}")
    return candidate
