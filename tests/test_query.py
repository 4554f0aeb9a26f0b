"""models/query.py: the query encoders (the enhancer's own features, a frozen resnet18, the learned
head) and the threshold triplet loss that trains the head."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import grey, random_enhancer, unit
from models.enhancer import EMNetEnhancer, make_config
from models.query import (
    RESNET18_URL,
    EnhancerQuery,
    QueryHead,
    ResNet18Query,
    build_query_encoder,
    threshold_triplet_loss,
)
from utils.errors import UserError

# ============================================================================ triplet loss

TRIPLET_KEYS = torch.eye(3)
TRIPLET_VALUES = grey(0.1, 0.5, 0.9)


def test_triplet_loss_zero_when_positive_wins_by_margin():
    """The positive (slot 1, value within threshold) outscores the best negative by more than
    the margin: loss 0."""
    q = unit([0.2, 1.0, 0.1])
    loss = threshold_triplet_loss(q, TRIPLET_KEYS, TRIPLET_VALUES, grey(0.5), 0.05, 0.1)
    assert float(loss) == 0.0


def test_triplet_loss_hand_value_and_gradient():
    """Positive losing: relu(s_neg - s_pos + margin), averaged over the queries that have both a
    positive and a negative (a query without a positive is left out); the gradient reaches the query."""
    raw = torch.tensor([[1.0, 0.8, 0.0], [0.2, 1.0, 0.1], [1.0, 0.0, 0.0]], requires_grad=True)
    q = F.normalize(raw, dim=1)
    target = grey(0.5, 0.5, 0.3)  # third query: no slot within 0.05 of 0.3
    loss = threshold_triplet_loss(q, TRIPLET_KEYS, TRIPLET_VALUES, target, 0.05, 0.1)
    n = math.hypot(1.0, 0.8)
    expect = (max(1 / n - 0.8 / n + 0.1, 0) + 0.0) / 2
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    loss.backward()
    assert raw.grad is not None and raw.grad[0].abs().sum() > 0
    assert raw.grad[2].abs().sum() == 0  # the excluded query gets no gradient


def test_triplet_loss_without_pairs_is_zero():
    """No query with both a positive and a negative: loss 0, finite, and backward works."""
    q = unit([1.0, 0.5, 0.0]).requires_grad_(True)
    for target, thr in ((grey(0.3), 0.05), (grey(0.5), 10.0)):  # no positive / no negative
        loss = threshold_triplet_loss(q, TRIPLET_KEYS, TRIPLET_VALUES, target, thr, 0.1)
        assert loss.item() == 0.0 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(q.grad).all()


# ============================================================================ query encoders

def test_query_head_starts_as_identity_and_trains():
    """QueryHead maps unit vectors to themselves at start; its weight trains (one step changes
    the output) and outputs stay unit-norm."""
    torch.manual_seed(4)
    head = QueryHead(16)
    q = F.normalize(torch.randn(5, 16), dim=1)
    assert torch.allclose(head(q), q, atol=1e-6)
    params = list(head.parameters())
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    target = F.normalize(torch.randn(5, 16), dim=1)
    (-(head(q) * target).sum()).backward()
    opt.step()
    out = head(q)
    assert not torch.allclose(out, q, atol=1e-3)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_enhancer_query():
    """EnhancerQuery: (B, 16 C) unit-norm descriptors, odd sizes (37x53, padded inside),
    deterministic, per image (a batch equals its images one by one), image-dependent."""
    enc = EnhancerQuery(random_enhancer("emnet_tiny", 8, seed=0))
    torch.manual_seed(5)
    x = torch.rand(2, 3, 37, 53)
    q = enc(x)
    assert enc.dim == 128 and q.shape == (2, 128)
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(q, enc(x))
    assert torch.allclose(q[1:], enc(x[1:]), atol=1e-5)
    assert not torch.allclose(q[0], q[1], atol=1e-4)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME and the torch hub folder pointed at an empty folder (restored afterwards)."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored by monkeypatch
    torch.hub.set_dir(str(home / "hub"))
    return home


def test_resnet18_without_weights_is_user_error(empty_torch_home):
    """No --query_weights and nothing in the hub cache: a UserError naming the expected path and
    --query_weights (never a download)."""
    with pytest.raises(UserError) as err:
        build_query_encoder("resnet18", None, None)
    expected = empty_torch_home / "hub" / "checkpoints" / Path(RESNET18_URL).name
    assert str(expected) in str(err.value) and "--query_weights" in str(err.value)


def test_resnet18_query(resnet_file, empty_torch_home):
    """With a resnet18 state_dict file: 512-d unit-norm outputs, frozen (eval mode even after
    .train(), no grad), deterministic; the hub-cache file is found without --query_weights."""
    enc = build_query_encoder("resnet18", None, str(resnet_file))
    assert isinstance(enc, ResNet18Query) and enc.dim == 512
    torch.manual_seed(7)
    x = torch.rand(2, 3, 64, 72)
    q = enc(x)
    assert q.shape == (2, 512)
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    assert torch.allclose(enc(x), q, atol=1e-6)  # BatchNorm still uses running statistics
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(RESNET18_URL).name).symlink_to(resnet_file)
    assert torch.allclose(build_query_encoder("resnet18", None, None)(x), q, atol=1e-6)


def test_resnet18_with_wrong_file_is_user_error(make_checkpoint, tmp_path):
    """An enhancer checkpoint, a bare tensor or random bytes as --query_weights: a UserError
    naming the file, not a traceback."""
    enhancer_file, _ = make_checkpoint()
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for path in (enhancer_file, tensor_file, junk):
        with pytest.raises(UserError) as err:
            build_query_encoder("resnet18", None, str(path))
        assert str(path) in str(err.value), path


def test_unknown_or_incomplete_query_encoder():
    """An unknown encoder name, or 'enhancer' without an enhancer, is a UserError."""
    with pytest.raises(UserError, match="unknown --query_encoder"):
        build_query_encoder("vgg", None, None)
    with pytest.raises(UserError, match="--weights"):
        build_query_encoder("enhancer", None, None)


def test_enhancer_query_in_chunks_equals_one_by_one():
    """A batch larger than EnhancerQuery.CHUNK gives the same queries as one image at a time."""
    torch.manual_seed(0)
    encoder = EnhancerQuery(EMNetEnhancer(make_config("emnet_tiny", 8)).eval())
    x = torch.rand(EnhancerQuery.CHUNK + 3, 3, 24, 24)
    together = encoder(x)
    alone = torch.cat([encoder(x[i:i + 1]) for i in range(len(x))])
    assert together.shape == (len(x), encoder.dim)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
