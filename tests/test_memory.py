"""The external-memory stage: the update rule, read, correction, query encoders, triplet loss,
memory checkpoints (ours and the published format), the refiner's checks, and train_memory.py /
test.py end to end on tiny enhancers (emnet_tiny, embed_dim 8), tiny memories and synthetic pairs."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_test_cli import assert_user_error, read_csv

from conftest import published_memory, random_enhancer, run_script, write_enhancer_checkpoint, write_png
from models.enhancer import EMNetEnhancer, make_config
from models.inference import enhance
from models.loading import load_enhancer, load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig, pooled_value, refine_with_memory
from models.query import (
    RESNET18_URL,
    EnhancerQuery,
    QueryHead,
    ResNet18Query,
    build_query_encoder,
    threshold_triplet_loss,
)
from models.read_settings import ReadSettings
from models.refiner import build_refiner
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8

MEM_COLUMNS = ["ori_psnr", "ori_ssim", "ori_gt_mean_psnr", "mem_psnr", "mem_ssim", "mem_gt_mean_psnr"]


def run_py(script: str, *args: str | Path, env_extra: dict[str, str] | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repo root, one thread unless OMP_NUM_THREADS says otherwise."""
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return run_script(script, *args, timeout=timeout, env_extra={**threads, **(env_extra or {})})


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ============================================================================ update rule

def unit_memory(keys, values, ages=None, threshold=0.05, age_noise=0.0, index=None) -> ExternalMemory:
    """A memory whose buffers are set by hand (p = 1: values are RGB triples)."""
    keys = F.normalize(torch.as_tensor(keys, dtype=torch.float32), dim=1)
    values = torch.as_tensor(values, dtype=torch.float32)
    m, k = keys.shape
    mem = ExternalMemory(MemoryConfig(mem_size=m, key_dim=k, pooling_size=1, threshold=threshold,
                                      age_noise=age_noise))
    mem.key.copy_(keys)
    mem.value.copy_(values)
    mem.age.copy_(torch.as_tensor(ages if ages is not None else [0.0] * m, dtype=torch.float32))
    mem.top_index.copy_(torch.as_tensor(index if index is not None else list(range(100, 100 + m))))
    return mem


def grey(*levels: float) -> torch.Tensor:
    """RGB values with the three channels equal, one row per level."""
    return torch.tensor([[v] * 3 for v in levels], dtype=torch.float32)


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def snapshot(mem: ExternalMemory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mem.state_dict().items()}


def test_update_match_batch_of_one():
    """B = 1, a query whose top-1 slot's value is within the threshold matches: that slot's key
    becomes normalise(key + query) and its age 0; its value and top_index stay; every other slot
    ages by 1 and is otherwise untouched."""
    mem = unit_memory(torch.eye(4), grey(0.1, 0.3, 0.5, 0.7), ages=[3, 5, 7, 9])
    before = snapshot(mem)
    q = unit([1.0, 0.5, 0.0, 0.0])
    matched = mem.update(q, grey(0.12), torch.tensor([7]))  # |0.1 - 0.12| = 0.02 < 0.05
    assert matched.tolist() == [True]
    assert torch.allclose(mem.key[0], F.normalize(before["key"][0] + q[0], dim=0), atol=1e-6)
    assert torch.equal(mem.key[1:], before["key"][1:])
    assert torch.equal(mem.value, before["value"])
    assert torch.equal(mem.top_index, before["top_index"])
    assert mem.age.tolist() == [0, 6, 8, 10]


def test_update_no_match_overwrites_oldest_batch_of_one():
    """B = 1, a query whose top-1 slot's value is too far overwrites the oldest slot (not its
    top-1 slot): key = query, value = target, top_index = the sample index, age 0; the others age."""
    torch.manual_seed(0)
    mem = unit_memory(torch.eye(4), grey(0.1, 0.3, 0.5, 0.7), ages=[3, 50, 7, 9], age_noise=1.0)
    before = snapshot(mem)
    q = unit([1.0, 0.2, 0.0, 0.0])  # top-1 is slot 0, whose value 0.1 is far from 0.9
    matched = mem.update(q, grey(0.9), torch.tensor([42]))
    assert matched.tolist() == [False]
    assert torch.allclose(mem.key[1], q[0])
    assert torch.allclose(mem.value[1], grey(0.9)[0])
    assert mem.top_index.tolist() == [100, 42, 102, 103]
    assert mem.age.tolist() == [4, 0, 8, 10]
    for slot in (0, 2, 3):
        assert torch.equal(mem.key[slot], before["key"][slot])
        assert torch.equal(mem.value[slot], before["value"][slot])


