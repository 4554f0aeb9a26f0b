"""Metrics on rounded 8-bit RGB (docs/METHOD.md, "How the numbers are measured") and the report files."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils.image_io import to_uint8
from utils.metrics import METRIC_CONVENTION, gt_mean_psnr, psnr, ssim
from utils.report import METRICS, mean_scores, score, write_report


def _rand(seed: int, shape=(40, 50, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_images():
    """Identical images: PSNR inf, SSIM 1, GT-mean PSNR inf."""
    a = _rand(0)
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)
    assert gt_mean_psnr(a, a) == math.inf


def test_known_psnr():
    """A constant difference of 5 grey levels everywhere: 10 log10(255^2 / 25)."""
    gt = np.random.default_rng(0).integers(0, 250, (30, 20, 3), dtype=np.uint8)
    pred = gt + 5
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert psnr(gt, pred) == pytest.approx(psnr(pred, gt))  # symmetric


def test_psnr_no_uint8_overflow():
    """Differences are computed in float: 0 vs 255 is the worst case (0 dB), not a wrapped value."""
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)
    assert psnr(b, a) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_agreement_with_skimage(seed):
    """PSNR and SSIM equal scikit-image's (data_range 255, channel_axis 2) on random images."""
    gt = _rand(seed)
    noise = np.random.default_rng(seed + 10).integers(-30, 31, gt.shape)
    pred = np.clip(gt.astype(int) + noise, 0, 255).astype(np.uint8)
    assert psnr(pred, gt) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=255), rel=1e-12)
    assert ssim(pred, gt) == pytest.approx(
        structural_similarity(gt, pred, channel_axis=2, data_range=255), rel=1e-9)
    assert 0 < ssim(pred, gt) < 1


def test_shape_mismatch_is_value_error():
    """Different shapes: ValueError naming both shapes."""
    a, b = _rand(0, (10, 12, 3)), _rand(1, (12, 10, 3))
    for fn in (psnr, ssim, gt_mean_psnr):
        with pytest.raises(ValueError) as err:
            fn(a, b)
        assert "(10, 12, 3)" in str(err.value) and "(12, 10, 3)" in str(err.value)


def test_float_input_is_value_error():
    """Metrics refuse float images (they must be rounded to uint8 first)."""
    a = _rand(0)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32) / 255, a)


def test_to_uint8_rounds():
    """to_uint8 rounds to the nearest level rather than truncating, and clips."""
    x = np.array([0.4, 0.6, 1.4, 127.5 - 0.1, 254.4, 254.6, 255.0]) / 255.0
    assert to_uint8(x).tolist() == [0, 1, 1, 127, 254, 255, 255]
    assert to_uint8(np.array([-0.2, 1.3])).tolist() == [0, 255]
    assert to_uint8(x).dtype == np.uint8
    levels = np.arange(256) / 255.0
    assert to_uint8(levels.astype(np.float32)).tolist() == list(range(256))  # exact levels survive float32


def test_gt_mean_psnr_removes_a_global_scale():
    """A prediction that is the GT at half brightness scores far higher in GT-mean PSNR than in
    plain PSNR (that is what GT-mean corrects: a global brightness error)."""
    gt = _rand(3)
    pred = to_uint8(gt.astype(np.float64) / 255 * 0.5)
    plain, corrected = psnr(pred, gt), gt_mean_psnr(pred, gt)
    assert corrected > plain + 15
    assert corrected > 40


def test_gt_mean_psnr_on_black_prediction():
    """An all-black prediction does not divide by zero."""
    gt = _rand(4)
    v = gt_mean_psnr(np.zeros_like(gt), gt)
    assert math.isfinite(v)


def test_score_and_report_files(tmp_path):
    """score() gives every metric; write_report writes metrics.csv rows, summary.json with the
    convention and the column means, and result.txt."""
    gt = _rand(0, (16, 16, 3))
    preds = [np.clip(gt.astype(int) + d, 0, 255).astype(np.uint8) for d in (3, 9)]
    rows = [{"name": f"im{i}", **{f"ori_{k}": v for k, v in score(p, gt).items()}} for i, p in enumerate(preds)]
    columns = [f"ori_{m}" for m in METRICS]
    assert set(score(preds[0], gt)) == set(METRICS)
    summary = write_report(tmp_path, rows, columns, {"weights": "w.pth"})
    with open(tmp_path / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["name"] for r in csv_rows] == ["im0", "im1"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["convention"] == METRIC_CONVENTION and on_disk["num_images"] == 2
    for c in columns:
        assert on_disk["mean"][c] == pytest.approx(np.mean([float(r[c]) for r in csv_rows]), rel=1e-12)
    assert "mean ori_psnr" in (tmp_path / "result.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "result.txt", "summary.json"]


def test_mean_scores_skips_missing():
    """Means use only the rows that have the column."""
    rows = [{"a": 1.0}, {"a": 3.0, "b": 2.0}, {"a": None}]
    assert mean_scores(rows, ["a", "b", "c"]) == {"a": 2.0, "b": 2.0}


def test_report_intervals_cover_means_and_pair_mem_with_ori():
    """ci95: an interval per mean column that holds the mean, and the paired mem - ori interval,
    which is narrow when mem beats ori by a steady margin although both vary a lot."""
    from utils.report import intervals, mean_scores

    rng = np.random.default_rng(0)
    base = rng.normal(20, 3, 15)
    rows = [{"name": str(i), "ori_psnr": b, "mem_psnr": b + 0.5 + rng.normal(0, 0.05)} for i, b in enumerate(base)]
    cols = ["ori_psnr", "mem_psnr"]
    means, ci = mean_scores(rows, cols), intervals(rows, cols)
    for c in cols:
        assert ci[c][0] < means[c] < ci[c][1] and ci[c][1] - ci[c][0] > 1
    lo, hi = ci["mem_minus_ori_psnr"]
    assert 0.4 < lo < 0.5 < hi < 0.6
    assert "mem_minus_ori_ssim" not in ci


@pytest.mark.parametrize("shape", [(61, 9, 3), (20, 40, 3), (7, 7, 3)])
def test_ssim_in_row_chunks_equals_skimage_whole(monkeypatch, shape):
    """Large images are scored in row chunks: with chunks of a few rows (a last short one too) the
    SSIM equals scikit-image's on the whole image."""
    import utils.metrics as metrics

    gt = _rand(4, shape)
    pred = np.clip(gt.astype(int) + np.random.default_rng(5).integers(-40, 41, shape), 0, 255).astype(np.uint8)
    monkeypatch.setattr(metrics, "SSIM_CHUNK_PIXELS", 4 * shape[1])
    assert ssim(pred, gt) == pytest.approx(structural_similarity(gt, pred, channel_axis=2, data_range=255), rel=1e-12)
