"""End-to-end train_enhancer.py, run as users run it (a subprocess in the repo root) with the
smallest network (emnet_tiny, embed_dim 8), tiny crops, no DataLoader workers and the offline
loss (L1 + SSIM: LPIPS needs ImageNet AlexNet weights that the test machines do not have)."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train_enhancer
from conftest import GLIBC_TUNABLES, REPO, write_png
from dataset.pairing import find_pairs, is_validation_pair
from models.loading import ENHANCER_FORMAT, load_enhancer
from utils.errors import UserError
from utils.training import MAX_BAD_STEPS

FAST = ["--arch", "emnet_tiny", "--embed_dim", "8", "--train_workers", "0", "--lpips_lambda", "0",
        "--l1_lambda", "1", "--device", "cpu"]
LOSS_LINE = re.compile(r"epoch (\d+) iter (\d+)/(\d+) loss (\S+)")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a plain run must not think it is part of a process group
    env.update(extra)
    return env


def train_cmd(train_dir: Path, save_dir: Path, env_name: str, *extra) -> list[str]:
    return ["train_enhancer.py", *FAST, "--train_dir", str(train_dir), "--save_dir", str(save_dir),
            "--env", env_name, *map(str, extra)]


def run_train(train_dir: Path, save_dir: Path, env_name: str, *extra, timeout: float = 180,
              env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *train_cmd(train_dir, save_dir, env_name, *extra)], cwd=REPO,
                          env=subprocess_env(**(env_extra or {})), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def stderr_lines(text: str) -> list[str]:
    """Non-empty lines; tqdm redraws with \\r, so those split lines too."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def losses_from_log(log: Path) -> list[tuple[int, float]]:
    return [(int(m.group(2)), float(m.group(4))) for m in LOSS_LINE.finditer(log.read_text())]


def smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 image with structure (gradients, blobs, a little noise), not pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, 3)
    img = np.stack([0.5 + 0.4 * np.sin(5 * xx + phase[c]) * np.cos(3 * yy - phase[c]) for c in range(3)], 2)
    img += 0.05 * rng.standard_normal((h, w, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_structured_pairs(root: Path, names, size=(48, 48), seed=0) -> Path:
    """Low-light pairs whose ground truth is a fixed function of the input (learnable):
    low = 0.25 * scene, high = scene."""
    for i, name in enumerate(names):
        scene = smooth_rgb(*size, seed=seed + i)
        write_png(root / "low" / f"{name}.png", (scene.astype(np.float32) * 0.25).round().astype(np.uint8))
        write_png(root / "high" / f"{name}.png", scene)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), f"{what}: {k} differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    assert a["state"], "optimizer state is empty: no step was taken"
    for idx in a["state"]:
        sa, sb = a["state"][idx], b["state"][idx]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(torch.as_tensor(sa[k]).double(), torch.as_tensor(sb[k]).double(),
                                  rtol=0, atol=1e-6), f"optimizer state {idx}.{k} differs"


@pytest.fixture
def one_thread():
    """One intra-op thread, as the subprocess runs have (OMP_NUM_THREADS=1): with two, a busy
    machine makes OpenMP's barriers, and in-process runs, many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 1. smoke runs

def test_smoke_run_writes_outputs_and_test_py_reads_them(make_pairs, tmp_path):
    """3 iterations on 4 pairs with a separate --val_dir write model_latest/model_best, a parseable
    options.yml, train.log and a tensorboard event file; test.py evaluates model_latest.pth with no
    --arch flags (the checkpoint carries its config) and scores the validation pairs exactly as the
    trainer's last validation did."""
    train = make_pairs(names=("a1", "a2", "a3", "a4"), size=(64, 64), seed=1,
                       high_fn=lambda low: np.clip(low.astype(int) * 2, 0, 255).astype(np.uint8))
    val = make_pairs(names=("v1", "v2"), size=(48, 56), seed=2,
                     high_fn=lambda low: np.clip(low.astype(int) * 2, 0, 255).astype(np.uint8))
    save = tmp_path / "runs"
    ok(run_train(train, save, "smoke", "--val_dir", val, "--train_ps", 32, "--batch_size", 2,
                 "--nepoch", 3, "--max_iters", 3, "--log_every", 1))
    env_dir = save / "smoke"
    models = env_dir / "models"
    for f in ("model_latest.pth", "model_best.pth"):
        assert (models / f).is_file(), sorted(p.name for p in models.iterdir())
    assert not list(models.glob(".*.tmp")), "temporary checkpoint files left behind"

    opts = yaml.safe_load((env_dir / "options.yml").read_text())
    assert opts["val_pairs"] == ["v1", "v2"]
    assert opts["train_pairs"] == 4
    assert opts["iters_per_epoch"] == 2
    assert opts["arch"] == "emnet_tiny" and opts["embed_dim"] == 8
    assert opts["max_iters"] == 3 and opts["world_size"] == 1
    assert opts["model"]["embed_dim"] == 8

    log = (env_dir / "train.log").read_text()
    assert "starting epoch 0 iteration 0" in log
    assert [it for it, _ in losses_from_log(env_dir / "train.log")] == [1, 2, 3]
    assert "finished at epoch 1 iteration 3" in log
    events = list((env_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    latest = load(models / "model_latest.pth")
    assert latest["format"] == ENHANCER_FORMAT
    assert (latest["epoch"], latest["iteration"]) == (1, 3)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= latest.keys()
    best = load(models / "model_best.pth")
    assert "optimizer" not in best and "rng" not in best  # training state only in latest
    assert best["best_psnr"] == latest["best_psnr"] and math.isfinite(best["best_psnr"])

    result = tmp_path / "eval"
    proc = ok(subprocess.run([sys.executable, "test.py", "--weights", str(models / "model_latest.pth"),
                              "--input_dir", str(val), "--result_dir", str(result), "--device", "cpu"],
                             cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120))
    summary = json.loads((result / "summary.json").read_text())
    assert summary["num_images"] == 2
    assert (result / "metrics.csv").read_text().count("\n") == 3
    assert "emnet_tiny" in summary["model"], proc.stdout
    # The trainer's last validation (after iteration 3) used exactly model_latest's weights.
    vals = re.findall(r"iter (\d+): val PSNR ([\d.]+)", log)
    assert vals and vals[-1][0] == "3"
    assert summary["mean"]["ori_psnr"] == pytest.approx(float(vals[-1][1]), abs=1.5e-3)


def test_smoke_run_on_real_lol_pairs(lol_root, tmp_path):
    """The issue's 'done when' command on 4 real LOL-v1 our485 pairs (600x400): one epoch,
    batch 2, 64x64 crops. The 4 names fall outside the validation split, so the run has no
    validation pairs, which must still succeed (no model_best.pth, a log line saying so)."""
    pairs = [p for p in find_pairs(lol_root / "our485") if not is_validation_pair(p.name, 10.0)]
    by_ext = {ext: [p for p in pairs if p.low.suffix.lower() == ext] for ext in {p.low.suffix.lower() for p in pairs}}
    chosen = [p for group in by_ext.values() for p in group[:2]][:4]  # every extension present (png, webp)
    chosen += [p for p in pairs if p not in chosen][:4 - len(chosen)]
    assert len(chosen) == 4
    train = tmp_path / "our4"
    for side in ("low", "high"):
        (train / side).mkdir(parents=True)
        for pair in chosen:
            src = getattr(pair, side)
            shutil.copy(src, train / side / src.name)
    save = tmp_path / "log"
    ok(run_train(train, save, "smoke", "--nepoch", 1, "--batch_size", 2, "--train_ps", 64))
    models = save / "smoke" / "models"
    latest = load(models / "model_latest.pth")
    assert (latest["epoch"], latest["iteration"]) == (1, 2)
    assert not (models / "model_best.pth").exists()
    log = (save / "smoke" / "train.log").read_text()
    assert "no validation pairs" in log and "finished at epoch 1 iteration 2" in log
    opts = yaml.safe_load((save / "smoke" / "options.yml").read_text())
    assert opts["val_pairs"] == [] and opts["train_pairs"] == 4
    model, _ = load_enhancer(models / "model_latest.pth")
    assert model.config.embed_dim == 8


# ----------------------------------------------------------------------------- 2. overfit

def test_overfits_a_single_pair(tmp_path):
    """30 iterations on one structured pair (batch 1, lr 1e-3) drive the logged training loss
    clearly down: the mean of the last 5 is below 75% of the mean of the first 5."""
    train = make_structured_pairs(tmp_path / "one", ["p0"], size=(40, 40))
    save = tmp_path / "runs"
    ok(run_train(train, save, "overfit", "--val_percent", 0, "--train_ps", 32, "--batch_size", 1,
                 "--nepoch", 30, "--warmup_epochs", 1, "--lr_initial", 1e-3, "--log_every", 1,
                 "--checkpoint", 1000))
    losses = losses_from_log(save / "overfit" / "train.log")
    assert [it for it, _ in losses] == list(range(1, 31))
    values = [v for _, v in losses]
    assert all(math.isfinite(v) for v in values)
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.75 * first, (first, last, values)


# ----------------------------------------------------------------------------- 3. resume

@pytest.fixture
def resume_data(tmp_path) -> tuple[Path, Path]:
    train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(40, 40), seed=10)
    val = make_structured_pairs(tmp_path / "val", ["rv"], size=(40, 40), seed=20)
    return train, val


RESUME_ARGS = ("--train_ps", 32, "--batch_size", 2, "--log_every", 1, "--warmup_epochs", 1,
               "--lr_initial", 1e-3, "--checkpoint", 1000)


def test_resume_at_an_epoch_boundary_is_exact(resume_data, tmp_path):
    """2 epochs straight == 1 epoch (stopped by --max_iters) + --resume for the 2nd: same weights,
    epoch/iteration, optimizer moments, scheduler position, best score and RNG state."""
    train, val = resume_data
    save = tmp_path / "runs"
    ok(run_train(train, save, "A", "--val_dir", val, "--nepoch", 2, *RESUME_ARGS))
    ok(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--max_iters", 2, *RESUME_ARGS))
    half = load(save / "B" / "models" / "model_latest.pth")
    assert (half["epoch"], half["iteration"]) == (1, 2)
    ok(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--resume", "--max_iters", 0,  # lift the cap
                 *RESUME_ARGS))

    a, b = load(save / "A" / "models" / "model_latest.pth"), load(save / "B" / "models" / "model_latest.pth")
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
    assert "resuming at epoch 1 iteration 2" in log_b
    # The loss lines after the resume are the straight run's, iteration for iteration.
    la, lb = losses_from_log(save / "A" / "train.log"), losses_from_log(save / "B" / "train.log")
    assert la == lb


def test_resume_mid_epoch_matches_straight_run(resume_data, tmp_path):
    """A run stopped mid-epoch (--max_iters 3 with 2 iterations per epoch) and resumed continues
    like the straight run: same final weights and loss sequence."""
    train, val = resume_data
    save = tmp_path / "runs"
    ok(run_train(train, save, "A", "--val_dir", val, "--nepoch", 2, *RESUME_ARGS))
    ok(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--max_iters", 3, *RESUME_ARGS))
    part = load(save / "B" / "models" / "model_latest.pth")
    assert (part["epoch"], part["iteration"]) == (1, 3)
    ok(run_train(train, save, "B", "--val_dir", val, "--nepoch", 2, "--resume", "--max_iters", 0,  # lift the cap
                 *RESUME_ARGS))
    assert "resuming at epoch 1 iteration 3" in (save / "B" / "train.log").read_text()
    a, b = load(save / "A" / "models" / "model_latest.pth"), load(save / "B" / "models" / "model_latest.pth")
    assert (b["epoch"], b["iteration"]) == (2, 4)
    assert losses_from_log(save / "A" / "train.log") == losses_from_log(save / "B" / "train.log")
    assert_same_state(a["state_dict"], b["state_dict"], "weights")


# ----------------------------------------------------------------------------- 4. kill -9

def start_train(train: Path, save: Path, env_name: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *train_cmd(train, save, env_name, *extra)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 60, poll: float = 0.005) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(poll)


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
        wait_for(lambda: latest.exists() and log_iterations(save / "kill" / "train.log") >= 3, proc)
    finally:
        kill9(proc)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = load(latest)
    assert 1 <= ckpt["epoch"] < nepoch and ckpt["iteration"] == ckpt["epoch"]
    model, _ = load_enhancer(latest)

    ok(run_train(train, save, "kill", "--nepoch", nepoch, "--resume", *KILL_ARGS))
    final = load(latest)
    opts = yaml.safe_load((save / "kill" / "options.yml").read_text())
    assert final["iteration"] == nepoch * opts["iters_per_epoch"] == nepoch
    assert final["epoch"] == nepoch
    log = (save / "kill" / "train.log").read_text()
    assert f"resuming at epoch {ckpt['epoch']} iteration {ckpt['iteration']}" in log
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
            wait_for(lambda: latest.exists() and latest.stat().st_ino != before_ino, proc)
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
    ok(run_train(train, save, "stress", "--nepoch", nepoch, "--resume", *KILL_ARGS))
    final = load(latest)
    assert (final["epoch"], final["iteration"]) == (nepoch, nepoch)
    load_enhancer(latest)
    # Kills during a write leave the temporary file (harmless, never read).
    leftovers = list(models.glob(".model_latest.pth.*"))
    assert len(leftovers) <= 6
    assert mid_write_kills >= 1, "no kill landed while a checkpoint was being written"


# ----------------------------------------------------------------------------- 5. bad input

def _bad_empty(tmp_path, make_pairs):
    root = tmp_path / "empty"
    (root / "low").mkdir(parents=True)
    (root / "high").mkdir()
    return root, [], [str(root / "low")], {}


def _bad_unpaired(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), high_names=("1", "2", "4"), size=(40, 40))
    return root, [], [str(root / "low" / "3.png")], {}


def _bad_train_ps(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2"), size=(40, 48))
    return root, ["--train_ps", "64"], ["--train_ps 64", str(root / "low")], {}


def _bad_batch(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    return root, ["--batch_size", "8"], ["--batch_size 8", str(root)], {}


def _bad_save_dir(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return root, ["--save_dir", str(blocker / "runs")], ["--save_dir", str(blocker / "runs")], {}


def _bad_resume(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    return root, ["--resume"], ["--resume", "model_latest.pth"], {}


def _bad_lpips(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    home = tmp_path / "empty_torch_home"
    home.mkdir()
    return root, ["--lpips_lambda", "1"], ["alexnet", "--lpips_lambda 0", str(home)], {"TORCH_HOME": str(home)}


def _bad_missing_data(tmp_path, make_pairs):
    """No data and no LPIPS weights (a fresh machine offline): the data folder is reported first,
    before any download is tried."""
    home = tmp_path / "empty_torch_home"
    home.mkdir()
    missing = tmp_path / "no_such_folder"
    return missing, ["--lpips_lambda", "1"], [str(missing)], {"TORCH_HOME": str(home)}


def _bad_amp(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    return root, ["--amp", "fp16"], ["--amp fp16"], {}


@pytest.mark.parametrize("case", [_bad_empty, _bad_unpaired, _bad_train_ps, _bad_batch, _bad_save_dir,
                                  _bad_resume, _bad_lpips, _bad_missing_data, _bad_amp],
                         ids=["empty", "unpaired", "train_ps", "batch_size", "save_dir", "resume",
                              "lpips_offline", "missing_data_offline", "amp_fp16_cpu"])
def test_bad_input_is_one_error_line(case, tmp_path, make_pairs):
    """Each bad input exits with status 2 and a last stderr line 'error: ...' naming the offending
    path or flag (case-insensitively for 'alexnet'), no traceback, nothing else but tqdm noise."""
    root, extra, must, env_extra = case(tmp_path, make_pairs)
    args = ["--val_percent", "0", "--train_ps", "32", "--batch_size", "2", "--nepoch", "1", *extra]
    proc = run_train(root, tmp_path / "runs", "bad", *args, env_extra=env_extra, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = stderr_lines(proc.stderr)
    assert lines and lines[-1].startswith("error:"), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    noise = [line for line in lines[:-1] if not line.startswith("epoch ")]
    assert not noise, f"unexpected stderr lines before the error: {noise}"
    for needle in must:
        assert needle.lower() in lines[-1].lower(), (needle, lines[-1])
    assert not (tmp_path / "runs" / "bad" / "models" / "model_latest.pth").exists()


# ----------------------------------------------------------------------------- 6. DDP on CPU

def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains 3 iterations and writes a model_latest.pth whose
    keys have no DDP 'module.' prefix and which load_enhancer loads; both ranks exit 0."""
    train = make_structured_pairs(tmp_path / "train", ["d1", "d2", "d3", "d4"], size=(40, 40))
    val = make_structured_pairs(tmp_path / "val", ["dv"], size=(40, 40), seed=7)
    save = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()),
           *train_cmd(train, save, "ddp", "--val_dir", val, "--train_ps", 32, "--batch_size", 2,
                      "--nepoch", 3, "--max_iters", 3, "--log_every", 1)]
    ok(subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240))
    latest = save / "ddp" / "models" / "model_latest.pth"
    ckpt = load(latest)
    assert not [k for k in ckpt["state_dict"] if k.startswith("module.")]
    # 4 pairs over 2 ranks at 1 per rank: 2 iterations per epoch; stopped after 3.
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 3)
    model, _ = load_enhancer(latest)
    assert model.config.embed_dim == 8
    assert (save / "ddp" / "models" / "model_best.pth").is_file()
    opts = yaml.safe_load((save / "ddp" / "options.yml").read_text())
    assert opts["world_size"] == 2 and opts["iters_per_epoch"] == 2
    log = (save / "ddp" / "train.log").read_text()
    assert "2 process(es) on cpu" in log
    assert log.count("starting epoch 0") == 1, "only rank 0 writes the log"


# ----------------------------------------------------------------------------- 7. NaN handling

def test_diverging_run_stops_with_nan_error(tmp_path):
    """--lr_initial 1e9 makes the weights non-finite after the first step; after 5 non-finite
    losses in a row the run stops with exit 2 and one 'error: ... NaN ...' line."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(40, 40))
    proc = run_train(train, tmp_path / "runs", "nan", "--val_percent", 0, "--train_ps", 32,
                     "--batch_size", 2, "--nepoch", 10, "--lr_initial", 1e9, "--no-warmup",
                     "--log_every", 1)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = stderr_lines(proc.stderr)
    assert lines[-1].startswith("error:") and "NaN" in lines[-1] and "--lr_initial" in lines[-1]
    log = (tmp_path / "runs" / "nan" / "train.log").read_text()
    assert log.count("non-finite loss, step skipped") == MAX_BAD_STEPS


class _NaNAtCalls(torch.nn.Module):
    """Wraps the real loss and returns NaN (still differentiable) at chosen call numbers."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, pred, target):
        total, terms = self.inner(pred, target)
        self.calls += 1
        if self.calls in self.bad_calls:
            total = total * float("nan")
        return total, terms


def _in_process_args(train: Path, save: Path, nepoch: int) -> list[str]:
    return ["--train_dir", str(train), "--save_dir", str(save), "--env", "inproc", *FAST,
            "--val_percent", "0", "--train_ps", "32", "--batch_size", "2", "--nepoch", str(nepoch),
            "--log_every", "1"]


def _patch_loss(monkeypatch, bad_calls) -> list:
    made = []
    real = train_enhancer.EnhancementLoss

    def factory(*a, **k):
        made.append(_NaNAtCalls(real(*a, **k), bad_calls))
        return made[-1]

    monkeypatch.setattr(train_enhancer, "EnhancementLoss", factory)
    return made


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_isolated_nan_steps_are_skipped_without_touching_the_weights(tmp_path, monkeypatch, one_thread):
    """A few non-finite losses (fewer than MAX_BAD_STEPS in a row) are skipped: the run finishes,
    every weight stays finite, the skipped iterations are logged, and a skipped step leaves the
    weights and optimizer moments unchanged (a run whose only steps are NaN ends where it began)."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(40, 40))
    made = _patch_loss(monkeypatch, bad_calls={2, 3, 4, 5})
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(_in_process_args(train, tmp_path / "a", 4)))
    assert made[0].calls == 8
    ckpt = load(tmp_path / "a" / "inproc" / "models" / "model_latest.pth")
    assert ckpt["iteration"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    log = (tmp_path / "a" / "inproc" / "train.log").read_text()
    assert log.count("non-finite loss, step skipped") == 4
    assert "(4 in a row)" in log and "(5 in a row)" not in log
    assert "finished at epoch 4 iteration 8" in log

    # Every step NaN but stopped (max_iters) before MAX_BAD_STEPS: the weights are the initial ones.
    monkeypatch.undo()
    _patch_loss(monkeypatch, bad_calls=set(range(1, 100)))
    args = _in_process_args(train, tmp_path / "b", 4) + ["--max_iters", "2"]
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(args))
    ckpt = load(tmp_path / "b" / "inproc" / "models" / "model_latest.pth")
    torch.manual_seed(1234)
    from models.enhancer import EMNetEnhancer, make_config
    init = EMNetEnhancer(make_config("emnet_tiny", 8)).state_dict()
    assert_same_state(init, ckpt["state_dict"], "weights after skipped steps")
    assert ckpt["optimizer"]["state"] == {}


def test_persistent_nan_raises_user_error(tmp_path, monkeypatch, one_thread):
    """MAX_BAD_STEPS non-finite losses in a row raise a UserError that says NaN and how to fix it."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(40, 40))
    made = _patch_loss(monkeypatch, bad_calls=set(range(3, 100)))
    with pytest.raises(UserError, match="NaN") as err:
        train_enhancer.main(train_enhancer.get_args_parser().parse_args(_in_process_args(train, tmp_path, 50)))
    assert made[0].calls == 2 + MAX_BAD_STEPS
    assert "--lr_initial" in str(err.value)


def test_validation_of_a_600x400_image_runs_whole_under_the_default_budget(tmp_path, monkeypatch, one_thread):
    """The heap the training steps free and keep (simulated: 5 GB more resident memory once a step
    ran) is validation's to reuse: with the default budget (4 GB here on any machine) validation of
    a 600x400 pair runs whole, not in strips spilled to disk under a 0.0 GB budget as it did."""
    from models.fast import budget, policy
    from utils import config

    train = make_structured_pairs(tmp_path / "train", ["t1", "t2"], size=(40, 40))
    val = make_structured_pairs(tmp_path / "val", ["v1"], size=(400, 600))
    made = _patch_loss(monkeypatch, bad_calls=set())
    real_rss, real_plan, plans = budget._resident_bytes, policy.plan_strips, []
    monkeypatch.setattr(budget, "_resident_bytes", lambda: real_rss() + (5 << 30 if made and made[0].calls else 0))
    monkeypatch.setattr(budget, "_available_bytes", lambda: 64 << 30)
    monkeypatch.setattr(config, "_baseline_bytes", None)
    monkeypatch.delenv("EMNET_MAX_MEMORY_GB", raising=False)

    def recorded_plan(model, x):
        plans.append((tuple(x.shape[-2:]), real_plan(model, x)))
        return plans[-1][1]

    monkeypatch.setattr(policy, "plan_strips", recorded_plan)
    argv = ["--train_dir", str(train), "--val_dir", str(val), "--save_dir", str(tmp_path / "runs"), "--env", "val",
            *FAST, "--train_ps", "32", "--batch_size", "2", "--nepoch", "1"]
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(argv))
    assert made[0].calls == 1
    assert [shape for shape, _ in plans] == [(416, 616)]  # the validation image, margin and pad included
    assert plans[0][1] is None, f"validation ran in strips: {plans}"

def test_resume_at_or_past_max_iters_trains_nothing(tmp_path):
    """--resume with --max_iters at or below the checkpoint's iteration: no step, checkpoints
    untouched, a log line saying so; the progress lines count to the cap, not the schedule's end."""
    train = make_structured_pairs(tmp_path / "pairs", ["a", "b"], size=(40, 40))
    save = tmp_path / "runs"
    flags = ("--val_percent", 0, "--train_ps", 32, "--batch_size", 1, "--nepoch", 50, "--log_every", 1)
    ok(run_train(train, save, "cap", *flags, "--max_iters", 3))
    log = (save / "cap" / "train.log").read_text()
    assert "iter 3/3 " in log and "/100 " not in log
    latest = save / "cap" / "models" / "model_latest.pth"
    before = latest.read_bytes()
    for cap in (3, 2):
        ok(run_train(train, save, "cap", *flags, "--max_iters", cap, "--resume"))
        assert latest.read_bytes() == before
    assert (save / "cap" / "train.log").read_text().count("nothing to train") == 2



def test_resume_takes_the_run_flags_not_given_again_from_the_checkpoint(tmp_path):
    """--resume alone continues the run as it was started (--max_iters, --nepoch, --batch_size,
    crops, split: not given again, from the checkpoint); a flag given again with another value
    applies and is named in one log line."""
    train = make_structured_pairs(tmp_path / "pairs", ["a", "b", "c"], size=(40, 40))
    save = tmp_path / "runs"
    ok(run_train(train, save, "run", "--val_percent", 0, "--train_ps", 32, "--batch_size", 1, "--nepoch", 50,
                 "--log_every", 1, "--max_iters", 3))
    log_path, latest = save / "run" / "train.log", save / "run" / "models" / "model_latest.pth"
    before = latest.read_bytes()
    ok(run_train(train, save, "run", "--resume"))  # without the run's flags: it stops at its --max_iters
    assert latest.read_bytes() == before
    assert "nothing to train: the run is at iteration 3 and stops at 3" in log_path.read_text()
    assert "given again" not in log_path.read_text()

    ok(run_train(train, save, "run", "--resume", "--max_iters", 5, "--lr_initial", 1e-4, "--log_every", 1))
    changed = [line for line in log_path.read_text().splitlines() if "given again" in line]
    assert len(changed) == 1 and "--max_iters 3 -> 5" in changed[0] and "--lr_initial 0.0002 -> 0.0001" in changed[0]
    assert "iter 5/5 " in log_path.read_text()
    options = yaml.safe_load((save / "run" / "options.yml").read_text())
    assert (options["nepoch"], options["batch_size"], options["train_ps"], options["val_percent"]) == (50, 1, 32, 0)
    assert (options["max_iters"], options["lr_initial"]) == (5, 1e-4)
    assert load(latest)["iteration"] == 5

# ----------------------------------------------------------------------------- 8. batches on the device, time budgets

LR_LINE = re.compile(r"iter (\d+)/(\S+) loss \S+ .* lr (\S+) ")
TINY = ("--val_percent", 0, "--train_ps", 8, "--batch_size", 2, "--ssim_lambda", 0, "--log_every", 1,
        "--data_on_device", "on")  # 8x8 crops: small enough for the L1-only loss, not for SSIM


def train_in_process(train: Path, save: Path, env_name: str, *extra) -> Path:
    """train_enhancer.main with FAST and TINY (no subprocess: these runs are short); returns ENV/."""
    argv = ["--train_dir", str(train), "--save_dir", str(save), "--env", env_name, *FAST,
            *map(str, TINY), *map(str, extra)]
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(argv))
    return save / env_name


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
    assert f"finished at epoch {ckpt['epoch']} iteration {total}" in (env / "train.log").read_text()


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
    assert "finished at epoch 0 iteration 1" in log
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


def test_device_path_skips_non_finite_steps_on_the_device(tmp_path, one_thread, monkeypatch):
    """On the device path (no per-step sync) isolated NaN losses are skipped and reported; an
    all-NaN run leaves the weights and the optimizer's step count as they were; MAX_BAD_STEPS in
    a row raise the same UserError as the DataLoader path."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(10, 12))
    _patch_loss(monkeypatch, bad_calls={2, 3, 4, 5})
    env = train_in_process(train, tmp_path, "some", "--nepoch", 4)
    ckpt = load(env / "models" / "model_latest.pth")
    assert ckpt["iteration"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    log = (env / "train.log").read_text()
    assert log.count("non-finite loss(es) since the last report, steps skipped") == 4
    assert "(at most 4 in a row)" in log and "(at most 5 in a row)" not in log
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4}, "the fused optimizer did not skip the flagged updates"

    monkeypatch.undo()
    _patch_loss(monkeypatch, bad_calls=set(range(1, 100)))
    env = train_in_process(train, tmp_path, "all", "--nepoch", 4, "--max_iters", 2)
    ckpt = load(env / "models" / "model_latest.pth")
    torch.manual_seed(1234)
    from models.enhancer import EMNetEnhancer, make_config
    init = EMNetEnhancer(make_config("emnet_tiny", 8)).state_dict()
    assert_same_state(init, ckpt["state_dict"], "weights after skipped steps")
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {0}

    monkeypatch.undo()
    made = _patch_loss(monkeypatch, bad_calls=set(range(3, 100)))
    with pytest.raises(UserError, match="NaN") as err:
        train_in_process(train, tmp_path, "many", "--nepoch", 50)
    assert made[0].calls == 2 + MAX_BAD_STEPS
    assert "--lr_initial" in str(err.value)


@pytest.mark.slow
def test_compiled_step_with_device_batches_matches_eager(tmp_path, one_thread):
    """--compile with the crops drawn on the device runs on the CPU (the step the GPU runs, under
    torch.compile) and computes the same losses as the eager step from the same seed."""
    train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(10, 12), seed=5)
    eager = train_in_process(train, tmp_path, "eager", "--nepoch", 2)
    compiled = train_in_process(train, tmp_path, "compiled", "--nepoch", 2, "--compile")
    want, got = losses_from_log(eager / "train.log"), losses_from_log(compiled / "train.log")
    assert [it for it, _ in got] == [it for it, _ in want] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(want, got):
        assert b == pytest.approx(a, abs=2e-4)
    assert load(compiled / "models" / "model_latest.pth")["iteration"] == 4


def test_compile_mode_reaches_torch_compile(tmp_path, one_thread, monkeypatch):
    """--compile --compile_mode reduce-overhead hands the mode to torch.compile (CUDA graphs on a
    GPU); --compile_mode without --compile is refused rather than ignored."""
    modes = []

    def fake_compile(module, mode=None):
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    train = make_structured_pairs(tmp_path / "train", ["r1", "r2", "r3", "r4"], size=(10, 12), seed=6)
    train_in_process(train, tmp_path, "graphs", "--nepoch", 1, "--compile", "--compile_mode", "reduce-overhead")
    assert modes == ["reduce-overhead"]
    with pytest.raises(UserError, match="--compile_mode max-autotune needs --compile"):
        train_in_process(train, tmp_path, "refused", "--nepoch", 1, "--compile_mode", "max-autotune")
