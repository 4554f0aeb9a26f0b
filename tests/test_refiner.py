"""models/refiner.py: build_refiner checks a memory against the enhancer and the read flags, and
names the memory file when they do not match."""
from __future__ import annotations

import pytest
import torch

from conftest import random_enhancer, save_memory, tiny_memory
from models.enhancer import EMNetEnhancer, make_config
from models.inference import enhance
from models.loading import load_memory
from models.read_settings import ReadSettings
from models.refiner import build_refiner
from utils.errors import UserError

# ============================================================================ build_refiner checks

@pytest.fixture
def enhancer_memory(tmp_path):
    """An our-format memory filled with the tiny enhancer's queries (128-d keys, 16 slots)."""
    enhancer = random_enhancer("emnet_tiny", 8)
    path = save_memory(tmp_path / "memory_best.pth", tiny_memory(),
                       extra={"enhancer_config": enhancer.config.to_dict()})
    mem, ckpt = load_memory(path)
    return mem, ckpt, path, enhancer


def refiner_error(mem, ckpt, path, enhancer, query_encoder=None, top_k=1, pooling_size=None) -> str:
    with pytest.raises(UserError) as err:
        build_refiner(mem, ckpt, path, enhancer, ReadSettings(top_k=top_k, query_encoder=query_encoder),
                      pooling_size=pooling_size)
    assert str(path) in str(err.value), str(err.value)
    return str(err.value)


def test_build_refiner_accepts_matching_flags(enhancer_memory):
    """The matching flags (and k = mem_size) build a refiner that corrects an image."""
    mem, ckpt, path, enhancer = enhancer_memory
    refiner = build_refiner(mem, ckpt, path, enhancer, ReadSettings(top_k=16, query_encoder="enhancer"),
                            pooling_size=1)
    x = torch.rand(1, 3, 24, 40)
    out = refiner(x, enhance(enhancer, x))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_build_refiner_query_encoder_mismatch(enhancer_memory):
    """--query_encoder resnet18 for a memory written with the enhancer query."""
    assert "--query_encoder enhancer" in refiner_error(*enhancer_memory, query_encoder="resnet18")


def test_build_refiner_pooling_size_mismatch(enhancer_memory):
    """--pooling_size 2 for a p = 1 memory."""
    assert "--pooling_size 2" in refiner_error(*enhancer_memory, pooling_size=2)


def test_build_refiner_other_enhancer(enhancer_memory):
    """The memory was filled with queries of another enhancer config than the one given."""
    mem, ckpt, path, _ = enhancer_memory
    other = EMNetEnhancer(make_config("emnet_tiny", 16))
    assert "another enhancer" in refiner_error(mem, ckpt, path, other)


def test_build_refiner_key_dim_mismatch(tmp_path):
    """64-d keys against the 128-d queries of the tiny enhancer (no stored enhancer config)."""
    path = save_memory(tmp_path / "m64.pth", tiny_memory(key_dim=64))
    mem, ckpt = load_memory(path)
    assert "64-d keys" in refiner_error(mem, ckpt, path, random_enhancer("emnet_tiny", 8))


@pytest.mark.parametrize("top_k", [0, 17])
def test_build_refiner_bad_top_k(enhancer_memory, top_k):
    """--testing_top_k 0 or above mem_size (16)."""
    assert "--testing_top_k" in refiner_error(*enhancer_memory, top_k=top_k)
