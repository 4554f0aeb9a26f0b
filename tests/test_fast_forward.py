"""The fast path (models/fast/) computes the function of the plain network in models/enhancer.py,
from the same weights: outputs, features and gradients, whole-image and in row strips, with the
C kernels and with PyTorch ops only."""
from __future__ import annotations

import pytest
import torch

from conftest import random_enhancer
from models import fast
from models.enhancer import GDFN, EMNetEnhancer, make_config
from models.fast import kernels, strips
from models.fast.blocks import block, gdfn_weights
from models.fast.policy import Plan, plan_for
from models.fast.strips import RowStrips, row_spans

TOL = 1e-4  # max abs difference allowed in fp32


def perturbed(arch: str, dim: int, seed: int) -> EMNetEnhancer:
    """Random weights, LayerNorms and temperatures well off their 1/0 init so every parameter
    matters."""
    return random_enhancer(arch, dim, seed=seed, scale=0.05)


@pytest.fixture(params=["C kernels", "PyTorch ops"])
def with_kernels(request, monkeypatch):
    """Runs a test with the C kernels (models/fast/kernels.py) and again with PyTorch ops only."""
    if request.param == "C kernels":
        if kernels.library() is None:
            pytest.skip("the C kernels could not be built here (no C compiler?)")
    else:
        monkeypatch.setattr(kernels, "library", lambda: None)
        monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    return request.param


@pytest.mark.parametrize("arch,dim,shape", [("emnet_tiny", 8, (2, 3, 24, 40)),
                                            ("emnet_small", 16, (1, 3, 32, 24)),
                                            ("emnet_enhancer", 32, (1, 3, 32, 48))])
