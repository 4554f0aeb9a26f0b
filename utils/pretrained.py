"""ImageNet backbone weights the way torchvision gets them.

A file given by a flag, else torchvision's file in the torch hub cache
(`$TORCH_HOME/hub/checkpoints`), else a download through torchvision's weights API into that cache,
hash-checked (`check_hash`: the file name carries the first digits of its SHA-256). Offline and not
cached: one line that names the URL, the file name and the folder to put it in.
Set EMNET_NO_DOWNLOAD=1 to forbid downloads (the tests do).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils import config
from utils.config import NO_DOWNLOAD_ENV
from utils.errors import UserError


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (and torchvision) keep downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load(path: Path, model: str, flag: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise UserError(f"cannot load {path} ({type(err).__name__}): the file is corrupt or not a PyTorch "
                        f"state_dict; delete it and run again, or pass torchvision's {model} file as {flag}") from None


def pretrained_state_dict(url: str, path: str | None, model: str, needed_by: str, flag: str,
                          fallback: str) -> dict[str, Any]:
    """The state_dict of torchvision's weights at `url`: from `path` if given, else from the hub
    cache, else downloaded once into it. Failing that: a UserError naming `url`, the file, the
    cache folder, `flag` (a local file) and `fallback` (a way that needs no such file)."""
    if path:
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file; pass torchvision's {model} weights file "
                            f"({Path(url).name}) or drop {flag} to use the torch hub cache")
        return _load(Path(path), model, flag)
    folder = hub_checkpoint_dir()
    cached = folder / Path(url).name
    if cached.is_file():
        return _load(cached, model, flag)
    where = (f"{needed_by} needs ImageNet {model} weights: download {url} where there is internet and "
             f"save it as {cached} (or pass {flag} PATH), or {fallback}")
    if not config.downloads_allowed():
        raise UserError(f"{where} ({NO_DOWNLOAD_ENV} is set, so nothing is downloaded)")
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError, timeouts, a hash mismatch
        reason = str(getattr(err, "reason", err)).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{where} (the download failed: {reason})") from None