def test_update_two_queries_on_one_slot_both_count():
    """Two matching queries with the same top-1 slot: key = normalise(key + q1 + q2)."""
    mem = unit_memory(torch.eye(4), grey(0.1, 0.3, 0.5, 0.7), ages=[3, 5, 7, 9])
    before = snapshot(mem)
    q = unit([1.0, 0.3, 0.0, 0.0], [1.0, 0.0, 0.4, 0.0])
    matched = mem.update(q, grey(0.11, 0.09), torch.tensor([1, 2]))
    assert matched.tolist() == [True, True]
    expect = F.normalize(before["key"][0] + q[0] + q[1], dim=0)
    assert torch.allclose(mem.key[0], expect, atol=1e-6)
    assert not torch.allclose(mem.key[0], F.normalize(before["key"][0] + q[1], dim=0), atol=1e-3)
    assert mem.age.tolist() == [0, 6, 8, 10]
    assert torch.equal(mem.value, before["value"]) and torch.equal(mem.top_index, before["top_index"])


def test_update_mixed_batch():
    """A batch of matched and unmatched queries: the mask is the matched pattern; the unmatched
    ones get distinct slots among the oldest; a matched slot is never overwritten, even when it
    is the oldest of all."""
    torch.manual_seed(0)
    # slot 0 is the oldest but is matched in this batch; then come 3 (30) and 4 (20)
    mem = unit_memory(torch.eye(6), grey(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), ages=[40, 1, 2, 30, 20, 10],
                      age_noise=1.0)
    before = snapshot(mem)
    q = unit([1, 0.1, 0, 0, 0, 0], [0, 1, 0.2, 0, 0, 0], [0, 0.3, 1, 0, 0, 0], [0, 0, 0.1, 0, 0, 1])
    target = grey(0.11, 0.9, 0.95, 0.58)  # q0 matches slot 0, q3 matches slot 5, q1 and q2 do not
    index = torch.tensor([10, 11, 12, 13])
    matched = mem.update(q, target, index)
    assert matched.tolist() == [True, False, False, True]
    assert torch.allclose(mem.key[0], F.normalize(before["key"][0] + q[0], dim=0), atol=1e-6)
    assert torch.allclose(mem.key[5], F.normalize(before["key"][5] + q[3], dim=0), atol=1e-6)
    written = {int(s) for s in (mem.top_index != before["top_index"]).nonzero().flatten()}
    assert written == {3, 4}
    for slot in written:  # each written slot holds one unmatched query's key, value and index
        i = int(mem.top_index[slot]) - 10
        assert i in (1, 2)
        assert torch.allclose(mem.key[slot], q[i]) and torch.allclose(mem.value[slot], target[i])
    assert {int(mem.top_index[s]) for s in written} == {11, 12}  # distinct slots
    assert torch.equal(mem.value[[0, 1, 2, 5]], before["value"][[0, 1, 2, 5]])
    assert mem.age.tolist() == [0, 2, 3, 0, 0, 0]


def test_update_more_unmatched_than_free_slots_last_win():
    """5 queries on a 3-slot memory, one matched: the 2 free slots take the LAST 2 unmatched
    queries (docstring: 'the last ones win'); the matched slot keeps its moved key."""
    torch.manual_seed(0)
    mem = unit_memory(torch.eye(3), grey(0.1, 0.2, 0.3), ages=[1, 5, 9], age_noise=0.5)
    before = snapshot(mem)
    q = unit([1, 0.1, 0], [0, 1, 0.1], [0.1, 0, 1], [0.2, 1, 0], [0, 0.2, 1])
    target = grey(0.1, 0.9, 0.8, 0.7, 0.6)
    matched = mem.update(q, target, torch.tensor([0, 1, 2, 3, 4]))
    assert matched.tolist() == [True, False, False, False, False]
    assert torch.allclose(mem.key[0], F.normalize(before["key"][0] + q[0], dim=0), atol=1e-6)
    assert mem.top_index[0] == 100 and torch.equal(mem.value[0], before["value"][0])
    assert sorted(mem.top_index[1:].tolist()) == [3, 4]
    for slot in (1, 2):
        i = int(mem.top_index[slot])
        assert torch.allclose(mem.key[slot], q[i]) and torch.allclose(mem.value[slot], target[i])
    assert mem.age.tolist() == [0, 0, 0]


