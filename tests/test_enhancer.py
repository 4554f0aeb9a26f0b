"""The enhancer network: published names/shapes, any-size inference, features, presets, math."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import random_enhancer
from models.enhancer import ARCH_PRESETS, MDTA, ChannelLayerNorm, EMNetEnhancer, EnhancerConfig, make_config
from models.inference import BORDER_MARGIN, MULTIPLE, enhance, enhance_with_features, pad_for_network, pad_to_multiple
from models.loading import describe_config, infer_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "emnet_enhancer_state_dict_shapes.json"
PUBLISHED_PARAMS = 12_544_484
PUBLISHED_TENSORS = 505


@pytest.fixture(scope="module")
def published_model() -> EMNetEnhancer:
    return EMNetEnhancer()


@pytest.fixture(scope="module")
def tiny() -> EMNetEnhancer:
    return random_enhancer("emnet_tiny", 8, seed=1)


def test_default_config_is_the_published_one():
    """EnhancerConfig() and the emnet_enhancer preset are the published hyper-parameters."""
    c = EnhancerConfig()
    assert (c.embed_dim, c.num_blocks, c.heads) == (32, (4, 6, 6, 8), (1, 2, 4, 8))
    assert (c.num_refinement_blocks, c.num_latent_decoder_blocks, c.ffn_expansion_factor) == (4, 1, 2.66)
    assert make_config("emnet_enhancer", 32) == c


def test_state_dict_matches_published_fixture(published_model):
    """Every name and shape of the published state_dict, no more and no less."""
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} not found")
    expected = {k: tuple(v) for k, v in json.loads(FIXTURE.read_text()).items()}
    assert len(expected) == PUBLISHED_TENSORS
    got = {k: tuple(v.shape) for k, v in published_model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [], "names missing from the model"
    assert sorted(set(got) - set(expected)) == [], "names the published checkpoint does not have"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    assert sum(math.prod(s) for s in expected.values()) == PUBLISHED_PARAMS


def test_published_parameter_count(published_model):
    """12,544,484 trainable parameters in 505 tensors, and no buffers."""
    params = list(published_model.parameters())
    assert sum(p.numel() for p in params) == PUBLISHED_PARAMS
    assert len(params) == PUBLISHED_TENSORS
    assert len(published_model.state_dict()) == PUBLISHED_TENSORS


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (8, 8), (9, 17)])
def test_enhance_any_size(tiny, hw):
    """`enhance` takes sizes that are not multiples of 8 (even 1x1) and returns the input's size,
    clamped to [0, 1]."""
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    y = enhance(tiny, x)
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert y.min() >= 0 and y.max() <= 1


def test_enhance_without_margin_on_multiple_of_8_is_the_plain_forward(tiny):
    """--border_margin 0 (the original code): no padding when none is needed, enhance ==
    clamp(model(x)) (the fast path equals the plain network to rounding)."""
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny(x).clamp(0, 1)
    torch.testing.assert_close(enhance(tiny, x, margin=0), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(16, 24), (21, 30)])
def test_enhance_margin_is_a_reflected_border_cropped_after(tiny, hw):
    """The default margin reflects BORDER_MARGIN pixels on every side (then pads to 8) and crops
    the network output back to the input's pixels."""
    m = BORDER_MARGIN
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (m, m, m, m), mode="reflect")
    padded = F.pad(padded, (0, -padded.shape[-1] % 8, 0, -padded.shape[-2] % 8), mode="reflect")
    with torch.no_grad():
        ref = tiny(padded)[..., m:m + hw[0], m:m + hw[1]].clamp(0, 1)
    torch.testing.assert_close(enhance(tiny, x), ref, atol=1e-6, rtol=0)
    y, features = enhance_with_features(tiny, x)
    assert torch.equal(y, enhance(tiny, x))
    assert features[-1].shape[-2:] == (padded.shape[-2] // 8, padded.shape[-1] // 8)


def test_pad_for_network_rejects_a_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        pad_for_network(torch.zeros(1, 3, 8, 8), -1)


def test_enhance_batch_items_are_independent(tiny):
    """An image's output does not depend on the other images of its batch."""
    x = torch.rand(2, 3, 21, 30, generator=torch.Generator().manual_seed(3))
    both = enhance(tiny, x)
    torch.testing.assert_close(both[1:], enhance(tiny, x[1:]), atol=1e-5, rtol=0)


def test_pad_to_multiple():
    """Pads at the bottom/right only, to multiples of 8, keeping the top-left content."""
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    p, h, w = pad_to_multiple(x)
    assert (h, w) == (5, 7) and p.shape[-2:] == (MULTIPLE, MULTIPLE)
    assert torch.equal(p[..., :5, :7], x)
    one = torch.full((1, 3, 1, 1), 0.25)
    p1, _, _ = pad_to_multiple(one)
    assert p1.shape[-2:] == (8, 8) and torch.all(p1 == 0.25)
    same, _, _ = pad_to_multiple(torch.zeros(1, 3, 16, 8))
    assert same.shape[-2:] == (16, 8)


def test_forward_features_strides(tiny):
    """forward_features gives [level1, level2, level3, latent] at strides 1, 2, 4, 8 with
    C, 2C, 4C, 8C channels, and forward == forward_head(forward_features)."""
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        feats = tiny.forward_features(x)
        assert len(feats) == 4
        c = tiny.config.embed_dim
        for i, f in enumerate(feats):
            s = 2 ** i
            assert f.shape == (1, c * s, 32 // s, 48 // s)
        torch.testing.assert_close(tiny.forward_head(x, feats), tiny(x))


def test_global_residual():
    """The output is conv(features) + input: with the last conv zeroed the network is the identity."""
    model = random_enhancer("emnet_tiny", 8)
    with torch.no_grad():
        model.output.weight.zero_()
        x = torch.rand(1, 3, 8, 16)
        assert torch.equal(model(x), x)


@pytest.mark.parametrize("arch", sorted(ARCH_PRESETS))
@pytest.mark.parametrize("dim", [8, 16])
def test_infer_config_round_trip(arch, dim):
    """The config read off a preset's state_dict is that preset, and describe_config names it as
    the flags that rebuild it."""
    model = EMNetEnhancer(make_config(arch, dim))
    inferred = infer_config(model.state_dict())
    assert inferred == model.config
    assert describe_config(inferred) == f"--arch {arch} --embed_dim {dim}"


def test_infer_config_published(published_model):
    """The published network's state_dict (with the `module.` prefix stripped) is recognised."""
    assert describe_config(infer_config(published_model.state_dict())) == "--arch emnet_enhancer --embed_dim 32"


def test_presets_are_distinct():
    """No two presets are the same network (describe_config would name the wrong one)."""
    configs = [c.to_dict() for c in ARCH_PRESETS.values()]
    assert all(configs.count(c) == 1 for c in configs)
    assert {"emnet_enhancer", "emnet_small", "emnet_tiny"} <= set(ARCH_PRESETS)


def test_config_dict_round_trip():
    """to_dict/from_dict round trip (used to store the config in checkpoints)."""
    for cfg in ARCH_PRESETS.values():
        d = cfg.to_dict()
        assert isinstance(d["num_blocks"], list)
        assert EnhancerConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_make_config_unknown_arch():
    """An unknown --arch names the valid choices."""
    with pytest.raises(KeyError, match="emnet_tiny"):
        make_config("nope", 8)


def test_describe_custom_config():
    """A config that is no preset is spelled out rather than given a wrong preset name."""
    cfg = make_config("emnet_tiny", 8)
    cfg.num_refinement_blocks = 3
    assert describe_config(cfg).startswith("a custom config")


def test_channel_layer_norm_matches_reference():
    """ChannelLayerNorm == F.layer_norm over the channels of the channels-last permutation
    (Restormer's "WithBias" LayerNorm, eps 1e-5, biased variance)."""
    g = torch.Generator().manual_seed(0)
    ln = ChannelLayerNorm(6)
    with torch.no_grad():
        ln.body.weight.copy_(torch.randn(6, generator=g))
        ln.body.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(2, 6, 5, 7, generator=g) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.body.weight, ln.body.bias, eps=1e-5)
    torch.testing.assert_close(ln(x), ref.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_mdta_matches_per_head_reference():
    """MDTA == the per-head formulation of docs/METHOD.md: L2-normalise q, k over space, softmax of
    (q k^T) * temperature over channels, times v, then the 1x1 projection."""
    g = torch.Generator().manual_seed(0)
    dim, heads = 8, 2
    m = MDTA(dim, heads)
    with torch.no_grad():
        m.temperature.copy_(torch.rand(heads, 1, 1, generator=g) + 0.5)
    x = torch.randn(1, dim, 4, 6, generator=g)
    with torch.no_grad():
        q, k, v = m.qkv_dwconv(m.qkv(x)).chunk(3, dim=1)
        outs = []
        ch = dim // heads
        for h in range(heads):
            qh = q[0, h * ch:(h + 1) * ch].reshape(ch, -1)
            kh = k[0, h * ch:(h + 1) * ch].reshape(ch, -1)
            vh = v[0, h * ch:(h + 1) * ch].reshape(ch, -1)
            qh = qh / qh.norm(dim=1, keepdim=True)
            kh = kh / kh.norm(dim=1, keepdim=True)
            attn = torch.softmax(qh @ kh.T * m.temperature[h, 0, 0], dim=1)
            outs.append(attn @ vh)
        ref = m.project_out(torch.cat(outs).reshape(1, dim, 4, 6))
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
