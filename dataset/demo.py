"""A small synthetic low/normal-light demo set, built from scikit-image's bundled colour photos.

The project cannot ship LOL images, so the first `sh test_script.sh` runs on this set instead:
`<out>/high/<name>.png` is a photo from `skimage.data` (longer side at most 512 px) and
`<out>/low/<name>.png` the same photo darkened by the seeded model of `LowLightModel`. The files
are the same byte for byte on every run (same library versions), and `<out>/SOURCES.txt` names
the photos and every parameter drawn. Scores on this set say that the pipeline runs, not how good
a model is: real low-light photos (LOL) are not made this way.

    python -m dataset.demo [--out datasets/demo] [--force]
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

from utils.atomic import atomic_write_text
from utils.errors import UserError, run_cli
from utils.image_io import write_image

DEFAULT_OUT = Path("datasets/demo")


@dataclass(frozen=True)
class LowLightModel:
    """How a normal-light photo x (sRGB, [0, 1]) becomes its low-light twin, per image:

    1. to linear light: L = srgb_to_linear(x);
    2. exposure and tone: D = e * L**g * mean(L) / mean(L**g), with exposure e ~ U(exposure) and
       gamma g ~ U(gamma): g > 1 darkens the shadows more than the highlights while the mean
       linear brightness stays exactly e times the photo's;
    3. colour cast: D_c *= 1 + u_c, u_c ~ U(-cast, cast) per channel c (R, G, B);
    4. sensor noise: N = Poisson(D * photons_at_white) / photons_at_white (shot noise), plus
       Gaussian read noise of standard deviation read_noise, clipped to [0, 1];
    5. back to sRGB and rounded to 8 bits.

    So the mean linear brightness of low/ is about e times that of high/ (e in `exposure`, off by
    the cast and the noise, which is zero-mean before clipping). Every draw comes from
    numpy.random.default_rng(seed + image index), in the order e, g, u, noise.
    """

    seed: int = 20231  # base seed; image i uses seed + i
    exposure: tuple[float, float] = (0.04, 0.12)  # e: mean linear-light ratio low / high
    gamma: tuple[float, float] = (1.0, 1.3)  # g: extra tone-curve exponent in linear light
    cast: float = 0.08  # |u_c|: per-channel gain deviation
    photons_at_white: float = 2000.0  # expected photo-electrons of a linear value 1.0
    read_noise: float = 0.002  # Gaussian read noise std, in linear units
    max_side: int = 512  # photos are downscaled (area filter) to at most this longer side


# (file name, skimage.data function): colour photos bundled with scikit-image (no download).
SOURCES = (
    ("astronaut", "astronaut"),
    ("chelsea", "chelsea"),
    ("coffee", "coffee"),
    ("rocket", "rocket"),
    ("motorcycle", "stereo_motorcycle"),  # the left image of the stereo pair
    ("immunohistochemistry", "immunohistochemistry"),
    ("retina", "retina"),
)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """The sRGB transfer function, inverted: [0, 1] sRGB -> [0, 1] linear light."""
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """[0, 1] linear light -> [0, 1] sRGB."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def load_photo(func_name: str, max_side: int) -> np.ndarray:
    """A bundled skimage.data photo as uint8 RGB, downscaled so its longer side is <= max_side."""
    try:
        img = getattr(skdata, func_name)()
    except Exception as err:  # a photo that this scikit-image version does not bundle
        raise UserError(f"scikit-image cannot provide skimage.data.{func_name} offline ({err}); "
                        "install scikit-image>=0.20 from requirements.txt") from None
    img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
    img = np.ascontiguousarray(img[:, :, :3])
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (W, H)
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def darken(photo: np.ndarray, model: LowLightModel, index: int) -> tuple[np.ndarray, dict[str, float]]:
    """The low-light twin (uint8 RGB) of a uint8 RGB photo, and the parameters drawn for it."""
    rng = np.random.default_rng(model.seed + index)
    e = rng.uniform(*model.exposure)
    g = rng.uniform(*model.gamma)
    u = rng.uniform(-model.cast, model.cast, size=3)
    lin = srgb_to_linear(photo.astype(np.float64) / 255.0)  # (H, W, 3)
    toned = lin ** g
    dark = e * toned * (lin.mean() / max(toned.mean(), 1e-12)) * (1.0 + u)
    electrons = rng.poisson(np.clip(dark, 0.0, None) * model.photons_at_white)
    noisy = electrons / model.photons_at_white + rng.normal(0.0, model.read_noise, size=dark.shape)
    low = np.round(linear_to_srgb(noisy) * 255.0).astype(np.uint8)
    return low, {"exposure": float(e), "gamma": float(g), "cast_r": float(u[0]),
                 "cast_g": float(u[1]), "cast_b": float(u[2])}


