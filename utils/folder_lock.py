"""One run at a time per result folder: an exclusive `flock` on `<folder>/.emnet.lock`.

Two evaluations into one folder would interleave their images and replace each other's
metrics.csv; the second is refused instead, with one line naming the lock and its holder. The
kernel drops the lock when its holder ends, even after `kill -9`, so a stale lock file is harmless.
A run that fails before its first output `abandon`s the folder: the lock file goes, and so does
the folder where this run created it and nothing was written into it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from utils.errors import UserError

LOCK_NAME = ".emnet.lock"


def first_missing(folder: str | Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet (None: `folder` exists):
    what creating `folder` would create."""
    folder = Path(folder).absolute()
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _remove_if_empty(folder: Path) -> bool:
    """rmdir: only an empty folder goes (atomically); False where it is not empty or not there."""
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


class FolderLock:
    """Holds the lock of `folder` until `release` or until the object is gone. `created` is the
    outermost folder the caller created for this run (`first_missing` before creating `folder`)."""

    def __init__(self, folder: str | Path, flag: str, created: Path | None = None):
        self.path, self.created = Path(folder) / LOCK_NAME, created
        self._fd: int | None = None
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                raise UserError(f"{folder} was removed while this run started (another run into it failed); "
                                "run again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{folder} is in use by another run (lock {self.path} held by process {holder}); "
                                f"wait for it to finish or choose another {flag}") from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # a run that abandoned the folder removed this file before we locked it
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def abandon(self) -> None:
        """For a run that wrote nothing: remove the lock file (while it is still held, so no other
        run holds that file), then, where this run created the folder, its empty sub-folders and
        the empty folders from it up to `created`. Files are never removed."""
        folder = self.path.parent.absolute()
        self.path.unlink(missing_ok=True)
        self.release()
        if self.created is None:
            return
        for sub in folder.iterdir():
            if sub.is_dir():
                _remove_if_empty(sub)
        for up in [folder, *folder.parents]:
            if not _remove_if_empty(up) or up == self.created:
                return

    def __del__(self):
        self.release()
