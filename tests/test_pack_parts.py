"""dataset/pack_parts.py: parts under the size limit, every pair whole and exactly once, pixels
unchanged, and the merged parts pair up as the original folder did."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import run_script
from dataset.pack_parts import pack_parts
from dataset.pairing import find_pairs
from utils.errors import UserError
from utils.image_io import read_image

NAMES = ("1", "12", "2", "30", "7")


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_parts_hold_every_pair_once_within_the_limit(make_pairs, tmp_path):
    src = make_pairs(names=NAMES, size=(40, 56), high_ext=".webp")
    pair_bytes = max(folder_bytes(part) for part, _, _ in pack_parts(src, tmp_path / "probe", 2**30))
    limit = int(pair_bytes / len(NAMES) * 2.5)  # about two pairs per part
    parts = pack_parts(src, tmp_path / "parts", limit)
    assert len(parts) >= 2
    seen = []
    for folder, count, size in parts:
        assert folder_bytes(folder) == size <= limit
        names = [p.name for p in find_pairs(folder)]
        assert len(names) == count
        seen += names
    assert sorted(seen) == sorted(NAMES)
    merged = tmp_path / "merged"
    for folder, _, _ in parts:
        for side in ("low", "high"):
            shutil.copytree(folder / side, merged / side, dirs_exist_ok=True)
    for original, copy in zip(find_pairs(src), find_pairs(merged)):
        assert original.name == copy.name
        assert copy.low.suffix == ".webp"
        np.testing.assert_array_equal(read_image(copy.low), read_image(original.low))
        np.testing.assert_array_equal(read_image(copy.high), read_image(original.high))
        assert copy.high.read_bytes() == original.high.read_bytes()  # WebP sources are copied as they are


def test_a_pair_larger_than_a_part_and_existing_parts_are_refused(make_pairs, tmp_path):
    src = make_pairs(names=("1", "2"), size=(40, 56))
    with pytest.raises(UserError, match="pair 1 alone takes .* raise --max_mib"):
        pack_parts(src, tmp_path / "small", 1000)
    pack_parts(src, tmp_path / "parts", 2**30)
    with pytest.raises(UserError, match="already holds parts"):
        pack_parts(src, tmp_path / "parts", 2**30)


def test_cli_reports_the_parts(make_pairs, tmp_path):
    src = make_pairs(names=("1", "2"), size=(16, 24))
    done = run_script("-m", "dataset.pack_parts", "--input_dir", src, "--out_dir", tmp_path / "parts")
    assert done.returncode == 0, done.stderr
    assert "2 pairs in 1 parts" in done.stdout
    bad = run_script("-m", "dataset.pack_parts", "--input_dir", tmp_path / "missing", "--out_dir", tmp_path / "p2")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