def test_fast_forward_equals_the_plain_network(arch, dim, shape, with_kernels):
    """Same weights, same outputs: max |fast - plain| <= 1e-4 in fp32, with non-trivial LayerNorm
    weights, temperatures and several heads; with and without the C kernels."""
    model = perturbed(arch, dim, seed=0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, plain = fast.forward(model, x), model(x)
        assert plan_for(model, x).c_kernels == (with_kernels == "C kernels")
    assert plain.abs().max() > 0.1, "degenerate output"
    assert (ours - plain).abs().max().item() <= TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_gradients_equal_the_plain_network(batch):
    """Training runs the fast path (`fast.FastForward`): its parameter and input gradients equal
    the plain network's (batch 1 takes the pixel-split q k^T)."""
    model = perturbed("emnet_tiny", 8, seed=2)
    target = torch.rand(batch, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    grads = []
    for net in (fast.FastForward(model), model):
        model.zero_grad()
        x = torch.rand(batch, 3, 16, 24, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        ((net(x) - target) ** 2).mean().backward()
        grads.append({"input": x.grad, **{n: p.grad.clone() for n, p in model.named_parameters()}})
    ours, plain = grads
    assert ours.keys() == plain.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], plain[name], atol=1e-5, rtol=1e-3, msg=name)


def test_plan_keeps_kernels_and_strips_away_from_gradients(monkeypatch):
    """With gradients: PyTorch ops on whole maps, whatever the size or the budget."""
    model = perturbed("emnet_tiny", 8, seed=2)
    x = torch.rand(1, 3, 16, 24)
    monkeypatch.setattr("models.fast.budget.WHOLE_BYTES", 10 ** 12)  # nothing fits whole
    plan = plan_for(model, x)
    assert plan.grad and not (plan.c_kernels or plan.onednn or plan.strips)
    with torch.no_grad():
        assert plan_for(model, x).strips


@pytest.mark.parametrize("strip_pixels", [0, 40 * 6])
def test_cpu_bf16_autocast_runs_pytorch_ops(strip_pixels):
    """Under a CPU bf16 autocast (`test.py --amp bf16`) the plan leaves the float32-only C kernels
    and oneDNN products and PyTorch's autocast runs the products in bf16: whole maps and strips
    give outputs close to the float32 ones (mean error within 2 % of their spread; bf16 keeps 8
    bits), and not equal to them."""
    model = random_enhancer("emnet_enhancer", 32, seed=5)
    x = torch.rand(1, 3, 56, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact = fast.forward(model, x, fast.plan_for(model, x, strip_pixels=strip_pixels))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plan = fast.plan_for(model, x, strip_pixels=strip_pixels)
            low = fast.forward(model, x, plan).float()
    assert not (plan.c_kernels or plan.onednn) and plan.strips == bool(strip_pixels)
    error = (low - exact).abs()
    assert error.max() > 0 and error.mean() < 0.02 * exact.std()


def test_kernel_checks_pass_under_autocast():
    """The kernels' first-use checks compare against float32 PyTorch ops even when the first
    forward runs under a bf16 autocast (they used to fail there with a dtype error): they reach
    the same verdict with and without it."""
    def first_use(autocast: bool) -> tuple[bool, bool]:
        kernels.library.cache_clear()
        kernels.onednn_available.cache_clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return kernels.library() is not None, kernels.onednn_available()

    try:
        assert first_use(autocast=True) == first_use(autocast=False)
    finally:
        kernels.library.cache_clear()
        kernels.onednn_available.cache_clear()


@pytest.mark.slow  # compiles the network: ~30 s on 2 cores
def test_torch_compile_of_the_fast_path_on_the_cpu():
    """`torch.compile` of the fast path traces PyTorch ops on whole maps (the ctypes kernels,
    oneDNN's product and the heap trim cannot be traced; inductor failed on them) and computes
    the plain network's function."""
    model = perturbed("emnet_tiny", 8, seed=3)
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            compiled = torch.compile(fast.FastForward(model))(x)
            plain = model(x)
    finally:
        torch.compiler.reset()  # later compiles in this process (the training step's) start afresh
    assert (compiled - plain).abs().max().item() <= TOL


def test_gdfn_hidden_width_is_padded_with_exact_zeros():
    """On the CPU the GDFN's hidden 85 (dim 32) is padded to 96 for faster matrix products; the
    stored weights keep the published shapes and the padded rows/columns are zeros."""
    ffn = GDFN(32, 2.66)
    assert tuple(ffn.project_in.weight.shape) == (170, 32, 1, 1)
    w_in, w_dw, w_out = gdfn_weights(ffn, Plan(gemm_pad=True))
    assert (w_in.shape, w_dw.shape, w_out.shape) == ((192, 32), (192, 1, 3, 3), (32, 96))
    assert torch.equal(w_in[85:96], torch.zeros(11, 32)) and torch.equal(w_in[181:], torch.zeros(11, 32))
    assert torch.equal(w_in[96:181], ffn.project_in.weight.flatten(1)[85:])
    assert torch.equal(w_out[:, 85:], torch.zeros(32, 11))
    assert gdfn_weights(ffn, Plan(gemm_pad=False))[0].shape == (170, 32)


@pytest.mark.parametrize("arch,dim", [("emnet_tiny", 8), ("emnet_enhancer", 32)])
def test_row_strips_equal_whole_maps(arch, dim, with_kernels):
    """Row strips of a few rows (so every level has several strips, including a last short one)
    give the same features and output as whole maps and as the plain network."""
    model = perturbed(arch, dim, seed=5)
    x = torch.rand(2, 3, 56, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = fast.plan_for(model, x, strip_pixels=0)
        striped = fast.plan_for(model, x, strip_pixels=40 * 6)
        assert striped.strips and not striped.onednn
        full_feats = fast.forward_features(model, x, whole)
        feats = fast.forward_features(model, x, striped)
        out = fast.forward_head(model, x, feats, striped)
        plain = model(x)
    for a, b in zip(feats, full_feats):
        assert (a - b).abs().max().item() <= TOL
    assert (out - plain).abs().max().item() <= TOL


def test_inference_over_the_budget_runs_in_strips(monkeypatch):
    """When the whole image does not fit the memory budget, `enhance` runs row strips (same
    result); with gradients enabled it never does."""
    from models.inference import enhance
    from utils import config

    model = perturbed("emnet_tiny", 8, seed=7)
    x = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(8))
    plain = enhance(model, x)
    calls = []
    original = RowStrips.block
    monkeypatch.setattr(RowStrips, "block", lambda self, *a: calls.append(1) or original(self, *a))
    config.set_max_memory(1e-6)
    try:
        with pytest.warns(UserWarning, match="over the 0.0 GB budget"):
            striped = enhance(model, x)
    finally:
        config.set_max_memory(None)
    assert calls, "the strip runner was not used"
    assert (striped - plain).abs().max().item() <= TOL


@pytest.mark.parametrize("height,rows", [(7, 2), (9, 4), (5, 8), (12, 2)])
def test_strip_block_any_height(height, rows):
    """One block over strips equals the block at once for odd heights and strips taller than the
    image."""
    model = perturbed("emnet_tiny", 8, seed=9)
    blk = model.encoder_level2[0]
    t = torch.randn(1, height, 5, 16, generator=torch.Generator().manual_seed(10))
    plan = Plan(strips=True, strip_pixels=5 * rows)
    with torch.no_grad():
        torch.testing.assert_close(RowStrips(plan, t.shape[-1]).block(blk, t), block(blk, t, plan), atol=TOL, rtol=0)


def test_strips_on_wider_maps_have_fewer_pixels():
    """A strip's working memory is about the same at every level: a map with 4x the first level's
    channels gets strips of a quarter of the pixels."""
    runner = RowStrips(Plan(strips=True, strip_pixels=40 * 16), channels=8)
    assert runner._spans(torch.empty(1, 64, 40, 8))[0] == (0, 16)
    assert runner._spans(torch.empty(1, 64, 40, 32))[0] == (0, 4)


def test_row_spans_cover_the_image_in_even_strips():
    spans = list(row_spans(37, 10, strip_pixels=60))
    assert spans[0] == (0, 6) and spans[-1] == (36, 37)
    assert [r for a, b in spans for r in range(a, b)] == list(range(37))
    assert all((b - a) % 2 == 0 for a, b in spans[:-1])
    assert strips.MAPPED_BYTES > 0


def test_cpu_budget_counts_the_process_baseline_once(monkeypatch):
    """On the CPU the budget bounds the process: the memory held before the first forward is taken
    off it, measured once (memory the heap keeps after a forward does not shrink later budgets)."""
    from models.fast import budget
    from utils import config

    cpu = torch.device("cpu")
    resident = iter([2**30, 3 * 2**30])
    monkeypatch.setattr(budget, "_resident_bytes", lambda: next(resident))
    monkeypatch.setattr(config, "_baseline_bytes", None)
    config.set_max_memory(3)
    try:
        assert budget.budget_bytes(cpu) == 2 * 2**30
        assert budget.budget_bytes(cpu) == 2 * 2**30
        config.set_max_memory(0.5)
        assert budget.budget_bytes(cpu) == 0
    finally:
        config.set_max_memory(None)


def test_budget_picks_whole_maps_or_strips_by_measured_costs(monkeypatch):
    """With 3 GB for the forward, a 616x416 input at C = 32 runs whole (the default command's
    speed), a 1040x784 one in strips whose held maps and strip fit the 3 GB, in memory (larger
    inputs spill their held maps to disk: tests/test_spill.py)."""
    from models.fast import budget

    monkeypatch.setattr(budget, "budget_bytes", lambda device: 3 * 2**30)
    model = EMNetEnhancer(make_config("emnet_enhancer", 32))
    assert budget.plan_strips(model, torch.empty(1, 3, 416, 616)) is None
    strip, on_disk = budget.plan_strips(model, torch.empty(1, 3, 784, 1040))
    assert not on_disk
    held = budget.HELD_BYTES * 32 * 784 * 1040
    assert held + budget.STRIP_BYTES * 32 * strip <= 3 * 2**30 + budget.STRIP_BYTES * 32
