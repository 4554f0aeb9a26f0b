"""Load time of the results page (index.html) for a folder of N photos, in headless Chromium.

Builds a synthetic test.py --pictures folder (N photos of WxH with ori, mem, low and ground
truth, as utils/pictures.py writes it), then opens index.html from file:// several times and
reports the time from navigation to the load event (`data-load-ms`, measured by the page) and
the browser's wall time. Example:

    python benchmarks/bench_page.py --photos 100 --size 600x400
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.pairing import find_pairs  # noqa: E402
from utils import headless  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.image_io import write_image  # noqa: E402
from utils.pictures import write_pictures  # noqa: E402
from utils.report import write_report  # noqa: E402


def photo(rng: np.random.Generator, w: int, h: int, gain: float) -> np.ndarray:
    coarse = rng.random((6, 8, 3)).astype(np.float32) * 255 * gain
    return np.clip(cv2.resize(coarse, (w, h)) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def build(root: Path, n: int, w: int, h: int) -> Path:
    """A result folder of `n` photos as test.py --pictures leaves it; returns index.html."""
    rng = np.random.default_rng(0)
    for folder in ("data/low", "data/high", "res/ori", "res/mem"):
        (root / folder).mkdir(parents=True)
    rows = []
    for i in range(1, n + 1):
        write_image(root / "data" / "low" / f"{i}.png", photo(rng, w, h, 0.2))
        write_image(root / "data" / "high" / f"{i}.png", photo(rng, w, h, 1.0))
        row = {"name": str(i)}
        for stage in ("ori", "mem"):
            write_image(root / "res" / stage / f"{i}.png", photo(rng, w, h, 0.8))
            row[f"{stage}_psnr"] = float(rng.normal(20, 2))
        rows.append(row)
    columns = ["ori_psnr", "mem_psnr"]
    summary = write_report(root / "res", rows, columns, {})
    return write_pictures(root / "res", find_pairs(root / "data"), rows, columns, summary)


def main(args: argparse.Namespace) -> None:
    browser = headless.find_browser()
    if browser is None:
        raise UserError("no chromium on PATH: apt-get install chromium")
    w, h = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        page = build(Path(tmp), args.photos, w, h)
        print(f"built {args.photos} photos of {w}x{h} and the page in {time.perf_counter() - start:.1f} s")
        load, wall = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            proc = headless.dump_dom(browser, page.as_uri(), budget_ms=None)
            wall.append(time.perf_counter() - start)
            found = re.search(r'data-load-ms="([\d.]+)"', proc.stdout)
            if not found:
                raise UserError(f"the page reported no load time: {proc.stderr[-500:]}")
            load.append(float(found.group(1)))
        print(f"load event after {statistics.median(load):.0f} ms (median of {args.repeats}; "
              f"min {min(load):.0f}, max {max(load):.0f}); browser start to DOM dump {statistics.median(wall):.2f} s")


if __name__ == "__main__":
    tune_allocator()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=100)
    p.add_argument("--size", default="600x400", help="WxH of each photo")
    p.add_argument("--repeats", type=int, default=5)
    run_cli(lambda: main(p.parse_args()))
