"""models.fast.spill: the strip runner's whole maps kept on disk for photos whose maps exceed the
memory budget. The data survive `release`, which hands the pages back to the OS; ordinary tensors
are never touched; a full disk is a one-line error; the results equal whole maps."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from conftest import random_enhancer
from models import fast
from models.enhancer import EMNetEnhancer, make_config
from models.fast import budget, spill, strips
from utils.errors import UserError

pytestmark = pytest.mark.skipif(not spill.available(), reason="spilling needs Linux (shared file maps, madvise)")
TOL = 1e-4


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_release_hands_pages_back_and_keeps_the_data(tmp_path, monkeypatch):
    """A 64 MiB spilled map: written, it is resident; released, it is not, and reading it again
    gives the same values. The file is unlinked from the start (nothing is left on disk)."""
    monkeypatch.setenv("EMNET_SPILL_DIR", str(tmp_path))
    t = spill.empty((64, 2**18), torch.float32)
    assert list(tmp_path.iterdir()) == []
    before = resident_mb()
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape))
    written = resident_mb()
    spill.release(t[:32])
    half = resident_mb()
    spill.release(t)
    released = resident_mb()
    assert written - before > 60 and written - half > 28 and written - released > 60
    assert torch.equal(t[5], torch.arange(5 * 2**18, 6 * 2**18, dtype=torch.float32))
    assert spill.is_spilled(t[3]) and not spill.is_spilled(torch.zeros(3))


def test_release_leaves_ordinary_tensors_alone():
    t = torch.arange(2**20, dtype=torch.float32)
    spill.release(t)
    assert torch.equal(t, torch.arange(2**20, dtype=torch.float32))


def test_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("EMNET_SPILL_DIR", str(tmp_path))
    monkeypatch.setattr(spill.os, "posix_fallocate", no_room)
    with pytest.raises(UserError, match=rf"in {tmp_path} \(No space left on device\).*EMNET_SPILL_DIR") as err:
        spill.empty((2**20,), torch.float32)
    assert "\n" not in str(err.value)


def test_spilled_strips_equal_whole_maps(tmp_path, monkeypatch):
    """With every map spilled (no size threshold) the features, their statistics (read in row
    chunks) and the output equal the whole-image forward."""
    monkeypatch.setenv("EMNET_SPILL_DIR", str(tmp_path))
    monkeypatch.setattr(strips, "MAPPED_BYTES", 0)
    model = random_enhancer("emnet_tiny", 8, seed=11, scale=0.05)
    x = torch.rand(1, 3, 64, 40, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        whole = fast.plan_for(model, x, strip_pixels=0)
        spilled = fast.plan_for(model, x, strip_pixels=40 * 6, spill=True)
        assert spilled.spill and spilled.strips
        ref = fast.forward_features(model, x, whole)
        feats = fast.forward_features(model, x, spilled)
        assert all(spill.is_spilled(f) for f in feats)
        for a, b in zip(fast.feature_statistics(ref), fast.feature_statistics(feats)):
            torch.testing.assert_close(torch.cat(b, dim=1), torch.cat(a, dim=1), atol=1e-5, rtol=1e-5)
        out = fast.forward_head(model, x, feats, spilled)
        torch.testing.assert_close(out, fast.forward_head(model, x, ref, whole), atol=TOL, rtol=0)


def test_budget_spills_what_it_cannot_hold(monkeypatch):
    """With 3 GB for the forward, a 12-megapixel input at C = 32 runs in strips with its held maps
    on disk, its strips and 3-channel maps within the budget, and no warning; without spilling
    (other platforms) the held maps alone are over it, which a warning says."""
    monkeypatch.setattr(budget, "budget_bytes", lambda device: 3 * 2**30)
    model = EMNetEnhancer(make_config("emnet_enhancer", 32))
    x = torch.empty(1, 3, 3016, 4016)
    strip, on_disk = budget.plan_strips(model, x)
    assert on_disk and strip >= budget.MIN_STRIP
    assert budget.RESIDENT_BYTES * x[0, 0].numel() + budget.STRIP_BYTES * 32 * strip <= 3 * 2**30
    assert budget.plan_strips(model, torch.empty(1, 3, 784, 1040))[1] is False
    monkeypatch.setattr(spill, "available", lambda: False)
    with pytest.warns(UserWarning, match=r"4016x3016 input needs about 1[0-9]\.\d GB .*feature maps alone"):
        assert budget.plan_strips(model, x) == (budget.MIN_STRIP, False)


def test_chunk_statistics_equal_the_whole_reduction():
    f = torch.randn(2, 5, 37, 11, generator=torch.Generator().manual_seed(3)) * 3 + 1
    mean, std = spill.chunk_statistics(f, chunk_bytes=2 * 5 * 11 * 4 * 4)  # 4 rows a chunk
    torch.testing.assert_close(mean, f.mean(dim=(2, 3)))
    torch.testing.assert_close(std, f.flatten(2).std(dim=2, unbiased=False))


def test_filesystem_of_takes_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/vdb /tmp/big\\040disk xfs rw 0 0\n"
                      "broken line\n")
    assert spill.filesystem_of("/tmp/x", str(mounts)) == "tmpfs"
    assert spill.filesystem_of("/tmp/big disk/y", str(mounts)) == "xfs"
    assert spill.filesystem_of("/tmpfoo", str(mounts)) == "ext4"
    assert spill.filesystem_of("/x", str(tmp_path / "missing")) is None


def test_spill_dir_avoids_a_temporary_folder_in_memory(monkeypatch, tmp_path):
    """Spilling into tmpfs would keep the maps in memory: /var/tmp is used instead, unless
    EMNET_SPILL_DIR names a folder."""
    monkeypatch.delenv("EMNET_SPILL_DIR", raising=False)
    monkeypatch.setattr(spill, "filesystem_of", lambda folder: "tmpfs")
    assert spill.spill_dir() == "/var/tmp"
    monkeypatch.setattr(spill, "filesystem_of", lambda folder: "ext4")
    assert spill.spill_dir() == spill.tempfile.gettempdir()
    monkeypatch.setenv("EMNET_SPILL_DIR", str(tmp_path))
    assert spill.spill_dir() == str(tmp_path)
