"""The fast enhancer forward and its streamed (large-image) form compute the same function as the
straightforward formulation in tests/reference_enhancer.py: outputs, features and gradients."""
from __future__ import annotations

import pytest
import torch
from reference_enhancer import ReferenceEnhancer

from conftest import random_enhancer
from models import cpu_kernels, streaming
from models.enhancer import GDFN, EMNetEnhancer

TOL = 1e-4  # max abs difference allowed in fp32 (the bound)


def perturbed(arch: str, dim: int, seed: int) -> EMNetEnhancer:
    """Random weights, LayerNorms and temperatures well off their 1/0 init so every parameter
    matters."""
    return random_enhancer(arch, dim, seed=seed, scale=0.05)


def reference_of(model: EMNetEnhancer) -> ReferenceEnhancer:
    ref = ReferenceEnhancer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.fixture(params=["C kernels", "PyTorch ops"])
def kernels(request, monkeypatch):
    """Runs a test with the C kernels (models/cpu_kernels.py) and again with PyTorch ops only."""
    if request.param == "C kernels":
        if cpu_kernels.library() is None:
            pytest.skip("the C kernels could not be built here (no C compiler?)")
    else:
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("arch,dim,shape", [("emnet_tiny", 8, (2, 3, 24, 40)),
                                            ("emnet_small", 16, (1, 3, 32, 24)),
                                            ("emnet_enhancer", 32, (1, 3, 32, 48))])
def test_forward_equals_reference(arch, dim, shape, kernels):
    """Same weights, same outputs: max |fast - reference| <= 1e-4 in fp32, with non-trivial
    LayerNorm weights, temperatures and several heads; with and without the C kernels."""
    model = perturbed(arch, dim, seed=0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, ref = model(x), reference_of(model)(x)
    assert ref.abs().max() > 0.1, "degenerate reference output"
    assert (fast - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_gradients_equal_reference(batch):
    """Training uses the fast forward: its parameter and input gradients equal the reference's
    (batch 1 takes the pixel-split q k^T)."""
    model = perturbed("emnet_tiny", 8, seed=2)
    ref = reference_of(model)
    target = torch.rand(batch, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    grads = []
    for net in (model, ref):
        x = torch.rand(batch, 3, 16, 24, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        ((net(x) - target) ** 2).mean().backward()
        grads.append({"input": x.grad, **{n: p.grad for n, p in net.named_parameters()}})
    fast, slow = grads
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-3, msg=name)


def test_gdfn_hidden_width_is_padded_with_exact_zeros():
    """GDFN pads hidden 85 (dim 32) to 96 for faster matrix products; the stored weights keep
    the published shapes and the padded rows/columns are zeros."""
    gdfn = GDFN(32, 2.66)
    assert tuple(gdfn.project_in.weight.shape) == (170, 32, 1, 1)
    w_in, w_dw, w_out = gdfn.padded_weights()
    assert (w_in.shape, w_dw.shape, w_out.shape) == ((192, 32), (192, 1, 3, 3), (32, 96))
    assert torch.equal(w_in[85:96], torch.zeros(11, 32)) and torch.equal(w_in[181:], torch.zeros(11, 32))
    assert torch.equal(w_in[96:181], gdfn.project_in.weight.flatten(1)[85:])
    assert torch.equal(w_out[:, 85:], torch.zeros(32, 11))


@pytest.mark.parametrize("arch,dim", [("emnet_tiny", 8), ("emnet_enhancer", 32)])
def test_streamed_forward_equals_full(arch, dim, kernels):
    """Row strips of a few rows (so every level has several strips, including a last short one)
    give the same features and output as the one-piece forward."""
    model = perturbed(arch, dim, seed=5)
    x = torch.rand(2, 3, 56, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full_feats = model.forward_features(x)
        full = model.forward_head(x, full_feats)
        feats = streaming.forward_features(model, x, strip_pixels=40 * 6)
        out = streaming.forward_head(model, x, feats, strip_pixels=40 * 6)
    for a, b in zip(feats, full_feats):
        assert (a - b).abs().max().item() <= TOL
    assert (out - full).abs().max().item() <= TOL


def test_model_streams_large_inputs_only_without_gradients(monkeypatch):
    """Above `stream_pixels` an inference forward takes the streamed path (same result); with
    gradients enabled the plain forward runs, so training is unaffected."""
    model = perturbed("emnet_tiny", 8, seed=7)
    x = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(x)
    calls = []
    original = streaming.block
    monkeypatch.setattr(streaming, "block", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.stream_pixels, model.strip_pixels = 32 * 16 - 1, 16 * 4
    with torch.no_grad():
        streamed = model(x)
    assert calls, "the streamed path was not taken"
    assert (streamed - full).abs().max().item() <= TOL
    calls.clear()
    assert model(x).requires_grad and not calls


@pytest.mark.parametrize("height,rows", [(7, 2), (9, 4), (5, 8), (12, 2)])
def test_streamed_block_any_height(height, rows):
    """One block over strips equals the block at once for odd heights and strips taller than the
    image."""
    model = perturbed("emnet_tiny", 8, seed=9)
    blk = model.encoder_level2[0]
    t = torch.randn(1, height, 5, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(streaming.block(blk, t, strip_pixels=5 * rows), blk.nhwc(t),
                                   atol=TOL, rtol=0)


def test_row_spans_cover_the_image_in_even_strips():
    spans = list(streaming.row_spans(37, 10, strip_pixels=60))
    assert spans[0] == (0, 6) and spans[-1] == (36, 37)
    assert [r for a, b in spans for r in range(a, b)] == list(range(37))
    assert all((b - a) % 2 == 0 for a, b in spans[:-1])
