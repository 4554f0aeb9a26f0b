"""What a user waits for: the default command's work against the original code's enhancer alone.

Both run as whole processes (start-up, loading and image I/O included) on the same N images of an
LOL-style folder with the same bundled enhancer weights, one after the other:
- ours: `test.py` as `test_script.sh` runs it (the enhancer on the fast path, the bundled memory,
  metrics, `--pictures`);
- original: the plain network of models/enhancer.py (the original code's formulation, no border
  margin), each image enhanced and written as a PNG, as the original test script does.
Prints both wall times, their ratio, and the largest 8-bit difference between our `ori` images
run with --border_margin 0 and the original's outputs.

    python benchmarks/bench_default_command.py --input_dir ../shared/data/LOL-v1/eval15 --images 3
Set GLIBC_TUNABLES as test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.pairing import find_pairs  # noqa: E402
from models.options import BUNDLED_ENHANCER, BUNDLED_MEMORY  # noqa: E402
from utils.image_io import read_image, to_uint8  # noqa: E402

ORIGINAL = """
import sys, torch
from pathlib import Path
from models.loading import load_enhancer
from utils.image_io import image_to_tensor, read_image, tensor_to_image, write_image
model, _ = load_enhancer(sys.argv[1])
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    for path in sorted(Path(sys.argv[2]).iterdir()):
        y = model(image_to_tensor(read_image(path))).clamp(0, 1)
        write_image(out / (path.stem + ".png"), tensor_to_image(y))
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="LOL-style folder (sizes multiples of 8, e.g. eval15)")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER))
    p.add_argument("--mem_weights", default=str(REPO / BUNDLED_MEMORY))
    args = p.parse_args()
    pairs = find_pairs(args.input_dir)[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for side in ("low", "high"):
            (data / side).mkdir(parents=True)
            for pair in pairs:
                shutil.copy(getattr(pair, side), data / side / getattr(pair, side).name)
        ours = timed([sys.executable, "test.py", "--input_dir", str(data), "--result_dir", f"{tmp}/ours",
                      "--weights", args.weights, "--mem_weights", args.mem_weights, "--pictures", "--device", "cpu"])
        original = timed([sys.executable, "-c", ORIGINAL, args.weights, str(data / "low"), f"{tmp}/original"])
        subprocess.run([sys.executable, "test.py", "--input_dir", str(data), "--result_dir", f"{tmp}/m0",
                        "--weights", args.weights, "--device", "cpu", "--border_margin", "0", "--save_images"],
                       cwd=REPO, check=True, capture_output=True)
        diff = max(int(np.abs(to_uint8(read_image(f"{tmp}/m0/ori/{p.name}.png")).astype(int)
                              - to_uint8(read_image(f"{tmp}/original/{p.name}.png")).astype(int)).max())
                   for p in pairs)
    print(json.dumps({"images": len(pairs), "ours_default_command_sec": round(ours, 1),
                      "original_enhancer_alone_sec": round(original, 1), "speedup": round(original / ours, 2),
                      "max_8bit_difference_margin0_vs_original": diff}))


if __name__ == "__main__":
    main()
