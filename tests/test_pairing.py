"""dataset/pairing.py: finding the low/high pairs in a folder (names, prefixes, extensions, the
errors of a bad folder) and the deterministic validation split."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import random_rgb, write_png
from dataset.paired_folder import read_pair
from dataset.pairing import ImagePair, find_pairs, is_validation_pair, pair_key, split_pairs
from utils.errors import UserError


def _touch_images(folder: Path, names: list[str], size=(4, 4)) -> None:
    for i, n in enumerate(names):
        path = folder / n
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(Path(n).suffix, random_rgb(i, size))
        assert ok
        path.write_bytes(buf.tobytes())


# ----------------------------------------------------------------------------- find_pairs

def test_find_pairs_low_high(make_pairs):
    """LOL-v1 layout: pairs sorted by name, the two files of a pair have the same name."""
    root = make_pairs(names=("1", "2", "10"))
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["1", "10", "2"]
    for p in pairs:
        assert p.low == root / "low" / f"{p.name}.png"
        assert p.high == root / "high" / f"{p.name}.png"


@pytest.mark.parametrize("low, high", [("Low", "Normal"), ("LOW", "HIGH"), ("low", "NORMAL"),
                                       ("Low", "high")])
def test_find_pairs_folder_names_any_case(make_pairs, low, high):
    """LOL-v2's Low/Normal and any capitalisation of low/high are accepted."""
    root = make_pairs(names=("3", "4"), low_dir=low, high_dir=high)
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["3", "4"]
    assert all(p.low.parent.name == low and p.high.parent.name == high for p in pairs)


@pytest.mark.parametrize("high_names", [("normal00690", "normal00701"), ("00690", "00701")])
def test_find_pairs_lolv2_prefixes(make_pairs, high_names):
    """low00690.png pairs with normal00690.png and with 00690.png."""
    root = make_pairs(names=("low00690", "low00701"), low_dir="Low", high_dir="Normal",
                      high_names=high_names)
    pairs = find_pairs(root)
    assert [(p.name, p.high.stem) for p in pairs] == list(zip(("low00690", "low00701"), high_names))


def test_pair_key():
    """The shared key drops LOL-v2's prefixes (any case) but only in front of digits."""
    assert pair_key(Path("low00690.png")) == "00690"
    assert pair_key(Path("Normal00690.jpg")) == "00690"
    assert pair_key(Path("00690.png")) == "00690"
    assert pair_key(Path("lowlight.png")) == "lowlight"
    assert pair_key(Path("high_12.png")) == "12"


def test_find_pairs_by_name_not_sort_order(tmp_path):
    """Pairs are matched by name, never by position: the two folders sort differently here
    (['1', '2'] vs ['2', 'normal1']) and each pair's images still belong together."""
    root = tmp_path / "d"
    for i, (low_name, high_name) in enumerate([("1", "normal1"), ("2", "2"), ("10", "normal10")]):
        low = random_rgb(i)
        write_png(root / "low" / f"{low_name}.png", low)
        write_png(root / "high" / f"{high_name}.png", 255 - low)
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["1", "10", "2"]
    for p in pairs:
        assert pair_key(p.low) == pair_key(p.high)
        low, high = read_pair(p)
        np.testing.assert_allclose(high, 1 - low, atol=1e-6)


def test_find_pairs_by_name_with_numeric_names(tmp_path):
    """low 2.png, 10.png / high 10.png, 2.png (created in the other order): same-name pairs."""
    root = tmp_path / "d"
    _touch_images(root / "low", ["2.png", "10.png"])
    _touch_images(root / "high", ["10.png", "2.png"])
    pairs = find_pairs(root)
    assert len(pairs) == 2
    assert all(p.low.name == p.high.name for p in pairs)


def test_find_pairs_mixed_extensions(make_pairs):
    """A png low image pairs with a jpg ground truth of the same name."""
    root = make_pairs(names=("5", "6"), ext=".png", high_ext=".jpg")
    pairs = find_pairs(root)
    assert [(p.low.suffix, p.high.suffix) for p in pairs] == [(".png", ".jpg")] * 2


def test_find_pairs_ignores_non_images(make_pairs):
    """Files that are not images (notes, hidden files) are neither paired nor reported."""
    root = make_pairs(names=("1",))
    (root / "low" / "README.txt").write_text("x")
    (root / "high" / "notes.md").write_text("x")
    assert [p.name for p in find_pairs(root)] == ["1"]


