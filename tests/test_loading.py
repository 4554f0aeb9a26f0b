"""models/loading.py's memory checkpoints: ours round-trips, the published release's format loads
(p from the value width), and a wrong file is one UserError naming it."""
from __future__ import annotations

import pytest
import torch

from conftest import published_memory, random_enhancer, save_memory, tiny_memory
from models.loading import check_memory_flags, check_model_files, load_memory
from models.memory import MemoryConfig
from models.query import QueryHead
from models.read_settings import ReadSettings
from models.refiner import build_refiner
from utils.errors import UserError

# ============================================================================ checkpoints

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


def test_memory_flags_not_given_pass_and_each_mismatch_names_flag_and_both_values():
    """--mem_size/--K_feat_dim/--V_feat_dim: None (not given) and matching values pass; a mismatch
    names the flag, the given value and the memory's (V_feat_dim counts p * p values per channel)."""
    config = MemoryConfig(mem_size=12, key_dim=8, pooling_size=2)
    check_memory_flags(None, None, None, config, "memory m.pth")
    check_memory_flags(12, 8, 4, config, "memory m.pth")
    for given, flag, value, actual in (((13, None, None), "--mem_size", 13, 12),
                                       ((None, 9, None), "--K_feat_dim", 9, 8),
                                       ((None, None, 2), "--V_feat_dim", 2, 4)):
        with pytest.raises(UserError, match=f"^{flag} {value} does not match memory m.pth, which has {actual};"):
            check_memory_flags(*given, config, "memory m.pth")


def test_model_files_missing_are_named_in_one_error_and_none_is_not_checked(tmp_path):
    """Every missing file given is named in one UserError; None (not given, or --weights with
    --enhanced_dir) and existing files pass."""
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    check_model_files(present, None, None)
    check_model_files(None, present, None)
    with pytest.raises(UserError, match=r"^these files do not exist: --weights a\.pth, --query_weights q\.pth;"):
        check_model_files("a.pth", present, "q.pth")
