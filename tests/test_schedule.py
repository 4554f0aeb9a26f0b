"""utils.schedule: the per-iteration learning rate of the published recipe (linear warm-up,
cosine decay to --min_lr), its exact restoration from a state_dict, its replacement once a
time-budgeted run knows its length, the budget arithmetic (minutes -> iterations), and
train_enhancer.py's --time_budget / --stop_after_minutes runs that fix the length once."""
from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from train_runs import load, make_structured_pairs, train_in_process

from utils.errors import UserError
from utils.schedule import iterations_for_budget, warmup_cosine

PEAK, MIN_LR = 2e-4, 1e-6


def make(warmup: int, total: int, peak: float = PEAK, min_lr: float = MIN_LR):
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=peak)
    return opt, warmup_cosine(opt, warmup, total, min_lr)


def lr_sequence(opt, sched, steps: int) -> list[float]:
    """lr used by the optimizer step of iterations 0 .. steps-1, then the lr after the last step
    (the training loop calls scheduler.step() once per iteration, after optimizer.step())."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("warmup,total", [(6, 40), (1, 10), (30, 300)])
def test_warmup_is_linear_then_cosine_decays_to_min_lr(warmup, total):
    """Warm-up rises linearly (equal increments, ~0 at the start) to the peak, the rest never
    increases and follows the cosine, and after total_iters steps the lr is exactly min_lr."""
    opt, sched = make(warmup, total)
    lrs = lr_sequence(opt, sched, total)
    assert len(lrs) == total + 1
    warm = lrs[:warmup]
    assert warm[0] == pytest.approx(PEAK / warmup)
    assert warm[-1] == pytest.approx(PEAK)
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(s == pytest.approx(PEAK / warmup) for s in steps), steps
    assert max(lrs) == pytest.approx(PEAK)
    decay = lrs[warmup:]
    assert decay[0] == pytest.approx(PEAK)
    assert all(b <= a + 1e-15 for a, b in zip(decay, decay[1:])), decay
    assert decay[-1] == pytest.approx(MIN_LR, rel=1e-9, abs=0)
    # The cosine itself at the midpoint of the decay.
    span = total - warmup
    if span % 2 == 0:
        assert lrs[warmup + span // 2] == pytest.approx(MIN_LR + (PEAK - MIN_LR) * 0.5)
    # Past the end it stays at min_lr (a run resumed with extra iterations does not go back up).
    more = lr_sequence(opt, sched, 5)
    assert all(v == pytest.approx(MIN_LR, rel=1e-9) for v in more)


def test_no_warmup_starts_at_peak():
    """--no-warmup (0 warm-up iterations): the first step already uses the peak lr."""
    opt, sched = make(0, 20)
    lrs = lr_sequence(opt, sched, 20)
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[-1] == pytest.approx(MIN_LR)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("k", [0, 3, 7, 25, 40])
def test_restored_scheduler_continues_the_same_sequence(k):
    """A scheduler built fresh (as on --resume: new optimizer, new warmup_cosine) and loaded from
    the state_dict (and optimizer state) saved at iteration k yields the same lrs afterwards."""
    warmup, total = 7, 40
    opt_a, sched_a = make(warmup, total)
    lr_sequence(opt_a, sched_a, k)
    sched_state, opt_state = sched_a.state_dict(), opt_a.state_dict()
    expected = lr_sequence(opt_a, sched_a, total - k + 3)

    opt_b, sched_b = make(warmup, total)  # built before loading, as train_enhancer.py does
    opt_b.load_state_dict(opt_state)
    sched_b.load_state_dict(sched_state)
    got = lr_sequence(opt_b, sched_b, total - k + 3)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert math.isclose(got[-1], MIN_LR, rel_tol=1e-9)


@pytest.mark.parametrize("warmup,fixed_at", [(10, 4), (10, 10), (0, 3), (5, 8)])
def test_schedule_fixed_mid_run_continues_as_if_known_from_the_start(warmup, fixed_at):
    """A budgeted run starts with an unknown length (warm-up, then the peak held) and replaces the
    schedule at iteration `fixed_at` (start_iter): from there on its lrs are those of a schedule
    that knew the total from the start, down to min_lr; before, the warm-up ones are identical
    and later ones hold the peak."""
    total = 40
    opt_ref, sched_ref = make(warmup, total)
    ref = lr_sequence(opt_ref, sched_ref, total)

    opt, sched = make(warmup, None)
    before = lr_sequence(opt, sched, fixed_at)[:-1]
    assert before[:warmup] == pytest.approx(ref[:min(warmup, fixed_at)], rel=1e-12)
    assert all(v == pytest.approx(PEAK) for v in before[warmup:])
    sched = warmup_cosine(opt, warmup, total, MIN_LR, start_iter=fixed_at)
    assert sched.last_epoch == fixed_at
    after = lr_sequence(opt, sched, total - fixed_at)
    assert after == pytest.approx(ref[fixed_at:], rel=1e-12, abs=0)
    assert after[-1] == pytest.approx(MIN_LR, rel=1e-9)


def planned_seconds(spent, done, total, sec, overhead, ipe):
    """Upper bound of the run's time: every iteration, an overhead per (started) epoch, one more."""
    left = total - done
    return spent + left * sec + (left / ipe + 1) * overhead


