"""utils.pretrained: ImageNet backbone weights as torchvision gets them (flag file, hub cache, or
a hash-checked download into the cache), and one clear line when offline. The download itself is
replaced by stand-ins here: the suite never touches the network."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from models.query import RESNET18_URL
from utils.errors import UserError
from utils.perceptual import ALEXNET_URL
from utils.pretrained import NO_DOWNLOAD_ENV, pretrained_state_dict

URL = "https://download.pytorch.org/models/tiny-0123abcd.pth"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder; returns its checkpoints/ folder (not created)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored by monkeypatch
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def load(path: str | None = None) -> dict:
    return pretrained_state_dict(URL, path, "Tiny", "--thing", "--tiny_weights", "use --other")


def test_urls_are_torchvisions():
    """The URLs we name are those of torchvision's weights API (IMAGENET1K_V1)."""
    from torchvision.models import AlexNet_Weights, ResNet18_Weights

    assert RESNET18_URL == ResNet18_Weights.IMAGENET1K_V1.url
    assert ALEXNET_URL == AlexNet_Weights.IMAGENET1K_V1.url


def test_flag_file_then_hub_cache(hub, tmp_path):
    """A --flag file wins; without it the file of the URL's name in the hub cache is read."""
    flag_file = tmp_path / "mine.pth"
    torch.save({"w": torch.ones(2)}, flag_file)
    assert torch.equal(load(str(flag_file))["w"], torch.ones(2))
    hub.mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, hub / Path(URL).name)
    assert torch.equal(load()["w"], torch.zeros(3))


def test_missing_or_corrupt_files_are_one_line_errors(hub, tmp_path):
    """A flag naming no file, or a corrupt cached file: a UserError naming the file and the fix."""
    with pytest.raises(UserError, match="nope.pth: no such file"):
        load(str(tmp_path / "nope.pth"))
    hub.mkdir(parents=True)
    (hub / Path(URL).name).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as err:
        load()
    assert str(hub / Path(URL).name) in str(err.value) and "delete it" in str(err.value)


def test_downloads_once_with_hash_check(hub, monkeypatch):
    """Not cached and downloads allowed: torchvision's way, torch.hub.load_state_dict_from_url
    with check_hash (the file name carries its SHA-256 prefix), called with the URL."""
    monkeypatch.delenv(NO_DOWNLOAD_ENV, raising=False)
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return {"w": torch.full((2,), 7.0)}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    assert torch.equal(load()["w"], torch.full((2,), 7.0))
    assert calls == [(URL, {"progress": True, "check_hash": True, "weights_only": True})]


@pytest.mark.parametrize("failure", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                     RuntimeError('invalid hash value (expected "0123abcd", got "ffff")')])
def test_offline_or_bad_download_names_url_file_and_folder(hub, monkeypatch, failure):
    """The download fails (no network, a hash mismatch): one line with the URL, where to save the
    file, the flag and the way without it, plus the reason."""
    monkeypatch.delenv(NO_DOWNLOAD_ENV, raising=False)

    def fail(url, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(UserError) as err:
        load()
    msg = str(err.value)
    assert "\n" not in msg
    for part in (URL, str(hub / Path(URL).name), "--tiny_weights", "use --other", "the download failed"):
        assert part in msg, part
    assert str(getattr(failure, "reason", failure)) in msg
    assert not hub.exists() or not any(hub.iterdir())  # nothing written half


def test_no_download_env_forbids_downloads(hub, monkeypatch):
    """EMNET_NO_DOWNLOAD=1: the download is never attempted; the message says why."""
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", pytest.fail)
    with pytest.raises(UserError, match=f"{NO_DOWNLOAD_ENV} is set") as err:
        load()
    assert URL in str(err.value)
