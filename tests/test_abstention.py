"""models/abstention.py: the memory corrects the scenes it has seen and leaves the others as the
enhancer made them; the rule is fitted on reads of unseen scenes, stored in the memory file and
read back; files without one correct every image, as before."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from conftest import random_enhancer, save_memory, tiny_memory
from models.abstention import fit_bounds, scene_match, scene_vectors
from models.inference import enhance
from models.loading import load_memory
from models.provenance import sources_payload
from models.read_settings import ReadSettings
from models.refiner import build_refiner, refiner_from_flags
from utils.errors import UserError
from utils.image_io import tensor_to_image, to_uint8


def stripes(freq: float, phase: float) -> torch.Tensor:
    """(1, 3, 32, 48) dim low-light input with a scene of its own (stripes)."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    img = 0.1 + 0.08 * torch.sin(freq * xx + phase * yy / 8)
    return img.expand(1, 3, 32, 48).contiguous()


def test_fit_abstains_on_unseen_scenes_where_correcting_them_loses():
    """Unseen-scene reads that lose: the bound lands on the largest match, so none is corrected."""
    matches, scores = np.array([0.2, 0.5, 0.7, 0.4]), np.array([0.9, 0.95, 0.97, 0.99])
    min_score, min_scene = fit_bounds("scene", np.array([-1.0, -0.2, -0.5, -0.1]), scores, matches)
    assert min_score is None and min_scene == 0.7


def test_fit_keeps_correcting_where_it_gains_reliably_and_cuts_where_it_loses():
    matches = np.array([0.2, 0.5, 0.7, 0.9])
    assert fit_bounds("scene", np.array([0.3, 0.1, 0.2, 0.4]), np.zeros(4), matches) == (None, None)
    assert fit_bounds("scene", np.array([-0.3, -0.1, 0.2, 0.25]), np.zeros(4), matches) == (None, 0.5)
    scores = np.array([0.8, 0.85, 0.9, 0.95])
    assert fit_bounds("score", np.array([-0.3, -0.2, 0.5, 0.45]), scores, np.zeros(4)) == (0.85, None)


def test_fit_abstains_where_the_gain_is_noise():
    """Gains that only look positive for a handful of images above some bound (one lucky image,
    or a spread much larger than the mean) abstain on every unseen read."""
    matches = np.linspace(0, 0.8, 9)
    lucky = np.array([-0.2, 0.1, -0.3, 0.2, -0.1, -0.2, 0.1, -0.3, 2.0])
    assert fit_bounds("scene", lucky, np.zeros(9), matches) == (None, 0.8)
    noisy = np.array([-0.2, 0.1, -0.3, 0.2, -0.1, -0.2, 1.5, -1.2, 1.0])
    assert fit_bounds("scene", noisy, np.zeros(9), matches) == (None, 0.8)


def test_fit_both_sets_the_bound_that_separates():
    """Gains follow the score, not the match: "both" bounds the score and leaves the match free."""
    scores, matches = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.9, 0.1, 0.8, 0.2])
    min_score, min_scene = fit_bounds("both", np.array([-1.0, -1.0, 1.0, 1.0]), scores, matches)
    assert min_scene is None and 0.2 <= min_score < 0.8


def test_scene_match_hides_what_it_is_told_to():
    known = np.eye(3)
    v = np.array([[1.0, 0, 0], [0, 0.6, 0.8]])
    assert np.allclose(scene_match(v, known), [1.0, 0.8])
    hide = np.array([[True, False, False], [False, False, True]])
    assert np.allclose(scene_match(v, known, hide), [0.0, 0.6])


def test_bounds_are_stored_and_read_back_and_old_files_correct_everything():
    read = ReadSettings(top_k=3).with_bounds(0.97, 0.85)
    stored = {"read": read.to_checkpoint(), "query_encoder": "enhancer"}
    again = ReadSettings.from_checkpoint(stored)
    assert (again.min_score, again.min_scene) == (0.97, 0.85) and again.abstains
    old = {"read": {"top_k": 1, "temperature": 1.0, "strength": None, "pooling_mean": False},
           "query_encoder": "enhancer"}
    assert not ReadSettings.from_checkpoint(old).abstains
    assert set(ReadSettings().to_checkpoint()) == set(old["read"])  # no bounds: stored as before


