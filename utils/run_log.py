"""Run logging shared by the trainers: stdout + ENV/train.log lines and tensorboard scalars."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from utils.errors import is_write_fault, write_error


class RunLog:
    """Lines to stdout (tqdm-safe) and to ENV/train.log; tensorboard scalars on the main process.
    A full disk under train.log is a one-line UserError (`utils.errors.write_error`)."""

    def __init__(self, env_dir: Path, main_process: bool):
        self.main = main_process
        self.file = open(env_dir / "train.log", "a") if main_process else None
        self.tb = None
        if main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(env_dir / "tensorboard"))

    def line(self, msg: str) -> None:
        if self.main:
            stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
            tqdm.write(stamped)
            try:
                self.file.write(stamped + "\n")
                self.file.flush()
            except OSError as err:
                if is_write_fault(err):
                    raise write_error(self.file.name, err) from None
                raise

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.main:
            self.tb.close()
            self.file.close()
