"""The original release's four command lines run against our scripts with only paths changed.

The lines are read from docs/original_commands.sh, which also holds, after each, the nearest line
that runs offline; the README shows both. They run in a temporary folder that holds the files their
relative paths name (published-format enhancer and memory with random weights, a random
torchvision-format ResNet-18 and AlexNet in the torch hub cache), with the data folders replaced by
small local ones; downloads are forbidden (EMNET_NO_DOWNLOAD=1). Both trainings run one step: the
only flag added stops them there (--nepoch 1 for the memory, --max_iters 1 for the enhancer).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import test as test_py
import train_enhancer
import train_memory
from conftest import GLIBC_TUNABLES, REPO, published_memory, random_backbone_file, random_enhancer, write_png
from models.loading import load_memory
from models.query import RESNET18_URL
from utils.perceptual import ALEXNET_FILE

COMMANDS_FILE = REPO / "docs" / "original_commands.sh"
SCRIPTS_MD = REPO.parent / "shared" / "docs" / "original_scripts.md"  # the release's lines, verbatim
PARSERS = {"test.py": test_py.get_args_parser, "train_memory.py": train_memory.get_args_parser,
           "train_enhancer.py": train_enhancer.get_args_parser}
DATA_FLAGS = ("--input_dir", "--train_dir", "--val_dir")  # data folders, replaced by local ones
WEIGHT_FLAGS = ("--weights", "--mem_weights", "--pretrain_weights")


def command_blocks() -> list[tuple[str, str]]:
    """(kind, command) of each block of docs/original_commands.sh, kind being `original` or
    `offline` (its first comment line), the command on one line."""
    blocks = []
    for block in re.split(r"\n\s*\n", COMMANDS_FILE.read_text()):
        kind = re.match(r"# (original|offline):", block)
        if kind:
            lines = [line for line in block.splitlines() if not line.startswith("#")]
            blocks.append((kind.group(1), " ".join(" ".join(lines).replace("\\", " ").split())))
    return blocks


def by_script(commands: list[str]) -> dict[str, list[list[str]]]:
    """{script name: [argv, ...]} of `python SCRIPT ARGV...` command lines."""
    found: dict[str, list[list[str]]] = {}
    for command in commands:
        argv = shlex.split(command)[1:]  # drop the interpreter
        found.setdefault(argv[0], []).append(argv[1:])
    assert set(found) == set(PARSERS), found.keys()
    return found


def original_commands() -> dict[str, list[list[str]]]:
    """{script name: [argv without the interpreter, ...]}: the release's lines."""
    return by_script([command for kind, command in command_blocks() if kind == "original"])


def offline_commands() -> dict[str, list[list[str]]]:
    """The nearest line that runs offline for each of the release's lines, in the same order."""
    return by_script([command for kind, command in command_blocks() if kind == "offline"])


def with_local_data(argv: list[str], folders: dict[str, Path]) -> list[str]:
    """`argv` with each data folder replaced by the local folder of the same last name."""
    out = list(argv)
    for i, flag in enumerate(argv[:-1]):
        if flag in DATA_FLAGS:
            name = argv[i + 1].rstrip("/").split("/")[-1]
            out[i + 1] = str(folders[name])
    return out


