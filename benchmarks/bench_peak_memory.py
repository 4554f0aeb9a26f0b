"""Peak memory of the default command: `test.py` with the bundled enhancer and memory, as a whole
process, on each image alone and on all of them as one folder.

Each run is a child process; its peak resident set size comes from the kernel (os.wait4), so
start-up, weights, the forward and the heap's fragmentation across image sizes all count.

    python benchmarks/bench_peak_memory.py --images /tmp/photos/a.jpg /tmp/photos/b.jpg
    python benchmarks/bench_peak_memory.py --images ../shared/data/LOL-v1/eval15/low/1.png --resize 4000x3000
    python benchmarks/bench_peak_memory.py --folder ../shared/data/LOL-v1/eval15 --folder_only
Set GLIBC_TUNABLES as test_script.sh does: the default command runs with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.bundled import BUNDLED_ENHANCER, BUNDLED_MEMORY  # noqa: E402


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of `cmd` run as a child in the repo root."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 2**20, seconds  # Linux reports KiB


def default_command(input_path: Path, result_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "test.py", "--input_dir", str(input_path), "--result_dir", str(result_dir),
            "--weights", BUNDLED_ENHANCER, "--mem_weights", BUNDLED_MEMORY, "--pictures", "--device", "cpu", *extra]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="*", default=[], help="image files, run alone and as one folder")
    p.add_argument("--folder", default=None, help="a folder (LOL-style or flat) run as a whole")
    p.add_argument("--folder_only", action="store_true", help="skip the runs of single images")
    p.add_argument("--resize", default=None, help="WxH: every --images file resized to this size first")
    p.add_argument("--extra", default="", help="more test.py flags, e.g. '--max_memory 2'")
    args = p.parse_args()
    extra = args.extra.split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        for path in map(Path, args.images):
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f"cannot read {path}")
            if args.resize:
                w, h = map(int, args.resize.lower().split("x"))
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(folder / f"{path.stem}.png"), img)
        inputs = [] if args.folder_only else sorted(folder.iterdir())
        if args.images:
            inputs.append(folder)
        if args.folder:
            inputs.append(Path(args.folder))
        for i, item in enumerate(inputs):
            gb, sec = peak_of(default_command(item, tmp / f"r{i}", extra))
            size = "x".join(map(str, cv2.imread(str(item)).shape[1::-1])) if item.is_file() else "folder"
            rows.append({"input": item.name, "size": size, "peak_rss_gb": round(gb, 2), "seconds": round(sec, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"# test.py with the bundled enhancer and memory, --pictures, {os.cpu_count()} CPUs, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}, extra flags: {args.extra or '(none)'}")


if __name__ == "__main__":
    main()
