"""Which enhancer and which training images a memory comes from: the enhancer fingerprint that
keeps a memory from meeting the wrong enhancer, and per-entry sources shown by test.py."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_enhancer, write_png
from dataset.pairing import ImagePair
from models.loading import enhancer_fingerprint, load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig
from models.provenance import SOURCE_THUMB_HW, UNKNOWN, EntrySources, sources_payload
from models.refiner import build_refiner
from train_memory import restore_run
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.page import write_index
from utils.report import write_report


def small_memory(key_dim: int = 128, mem_size: int = 8) -> ExternalMemory:
    mem = ExternalMemory(MemoryConfig(mem_size=mem_size, key_dim=key_dim), torch.Generator().manual_seed(0))
    mem.top_index.copy_(torch.arange(mem_size) % 5)
    return mem


def saved(path: Path, mem: ExternalMemory, extra: dict) -> Path:
    save_checkpoint(path, memory_payload(mem, 1, "enhancer", None, extra))
    return path


# ============================================================================ fingerprint

def test_fingerprint_follows_the_weights_only():
    """Equal weights give equal fingerprints (also after a float16 round trip of float16-exact
    values); one changed weight gives another."""
    a = random_enhancer("emnet_tiny", 8, seed=0)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(p.half().float())
    b = copy.deepcopy(a)
    assert enhancer_fingerprint(a) == enhancer_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert enhancer_fingerprint(a) != enhancer_fingerprint(b)
    assert len(enhancer_fingerprint(a)) == 16


def test_memory_of_another_enhancer_same_architecture_is_one_line(tmp_path):
    """A memory filled by enhancer A, read with enhancer B of the same architecture: one UserError
    naming both files, both fingerprints and the fix (a new memory, or MEM_WEIGHTS=)."""
    a, b = random_enhancer("emnet_tiny", 8, seed=0), random_enhancer("emnet_tiny", 8, seed=1)
    path = saved(tmp_path / "mem.pth", small_memory(), {
        "enhancer_config": a.config.to_dict(), "enhancer_weights": "runs/a.pth",
        "enhancer_fingerprint": enhancer_fingerprint(a)})
    mem, ckpt = load_memory(path)
    assert build_refiner(mem, ckpt, path, a, None, None, enhancer_path="runs/a.pth") is not None
    with pytest.raises(UserError) as err:
        build_refiner(mem, ckpt, path, b, None, None, enhancer_path="runs/b.pth")
    msg = str(err.value)
    assert "\n" not in msg
    for part in (str(path), "runs/a.pth", "runs/b.pth", enhancer_fingerprint(a), enhancer_fingerprint(b),
                 "MEM_WEIGHTS=", "--pretrain_weights runs/b.pth"):
        assert part in msg, part


def test_old_memory_without_fingerprint_loads_with_a_note(tmp_path, capsys):
    """A memory written before fingerprints were stored still builds a refiner, with a note."""
    a = random_enhancer("emnet_tiny", 8, seed=0)
    path = saved(tmp_path / "old.pth", small_memory(), {"enhancer_config": a.config.to_dict()})
    mem, ckpt = load_memory(path)
    assert build_refiner(mem, ckpt, path, a, None, None, enhancer_path="w.pth") is not None
    assert "no enhancer fingerprint" in capsys.readouterr().err


def test_resume_with_another_enhancer_is_user_error(tmp_path):
    """train_memory --resume of a memory filled by another enhancer's features refuses, naming
    both weights, and leaves the file untouched."""
    a, b = random_enhancer("emnet_tiny", 8, seed=0), random_enhancer("emnet_tiny", 8, seed=1)
    path = saved(tmp_path / "memory_latest.pth", small_memory(), {
        "enhancer_weights": "a.pth", "enhancer_fingerprint": enhancer_fingerprint(a),
        "rng": torch.get_rng_state(), "sampler_rng": torch.Generator().get_state(), "best": {}})
    before = path.read_bytes()
    fresh = small_memory()
    with pytest.raises(UserError, match="a.pth.*b.pth"):
        restore_run(path, fresh, None, None, torch.Generator(), "enhancer", enhancer_fingerprint(b), "b.pth")
    assert path.read_bytes() == before
    epoch, _ = restore_run(path, fresh, None, None, torch.Generator(), "enhancer", enhancer_fingerprint(a), "a.pth")
    assert epoch == 1


# ============================================================================ entry sources

def sourced_memory(tmp_path: Path, enhancer) -> tuple[Path, list[np.ndarray]]:
    """A memory of 8 slots written by 5 training samples a..e, with their sources stored."""
    targets = [np.full((40, 60, 3), 40 * i, np.uint8) for i in range(5)]
    path = saved(tmp_path / "mem.pth", small_memory(), {
        "enhancer_config": enhancer.config.to_dict(), "enhancer_fingerprint": enhancer_fingerprint(enhancer),
        "sources": sources_payload(list("abcde"), targets)})
    return path, targets


def test_sources_round_trip(tmp_path):
    """Names and thumbnails survive save/load; slots of no known sample read "unknown"."""
    enhancer = random_enhancer("emnet_tiny", 8)
    path, _ = sourced_memory(tmp_path, enhancer)
    _, ckpt = load_memory(path)
    src = EntrySources(ckpt)
    assert src.names == list("abcde") and src.name(7) == UNKNOWN and src.name(-1) == UNKNOWN
    assert src.thumbnail(2).shape == (*SOURCE_THUMB_HW, 3) and (src.thumbnail(2) == 80).all()
    assert src.thumbnail(9) is None


def test_top_entries_rank_written_slots_only(tmp_path):
    """The refiner's top entries name the sample that wrote each best written slot, best first,
    with its cosine score. Slots never written hold the query itself as key (score 1, the highest)
    and are never shown; asked for more entries than slots are written, it shows the written ones.

    Written keys are cos(t) q + sin(t) u for the image's query q and a unit u orthogonal to it, so
    slot scores are cos(t): a 0.9, b 0.5, c 0.7, d -0.2, e 0.3."""
    enhancer = random_enhancer("emnet_tiny", 8)
    path, _ = sourced_memory(tmp_path, enhancer)
    mem, ckpt = load_memory(path)
    refiner = build_refiner(mem, ckpt, path, enhancer, None, None)
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        q = refiner.query(x)[0]
    u = torch.nn.functional.normalize(torch.randn(q.numel(), generator=torch.Generator().manual_seed(1)), dim=0)
    u = torch.nn.functional.normalize(u - (u @ q) * q, dim=0)
    written = {1: (0, 0.9), 2: (1, 0.5), 4: (2, 0.7), 5: (3, -0.2), 7: (4, 0.3)}  # slot: (sample, score)
    mem.top_index.fill_(-1)
    mem.key.copy_(q.expand_as(mem.key))
    for slot, (sample, score) in written.items():
        mem.top_index[slot] = sample
        mem.key[slot] = score * q + math.sqrt(1 - score ** 2) * u

    def shown(n: int) -> list[tuple[str, int, float]]:
        return [(e["name"], e["index"], e["score"]) for e in refiner.top_entries(x, n=n)[0]]

    assert shown(3) == [("a", 0, 0.9), ("c", 2, 0.7), ("b", 1, 0.5)]
    assert shown(8) == [("a", 0, 0.9), ("c", 2, 0.7), ("b", 1, 0.5), ("e", 4, 0.3), ("d", 3, -0.2)]


def test_old_memory_reads_unknown_sources(tmp_path):
    """A memory file without sources still loads; its entries are "unknown" with no thumbnail."""
    enhancer = random_enhancer("emnet_tiny", 8)
    path = saved(tmp_path / "old.pth", small_memory(), {"enhancer_config": enhancer.config.to_dict()})
    mem, ckpt = load_memory(path)
    refiner = build_refiner(mem, ckpt, path, enhancer, None, None)
    entries = refiner.top_entries(torch.rand(1, 3, 24, 40))[0]
    assert len(entries) == 3 and {e["name"] for e in entries} == {UNKNOWN}
    assert refiner.sources.thumbnail(entries[0]["index"]) is None


def test_recalled_entries_reach_metrics_summary_and_index(tmp_path):
    """Rows with `recalled` add a metrics.csv column and a summary.json map, and index.html shows
    each entry's thumbnail (written to recalled/) and name with the photo."""
    enhancer = random_enhancer("emnet_tiny", 8)
    path, _ = sourced_memory(tmp_path, enhancer)
    mem, ckpt = load_memory(path)
    refiner = build_refiner(mem, ckpt, path, enhancer, None, None)
    entries = refiner.top_entries(torch.rand(1, 3, 24, 40))[0]
    out = tmp_path / "result"
    low = write_png(tmp_path / "low" / "img1.png", np.zeros((8, 8, 3), np.uint8))
    write_png(out / "ori" / "img1.png", np.zeros((8, 8, 3), np.uint8))
    rows = [{"name": "img1", "mem_psnr": 20.0, "recalled": entries}]
    summary = write_report(out, rows, ["mem_psnr"], {})
    header, first = (out / "metrics.csv").read_text().splitlines()[:2]
    assert header == "name,mem_psnr,recalled"
    assert first.endswith(" ".join(f"{e['name']}:{e['score']:.4f}" for e in entries))
    assert json.loads((out / "summary.json").read_text())["recalled"]["img1"] == entries
    page = write_index(out, rows, ["mem_psnr"], summary, refiner.sources.thumbnail,
                       [ImagePair("img1", low, None)], ["ori"]).read_text()
    for e in entries:
        rel = f"recalled/{e['index']}_{e['name']}.png"
        assert (out / rel).is_file() and rel in page
