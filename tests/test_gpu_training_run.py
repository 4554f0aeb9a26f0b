"""benchmarks/gpu_training_run.sh, the one-command GPU session, run end to end on the CPU with the
tiny preset: the parts merge into the training folder, both speed benchmarks report, the "before"
loop runs from the old commit the script names (extracted as its header says), the budgeted run
writes its log, the float16 pieces join back into weights that load, and eval is scored."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dataset.pack_parts import pack_parts
from dataset.pairing import find_pairs, is_validation_pair
from models.loading import load_enhancer

pytestmark = pytest.mark.slow  # trains for ~20 s and runs three scripts
SCRIPT = REPO / "benchmarks" / "gpu_training_run.sh"


def before_code(dest: Path) -> Path:
    """The code before the GPU loop's rework, extracted at `dest` with the script header's own
    `git archive COMMIT | tar -x` (skips where the checkout lacks that commit, e.g. a shallow clone)."""
    commit = re.search(r"git archive (\w+) \| tar -x", SCRIPT.read_text()).group(1)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {commit}, the old loop of {SCRIPT.name}, is not in this checkout's history")
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def test_gpu_session_script_on_cpu(make_pairs, tmp_path):
    names = [str(i) for i in range(40)]
    held_out = [n for n in names if is_validation_pair(n, 10)]
    names = names[:14] + held_out[:2]  # at least one validation pair, so model_best.pth is written
    train = make_pairs(names=tuple(dict.fromkeys(names)), size=(136, 136))
    pack_parts(train, tmp_path / "parts", 300_000)
    out, data = tmp_path / "out", tmp_path / "data"
    env = dict(os.environ, PARTS=str(tmp_path / "parts"), DATA_DIR=str(data), OUT_DIR=str(out),
               EVAL_DIR=str(make_pairs(names=("1", "2"), size=(40, 48))), SAVE_DIR=str(tmp_path / "log"),
               ARCH="emnet_tiny", EMBED_DIM="8", TIME_BUDGET="0.3", AMP="none", DEVICE="cpu",
               BENCH_STEPS="2", PIECE="100k", BEFORE_DIR=str(before_code(tmp_path / "before")), BEFORE_ITERS="3",
               PYTHON=os.environ.get("PYTHON", "python"))
    done = subprocess.run(["sh", "benchmarks/gpu_training_run.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in find_pairs(data)] == [p.name for p in find_pairs(train)]
    lines = (out / "bench_train.jsonl").read_text().splitlines()
    bench = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(bench) == 2 and all(r["crops_per_sec"] > 0 for r in bench)
    assert "time budget 0.3 min" in (out / "train.log").read_text()
    assert re.search(r"finished at epoch \d+ iteration 3;", (out / "before_train.log").read_text())
    # the old loop, which had no --time_budget, trained the "before" run; the current one the budgeted run
    before_options = yaml.safe_load((tmp_path / "log" / "before" / "options.yml").read_text())
    run_options = yaml.safe_load((tmp_path / "log" / "gpu_run" / "options.yml").read_text())
    assert "time_budget" not in before_options and run_options["time_budget"] == 0.3
    assert before_options["train_dir"] == run_options["train_dir"] == str(data)
    pieces = sorted(out.glob("weights.pth.part_*"))
    assert len(pieces) >= 2
    joined = tmp_path / "weights.pth"
    joined.write_bytes(b"".join(p.read_bytes() for p in pieces))
    assert hashlib.sha256(joined.read_bytes()).hexdigest() in (out / "run.txt").read_text()
    model, _ = load_enhancer(joined)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((out / "eval_summary.json").read_text())["num_images"] == 2
