"""models/read_settings.py: one type for how a memory is read, built from its checkpoint and the flags."""
from __future__ import annotations

import pytest
import torch

from models.memory import ExternalMemory, MemoryConfig, refine_with_memory
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


def test_recall_and_correct_are_the_memory_read_and_the_refinement():
    torch.manual_seed(0)
    memory = ExternalMemory(MemoryConfig(mem_size=8, key_dim=4, pooling_size=1), torch.Generator().manual_seed(0))
    memory.top_index[:] = torch.arange(8)
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    read = ReadSettings(top_k=3, temperature=0.1, strength=0.7, pooling_mean=True)
    assert torch.equal(read.recall(memory, q), memory.read(q, 3, 0.1))
    y = torch.rand(2, 3, 8, 8)
    recalled = read.recall(memory, q)
    assert torch.equal(read.correct(y, recalled, 1), refine_with_memory(y, recalled, 1, True, 0.7))