def refiner_with_scene(tmp_path, read: ReadSettings, known: torch.Tensor):
    """The tiny enhancer and a memory whose one training input was `known`."""
    enhancer = random_enhancer("emnet_tiny", 8)
    scenes = scene_vectors(known)
    extra = {"enhancer_config": enhancer.config.to_dict(), "read": read.to_checkpoint(),
             "sources": sources_payload(["seen"], [np.zeros((8, 8, 3), np.uint8)], scenes)}
    mem = tiny_memory()
    mem.value.fill_(0.9)  # recalls a bright colour: any correction changes the output
    path = save_memory(tmp_path / "memory.pth", mem, extra=extra)
    memory, ckpt = load_memory(path)
    return enhancer, build_refiner(memory, ckpt, path, enhancer)


def test_a_seen_scene_is_corrected_and_an_unseen_one_left_bit_equal(tmp_path):
    seen, unseen = stripes(0.5, 0.0), stripes(0.13, 5.0)
    enhancer, refiner = refiner_with_scene(tmp_path, ReadSettings().with_bounds(None, 0.9), seen)
    for low, corrected in ((seen, True), (unseen, False)):
        y = enhance(enhancer, low)
        out, decisions = refiner.refine(low, y)
        assert decisions[0].corrected is corrected, decisions[0].reason
        same = np.array_equal(to_uint8(tensor_to_image(out)), to_uint8(tensor_to_image(y)))
        assert same is not corrected
        assert torch.equal(refiner(low, y), out)
    assert "not seen" in refiner.refine(unseen, enhance(enhancer, unseen))[1][0].reason


def test_abstain_off_corrects_every_image(tmp_path):
    """--abstain off reads a memory with a stored rule as the release: every image corrected."""
    seen, unseen = stripes(0.5, 0.0), stripes(0.13, 5.0)
    flags = argparse.Namespace(testing_top_k=None, temperature=None, strength=None, pooling_mean=None,
                               query_encoder=None, abstain="off")
    read = ReadSettings().with_bounds(None, 0.9).with_flags(flags)
    enhancer, refiner = refiner_with_scene(tmp_path, read, seen)
    y = enhance(enhancer, unseen)
    out, decisions = refiner.refine(unseen, y)
    assert decisions[0].corrected and not torch.equal(out, y.clamp(0, 1))


def test_uses_that_cannot_abstain_correct_every_image_and_say_so(tmp_path, capsys):
    """ONNX export and video (`cannot_abstain`) read a memory with a scene bound as --abstain off,
    with a note, also one whose file lacks the scenes; test.py's read of that file refuses it."""
    seen, unseen = stripes(0.5, 0.0), stripes(0.13, 5.0)
    enhancer, _ = refiner_with_scene(tmp_path, ReadSettings().with_bounds(None, 0.9), seen)
    memory, ckpt = load_memory(tmp_path / "memory.pth")
    del ckpt["sources"]["scenes"]
    flags = argparse.Namespace(testing_top_k=None, temperature=None, strength=None, pooling_mean=None,
                               query_encoder=None, abstain="stored", mem_weights=tmp_path / "memory.pth",
                               query_weights=None, pooling_size=None)
    with pytest.raises(UserError, match="stores no scenes"):
        refiner_from_flags(memory, ckpt, flags, enhancer)
    refiner = refiner_from_flags(memory, ckpt, flags, enhancer, cannot_abstain="the graph cannot match scenes")
    assert "abstains on scenes it has not seen; the graph cannot match scenes" in capsys.readouterr().err
    y = enhance(enhancer, unseen)
    out, decisions = refiner.refine(unseen, y)
    assert decisions[0].corrected and not torch.equal(out, y.clamp(0, 1))