def test_update_all_slots_matched_drops_the_unmatched():
    """Every slot is matched in the batch, so no slot is free: the unmatched query is dropped
    and no matched slot is overwritten (a `new[-free:]` with free == 0 would keep them all)."""
    mem = unit_memory(torch.eye(2), grey(0.1, 0.9), ages=[3, 4])
    before = snapshot(mem)
    q = unit([1, 0.1], [0.1, 1], [1, 0.2])
    matched = mem.update(q, grey(0.1, 0.9, 0.5), torch.tensor([0, 1, 2]))
    assert matched.tolist() == [True, True, False]
    assert torch.equal(mem.value, before["value"])
    assert torch.equal(mem.top_index, before["top_index"])
    assert torch.allclose(mem.key[0], F.normalize(before["key"][0] + q[0], dim=0), atol=1e-6)
    assert torch.allclose(mem.key[1], F.normalize(before["key"][1] + q[1], dim=0), atol=1e-6)


def test_initial_banks():
    """A new memory: unit keys, values in [0, 1] of width 3 p^2, ages 0, top_index -1."""
    mem = ExternalMemory(MemoryConfig(mem_size=16, key_dim=8, pooling_size=2), torch.Generator().manual_seed(0))
    assert mem.key.shape == (16, 8) and torch.allclose(mem.key.norm(dim=1), torch.ones(16))
    assert mem.value.shape == (16, 12) and 0 <= mem.value.min() and mem.value.max() <= 1
    assert mem.age.eq(0).all() and mem.top_index.eq(-1).all()


# ============================================================================ read

def test_read_top1_and_topk():
    """k = 1 returns the best slot's value; k > 1 the softmax(score)-weighted mean of the top-k."""
    values = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 0.9], [0.8, 0.0, 0.6], [1.0, 1.0, 1.0]])
    mem = unit_memory(torch.eye(4), values)
    q = unit([0.9, 0.5, 0.2, 0.0])
    s = q[0].tolist()  # scores against the unit keys: the query's components
    assert torch.allclose(mem.read(q, 1), values[[0]])
    for k in (2, 3):
        e = [math.exp(s[i]) for i in range(k)]
        expect = sum(e[i] / sum(e) * values[i] for i in range(k))
        assert torch.allclose(mem.read(q, k)[0], expect, atol=1e-6), k
    # a batch reads each query independently
    q2 = torch.cat([q, unit([0, 0, 0.1, 1])])
    assert torch.allclose(mem.read(q2, 1), values[[0, 3]])


# ============================================================================ correction

def test_refine_gain_one_when_recalled_equals_mean():
    """p = 1: m = per-channel mean of clamp(y) gives gain 1, so the output is clamp(y)."""
    torch.manual_seed(0)
    y = torch.rand(2, 3, 20, 24) * 1.2 - 0.1  # some values outside [0, 1]
    m = y.clamp(0, 1).mean(dim=(2, 3))
    out = refine_with_memory(y, m, 1)
    assert torch.allclose(out, y.clamp(0, 1), atol=1e-6)


def test_refine_known_example():
    """y = 0.2 everywhere; m = (0.4, 0.2, 0.1): channel gains a1 + a2 * m / mu with
    (a1, a2) = softmax(mu, m): 0.2 * (a1 + 2 a2), 0.2, 0.2 * (a1 + 0.5 a2)."""
    y = torch.full((1, 3, 8, 8), 0.2)
    out = refine_with_memory(y, torch.tensor([[0.4, 0.2, 0.1]]), 1)

    def gain(mu, m):
        a1, a2 = math.exp(mu) / (math.exp(mu) + math.exp(m)), math.exp(m) / (math.exp(mu) + math.exp(m))
        return a1 + a2 * m / mu

    assert gain(0.2, 0.4) == pytest.approx(1 + 1 / (1 + math.exp(-0.2)))  # 1.5498...
    expect = [0.2 * gain(0.2, 0.4), 0.2, 0.2 * gain(0.2, 0.1)]
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((8, 8), expect[c]), atol=1e-6), c


def test_refine_pooling_mean_same_gain_all_channels():
    """`pooling_mean`: one gain (the mean of the three channel gains) multiplies every channel."""
    torch.manual_seed(1)
    y = torch.rand(1, 3, 16, 16) * 0.4 + 0.1
    m = torch.tensor([[0.5, 0.2, 0.3]])
    out = refine_with_memory(y, m, 1, pooling_mean=True)
    ratio = out / y
    assert torch.allclose(ratio, ratio[0, 0, 0, 0].expand_as(ratio), atol=1e-5)
    per_channel = refine_with_memory(y, m, 1) / y
    assert ratio[0, 0, 0, 0] == pytest.approx(float(per_channel[0, :, 0, 0].mean()), abs=1e-5)
    assert not torch.allclose(per_channel[0, 0], per_channel[0, 1])  # the channels do differ