@pytest.mark.parametrize("budget,spent,done,sec,warmup,overhead,ipe", [
    (600.0, 0.0, 0, 0.5, 20, 0.0, 1),
    (600.0, 100.0, 50, 0.5, 20, 0.0, 10),
    (600.0, 100.0, 50, 0.5, 20, 10.0, 100),
    (1800.0, 42.5, 25, 0.0371, 363, 3.2, 121),
    (90.0, 80.0, 30, 0.25, 6, 1.0, 2),
])
def test_budget_fits_the_most_iterations(budget, spent, done, sec, warmup, overhead, ipe):
    """The total fits the budget (iterations, per-epoch overhead, one final overhead) and one
    iteration more would not; the iterations already done are part of it."""
    total = iterations_for_budget(budget, spent, done, sec, warmup, overhead, ipe)
    assert total > max(done, warmup)
    assert planned_seconds(spent, done, total, sec, overhead, ipe) <= budget + 1e-9
    assert planned_seconds(spent, done, total + 1, sec, overhead, ipe) > budget


def test_budget_examples():
    """Worked numbers: 500 s left at 0.5 s/iter after 50 iterations -> 1050; with 10 s per epoch
    of 100 iterations: (500 - 10) / 0.6 = 816 more."""
    assert iterations_for_budget(600, 100, 50, 0.5, 20) == 1050
    assert iterations_for_budget(600, 100, 50, 0.5, 20, overhead_per_epoch_s=10, iters_per_epoch=100) == 866


def test_budget_must_cover_the_warmup():
    """One iteration past the warm-up is the least a budget may allow; less is a UserError that
    says which flags to change. Time already spent counts."""
    assert iterations_for_budget(11.0, 0.0, 0, 1.0, 10) == 11
    with pytest.raises(UserError, match="--time_budget") as err:
        iterations_for_budget(10.0, 0.0, 0, 1.0, 10)
    assert "--warmup_epochs" in str(err.value) and "10 of the warm-up" in str(err.value)
    with pytest.raises(UserError, match="already spent"):
        iterations_for_budget(60.0, 55.0, 5, 1.0, 10)
    # A budget already used up ends the run where it is (past the warm-up): no negative length.
    assert iterations_for_budget(60.0, 70.0, 30, 1.0, 10) == 30


