"""The one image loader and writer of the project.

Images are float32 RGB arrays (H, W, 3) in [0, 1]: grayscale becomes 3 channels, alpha is
dropped, 8- and 16-bit files are scaled by their own maximum (`read_image_compact` keeps 8-bit
files as uint8 until `to_float`).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.atomic import atomic_write
from utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def decode_stored(path: str | Path) -> np.ndarray:
    """The image as stored in the file (cv2's channel order and dtype), or a one-line UserError."""
    path = Path(path)
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    if img is None:
        raise UserError(f"cannot read image {path}: the file is missing, truncated or not an image; "
                        "replace it or remove it from the folder")
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 RGB in [0, 1], shape (H, W, 3)."""
    return to_float(read_image_compact(path))


def read_image_compact(path: str | Path) -> np.ndarray:
    """Read an image file as RGB (H, W, 3): uint8 as stored for 8-bit files, a quarter of the
    float32 array (the trainers hold their training sets so), float32 in [0, 1] for the others.
    `to_float` turns it into `read_image`'s array."""
    img = decode_stored(path)
    if img.dtype != np.uint8:
        img = to_float(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB


def to_float(img: np.ndarray) -> np.ndarray:
    """An image array as float32 in [0, 1]: 8- and 16-bit values scaled by their maximum,
    floats clipped."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    return np.clip(img.astype(np.float32, copy=False), 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 by rounding (not truncation), the metric convention of docs/METHOD.md;
    a uint8 image is returned as it is."""
    if img.dtype == np.uint8:
        return img
    scaled = img * 255.0
    return np.clip(np.round(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write a float RGB [0, 1] or uint8 RGB image; the format follows the file extension.

    Written to a temporary name first and renamed, so an interrupted run never leaves half a file.
    """
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(to_uint8(img)[:, :, ::-1]))
    if not ok:
        raise UserError(f"cannot encode image {path}; use a .png, .jpg or .bmp name")
    atomic_write(path, buf.tobytes())


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array -> (1, 3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).unsqueeze(0)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor -> (H, W, 3) float32 array, clamped to [0, 1]."""
    if t.dim() == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