@pytest.mark.parametrize("size", [(32, 32), (37, 53)])
def test_refine_p2_identity_when_quadrant_means_match(size):
    """p = 2 (odd sizes too): the output has the input's size; recalled values equal to y's
    2x2 adaptive-pool means give gain 1 everywhere (output == y)."""
    torch.manual_seed(2)
    y = torch.rand(2, 3, *size) * 0.8 + 0.1
    m = pooled_value(y, 2)
    out = refine_with_memory(y, m, 2)
    assert out.shape == y.shape
    assert torch.allclose(out, y, atol=1e-6)


def test_refine_p2_gain_is_bilinear():
    """p = 2 on a constant image with two recalled levels: the gain map is exact at the four
    corners, varies smoothly in between (bilinear, not 4 blocks) and stays between the extremes."""
    y = torch.full((1, 3, 37, 53), 0.3)
    levels = torch.tensor([[0.3, 0.6], [0.3, 0.6]])  # left column keeps 0.3, right column 0.6
    m = levels.flatten().repeat(3)[None]  # channel-major (B, 3 * 2 * 2)
    g = refine_with_memory(y, m, 2)[0, 0] / 0.3
    a2 = 1 / (1 + math.exp(-0.3))  # softmax(0.3, 0.6)[1]
    g_right = (1 - a2) + a2 * 2
    assert float(g[0, 0]) == pytest.approx(1, abs=1e-5) and float(g[-1, 0]) == pytest.approx(1, abs=1e-5)
    assert float(g[0, -1]) == pytest.approx(g_right, abs=1e-5)
    assert float(g[-1, -1]) == pytest.approx(g_right, abs=1e-5)
    row = g[18]
    assert torch.all(row[1:] >= row[:-1] - 1e-6)  # monotone from left to right
    assert len(torch.unique(torch.round(row * 1e4))) > 10  # smooth, not two blocks
    assert g.min() >= 1 - 1e-5 and g.max() <= g_right + 1e-5


def test_refine_clamps_to_unit_range():
    """Inputs outside [0, 1] and large gains still give outputs in [0, 1]; bright pixels saturate."""
    y = torch.linspace(-0.5, 1.5, 3 * 10 * 10).reshape(1, 3, 10, 10)
    out = refine_with_memory(y, torch.tensor([[1.0, 1.0, 1.0]]), 1)
    assert out.min() >= 0 and out.max() <= 1
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0


def test_pooled_value():
    """Shape (B, 3 p^2); p = 1 gives the channel means; p = 2 is channel-major quadrant means."""
    torch.manual_seed(3)
    img = torch.rand(2, 3, 20, 30)
    for p in (1, 2, 3):
        assert pooled_value(img, p).shape == (2, 3 * p * p)
    assert torch.allclose(pooled_value(img, 1), img.mean(dim=(2, 3)), atol=1e-6)
    v = pooled_value(img, 2)
    assert torch.allclose(v[:, 0], img[:, 0, :10, :15].mean(dim=(1, 2)), atol=1e-6)  # R top-left
    assert torch.allclose(v[:, 5], img[:, 1, :10, 15:].mean(dim=(1, 2)), atol=1e-6)  # G top-right
    assert torch.allclose(v[:, 11], img[:, 2, 10:, 15:].mean(dim=(1, 2)), atol=1e-6)  # B bottom-right


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


# ============================================================================ checkpoints

def tiny_memory(key_dim=128, mem_size=16, p=1, seed=0) -> ExternalMemory:
    g = torch.Generator().manual_seed(seed)
    mem = ExternalMemory(MemoryConfig(mem_size=mem_size, key_dim=key_dim, pooling_size=p, threshold=0.01,
                                      age_noise=2.0), g)
    mem.age.copy_(torch.randint(0, 50, (mem_size,), generator=g).float())
    mem.top_index.copy_(torch.randint(-1, 100, (mem_size,), generator=g))
    return mem


def save_memory(path: Path, mem: ExternalMemory, head=None, query_encoder="enhancer", extra=None) -> Path:
    save_checkpoint(path, memory_payload(mem, 7, query_encoder, head, extra or {}))
    return path


def random_head(dim: int) -> QueryHead:
    head = QueryHead(dim)
    with torch.no_grad():
        head.proj.weight.normal_(0, 0.05)
    return head


