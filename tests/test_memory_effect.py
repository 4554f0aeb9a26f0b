"""What the memory did to each image, without ground truth (utils/memory_effect.py): the gain per
channel and the brightness ori -> mem, the best score's percentile among the memory's own
leave-one-out reads (models/memory.py), and test.py's files and console line that show them."""
from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import SMALL16_MEMORY, SMALL16_WEIGHTS, png_means, read_csv, run_test_py, unit, write_png
from models.loading import load_memory
from models.memory import ExternalMemory, MemoryConfig
from models.refiner import MemoryRefiner
from utils.memory_effect import UNCHANGED_PCT, ScoreReference, effect_line, measure_effect

WEIGHTS, MEMORY = SMALL16_WEIGHTS, SMALL16_MEMORY


def flat(level: tuple[int, int, int], hw=(4, 6)) -> np.ndarray:
    return np.broadcast_to(np.array(level, np.uint8), (*hw, 3)).copy()


def test_gain_and_brightness_of_hand_made_images():
    """Channel means 100/50/200 -> 110/50/100: gains 1.1, 1.0, 0.5; brightness 116.67 -> 86.67."""
    effect = measure_effect(flat((100, 50, 200)), flat((110, 50, 100)))
    assert effect.gain == pytest.approx((1.1, 1.0, 0.5))
    assert (effect.ori_brightness, effect.mem_brightness) == pytest.approx((350 / 3, 260 / 3))
    assert effect.brightness_change_pct == pytest.approx(100 * (260 / 350 - 1))
    assert effect.direction == "darkened"
    assert measure_effect(flat((0, 0, 0)), flat((0, 0, 9))).gain == (1.0, 1.0, float("inf"))


@pytest.mark.parametrize("ori, mem, direction", [(250, 251, "unchanged"), (250, 249, "unchanged"),
                                                 (100, 101, "brightened"), (100, 99, "darkened")])
def test_unchanged_means_within_the_tolerance(ori, mem, direction):
    """250 -> 251 is +0.4 %, inside the 0.5 % tolerance; 100 -> 101 is +1 %, outside."""
    assert UNCHANGED_PCT == 0.5
    assert measure_effect(flat((ori,) * 3), flat((mem,) * 3)).direction == direction


def test_percentile_is_monotone_in_the_score():
    """Non-decreasing over increasing scores, 0 below every reference score, 100 at the highest,
    and one step up at each reference score."""
    ref = np.random.default_rng(0).uniform(0.9, 1.0, 200)
    rank = ScoreReference(ref).percentile
    scores = np.linspace(0.85, 1.0, 500)
    got = [rank(s) for s in scores]
    assert all(a <= b for a, b in zip(got, got[1:]))
    assert rank(0.85) == 0.0 and rank(ref.max()) == 100.0
    below, at = np.nextafter(np.sort(ref)[49], 0), np.sort(ref)[49]
    assert (rank(below), rank(at)) == (24.5, 25.0)
    assert ScoreReference(np.zeros(0)).percentile(0.5) is None


def test_leave_one_out_skips_the_same_sample_and_unwritten_slots():
    """Slots 0 and 1 (sample 7) share a key and never read each other; slot 2 (sample 8) is 60
    degrees from them; slot 3 is unwritten and never read; each slot's best is another sample's."""
    mem = ExternalMemory(MemoryConfig(mem_size=4, key_dim=3))
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    mem.key.copy_(unit([1, 0, 0], [1, 0, 0], [c, s, 0], [1, 0, 0]))
    mem.top_index.copy_(torch.tensor([7, 7, 8, -1]))
    assert mem.leave_one_out_scores().tolist() == pytest.approx([c, c, c])
    mem.top_index.fill_(-1)  # none written (a published file): all slots, each without itself
    assert mem.leave_one_out_scores().tolist() == pytest.approx([1, 1, c, 1])


class FixedQuery(nn.Module):
    """A query encoder that answers `query` for every image."""

    def __init__(self, query: torch.Tensor):
        super().__init__()
        self.query = query

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        return self.query.expand(len(low), -1)


def at(degrees: float) -> list[float]:
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


@pytest.mark.parametrize("query, percentile", [(5, 100.0), (45, 50.0), (75, 50.0), (-90, 0.0)])
def test_recalled_entries_carry_their_percentile(query, percentile):
    """Keys at 0, 10, 60 and 90 degrees (one sample each) read each other at cos 10, cos 10,
    cos 30, cos 30; a query at 45 degrees scores cos 15 against its best (60), above half of them."""
    mem = ExternalMemory(MemoryConfig(mem_size=4, key_dim=2))
    mem.key.copy_(unit(at(0), at(10), at(60), at(90)))
    mem.top_index.copy_(torch.arange(4))
    refiner = MemoryRefiner(FixedQuery(unit(at(query))), mem)
    best = refiner.top_entries(torch.zeros(2, 3, 4, 4))[1][0]
    assert best["percentile"] == percentile


def test_console_line_counts_each_direction():
    effects = [measure_effect(flat((100,) * 3), flat((m,) * 3)) for m in (90, 95, 100, 120)]
    assert effect_line(effects).startswith("memory effect on 4 images: brightened 1, darkened 2, unchanged 1 ")


