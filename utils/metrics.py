"""Image-quality metrics, one function per metric.

Convention (docs/METHOD.md, "How the numbers are measured"): both images are 8-bit RGB, obtained from [0, 1]
floats by *rounding*; PSNR over all pixels and channels with peak 255; SSIM is scikit-image's
`structural_similarity` with its defaults (7x7 uniform window, data_range 255) over the colour
channels (`channel_axis=2`), averaged. No border crop, no Y channel.
"""
from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from utils.image_io import to_uint8

METRIC_CONVENTION = ("PSNR/SSIM on rounded 8-bit RGB; SSIM = skimage structural_similarity defaults "
                     "(7x7 uniform window, data_range=255, channel_axis=2); no border crop; "
                     "GT-mean PSNR rescales the output to the ground truth's mean first")


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"image shapes differ: prediction {pred.shape} vs ground truth {gt.shape}")
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise ValueError(f"metrics take uint8 images, got {pred.dtype} and {gt.dtype}; use to_uint8")


SSIM_HALF = 3  # half of scikit-image's default 7x7 window: rows an SSIM value depends on, each side
SSIM_CHUNK_PIXELS = 2**20  # larger images are scored in row chunks (~0.2 GB each, not ~2 GB at 12 MP)


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB between two uint8 RGB images (peak 255); inf when they are identical. The squared
    errors are summed exactly in integers."""
    _check_pair(pred, gt)
    diff = pred.astype(np.int32) - gt
    mse = float(np.square(diff, out=diff).sum(dtype=np.int64)) / diff.size
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """SSIM between two uint8 RGB images, scikit-image defaults over the colour channels.

    Large images are scored in row chunks with SSIM_HALF rows of context each side: each SSIM
    value depends only on its 7x7 window, and scikit-image averages the map without its outer
    SSIM_HALF rows and columns, so the result is the whole-image one up to summation order."""
    _check_pair(pred, gt)
    height, width = gt.shape[:2]
    rows = max(SSIM_CHUNK_PIXELS // max(width, 1), 1)
    if height <= rows or height <= 2 * SSIM_HALF or width <= 2 * SSIM_HALF:
        return float(structural_similarity(pred, gt, channel_axis=2, data_range=255))
    total = 0.0
    for r0 in range(SSIM_HALF, height - SSIM_HALF, rows):
        r1 = min(r0 + rows, height - SSIM_HALF)
        a, b = r0 - SSIM_HALF, r1 + SSIM_HALF
        _, ssim_map = structural_similarity(pred[a:b], gt[a:b], channel_axis=2, data_range=255, full=True)
        total += ssim_map[SSIM_HALF:-SSIM_HALF, SSIM_HALF:-SSIM_HALF].sum()
    return float(total / ((height - 2 * SSIM_HALF) * (width - 2 * SSIM_HALF) * gt.shape[2]))


def gt_mean_psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR after scaling the prediction so its mean equals the ground truth's ("GT-mean").

    This uses information from the ground truth; report it only in its own column.
    """
    _check_pair(pred, gt)
    p = pred.astype(np.float64)
    p /= 255.0
    scale = (gt.mean(dtype=np.float64) / 255.0) / max(p.mean(), 1e-8)
    p *= scale
    return psnr(to_uint8(np.clip(p, 0.0, 1.0, out=p)), gt)


def _frame_mask(shape: tuple[int, ...], width: int) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return mask


def frame_psnr(pred: np.ndarray, gt: np.ndarray, width: int = 3) -> tuple[float, float]:
    """(PSNR of the outer `width`-pixel frame, PSNR of the interior) of two uint8 RGB images:
    a border artefact shows as a frame PSNR below the interior's."""
    _check_pair(pred, gt)
    err = (pred.astype(np.float64) - gt.astype(np.float64)) ** 2
    mask = _frame_mask(pred.shape, width)
    return tuple(math.inf if m == 0 else 10.0 * math.log10(255.0 ** 2 / m)
                 for m in (err[mask].mean(), err[~mask].mean()))


def edge_ratio(img: np.ndarray, edge: int = 0, inner: int = 3, far: int = 7) -> float:
    """How much the outermost rows and columns differ from their neighbours, relative to how much
    inner rows do: sum over the four sides of mean |row[edge] - row[inner]| divided by the same
    sum of mean |row[inner] - row[far]|. Natural photos give about 1; a frame gives more."""
    x = img.astype(np.float64)
    sides = [x, x[::-1], x.transpose(1, 0, 2), x.transpose(1, 0, 2)[::-1]]  # top, bottom, left, right
    num = sum(np.abs(s[edge] - s[inner]).mean() for s in sides)
    den = sum(np.abs(s[inner] - s[far]).mean() for s in sides)
    return float(num / max(den, 1e-12))
