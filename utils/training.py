"""Pieces of the training loop: the guard against non-finite losses (host-synced, or counted on
the device with no host sync per step), the timing of steps for --time_budget, the stop of a call."""
from __future__ import annotations

import argparse
import math
import time
from typing import Protocol

import torch
import torch.distributed as dist

from utils.distributed import DistInfo, all_ranks_true
from utils.errors import UserError
from utils.run_log import RunLog

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops
BUDGET_SKIP_STEPS = 5  # steps of a call not timed for --time_budget (compilation, autotuning)
BUDGET_TIMED_STEPS = 20  # steps whose mean time fixes the length of a --time_budget run


def nan_error(count: int, iteration: int) -> UserError:
    return UserError(f"loss was NaN/inf for {count} iterations in a row at iteration {iteration}; "
                     "lower --lr_initial, use --amp bf16/none, or check the data")


class StepGuard(Protocol):
    """Skips the steps whose loss is not finite and stops the run after MAX_BAD_STEPS in a row."""

    def ok(self, loss: torch.Tensor, iteration: int) -> bool:
        """Whether to step on `loss`, the loss of iteration `iteration` + 1."""

    def check(self, iteration: int) -> None:
        """Report skipped steps and stop a run that diverged (log steps and epoch ends)."""


class HostSyncedGuard:
    """Reads every step's loss on the host (a sync per step) and skips a non-finite one here,
    every rank the same step; the DataLoader path's guard, with the optimizer's default step."""

    def __init__(self, device: torch.device, info: DistInfo, log: RunLog):
        self.device, self.info, self.log = device, info, log
        self.bad_steps = 0

    def ok(self, loss: torch.Tensor, iteration: int) -> bool:
        step_ok = all_ranks_true(self.info, math.isfinite(loss.item()), self.device)
        self.bad_steps = 0 if step_ok else self.bad_steps + 1
        if not step_ok:
            self.log.line(f"iteration {iteration + 1}: non-finite loss, step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise nan_error(self.bad_steps, iteration + 1)
        return step_ok

    def check(self, iteration: int) -> None:
        """Nothing to do: `ok` checked every step as it ran."""


class DeviceGuard:
    """Non-finite losses counted on the device, so that a step needs no host sync.

    `ok` hands the step's `found_inf` flag (any rank) to the fused Adam(W), which skips a flagged
    update on the device, the contract GradScaler uses. `check`, at log steps and epoch ends, reads
    the counts, logs skipped steps and raises after MAX_BAD_STEPS in a row: up to --log_every
    iterations later than the host-synced guard, but the skipped steps leave the weights and the
    optimizer's moments as they were, so nothing is lost meanwhile.
    """

    def __init__(self, device: torch.device, info: DistInfo, log: RunLog, optimizer: torch.optim.Optimizer):
        self.info, self.log, self.optimizer = info, log, optimizer
        self.streak = torch.zeros((), device=device)  # current run of non-finite losses
        self.longest = torch.zeros((), device=device)  # longest run since the last check
        self.count = torch.zeros((), device=device)  # non-finite losses since the last check

    def ok(self, loss: torch.Tensor, iteration: int) -> bool:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.info.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips the same steps
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        self.count += bad
        self.optimizer.found_inf = bad  # read by the fused step: no host sync
        return True

    def check(self, iteration: int) -> None:
        count, longest = (int(v) for v in torch.stack([self.count, self.longest]).tolist())
        self.count.zero_()
        self.longest.copy_(self.streak)
        if count:
            self.log.line(f"iteration {iteration}: {count} non-finite loss(es) since the last report, "
                          f"steps skipped (at most {longest} in a row)")
        if longest >= MAX_BAD_STEPS:
            raise nan_error(longest, iteration)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepTimer:
    """Mean time of the steps BUDGET_SKIP_STEPS+1 .. +BUDGET_TIMED_STEPS of this call, device-
    synchronised around those steps only, the work between epochs left out: the speed that fixes
    the length of a --time_budget run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.done, self.seconds, self.mark = 0, 0.0, 0.0

    def _next_is_timed(self) -> bool:
        return BUDGET_SKIP_STEPS <= self.done < BUDGET_SKIP_STEPS + BUDGET_TIMED_STEPS

    def start_epoch(self) -> None:
        if self._next_is_timed():
            synchronize(self.device)
            self.mark = time.perf_counter()

    def step_done(self) -> float | None:
        """Call after every step; returns the mean once the last timed step is done."""
        timed = self._next_is_timed()
        self.done += 1
        if timed or self._next_is_timed():
            synchronize(self.device)
            now = time.perf_counter()
            self.seconds += (now - self.mark) if timed else 0.0
            self.mark = now
        if timed and not self._next_is_timed():
            return self.seconds / BUDGET_TIMED_STEPS
        return None


def time_is_up(args: argparse.Namespace, call_start: float, info: DistInfo, device: torch.device,
               iteration: int) -> bool:
    """--stop_after_minutes reached. Processes of a DDP run agree at log steps only (a collective
    every step would cost a host sync), so they stop together."""
    if not args.stop_after_minutes:
        return False
    up = time.monotonic() - call_start >= args.stop_after_minutes * 60
    if not info.enabled:
        return up
    return iteration % args.log_every == 0 and not all_ranks_true(info, not up, device)
