"""Strips and index.html (utils/pictures.py), alone and through `test.py --pictures`."""
from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import random_enhancer, run_test_py, write_enhancer_checkpoint, write_png
from dataset.pairing import find_pairs
from models.loading import memory_payload
from models.memory import ExternalMemory, MemoryConfig
from utils.checkpoint import save_checkpoint
from utils.image_io import read_image, to_uint8
from utils.metrics import psnr
from utils.page import write_index
from utils.pictures import labelled_panel, strip_panels, write_strips

H, W = 40, 56


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A random but smooth (H, W, 3) uint8 image, which JPEG keeps close to the original."""
    coarse = rng.integers(0, 256, (4, 5, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (W, H), interpolation=cv2.INTER_LINEAR), 0, 255).astype(np.uint8)


def make_smooth_pairs(root: Path, names=("a", "b"), with_high=True, seed=0) -> list:
    rng = np.random.default_rng(seed)
    for n in names:
        write_png(root / "low" / f"{n}.png", smooth_image(rng))
        if with_high:
            write_png(root / "high" / f"{n}.png", smooth_image(rng))
    return find_pairs(root, require_high=False)


def write_results(result_dir: Path, pairs, stages=("ori", "mem"), seed=1) -> None:
    """Fake test.py outputs: smooth random images named like the pairs in result_dir/<stage>/."""
    rng = np.random.default_rng(seed)
    for stage in stages:
        for p in pairs:
            write_png(result_dir / stage / f"{p.name}.png", smooth_image(rng))


def band_height() -> int:
    return labelled_panel("x", np.zeros((H, W, 3), np.uint8)).shape[0] - H


def read_strip(path: Path) -> np.ndarray:
    return to_uint8(read_image(path))


def test_strip_has_four_labelled_panels(tmp_path):
    """low | ori | mem | gt: width = the panels' widths, each panel under a dark band with light
    text, each image unchanged (up to JPEG), labels with the PSNR against the ground truth."""
    pairs = make_smooth_pairs(tmp_path / "data")
    result = tmp_path / "res"
    write_results(result, pairs)
    paths = write_strips(result, pairs)
    assert paths == [result / "strips" / "a.jpg", result / "strips" / "b.jpg"]
    strip = read_strip(paths[0])
    band = band_height()
    assert strip.shape == (H + band, 4 * W, 3)
    images = [read_image(pairs[0].low), read_image(result / "ori" / "a.png"),
              read_image(result / "mem" / "a.png"), read_image(pairs[0].high)]
    for i, img in enumerate(images):
        panel = strip[band:, i * W:(i + 1) * W].astype(float)
        errors = [np.abs(panel - to_uint8(other)).mean() for other in images]
        assert errors[i] < 4 and all(e > 4 * errors[i] for j, e in enumerate(errors) if j != i), (i, errors)
        top = strip[:band, i * W:(i + 1) * W]
        assert np.median(top) < 40 and top.max() > 150, i  # dark band, white text
    labels = [label for label, _ in strip_panels(result, pairs[0])]
    gt = to_uint8(images[3])
    assert labels[0] == f"low  {psnr(to_uint8(images[0]), gt):.2f} dB"
    assert labels[1] == f"ori (enhancer)  {psnr(to_uint8(images[1]), gt):.2f} dB"
    assert labels[2].startswith("mem (memory)  ") and labels[3] == "ground truth"


def test_strip_without_mem_or_gt(tmp_path):
    """No mem/ image: 3 panels; no ground truth either: 2 panels and no dB in the labels."""
    pairs = make_smooth_pairs(tmp_path / "data", names=("a",))
    result = tmp_path / "res"
    write_results(result, pairs, stages=("ori",))
    (path,) = write_strips(result, pairs)
    assert read_strip(path).shape == (H + band_height(), 3 * W, 3)
    no_gt = make_smooth_pairs(tmp_path / "no_gt", names=("a",), with_high=False)
    labels = [label for label, _ in strip_panels(result, no_gt[0])]
    assert labels == ["low", "ori (enhancer)"]
    (path,) = write_strips(result, no_gt)
    assert read_strip(path).shape[1] == 2 * W


def test_strip_size_mismatch_is_user_error(tmp_path):
    """An ori image of another size (a stale result) is named in a UserError."""
    from utils.errors import UserError

    pairs = make_smooth_pairs(tmp_path / "data", names=("a",))
    write_png(tmp_path / "res" / "ori" / "a.png", np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(UserError, match="ori"):
        write_strips(tmp_path / "res", pairs)


def summary_of(rows, columns):
    return {"convention": "PSNR on rounded 8-bit RGB", "num_images": len(rows),
            "mean": {c: float(np.mean([r[c] for r in rows])) for c in columns}, "weights": "w.pth"}


def test_index_lists_every_image_and_the_mean(tmp_path):
    """index.html: the metrics.csv columns and mem - ori, a row per image in natural name order,
    the mean row, the convention; names HTML-escaped; scripts inline, no external resource."""
    names = ["1", "two words", '<b>&"x', "10"]
    columns = ["ori_psnr", "ori_ssim", "mem_psnr"]
    rows = [{"name": n, "ori_psnr": 20.0 + i, "ori_ssim": 0.5, "mem_psnr": float("inf")}
            for i, n in enumerate(names)]
    page = write_index(tmp_path, rows, columns, summary_of(rows, columns)).read_text()
    assert re.findall(r'<th class="sortable" data-col="([^"]*)">', page) == ["name", *columns, "mem_minus_ori_psnr"]
    assert re.findall(r'<tr data-i="(\d)"><td>', page) == ["0", "3", "2", "1"]
    assert '<tr class="mean"><td>mean</td>' in page
    assert ">21.0000</td>" in page and ">inf</td>" in page
    assert "PSNR on rounded 8-bit RGB" in page
    assert "&lt;b&gt;&amp;&quot;x" in page and '<b>&"x' not in page.split('<script id="data"')[0]
    assert "<script src" not in page.lower() and "http" not in page


def test_index_without_ground_truth(tmp_path):
    """No metric columns: no table, a note instead; strips missing on disk are not linked."""
    page = write_index(tmp_path, [{"name": "a"}], [], {"num_images": 1, "mean": {}}).read_text()
    assert "<table" not in page and "No ground truth" in page and "<img" not in page


# ----------------------------------------------------------------------------- test.py --pictures

def tiny_memory_file(path: Path, enhancer) -> Path:
    """A 16-slot memory with random keys for `enhancer`'s 128-d query (emnet_tiny, dim 8)."""
    g = torch.Generator().manual_seed(0)
    mem = ExternalMemory(MemoryConfig(mem_size=16, key_dim=16 * enhancer.config.embed_dim), g)
    mem.value.copy_(torch.rand(mem.value.shape, generator=g))
    save_checkpoint(path, memory_payload(mem, 1, "enhancer", None,
                                         {"enhancer_config": enhancer.config.to_dict()}))
    return path


