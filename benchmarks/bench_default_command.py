"""What a user waits for: the default command's work against the original code's enhancer alone.

All run as whole processes (start-up, loading and image I/O included) on the same N images of an
LOL-style folder with the same bundled enhancer weights, one after the other:
- ours: `test.py` as `test_script.sh` runs it (the enhancer on the fast path, the bundled memory,
  metrics, `--pictures`);
- original: the enhancer as the original code computes it (Restormer's arch file, which EMNet's
  release uses), each image enhanced and written as a PNG, as the original test script does. It is
  models/enhancer.py's network with one difference that costs time: the original's "WithBias"
  LayerNorm reshapes (B, C, H, W) to (B, HW, C) and computes mean, variance, subtraction,
  division, scale and shift as separate ops, where ours calls the fused F.layer_norm;
- plain: models/enhancer.py's network as it is (fused LayerNorm, otherwise the original's ops),
  the stricter comparison.
Prints the wall times (medians over `--repeats` interleaved rounds), the two ratios, and the
largest 8-bit differences between our `ori` images run with --border_margin 0 and the other two's
outputs. `--bf16` adds a fourth run, ours with `--amp bf16` (the products in bf16: faster on CPUs
with bf16 instructions, not the default because scores move by a few hundredths of a dB).

    python benchmarks/bench_default_command.py --input_dir ../shared/data/LOL-v1/eval15 --images 3 --repeats 3
Set GLIBC_TUNABLES as test_script.sh does before timing on a Linux CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.pairing import find_pairs  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.bundled import BUNDLED_ENHANCER, BUNDLED_MEMORY  # noqa: E402
from utils.image_io import read_image, to_uint8  # noqa: E402

# argv: weights, input folder, output folder, "original" or "plain".
ENHANCE = """
import sys, torch
from pathlib import Path
from models import enhancer
from models.loading import load_enhancer
from utils.image_io import image_to_tensor, read_image, tensor_to_image, write_image

def original_layer_norm(self, x):
    # The original code: to_3d (b c h w -> b (h w) c), WithBias_LayerNorm, to_4d.
    b, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    mu = t.mean(-1, keepdim=True)
    sigma = t.var(-1, keepdim=True, unbiased=False)
    t = (t - mu) / torch.sqrt(sigma + 1e-5) * self.body.weight + self.body.bias
    return t.reshape(b, h, w, c).permute(0, 3, 1, 2)

if sys.argv[4] == "original":
    enhancer.ChannelLayerNorm.forward = original_layer_norm
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
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of the three runs, interleaved; medians are compared (a shared machine drifts)")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER))
    p.add_argument("--mem_weights", default=str(REPO / BUNDLED_MEMORY))
    p.add_argument("--bf16", action="store_true", help="also time ours with --amp bf16")
    args = p.parse_args()
    pairs = find_pairs(args.input_dir)[: args.images]
    times: dict[str, list[float]] = {"ours": [], "original": [], "plain": []} | ({"ours_bf16": []} if args.bf16 else {})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for side in ("low", "high"):
            (data / side).mkdir(parents=True)
            for pair in pairs:
                shutil.copy(getattr(pair, side), data / side / getattr(pair, side).name)
        ours = [sys.executable, "test.py", "--input_dir", str(data), "--weights", args.weights, "--mem_weights",
                args.mem_weights, "--pictures", "--device", "cpu"]
        for r in range(args.repeats):
            times["ours"].append(timed([*ours, "--result_dir", f"{tmp}/ours{r}"]))
            if args.bf16:
                times["ours_bf16"].append(timed([*ours, "--result_dir", f"{tmp}/bf16_{r}", "--amp", "bf16"]))
            for kind in ("original", "plain"):
                times[kind].append(timed([sys.executable, "-c", ENHANCE, args.weights, str(data / "low"),
                                          f"{tmp}/{kind}", kind]))
        subprocess.run([sys.executable, "test.py", "--input_dir", str(data), "--result_dir", f"{tmp}/m0",
                        "--weights", args.weights, "--device", "cpu", "--border_margin", "0", "--save_images"],
                       cwd=REPO, check=True, capture_output=True)
        diffs = {kind: max(int(np.abs(to_uint8(read_image(f"{tmp}/m0/ori/{p.name}.png")).astype(int)
                                      - to_uint8(read_image(f"{tmp}/{kind}/{p.name}.png")).astype(int)).max())
                           for p in pairs) for kind in ("original", "plain")}
    median = {kind: statistics.median(ts) for kind, ts in times.items()}
    bf16 = {"ours_amp_bf16_sec": round(median["ours_bf16"], 1),
            "speedup_amp_bf16_vs_original": round(median["original"] / median["ours_bf16"], 2)} if args.bf16 else {}
    print(json.dumps({"images": len(pairs), "repeats": args.repeats,
                      "ours_default_command_sec": round(median["ours"], 1),
                      "original_code_enhancer_alone_sec": round(median["original"], 1),
                      "plain_enhancer_alone_sec": round(median["plain"], 1),
                      "speedup_vs_original": round(median["original"] / median["ours"], 2),
                      "speedup_vs_plain": round(median["plain"] / median["ours"], 2), **bf16,
                      "all_sec": {kind: [round(t, 1) for t in ts] for kind, ts in times.items()},
                      "max_8bit_difference_margin0_vs_original": diffs["original"],
                      "max_8bit_difference_margin0_vs_plain": diffs["plain"]}))


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    main()
