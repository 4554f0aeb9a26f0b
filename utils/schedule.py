"""Learning-rate schedules (warm-up then cosine) and the length of a run that has a time budget
instead of a number of epochs.

Two ways to step the same curve (`--lr_schedule`):
- `epoch`, the original release's: the lr changes once per epoch. Its warm-up scheduler was stepped
  once before the first epoch and after each epoch, so epochs 1..W run at lr * 1/W, 2/W, .., 1 and
  then epoch W + 1 + t at the cosine of t / (nepoch - W), eta_min --min_lr (T_max = nepoch - W).
- `iteration`: the same shape per iteration (warm-up from lr / warmup_iters), which a
  --time_budget run needs because its length is fixed in iterations after timing its first steps.
Both are pure functions of the iteration count, so --resume continues them exactly.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields, replace
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


def epoch_warmup_cosine(optimizer: torch.optim.Optimizer, warmup_epochs: int, nepoch: int,
                        iters_per_epoch: int, min_lr: float = 1e-6, start_iter: int = 0) -> LambdaLR:
    """The original release's per-epoch schedule, stepped per iteration (lr constant within an
    epoch): epoch e (from 0) runs at lr * (e + 1) / warmup_epochs while e < warmup_epochs, then at
    the cosine from lr to `min_lr` with T_max = nepoch - warmup_epochs, t = e - warmup_epochs."""
    base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    floor = min(min_lr / base, 1.0)
    t_max = max(nepoch - warmup_epochs, 1)

    def factor(it: int) -> float:
        epoch = it // iters_per_epoch
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        t = min(epoch - warmup_epochs, t_max)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / t_max))

    return LambdaLR(optimizer, factor, last_epoch=start_iter - 1)


@dataclass(frozen=True)
class SchedulePlan:
    """A run's length and learning-rate curve: `total_iters` is None while a --time_budget run
    has not timed itself yet (`fix_budget` then returns the plan with its length); `budget_s` and
    the `spent_s` of earlier calls for budgeted runs. Saved in model_latest.pth as a dict."""

    budget_s: float | None
    spent_s: float
    total_iters: int | None
    warmup_iters: int
    lr_schedule: str
    iters_per_epoch: int

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> SchedulePlan:
        return cls(**{f.name: stored[f.name] for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_schedule(optimizer: torch.optim.Optimizer, plan: SchedulePlan, min_lr: float,
                   start_iter: int = 0) -> LambdaLR:
    """The scheduler of a `schedule_plan`: per epoch or per iteration as its `lr_schedule` says."""
    if plan.lr_schedule == "epoch":
        per = plan.iters_per_epoch
        return epoch_warmup_cosine(optimizer, plan.warmup_iters // per, plan.total_iters // per, per,
                                   min_lr, start_iter)
    return warmup_cosine(optimizer, plan.warmup_iters, plan.total_iters, min_lr, start_iter)


def resolve_lr_schedule(asked: str | None, time_budget: float, stored: str | None) -> str:
    """--lr_schedule as given, else the resumed run's, else `epoch` (the original) unless a
    --time_budget needs `iteration`."""
    if asked and stored and asked != stored:
        raise UserError(f"--resume: the run was trained with --lr_schedule {stored}, not {asked}; "
                        f"drop --lr_schedule or start a new --env")
    if asked == "epoch" and time_budget:
        raise UserError("--time_budget fixes the run's length in iterations after timing its first steps, "
                        "so it needs --lr_schedule iteration; drop --lr_schedule epoch or --time_budget")
    return asked or stored or ("iteration" if time_budget else "epoch")


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


def schedule_plan(args: argparse.Namespace, ckpt: dict[str, Any] | None, iters_per_epoch: int) -> SchedulePlan:
    """The run's length (`SchedulePlan`).

    A budgeted run keeps, on --resume, the budget and length it started with (a --time_budget
    given again replaces the budget only while the length is open); an epoch run takes --nepoch
    as given on each call, as before. `lr_schedule` (`resolve_lr_schedule`) is kept on --resume;
    runs saved before it existed stepped per iteration."""
    stored = (ckpt or {}).get("schedule") or {}
    lr_schedule = resolve_lr_schedule(getattr(args, "lr_schedule", None), args.time_budget,
                                      stored.get("lr_schedule", "iteration") if ckpt is not None else None)
    if stored.get("budget_s"):
        plan = SchedulePlan.from_dict({**stored, "lr_schedule": lr_schedule, "iters_per_epoch": iters_per_epoch})
        if plan.total_iters is None and args.time_budget:
            plan = replace(plan, budget_s=args.time_budget * 60)
        return plan
    if ckpt is not None and args.time_budget:
        raise UserError("--time_budget on --resume of a run trained by epochs: its schedule is fixed; "
                        "drop --time_budget or start a new --env")
    warmup_iters = args.warmup_epochs * iters_per_epoch if args.warmup else 0
    if args.time_budget:
        return SchedulePlan(args.time_budget * 60, 0.0, None, warmup_iters, lr_schedule, iters_per_epoch)
    return SchedulePlan(None, 0.0, args.nepoch * iters_per_epoch, warmup_iters, lr_schedule, iters_per_epoch)


def last_iteration(plan: SchedulePlan, max_iters: int) -> float:
    """Where this call stops: the schedule's end or --max_iters; inf while the length is open."""
    ends = [n for n in (plan.total_iters, max_iters) if n]
    return min(ends) if ends else math.inf


def fix_budget(plan: SchedulePlan, sec_per_iter: float, spent_s: float, overhead_s: float, iteration: int,
               optimizer: torch.optim.Optimizer, min_lr: float, device: torch.device,
               info: DistInfo, log: RunLog) -> tuple[SchedulePlan, LambdaLR]:
    """Fix a budgeted run's length from its measured speed and `overhead_s` between epochs (rank
    0's, on every rank): the plan with its length and the schedule that ends there, continuing
    at `iteration`."""
    total = torch.full((), -1, dtype=torch.int64, device=device)  # -1: the budget is too small
    error = UserError("the time budget is too small (rank 0 says why)")
    per_epoch = plan.iters_per_epoch
    if info.is_main:
        try:
            total.fill_(iterations_for_budget(plan.budget_s, spent_s, iteration, sec_per_iter,
                                              plan.warmup_iters, overhead_s, per_epoch))
            log.line(f"time budget: {sec_per_iter:.4f} s/iteration, {overhead_s:.2f} s between epochs, "
                     f"{spent_s:.0f} s spent: {int(total)} iterations in all "
                     f"({int(total) / per_epoch:.1f} epochs, warm-up {plan.warmup_iters})")
        except UserError as err:
            error = err
    if info.enabled:
        dist.broadcast(total, src=0)  # every rank trains the same length (or stops together)
    if int(total) < 0:
        raise error
    fixed = replace(plan, total_iters=int(total))
    return fixed, warmup_cosine(optimizer, fixed.warmup_iters, fixed.total_iters, min_lr, start_iter=iteration)
