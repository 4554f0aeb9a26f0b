"""models/memory.py: the external memory's update rule, its read, the gain correction
(refine_with_memory) and pooled_value, on memories whose slots are set by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import filled_memory, grey, unit
from models.memory import ExternalMemory, MemoryConfig, pooled_value, refine_with_memory

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


def test_read_skips_unwritten_slots():
    """Random never-written slots are not recalled, even when a query points at one of them."""
    mem = filled_memory(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.2, 0.3, 0.4]]))
    written = mem.top_index >= 0
    query = F.normalize(mem.key[~written][:1], dim=1)  # exactly an unwritten key
    assert torch.equal(mem.read(query), mem.value[written])


def test_read_leave_one_out_masks_the_samples_own_slots():
    keys = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    values = torch.tensor([[0.1] * 3, [0.5] * 3, [0.9] * 3])
    mem = filled_memory(keys, values)
    q = F.normalize(keys, dim=1)
    assert torch.equal(mem.read(q), values)  # each finds itself
    loo = mem.read(q, exclude=torch.arange(3))
    assert torch.equal(loo, values[[1, 0, 1]])  # each finds its nearest other sample


def test_read_temperature_sharpens_topk_weights():
    """softmax(score / T): T -> 0 approaches the top-1 value; the release's T = 1 averages
    nearly uniformly over close cosine scores."""
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.7, 0.714]])
    values = torch.tensor([[0.1] * 3, [0.5] * 3, [0.9] * 3])
    mem = filled_memory(keys, values)
    q = torch.tensor([[1.0, 0.0]])
    sharp, flat = mem.read(q, 3, 0.01), mem.read(q, 3, 1.0)
    assert abs(sharp[0, 0] - 0.1) < 0.01
    assert abs(flat[0, 0] - values[:, 0].mean()) < 0.1


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


def test_strength_zero_is_identity_and_one_reaches_the_recalled_colour():
    y = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(0)) * 0.5
    m = torch.tensor([[0.3, 0.35, 0.4]])
    assert torch.equal(refine_with_memory(y, m, 1, strength=0.0), y)
    full = refine_with_memory(y, m, 1, strength=1.0)
    torch.testing.assert_close(full.mean(dim=(2, 3)), m, atol=1e-5, rtol=0)
    half = refine_with_memory(y, m, 1, strength=0.5).mean(dim=(2, 3))
    torch.testing.assert_close(half, (y.mean(dim=(2, 3)) + m) / 2, atol=1e-5, rtol=0)


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
