"""Checkpoint writing and the enhancer loader: formats, precision, wrong architectures, bad files."""
from __future__ import annotations

import os
import re

import pytest
import torch

from models.enhancer import EMNetEnhancer, make_config
from models.loading import ENHANCER_FORMAT, load_enhancer, strip_module_prefix
from utils.checkpoint import CheckpointWriter, load_checkpoint_file, save_checkpoint
from utils.errors import UserError


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_our_format(make_checkpoint):
    """Our format restores the architecture from the stored config (no flags) and every weight."""
    path, model = make_checkpoint(arch="emnet_tiny", embed_dim=8, fmt="ours", epoch=7)
    loaded, ckpt = load_enhancer(path)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert not loaded.training
    assert ckpt["epoch"] == 7 and ckpt["format"] == ENHANCER_FORMAT and ckpt["arch"] == "emnet_tiny"


def test_our_format_with_matching_flags(make_checkpoint):
    """Flags that agree with the stored config are accepted."""
    path, model = make_checkpoint(arch="emnet_tiny", embed_dim=8)
    loaded, _ = load_enhancer(path, "emnet_tiny", 8)
    assert_same_weights(loaded, model)
    loaded, _ = load_enhancer(path, None, 8)
    assert loaded.config == model.config


@pytest.mark.parametrize("arch, dim, expect", [("emnet_small", None, "--arch emnet_small --embed_dim 8"),
                                               (None, 16, "--arch emnet_tiny --embed_dim 16")])
def test_our_format_with_conflicting_flags(make_checkpoint, arch, dim, expect):
    """Flags that contradict our stored config are a UserError naming both the stored and the
    requested architecture."""
    path, _ = make_checkpoint(arch="emnet_tiny", embed_dim=8)
    with pytest.raises(UserError) as err:
        load_enhancer(path, arch, dim)
    msg = str(err.value)
    assert str(path) in msg
    assert "--arch emnet_tiny --embed_dim 8" in msg and expect in msg


@pytest.mark.parametrize("prefix", [True, False])
def test_round_trip_published_format(make_checkpoint, prefix):
    """{'epoch', 'state_dict'} with or without DataParallel's `module.` prefix loads unchanged."""
    path, model = make_checkpoint(fmt="published", module_prefix=prefix, epoch=800)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict"}
    assert all(k.startswith("module.") == prefix for k in raw["state_dict"])
    loaded, ckpt = load_enhancer(path, "emnet_tiny", 8)
    assert_same_weights(loaded, model)
    assert ckpt["epoch"] == 800


def test_bare_state_dict_loads(make_checkpoint):
    """A file holding only the state_dict loads too."""
    path, model = make_checkpoint(fmt="bare")
    loaded, _ = load_enhancer(path, "emnet_tiny", 8)
    assert_same_weights(loaded, model)


def test_published_format_defaults_to_published_network(tmp_path):
    """Without flags a published-format file is read as the published network (dim 32)."""
    model = EMNetEnhancer()
    path = tmp_path / "model_lolv1.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, _ = load_enhancer(path)
    assert loaded.config == make_config("emnet_enhancer", 32)
    assert_same_weights(loaded, model)


@pytest.mark.parametrize("fmt", ["ours", "published"])
def test_half_precision_weights_load_as_float32(make_checkpoint, fmt):
    """fp16-stored weights load into a float32 model, equal to the originals up to fp16 rounding."""
    path, model = make_checkpoint(fmt=fmt, half=True)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in stored.values())
    loaded, _ = load_enhancer(path, "emnet_tiny", 8)
    for k, v in loaded.state_dict().items():
        orig = model.state_dict()[k]
        assert v.dtype == torch.float32, k
        assert torch.equal(v, orig.half().float()), k
        torch.testing.assert_close(v, orig, atol=1e-3, rtol=1e-3)
    # and it runs
    with torch.no_grad():
        assert loaded(torch.rand(1, 3, 8, 8)).dtype == torch.float32


def _mismatch_counts(model: EMNetEnhancer, sd: dict) -> tuple[int, int, int]:
    exp = model.state_dict()
    missing = sum(k not in sd for k in exp)
    unexpected = sum(k not in exp for k in sd)
    misshaped = sum(k in sd and sd[k].shape != exp[k].shape for k in exp)
    return missing, unexpected, misshaped