# ----------------------------------------------------------------------------- test.py, no ground truth

@pytest.fixture(scope="module")
def photos_run(tmp_path_factory):
    """test.py with the bundled small16 enhancer and memory on three small photos without
    ground truth (--pictures)."""
    tmp = tmp_path_factory.mktemp("effect_run")
    rng = np.random.default_rng(0)
    for name, level in (("dim", 10), ("mid", 40), ("warm", 70)):
        coarse = rng.random((4, 5, 3)).astype(np.float32) * level * np.array([1.3, 1.0, 0.7], np.float32)
        img = cv2.resize(coarse, (96, 64)) + rng.normal(0, 2, (64, 96, 3))
        write_png(tmp / "photos" / f"{name}.png", np.clip(img, 0, 255).astype(np.uint8))
    result = tmp / "res"
    proc = run_test_py("--weights", WEIGHTS, "--mem_weights", MEMORY, "--input_dir", tmp / "photos",
                       "--result_dir", result, "--pictures", "--device", "cpu", timeout=600)  # ~10 s idle
    assert proc.returncode == 0, proc.stderr
    return {"proc": proc, "result": result}



def test_metrics_csv_gain_and_brightness_are_those_of_the_written_pngs(photos_run):
    result = photos_run["result"]
    fields, rows = read_csv(result / "metrics.csv")
    assert fields == ["name", "gain_r", "gain_g", "gain_b", "ori_brightness", "mem_brightness",
                      "brightness_change_pct", "brightness_effect", "recall_score", "recall_percentile", "memory",
                      "memory_reason", "recalled"]
    summary = json.loads((result / "summary.json").read_text())["memory_effect"]
    for r in rows:
        ori, mem = png_means(result / "ori" / f"{r['name']}.png"), png_means(result / "mem" / f"{r['name']}.png")
        assert [float(r[f"gain_{c}"]) for c in "rgb"] == pytest.approx(mem / ori, abs=1e-4)
        assert (float(r["ori_brightness"]), float(r["mem_brightness"])) == pytest.approx((ori.mean(), mem.mean()), abs=0.01)
        assert float(r["brightness_change_pct"]) == pytest.approx(100 * (mem.mean() / ori.mean() - 1), abs=0.01)
        assert summary["images"][r["name"]]["gain_r"] == pytest.approx(float(r["gain_r"]))
        assert float(r["recall_score"]) == float(r["recalled"].split()[0].split(":")[1])


def test_console_line_counts_the_pngs(photos_run):
    """The console's counts equal those computed from the PNGs with the stated 0.5 % tolerance."""
    result = photos_run["result"]
    counts = {"brightened": 0, "darkened": 0, "unchanged": 0}
    for name in ("dim", "mid", "warm"):
        change = 100 * (png_means(result / "mem" / f"{name}.png").mean() / png_means(result / "ori" / f"{name}.png").mean() - 1)
        counts["unchanged" if abs(change) < 0.5 else "brightened" if change > 0 else "darkened"] += 1
    want = (f"memory effect on 3 images: brightened {counts['brightened']}, darkened {counts['darkened']}, "
            f"unchanged {counts['unchanged']} (unchanged: |mean brightness change| < 0.5%); abstained on 0")
    assert any(line.startswith(want) for line in photos_run["proc"].stdout.splitlines())
    assert json.loads((result / "summary.json").read_text())["memory_effect"]["counts"] == counts


def test_percentile_ranks_the_score_among_the_memory_s_own_reads(photos_run):
    """Each image's recall_percentile is the share of the bundled memory's leave-one-out scores,
    computed here slot by slot, that are at most its recall_score."""
    memory, _ = load_memory(MEMORY)
    written = [i for i in range(memory.config.mem_size) if memory.top_index[i] >= 0]
    keys = memory.key[written].double()
    own = []
    for a in range(len(written)):
        others = [b for b in range(len(written)) if memory.top_index[written[b]] != memory.top_index[written[a]]]
        own.append(float((keys[others] @ keys[a]).max()))
    _, rows = read_csv(photos_run["result"] / "metrics.csv")
    for r in rows:
        score = float(r["recall_score"])
        assert float(r["recall_percentile"]) == pytest.approx(100 * np.mean(np.array(own) <= score), abs=0.051)


def test_page_shows_the_effect_columns_without_ground_truth(photos_run):
    """No high/: the table has the effect columns (not `name` alone) and a mean row with numbers."""
    result = photos_run["result"]
    page = (result / "index.html").read_text()
    fields, rows = read_csv(result / "metrics.csv")
    assert re.findall(r'<th class="sortable" data-col="([^"]*)">', page) == fields[:-1]
    mean_row = re.search(r'<tr class="mean"><td>mean</td>(.*?)</tr>', page).group(1)
    mean_gain_r = np.mean([float(r["gain_r"]) for r in rows])
    assert re.findall(r'<td[^>]*>([^<]*)</td>', mean_row)[0] == f"{mean_gain_r:.4f}"
    assert "memory effect on 3 images" in page
