"""SIGTERM and SIGINT: how a run stops when a scheduler, a preemption or Ctrl-C asks it to.

Every script (through `utils.errors.run_cli`) turns SIGTERM into `Stopped`, a KeyboardInterrupt:
the code under way unwinds as for Ctrl-C, so nothing half-written is left; exit 143 (130 for
SIGINT). The trainers catch both signals for their loop with `StopSignals`: the first only sets
a flag, the loop ends after the step under way, writes the checkpoint of that step and then
raises `Stopped`; a second signal stops at once (`os._exit`), leaving the previous checkpoint as it was and removing
the temporary file of a save under way. train_memory.py installs it before any work, stopping at
once (`Stopped`) until its loop: its start-up takes minutes (the enhancer passes) and may run
with SIGINT ignored, as a script's `cmd &` starts it.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from utils.atomic import remove_temporary_files
from utils.distributed import DistInfo, all_ranks_true
from utils.errors import Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the workers leave stopping to the main process
    (a signal sent to the whole process group would otherwise kill them under it)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """Holds SIGTERM/SIGINT while it is installed (as a context manager: until the block ends). The
    first signal sets `signum`, the second exits; with `at_once`, outside `deferred()`, a signal
    raises `Stopped` where the code is (a start-up with nothing to save yet)."""

    def __init__(self, at_once: bool = False):
        self.signum: int | None = None
        self.at_once = at_once
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.at_once:
            raise Stopped(signum)
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            os.write(2, f"\n{name}: saving a checkpoint of the current step, then stopping "
                        f"(send it again to stop at once)\n".encode())
            return
        os.write(2, f"\n{name} again: stopped at once; the previous checkpoint is kept\n".encode())
        remove_temporary_files()
        os._exit(128 + signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block (a training loop), the first signal only sets `signum`: the loop saves
        its step, then stops."""
        at_once, self.at_once = self.at_once, False
        try:
            yield
        finally:
            self.at_once = at_once

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def agreed(self, info: DistInfo, device: torch.device, iteration: int | None = None,
               every: int = 1) -> bool:
        """Whether to stop now. The processes of a DDP run agree (any rank signalled) at
        iterations divisible by `every` or when `iteration` is None (an epoch end)."""
        if not info.enabled:
            return self.requested
        if iteration is not None and iteration % every:
            return False
        return not all_ranks_true(info, not self.requested, device)

    def restore(self) -> None:
        """Put back the handlers found at construction."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def raise_if_stopped(self, message: str) -> None:
        """After the save: raise `Stopped` (exit 128 + signal) with `message` when a signal came."""
        if self.signum is not None:
            raise Stopped(self.signum, message)
