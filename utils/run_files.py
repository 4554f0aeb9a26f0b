"""One training run's files under SAVE_DIR/ENV, the same for both trainers: the folder and its
models/, options.yml (written atomically), the log (train.log, tensorboard/) and the checkpoints,
with which file holds what (`Checkpoint`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.atomic import atomic_write_text
from utils.checkpoint import CheckpointWriter, remove_stale_temp_files, save_checkpoint
from utils.errors import UserError, writable_dir
from utils.run_log import RunLog


@dataclass
class Checkpoint:
    """A checkpoint in two parts: `model` goes into every file of the run (the weights, where
    training stood, the run's flags); `resume` only into the latest file (optimizer, scheduler and
    RNG states: what --resume needs and a finished model does not)."""

    model: dict[str, Any]
    resume: dict[str, Any] = field(default_factory=dict)


class RunFiles:
    """SAVE_DIR/ENV of a run whose checkpoints are models/PREFIX_latest.pth, PREFIX_best.pth and
    PREFIX_epoch_N.pth. Only the main process writes; a temporary file a killed run left behind
    is deleted when the run opens."""

    def __init__(self, save_dir: str | Path, env: str, prefix: str, main_process: bool = True):
        self.env_dir = Path(save_dir) / env
        self.models_dir = writable_dir(self.env_dir / "models", "--save_dir")
        self.prefix, self.main = prefix, main_process
        self.writer = CheckpointWriter()
        if main_process:
            remove_stale_temp_files(self.models_dir)

    @property
    def latest(self) -> Path:
        return self.models_dir / f"{self.prefix}_latest.pth"

    @property
    def best(self) -> Path:
        return self.models_dir / f"{self.prefix}_best.pth"

    def epoch_file(self, epoch: int) -> Path:
        return self.models_dir / f"{self.prefix}_epoch_{epoch}.pth"

    def require_latest(self) -> None:
        """--resume: the latest checkpoint must exist."""
        if not self.latest.is_file():
            raise UserError(f"--resume: nothing to resume, {self.latest} does not exist; "
                            "drop --resume or check --save_dir/--env")

    def write_options(self, options: dict[str, Any]) -> None:
        """options.yml: the flags and what the run made of them (atomic: a reader never sees half)."""
        if self.main:
            atomic_write_text(self.env_dir / "options.yml", yaml.safe_dump(options, sort_keys=False))

    def open_log(self) -> RunLog:
        return RunLog(self.env_dir, self.main)

    def test_set_line(self, val_dir: str | Path) -> str:
        """The log line of a run validating on a test set, which reports and selects nothing."""
        return (f"--val_dir {val_dir} is a test set: validation here only reports its scores and never "
                f"selects a checkpoint (no {self.best.name}); drop --val_dir to select on pairs held out of "
                "--train_dir")

    def save(self, checkpoint: Checkpoint, best: bool = False, epoch: int | None = None,
             background: bool = False) -> None:
        """Write the best file (with `best`), the latest file and the epoch's file (with `epoch`),
        in that order. `background`: from CPU copies in a thread (`CheckpointWriter`), the next
        save or `close` waiting for it; otherwise now. Every file is written atomically."""
        files = [(self.best, checkpoint.model)] if best else []
        files.append((self.latest, {**checkpoint.model, **checkpoint.resume}))
        if epoch is not None:
            files.append((self.epoch_file(epoch), checkpoint.model))
        if background:
            self.writer.save(files)
            return
        for path, payload in files:
            save_checkpoint(path, payload)

    def close(self) -> None:
        """Wait for a checkpoint still being written (and raise its error)."""
        self.writer.join()
