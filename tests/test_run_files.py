"""utils/run_files.py, the run folder both trainers write through: which checkpoint file holds
which part, options.yml replaced whole under a write fault, and --resume without a checkpoint."""
from __future__ import annotations

import pytest
import torch
import yaml
from fault_runs import run_limited, temporary_files
from train_runs import load

from utils.errors import UserError
from utils.run_files import Checkpoint, RunFiles


@pytest.mark.parametrize("background", [False, True])
def test_only_the_latest_file_carries_the_resume_state(tmp_path, background):
    files = RunFiles(tmp_path, "run", "model")
    weights = torch.arange(4.0)
    files.save(Checkpoint({"w": weights, "epoch": 2}, {"rng": torch.ones(3)}), best=True, epoch=2,
               background=background)
    weights.add_(100)  # a later step: the files keep the weights as they were when saved
    files.close()
    latest, best, kept = (load(tmp_path / "run" / "models" / f"model_{n}.pth") for n in ("latest", "best", "epoch_2"))
    assert set(latest) == {"w", "epoch", "rng"}
    assert set(best) == set(kept) == {"w", "epoch"}
    assert all(torch.equal(f["w"], torch.arange(4.0)) for f in (latest, best, kept))


def test_best_and_epoch_files_only_when_asked(tmp_path):
    files = RunFiles(tmp_path, "run", "memory")
    files.save(Checkpoint({"epoch": 1}))
    assert sorted(p.name for p in files.models_dir.iterdir()) == ["memory_latest.pth"]


def test_options_yml_is_yaml_of_the_run_and_only_the_main_process_writes_it(tmp_path):
    RunFiles(tmp_path, "run", "model", main_process=False).write_options({"lr": 1e-4})
    assert not (tmp_path / "run" / "options.yml").exists()
    RunFiles(tmp_path, "run", "model").write_options({"lr": 1e-4, "val_pairs": ["1", "2"]})
    assert yaml.safe_load((tmp_path / "run" / "options.yml").read_text()) == {"lr": 1e-4, "val_pairs": ["1", "2"]}


def test_options_yml_under_a_size_limit_keeps_the_previous_file(tmp_path):
    """A child limited to 4 kB per file rewrites options.yml with 10 kB (a budgeted run rewrites
    it mid-run): one error line naming the file, the old options.yml whole, no temporary file."""
    env_dir = tmp_path / "run"
    (env_dir / "models").mkdir(parents=True)
    (env_dir / "options.yml").write_text("lr: 0.0002\n")
    code = f"""
from utils.errors import UserError
from utils.run_files import RunFiles
try:
    RunFiles({str(tmp_path)!r}, "run", "model").write_options({{"notes": "x" * 10000}})
except UserError as err:
    print(err)
"""
    proc = run_limited("-c", code, limit_bytes=4096)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"cannot write {env_dir / 'options.yml'}: File too large (EFBIG)"), proc.stdout
    assert (env_dir / "options.yml").read_text() == "lr: 0.0002\n"
    assert temporary_files(env_dir) == []


def test_resume_without_a_checkpoint_names_the_file_and_the_fix(tmp_path):
    files = RunFiles(tmp_path, "run", "memory")
    with pytest.raises(UserError, match=r"memory_latest\.pth does not exist; drop --resume"):
        files.require_latest()


def test_a_killed_run_s_temporary_checkpoint_is_removed_when_the_run_opens(tmp_path):
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    (models / ".model_latest.pth.1a2b.tmp").write_bytes(b"half")
    RunFiles(tmp_path, "run", "model")
    assert list(models.iterdir()) == []

