"""utils/atomic.py and utils/errors.write_error under write faults: a file-size limit
(RLIMIT_FSIZE in the child, EFBIG, no root needed) or, as root, a small full tmpfs (ENOSPC) during
test.py, enhance_video.py, export_onnx.py and training. Each ends in one error line naming the
path and the flag, and leaves the files written before whole."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_runs import limited, noisy_pairs, run_limited, temporary_files
from train_runs import make_structured_pairs, subprocess_env, train_cmd

from conftest import REPO, assert_user_error
from utils.atomic import atomic_write, atomic_write_many
from utils.errors import register_output, write_error


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".emnet.lock"}


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
