"""pyproject.toml: after `pip install -e .` (.ci/run installs it with --no-deps) the packages
import from any folder, and the files they read beside their code (the C kernel source, the
results page's CSS and JavaScript) are found. Skips, saying so, where this checkout is not
pip-installed."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CODE = """
import dataset.pairing, models.fast.kernels, models.loading, utils.page
print(models.loading.__file__, dataset.pairing.__file__, utils.page.__file__)
print(models.fast.kernels.SOURCE.is_file(), all((utils.page.ASSETS / f).is_file() for f in ("page.css", "page.js")))
"""


def installed_checkout() -> str | None:
    """Where pip installed `emnet-pytorch` from (its direct_url.json; None: not installed). The
    `emnet_pytorch.egg-info` that the build leaves in the checkout has no such file."""
    urls = [json.loads(text).get("url", "?") for dist in importlib.metadata.distributions(name="emnet-pytorch")
            if (text := dist.read_text("direct_url.json"))]
    return urls[0] if urls else None


def test_packages_import_from_outside_the_checkout(tmp_path):
    """From an empty folder, without PYTHONPATH: models, dataset and utils import from this
    checkout and find their data files."""
    url = installed_checkout()
    if url is None:
        pytest.skip("emnet-pytorch is not pip-installed here: pip install -e . --no-deps (as .ci/run does)")
    if url != REPO.as_uri():
        pytest.skip(f"emnet-pytorch is installed from {url}, not from this checkout ({REPO})")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files, found = proc.stdout.splitlines()[-2:]
    assert all(f.startswith(f"{REPO}{os.sep}") for f in files.split()), files
    assert found == "True True"
