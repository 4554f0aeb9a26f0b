"""utils/image_io.py: reading images (channel order, grayscale, alpha, 16 bit, broken files) and
writing them."""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from conftest import random_rgb, write_png
from utils.errors import UserError
from utils.image_io import read_image, to_uint8, write_image


def test_read_image_rgb_channel_order(tmp_path):
    """A pure red image (written by cv2 in BGR order) reads as channel 0 = 1, others 0."""
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), bgr)
    img = read_image(path)
    assert img.shape == (4, 5, 3) and img.dtype == np.float32
    assert np.all(img[..., 0] == 1) and np.all(img[..., 1:] == 0)


def test_read_image_grayscale(tmp_path):
    """Grayscale becomes 3 identical channels."""
    g = np.random.default_rng(0).integers(0, 256, (4, 6), dtype=np.uint8)
    path = tmp_path / "g.png"
    cv2.imwrite(str(path), g)
    img = read_image(path)
    assert img.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], g / np.float32(255))


def test_read_image_rgba_drops_alpha(tmp_path):
    """RGBA: alpha is dropped, colours stay in RGB order."""
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    bgra[..., 3] = 7  # alpha
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), bgra)
    img = read_image(path)
    assert img.shape == (3, 3, 3)
    assert np.all(img[..., 2] == 1) and np.all(img[..., :2] == 0)


def test_read_image_16_bit(tmp_path):
    """16-bit PNGs are scaled by 65535: 65535 -> 1.0, 0 -> 0, 32768 -> ~0.5."""
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0] = 65535
    arr[1] = 32768
    path = tmp_path / "d.png"
    cv2.imwrite(str(path), arr)
    img = read_image(path)
    assert img.dtype == np.float32
    assert np.all(img[0] == 1.0)
    np.testing.assert_allclose(img[1], 32768 / 65535, rtol=1e-6)


def test_read_image_truncated_is_user_error(tmp_path):
    """Half of a real PNG is a UserError naming the file."""
    path = write_png(tmp_path / "t.png", random_rgb(0, (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=re.escape(str(path))):
        read_image(path)


@pytest.mark.parametrize("content", [None, b"", b"not an image at all"])
def test_read_image_missing_or_garbage_is_user_error(tmp_path, content):
    """Missing, empty and non-image files are UserErrors naming the file."""
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(str(path))):
        read_image(path)


def test_write_image_round_trip(tmp_path):
    """write_image rounds floats to 8 bits, keeps RGB order, and leaves no temporary file."""
    img = np.random.default_rng(0).random((5, 4, 3)).astype(np.float32)
    path = tmp_path / "o.png"
    write_image(path, img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
    np.testing.assert_array_equal(to_uint8(read_image(path)), to_uint8(img))


def test_to_uint8_leaves_8_bit_images_as_they_are():
    """Callers holding uint8 arrays (the decoded training sets, written PNGs) pass them through
    the one conversion; scaling them by 255 again would saturate them."""
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(to_uint8(img), img)
    assert np.array_equal(to_uint8(img.astype(np.float32) / 255.0), img)
