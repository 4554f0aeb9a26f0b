"""--resume's flags: which flags a command line gave, and the run's stored values for the others."""
from __future__ import annotations

import argparse
from typing import Any

_UNSET = object()


def parse_with_given(parser: argparse.ArgumentParser, argv: list[str] | None = None
                     ) -> tuple[argparse.Namespace, set[str]]:
    """Parse `argv` (default: the command line); also return the flags (dests) it set, whatever
    their value, so that --resume can tell "not given" from "given with the default value"."""
    args = parser.parse_args(argv)
    probe = argparse.Namespace(**{dest: _UNSET for dest in vars(args)})  # argparse keeps set attributes
    parser.parse_args(argv, namespace=probe)
    return args, {dest for dest, value in vars(probe).items() if value is not _UNSET}


def resume_flags(args: argparse.Namespace, given: set[str] | None, stored: dict[str, Any],
                 names: tuple[str, ...]) -> str | None:
    """On --resume, each flag of `names` not given on this command line takes the value the run
    stored (`stored`: its options); returns one line naming the flags given with another value
    (they apply), or None. `given` None (a caller that built `args` itself): nothing is taken."""
    if given is None:
        return None
    changed = []
    for name in names:
        if name not in stored:
            continue
        if name not in given:
            setattr(args, name, stored[name])
        elif getattr(args, name) != stored[name]:
            changed.append(f"--{name} {stored[name]} -> {getattr(args, name)}")
    if not changed:
        return None
    return "resumed with flags given again with other values than the run's (these apply): " + ", ".join(changed)
