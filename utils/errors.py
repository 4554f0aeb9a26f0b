"""One way to report a problem the user can fix: a single line on stderr and exit code 2, never a
traceback. Covers bad input (`UserError`), OS faults of the place a run writes to, and stop signals.

OS faults while writing (`write_error`): a full disk (ENOSPC), a used-up quota (EDQUOT), a
file-size limit (EFBIG, `ulimit -f`), a read-only filesystem (EROFS), a missing permission (EACCES,
EPERM) and a failing disk (EIO). The line names the path, the OS's words and a fix; the fix names
the flag that chose the folder (`--result_dir`, `--save_dir`, `--output`) when a script registered
it with `register_output` (`writable_dir` does).
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Callable

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EIO})
_outputs: dict[Path, str] = {}  # absolute folder -> the flag that chose it


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file); its message names the fix."""


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is 128 + its number, `str()` says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}; files already written "
                                    "are complete and no partial file was left: rerun the command to finish")
        self.exit_code = 128 + signum


def register_output(folder: str | Path, flag: str) -> None:
    """Remember that files under `folder` are there because of `flag` (named in the fix)."""
    _outputs[Path(os.path.abspath(folder))] = flag


def output_flag(path: str | Path) -> str:
    """The flag of the deepest registered folder holding `path`; a generic name otherwise."""
    path = Path(os.path.abspath(path))
    found = [(len(folder.parts), flag) for folder, flag in _outputs.items()
             if path == folder or folder in path.parents]
    return max(found)[1] if found else "output folder"


def is_write_fault(err: BaseException) -> bool:
    """Whether `err` is an OSError of the kinds `write_error` words (see the module docstring)."""
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def _fix(code: int, folder: Path | None, flag: str) -> str:
    if folder is None:  # the OS did not say which file
        return f"free space on, or fix the disk or permissions of, the folder written to, or choose another {flag}"
    if code == errno.ENOSPC:
        return f"free space on the disk holding {folder} (df -h {folder}) or choose another {flag}"
    if code == errno.EDQUOT:
        return f"your disk quota on {folder} is used up: free space there or choose another {flag}"
    if code == errno.EFBIG:
        return ("the file grew past the size this process may write (ulimit -f) or the filesystem "
                f"allows: raise the limit or choose another {flag}")
    if code == errno.EROFS:
        return f"{folder} is on a read-only filesystem: choose another {flag}"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}: fix its permissions or choose another {flag}"
    return f"the disk reported an input/output error: check it (dmesg) and choose another {flag}"


def write_error(path: str | Path | None, err: OSError) -> UserError:
    """The one-line UserError for `err` (an OSError in WRITE_ERRNOS) raised while writing `path`
    (None: the OS did not say which file)."""
    where = Path(path) if path is not None else None
    folder = None if where is None else where if where.is_dir() else where.parent
    words = err.strerror or os.strerror(err.errno)
    name = errno.errorcode.get(err.errno, str(err.errno))
    what = f"cannot write {where}" if where is not None else "a write failed"
    flag = output_flag(where) if where is not None else "output folder"
    return UserError(f"{what}: {words} ({name}); {_fix(err.errno, folder, flag)}")


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point: a `UserError` or an OS fault while writing becomes one line on stderr
    and exit status 2. SIGTERM unwinds the code under way like Ctrl-C (Python's default would end
    the process without cleanup), so the atomic writers remove their temporary files; the exit
    status is then 143 (130 for Ctrl-C)."""
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if not is_write_fault(err):
            raise
        print(f"error: {write_error(err.filename, err)}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` if needed and prove it is writable; a UserError naming `flag` otherwise.
    Later write faults under `path` name `flag` in their fix (`utils.errors.register_output`)."""
    path = Path(path)
    register_output(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):  # unique: safe for DDP ranks
            pass
    except OSError as err:
        if is_write_fault(err):
            raise write_error(path, err) from None
        raise UserError(f"cannot write to {flag} {path} ({err.strerror}); choose a writable folder") from None
    return path