@pytest.mark.parametrize("args,match", [
    ((0.0, 0.0, 0, 0.1, 5), "--time_budget must be positive"),
    ((-6.0, 0.0, 0, 0.1, 5), "--time_budget must be positive"),
    ((float("nan"), 0.0, 0, 0.1, 5), "--time_budget must be positive"),
    ((60.0, 0.0, 0, 0.0, 5), "s per iteration"),
    ((60.0, 0.0, 0, float("inf"), 5), "s per iteration"),
    ((60.0, 0.0, 0, float("nan"), 5), "s per iteration"),
    ((60.0, -1.0, 0, 0.1, 5), "invalid budget state"),
    ((60.0, 0.0, -1, 0.1, 5), "invalid budget state"),
    ((60.0, 0.0, 0, 0.1, 5, -1.0), "invalid budget state"),
    ((60.0, 0.0, 0, 0.1, 5, 0.0, 0), "invalid budget state"),
])
def test_bad_budget_inputs_are_user_errors(args, match):
    with pytest.raises(UserError, match=match):
        iterations_for_budget(*args)


# ----------------------------------------------------------------------------- time-budgeted runs

LR_LINE = re.compile(r"iter (\d+)/(\S+) loss \S+ .* lr (\S+) ")


def reference_lrs(warmup: int, total: int, n: int, peak: float = 2e-4, min_lr: float = 1e-6) -> list[float]:
    """The lr after iterations 1..n of a run that knew its length from the start."""
    from utils.schedule import warmup_cosine

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = warmup_cosine(opt, warmup, total, min_lr)
    out = []
    for _ in range(n):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_budgeted_run_fixes_its_length_once_and_resume_continues_the_schedule(tmp_path, one_thread):
    """--time_budget: the first call times steps 6-25 (inside the 30-iteration warm-up), fixes the
    total and stores it in model_latest.pth and options.yml; a --resume call with another
    --time_budget neither re-times nor re-plans: the total stays, and the lr after every
    iteration of both calls is that of a schedule that knew the total from the start."""
    train = make_structured_pairs(tmp_path / "train", ["b1", "b2", "b3", "b4"], size=(10, 12), seed=4)
    flags = ("--warmup_epochs", 15)  # 2 iterations per epoch: 30 warm-up iterations
    env = train_in_process(train, tmp_path, "budget", *flags, "--time_budget", 0.5, "--max_iters", 27)
    first = load(env / "models" / "model_latest.pth")
    total = first["schedule"]["total_iters"]
    assert first["iteration"] == 27 and total > 40
    assert first["schedule"]["budget_s"] == 30 and first["schedule"]["warmup_iters"] == 30
    assert yaml.safe_load((env / "options.yml").read_text())["total_iters"] == total

    train_in_process(train, tmp_path, "budget", *flags, "--time_budget", 7, "--max_iters", 40, "--resume")
    second = load(env / "models" / "model_latest.pth")
    assert second["iteration"] == 40 and second["schedule"]["total_iters"] == total
    assert second["schedule"]["spent_s"] > first["schedule"]["spent_s"]
    log = (env / "train.log").read_text()
    assert log.count("s/iteration") == 1, "the resumed call timed its steps again"
    assert f"the schedule fixed at {total} iterations continues" in log

    ref = reference_lrs(30, total, 40)
    for ckpt, k in ((first, 27), (second, 40)):
        assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(ref[k - 1], rel=1e-12, abs=0)
        assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(ref[k - 1], rel=1e-12, abs=0)
    logged = {int(m.group(1)): (m.group(2), float(m.group(3))) for m in LR_LINE.finditer(log)}
    assert sorted(logged) == list(range(1, 41))
    assert {shown for it, (shown, _) in logged.items() if it <= 27} == {"27"}  # --max_iters of each call
    assert {shown for it, (shown, _) in logged.items() if it > 27} == {"40"}
    for it, (_, lr) in logged.items():  # printed with 3 digits
        assert lr == pytest.approx(ref[it - 1], rel=6e-3), it


