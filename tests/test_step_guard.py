"""utils/training.py's step guards in train_enhancer.py: isolated non-finite losses are skipped
without touching the weights (host-synced and on the device), MAX_BAD_STEPS in a row stop the run
with one UserError, and a diverging subprocess run ends with one 'error:' line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_runs import FAST, assert_same_state, load, make_structured_pairs, patch_loss, run_train, train_in_process

import train_enhancer
from conftest import stderr_lines
from utils.errors import UserError
from utils.training import MAX_BAD_STEPS


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


def _in_process_args(train: Path, save: Path, nepoch: int) -> list[str]:
    return ["--train_dir", str(train), "--save_dir", str(save), "--env", "inproc", *FAST,
            "--val_percent", "0", "--train_ps", "32", "--batch_size", "2", "--nepoch", str(nepoch),
            "--log_every", "1"]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_isolated_nan_steps_are_skipped_without_touching_the_weights(tmp_path, monkeypatch, one_thread):
    """A few non-finite losses (fewer than MAX_BAD_STEPS in a row) are skipped: the run finishes,
    every weight stays finite, the skipped iterations are logged, and a skipped step leaves the
    weights and optimizer moments unchanged (a run whose only steps are NaN ends where it began)."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(40, 40))
    made = patch_loss(monkeypatch, bad_calls={2, 3, 4, 5})
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
    patch_loss(monkeypatch, bad_calls=set(range(1, 100)))
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
    made = patch_loss(monkeypatch, bad_calls=set(range(3, 100)))
    with pytest.raises(UserError, match="NaN") as err:
        train_enhancer.main(train_enhancer.get_args_parser().parse_args(_in_process_args(train, tmp_path, 50)))
    assert made[0].calls == 2 + MAX_BAD_STEPS
    assert "--lr_initial" in str(err.value)


def test_device_path_skips_non_finite_steps_on_the_device(tmp_path, one_thread, monkeypatch):
    """On the device path (no per-step sync) isolated NaN losses are skipped and reported; an
    all-NaN run leaves the weights and the optimizer's step count as they were; MAX_BAD_STEPS in
    a row raise the same UserError as the DataLoader path."""
    train = make_structured_pairs(tmp_path / "train", ["n1", "n2", "n3", "n4"], size=(10, 12))
    patch_loss(monkeypatch, bad_calls={2, 3, 4, 5})
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
    patch_loss(monkeypatch, bad_calls=set(range(1, 100)))
    env = train_in_process(train, tmp_path, "all", "--nepoch", 4, "--max_iters", 2)
    ckpt = load(env / "models" / "model_latest.pth")
    torch.manual_seed(1234)
    from models.enhancer import EMNetEnhancer, make_config
    init = EMNetEnhancer(make_config("emnet_tiny", 8)).state_dict()
    assert_same_state(init, ckpt["state_dict"], "weights after skipped steps")
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {0}

    monkeypatch.undo()
    made = patch_loss(monkeypatch, bad_calls=set(range(3, 100)))
    with pytest.raises(UserError, match="NaN") as err:
        train_in_process(train, tmp_path, "many", "--nepoch", 50)
    assert made[0].calls == 2 + MAX_BAD_STEPS
    assert "--lr_initial" in str(err.value)
