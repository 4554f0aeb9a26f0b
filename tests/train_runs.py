"""Helpers for the tests that run train_enhancer.py (test_train_enhancer_cli, _resume,
test_step_guard, test_schedule, test_atomic, test_signals, test_original_step): the smallest
network's flags, the run itself (a subprocess or train_enhancer.main), learnable synthetic pairs,
reading its log and checkpoints, a loss that turns NaN on chosen calls, and the memory budget a
trainer's validation gets."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

import train_enhancer
from conftest import assert_ran, run_script, script_env, write_png

FAST = ["--arch", "emnet_tiny", "--embed_dim", "8", "--train_workers", "0", "--lpips_lambda", "0",
        "--l1_lambda", "1", "--device", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LOSS_LINE = re.compile(r"epoch (\d+) iter (\d+)/(\d+) loss (\S+)")
TINY = ("--val_percent", 0, "--train_ps", 8, "--batch_size", 2, "--ssim_lambda", 0, "--log_every", 1,
        "--data_on_device", "on")  # 8x8 crops: small enough for the L1-only loss, not for SSIM


# A test-only patch: print the memory budget of every inference forward (validation's).
REPORT_BUDGET = """
import sys
from models.fast import budget
_budget_bytes = budget.budget_bytes
def _reported(device):
    found = _budget_bytes(device)
    print(f"validation budget {found:.0f}", file=sys.stderr)
    return found
budget.budget_bytes = _reported
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """conftest.script_env on one thread: the environment every training subprocess runs in."""
    return script_env(**{**ONE_THREAD, **extra})


def train_cmd(train_dir: Path, save_dir: Path, env_name: str, *extra) -> list[str]:
    return ["train_enhancer.py", *FAST, "--train_dir", str(train_dir), "--save_dir", str(save_dir),
            "--env", env_name, *map(str, extra)]


def run_train(train_dir: Path, save_dir: Path, env_name: str, *extra, timeout: float = 180,
              env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_script(*train_cmd(train_dir, save_dir, env_name, *extra), timeout=timeout,
                      env_extra={**ONE_THREAD, **(env_extra or {})})


def validation_budget(script: str, *args) -> float:
    """The memory budget of the first validation forward of `python SCRIPT ARGS` (bytes)."""
    argv = [script, *map(str, args)]
    code = f"import runpy, sys; sys.argv = {argv!r}\n{REPORT_BUDGET}\nrunpy.run_path({script!r}, run_name='__main__')"
    err = assert_ran(run_script("-c", code, timeout=180, env_extra=ONE_THREAD)).stderr
    return float(re.search(r"validation budget (\d+)", err).group(1))


def linked_pairs(root: Path, names, low: Path, high: Path) -> Path:
    """Pairs whose files are hard links to one low and one high image: a large set in no time."""
    for name in names:
        for side, image in (("low", low), ("high", high)):
            (root / side).mkdir(parents=True, exist_ok=True)
            os.link(image, root / side / f"{name}.png")
    return root


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def losses_from_log(log: Path) -> list[tuple[int, float]]:
    return [(int(m.group(2)), float(m.group(4))) for m in LOSS_LINE.finditer(log.read_text())]


def smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 image with structure (gradients, blobs, a little noise), not pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, 3)
    img = np.stack([0.5 + 0.4 * np.sin(5 * xx + phase[c]) * np.cos(3 * yy - phase[c]) for c in range(3)], 2)
    img += 0.05 * rng.standard_normal((h, w, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_structured_pairs(root: Path, names, size=(48, 48), seed=0) -> Path:
    """Low-light pairs whose ground truth is a fixed function of the input (learnable):
    low = 0.25 * scene, high = scene."""
    for i, name in enumerate(names):
        scene = smooth_rgb(*size, seed=seed + i)
        write_png(root / "low" / f"{name}.png", (scene.astype(np.float32) * 0.25).round().astype(np.uint8))
        write_png(root / "high" / f"{name}.png", scene)
    return root


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), f"{what}: {k} differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    assert a["state"], "optimizer state is empty: no step was taken"
    for idx in a["state"]:
        sa, sb = a["state"][idx], b["state"][idx]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(torch.as_tensor(sa[k]).double(), torch.as_tensor(sb[k]).double(),
                                  rtol=0, atol=1e-6), f"optimizer state {idx}.{k} differs"


def train_in_process(train: Path, save: Path, env_name: str, *extra) -> Path:
    """train_enhancer.main with FAST and TINY (no subprocess: these runs are short); returns ENV/."""
    argv = ["--train_dir", str(train), "--save_dir", str(save), "--env", env_name, *FAST,
            *map(str, TINY), *map(str, extra)]
    train_enhancer.main(train_enhancer.get_args_parser().parse_args(argv))
    return save / env_name


class NaNAtCalls(torch.nn.Module):
    """Wraps the real loss and returns NaN (still differentiable) at chosen call numbers."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, pred, target):
        total, terms = self.inner(pred, target)
        self.calls += 1
        if self.calls in self.bad_calls:
            total = total * float("nan")
        return total, terms


def patch_loss(monkeypatch, bad_calls) -> list:
    made = []
    real = train_enhancer.EnhancementLoss

    def factory(*a, **k):
        made.append(NaNAtCalls(real(*a, **k), bad_calls))
        return made[-1]

    monkeypatch.setattr(train_enhancer, "EnhancementLoss", factory)
    return made
