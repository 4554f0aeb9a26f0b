"""Learning-rate schedule of the published recipe, per iteration, and the length of a run that
has a time budget instead of a number of epochs."""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from utils.distributed import DistInfo
from utils.errors import UserError
from utils.run_log import RunLog


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_iters: int, total_iters: int | None,
                  min_lr: float = 1e-6, start_iter: int = 0) -> LambdaLR:
    """Linear warm-up from ~0 to the optimizer's lr over `warmup_iters`, then cosine decay to
    `min_lr` at `total_iters`. A pure function of the iteration, so resuming is exact.

    `total_iters=None`: the length is not known yet (a time-budgeted run still measuring its
    speed); the lr holds the peak after the warm-up. `start_iter > 0` replaces the schedule of an
    optimizer that an earlier `warmup_cosine` drove, from that iteration on (its lr is set for it).
    """
    base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    floor = min(min_lr / base, 1.0)

    def factor(it: int) -> float:
        if it < warmup_iters:
            return (it + 1) / warmup_iters
        if total_iters is None:
            return 1.0
        span = max(total_iters - warmup_iters, 1)
        t = min((it - warmup_iters) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor, last_epoch=start_iter - 1)


def iterations_for_budget(budget_s: float, spent_s: float, done_iters: int, sec_per_iter: float,
                          warmup_iters: int, overhead_per_epoch_s: float = 0.0,
                          iters_per_epoch: int = 1) -> int:
    """Total iterations of a run allowed `budget_s` seconds that took `spent_s` for its first
    `done_iters` and goes on at `sec_per_iter`, paying `overhead_per_epoch_s` (validation,
    checkpoint) every `iters_per_epoch` iterations and once more at the end.

    A budget that does not reach past the warm-up, or inputs that are not positive, raise a
    UserError that names the flag to change.
    """
    if not budget_s > 0:
        raise UserError(f"--time_budget must be positive, got {budget_s / 60:g} minutes")
    if not (sec_per_iter > 0 and math.isfinite(sec_per_iter)):
        raise UserError(f"cannot plan a time budget from a measured {sec_per_iter} s per iteration")
    if spent_s < 0 or done_iters < 0 or warmup_iters < 0 or overhead_per_epoch_s < 0 or iters_per_epoch < 1:
        raise UserError(f"invalid budget state: spent {spent_s} s, {done_iters} iterations done, "
                        f"warm-up {warmup_iters}, {overhead_per_epoch_s} s per epoch of {iters_per_epoch}")
    per_iter = sec_per_iter + overhead_per_epoch_s / iters_per_epoch
    left = max(math.floor((budget_s - spent_s - overhead_per_epoch_s) / per_iter), 0)
    total = done_iters + left
    if total <= warmup_iters:
        raise UserError(f"--time_budget {budget_s / 60:g} minutes allows {total} iterations at "
                        f"{per_iter:.3g} s each ({spent_s:.0f} s already spent), not more than the "
                        f"{warmup_iters} of the warm-up; raise --time_budget or lower --warmup_epochs")
    return total


def schedule_plan(args: argparse.Namespace, ckpt: dict[str, Any] | None, iters_per_epoch: int) -> dict[str, Any]:
    """The run's length: `total_iters` (None while a budgeted run has not timed itself yet),
    `warmup_iters`, and for --time_budget runs `budget_s` and the `spent_s` of earlier calls.

    A budgeted run keeps, on --resume, the budget and length it started with (a --time_budget
    given again replaces the budget only while the length is open); an epoch run takes --nepoch
    as given on each call, as before."""
    stored = (ckpt or {}).get("schedule") or {}
    if stored.get("budget_s"):
        plan = dict(stored)
        if plan["total_iters"] is None and args.time_budget:
            plan["budget_s"] = args.time_budget * 60
        return plan
    if ckpt is not None and args.time_budget:
        raise UserError("--time_budget on --resume of a run trained by epochs: its schedule is fixed; "
                        "drop --time_budget or start a new --env")
    warmup_iters = args.warmup_epochs * iters_per_epoch if args.warmup else 0
    if args.time_budget:
        return {"budget_s": args.time_budget * 60, "spent_s": 0.0, "total_iters": None,
                "warmup_iters": warmup_iters}
    return {"budget_s": None, "spent_s": 0.0, "total_iters": args.nepoch * iters_per_epoch,
            "warmup_iters": warmup_iters}


def last_iteration(plan: dict[str, Any], max_iters: int) -> float:
    """Where this call stops: the schedule's end or --max_iters; inf while the length is open."""
    ends = [n for n in (plan["total_iters"], max_iters) if n]
    return min(ends) if ends else math.inf


def fix_budget(plan: dict[str, Any], sec_per_iter: float, spent_s: float, overhead_s: float, iteration: int,
               iters_per_epoch: int, optimizer: torch.optim.Optimizer, min_lr: float, device: torch.device,
               info: DistInfo, log: RunLog) -> LambdaLR:
    """Fix a budgeted run's length from its measured speed and `overhead_s` between epochs (rank
    0's, on every rank) and return the schedule that ends there, continuing at `iteration`."""
    total = torch.full((), -1, dtype=torch.int64, device=device)  # -1: the budget is too small
    error = UserError("the time budget is too small (rank 0 says why)")
    if info.is_main:
        try:
            total.fill_(iterations_for_budget(plan["budget_s"], spent_s, iteration, sec_per_iter,
                                              plan["warmup_iters"], overhead_s, iters_per_epoch))
            log.line(f"time budget: {sec_per_iter:.4f} s/iteration, {overhead_s:.2f} s between epochs, "
                     f"{spent_s:.0f} s spent: {int(total)} iterations in all "
                     f"({int(total) / iters_per_epoch:.1f} epochs, warm-up {plan['warmup_iters']})")
        except UserError as err:
            error = err
    if info.enabled:
        dist.broadcast(total, src=0)  # every rank trains the same length (or stops together)
    if int(total) < 0:
        raise error
    plan["total_iters"] = int(total)
    return warmup_cosine(optimizer, plan["warmup_iters"], plan["total_iters"], min_lr, start_iter=iteration)