@pytest.mark.parametrize("with_head", [False, True])
def test_memory_checkpoint_round_trip(tmp_path, with_head):
    """memory_payload -> save_checkpoint -> load_memory: equal buffers, equal config, the query
    encoder, epoch and (optional) head weights preserved; build_refiner rebuilds the same head."""
    mem = tiny_memory(p=2)
    head = random_head(128) if with_head else None
    enhancer = random_enhancer("emnet_tiny", 8)
    path = save_memory(tmp_path / "mem.pth", mem, head,
                       extra={"enhancer_config": enhancer.config.to_dict(), "best": {"mem_psnr": 1.5}})
    loaded, ckpt = load_memory(path)
    assert loaded.config == mem.config
    for name, buf in mem.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], buf), name
    assert ckpt["query_encoder"] == "enhancer" and ckpt["epoch"] == 7 and ckpt["best"] == {"mem_psnr": 1.5}
    refiner = build_refiner(loaded, ckpt, path, enhancer, ReadSettings(top_k=1))
    if with_head:
        assert torch.equal(ckpt["head_state_dict"]["proj.weight"], head.proj.weight)
        assert torch.equal(refiner.head.proj.weight, head.proj.weight)
    else:
        assert ckpt["head_state_dict"] is None and refiner.head is None


@pytest.mark.parametrize("width,p", [(3, 1), (12, 2)])
def test_published_memory_loads(tmp_path, width, p):
    """A published {'epoch','mem_key','mem_vale','mem_age','mem_index'} file loads with the
    resnet18 query, no head, and p from the value width (3 -> 1, 12 -> 2)."""
    path = published_memory(tmp_path / "published.pth", 20, width)
    raw = torch.load(path, weights_only=True)
    mem, ckpt = load_memory(path)
    assert ckpt["query_encoder"] == "resnet18" and ckpt["head_state_dict"] is None
    assert (mem.config.mem_size, mem.config.key_dim, mem.config.pooling_size) == (20, 512, p)
    assert torch.equal(mem.key, raw["mem_key"]) and torch.equal(mem.value, raw["mem_vale"])
    assert torch.equal(mem.top_index, raw["mem_index"]) and torch.equal(mem.age, raw["mem_age"])


def test_published_memory_bad_width(tmp_path):
    """A value width that is not 3 p^2 (5) is a UserError naming the file."""
    path = published_memory(tmp_path / "published.pth", 8, 5)
    with pytest.raises(UserError) as err:
        load_memory(path)
    assert str(path) in str(err.value)


def test_enhancer_checkpoint_is_not_a_memory(make_checkpoint):
    """An enhancer checkpoint given to load_memory is a UserError naming the file."""
    path, _ = make_checkpoint()
    with pytest.raises(UserError) as err:
        load_memory(path)
    assert str(path) in str(err.value) and "not an external-memory checkpoint" in str(err.value)


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


# ============================================================================ end to end

