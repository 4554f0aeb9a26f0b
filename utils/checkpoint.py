"""The one checkpoint writer (atomic) and reader (a clear error for a missing or corrupt file).

Which model a checkpoint holds and how it is built is `models/loading.py`'s business.
"""
from __future__ import annotations

import threading
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


def cpu_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU: a snapshot that later steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread, from CPU copies taken when `save` is called, so
    the loop waits for the copy only. At most one write is in flight: `save` first waits for the
    previous one. `join` waits for the last one and raises its error, if any."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        self.join()
        snapshot = [(path, cpu_copy(content)) for path, content in files]
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        try:
            for path, content in files:
                save_checkpoint(path, content)  # atomic: temporary file, then rename
        except BaseException as err:  # re-raised in the training thread by join()
            self._error = err

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
