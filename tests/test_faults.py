"""Faults during a run: a write that fails (a file-size limit, a full disk), a stop signal, two runs
into one folder. Each ends in one line and an exit status, and leaves what was written before.

The write faults are made with RLIMIT_FSIZE in the child process (EFBIG, no root needed) and, as
root, with a small full tmpfs (ENOSPC); the signals are sent to subprocesses, or, where the exact
step matters, raised from inside the loss of an in-process run.
"""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_test_cli import assert_user_error
from test_train_enhancer import (
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
from conftest import REPO, run_script, write_enhancer_checkpoint, write_png
from utils.atomic import atomic_write, atomic_write_many
from utils.errors import Stopped, register_output, write_error


def limited(limit_bytes: int):
    """A preexec_fn: the child may write no file larger than `limit_bytes` (then EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def run_limited(*argv, limit_bytes: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """conftest.run_script on one thread; with `limit_bytes`, the child may write no larger file."""
    return run_script(*argv, timeout=timeout, env_extra={"OMP_NUM_THREADS": "1"},
                      preexec_fn=limited(limit_bytes) if limit_bytes else None)


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".emnet.lock"}


@pytest.fixture
def weights(tmp_path) -> Path:
    return write_enhancer_checkpoint(tmp_path / "tiny.pth", epoch=0)


def noisy_pairs(root: Path, names, size=(32, 48), seed=0) -> Path:
    """Pairs of random pixels: their PNGs do not compress (about 3 bytes per pixel)."""
    rng = np.random.default_rng(seed)
    for name in names:
        for side in ("low", "high"):
            write_png(root / side / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


# ----------------------------------------------------------------------------- 1. write faults

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_write_error_names_the_path_the_os_words_and_the_flag(tmp_path, code):
    register_output(tmp_path / "res", "--result_dir")
    target = tmp_path / "res" / "ori" / "1.png"
    text = str(write_error(target, OSError(code, os.strerror(code))))
    assert "\n" not in text
    assert str(target) in text and os.strerror(code) in text and errno.errorcode[code] in text
    assert "--result_dir" in text


def test_write_error_without_a_path_names_no_wrong_folder():
    """Python's `Path.write_text` reports a full disk at close without the file's name."""
    text = str(write_error(None, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert text.startswith("a write failed: No space left on device (ENOSPC)") and os.getcwd() not in text


def test_atomic_write_under_a_size_limit_keeps_the_old_file(tmp_path):
    """In a child limited to 4 kB per file: a 10 kB write (bytes, and a torch.save, which reports
    the failed write as a RuntimeError without errno) is a UserError naming the file and EFBIG;
    the old files are unchanged and no temporary file is left. Several files written together
    replace none when one fails."""
    for name in ("a.bin", "b.pth", "c.txt", "d.txt"):
        (tmp_path / name).write_bytes(b"old")
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from utils.atomic import atomic_write, atomic_write_many
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
d = Path({str(tmp_path)!r})
for write in (lambda: atomic_write(d / "a.bin", b"x" * 10000),
              lambda: save_checkpoint(d / "b.pth", {{"w": torch.zeros(2500)}}),
              lambda: atomic_write_many([(d / "c.txt", b"new"), (d / "d.txt", b"y" * 10000)])):
    try:
        write()
    except UserError as err:
        print(err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=limited(4096), env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stdout + proc.stderr
    for line, name in zip(lines, ("a.bin", "b.pth", "d.txt")):
        assert line.startswith(f"cannot write {tmp_path / name}: File too large (EFBIG)"), line
    assert all((tmp_path / n).read_bytes() == b"old" for n in ("a.bin", "b.pth", "c.txt", "d.txt"))
    assert temporary_files(tmp_path) == []


def test_atomic_write_of_other_errors_is_unchanged(tmp_path):
    """A bug in the writing function is no write fault: it propagates as it is."""
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x", lambda f: 1 / 0)
    with pytest.raises(FileNotFoundError):
        atomic_write_many([(tmp_path / "missing" / "x", b"")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_test_py_under_a_size_limit_keeps_the_previous_results(tmp_path, weights):
    """test.py --save_images --pictures with images larger than the size limit: one line naming the
    image, EFBIG and --result_dir, exit 2, no temporary file, and the previous run's results in the
    same folder byte for byte as they were. A limit that lets the images through but not
    summary.json leaves the previous metrics.csv, summary.json and result.txt (all three)."""
    first = noisy_pairs(tmp_path / "first", ["1", "2"], seed=1)
    result = tmp_path / "result"
    proc = run_limited("test.py", "--weights", weights, "--input_dir", first, "--result_dir", result,
                       "--save_images", "--pictures", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    before = snapshot(result)
    assert {"metrics.csv", "summary.json", "result.txt", "index.html", "ori/1.png"} <= set(before)

    second = noisy_pairs(tmp_path / "second", ["1", "2"], seed=2)
    proc = run_limited("test.py", "--weights", weights, "--input_dir", second, "--result_dir", result,
                       "--save_images", "--pictures", "--device", "cpu", limit_bytes=2048)
    line = assert_user_error(proc, result / "ori" / "1.png", allow_noise=("enhance",))
    assert "File too large (EFBIG)" in line and "--result_dir" in line
    assert snapshot(result) == before
    assert temporary_files(result) == []

    proc = run_limited("test.py", "--weights", weights, "--input_dir", second, "--result_dir", result,
                       "--device", "cpu", limit_bytes=900)  # metrics.csv (~0.2 kB) fits, summary.json (~1.1 kB) not
    line = assert_user_error(proc, result / "summary.json", allow_noise=("enhance",))
    assert "EFBIG" in line
    assert snapshot(result) == before
    assert temporary_files(result) == []


@pytest.mark.slow
def test_video_and_onnx_under_a_size_limit(tmp_path, weights):
    """enhance_video.py (whose FFmpeg writer reports no failed write: the output is read back) and
    export_onnx.py under a size limit: exit 2, one line naming --output and EFBIG, no file under
    the final name, no temporary file."""
    import cv2

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(12):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    for ext in (".mp4", ".avi"):
        dst = out / f"enhanced{ext}"
        proc = run_limited("enhance_video.py", "--input", clip, "--output", dst, "--weights", weights,
                           "--arch", "emnet_tiny", "--embed_dim", "8", "--device", "cpu", limit_bytes=20000)
        line = assert_user_error(proc, dst, allow_noise=("enhance",))
        assert "EFBIG" in line and "--output" in line
        assert not dst.exists() and temporary_files(out) == []
    pytest.importorskip("onnx")
    onnx_path = out / "tiny.onnx"
    proc = run_limited("export_onnx.py", "--weights", weights, "--output", onnx_path, limit_bytes=20000)
    line = assert_user_error(proc, onnx_path)
    assert "EFBIG" in line and "--output" in line
    assert not onnx_path.exists() and temporary_files(out) == []


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 kB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_during_test_py_and_training(full_tmpfs, tmp_path, weights):
    """A full tmpfs (ENOSPC): test.py and train_enhancer.py end with one line naming the path,
    'No space left on device', 'free space on' and the flag; the earlier results stay readable
    and nothing temporary is left."""
    pairs = noisy_pairs(tmp_path / "pairs", ["1", "2", "3"], size=(64, 96))
    result = full_tmpfs / "result"
    proc = run_limited("test.py", "--weights", weights, "--input_dir", pairs, "--result_dir", result,
                       "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    before = snapshot(result)
    free = os.statvfs(full_tmpfs)
    (full_tmpfs / "filler").write_bytes(b"\0" * max(free.f_bavail * free.f_frsize - 12 * 1024, 0))
    proc = run_limited("test.py", "--weights", weights, "--input_dir", pairs, "--result_dir", result,
                       "--save_images", "--device", "cpu")
    line = assert_user_error(proc, result, allow_noise=("enhance",))
    assert "No space left on device (ENOSPC)" in line and "free space on" in line and "--result_dir" in line
    assert snapshot(result) == before and temporary_files(full_tmpfs) == []

    (full_tmpfs / "filler").unlink()  # room for options.yml and train.log, not for a 1 MB checkpoint
    train = make_structured_pairs(tmp_path / "train", ["a", "b", "c", "d"], size=(40, 40))
    proc = subprocess.run([sys.executable, *train_cmd(train, full_tmpfs / "runs", "full", "--nepoch", 50,
                                                      "--val_percent", 0, "--train_ps", 32, "--batch_size", 4)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    line = assert_user_error(proc, full_tmpfs / "runs" / "full", allow_noise=("epoch",))
    assert "ENOSPC" in line and "--save_dir" in line
    assert temporary_files(full_tmpfs) == []


# ----------------------------------------------------------------------------- 2. stop signals in training

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
        assert f"stopped by {signal.Signals(signum).name} at epoch 1 iteration 3" in str(stop.value)
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


def start_script(script: str, *args, prelude: str = "") -> subprocess.Popen:
    """`python SCRIPT ARGS` in a subprocess; `prelude` runs first in it (test-only patches)."""
    argv = [script, *map(str, args)]
    code = (f"import runpy, sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = {argv!r}\n"
            f"{prelude}\nrunpy.run_path({script!r}, run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_training(train: Path, save: Path, env_name: str, *extra, prelude: str = "") -> subprocess.Popen:
    return start_script(*train_cmd(train, save, env_name, *extra), prelude=prelude)


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.002)


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
    try:
        wait_until(lambda: loss_lines(log) >= 7, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
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
    assert f"resuming at epoch {ckpt['epoch']} iteration {ckpt['iteration']}" in log.read_text()
    assert load(save / "sig" / "models" / "model_latest.pth")["iteration"] == ckpt["iteration"] + 2


SLOW_SAVES = """
import time, torch
_save = torch.save
def _slow_save(*args, **kwargs):
    time.sleep(1.5)
    return _save(*args, **kwargs)
torch.save = _slow_save
"""


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
    try:
        wait_until(lambda: latest.exists(), proc)
        wait_until(lambda: not list(models.glob(".model_latest.pth.*")), proc)  # between two saves
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: bool(list(models.glob(".model_latest.pth.*"))), proc)  # the next save is under way
        before = (latest.stat().st_ino, load(latest)["iteration"])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
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


# ----------------------------------------------------------------------------- 3. SIGTERM in the other scripts

SLOW_FSYNC = """
import os, time
_fsync = os.fsync
def _slow_fsync(fd):
    time.sleep(1.5)
    return _fsync(fd)
os.fsync = _slow_fsync
"""


def stop_while_writing(proc: subprocess.Popen, folder: Path, pattern: str) -> str:
    """SIGTERM once a temporary file matching `pattern` exists in `folder`; returns stderr."""
    try:
        wait_until(lambda: folder.is_dir() and bool(list(folder.glob(pattern))), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("stopped by SIGTERM")
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


# ----------------------------------------------------------------------------- 4. one run per result folder

@pytest.mark.slow
def test_second_run_into_a_locked_result_folder_is_refused(tmp_path, weights):
    """While another run holds RESULT_DIR's lock, test.py into it exits 2 with one line naming the
    lock file and its holder, and writes nothing; once the lock is gone the run completes."""
    from utils.folder_lock import LOCK_NAME, FolderLock

    pairs = noisy_pairs(tmp_path / "pairs", ["1", "2"])
    result = tmp_path / "result"
    result.mkdir()
    holder = FolderLock(result, "--result_dir")
    argv = ("--weights", weights, "--input_dir", pairs, "--result_dir", result, "--save_images", "--device", "cpu")
    proc = run_limited("test.py", *argv)
    line = assert_user_error(proc, result / LOCK_NAME)
    assert f"held by process {os.getpid()}" in line and "--result_dir" in line
    assert [p.name for p in result.iterdir()] == [LOCK_NAME]
    holder.release()
    proc = run_limited("test.py", *argv)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_two_runs_at_once_never_mix_their_results(tmp_path, weights):
    """Two test.py runs of different inputs started together into one folder: each ends with exit 0
    or with the lock line (exit 2); metrics.csv and ori/ hold exactly one run's images."""
    first = noisy_pairs(tmp_path / "first", ["a1", "a2", "a3"], seed=1)
    second = noisy_pairs(tmp_path / "second", ["b1", "b2", "b3"], seed=2)
    result = tmp_path / "result"
    procs = [start_script("test.py", "--weights", weights, "--input_dir", src, "--result_dir", result,
                          "--save_images", "--device", "cpu") for src in (first, second)]
    outcomes = [(p.communicate(timeout=180)[1], p.returncode) for p in procs]
    for err, code in outcomes:
        assert code == 0 or (code == 2 and "is in use by another run" in err), err
    rows = sorted(line.split(",")[0] for line in (result / "metrics.csv").read_text().splitlines()[1:])
    assert rows in (["a1", "a2", "a3"], ["b1", "b2", "b3"])
    if any(code == 2 for _, code in outcomes):  # the refused run wrote nothing
        assert sorted(p.stem for p in (result / "ori").iterdir()) == rows
