"""train_enhancer.py --resume: exact at an epoch boundary and mid-epoch (with the DataLoader and
with the crops drawn on the device), the run's flags taken from the checkpoint, nothing trained
past --max_iters, and kill -9 at any moment never corrupting model_latest.pth."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fault_runs import wait_until
from train_runs import (
    LOSS_LINE,
    assert_same_optimizer,
    assert_same_state,
    load,
    losses_from_log,
    make_structured_pairs,
    run_train,
    subprocess_env,
    train_cmd,
    train_in_process,
)

from conftest import REPO, assert_ran
from models.loading import load_enhancer

# ----------------------------------------------------------------------------- resume

@pytest.fixture
def resume_data(tmp_path) -> tuple[Path, Path]:
    train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(40, 40), seed=10)
    val = make_structured_pairs(tmp_path / "val", ["rv"], size=(40, 40), seed=20)
    return train, val


RESUME_ARGS = ("--train_ps", 32, "--batch_size", 2, "--log_every", 1, "--warmup_epochs", 1,
               "--lr_initial", 1e-3, "--checkpoint", 1000)


def straight_and_resumed(train: Path, val: Path, save: Path, cap: int) -> tuple[dict, dict, dict]:
    """Run A straight for 2 epochs; run B stopped by --max_iters `cap`, then resumed with the cap
    lifted. Returns A's final checkpoint, B's checkpoint at the cap and B's final checkpoint."""
    assert_ran(run_train(train, save, "A", "--val_dir", val, "--nepoch", 2, *RESUME_ARGS))
    assert_ran(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--max_iters", cap, *RESUME_ARGS))
    part = load(save / "B" / "models" / "model_latest.pth")
    assert_ran(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--resume", "--max_iters", 0,  # lift the cap
                         *RESUME_ARGS))
    return load(save / "A" / "models" / "model_latest.pth"), part, load(save / "B" / "models" / "model_latest.pth")


def test_resume_at_an_epoch_boundary_is_exact(resume_data, tmp_path):
    """2 epochs straight == 1 epoch (stopped by --max_iters) + --resume for the 2nd: same weights,
    epoch/iteration, optimizer moments, scheduler position, best score and RNG state."""
    train, val = resume_data
    save = tmp_path / "runs"
    a, half, b = straight_and_resumed(train, val, save, 2)
    assert (half["epoch"], half["iteration"]) == (1, 2)
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"]) == (2, 4)
    assert not torch.equal(a["state_dict"]["patch_embed.proj.weight"],
                           half["state_dict"]["patch_embed.proj.weight"]), "epoch 2 changed nothing"
    assert_same_state(a["state_dict"], b["state_dict"], "weights")
    assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert a["scheduler"]["_last_lr"] == pytest.approx(b["scheduler"]["_last_lr"], rel=1e-12)
    assert (a["best_psnr"], a["best_epoch"]) == pytest.approx((b["best_psnr"], b["best_epoch"]))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    log_b = (save / "B" / "train.log").read_text()
    assert "resuming at epoch 2 iteration 2" in log_b
    # The loss lines after the resume are the straight run's, iteration for iteration.
    la, lb = losses_from_log(save / "A" / "train.log"), losses_from_log(save / "B" / "train.log")
    assert la == lb


def test_resume_mid_epoch_matches_straight_run(resume_data, tmp_path):
    """A run stopped mid-epoch (--max_iters 3 with 2 iterations per epoch) and resumed continues
    like the straight run: same final weights and loss sequence."""
    train, val = resume_data
    save = tmp_path / "runs"
    a, part, b = straight_and_resumed(train, val, save, 3)
    assert (part["epoch"], part["iteration"]) == (1, 3)
    assert "resuming at epoch 2 iteration 3" in (save / "B" / "train.log").read_text()
    assert (b["epoch"], b["iteration"]) == (2, 4)
    assert losses_from_log(save / "A" / "train.log") == losses_from_log(save / "B" / "train.log")
    assert_same_state(a["state_dict"], b["state_dict"], "weights")