@pytest.mark.parametrize("side", ["low", "high"])
def test_unpaired_file_is_user_error(make_pairs, side):
    """An image without a partner is a UserError naming that file."""
    root = make_pairs(names=("1", "2"))
    extra = root / side / "7.png"
    write_png(extra, random_rgb(0))
    with pytest.raises(UserError, match=re.escape(str(extra))):
        find_pairs(root)


def test_many_unpaired_are_counted(make_pairs):
    """With many unpaired files, the message names some and counts the rest."""
    root = make_pairs(names=("1",))
    _touch_images(root / "low", [f"{i}.png" for i in range(2, 8)])
    with pytest.raises(UserError, match="and 3 more"):
        find_pairs(root)


def test_duplicate_key_is_user_error(make_pairs):
    """1.png and 1.jpg in one folder would pair ambiguously: a UserError naming both."""
    root = make_pairs(names=("1",))
    _touch_images(root / "low", ["1.jpg"])
    with pytest.raises(UserError) as err:
        find_pairs(root)
    assert str(root / "low" / "1.png") in str(err.value) and str(root / "low" / "1.jpg") in str(err.value)


def test_missing_input_dir_is_user_error(tmp_path):
    """A folder that does not exist is a UserError naming it (with and without require_high)."""
    for require_high in (True, False):
        with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope"))):
            find_pairs(tmp_path / "nope", require_high=require_high)


def test_empty_low_dir_is_user_error(tmp_path):
    """low/ without images is a UserError naming low/."""
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    for require_high in (True, False):
        with pytest.raises(UserError, match=re.escape(str(tmp_path / "low"))):
            find_pairs(tmp_path, require_high=require_high)


def test_missing_subfolders_are_user_errors(make_pairs, tmp_path):
    """Training needs both folders: no low/ or no high/ is a UserError."""
    root = make_pairs(names=("1",), high_dir=None)
    with pytest.raises(UserError, match="high"):
        find_pairs(root)
    flat = tmp_path / "flat"
    _touch_images(flat, ["1.png"])
    with pytest.raises(UserError, match="low"):
        find_pairs(flat)


def test_high_folder_alone_names_the_missing_low(make_pairs):
    """A folder with high/ only (test.py's case, which takes folders without ground truth) is an
    error naming the low/ it lacks, not "no images"."""
    root = make_pairs(names=("1",), low_dir="high", high_dir=None)
    with pytest.raises(UserError) as err:
        find_pairs(root, require_high=False)
    assert str(root / "low") in str(err.value) and "no images" not in str(err.value)


def test_dataset_root_suggests_its_pair_folders(make_pairs, tmp_path):
    """A dataset's root instead of one of its folders: the error names the sub-folders that hold
    low/ (two levels deep, as LOL-v2's Real_captured/Test) and the flag to pass one with."""
    lol = tmp_path / "LOL-v1"
    lol.mkdir()
    for name in ("eval15", "our485"):
        make_pairs(names=("1",)).rename(lol / name)
    (lol / "notes").mkdir()
    for require_high, flag in ((False, "--input_dir"), (True, "--train_dir")):
        with pytest.raises(UserError) as err:
            find_pairs(lol, require_high=require_high, flag=flag)
        assert "eval15, our485" in str(err.value) and f"{flag} {lol / 'eval15'}" in str(err.value)
    v2 = tmp_path / "LOL-v2"
    (v2 / "Real_captured").mkdir(parents=True)
    make_pairs(names=("1",), low_dir="Low", high_dir="Normal").rename(v2 / "Real_captured" / "Test")
    with pytest.raises(UserError, match=re.escape(str(Path("Real_captured") / "Test"))):
        find_pairs(v2, require_high=False)


def test_no_high_folder_without_require_high(make_pairs):
    """require_high=False: low/ alone gives pairs whose high is None."""
    root = make_pairs(names=("1", "2"), high_dir=None)
    pairs = find_pairs(root, require_high=False)
    assert [(p.name, p.low, p.high) for p in pairs] == [
        ("1", root / "low" / "1.png", None), ("2", root / "low" / "2.png", None)]


def test_flat_folder_without_require_high(tmp_path):
    """require_high=False: a flat folder of images is enhanced as is; other files are ignored."""
    _touch_images(tmp_path, ["b.png", "a.jpg"])
    (tmp_path / "notes.txt").write_text("x")
    pairs = find_pairs(tmp_path, require_high=False)
    assert [(p.name, p.low.name, p.high) for p in pairs] == [("a", "a.jpg", None), ("b", "b.png", None)]


# ----------------------------------------------------------------------------- validation split

SYNTHETIC_NAMES = [str(i) for i in range(1, 486)]


def _pairs(names):
    return [ImagePair(n, Path(f"low/{n}.png"), Path(f"high/{n}.png")) for n in names]


@pytest.fixture(params=["synthetic", "lol"])
def train_names(request):
    if request.param == "synthetic":
        return SYNTHETIC_NAMES
    root = request.getfixturevalue("lol_root")
    names = sorted(p.stem for p in (root / "our485" / "low").iterdir())
    assert len(names) > 100
    return names


@pytest.mark.parametrize("percent", [10.0, 20.0])
def test_split_share_disjoint_complete(train_names, percent):
    """split_pairs is disjoint, covers every pair and holds out about the requested share."""
    pairs = _pairs(train_names)
    train, val = split_pairs(pairs, percent)
    assert {p.name for p in train}.isdisjoint({p.name for p in val})
    assert sorted(p.name for p in train + val) == sorted(train_names)
    share = len(val) / len(pairs)
    assert abs(share - percent / 100) < 0.05, share
    assert train and val


def test_split_is_deterministic(train_names):
    """The same names always give the same split (no RNG, no hash seed)."""
    a = split_pairs(_pairs(train_names), 10)
    b = split_pairs(_pairs(list(reversed(train_names))), 10)
    assert {p.name for p in a[1]} == {p.name for p in b[1]}
    assert [p.name for p in a[1]] == [p.name for p in _pairs(train_names) if p in a[1]]  # order kept


def test_split_membership_independent_of_other_names(train_names):
    """A name stays on its side when other pairs are added or removed."""
    full_val = {p.name for p in split_pairs(_pairs(train_names), 10)[1]}
    subset = train_names[::3]
    sub_val = {p.name for p in split_pairs(_pairs(subset), 10)[1]}
    assert sub_val == full_val & set(subset)
    for n in train_names[:50]:
        assert (n in full_val) == is_validation_pair(n, 10)
        assert split_pairs(_pairs([n]), 10)[1] == ([] if n not in full_val else _pairs([n]))


def test_split_extremes_and_nesting():
    """0% holds out nothing, 100% everything, and a larger share contains a smaller one."""
    pairs = _pairs(SYNTHETIC_NAMES)
    assert split_pairs(pairs, 0)[1] == []
    assert split_pairs(pairs, 100)[0] == []
    v10 = {p.name for p in split_pairs(pairs, 10)[1]}
    v20 = {p.name for p in split_pairs(pairs, 20)[1]}
    assert v10 < v20


def test_split_lolv2_prefix_does_not_matter():
    """low00690, normal00690 and 00690 are one pair, so they fall on the same side."""
    for i in range(600, 700):
        n = f"{i:05d}"
        assert is_validation_pair(f"low{n}", 30) == is_validation_pair(n, 30) == is_validation_pair(f"normal{n}", 30)


def test_split_known_values():
    """The rule is SHA-1 of the key mod 10000 < percent * 100 (pinned so the split never drifts
    between versions: a changed rule would silently move validation images into training)."""
    import hashlib
    for n in SYNTHETIC_NAMES:
        expect = int(hashlib.sha1(n.encode()).hexdigest(), 16) % 10000 < 1000
        assert is_validation_pair(n, 10) == expect


def test_split_names_with_dots():
    """Names containing dots are split like any other name (the key is the whole name)."""
    names = [f"scene.{i:03d}" for i in range(200)]
    val = [n for n in names if is_validation_pair(n, 10)]
    assert 0 < len(val) < len(names)


def test_a_single_image_file_is_one_pair_without_ground_truth(make_pairs):
    """test.py --input_dir may name one image: one pair, no ground truth; training still needs
    folders."""
    root = make_pairs(names=("7",), high_dir=None)
    image = root / "low" / "7.png"
    (pair,) = find_pairs(image, require_high=False)
    assert (pair.name, pair.low, pair.high) == ("7", image, None)
    with pytest.raises(UserError, match="is a file"):
        find_pairs(image)