def write_pairs(root: Path, names: list[str], size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        high = rng.integers(40, 256, (*size, 3), dtype=np.uint8)
        write_png(root / "low" / f"{name}.png", (high // 4).astype(np.uint8))
        write_png(root / "high" / f"{name}.png", high)
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """A folder laid out as the original scripts expect, and the torch hub cache they read."""
    root = tmp_path_factory.mktemp("release")
    enhancer = random_enhancer("emnet_enhancer", 32, seed=1)
    sd = {f"module.{k}": v for k, v in enhancer.state_dict().items()}
    for name in ("lolv1", "lolv2"):
        (root / "pre_trained_logs" / "enhancer").mkdir(parents=True, exist_ok=True)
        (root / "pre_trained_logs" / "memory").mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 800, "state_dict": sd}, root / "pre_trained_logs" / "enhancer" / f"model_{name}.pth")
        published_memory(root / "pre_trained_logs" / "memory" / f"memory_{name}.pth", 9000, 3, 512, seed=2)
    hub = root / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    random_backbone_file(hub, "resnet18", seed=6).rename(hub / Path(RESNET18_URL).name)
    random_backbone_file(hub, "alexnet", seed=3).rename(hub / ALEXNET_FILE)
    folders = {"eval15": write_pairs(root / "data" / "eval15", ["1", "2"], (48, 64), seed=0),
               "our485": write_pairs(root / "data" / "our485", ["3", "4", "5", "6"], (128, 136), seed=1),
               "Test": write_pairs(root / "data" / "Test", ["7"], (48, 64), seed=2)}
    return {"root": root, "folders": folders, "torch_home": root / "torch_home"}


def run_original(release: dict, script: str, argv: list[str], torch_home: Path | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """`python REPO/script argv...` in the release folder, as a user of the original runs it."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", EMNET_NO_DOWNLOAD="1", OMP_NUM_THREADS="2",
               TORCH_HOME=str(torch_home or release["torch_home"]))
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=release["root"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_every_original_command_line_parses(release):
    """All four lines parse with our parsers, and the flags that have a value here keep it."""
    commands = original_commands()
    assert len(commands["test.py"]) == 2
    for script, lines in commands.items():
        for argv in lines:
            PARSERS[script]().parse_args(with_local_data(argv, release["folders"]))
    mem = PARSERS["train_memory.py"]().parse_args(with_local_data(commands["train_memory.py"][0], release["folders"]))
    assert (mem.arch_memory, mem.mem_size, mem.K_feat_dim, mem.V_feat_dim, mem.datarange, mem.top_k) == \
        ("emnet_memory", 9000, 512, 1, "01", 32)
    assert mem.weights == "./pre_trained_logs/enhancer/model_lolv1.pth"  # --pretrain_weights, the alias
    assert (mem.query_encoder, mem.entries) == ("resnet18", "crops")  # the original's memory
    enh = PARSERS["train_enhancer.py"]().parse_args(with_local_data(commands["train_enhancer.py"][0], release["folders"]))
    assert (enh.warmup, enh.grad_clip, enh.lpips_input_range, enh.lr_schedule, enh.datarange) == \
        (True, 0.0, "01", None, "01")


def release_verbatim() -> dict[str, list[list[str]]]:
    """The release's lines as published (../shared/docs/original_scripts.md), data folders cut to
    their last name; skips where that file is absent (a clone has docs/original_commands.sh)."""
    if not SCRIPTS_MD.is_file():
        pytest.skip(f"{SCRIPTS_MD} is absent: nothing to check docs/original_commands.sh against")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", SCRIPTS_MD.read_text(), re.S):
        commands += re.split(r"\n\s*\n", block.replace("\\\n", " ").replace("\\\\", "/").strip())
    return by_script([" ".join(command.split()) for command in commands])


def data_names(argv: list[str]) -> list[str]:
    return [a.rstrip("/").split("/")[-1] if prev in DATA_FLAGS else a for prev, a in zip(["", *argv], argv)]


def test_commands_file_has_every_flag_and_value_of_the_release():
    """docs/original_commands.sh's four lines are the release's, token for token, but for the
    data folders' location."""
    ours, theirs = original_commands(), release_verbatim()
    assert {k: [data_names(a) for a in v] for k, v in ours.items()} == \
        {k: [data_names(a) for a in v] for k, v in theirs.items()}


def test_readme_shows_every_line_of_the_commands_file():
    """The README's "From the original release" shows each original and offline line."""
    readme = " ".join((REPO / "README.md").read_text().replace("\\\n", " ").split())
    blocks = command_blocks()
    assert [kind for kind, _ in blocks] == ["original", "offline"] * 4
    for _, command in blocks:
        assert command in readme, command


def test_offline_lines_use_only_bundled_weights():
    """Each offline line parses with our parsers, and every weights file it names is in the
    repository; one offline line per original line."""
    offline, original = offline_commands(), original_commands()
    assert {k: len(v) for k, v in offline.items()} == {k: len(v) for k, v in original.items()}
    for script, lines in offline.items():
        for argv in lines:
            PARSERS[script]().parse_args(argv)
            files = [argv[i + 1] for i, a in enumerate(argv) if a in WEIGHT_FLAGS]
            assert all((REPO / f).is_file() for f in files), files
            assert files or script == "train_enhancer.py", argv  # the others name their weights


@pytest.mark.slow
@pytest.mark.parametrize("which", [("test.py", 0), ("test.py", 1), ("train_memory.py", 0), ("train_enhancer.py", 0)])
def test_offline_line_runs_without_imagenet_weights(release, tmp_path, which):
    """Each offline line runs with an empty torch hub cache and downloads forbidden (trainings
    stopped after one step, as above), in a folder that has the repository's pre_trained_logs."""
    script, index = which
    (tmp_path / "pre_trained_logs").symlink_to(REPO / "pre_trained_logs")
    argv = with_local_data(offline_commands()[script][index], release["folders"])
    stop = {"train_memory.py": ["--nepoch", "1"], "train_enhancer.py": ["--max_iters", "1"]}.get(script, [])
    (tmp_path / "torch_home").mkdir()
    ok(run_original({**release, "root": tmp_path}, script, [*argv, *stop], torch_home=tmp_path / "torch_home"))


@pytest.mark.slow
def test_original_test_command_runs_end_to_end(release):
    """The lolv1 test line: the published-format enhancer and memory (ResNet-18 query from the hub
    cache) enhance and correct eval15; ori/ and mem/ images and the metrics are written."""
    argv = with_local_data(original_commands()["test.py"][0], release["folders"])
    ok(run_original(release, "test.py", argv))
    result = release["root"] / "log_eval" / "lolv1"
    for stage in ("ori", "mem"):
        assert sorted(p.name for p in (result / stage).iterdir()) == ["1.png", "2.png"]
    assert "mem_psnr" in (result / "metrics.csv").read_text().splitlines()[0]


def test_memory_shape_flags_are_checked_against_the_file(release, tmp_path):
    """--mem_size 9000 on a memory of 50 slots is one error line naming both values."""
    argv = with_local_data(original_commands()["test.py"][0], release["folders"])
    small = published_memory(tmp_path / "small.pth", 50, 3, 512)
    argv[argv.index("--mem_weights") + 1] = str(small)
    proc = run_original(release, "test.py", argv, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--mem_size 9000 does not match memory" in proc.stderr and "which has 50" in proc.stderr


@pytest.mark.slow
def test_original_memory_command_trains_the_originals_memory(release):
    """The train_memory line (one epoch): crop entries and the ResNet-18 query, 9000 x 512 slots;
    its eval15 --val_dir is reported once as a test set and selects nothing (no memory_best.pth).
    Offline without the ImageNet ResNet-18 it stops with the one-line message."""
    argv = with_local_data(original_commands()["train_memory.py"][0], release["folders"])
    ok(run_original(release, "train_memory.py", [*argv, "--nepoch", "1"]))
    env_dir = release["root"] / "log" / "emnet_enhancer_lolv1"
    memory, ckpt = load_memory(env_dir / "models" / "memory_latest.pth")
    assert (ckpt["query_encoder"], ckpt["entries"]) == ("resnet18", "crops")
    assert (memory.config.mem_size, memory.config.key_dim, memory.config.pooling_size) == (9000, 512, 1)
    assert int((memory.top_index >= 0).sum()) > 0
    assert not (env_dir / "models" / "memory_best.pth").exists()
    log = (env_dir / "train.log").read_text()
    assert log.count("selects a checkpoint (no memory_best.pth)") == 1 and "val ori PSNR" in log

    empty = release["root"] / "empty_torch_home"
    empty.mkdir(exist_ok=True)
    proc = run_original(release, "train_memory.py", [*argv, "--nepoch", "1"], torch_home=empty, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ResNet-18" in errors[0] and "EMNET_NO_DOWNLOAD" in errors[0]


@pytest.mark.slow
def test_original_enhancer_command_runs_the_original_step(release):
    """The train_enhancer line (one step): the original's step is what runs (options.yml) and the
    lr stands at 2lr/3 for the second epoch afterwards (one iteration per epoch here)."""
    argv = with_local_data(original_commands()["train_enhancer.py"][0], release["folders"])
    ok(run_original(release, "train_enhancer.py", [*argv, "--max_iters", "1"]))
    env_dir = release["root"] / "log" / "emnet_enhancer_lolv1"
    options = yaml.safe_load((env_dir / "options.yml").read_text())
    assert (options["lr_schedule"], options["grad_clip"], options["lpips_input_range"]) == ("epoch", 0.0, "01")
    assert (options["lpips_lambda"], options["ssim_lambda"], options["nepoch"]) == (1.0, 1.0, 800)
    ckpt = torch.load(env_dir / "models" / "model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 1
    assert ckpt["scheduler"]["_last_lr"] == pytest.approx([2e-4 * 2 / 3])
    assert not (env_dir / "models" / "model_best.pth").exists()
    assert "selects a checkpoint (no model_best.pth)" in (env_dir / "train.log").read_text()
