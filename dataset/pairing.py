"""Find low/normal-light image pairs in a LOL-style folder.

Accepted layouts (folder names in any case): `low/` + `high/` (LOL-v1) and `Low/` + `Normal/`
(LOL-v2). Images pair by file *name*, never by sort order: `12.png` ~ `12.png`, and LOL-v2's
`low00690.png` ~ `normal00690.png` (also against `00690.png`). Extensions may differ.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.image_io import is_image_file

LOW_NAMES = ("low",)
HIGH_NAMES = ("high", "normal")
_PREFIX = re.compile(r"^(low|normal|high)[_-]?(?=\d)", re.IGNORECASE)


@dataclass(frozen=True)
class ImagePair:
    """One training or test sample; `name` is the low image's file stem."""

    name: str
    low: Path
    high: Path | None


def _subfolder(root: Path, names: tuple[str, ...]) -> Path | None:
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def pair_key(path: Path) -> str:
    """The name two files of a pair share: the stem without LOL-v2's `low`/`normal` prefix."""
    return name_key(path.stem)


def name_key(stem: str) -> str:
    """A file stem without LOL-v2's `low`/`normal` prefix, lower-cased."""
    return _PREFIX.sub("", stem).lower()


def _images_by_key(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and is_image_file(f):
            key = pair_key(f)
            if key in found:
                raise UserError(f"{found[key]} and {f} both pair as {key!r}; keep one of them")
            found[key] = f
    return found


def paired_subfolders(root: Path, depth: int = 2) -> list[Path]:
    """The folders under `root`, at most `depth` levels down, that hold a `low/` subfolder: what
    to pass instead of a dataset's root (LOL-v1's eval15/ and our485/, LOL-v2's Real_captured/Test)."""
    found = []
    for child in sorted(c for c in root.iterdir() if c.is_dir()):
        if _subfolder(child, LOW_NAMES) is not None:
            found.append(child)
        elif depth > 1:
            found += paired_subfolders(child, depth - 1)
    return found


def _no_low_dir(root: Path, high_dir: Path | None, require_high: bool, flag: str) -> UserError:
    """The error for a folder without a `low/` (and, for test.py, without images of its own): it
    names the missing `low/` beside a `high/`, or the sub-folders to pass instead of a dataset's root."""
    if high_dir is not None:
        return UserError(f"{root} has {high_dir.name}/ but no low/ subfolder: put the low-light inputs in "
                         f"{root / 'low'} (a pair's two files share their name)")
    inner = paired_subfolders(root)
    if inner:
        names = ", ".join(str(p.relative_to(root)) for p in inner)
        return UserError(f"{root} has no low/ subfolder, but its sub-folders {names} do: pass one of them, "
                         f"e.g. {flag} {inner[0]}")
    if require_high:
        return UserError(f"{root} has no low/ (or Low/) subfolder; expected {root}/low and {root}/high")
    return UserError(f"no images in {root} and no low/ subfolder; pass a folder of images or one holding "
                     "low/ (and high/ for metrics); supported: png, jpg, jpeg, bmp, tif, webp")


def find_pairs(root: str | Path, require_high: bool = True, flag: str = "--input_dir") -> list[ImagePair]:
    """All pairs under `root`, sorted by name. With `require_high=False` a folder without a
    `high/` subfolder (or a flat folder of images, or one image file) gives pairs whose `high` is
    None. `flag` is the command-line flag that gave `root`, named in the errors."""
    root = Path(root)
    if root.is_file() and is_image_file(root) and not require_high:
        return [ImagePair(root.stem, root, None)]
    if root.is_file():
        raise UserError(f"{flag} {root} is a file; pass a folder holding low/ and high/ (test.py also takes one image)")
    if not root.is_dir():
        raise UserError(f"{flag} {root} does not exist; pass a folder holding low/ and high/")
    low_dir = _subfolder(root, LOW_NAMES)
    high_dir = _subfolder(root, HIGH_NAMES)
    if low_dir is None and require_high:
        raise _no_low_dir(root, high_dir, require_high, flag)
    if high_dir is None and require_high:
        raise UserError(f"{root} has no high/ (or Normal/) subfolder with the ground truth images")
    lows = _images_by_key(low_dir or root)
    if not lows and low_dir is None:
        raise _no_low_dir(root, high_dir, require_high, flag)
    if not lows:
        raise UserError(f"no images in {low_dir}; supported: png, jpg, jpeg, bmp, tif, webp")
    if high_dir is None:
        return [ImagePair(p.stem, p, None) for _, p in sorted(lows.items())]
    highs = _images_by_key(high_dir)
    unpaired = sorted(set(lows) ^ set(highs))
    if unpaired:
        names = [str(lows.get(k) or highs.get(k)) for k in unpaired[:3]]
        more = f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else ""
        raise UserError(f"unpaired images: {', '.join(names)}{more} have no partner in "
                        f"{high_dir if unpaired[0] in lows else low_dir}; add or remove them")
    return [ImagePair(lows[k].stem, lows[k], highs[k]) for k in sorted(lows)]


def is_validation_pair(name: str, val_percent: float) -> bool:
    """Deterministic hold-out rule shared by both trainers: a pair is in the validation split
    when the SHA-1 of its pair name (`name_key`), mod 10000, is below `val_percent * 100`.

    It depends on the name alone, so the split is the same on every machine and a pair keeps its
    side when other pairs are added or missing.
    """
    key = name_key(name).encode()
    return int(hashlib.sha1(key).hexdigest(), 16) % 10000 < val_percent * 100


def split_pairs(pairs: list[ImagePair], val_percent: float) -> tuple[list[ImagePair], list[ImagePair]]:
    """(train, validation) by `is_validation_pair`."""
    val = [p for p in pairs if is_validation_pair(p.name, val_percent)]
    train = [p for p in pairs if not is_validation_pair(p.name, val_percent)]
    return train, val


TEST_SET_NAMES = ("eval15", "test")  # LOL-v1's test folder; LOL-v2's Real_captured/Test, Synthetic/Test


def is_test_set(folder: str | Path | None) -> bool:
    """True for a benchmark's test folder (by its name), such as the original scripts pass as
    --val_dir: validation on it may report scores but must never choose a checkpoint."""
    return folder is not None and Path(folder).resolve().name.lower() in TEST_SET_NAMES


def training_split(train_dir: str | Path, val_dir: str | Path | None,
                   val_percent: float) -> tuple[list[ImagePair], list[ImagePair]]:
    """(train, validation) pairs for both trainers: `val_dir` when given, else the held-out
    split of `train_dir` (`split_pairs`). The test set is never involved."""
    pairs = find_pairs(train_dir, flag="--train_dir")
    if val_dir:
        return pairs, find_pairs(val_dir, flag="--val_dir")
    train, val = split_pairs(pairs, val_percent)
    if not train:
        raise UserError(f"all {len(pairs)} pairs of {train_dir} fell into the validation split; "
                        "lower --val_percent or pass --val_dir")
    return train, val
