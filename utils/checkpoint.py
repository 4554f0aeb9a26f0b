"""The one checkpoint writer (atomic) and reader (a clear error for a missing or corrupt file).

Which model a checkpoint holds and how it is built is `models/loading.py`'s business.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_write
from utils.errors import UserError


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """`torch.save` through the atomic writer: never half a checkpoint, even after `kill -9`."""
    atomic_write(path, lambda f: torch.save(payload, f))


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files of `save_checkpoint` that a killed run left in `folder`."""
    for stale in folder.glob(".*.pth.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load on the CPU with `weights_only=True`; a missing or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass the path of a .pth checkpoint "
                        "(see pre_trained_logs/README.md)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(f"cannot load checkpoint {path} ({type(err).__name__}); the file is corrupt "
                        "or not a PyTorch checkpoint: download or train it again") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt
