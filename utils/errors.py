"""One way to report bad input: a single line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file); its message names the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning `UserError` into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