def _sources_text(model: LowLightModel, drawn: dict[str, dict[str, float]]) -> str:
    lines = ["EMNet demo set: synthetic low-light pairs made by dataset/demo.py (python -m dataset.demo).",
             "high/<name>.png: a colour photo bundled with scikit-image (skimage.data), longer side",
             f"<= {model.max_side} px; low/<name>.png: the same photo darkened by LowLightModel.",
             "Not real low-light photos: scores here show that the pipeline runs, not model quality.",
             "", "model parameters:"]
    lines += [f"  {k} = {v}" for k, v in asdict(model).items()]
    lines += ["", "images (skimage.data function: parameters drawn):"]
    for (name, func), params in zip(SOURCES, drawn.values()):
        values = ", ".join(f"{k}={v:.4f}" for k, v in params.items())
        lines.append(f"  {name}: skimage.data.{func}(){'[0]' if func == 'stereo_motorcycle' else ''}: {values}")
    return "\n".join(lines) + "\n"


def _write_new(path: Path, img: np.ndarray, overwrite: bool) -> None:
    if overwrite or not path.exists():
        write_image(path, img)


def build_demo_set(root: Path, model: LowLightModel = LowLightModel(), overwrite: bool = False) -> Path:
    """Write the demo set into `root` (high/, low/, SOURCES.txt) and return `root`.

    Existing files are kept unless `overwrite`. low/ is written in a temporary folder and renamed
    at the end, so `root/low` exists only once the set is complete.
    """
    root = Path(root)
    try:
        (root / "high").mkdir(parents=True, exist_ok=True)
        staging = root / ".low.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as err:
        raise UserError(f"cannot create the demo set in {root} ({err.strerror}); "
                        "pass a writable folder to --out") from None
    drawn = {}
    for index, (name, func) in enumerate(SOURCES):
        photo = load_photo(func, model.max_side)
        low, drawn[name] = darken(photo, model, index)
        _write_new(root / "high" / f"{name}.png", photo, overwrite)
        _write_new(staging / f"{name}.png", low, overwrite)
    sources = root / "SOURCES.txt"
    if overwrite or not sources.exists():
        atomic_write_text(sources, _sources_text(model, drawn))
    low_dir = root / "low"
    low_dir.mkdir(exist_ok=True)
    for f in sorted(staging.iterdir()):
        if overwrite or not (low_dir / f.name).exists():
            os.replace(f, low_dir / f.name)
    shutil.rmtree(staging)
    return root


def ensure_demo_set(root: Path = DEFAULT_OUT) -> Path:
    """The demo set in `root`, created on first use (when `root/low` is missing); an existing
    set is never touched. Returns `root`."""
    root = Path(root)
    if not (root / "low").is_dir():
        build_demo_set(root)
    return root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Create the synthetic low-light demo set from scikit-image photos")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to create (holds low/, high/)")
    p.add_argument("--force", action="store_true", help="rewrite the demo files even if they exist")
    return p


def main(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a folder for the demo set")
    if (args.out / "low").is_dir() and not args.force:
        print(f"demo set already in {args.out}; nothing written (--force rebuilds it)")
        return
    build_demo_set(args.out, overwrite=args.force)
    print(f"demo set: {len(SOURCES)} low/high pairs in {args.out} (see {args.out / 'SOURCES.txt'})")


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
