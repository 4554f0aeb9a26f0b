"""hubconf.py: torch.hub.load(<checkout>, "emnet" | "emnet_memory", source="local") from any folder
gives the enhancer and the memory with the bundled weights (or the files given), and the pair
reproduces test.py's images as hubconf.py's docstring says."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, assert_ran, run_test_py, write_enhancer_checkpoint, write_png
from models.enhancer import EMNetEnhancer
from models.inference import enhance_with_features
from models.refiner import MemoryRefiner
from utils.bundled import BUNDLED_ENHANCER, BUNDLED_MEMORY
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8


def hub(entry: str, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


def test_emnet_is_the_bundled_enhancer_from_any_folder(tmp_path, monkeypatch, one_thread):
    """From another working folder: "emnet" holds the bundled file's tensors; weights= another
    checkpoint gives that one."""
    monkeypatch.chdir(tmp_path)
    model = hub("emnet")
    stored = torch.load(REPO / BUNDLED_ENHANCER, map_location="cpu", weights_only=True)["state_dict"]
    assert isinstance(model, EMNetEnhancer) and not model.training
    assert model.state_dict().keys() == stored.keys()
    assert all(torch.equal(t, stored[k].float()) for k, t in model.state_dict().items())
    mine = write_enhancer_checkpoint(tmp_path / "tiny.pth")
    tiny = hub("emnet", weights=mine)
    assert tiny.config.embed_dim == 8
    assert all(torch.equal(t, v) for t, v in zip(tiny.state_dict().values(),
                                                  torch.load(mine, weights_only=True)["state_dict"].values()))


def test_emnet_memory_is_the_bundled_memory(tmp_path, monkeypatch, one_thread):
    """"emnet_memory" reads the bundled memory's banks; a memory for other enhancer weights is
    refused in one UserError (the fingerprint check), as test.py refuses it."""
    from utils.errors import UserError

    monkeypatch.chdir(tmp_path)
    refiner = hub("emnet_memory")
    stored = torch.load(REPO / BUNDLED_MEMORY, map_location="cpu", weights_only=True)
    assert isinstance(refiner, MemoryRefiner)
    assert torch.equal(refiner.memory.key, stored["mem_key"].float())
    assert torch.equal(refiner.memory.value, stored["mem_vale"].float())
    with pytest.raises(UserError, match="fingerprint"):
        hub("emnet_memory", enhancer=hub("emnet", weights=write_enhancer_checkpoint(tmp_path / "t.pth",
                                                                                    arch="emnet_enhancer", dim=32)))


@pytest.mark.slow
def test_hub_pair_reproduces_test_py(tmp_path, one_thread):
    """The hub's enhancer and memory, run as the docstring says (enhance_with_features, then the
    refiner with those features), write test.py's ori and mem pixels for the same photo."""
    photo = write_png(tmp_path / "photo.png", (np.random.default_rng(0).random((37, 53, 3)) * 60).astype(np.uint8))
    assert_ran(run_test_py("--input_dir", photo, "--mem_weights", BUNDLED_MEMORY, "--result_dir", tmp_path / "r",
                           "--save_images", "--device", "cpu"))
    enhancer = hub("emnet")
    refiner = hub("emnet_memory", enhancer=enhancer)
    low = image_to_tensor(read_image(photo))
    with torch.no_grad():
        ori, features = enhance_with_features(enhancer, low)
        mem = refiner(low, ori, features)
    for stage, out in (("ori", ori), ("mem", mem)):
        written = cv2.imread(str(tmp_path / "r" / stage / "photo.png"))[:, :, ::-1]
        assert np.array_equal(to_uint8(tensor_to_image(out)), written), stage
