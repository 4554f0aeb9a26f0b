"""models/read_settings.py: one type for how a memory is read, built from its checkpoint and the flags."""
from __future__ import annotations

import math

import pytest
import torch

from models.memory import ExternalMemory, MemoryConfig
from models.read_settings import ReadSettings, parse_strength
from utils.errors import UserError


def flags(*argv: str):
    """test.py's read flags as parsed from `argv`."""
    from test import get_args_parser

    return get_args_parser().parse_args(["--input_dir", "x", *argv])


def test_defaults_are_the_release_and_a_checkpoint_without_settings_reads_so():
    assert ReadSettings() == ReadSettings(top_k=1, temperature=1.0, strength=None, pooling_mean=False)
    assert ReadSettings.from_checkpoint({"query_encoder": "enhancer"}) == ReadSettings(query_encoder="enhancer")


def test_checkpoint_round_trip_stores_the_read_entry_in_its_order():
    read = ReadSettings(top_k=3, temperature=0.05, strength=0.6, pooling_mean=True, query_encoder="enhancer")
    stored = read.to_checkpoint()
    assert list(stored) == ["top_k", "temperature", "strength", "pooling_mean"]
    assert ReadSettings.from_checkpoint({"read": stored, "query_encoder": "enhancer"}) == read


def test_flags_not_given_keep_the_stored_settings_and_given_ones_replace_them():
    stored = ReadSettings(top_k=3, temperature=0.05, strength=0.6, pooling_mean=True, query_encoder="enhancer")
    assert stored.with_flags(flags()) == stored
    changed = stored.with_flags(flags("--testing_top_k", "1", "--temperature", "2", "--strength", "release"))
    assert (changed.top_k, changed.temperature, changed.strength, changed.pooling_mean) == (1, 2.0, None, True)


def test_no_pooling_mean_turns_a_stored_one_off():
    """--pooling_mean was a store_true switch: it could not turn off a memory's stored True."""
    stored = ReadSettings(pooling_mean=True)
    assert stored.with_flags(flags("--no-pooling_mean")).pooling_mean is False
    assert ReadSettings().with_flags(flags("--pooling_mean")).pooling_mean is True


def test_strength_flag_values():
    assert parse_strength("release") is None and parse_strength("0.6") == 0.6
    assert ReadSettings(strength=None).strength_flag == "release" and ReadSettings(strength=0.5).strength_flag == 0.5
    with pytest.raises(UserError, match="--strength 'auto'"):
        parse_strength("auto")  # "auto" means something to train_memory.py only


def hand_built_memory() -> ExternalMemory:
    """4 written slots with 2-d keys at known angles and one-hot colour values: slot 0 key (1, 0)
    red, slot 1 (0, 1) green, slot 2 (cos 60, sin 60) blue, slot 3 (-1, 0) green."""
    memory = ExternalMemory(MemoryConfig(mem_size=4, key_dim=2, pooling_size=1))
    memory.key.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]]))
    memory.value.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    memory.top_index.copy_(torch.arange(4))
    return memory


def test_recall_weighs_the_top_k_slots_by_softmax_of_score_over_temperature():
    """Query (1, 0) scores the slots 1, 0, 0.5, -1 and query (0, 1) scores 0, 1, sqrt(3)/2, 0: with
    k = 2 and T = 0.5 each recalls its two best slots' values weighted exp(score / T)."""
    memory = hand_built_memory()
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = math.e
    red_weight = e ** 2 / (e ** 2 + e ** 1)  # slots 0 (score 1) and 2 (score 0.5), over T = 0.5
    green_weight = e ** 2 / (e ** 2 + e ** math.sqrt(3))  # slots 1 (score 1) and 2 (sqrt(3)/2)
    expected = torch.tensor([[red_weight, 0, 1 - red_weight], [0, green_weight, 1 - green_weight]])
    recalled = ReadSettings(top_k=2, temperature=0.5).recall(memory, q)
    assert torch.allclose(recalled, expected, atol=1e-6)
    assert torch.equal(ReadSettings(top_k=1).recall(memory, q), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_correct_applies_the_strength_and_one_gain_for_all_channels():
    """An output of constant colour (0.2, 0.4, 0.4) and a recalled (0.4, 0.4, 0.8): ratios (2, 1, 2);
    strength 0.5 gives gains (1.5, 1, 1.5), and pooling_mean their mean 4/3 on every channel."""
    y = torch.tensor([0.2, 0.4, 0.4])[None, :, None, None].expand(1, 3, 4, 4)
    recalled = torch.tensor([[0.4, 0.4, 0.8]])
    per_channel = ReadSettings(strength=0.5).correct(y, recalled, 1)
    assert torch.allclose(per_channel, y * torch.tensor([1.5, 1.0, 1.5])[None, :, None, None])
    assert torch.allclose(ReadSettings(strength=0.5, pooling_mean=True).correct(y, recalled, 1), y * 4 / 3)
