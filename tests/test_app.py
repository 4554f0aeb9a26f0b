"""`python app.py` (the Gradio demo), started on a free local port and called through gradio_client."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import GLIBC_TUNABLES, REPO, run_test_py, write_png
from utils import headless
from utils.image_io import read_image, to_uint8

gradio_client = pytest.importorskip("gradio_client", reason="the demo's requirements are not installed: "
                                    "pip install -r requirements-demo.txt")
pytest.importorskip("gradio", reason="the demo's requirements are not installed: pip install -r requirements-demo.txt")

WEIGHTS = "pre_trained_logs/enhancer/emnet_small16_lolv1_cpu.pth"
MEMORY = "pre_trained_logs/memory/emnet_small16_lolv1_levels_memory.pth"
MAX_PIXELS = 20000  # the refused "panorama" below is 200x150 = 30000 pixels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py ended (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < end, "app.py did not answer in time"
            time.sleep(0.3)


def photo(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """A dark, smooth, photo-like image."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 5, 3)).astype(np.float32) * 70
    return write_png(path, np.clip(cv2.resize(coarse, (w, h)) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8))


def png_means(path) -> np.ndarray:
    return to_uint8(read_image(path)).reshape(-1, 3).astype(np.float64).mean(axis=0)


def check_effect(rows: list[list[str]], ori: Path, mem: Path) -> None:
    """The table beside the slider holds the gains and brightness of the two downloaded PNGs."""
    effect = dict(rows)
    o, m = png_means(ori), png_means(mem)
    assert [float(effect[f"gain_{c}"]) for c in "rgb"] == pytest.approx(m / o, abs=1e-4)
    assert (float(effect["ori_brightness"]), float(effect["mem_brightness"])) == pytest.approx((o.mean(), m.mean()), abs=0.01)
    assert 0 <= float(effect["recall_percentile"]) <= 100


def check_examples(client, url: str, examples: list[Path]) -> None:
    """Every example is offered (the /example endpoint hands back each one's pixels) and, in
    Chromium, shown as a thumbnail of its own file."""
    for i, path in enumerate(examples):
        got = client.predict(i, api_name="/example")
        assert np.array_equal(to_uint8(read_image(got)), to_uint8(read_image(path))), (i, path)
    browser = headless.find_browser()
    if browser is not None:
        dom = headless.dump_dom(browser, url, budget_ms=8000).stdout
        shown = [re.search(r"/([^/]+)$", src).group(1) for src in re.findall(r'<img[^>]*src="([^"]*)"', dom)
                 if "/gradio_api/file=" in src]
        assert shown == [p.name for p in examples]


def dropdowns(url: str) -> dict[str, list[list[str]]]:
    """Each dropdown's (label, value) choices, from the page's config."""
    with urllib.request.urlopen(url + "config", timeout=10) as f:
        config = json.load(f)
    return {c["props"]["label"]: c["props"]["choices"] for c in config["components"] if c.get("type") == "dropdown"}


def test_app_matches_test_py_and_survives_bad_uploads(tmp_path):
    """The app's ori and mem PNGs for a photo equal test.py's within 1 gray level, downloaded as
    `<photo>_ori.png` and `<photo>_mem.png`, with what the memory changed and recalled; all 7
    examples are offered as thumbnails; the dropdowns name the files with a hint, not a path; a
    non-image, an empty file and an over-size photo each get one clear message while the server
    keeps answering; the page renders in Chromium (screenshot)."""
    good = photo(tmp_path / "in" / "low" / "dark.png", 72, 96)
    examples = [photo(tmp_path / "examples" / f"ex{i}.png", 40, 56, seed=i) for i in range(7)]
    port = free_port()
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--weights", WEIGHTS, "--mem_weights",
                             MEMORY, "--device", "cpu", "--max_pixels", str(MAX_PIXELS), "--examples",
                             str(tmp_path / "examples")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ref = run_test_py("--weights", WEIGHTS, "--mem_weights", MEMORY, "--input_dir", good.parent.parent,
                          "--result_dir", tmp_path / "ref", "--save_images", "--device", "cpu")
        assert ref.returncode == 0, ref.stderr
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, proc)
        client = gradio_client.Client(url, verbose=False)

        def enhance(path: Path):
            return client.predict(gradio_client.handle_file(str(path)), WEIGHTS, MEMORY, api_name="/enhance")

        pair, effect, recalled, thumbs, files = enhance(good)
        assert [Path(p).name for p in files] == ["dark_ori.png", "dark_mem.png"]
        assert [Path(p).suffix for p in pair] == [".png", ".png"]
        for got, stage in zip(files, ("ori", "mem")):
            want = to_uint8(read_image(tmp_path / "ref" / stage / "dark.png"))
            diff = np.abs(to_uint8(read_image(got)).astype(int) - want)
            assert diff.max() <= 1, (stage, diff.max())
        check_effect(effect["data"], *files)
        assert len(recalled["data"]) >= 1 and all(0 <= score <= 1 and 0 <= rank <= 100
                                                  for _, score, rank in recalled["data"])
        check_examples(client, url, examples)
        choices = dropdowns(url)
        assert [label for label, _ in choices["enhancer"]] == [
            "dim32: the published size, eval15 21.3 dB", "small16: ~5x faster on a CPU, eval15 19.6 dB"]
        assert [value for _, value in choices["enhancer"]][1] == WEIGHTS
        assert all("/" not in label for label, _ in choices["memory"])
        assert MEMORY in [value for _, value in choices["memory"]]

        (tmp_path / "notes.png").write_text("not an image")
        (tmp_path / "empty.png").write_bytes(b"")
        bad = {tmp_path / "notes.png": "notes.png is not an image this demo can read",
               tmp_path / "empty.png": "empty.png is an empty file (0 bytes)",
               photo(tmp_path / "wide.png", 150, 200): "wide.png is 200x150 (0.0 megapixels), over this demo's limit"}
        for path, message in bad.items():
            with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
                enhance(path)
            assert proc.poll() is None
        again = enhance(good)[4]
        assert np.array_equal(to_uint8(read_image(again[1])), to_uint8(read_image(files[1])))

        browser = headless.find_browser()
        if browser is not None:  # the README's picture of the app (its layout, before a photo)
            shot = headless.screenshot(browser, url, tmp_path / "app.png", size=(1100, 800), budget_ms=8000)
            img = cv2.imread(str(shot))
            assert img is not None and img.std() > 5
            if os.environ.get("EMNET_SCREENSHOTS"):
                shutil.copy(shot, REPO / "docs" / "app.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