@pytest.mark.parametrize("arch, dim", [("emnet_small", 8), ("emnet_tiny", 16), ("emnet_enhancer", 32)])
def test_wrong_arch_is_user_error_with_counts_and_hint(make_checkpoint, arch, dim):
    """A published-format file loaded as another architecture: one UserError that names the file,
    gives the counts of missing/unexpected/mis-shaped keys and the flags that fit the file."""
    path, model = make_checkpoint(fmt="published", arch="emnet_tiny", embed_dim=8)
    with pytest.raises(UserError) as err:
        load_enhancer(path, arch, dim)
    msg = str(err.value)
    want = _mismatch_counts(EMNetEnhancer(make_config(arch, dim)), model.state_dict())
    assert any(want), "the test case must really mismatch"
    m = re.search(r"(\d+) missing, (\d+) unexpected, (\d+) mis-shaped", msg)
    assert m, msg
    assert tuple(map(int, m.groups())) == want
    assert str(path) in msg
    assert f"--arch {arch} --embed_dim {dim}" in msg  # what was asked for
    assert "fits --arch emnet_tiny --embed_dim 8" in msg  # what would work
    assert "\n" not in msg


def test_missing_file_is_user_error(tmp_path):
    """A weights path that does not exist is a UserError naming it."""
    path = tmp_path / "nope" / "model.pth"
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_enhancer(path)


def test_directory_instead_of_file_is_user_error(tmp_path):
    """A folder given as weights is a UserError naming it."""
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        load_enhancer(tmp_path)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04garbage"])
def test_corrupt_file_is_user_error(tmp_path, content):
    """Random bytes, an empty file or a broken zip are a UserError naming the file."""
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_enhancer(path)


def test_truncated_checkpoint_is_user_error(make_checkpoint):
    """Half of a real checkpoint (an interrupted download) is a UserError naming the file."""
    path, _ = make_checkpoint(fmt="published")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_enhancer(path, "emnet_tiny", 8)


def test_non_dict_checkpoint_is_user_error(tmp_path):
    """A file that holds a tensor rather than a dict is a UserError naming the file."""
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_checkpoint_file(path)


def test_dict_without_weights_is_user_error(tmp_path):
    """A dict without a state_dict of tensors (e.g. a memory checkpoint) is a UserError."""
    path = tmp_path / "memory.pth"
    torch.save({"epoch": 3, "mem_key": torch.zeros(2, 4), "note": "x"}, path)
    with pytest.raises(UserError, match="state_dict"):
        load_enhancer(path, "emnet_tiny", 8)


def test_dict_without_weights_names_the_file(tmp_path):
    """The 'no state_dict' error names the file, like every other checkpoint error."""
    path = tmp_path / "memory.pth"
    torch.save({"epoch": 3, "mem_key": torch.zeros(2, 4)}, path)
    with pytest.raises(UserError) as err:
        load_enhancer(path, "emnet_tiny", 8)
    assert str(path) in str(err.value)


def test_our_format_with_unknown_arch_name_loads_from_config(tmp_path):
    """Our checkpoints carry their full config: without flags the stored config is used as is."""
    from conftest import random_enhancer, write_enhancer_checkpoint
    model = random_enhancer("emnet_tiny", 8)
    path = write_enhancer_checkpoint(tmp_path / "c.pth", model, "renamed_preset", epoch=0)
    loaded, _ = load_enhancer(path)
    assert_same_weights(loaded, model)


def test_strip_module_prefix():
    """Only a leading `module.` is removed."""
    sd = {"module.a.weight": 1, "b.module.c": 2, "module.module.d": 3}
    assert strip_module_prefix(sd) == {"a.weight": 1, "b.module.c": 2, "module.d": 3}


def test_save_checkpoint_leaves_no_temp_files(tmp_path):
    """save_checkpoint writes exactly the target file; overwriting replaces it whole."""
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})
    save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    ckpt = load_checkpoint_file(path)
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["w"], torch.zeros(3))


def test_failed_save_keeps_the_old_file(tmp_path):
    """A save that fails half-way (unpicklable payload) leaves the previous checkpoint intact and
    no temporary file behind."""
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(10_000), "bad": lambda: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert path.read_bytes() == before
    assert load_checkpoint_file(path)["epoch"] == 1


def test_checkpoint_writer_saves_a_snapshot_and_reports_errors(tmp_path):
    """The background writer saves the tensors as they were when `save` was called, and a failed
    write raises (once) from the next `join`."""
    writer = CheckpointWriter()
    weights = torch.zeros(3)
    writer.save([(tmp_path / "a.pth", {"w": weights, "nested": [weights]})])
    weights += 1  # the next step changes the weights while the file is being written
    writer.join()
    saved = torch.load(tmp_path / "a.pth", weights_only=True)
    assert torch.equal(saved["w"], torch.zeros(3)) and torch.equal(saved["nested"][0], torch.zeros(3))
    writer.save([(tmp_path / "no_such_folder" / "b.pth", {"w": weights})])
    with pytest.raises(FileNotFoundError):
        writer.join()
    writer.join()
