"""The bundled checkpoints reproduce the model card: eval15 means to 0.01 dB PSNR (the card's
numbers live in pre_trained_logs/model_card.json, written from measured test.py runs)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from dataset.pairing import find_pairs
from models.evaluate import evaluate_pairs
from models.loading import load_enhancer, load_memory
from models.refiner import build_refiner
from utils.report import mean_scores

pytestmark = pytest.mark.slow  # re-scores both bundled pairs on eval15 (~2 min on a 2-core CPU)

CARD = REPO / "pre_trained_logs" / "model_card.json"
ENTRIES = json.loads(CARD.read_text())["eval15"] if CARD.is_file() else []


def test_card_lists_every_bundled_checkpoint():
    bundled = {str(p.relative_to(REPO)) for p in (REPO / "pre_trained_logs").rglob("*.pth")}
    carded = {e["weights"] for e in ENTRIES} | {e["mem_weights"] for e in ENTRIES}
    assert bundled and bundled == carded


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["weights"].split("/")[-1] for e in ENTRIES])
def test_bundled_checkpoints_reproduce_card_on_eval15(entry, lol_root):
    model, _ = load_enhancer(REPO / entry["weights"])
    memory, ckpt = load_memory(REPO / entry["mem_weights"])
    refiner = build_refiner(memory, ckpt, entry["mem_weights"], model, None, None)
    pairs = find_pairs(lol_root / "eval15")
    assert len(pairs) == 15
    rows = evaluate_pairs(model, pairs, torch.device("cpu"), refiner=refiner, progress=False)
    got = mean_scores(rows, list(entry["mean"]))
    for key, want in entry["mean"].items():
        tol = 0.01 if "psnr" in key else 1e-4
        assert abs(got[key] - want) <= tol, (key, got[key], want)
