"""`python app.py` (the Gradio demo), started on a free local port and called through gradio_client."""
from __future__ import annotations

import os
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


def test_app_matches_test_py_and_survives_bad_uploads(tmp_path):
    """The app's ori and mem PNGs for a photo equal test.py's within 1 gray level, with the
    memory's recalled entries; a non-image, an empty file and an over-size photo each get one
    clear message while the server keeps answering; the page renders in Chromium (screenshot)."""
    good = photo(tmp_path / "in" / "low" / "dark.png", 72, 96)
    port = free_port()
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--weights", WEIGHTS, "--mem_weights",
                             MEMORY, "--device", "cpu", "--max_pixels", str(MAX_PIXELS), "--examples",
                             str(good.parent)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        ref = run_test_py("--weights", WEIGHTS, "--mem_weights", MEMORY, "--input_dir", good.parent.parent,
                          "--result_dir", tmp_path / "ref", "--save_images", "--device", "cpu")
        assert ref.returncode == 0, ref.stderr
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, proc)
        client = gradio_client.Client(url, verbose=False)

        def enhance(path: Path):
            return client.predict(gradio_client.handle_file(str(path)), WEIGHTS, MEMORY, api_name="/enhance")

        pair, recalled, thumbs, files = enhance(good)
        assert len(files) == 2 and [Path(p).suffix for p in pair] == [".png", ".png"]
        for got, stage in zip(files, ("ori", "mem")):
            want = to_uint8(read_image(tmp_path / "ref" / stage / "dark.png"))
            diff = np.abs(to_uint8(read_image(got)).astype(int) - want)
            assert diff.max() <= 1, (stage, diff.max())
        assert len(recalled["data"]) >= 1 and all(0 <= score <= 1 for _, score in recalled["data"])

        (tmp_path / "notes.png").write_text("not an image")
        (tmp_path / "empty.png").write_bytes(b"")
        bad = {tmp_path / "notes.png": "notes.png is not an image this demo can read",
               tmp_path / "empty.png": "empty.png is an empty file (0 bytes)",
               photo(tmp_path / "wide.png", 150, 200): "wide.png is 200x150 (0.0 megapixels), over this demo's limit"}
        for path, message in bad.items():
            with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
                enhance(path)
            assert proc.poll() is None
        again = enhance(good)[3]
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
