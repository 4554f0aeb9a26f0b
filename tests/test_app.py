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
import torch
import torch.nn.functional as F

from conftest import GLIBC_TUNABLES, REPO, SMALL16_MEMORY, SMALL16_WEIGHTS, png_means, write_png
from models.inference import BORDER_MARGIN
from models.loading import load_enhancer, load_memory
from models.memory import refine_with_memory
from utils import headless
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8

gradio_client = pytest.importorskip("gradio_client", reason="the demo's requirements are not installed: "
                                    "pip install -r requirements-demo.txt")
pytest.importorskip("gradio", reason="the demo's requirements are not installed: pip install -r requirements-demo.txt")

WEIGHTS, MEMORY = SMALL16_WEIGHTS, SMALL16_MEMORY
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


def plain_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ori and mem (uint8) of the photo at `path`, made here without the app's path (models.photo,
    models.evaluate, models.refiner, the fast path): the plain network (`forward_features`,
    `forward_head`) on the input reflected by the default border margin; the memory's
    enhancer_levels query of those features (per level, mean and std over space, each level
    L2-normalised, then the whole); the value of the best-scoring written slot (top_k 1); and
    `refine_with_memory` as the memory's stored read says. The file stores no abstention bounds,
    so the memory corrects every image (`models.abstention.decide` with no bound)."""
    model, _ = load_enhancer(REPO / WEIGHTS)
    memory, ckpt = load_memory(REPO / MEMORY)
    read = ckpt["read"]
    assert (ckpt["query_encoder"], ckpt["head_state_dict"], read["top_k"]) == ("enhancer_levels", None, 1)
    assert read.get("min_score") is None and read.get("min_scene") is None, \
        f"{MEMORY} now abstains by its stored bounds: decide here as models/abstention.py does"
    x = image_to_tensor(read_image(path))
    m, (h, w) = BORDER_MARGIN, x.shape[-2:]
    padded = F.pad(x, (m, m, m, m), mode="reflect")
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0, "pick a photo size that needs no pad to 8"
    with torch.no_grad():
        features = model.forward_features(padded)
        ori = model.forward_head(padded, features)[..., m:m + h, m:m + w].clamp(0, 1)
        levels = [torch.cat([f.flatten(2).mean(2), f.flatten(2).std(2, unbiased=False)], dim=1) for f in features]
        query = F.normalize(torch.cat([F.normalize(v, dim=1) for v in levels], dim=1), dim=1)[0]
        written = memory.top_index >= 0
        recalled = memory.value[written][(memory.key[written] @ query).argmax()]
        mem = refine_with_memory(ori, recalled[None], memory.config.pooling_size, read["pooling_mean"],
                                 read["strength"])
    return to_uint8(tensor_to_image(ori)), to_uint8(tensor_to_image(mem))


def check_outputs(files: list[str], reference: tuple[np.ndarray, np.ndarray]) -> None:
    """The app's downloaded ori and mem PNGs equal `plain_reference` within 1 grey level: the app
    runs the fast path (models/fast), equal to the plain network within tests/test_fast_forward's
    1e-4, far under half a grey level (1/510), so rounding to uint8 (`to_uint8`) can move a value
    by one level where it lies that close to a half step, never by two. The memory changes this
    photo by more than that, so an app that skips the correction fails here."""
    ori, mem = reference
    assert np.abs(mem.astype(int) - ori).max() > 1, "the memory leaves this photo as it is: pick another"
    for got, stage, want in zip(files, ("ori", "mem"), reference):
        diff = np.abs(to_uint8(read_image(got)).astype(int) - want)
        worst = int(diff.max())
        assert worst <= 1, f"{stage}: {(diff > 1).sum()} pixels off the plain network, by up to {worst}"



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


def test_app_matches_the_plain_network_and_survives_bad_uploads(tmp_path):
    """The app's ori and mem PNGs for a photo equal `plain_reference` within 1 grey level, downloaded
    as `<photo>_ori.png` and `<photo>_mem.png`, with what the memory changed and recalled; all 7
    examples are offered as thumbnails; the dropdowns name the files with a hint, not a path; a
    non-image, an empty file and an over-size photo each get one clear message while the server
    keeps answering; the page renders in Chromium (screenshot)."""
    good = photo(tmp_path / "dark.png", 72, 96)
    examples = [photo(tmp_path / "examples" / f"ex{i}.png", 40, 56, seed=i) for i in range(7)]
    port = free_port()
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--weights", WEIGHTS, "--mem_weights",
                             MEMORY, "--device", "cpu", "--max_pixels", str(MAX_PIXELS), "--examples",
                             str(tmp_path / "examples")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        reference = plain_reference(good)  # while app.py starts
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, proc)
        client = gradio_client.Client(url, verbose=False)

        def enhance(path: Path):
            return client.predict(gradio_client.handle_file(str(path)), WEIGHTS, MEMORY, api_name="/enhance")

        pair, effect, recalled, thumbs, files = enhance(good)
        assert [Path(p).name for p in files] == ["dark_ori.png", "dark_mem.png"]
        assert [Path(p).suffix for p in pair] == [".png", ".png"]
        check_outputs(files, reference)
        check_effect(effect["data"], *files)
        assert len(recalled["data"]) >= 1 and all(0 <= score <= 1 and 0 <= rank <= 100
                                                  for _, score, rank in recalled["data"])
        check_examples(client, url, examples)
        choices = dropdowns(url)
        card = json.loads((REPO / "pre_trained_logs" / "model_card.json").read_text())["eval15"]
        psnr = {Path(e["weights"]).name: e["mean"]["ori_psnr"] for e in card}
        assert [label for label, _ in choices["enhancer"]] == [
            f"dim32: the published size, eval15 {psnr['emnet_dim32_lolv1_h200_bf16.pth']:.1f} dB",
            f"small16: ~5x faster on a CPU, eval15 {psnr['emnet_small16_lolv1_cpu.pth']:.1f} dB"]
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
