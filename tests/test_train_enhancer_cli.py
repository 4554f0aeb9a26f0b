"""train_enhancer.py end to end, run as users run it (a subprocess in the repo root) with the
smallest network (emnet_tiny, embed_dim 8), tiny crops, no DataLoader workers and the offline
loss (L1 + SSIM: LPIPS needs ImageNet AlexNet weights that the test machines do not have): smoke
runs, overfitting one pair, bad input, DDP on the CPU, validation's memory, --compile."""
from __future__ import annotations

import json
import math
import re
import shutil
import socket

import numpy as np
import pytest
import torch
import yaml
from train_runs import (
    FAST,
    LOSS_LINE,
    ONE_THREAD,
    linked_pairs,
    load,
    losses_from_log,
    make_structured_pairs,
    patch_loss,
    run_train,
    train_cmd,
    train_in_process,
    validation_budget,
)

import train_enhancer
from conftest import assert_ran, run_script, stderr_lines, write_png
from dataset.pairing import find_pairs, is_validation_pair
from models.loading import ENHANCER_FORMAT, load_enhancer
from utils.errors import UserError

# ----------------------------------------------------------------------------- smoke runs

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
    assert_ran(run_train(train, save, "smoke", "--val_dir", val, "--train_ps", 32, "--batch_size", 2,
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
    assert "starting at epoch 1 iteration 0" in log
    assert [it for it, _ in losses_from_log(env_dir / "train.log")] == [1, 2, 3]
    assert "finished at epoch 2 iteration 3" in log
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
    proc = assert_ran(run_script("test.py", "--weights", models / "model_latest.pth", "--input_dir", val,
                                 "--result_dir", result, "--device", "cpu", timeout=120, env_extra=ONE_THREAD))
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
    assert_ran(run_train(train, save, "smoke", "--nepoch", 1, "--batch_size", 2, "--train_ps", 64))
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


# ----------------------------------------------------------------------------- overfit

def test_overfits_a_single_pair(tmp_path):
    """30 iterations on one structured pair (batch 1, lr 1e-3) drive the logged training loss
    clearly down: the mean of the last 5 is below 75% of the mean of the first 5."""
    train = make_structured_pairs(tmp_path / "one", ["p0"], size=(40, 40))
    save = tmp_path / "runs"
    assert_ran(run_train(train, save, "overfit", "--val_percent", 0, "--train_ps", 32, "--batch_size", 1,
                         "--nepoch", 30, "--warmup_epochs", 1, "--lr_initial", 1e-3, "--log_every", 1,
                         "--checkpoint", 1000))
    losses = losses_from_log(save / "overfit" / "train.log")
    assert [it for it, _ in losses] == list(range(1, 31))
    values = [v for _, v in losses]
    assert all(math.isfinite(v) for v in values)
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < 0.75 * first, (first, last, values)


# ----------------------------------------------------------------------------- bad input

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
    return missing, ["--lpips_lambda", "1"], [f"--train_dir {missing}"], {"TORCH_HOME": str(home)}


def _bad_dataset_root(tmp_path, make_pairs):
    """The LOL root instead of its our485/: the error names the sub-folder to pass."""
    root = tmp_path / "LOL-v1"
    root.mkdir()
    make_pairs(names=("1", "2"), size=(40, 40)).rename(root / "our485")
    return root, [], [f"--train_dir {root / 'our485'}"], {}


def _bad_amp(tmp_path, make_pairs):
    root = make_pairs(names=("1", "2", "3"), size=(40, 40))
    return root, ["--amp", "fp16"], ["--amp fp16"], {}


@pytest.mark.parametrize("case", [_bad_empty, _bad_unpaired, _bad_train_ps, _bad_batch, _bad_save_dir,
                                  _bad_resume, _bad_lpips, _bad_missing_data, _bad_dataset_root, _bad_amp],
                         ids=["empty", "unpaired", "train_ps", "batch_size", "save_dir", "resume",
                              "lpips_offline", "missing_data_offline", "dataset_root", "amp_fp16_cpu"])
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


# ----------------------------------------------------------------------------- DDP on CPU

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains 3 iterations and writes a model_latest.pth whose
    keys have no DDP 'module.' prefix and which load_enhancer loads; both ranks exit 0."""
    train = make_structured_pairs(tmp_path / "train", ["d1", "d2", "d3", "d4"], size=(40, 40))
    val = make_structured_pairs(tmp_path / "val", ["dv"], size=(40, 40), seed=7)
    save = tmp_path / "runs"
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()),
           *train_cmd(train, save, "ddp", "--val_dir", val, "--train_ps", 32, "--batch_size", 2,
                      "--nepoch", 3, "--max_iters", 3, "--log_every", 1)]
    assert_ran(run_script(*cmd, timeout=240, env_extra=ONE_THREAD))
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
    assert log.count("starting at epoch 1") == 1, "only rank 0 writes the log"


def test_epochs_are_numbered_from_1_alike_in_the_progress_bar_the_log_and_the_checkpoints(tmp_path):
    """4 pairs at batch 2 (2 iterations an epoch), stopped by --max_iters 3 in the second epoch:
    the progress bar, the loss lines, the validation lines, the last line and model_epoch_N.pth
    all call the epochs 1 and 2 (the bar counted 0 and 1, validation 1 and 2)."""
    train = make_structured_pairs(tmp_path / "train", ["e1", "e2", "e3", "e4"], size=(40, 40))
    val = make_structured_pairs(tmp_path / "val", ["v1"], size=(40, 40))
    proc = assert_ran(run_train(train, tmp_path / "runs", "epochs", "--val_dir", val, "--nepoch", 3, "--max_iters", 3,
                                "--train_ps", 32, "--batch_size", 2, "--log_every", 1, "--checkpoint", 1))
    log_path = tmp_path / "runs" / "epochs" / "train.log"
    log = log_path.read_text()
    assert sorted({int(e) for e in re.findall(r"epoch (\d+):\s+\d+%", proc.stderr)}) == [1, 2]
    assert [(int(e), int(i)) for e, i, *_ in LOSS_LINE.findall(log)] == [(1, 1), (1, 2), (2, 3)]
    assert re.findall(r"epoch (\d+) iter (\d+): val PSNR", log) == [("1", "2"), ("2", "3")]
    assert "starting at epoch 1 iteration 0" in log and "finished at epoch 2 iteration 3" in log
    models = tmp_path / "runs" / "epochs" / "models"
    assert sorted(f.name for f in models.glob("model_epoch_*.pth")) == ["model_epoch_1.pth"]
    assert load(models / "model_latest.pth")["epoch"] == 1  # the epochs completed, as --resume reads it


# ----------------------------------------------------------------------------- validation, compile

def test_validation_of_a_600x400_image_runs_whole_under_the_default_budget(tmp_path, monkeypatch, one_thread):
    """The heap the training steps free and keep (simulated: 5 GB more resident memory once a step
    ran) is validation's to reuse: with the default budget (4 GB here on any machine) validation of
    a 600x400 pair runs whole, not in strips spilled to disk under a 0.0 GB budget as it did."""
    from models.fast import budget, policy
    from utils import config

    train = make_structured_pairs(tmp_path / "train", ["t1", "t2"], size=(40, 40))
    val = make_structured_pairs(tmp_path / "val", ["v1"], size=(400, 600))
    made = patch_loss(monkeypatch, bad_calls=set())
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


def test_a_large_held_training_set_leaves_validation_its_budget(tmp_path, weights):
    """The decoded training set stays in memory for the whole run. 32 pairs of 1600x1200 (0.37 GB
    as stored, 8 bits: our485's 395 pairs take 0.53 GB) must not shrink validation's memory budget
    below a 2-pair run's by a quarter of their size, in either trainer: our485 left validation 0.0 GB
    of the default 4 GB (held as float32, 2.1 GB, and copied once more while decoding)."""
    low = write_png(tmp_path / "scene_low.png", np.full((1200, 1600, 3), 40, np.uint8))
    high = write_png(tmp_path / "scene_high.png", np.full((1200, 1600, 3), 160, np.uint8))
    small = linked_pairs(tmp_path / "small", [f"s{i}" for i in range(2)], low, high)
    large = linked_pairs(tmp_path / "large", [f"b{i}" for i in range(32)], low, high)
    val = make_structured_pairs(tmp_path / "val", ["v1"], size=(48, 64))
    held = 32 * 2 * 1200 * 1600 * 3
    enhancer = [*FAST, "--train_ps", 32, "--batch_size", 2, "--max_iters", 1]
    memory = ["--pretrain_weights", weights, "--entries", "crops", "--query_encoder", "enhancer_levels",
              "--mem_size", 16, "--batch_size", 2, "--train_ps", 24, "--nepoch", 1, "--device", "cpu"]
    for script, flags in (("train_enhancer.py", enhancer), ("train_memory.py", memory)):
        budgets = [validation_budget(script, *flags, "--train_dir", train, "--val_dir", val, "--max_memory", 64,
                                     "--save_dir", tmp_path / f"{script}_{train.name}")  # own cache of passes
                   for train in (small, large)]
        assert budgets[1] > budgets[0] - held / 4, \
            f"{script}: the {held / 2**30:.2f} GB training set took {(budgets[0] - budgets[1]) / 2**30:.2f} GB"


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
