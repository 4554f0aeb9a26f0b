"""utils.schedule.warmup_cosine: the per-iteration learning rate of the published recipe
(linear warm-up, cosine decay to --min_lr) and its exact restoration from a state_dict."""
from __future__ import annotations

import math

import pytest
import torch

from utils.schedule import warmup_cosine

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
