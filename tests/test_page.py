"""The interactive results page (utils/page.py): its HTML, and its behaviour in headless Chromium."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_png
from dataset.pairing import find_pairs
from utils import headless
from utils.image_io import read_image, to_uint8
from utils.memory_effect import measure_effect
from utils.page import SELFTEST, natural_key
from utils.pictures import write_pictures
from utils.report import score, write_report

NAMES = ("1", "22", "111", "146", "a b")
H, W = 180, 260  # larger than the 160-pixel zoom pane: the zoom shows a region, not the whole photo
STAGES = ("ori", "mem")


def smooth(rng: np.random.Generator, brightness: float) -> np.ndarray:
    """A random smooth photo-like image plus fine noise (so every pixel differs from its neighbours)."""
    coarse = rng.random((6, 8, 3)).astype(np.float32) * 255 * brightness
    img = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 6, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def fake_run(root: Path, with_high: bool = True) -> tuple[Path, list[dict]]:
    """A folder as `test.py --pictures` leaves it, from random images (no network involved)."""
    rng = np.random.default_rng(7)
    for n in NAMES:
        write_png(root / "data" / "low" / f"{n}.png", smooth(rng, 0.2))
        if with_high:
            write_png(root / "data" / "high" / f"{n}.png", smooth(rng, 1.0))
    pairs = find_pairs(root / "data", require_high=False)
    result = root / "res"
    rows = []
    for p in pairs:
        row = {"name": p.name, "recalled": [{"name": f"train{len(rows)}", "index": len(rows), "score": 0.5,
                                             "percentile": 40.0}]}
        images = {}
        for stage in STAGES:
            images[stage] = smooth(rng, 0.8)
            write_png(result / stage / f"{p.name}.png", images[stage])
            if with_high:
                row.update({f"{stage}_{k}": v for k, v in score(images[stage], to_uint8(read_image(p.high))).items()})
        row["memory_effect"] = measure_effect(images["ori"], images["mem"], row["recalled"])
        rows.append(row)
    columns = [f"{s}_{m}" for s in STAGES for m in ("psnr", "ssim", "gt_mean_psnr")] if with_high else []
    summary = write_report(result, rows, columns, {"weights": "w.pth"})
    thumbs = np.random.default_rng(1).integers(0, 256, (len(rows), 24, 36, 3), dtype=np.uint8)
    write_pictures(result, pairs, rows, columns, summary, STAGES, lambda i: thumbs[i])
    return result, rows


def test_page_html_is_self_contained_and_summarised(tmp_path):
    """Inline script and style, no network URL; summary with intervals and mem - ori (mean and
    interval); table rows in natural order with numeric sort keys; previews for every stage."""
    result, rows = fake_run(tmp_path)
    page = (result / "index.html").read_text()
    summary = json.loads((result / "summary.json").read_text())
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert "<link " not in page
    assert re.findall(r'<tr data-i="\d+"><td>([^<]*)</td>', page) == ["1", "22", "111", "146", "a b"]
    effects = list(rows[0]["memory_effect"].columns())
    assert re.findall(r'<th class="sortable" data-col="([^"]*)">', page)[-len(effects):] == effects
    diff = summary["mem_minus_ori"]["psnr"]["mean"]
    assert diff == pytest.approx(np.mean([r["mem_psnr"] - r["ori_psnr"] for r in rows]), abs=1e-12)
    lo, hi = summary["ci95"]["mem_minus_ori_psnr"]
    assert f"<b>mem - ori psnr</b>: {diff:+.4f}, 95% CI [{lo:.4f}, {hi:.4f}]" in page
    lo, hi = summary["ci95"]["ori_psnr"]
    assert f"<b>ori_psnr</b>: {summary['mean']['ori_psnr']:.4f}, 95% CI [{lo:.4f}, {hi:.4f}]" in page
    first = next(r for r in rows if r["name"] == "22")
    assert f'data-v="{first["mem_psnr"] - first["ori_psnr"]!r}"' in page
    for stage in ("low", "ori", "mem", "gt"):
        assert all((result / "previews" / stage / f"{n}.jpg").is_file() for n in NAMES)
    assert len(list((result / "recalled").glob("*.png"))) == len(NAMES)


def test_page_without_ground_truth(tmp_path):
    """No high/: no metrics (said so), no ground-truth stage anywhere on the page."""
    result, _ = fake_run(tmp_path, with_high=False)
    page = (result / "index.html").read_text()
    head = page.split("<script")[0]
    assert "No ground truth (high/): the images are enhanced only, no metrics." in head
    assert "ground truth" not in head.replace("No ground truth", "")
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page).group(1))
    assert [s["key"] for s in data["stages"]] == ["low", "ori", "mem"]


def test_self_test_driver_is_a_file_beside_the_page_not_in_it(tmp_path):
    """The page readers open carries no self-test code: none of the driver's functions is in
    index.html; the driver is written beside it, under the name page.js loads it by."""
    result, _ = fake_run(tmp_path)
    page = (result / "index.html").read_text()
    driver = result / SELFTEST
    assert driver.is_file(), f"no {SELFTEST} beside index.html"
    declared = re.findall(r"^(?:async )?function (\w+)\(", driver.read_text(), re.M)
    assert "selfTest" in declared
    assert [name for name in declared if re.search(rf"\bfunction {name}\(", page)] == []
    assert f'"{SELFTEST}"' in page


def test_natural_key_orders_numbers_as_numbers():
    assert sorted(["146", "22", "a10", "1", "a2", "111"], key=natural_key) == ["1", "22", "111", "146", "a2", "a10"]


@pytest.fixture(scope="module")
def browser() -> str:
    found = headless.find_browser()
    if found is None:
        pytest.skip(f"no headless browser: none of {', '.join(headless.BROWSERS)} is on PATH "
                    "(apt-get install chromium; .ci/run does)")
    return found


def test_page_in_headless_chromium(browser, tmp_path):
    """Chromium opens index.html from file:// with #selftest: the page moves the slider with the
    arrow keys, sorts every column (numbers numerically, names naturally), steps with n/p, and its
    zoom panes show, at 1:1 and 2x, the very pixels of each stage's full-size file at the hovered
    place; no console error, no failed load; the driver came from selftest.js. Opened without
    #selftest, the page loads no driver. Then a screenshot that is not blank."""
    result, rows = fake_run(tmp_path)
    url = (result / "index.html").as_uri()
    proc = headless.dump_dom(browser, url + "#selftest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="selftest">(\{.*?)</pre>', proc.stdout, re.S)
    assert found, f"the self-test wrote no verdict; console: {headless.console_lines(proc.stderr)}"
    assert re.findall(r'<script src="([^"]*)"', proc.stdout) == [SELFTEST]
    report = json.loads(html.unescape(found.group(1)))
    assert report["errors"] == [], report["errors"]
    assert not [line for line in headless.console_lines(proc.stderr) if "Uncaught" in line or "rror" in line]
    checks = report["checks"]
    assert (checks["slider_right"], checks["slider_left"]) == (54, 52)
    assert "46%" in checks["clip_right"] and checks["left_src"].startswith("previews/low/")
    assert checks["next"] == "22" and checks["back"] is True
    assert report["sorted"]["name"] == list(NAMES)
    for col in ("ori_psnr", "mem_ssim", "mem_minus_ori_psnr"):
        value = {r["name"]: (r["mem_psnr"] - r["ori_psnr"] if col == "mem_minus_ori_psnr" else r[col]) for r in rows}
        assert report["sorted"][col] == sorted(value, key=value.get), col
    assert report["loaded"] == ["low", "ori", "mem", "gt"]
    shown = next(r for r in rows if r["name"] == report["image"])["memory_effect"]
    assert report["effect"] == f"memory: {shown.describe()}" and "percentile 40" in report["effect"]
    pair = {p.name: p for p in find_pairs(tmp_path / "data")}[report["image"]]
    files = {"low": pair.low, "ori": result / "ori" / f"{pair.name}.png",
             "mem": result / "mem" / f"{pair.name}.png", "gt": pair.high}
    for probe, zoom in zip(report["zoom"], (1, 2)):
        assert probe["zoom"] == zoom and probe["block_uniform"], probe
        x, y = probe["x"], probe["y"]
        assert abs(x - 0.3 * W) < 160 / zoom and abs(y - 0.6 * H) < 160 / zoom, probe  # near the mouse
        for stage, path in files.items():
            assert probe["rgb"][stage] == to_uint8(read_image(path))[y, x].tolist(), (stage, probe)

    plain = headless.dump_dom(browser, url)  # as readers open it: no driver loaded, no verdict
    assert plain.returncode == 0 and 'data-load-ms="' in plain.stdout, plain.stderr[-2000:]
    assert "<script src" not in plain.stdout and '<pre id="selftest">' not in plain.stdout

    shot = headless.screenshot(browser, url, tmp_path / "page.png")
    img = cv2.imread(str(shot))
    assert img is not None and img.std() > 10
