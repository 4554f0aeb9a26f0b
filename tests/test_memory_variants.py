"""The memory variants the K-fold study ranks: the gain strength's calibration, the bootstrap
interval, whole-image entries in train_memory.py, the read settings a memory carries to test.py,
and the study itself on a tiny enhancer (the reads and the strength they use: test_memory_bank.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_ran, filled_memory, run_script, write_enhancer_checkpoint, write_png
from models.calibration import calibrate_strength
from models.loading import load_memory
from models.read_settings import ReadSettings
from utils.stats import bootstrap_ci

# ------------------------------------------------------------------------------- calibration

def twin_set(good: bool):
    """6 images in 3 pairs of twins with identical queries; outputs at half the target's
    brightness. With `good` twins share their target (a leave-one-out read recalls it exactly);
    else twins' targets differ wildly and the outputs are already right."""
    rng = np.random.default_rng(0)
    keys, ori, high = [], [], []
    for g in range(3):
        key = torch.zeros(4)
        key[g] = 1
        base = rng.uniform(0.2, 0.4, (12, 14, 3))
        for twin in range(2):
            target = base if good else base * (0.5 if twin == 0 else 2.0)
            keys.append(key)
            high.append((target * 255).round().astype(np.uint8))
            out = target * 0.5 if good else target
            ori.append(torch.from_numpy(out).permute(2, 0, 1).float())
    values = torch.stack([torch.from_numpy(h).float().mean(dim=(0, 1)) / 255 for h in high])
    return torch.stack(keys), values, ori, high


@pytest.mark.parametrize("good", [True, False])
def test_calibrated_strength_trusts_a_good_recall_and_switches_off_a_bad_one(good):
    keys, values, ori, high = twin_set(good)
    mem = filled_memory(keys, values)
    strength, curve = calibrate_strength(mem, F.normalize(keys, dim=1), ori, high, ReadSettings())
    assert set(curve) >= {0.0, 1.0}
    if good:
        assert strength == 1.0 and curve[1.0] > curve[0.0] + 3
    else:
        assert strength == 0.0


def test_bootstrap_interval():
    x = np.random.default_rng(1).normal(0.5, 1.0, 400)
    mean, lo, hi = bootstrap_ci(x)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    assert 0.15 < hi - lo < 0.25  # about 2 * 1.96 / sqrt(400)
    assert bootstrap_ci(x) == (mean, lo, hi)  # fixed seed: reruns agree
    _, lo5, hi5 = bootstrap_ci(x[:15])
    assert hi5 - lo5 > hi - lo


# --------------------------------------------------------------------- scripts on a tiny net

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict:
    """A tiny enhancer and 8 structured pairs of 136x144 (large enough for 128-px crops)."""
    tmp = tmp_path_factory.mktemp("variants")
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", epoch=1)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:136, 0:144] / 144
    for i in range(8):
        colour = rng.uniform(0.2, 0.8, 3)
        high = np.clip(colour * (0.6 + 0.4 * np.sin(6 * xx + i)[..., None] * yy[..., None]), 0, 1)
        write_png(tmp / "data" / "high" / f"{i}.png", (high * 255).astype(np.uint8))
        write_png(tmp / "data" / "low" / f"{i}.png", (high * 0.15 * 255).astype(np.uint8))
    return {"tmp": tmp, "weights": weights, "data": tmp / "data"}


@pytest.mark.slow
def test_memory_study_runs_every_image_once_and_resumes(tiny_setup):
    tmp = tiny_setup["tmp"]
    args = ["--weights", tiny_setup["weights"], "--train_dir", tiny_setup["data"], "--folds", "2",
            "--no_ssim", "--cache_dir", tmp / "cache", "--out", tmp / "study", "--device", "cpu",
            "--variants", "published", "images, k=8, T=0.01, calibrated"]
    proc = assert_ran(run_script("benchmarks/memory_study.py", *args, timeout=900))
    report = json.loads((tmp / "study" / "study.json").read_text())
    names = [r["variant"] for r in report["rows"]]
    assert names[:4] == ["bound: oracle recall, softmax", "bound: oracle recall, full gain",
                         "bound: constant training mean, softmax", "bound: ridge predictor of the ratio, full gain"]
    assert "published: crops, k=1, softmax" in names and len(names) == 6
    for row in report["rows"]:
        assert len(row["per_image_psnr_gain"]) == 8 and row["psnr_ci_low"] <= row["psnr_gain"] <= row["psnr_ci_high"]
        assert row["random_psnr_ci_low"] <= row["random_psnr_gain"] <= row["random_psnr_ci_high"]
    groups, folds = np.array(report["groups_of_names"]), np.array(report["folds_of_names"])
    assert all(len(set(folds[groups == g])) == 1 for g in set(groups))
    calibrated = report["rows"][-1]
    assert len(calibrated["fitted_per_fold"]) == 2 and "strength" in calibrated["fitted_per_fold"][0]
    assert set(report["predictability"]) == {"grouped", "random"}
    assert report["rows"][1]["psnr_gain"] > 0  # recalling each target's own colour helps
    assert "95% bootstrap" in proc.stdout and (tmp / "study" / "study.csv").is_file()
    cached = sorted((tmp / "cache").rglob("*.pt"))
    assert len(cached) == 8
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert_ran(run_script("benchmarks/memory_study.py", *args, timeout=900))
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # the second run read the cache


@pytest.mark.slow
def test_train_memory_image_entries_calibrated_and_read_by_test_py(tiny_setup):
    """--entries images --strength auto: one slot per training pair, the calibrated strength and
    its curve stored in the memory; test.py reads with the stored settings and reports them."""
    tmp = tiny_setup["tmp"]
    assert_ran(run_script("train_memory.py", "--pretrain_weights", tiny_setup["weights"], "--train_dir", tiny_setup["data"],
                          "--val_percent", "30", "--entries", "images", "--query_encoder", "enhancer", "--strength", "auto",
                          "--testing_top_k", "3", "--temperature", "0.05", "--nepoch", "1", "--mem_size", "16",
                          "--save_dir", tmp / "runs", "--env", "img", "--device", "cpu", timeout=900))
    mem, ckpt = load_memory(tmp / "runs" / "img" / "models" / "memory_best.pth")
    n_train = int((mem.top_index >= 0).sum())
    assert 0 < n_train < 8 and ckpt["entries"] == "images"
    read = ckpt["read"]
    assert read["top_k"] == 3 and read["temperature"] == 0.05 and isinstance(read["strength"], float)
    assert set(ckpt["calibration"]) >= {"0.0", "1.0"}
    result = tmp / "result"
    assert_ran(run_script("test.py", "--weights", tiny_setup["weights"], "--input_dir", tiny_setup["data"],
                          "--mem_weights", tmp / "runs" / "img" / "models" / "memory_best.pth", "--result_dir", result,
                          "--device", "cpu", timeout=900))
    summary = json.loads((result / "summary.json").read_text())
    assert (summary["testing_top_k"], summary["temperature"]) == (3, 0.05)
    assert summary["strength"] == read["strength"] and summary["border_margin"] == 8
    proc = run_script("test.py", "--weights", tiny_setup["weights"], "--input_dir", tiny_setup["data"],
                      "--mem_weights", tmp / "runs" / "img" / "models" / "memory_best.pth", "--result_dir", result,
                      "--device", "cpu", "--strength", "lots", timeout=900)
    assert proc.returncode == 2 and "--strength 'lots'" in proc.stderr and "Traceback" not in proc.stderr
