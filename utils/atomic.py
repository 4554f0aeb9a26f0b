"""The one atomic file writer: checkpoints, images and reports all go through it.

The data goes to a temporary file in the target's folder (`.<name>.<random>.tmp`), is flushed and
fsynced, and is then renamed over the target, so a process killed at any moment leaves either the
old file or the new one, never half of one. A full disk or another OS fault while writing removes
the temporary file and raises a one-line UserError (`utils.errors.write_error`); the old file stays.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from utils.errors import is_write_fault, write_error

_in_flight: set[str] = set()  # temporary files being written now (removed by a hard stop too)


class _Recorder:
    """The open file, remembering the OSError of a failed write: torch.save reports a failed
    write as a RuntimeError without the errno, this keeps the OS's words."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def remove_temporary_files() -> None:
    """Delete the temporary files of writes under way (for a stop that cannot wait for them)."""
    for tmp in list(_in_flight):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _stage(path: Path, data: bytes | Callable[[BinaryIO], None]) -> str:
    """Write `data` to a fsynced temporary file next to `path`; return its name."""
    recorder = None
    # Named and registered before it exists: a signal raised at any moment leaves no file unknown.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    _in_flight.add(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            if callable(data):
                data(recorder)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable like any output (created 0600 while incomplete)
        return tmp
    except BaseException as err:
        if isinstance(err, FileExistsError):  # not ours (2**-64): leave it
            _in_flight.discard(tmp)
        else:
            _discard(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if is_write_fault(cause):
            raise write_error(path, cause) from None
        raise


def _discard(tmp: str) -> None:
    _in_flight.discard(tmp)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write_many(files: list[tuple[str | Path, bytes | Callable[[BinaryIO], None]]]) -> None:
    """Write every (path, data) to its temporary file first, then rename them all: a fault while
    writing any of them replaces none (the files of one result stay from one run)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            staged.append((_stage(Path(path), data), Path(path)))
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as err:
                if is_write_fault(err):
                    raise write_error(path, err) from None
                raise
            _in_flight.discard(tmp)
    finally:
        for tmp, _ in staged:
            if tmp in _in_flight:
                _discard(tmp)


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function that writes into the open binary file) to `path`."""
    atomic_write_many([(path, data)])


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, text.encode("utf-8"))