def test_budgeted_run_ends_at_its_total_with_min_lr(tmp_path, one_thread):
    """A 0.05-minute budget on a tiny run: it fixes a total, trains exactly that many iterations
    and ends the cosine at --min_lr, options.yml and the checkpoint agreeing."""
    train = make_structured_pairs(tmp_path / "train", ["e1", "e2", "e3", "e4"], size=(10, 12), seed=5)
    env = train_in_process(train, tmp_path, "end", "--warmup_epochs", 1, "--time_budget", 0.05, "--log_every", 10)
    ckpt = load(env / "models" / "model_latest.pth")
    total = ckpt["schedule"]["total_iters"]
    assert total >= 25 and ckpt["iteration"] == total  # 25: fixed after the timed steps, nothing left
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(1e-6, rel=1e-9)
    assert yaml.safe_load((env / "options.yml").read_text())["total_iters"] == total
    per_epoch = yaml.safe_load((env / "options.yml").read_text())["iters_per_epoch"]
    assert f"finished at epoch {math.ceil(total / per_epoch)} iteration {total}" in (env / "train.log").read_text()


def test_stop_after_minutes_saves_a_resumable_checkpoint(tmp_path, one_thread):
    """--stop_after_minutes 0.0001 (6 ms, less than the first step): the call stops cleanly after
    one iteration with a model_latest.pth whose length is still open; --resume times its own
    steps, fixes the length (counting the earlier calls' time) and trains on. --time_budget on
    --resume of an epoch run is a UserError."""
    train = make_structured_pairs(tmp_path / "train", ["s1", "s2", "s3", "s4"], size=(10, 12), seed=6)
    env = train_in_process(train, tmp_path, "stop", "--time_budget", 0.5, "--stop_after_minutes", 0.0001)
    first = load(env / "models" / "model_latest.pth")
    assert first["iteration"] == 1 and first["schedule"]["total_iters"] is None
    assert first["schedule"]["spent_s"] > 0
    log = (env / "train.log").read_text()
    assert "stopping at iteration 1: --stop_after_minutes 0.0001 reached" in log
    assert "iter 1/? loss" in log  # the length is not known yet
    assert "finished at epoch 1 iteration 1" in log
    assert not list((env / "models").glob(".*.tmp")), "a checkpoint write was left unfinished"

    # While the length is open a new --time_budget replaces the budget; later calls keep it.
    train_in_process(train, tmp_path, "stop", "--time_budget", 0.6, "--stop_after_minutes", 0.0001, "--resume")
    assert load(env / "models" / "model_latest.pth")["schedule"]["budget_s"] == 36
    train_in_process(train, tmp_path, "stop", "--max_iters", 28, "--resume")
    second = load(env / "models" / "model_latest.pth")
    assert second["iteration"] == 28 and second["schedule"]["total_iters"] > 27
    assert second["schedule"]["budget_s"] == 36
    assert second["schedule"]["spent_s"] > first["schedule"]["spent_s"]

    train_in_process(train, tmp_path, "epochs", "--nepoch", 1)
    with pytest.raises(UserError, match="--time_budget on --resume"):
        train_in_process(train, tmp_path, "epochs", "--nepoch", 2, "--time_budget", 1, "--resume")


def test_budget_smaller_than_the_warmup_is_a_user_error(tmp_path, one_thread):
    """A budget (0.06 s) already spent when the speed is known, with a 30-iteration warm-up:
    a UserError naming --time_budget and --warmup_epochs, after the 25 timed iterations."""
    train = make_structured_pairs(tmp_path / "train", ["w1", "w2", "w3", "w4"], size=(10, 12), seed=7)
    with pytest.raises(UserError, match="--time_budget 0.001 minutes allows 25 iterations") as err:
        train_in_process(train, tmp_path, "tiny", "--warmup_epochs", 15, "--time_budget", 0.001)
    assert "--warmup_epochs" in str(err.value) and "30 of the warm-up" in str(err.value)