def test_resume_at_or_past_max_iters_trains_nothing(tmp_path):
    """--resume with --max_iters at or below the checkpoint's iteration: no step, checkpoints
    untouched, a log line saying so; the progress lines count to the cap, not the schedule's end."""
    train = make_structured_pairs(tmp_path / "pairs", ["a", "b"], size=(40, 40))
    save = tmp_path / "runs"
    flags = ("--val_percent", 0, "--train_ps", 32, "--batch_size", 1, "--nepoch", 50, "--log_every", 1)
    assert_ran(run_train(train, save, "cap", *flags, "--max_iters", 3))
    log = (save / "cap" / "train.log").read_text()
    assert "iter 3/3 " in log and "/100 " not in log
    latest = save / "cap" / "models" / "model_latest.pth"
    before = latest.read_bytes()
    for cap in (3, 2):
        assert_ran(run_train(train, save, "cap", *flags, "--max_iters", cap, "--resume"))
        assert latest.read_bytes() == before
    assert (save / "cap" / "train.log").read_text().count("nothing to train") == 2


def test_resume_takes_the_run_flags_not_given_again_from_the_checkpoint(tmp_path):
    """--resume alone continues the run as it was started (--max_iters, --nepoch, --batch_size,
    crops, split: not given again, from the checkpoint); a flag given again with another value
    applies and is named in one log line."""
    train = make_structured_pairs(tmp_path / "pairs", ["a", "b", "c"], size=(40, 40))
    save = tmp_path / "runs"
    assert_ran(run_train(train, save, "run", "--val_percent", 0, "--train_ps", 32, "--batch_size", 1, "--nepoch", 50,
                         "--log_every", 1, "--max_iters", 3))
    log_path, latest = save / "run" / "train.log", save / "run" / "models" / "model_latest.pth"
    before = latest.read_bytes()
    assert_ran(run_train(train, save, "run", "--resume"))  # without the run's flags: it stops at its --max_iters
    assert latest.read_bytes() == before
    assert "nothing to train: the run is at iteration 3 and stops at 3" in log_path.read_text()
    assert "given again" not in log_path.read_text()

    assert_ran(run_train(train, save, "run", "--resume", "--max_iters", 5, "--lr_initial", 1e-4, "--log_every", 1))
    changed = [line for line in log_path.read_text().splitlines() if "given again" in line]
    assert len(changed) == 1 and "--max_iters 3 -> 5" in changed[0] and "--lr_initial 0.0002 -> 0.0001" in changed[0]
    assert "iter 5/5 " in log_path.read_text()
    options = yaml.safe_load((save / "run" / "options.yml").read_text())
    assert (options["nepoch"], options["batch_size"], options["train_ps"], options["val_percent"]) == (50, 1, 32, 0)
    assert (options["max_iters"], options["lr_initial"]) == (5, 1e-4)
    assert load(latest)["iteration"] == 5


def test_device_batches_resume_exactly(tmp_path, one_thread):
    """With the crops drawn on the device, 3 epochs straight == stopped mid-epoch (--max_iters 3)
    + --resume: same losses, weights and sampler state (the sampler's generator, permutation and
    position travel in model_latest.pth); the run logs that it drew on the device."""
    train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(10, 12), seed=3)
    a = train_in_process(train, tmp_path, "A", "--nepoch", 3)
    b = train_in_process(train, tmp_path, "B", "--nepoch", 3, "--max_iters", 3)
    part = load(b / "models" / "model_latest.pth")
    assert (part["epoch"], part["iteration"]) == (1, 3) and part["sampler"]["position"] == 2
    train_in_process(train, tmp_path, "B", "--nepoch", 3, "--resume")
    ca, cb = load(a / "models" / "model_latest.pth"), load(b / "models" / "model_latest.pth")
    assert (cb["epoch"], cb["iteration"]) == (3, 6)
    assert losses_from_log(a / "train.log") == losses_from_log(b / "train.log")
    assert len(losses_from_log(a / "train.log")) == 6
    assert_same_state(ca["state_dict"], cb["state_dict"], "weights")
    assert_same_optimizer(ca["optimizer"], cb["optimizer"])
    assert torch.equal(ca["sampler"]["generator"], cb["sampler"]["generator"])
    assert torch.equal(ca["sampler"]["order"], cb["sampler"]["order"])
    assert "crops drawn on the device" in (a / "train.log").read_text()
    assert yaml.safe_load((a / "options.yml").read_text())["batches_on_device"] is True


# ----------------------------------------------------------------------------- kill -9

