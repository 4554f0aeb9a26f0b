"""No border frame: the border metrics themselves, and the bundled enhancer's output on a real,
odd-sized photo with the default reflected margin against the original code's (margin 0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from conftest import REPO
from models.inference import BORDER_MARGIN, enhance
from models.loading import load_enhancer
from utils.bundled import BUNDLED_ENHANCER
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8
from utils.metrics import edge_ratio, frame_psnr


def test_edge_ratio_is_about_one_for_a_smooth_ramp_and_large_for_a_frame():
    ramp = np.tile(np.linspace(0, 255, 64)[None, :, None], (48, 1, 3)).astype(np.uint8)
    ramp = (ramp.astype(int) + np.linspace(0, 40, 48)[:, None, None]).clip(0, 255).astype(np.uint8)
    assert 0.6 < edge_ratio(ramp) < 1.4
    framed = ramp.copy()
    framed[0], framed[:, -1] = 0, 255
    assert edge_ratio(framed) > 3


def test_frame_psnr_separates_frame_and_interior():
    gt = np.full((20, 30, 3), 100, np.uint8)
    pred = gt.copy()
    pred[:3] = 110  # error only in the top 3 rows
    frame, inner = frame_psnr(pred, gt)
    assert np.isinf(inner) and frame < 40


@pytest.fixture(scope="module")
def dark_photo() -> torch.Tensor:
    """scikit-image's astronaut, cropped to an odd size and darkened like a low-light shot."""
    img = data.astronaut()[37:378, 91:346].astype(np.float32) / 255  # 341 x 255
    return image_to_tensor((img * 0.12) ** 1.1)


@pytest.mark.slow
def test_bundled_enhancer_has_no_frame_with_the_default_margin(dark_photo):
    """With the default margin the outermost rows/columns differ from their neighbours no more
    than inner rows do (edge ratio <= 1.2), and less than in the original code's output (margin 0).
    On eval15 the margin-0 outputs have a mean edge ratio of 1.8 (benchmarks/border_frame.py)."""
    model, _ = load_enhancer(REPO / BUNDLED_ENHANCER)
    framed = edge_ratio(to_uint8(tensor_to_image(enhance(model, dark_photo, margin=0))))
    clean = edge_ratio(to_uint8(tensor_to_image(enhance(model, dark_photo, BORDER_MARGIN))))
    assert clean <= 1.2 and clean < framed, (clean, framed)