def write_pairs(root: Path, names, size, seed) -> Path:
    """Dark random low images and their brighter ground truth (3x, clipped)."""
    rng = np.random.default_rng(seed)
    for n in names:
        low = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
        write_png(root / "low" / f"{n}.png", low)
        write_png(root / "high" / f"{n}.png", np.clip(low.astype(int) * 3 + 10, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny enhancer checkpoint, 4 training pairs (64x64) and 2 validation pairs (odd 59x77)."""
    tmp = tmp_path_factory.mktemp("memory_e2e")
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", epoch=3)
    return {"tmp": tmp, "weights": weights, "train": write_pairs(tmp / "train", "abcd", (64, 64), 1),
            "val": write_pairs(tmp / "val", "xy", (59, 77), 2), "save": tmp / "runs"}


RUN_FLAGS = {"plain": (), "learned": ("--learn_query", "--pos_thres", "0.2")}


def train_args(setup: dict, env: str, *extra, mem_size: int = 32) -> list:
    return ["--pretrain_weights", setup["weights"], "--train_dir", setup["train"], "--val_dir", setup["val"],
            "--nepoch", "2", "--val_time", "1", "--mem_size", mem_size, "--batch_size", "2", "--train_ps", "48",
            "--save_dir", setup["save"], "--env", env, "--device", "cpu", "--query_encoder", "enhancer", *extra]


@pytest.fixture(scope="module")
def trained(setup) -> dict:
    """train_memory.py for 2 epochs, without and with --learn_query."""
    return {name: run_py("train_memory.py", *train_args(setup, name, *flags)) for name, flags in RUN_FLAGS.items()}


@pytest.fixture(scope="module")
def tested(setup, trained) -> dict:
    """test.py --save_images on the validation pairs with each run's memory_best.pth."""
    out = {}
    for name in RUN_FLAGS:
        assert_ok(trained[name])
        result = setup["tmp"] / f"result_{name}"
        proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                      "--mem_weights", setup["save"] / name / "models" / "memory_best.pth",
                      "--result_dir", result, "--save_images", "--device", "cpu")
        out[name] = {"proc": proc, "result": result}
    return out


def best_logged(log: str) -> tuple[float, float]:
    """(best val mem PSNR, its ori PSNR) from the 'finished:' line of train.log."""
    m = re.search(r"finished: best val mem PSNR ([\d.]+) at epoch \d+ \(ori ([\d.]+)\)", log)
    assert m, log
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("name", list(RUN_FLAGS))
def test_train_memory_outputs(setup, trained, name):
    """Exit 0; models/memory_latest.pth and memory_best.pth, options.yml and train.log with val
    ori / mem PSNR lines; a learned head is stored (and trained) only with --learn_query."""
    assert_ok(trained[name])
    env = setup["save"] / name
    for f in ("models/memory_latest.pth", "models/memory_best.pth", "options.yml", "train.log"):
        assert (env / f).is_file(), f
    log = (env / "train.log").read_text()
    assert len(re.findall(r"epoch \d: val ori PSNR [\d.]+ SSIM [\d.]+ \| mem PSNR [\d.]+", log)) == 2, log
    options = yaml.safe_load((env / "options.yml").read_text())
    assert options["learn_query"] is (name == "learned") and options["query_encoder"] == "enhancer"
    assert options["memory"]["mem_size"] == 32 and options["memory"]["key_dim"] == 128
    mem, ckpt = load_memory(env / "models" / "memory_latest.pth")
    assert ckpt["epoch"] == 2 and ckpt["query_encoder"] == "enhancer"
    assert int((mem.top_index >= 0).sum()) == 8  # 4 pairs x 2 epochs, no match at threshold 1e-5
    if name == "learned":
        assert ckpt["head_state_dict"]["proj.weight"].abs().max() > 0
    else:
        assert ckpt["head_state_dict"] is None


@pytest.mark.parametrize("name", list(RUN_FLAGS))
def test_test_py_with_trained_memory(setup, trained, tested, name):
    """test.py --mem_weights memory_best.pth: ori/ and mem/ PNGs at the input sizes; metrics.csv
    with ori_* and mem_* columns; the mean mem PSNR equals the best val mem PSNR the trainer
    logged for the same pairs (within 0.05 dB: it refines the 8-bit outputs, test.py the float
    ones), and the ori PSNR equals the logged one."""
    proc, result = tested[name]["proc"], tested[name]["result"]
    assert_ok(proc)
    for stage in ("ori", "mem"):
        for n in "xy":
            img = cv2.imread(str(result / stage / f"{n}.png"))
            assert img is not None and img.shape == (59, 77, 3), (stage, n)
    fields, rows = read_csv(result / "metrics.csv")
    assert fields == ["name", *MEM_COLUMNS, "recalled"] and [r["name"] for r in rows] == ["x", "y"]
    summary = json.loads((result / "summary.json").read_text())
    _, ckpt = load_memory(setup["save"] / name / "models" / "memory_best.pth")
    for r in rows:  # the recalled entries name training images of this memory, as in summary.json
        entries = summary["recalled"][r["name"]]
        assert r["recalled"] == " ".join(f"{e['name']}:{e['score']:.4f}" for e in entries)
        assert entries and all(e["name"] in ckpt["sources"]["names"] for e in entries)
    mem_psnr, ori_psnr = best_logged((setup["save"] / name / "train.log").read_text())
    assert summary["mean"]["mem_psnr"] == pytest.approx(mem_psnr, abs=0.05)
    assert summary["mean"]["ori_psnr"] == pytest.approx(ori_psnr, abs=1e-3)
    assert summary["query_encoder"] == "enhancer"


def test_mem_image_is_the_refiner_output(setup, tested):
    """The saved mem/ image is the refiner's correction of the enhancer output (in-process)."""
    assert_ok(tested["plain"]["proc"])
    model, _ = load_enhancer(setup["weights"])
    path = setup["save"] / "plain" / "models" / "memory_best.pth"
    mem, ckpt = load_memory(path)
    refiner = build_refiner(mem, ckpt, path, model, ReadSettings(top_k=1))
    x = image_to_tensor(read_image(setup["val"] / "low" / "x.png"))
    expect = to_uint8(tensor_to_image(refiner(x, enhance(model, x))))
    got = to_uint8(read_image(tested["plain"]["result"] / "mem" / "x.png"))
    assert np.abs(expect.astype(int) - got.astype(int)).max() <= 1


def test_resume_continues_exactly(setup, trained):
    """--resume --nepoch 3 after the finished 2-epoch --learn_query run logs 'resuming at epoch 2',
    ends at epoch 3, and gives the same memory and head as an uninterrupted 3-epoch run."""
    assert_ok(trained["learned"])
    shutil.copytree(setup["save"] / "learned", setup["save"] / "resumed")
    flags = (*RUN_FLAGS["learned"], "--nepoch", "3")
    proc = run_py("train_memory.py", *train_args(setup, "resumed", *flags, "--resume"))
    assert_ok(proc)
    log = (setup["save"] / "resumed" / "train.log").read_text()
    assert "resuming at epoch 2" in log and "epoch 3: val ori PSNR" in log
    assert "epoch 4" not in log
    fresh = run_py("train_memory.py", *train_args(setup, "fresh3", *flags))
    assert_ok(fresh)
    a = torch.load(setup["save"] / "resumed" / "models" / "memory_latest.pth", weights_only=True)
    b = torch.load(setup["save"] / "fresh3" / "models" / "memory_latest.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in ("mem_key", "mem_vale", "mem_age", "mem_index"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["head_state_dict"]["proj.weight"], b["head_state_dict"]["proj.weight"])


def test_enhanced_dir_matches_normal_run(setup, tested):
    """test.py --enhanced_dir on a copy of the ori/ outputs: ori metrics identical (same images),
    mem metrics within 0.05 dB of the normal run's."""
    assert_ok(tested["plain"]["proc"])
    enhanced = setup["tmp"] / "enhanced"
    shutil.copytree(tested["plain"]["result"] / "ori", enhanced)
    result = setup["tmp"] / "result_enhanced"
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", setup["save"] / "plain" / "models" / "memory_best.pth",
                  "--enhanced_dir", enhanced, "--result_dir", result, "--device", "cpu")
    assert_ok(proc)
    _, normal = read_csv(tested["plain"]["result"] / "metrics.csv")
    _, other = read_csv(result / "metrics.csv")
    assert [r["name"] for r in other] == [r["name"] for r in normal]
    for a, b in zip(normal, other):
        for c in ("ori_psnr", "ori_ssim", "ori_gt_mean_psnr"):
            assert a[c] == b[c], c
        assert float(a["mem_psnr"]) == pytest.approx(float(b["mem_psnr"]), abs=0.05)
    assert json.loads((result / "summary.json").read_text())["enhanced_dir"] == str(enhanced)


def test_enhanced_dir_missing_image(setup, tested):
    """--enhanced_dir lacking one input's image: exit 2, one error line naming --enhanced_dir."""
    assert_ok(tested["plain"]["proc"])
    partial = setup["tmp"] / "enhanced_partial"
    partial.mkdir()
    shutil.copy(tested["plain"]["result"] / "ori" / "x.png", partial / "x.png")
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", setup["save"] / "plain" / "models" / "memory_best.pth",
                  "--enhanced_dir", partial, "--result_dir", setup["tmp"] / "r_partial", "--device", "cpu")
    error = assert_user_error(proc, partial)
    assert "--enhanced_dir" in error and "y" in error