@pytest.fixture(scope="module")
def pictures_run(tmp_path_factory):
    """test.py --pictures (no --save_images) with a tiny random enhancer and memory on two
    synthetic 40x56 pairs."""
    tmp = tmp_path_factory.mktemp("pictures_run")
    rng = np.random.default_rng(0)
    for n in ("1", "2"):
        high = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        write_png(tmp / "data" / "high" / f"{n}.png", high)
        write_png(tmp / "data" / "low" / f"{n}.png", (high // 8).astype(np.uint8))
    model = random_enhancer("emnet_tiny", 8, seed=0)
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", model)
    mem = tiny_memory_file(tmp / "mem.pth", model)
    result = tmp / "res"
    proc = run_test_py("--weights", weights, "--mem_weights", mem, "--input_dir", tmp / "data",
                       "--result_dir", result, "--pictures", "--device", "cpu")
    return {"proc": proc, "result": result, "tmp": tmp}


def test_pictures_end_to_end(pictures_run):
    """ori/, mem/, one 4-panel strip per image, index.html with the metrics.csv rows and means
    (the metric columns in its table, the memory's recalled entries beside each strip); stdout
    says where the page is."""
    proc, result = pictures_run["proc"], pictures_run["result"]
    assert proc.returncode == 0, proc.stderr
    assert "index.html" in proc.stdout and "Traceback" not in proc.stderr
    for n in ("1", "2"):
        assert (result / "ori" / f"{n}.png").is_file() and (result / "mem" / f"{n}.png").is_file()
        assert read_strip(result / "strips" / f"{n}.jpg").shape == (H + band_height(), 4 * W, 3)
    with open(result / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    summary = json.loads((result / "summary.json").read_text())
    page = (result / "index.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page).group(1))
    assert fields[-1] == "recalled"
    diffs = ["mem_minus_ori_psnr", "mem_minus_ori_ssim"]
    metrics, effects = fields[:fields.index("gain_r")], fields[fields.index("gain_r"):-1]
    assert re.findall(r'<th class="sortable" data-col="([^"]*)">', page) == [*metrics, *diffs, *effects]
    assert [[e["name"] for e in im["recalled"]] for im in data["images"]] == [["unknown"] * 3] * 2  # no sources stored
    for r in rows:
        assert f"<td>{r['name']}</td>" in page
        assert len(r["recalled"].split()) == 3 and r["recalled"].startswith("unknown:")
        assert f'>{float(r["mem_psnr"]):.4f}</td>' in page
    assert f'<td class="num">{summary["mean"]["ori_psnr"]:.4f}</td>' in page
    assert html.escape(summary["convention"]) in page
    assert not list(result.rglob("*.tmp"))
