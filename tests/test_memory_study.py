"""benchmarks/memory_study.py on a tiny enhancer: the K-fold study of the memory variants runs
every image once and resumes from its cache; and the whole-image, calibrated memory it ranks,
built by train_memory.py and read by test.py with the settings it stores (the study's protocol:
test_memory_study_protocol.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_ran, run_script, write_enhancer_checkpoint, write_png
from models.loading import load_memory
from utils.image_io import read_image


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
    for row in report["rows"]:  # the reported gain is the mean over all 8 held-out images
        gains = row["per_image_psnr_gain"]
        assert len(gains) == 8 and np.mean(gains) == pytest.approx(row["psnr_gain"], abs=1e-4)
    by_name = {r["variant"]: r for r in report["rows"]}
    oracle, constant = by_name["bound: oracle recall, softmax"], by_name["bound: constant training mean, softmax"]
    assert oracle["images_corrected"] == constant["images_corrected"] == 8  # each image held out in one fold
    assert oracle["psnr_gain"] > constant["psnr_gain"]  # recalling each image's own colour beats no recall
    groups = np.array(report["groups_of_names"])
    for key in ("folds_of_names", "random_folds_of_names"):
        folds = np.array(report[key])
        assert len(folds) == 8 and set(folds) == {0, 1}, key  # every image in one of the 2 folds, none empty
    folds = np.array(report["folds_of_names"])
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
    """--entries images --strength auto --abstain scene: one slot per training pair, the calibrated
    strength and its curve, the input scenes and the fitted abstention stored in the memory;
    test.py reads with the stored settings, reports them, and leaves the images it abstains on as
    the enhancer made them."""
    tmp = tiny_setup["tmp"]
    assert_ran(run_script("train_memory.py", "--pretrain_weights", tiny_setup["weights"], "--train_dir", tiny_setup["data"],
                          "--val_percent", "30", "--entries", "images", "--query_encoder", "enhancer", "--strength", "auto",
                          "--testing_top_k", "3", "--temperature", "0.05", "--nepoch", "1", "--mem_size", "16", "--abstain", "scene",
                          "--save_dir", tmp / "runs", "--env", "img", "--device", "cpu", timeout=900))
    mem, ckpt = load_memory(tmp / "runs" / "img" / "models" / "memory_best.pth")
    n_train = int((mem.top_index >= 0).sum())
    assert 0 < n_train < 8 and ckpt["entries"] == "images"
    read = ckpt["read"]
    assert read["top_k"] == 3 and read["temperature"] == 0.05 and isinstance(read["strength"], float)
    assert set(ckpt["calibration"]) >= {"0.0", "1.0"}
    fit = ckpt["abstention_fit"]
    assert fit["rule"] == "scene" and read.get("min_scene") == fit["min_scene"] and fit["unseen_reads"] == len(ckpt["sources"]["names"])
    assert ckpt["sources"]["scenes"].shape == (len(ckpt["sources"]["names"]), 384)
    result = tmp / "result"
    assert_ran(run_script("test.py", "--weights", tiny_setup["weights"], "--input_dir", tiny_setup["data"],
                          "--mem_weights", tmp / "runs" / "img" / "models" / "memory_best.pth", "--result_dir", result,
                          "--save_images", "--device", "cpu", timeout=900))
    summary = json.loads((result / "summary.json").read_text())
    assert (summary["testing_top_k"], summary["temperature"]) == (3, 0.05)
    effects = summary["memory_effect"]["images"]
    for name, effect in effects.items():
        same = np.array_equal(read_image(result / "ori" / f"{name}.png"), read_image(result / "mem" / f"{name}.png"))
        assert effect["memory"] in ("corrected", "abstained") and (effect["memory"] == "abstained") <= same
        assert (effect["memory"] == "abstained") == (fit["min_scene"] is not None and "<=" in effect["memory_reason"])
    assert summary["memory_effect"]["abstained"] == sum(e["memory"] == "abstained" for e in effects.values())
    assert summary["strength"] == read["strength"] and summary["border_margin"] == 8
    proc = run_script("test.py", "--weights", tiny_setup["weights"], "--input_dir", tiny_setup["data"],
                      "--mem_weights", tmp / "runs" / "img" / "models" / "memory_best.pth", "--result_dir", result,
                      "--device", "cpu", "--strength", "lots", timeout=900)
    assert proc.returncode == 2 and "--strength 'lots'" in proc.stderr and "Traceback" not in proc.stderr