def test_enhanced_dir_without_mem_weights(setup, tested):
    """--enhanced_dir without --mem_weights: exit 2, one error line naming --mem_weights."""
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--enhanced_dir", tested["plain"]["result"] / "ori",
                  "--result_dir", setup["tmp"] / "r_nomem", "--device", "cpu")
    assert_user_error(proc, "--mem_weights")


def test_published_memory_with_resnet18_through_test_py(setup, resnet_file, tmp_path):
    """The issue's done-when: a published-format memory (9000 x 512, p = 1) and a torchvision
    resnet18 state_dict passed as --query_weights run through test.py (exit 0, mem/ written);
    without --query_weights and with an empty TORCH_HOME: exit 2 with one error line."""
    mem_file = published_memory(tmp_path / "memory_lolv1.pth", 9000, 3)
    result = tmp_path / "result"
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", mem_file, "--query_weights", resnet_file,
                  "--result_dir", result, "--save_images", "--device", "cpu")
    assert_ok(proc)
    for n in "xy":
        assert cv2.imread(str(result / "mem" / f"{n}.png")).shape == (59, 77, 3)
    assert json.loads((result / "summary.json").read_text())["query_encoder"] == "resnet18"
    home = tmp_path / "empty_home"
    home.mkdir()
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", mem_file, "--result_dir", tmp_path / "r2", "--device", "cpu",
                  env_extra={"TORCH_HOME": str(home)})
    error = assert_user_error(proc, home / "hub" / "checkpoints" / Path(RESNET18_URL).name)
    assert "--query_weights" in error


# ============================================================================ bad input

