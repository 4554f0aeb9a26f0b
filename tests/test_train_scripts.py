"""The training shell scripts stop on a data folder that does not exist before Python starts,
with one line naming the variables to set (DATA_ROOT, TRAIN_DIR)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO


@pytest.mark.parametrize("script", ["train_enhancer_script.sh", "train_memory_script.sh"])
def test_bad_data_root_names_data_root_and_train_dir(script, tmp_path):
    """DATA_ROOT without our485/: exit 2, one error line naming DATA_ROOT, TRAIN_DIR and the
    folder; the Python stub is never called. TRAIN_DIR given and present: the stub runs."""
    shutil.copy(REPO / script, tmp_path / script)
    stub = tmp_path / "python_stub"
    stub.write_text('#!/bin/sh\necho "$*" >> calls.log\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_ROOT", "TRAIN_DIR", "VAL_DIR", "LAUNCH")}
    env.update(PYTHON=str(stub), DATA_ROOT="nodata")
    proc = subprocess.run(["sh", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: TRAIN_DIR=nodata/our485 ") and "DATA_ROOT=nodata" in proc.stderr
    assert not (tmp_path / "calls.log").exists()
    (tmp_path / "mine").mkdir()
    proc = subprocess.run(["sh", script], cwd=tmp_path, env={**env, "TRAIN_DIR": "mine"}, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--train_dir mine " in (tmp_path / "calls.log").read_text()
