"""The C kernels (models/fast/csrc/dwconv.c) compute what PyTorch computes, at borders and for any
batch, height, width and channel count they accept; the fast path's ops use them only where they
apply; and a machine without a C compiler falls back to PyTorch with a warning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.fast import kernels, ops
from models.fast.policy import Plan

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason="the C kernels could not be built here (no C compiler?)")


def torch_dw(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(t.permute(0, 3, 1, 2), weight, padding=1, groups=weight.shape[0]).permute(0, 2, 3, 1)


def inputs(shape: tuple[int, int, int, int], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    return (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g),
            torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, 1, 3, 3, generator=g))


SHAPES = [(1, 1, 1, 16), (1, 1, 5, 16), (1, 6, 1, 32), (2, 2, 3, 16), (3, 7, 9, 48), (1, 33, 20, 176)]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_depthwise_matches_pytorch(shape):
    a, _, wa, _ = inputs(shape, seed=0)
    torch.testing.assert_close(kernels.depthwise3x3(a, wa), torch_dw(a, wa), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_depthwise_squares_are_per_image_channel_sums(shape):
    a, _, wa, _ = inputs(shape, seed=1)
    out, squares = kernels.depthwise3x3_squares(a, wa)
    expected = torch_dw(a, wa)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(squares, expected.double().square().sum((1, 2)).float(), atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_gate_matches_exact_gelu(shape):
    a, b, wa, wb = inputs(shape, seed=2)
    expected = F.gelu(torch_dw(a, wa)) * torch_dw(b, wb)
    torch.testing.assert_close(kernels.gated_depthwise3x3(a, b, wa, wb), expected, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_gate_gelu_over_its_whole_range():
    """The kernel's erf approximation against torch's exact gelu from -100 to 100, through the
    centre tap only (other taps zero), so the conv is the identity times one."""
    c = 16
    v = torch.linspace(-100, 100, 20001).view(1, -1, 1, 1).expand(1, 20001, 1, c).contiguous()
    centre = torch.zeros(c, 1, 3, 3)
    centre[:, 0, 1, 1] = 1
    got = kernels.gated_depthwise3x3(v, torch.ones_like(v), centre, centre)
    torch.testing.assert_close(got, F.gelu(v), atol=2e-6, rtol=1e-6)


def test_ops_use_the_kernels_only_where_they_apply(monkeypatch):
    """The plan switches them on; channel counts not a multiple of 16 and non-contiguous layouts
    keep PyTorch's conv even then."""
    a, _, wa, _ = inputs((1, 4, 4, 16), seed=3)
    calls = []
    monkeypatch.setattr(kernels, "depthwise3x3", lambda *args: calls.append(1) or torch_dw(*args))
    expected = torch_dw(a, wa)
    with torch.no_grad():
        for plan, t, w, used in [(Plan(c_kernels=False), a, wa, False), (Plan(c_kernels=True), a, wa, True),
                                 (Plan(c_kernels=True), a[..., :8], wa[:8], False),
                                 (Plan(c_kernels=True), a.transpose(1, 2), wa, False)]:
            calls.clear()
            out = ops.depthwise3x3(w, t, plan)
            assert bool(calls) == used
            torch.testing.assert_close(out, torch_dw(t, w), atol=1e-5, rtol=1e-5)
    assert expected.shape == a.shape


def test_without_a_compiler_pytorch_ops_are_used(monkeypatch, tmp_path):
    """No C compiler and an empty cache: a warning, no library, and the enhancer still runs."""
    from models.enhancer import EMNetEnhancer, make_config
    from models.inference import enhance

    monkeypatch.setenv("EMNET_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert kernels.library() is None
        with torch.no_grad():
            out = enhance(EMNetEnhancer(make_config("emnet_tiny", 16)).eval(), torch.rand(1, 3, 16, 16))
        assert out.shape == (1, 3, 16, 16)
    finally:
        kernels.library.cache_clear()


def test_library_is_built_into_the_cache_once(monkeypatch, tmp_path):
    """A fresh cache gets one compiled library; loading again reuses it without compiling."""
    if kernels._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("EMNET_KERNEL_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = sorted(tmp_path.glob("*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp*"))
        kernels.library.cache_clear()
        monkeypatch.setattr(kernels, "_build", lambda *a: pytest.fail("rebuilt a cached library"))
        assert kernels.library() is not None
    finally:
        kernels.library.cache_clear()


def test_row_strips_keep_to_pytorch_products(monkeypatch):
    """The bounded-memory path uses F.linear (oneDNN grew its heap by GBs); whole maps oneDNN."""
    from models import fast
    from models.enhancer import EMNetEnhancer, make_config

    if not kernels.onednn_available():
        pytest.skip("oneDNN's products are not available in this PyTorch build")
    calls = []
    original = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1) or original(*a))
    model = EMNetEnhancer(make_config("emnet_tiny", 16)).eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        fast.forward(model, x, fast.plan_for(model, x, strip_pixels=24 * 4))
        assert not calls
        fast.forward(model, x, fast.plan_for(model, x))
    assert calls