@pytest.mark.parametrize("flags,must_contain", [
    (("--resume",), "nothing to resume"),
    (("--K_feat_dim", "64"), "--K_feat_dim 64 does not match the enhancer query width and p = 1 (--pooling_size), which has 128"),
    (("--V_feat_dim", "6"), "--V_feat_dim 6"),
], ids=["resume_nothing", "K_feat_dim", "V_feat_dim"])
def test_train_memory_bad_flags(setup, tmp_path, flags, must_contain):
    """Flags train_memory.py cannot honour: exit 2, one 'error:' line, no traceback."""
    args = train_args(setup, "bad", *flags)
    args[args.index("--save_dir") + 1] = tmp_path / "runs"
    assert_user_error(run_py("train_memory.py", *args), must_contain)


@pytest.mark.parametrize("flags", [("--testing_top_k", "0"), ("--testing_top_k", "33"), ("--mem_size", "0")])
def test_train_memory_bad_top_k_or_mem_size(flags):
    """--testing_top_k outside [1, mem_size] (0 would silently recall zeros, 33 > 32 crash at the
    first validation) and --mem_size 0 are refused up front (checked in-process: memory_config)."""
    from train_memory import get_args_parser, memory_config, read_config

    args = get_args_parser().parse_args(["--mem_size", "32", *flags])
    with pytest.raises(UserError, match="--testing_top_k"):
        memory_config(args, 128, read_config(args)[0].top_k)
    ok = get_args_parser().parse_args(["--mem_size", "32", "--testing_top_k", "32", "--pooling_size", "2"])
    assert memory_config(ok, 128, read_config(ok)[0].top_k) == MemoryConfig(
        mem_size=32, key_dim=128, pooling_size=2, threshold=1e-5)


@pytest.mark.parametrize("flags,mem_size", [(RUN_FLAGS["learned"], 64)], ids=["mem_size"])
def test_resume_with_other_flags_is_user_error(setup, trained, flags, mem_size):
    """--resume with another --mem_size (it crashed in load_state_dict): exit 2, one error line
    naming the checkpoint, which is left untouched."""
    assert_ok(trained["learned"])
    env = f"resume_mismatch_{mem_size}"
    shutil.copytree(setup["save"] / "learned", setup["save"] / env)
    latest = setup["save"] / env / "models" / "memory_latest.pth"
    before = latest.read_bytes()
    proc = run_py("train_memory.py", *train_args(setup, env, *flags, "--nepoch", "3", "--resume", mem_size=mem_size))
    assert_user_error(proc, latest)
    assert latest.read_bytes() == before


def test_resume_takes_the_run_flags_and_clear_cache_removes_the_passes(setup, trained, tmp_path):
    """--resume of the --learn_query run without --learn_query continues with the head (the flag
    comes from the checkpoint; before, it was dropped or refused); a flag given again with another
    value is named in one log line. The run ends by saying how large its pass cache is, and
    --clear_cache removes it."""
    assert_ok(trained["learned"])
    env = "resume_restores"
    shutil.copytree(setup["save"] / "learned", setup["save"] / env)
    cache = tmp_path / "cache"
    args = train_args(setup, env, "--nepoch", "3", "--resume", "--val_time", "2", "--cache_dir", cache)
    assert_ok(run_py("train_memory.py", *args))
    latest = torch.load(setup["save"] / env / "models" / "memory_latest.pth", map_location="cpu", weights_only=False)
    assert latest["epoch"] == 3 and latest["head_state_dict"] is not None
    log = (setup["save"] / env / "train.log").read_text()
    changed = [line for line in log.splitlines() if "given again" in line]
    assert len(changed) == 1 and "--nepoch 2 -> 3" in changed[0] and "--val_time 1 -> 2" in changed[0], changed
    assert re.search(r"cached enhancer passes: 2 files, [\d.]+ GB in " + re.escape(str(cache)), log), log
    assert_ok(run_py("train_memory.py", *args[:-2], "--cache_dir", cache, "--nepoch", "4", "--clear_cache"))
    assert "--clear_cache: removed 2 cached enhancer passes" in (setup["save"] / env / "train.log").read_text()
    assert not any(cache.rglob("*.pt"))

def test_enhancer_query_in_chunks_equals_one_by_one():
    """A batch larger than EnhancerQuery.CHUNK gives the same queries as one image at a time."""
    from models.query import EnhancerQuery

    torch.manual_seed(0)
    encoder = EnhancerQuery(EMNetEnhancer(make_config("emnet_tiny", 8)).eval())
    x = torch.rand(EnhancerQuery.CHUNK + 3, 3, 24, 24)
    together = encoder(x)
    alone = torch.cat([encoder(x[i:i + 1]) for i in range(len(x))])
    assert together.shape == (len(x), encoder.dim)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
