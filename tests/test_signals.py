"""utils/signals.py: a stop signal (SIGINT, SIGTERM) during training saves the step and a
--resume matches a straight run, a second signal during the save stops at once, and SIGTERM
during test.py, enhance_video.py or export_onnx.py leaves complete files or none. The signals are
sent to subprocesses or, where the exact step matters, raised from inside the loss of an
in-process run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_runs import noisy_pairs, reaped, run_limited, slowed, start_script, temporary_files, wait_until
from train_runs import (
    FAST,
    TINY,
    assert_same_optimizer,
    assert_same_state,
    load,
    losses_from_log,
    make_structured_pairs,
    subprocess_env,
    train_cmd,
)

import train_enhancer
from conftest import REPO
from utils.errors import Stopped

# ----------------------------------------------------------------------------- stop signals in training

class _SignalAtCall(torch.nn.Module):
    """Wraps the real loss and sends `signum` to this process during call number `at`."""

    def __init__(self, inner, at: int, signum: int):
        super().__init__()
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def forward(self, pred, target):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return self.inner(pred, target)


def train_here(train: Path, save: Path, env_name: str, *extra) -> Path:
    argv = ["--train_dir", str(train), "--save_dir", str(save), "--env", env_name, *FAST, *map(str, TINY),
            *map(str, extra)]
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(argv))
    return save / env_name


@pytest.mark.parametrize("signum,path", [(signal.SIGTERM, "on"), (signal.SIGINT, "off")],
                         ids=["sigterm_device_batches", "sigint_dataloader"])
def test_signal_mid_epoch_saves_the_step_and_resume_matches_a_straight_run(tmp_path, monkeypatch, signum, path):
    """A signal during step 3 (mid-epoch: 2 steps per epoch): the step ends, model_latest.pth holds
    iteration 3 and `Stopped` carries exit 128 + signum; --resume then gives the losses, weights and
    optimizer moments of a run never interrupted, from step 4 on."""
    threads, handler = torch.get_num_threads(), signal.getsignal(signum)
    torch.set_num_threads(1)
    try:
        train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(10, 12), seed=3)
        flags = ("--nepoch", 3, "--data_on_device", path)
        a = train_here(train, tmp_path, "A", *flags)
        real = train_enhancer.EnhancementLoss
        monkeypatch.setattr(train_enhancer, "EnhancementLoss", lambda *a, **k: _SignalAtCall(real(*a, **k), 3, signum))
        with pytest.raises(Stopped) as stop:
            train_here(train, tmp_path, "B", *flags)
        monkeypatch.undo()
        assert stop.value.exit_code == 128 + signum
        assert f"stopped by {signal.Signals(signum).name} at epoch 2 iteration 3" in str(stop.value)
        assert signal.getsignal(signum) == handler, "the trainer left its signal handler installed"
        part = load(tmp_path / "B" / "models" / "model_latest.pth")
        assert (part["epoch"], part["iteration"]) == (1, 3)
        train_here(train, tmp_path, "B", *flags, "--resume")
    finally:
        torch.set_num_threads(threads)
    la, lb = losses_from_log(a / "train.log"), losses_from_log(tmp_path / "B" / "train.log")
    assert len(la) == 6 and la == lb
    ca, cb = load(a / "models" / "model_latest.pth"), load(tmp_path / "B" / "models" / "model_latest.pth")
    assert (cb["epoch"], cb["iteration"]) == (3, 6)
    assert_same_state(ca["state_dict"], cb["state_dict"], "weights")
    assert_same_optimizer(ca["optimizer"], cb["optimizer"])


def start_training(train: Path, save: Path, env_name: str, *extra, prelude: str = "") -> subprocess.Popen:
    return start_script(*train_cmd(train, save, env_name, *extra), prelude=prelude)


def loss_lines(log: Path) -> int:
    return len(losses_from_log(log)) if log.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_to_a_training_process_saves_within_30_s_and_resume_finishes(tmp_path, signum):
    """A real signal to train_enhancer.py in its third epoch: exit 143 / 130 within 30 s, one line
    saying what was kept, model_latest.pth at the last logged iteration; --resume finishes."""
    train = make_structured_pairs(tmp_path / "train", ["k1", "k2", "k3", "k4", "k5", "k6"], size=(40, 40))
    save, flags = tmp_path / "runs", ("--nepoch", 400, "--val_percent", 0, "--train_ps", 32, "--batch_size", 2,
                                      "--log_every", 1, "--checkpoint", 1000)
    log = save / "sig" / "train.log"
    proc = start_training(train, save, "sig", *flags)
    with reaped(proc):
        wait_until(lambda: loss_lines(log) >= 7, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name} at epoch") and "--resume continues" in last
    ckpt = load(save / "sig" / "models" / "model_latest.pth")
    assert ckpt["iteration"] == loss_lines(log) >= 7
    assert temporary_files(save) == []
    proc = subprocess.run([sys.executable, *train_cmd(train, save, "sig", *flags, "--resume", "--max_iters",
                                                      ckpt["iteration"] + 2)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    next_epoch = ckpt["iteration"] // 3 + 1  # 3 iterations per epoch (6 pairs, batch 2)
    assert f"resuming at epoch {next_epoch} iteration {ckpt['iteration']}" in log.read_text()
    assert load(save / "sig" / "models" / "model_latest.pth")["iteration"] == ckpt["iteration"] + 2


SLOW_SAVES = slowed("torch", "save", 1.5)


@pytest.mark.slow
def test_second_signal_during_the_save_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    """Every checkpoint write made to take 1.5 s: a SIGTERM, then a second one while a temporary
    checkpoint file is being written: exit 143 at once, the temporary file removed, model_latest.pth
    the one from before that save (same inode, loads)."""
    train = make_structured_pairs(tmp_path / "train", ["s1", "s2", "s3", "s4"], size=(40, 40))
    save = tmp_path / "runs"
    models = save / "two" / "models"
    latest = models / "model_latest.pth"
    proc = start_training(train, save, "two", "--nepoch", 100, "--val_percent", 0, "--train_ps", 32,
                          "--batch_size", 4, "--log_every", 1, "--checkpoint", 1000, prelude=SLOW_SAVES)
    with reaped(proc):
        wait_until(lambda: latest.exists(), proc)
        wait_until(lambda: not list(models.glob(".model_latest.pth.*")), proc)  # between two saves
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: bool(list(models.glob(".model_latest.pth.*"))), proc)  # the next save is under way
        before = (latest.stat().st_ino, load(latest)["iteration"])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert "SIGTERM again: stopped at once" in err and "Traceback" not in err
    assert (latest.stat().st_ino, load(latest)["iteration"]) == before
    assert not list(models.glob(".*.tmp"))


def memory_args(tmp_path: Path, weights: Path, train: Path, env_name: str, *extra) -> list[str]:
    return ["--pretrain_weights", str(weights), "--train_dir", str(train), "--val_percent", "0", "--nepoch", "3",
            "--mem_size", "16", "--batch_size", "2", "--train_ps", "24", "--learn_query", "--pos_thres", "0.2",
            "--query_encoder", "enhancer_levels", "--save_dir", str(tmp_path / "runs"), "--env", env_name, "--device", "cpu", *extra]


def test_memory_signal_mid_epoch_and_resume_match_a_straight_run(tmp_path, monkeypatch, weights):
    """train_memory.py (crop entries, learned query head): a SIGTERM during batch 3 (the first of
    epoch 2) saves memory_latest.pth after that batch and raises `Stopped` (exit 143); --resume
    replays the epoch's order and crops and ends with the memory, head and per-epoch log lines of
    a run never interrupted."""
    import train_memory

    train = noisy_pairs(tmp_path / "train", ["a", "b", "c", "d"], size=(32, 40), seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_memory.main(train_memory.get_args_parser().parse_args(memory_args(tmp_path, weights, train, "A")))
        real, calls = train_memory.threshold_triplet_loss, [0]

        def signalling(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        monkeypatch.setattr(train_memory, "threshold_triplet_loss", signalling)
        with pytest.raises(Stopped) as stop:
            train_memory.main(train_memory.get_args_parser().parse_args(memory_args(tmp_path, weights, train, "B")))
        monkeypatch.undo()
        assert stop.value.exit_code == 143 and "in epoch 2 after batch 1 of 2" in str(stop.value)
        part = load(tmp_path / "runs" / "B" / "models" / "memory_latest.pth")
        assert part["epoch"] == 1 and part["in_epoch"]["batches"] == 1
        train_memory.main(train_memory.get_args_parser().parse_args(
            memory_args(tmp_path, weights, train, "B", "--resume")))
    finally:
        torch.set_num_threads(threads)
    a = load(tmp_path / "runs" / "A" / "models" / "memory_latest.pth")
    b = load(tmp_path / "runs" / "B" / "models" / "memory_latest.pth")
    assert a["epoch"] == b["epoch"] == 3 and "in_epoch" not in b
    for k in ("mem_key", "mem_vale", "mem_age", "mem_index"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["head_state_dict"]["proj.weight"], b["head_state_dict"]["proj.weight"])

    def epoch_lines(env_name: str) -> list[str]:
        text = (tmp_path / "runs" / env_name / "train.log").read_text()
        return [line.split(" ", 2)[2] for line in text.splitlines() if " queries matched a slot" in line]

    assert len(epoch_lines("A")) == 3 and epoch_lines("A") == epoch_lines("B")


SLOW_PASSES = slowed("models.frozen_pass", "frozen_pass", 2)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigint_during_memory_start_up_validation_stops_at_once(tmp_path, weights, sigint):
    """SIGINT while train_memory.py computes the validation pairs' enhancer passes (each made to
    take 2 s, 20 pairs), also in a run started with SIGINT ignored (as a script's `cmd &` starts
    it): exit 130 with the one stop line, no memory file and no temporary file."""
    train = noisy_pairs(tmp_path / "train", ["a", "b"], size=(32, 40))
    val = noisy_pairs(tmp_path / "val", [f"v{i}" for i in range(20)], size=(32, 40), seed=1)
    cache, models = tmp_path / "cache", tmp_path / "runs" / "start" / "models"
    prelude = SLOW_PASSES + ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)" if sigint == "ignored" else "")
    proc = start_script("train_memory.py", *memory_args(tmp_path, weights, train, "start", "--val_dir", val,
                                                         "--cache_dir", cache), prelude=prelude)
    with reaped(proc):
        wait_until(lambda: any(cache.rglob("*.pt")), proc)  # the validation passes are under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("stopped by SIGINT"), err
    assert not list(models.glob("*.pth")) and temporary_files(tmp_path) == []


# ----------------------------------------------------------------------------- SIGTERM in the other scripts

SLOW_FSYNC = slowed("os", "fsync", 1.5)


def stop_while_writing(proc: subprocess.Popen, folder: Path, pattern: str) -> str:
    """SIGTERM once a temporary file matching `pattern` exists in `folder`; returns stderr."""
    with reaped(proc):
        wait_until(lambda: folder.is_dir() and bool(list(folder.glob(pattern))), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("stopped by SIGTERM"), err
    return err


@pytest.mark.slow
def test_sigterm_during_test_py_leaves_complete_files_and_a_rerun_finishes(tmp_path, weights):
    """SIGTERM while test.py writes an image (each fsync made slow): exit 143, no temporary file,
    every image under its final name complete, no metrics.csv; the rerun writes them all."""
    import cv2

    pairs = noisy_pairs(tmp_path / "pairs", ["1", "2", "3", "4"])
    result = tmp_path / "result"
    argv = ("--weights", weights, "--input_dir", pairs, "--result_dir", result, "--save_images", "--device", "cpu")
    stop_while_writing(start_script("test.py", *argv, prelude=SLOW_FSYNC), result / "ori", ".*.tmp")
    assert temporary_files(result) == [] and not (result / "metrics.csv").exists()
    for png in (result / "ori").glob("*.png"):
        assert cv2.imread(str(png)) is not None, png
    proc = run_limited("test.py", *argv)
    assert proc.returncode == 0, proc.stderr
    assert len((result / "metrics.csv").read_text().splitlines()) == 5
    assert sorted(p.name for p in (result / "ori").iterdir()) == ["1.png", "2.png", "3.png", "4.png"]


@pytest.mark.slow
def test_sigterm_during_enhance_video_and_export_onnx_leaves_no_output(tmp_path, weights):
    """SIGTERM while the video is being encoded, and while the ONNX file is being written: exit
    143, nothing under the final name, no temporary file; a rerun completes."""
    import cv2

    clips = {}
    for name, frames in (("long", 400), ("short", 6)):
        clips[name] = tmp_path / f"{name}.avi"
        writer = cv2.VideoWriter(str(clips[name]), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
        rng = np.random.default_rng(0)
        for _ in range(frames):
            writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        writer.release()
    out = tmp_path / "out"
    dst = out / "enhanced.mp4"
    flags = ("--output", dst, "--weights", weights, "--arch", "emnet_tiny", "--embed_dim", "8", "--device", "cpu")
    stop_while_writing(start_script("enhance_video.py", "--input", clips["long"], *flags), out, ".enhanced.tmp.mp4")
    assert list(out.iterdir()) == []
    proc = run_limited("enhance_video.py", "--input", clips["short"], *flags)
    assert proc.returncode == 0 and dst.is_file(), proc.stderr
    dst.unlink()

    pytest.importorskip("onnx")
    onnx_path = out / "tiny.onnx"
    argv = ("--weights", weights, "--output", onnx_path)
    stop_while_writing(start_script("export_onnx.py", *argv, prelude=SLOW_FSYNC), out, ".tiny.onnx.*.tmp")
    assert list(out.iterdir()) == []
    proc = run_limited("export_onnx.py", *argv)
    assert proc.returncode == 0 and onnx_path.is_file(), proc.stderr