def start_train(train: Path, save: Path, env_name: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *train_cmd(train, save, env_name, *extra)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def log_iterations(log: Path) -> int:
    return len(LOSS_LINE.findall(log.read_text())) if log.exists() else 0


KILL_ARGS = ("--val_percent", 0, "--train_ps", 32, "--batch_size", 4, "--log_every", 1,
             "--checkpoint", 1000)  # 4 pairs, batch 4: one iteration and one model_latest write per epoch


def test_kill_9_then_resume_finishes(tmp_path):
    """SIGKILL in the middle of a run leaves a loadable model_latest.pth (and no partial file that
    gets in the way); --resume then finishes at nepoch * iters_per_epoch."""
    train = make_structured_pairs(tmp_path / "train", ["k1", "k2", "k3", "k4"], size=(40, 40))
    save = tmp_path / "runs"
    nepoch = 25
    latest = save / "kill" / "models" / "model_latest.pth"
    proc = start_train(train, save, "kill", "--nepoch", nepoch, *KILL_ARGS)
    try:
        wait_until(lambda: latest.exists() and log_iterations(save / "kill" / "train.log") >= 3, proc)
    finally:
        kill9(proc)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = load(latest)
    assert 1 <= ckpt["epoch"] < nepoch and ckpt["iteration"] == ckpt["epoch"]
    model, _ = load_enhancer(latest)

    assert_ran(run_train(train, save, "kill", "--nepoch", nepoch, "--resume", *KILL_ARGS))
    final = load(latest)
    opts = yaml.safe_load((save / "kill" / "options.yml").read_text())
    assert final["iteration"] == nepoch * opts["iters_per_epoch"] == nepoch
    assert final["epoch"] == nepoch
    log = (save / "kill" / "train.log").read_text()
    assert f"resuming at epoch {ckpt['epoch'] + 1} iteration {ckpt['iteration']}" in log
    assert f"finished at epoch {nepoch} iteration {nepoch}" in log


def test_kill_9_at_random_moments_never_corrupts_latest(tmp_path):
    """Six SIGKILLs of a run that rewrites model_latest.pth every iteration, three at random
    delays and three while a checkpoint write is under way (a temporary file exists): each time
    model_latest.pth loads with weights_only=True, and --resume after each kill carries on, up
    to the full nepoch * iters_per_epoch."""
    train = make_structured_pairs(tmp_path / "train", ["s1", "s2", "s3", "s4"], size=(40, 40))
    save = tmp_path / "runs"
    models = save / "stress" / "models"
    latest = models / "model_latest.pth"
    nepoch = 40
    rng = random.Random(1234)
    seen_epochs, mid_write_kills = [], 0
    for cycle in range(6):
        resume = ("--resume",) if latest.exists() else ()
        before = load(latest)["iteration"] if resume else -1
        before_ino = latest.stat().st_ino if resume else None  # os.replace gives a new inode
        old_tmp = set(models.glob(".model_latest.pth.*"))  # left by earlier kills

        def writing() -> bool:
            return bool(set(models.glob(".model_latest.pth.*")) - old_tmp)

        proc = start_train(train, save, "stress", "--nepoch", nepoch, *resume, *KILL_ARGS)
        try:
            # In the training loop: a checkpoint newer than the one it started from exists.
            wait_until(lambda: latest.exists() and latest.stat().st_ino != before_ino, proc)
            if cycle % 2:
                end = time.monotonic() + 3
                while proc.poll() is None and time.monotonic() < end and not writing():
                    time.sleep(0.0005)
                mid_write_kills += writing()
            else:
                time.sleep(rng.uniform(0.0, 0.8))
        finally:
            kill9(proc)
        assert proc.returncode == -signal.SIGKILL, f"cycle {cycle}: the run was not running any more"
        ckpt = load(latest)  # must never be a partial file
        assert ckpt["iteration"] == ckpt["epoch"] and ckpt["iteration"] > before
        assert set(ckpt) >= {"state_dict", "optimizer", "scheduler", "rng"}
        seen_epochs.append(ckpt["epoch"])
    assert seen_epochs[-1] < nepoch
    assert_ran(run_train(train, save, "stress", "--nepoch", nepoch, "--resume", *KILL_ARGS))
    final = load(latest)
    assert (final["epoch"], final["iteration"]) == (nepoch, nepoch)
    load_enhancer(latest)
    # Kills during a write leave the temporary file (harmless, never read).
    leftovers = list(models.glob(".model_latest.pth.*"))
    assert len(leftovers) <= 6
    assert mid_write_kills >= 1, "no kill landed while a checkpoint was being written"
