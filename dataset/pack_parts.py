"""Split a LOL-style folder into parts of at most N MiB, as lossless WebP, for machines that take
uploads in limited pieces (a rented GPU behind a 64 MiB transfer limit, say).

Each part is a LOL-style folder (`part_00/low/`, `part_00/high/`) and keeps every pair whole;
parts are filled in name order. PNG, BMP or TIFF images are re-encoded as lossless WebP (about a
quarter smaller than LOL's PNGs) and decoded again to check that every pixel is unchanged;
WebP and JPEG files are copied byte for byte. Copying the parts' `low/` and `high/` into one folder
gives back the whole set, which the loaders pair by file name as usual:

    python -m dataset.pack_parts --input_dir ../shared/data/LOL-v1/our485 --out_dir .gpu_data --max_mib 60
    # on the other machine, for each part:  mkdir -p D/low D/high && cp part_00/low/* D/low/ && cp part_00/high/* D/high/
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from dataset.pairing import find_pairs
from utils.atomic import atomic_write
from utils.errors import UserError, run_cli
from utils.image_io import decode_stored

KEPT_AS_IS = (".webp", ".jpg", ".jpeg")  # already compressed: re-encoding would not shrink them losslessly


def lossless_bytes(path: Path) -> tuple[bytes, str]:
    """The file's image as (bytes, extension): lossless WebP, checked pixel for pixel, or the file
    itself where it is already WebP or JPEG."""
    raw = path.read_bytes()
    if path.suffix.lower() in KEPT_AS_IS:
        return raw, path.suffix.lower()
    img = decode_stored(path)
    ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # above 100: lossless
    back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
    if back is None or back.shape != img.shape or not np.array_equal(back, img):
        return raw, path.suffix.lower()  # WebP cannot hold it exactly (16-bit, say): keep the original
    return buf.tobytes(), ".webp"


def pack_parts(input_dir: str | Path, out_dir: str | Path, max_bytes: int) -> list[tuple[Path, int, int]]:
    """Write the pairs of `input_dir` into `out_dir/part_NN/{low,high}/`, each part at most
    `max_bytes`. Returns (part folder, pairs, bytes) for every part."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("part_*")):
        raise UserError(f"{out_dir} already holds parts; remove them or choose another --out_dir")
    parts: list[tuple[Path, int, int]] = []
    part, pairs, size = None, 0, 0
    for pair in find_pairs(input_dir):
        files = [(side, pair_path, *lossless_bytes(pair_path)) for side, pair_path in (("low", pair.low), ("high", pair.high))]
        pair_size = sum(len(data) for _, _, data, _ in files)
        if pair_size > max_bytes:
            raise UserError(f"the pair {pair.name} alone takes {pair_size / 2**20:.1f} MiB, more than "
                            f"--max_mib {max_bytes / 2**20:g}; raise --max_mib")
        if part is None or size + pair_size > max_bytes:
            if part is not None:
                parts.append((part, pairs, size))
            part, pairs, size = out_dir / f"part_{len(parts):02d}", 0, 0
        for side, source, data, ext in files:
            (part / side).mkdir(parents=True, exist_ok=True)
            atomic_write(part / side / (source.stem + ext), data)
        pairs, size = pairs + 1, size + pair_size
    if part is not None:
        parts.append((part, pairs, size))
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_dir", required=True, help="LOL-style folder (low/ + high/) to split")
    p.add_argument("--out_dir", required=True, help="where part_00, part_01, ... are written")
    p.add_argument("--max_mib", type=float, default=60.0, help="largest size of one part in MiB")
    args = p.parse_args()
    parts = pack_parts(args.input_dir, args.out_dir, int(args.max_mib * 2**20))
    for folder, pairs, size in parts:
        print(f"{folder}: {pairs} pairs, {size / 2**20:.1f} MiB")
    print(f"{sum(n for _, n, _ in parts)} pairs in {len(parts)} parts")


if __name__ == "__main__":
    run_cli(main)
