"""One run at a time per result folder: an exclusive `flock` on `<folder>/.emnet.lock`.

Two evaluations into one folder would interleave their images and replace each other's
metrics.csv; the second is refused instead, with one line naming the lock and its holder. The
kernel drops the lock when its holder ends, even after `kill -9`, so a stale lock file is harmless.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from utils.errors import UserError

LOCK_NAME = ".emnet.lock"


class FolderLock:
    """Holds the lock of `folder` until `release` or until the object is gone."""

    def __init__(self, folder: str | Path, flag: str):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise UserError(f"{folder} is in use by another run (lock {self.path} held by process {holder}); "
                            f"wait for it to finish or choose another {flag}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self):
        self.release()
