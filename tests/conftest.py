"""Shared fixtures and helpers: the repo on sys.path, the LOL-v1 location, synthetic image pairs,
tiny random-weight checkpoints and memories in our format and in the published one, and the
scripts run as users run them (run_script, assert_ran, assert_user_error)."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.enhancer import EMNetEnhancer, make_config  # noqa: E402
from models.loading import ENHANCER_FORMAT, memory_payload  # noqa: E402
from models.memory import ExternalMemory, MemoryConfig  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.image_io import read_image, to_uint8  # noqa: E402

# The suite never downloads (ImageNet backbones come from random-weight local files); passed on
# to subprocesses through the environment.
os.environ["EMNET_NO_DOWNLOAD"] = "1"

# Makes torch 2-3x faster on the CPU machines this suite runs on; passed on to subprocesses.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
SMALL16_WEIGHTS = "pre_trained_logs/enhancer/emnet_small16_lolv1_cpu.pth"  # the bundled CPU enhancer
SMALL16_MEMORY = "pre_trained_logs/memory/emnet_small16_lolv1_levels_memory.pth"  # and its memory


@pytest.fixture
def one_thread():
    """One intra-op thread, as the subprocess runs have (OMP_NUM_THREADS=1): with two, a busy
    machine makes OpenMP's barriers, and in-process runs, many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lol_candidates() -> list[Path]:
    """Where LOL-v1 is looked for, in order."""
    found = []
    if os.environ.get("EMNET_LOL_ROOT"):
        found.append(Path(os.environ["EMNET_LOL_ROOT"]))
    found += [REPO.parent / "shared" / "data" / "LOL-v1", REPO / "datasets" / "LOL-v1"]
    return found


@pytest.fixture(scope="session")
def lol_root() -> Path:
    """The LOL-v1 root (holding eval15/ and our485/); skips the test when it is not there."""
    for cand in lol_candidates():
        if (cand / "eval15" / "low").is_dir():
            return cand
    pytest.skip("LOL-v1 not found: set EMNET_LOL_ROOT=/path/to/LOL-v1 (the folder holding eval15/ "
                f"and our485/); looked in {', '.join(map(str, lol_candidates()))}")


def random_rgb(seed: int, size=(6, 5)) -> np.ndarray:
    """Random uint8 RGB pixels of `size` (H, W), seed-determined."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png_means(path: Path | str) -> np.ndarray:
    """Mean 8-bit level per channel (R, G, B) of an image file, as written."""
    return to_uint8(read_image(path)).reshape(-1, 3).astype(np.float64).mean(axis=0)


def write_png(path: Path, img: np.ndarray) -> Path:
    """Write an RGB (H, W, 3) or grayscale uint8/uint16 array with cv2 (which expects BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img[:, :, ::-1] if img.ndim == 3 and img.shape[2] == 3 else img
    assert cv2.imwrite(str(path), np.ascontiguousarray(arr)), path
    return path


@pytest.fixture
def make_pairs(tmp_path):
    """Factory: write random uint8 low/high image pairs into a fresh folder and return its root.

    make_pairs(names=("1", "2"), size=(16, 24), low_dir="low", high_dir="high", ext=".png",
               high_ext=None, high_fn=None, seed=0)
    `high_dir=None` writes no ground truth; `high_fn(low) -> high` derives the ground truth from
    the low image (default: independent random pixels); `size` is (H, W).
    """
    counter = [0]

    def make(names=("1", "2"), size=(16, 24), low_dir="low", high_dir="high", ext=".png",
             high_ext=None, high_fn=None, seed=0, high_names=None) -> Path:
        counter[0] += 1
        root = tmp_path / f"pairs{counter[0]}"
        rng = np.random.default_rng(seed)
        high_names = names if high_names is None else high_names
        for name, hname in zip(names, high_names):
            low = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            high = high_fn(low) if high_fn else rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            write_png(root / low_dir / f"{name}{ext}", low)
            if high_dir is not None:
                write_png(root / high_dir / f"{hname}{high_ext or ext}", high)
        return root

    return make


DDP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def script_env(**extra: str) -> dict[str, str]:
    """The environment a script runs in: ours with the allocator setting, `extra`, and none of
    torchrun's variables (a plain run must not think it is part of a process group)."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    env.update(extra)
    return env


def run_script(*argv: str | Path, timeout: float = 180, env_extra: dict[str, str] | None = None,
               preexec_fn=None) -> subprocess.CompletedProcess:
    """`python ARGV...` in the repo root, as users run the scripts, in `script_env(**env_extra)`;
    `preexec_fn` runs in the child before it starts (a resource limit)."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=script_env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def assert_ran(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run exited 0 without a traceback (its output's tail shown otherwise); returns it."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def run_test_py(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """test.py ARGS, as users run it."""
    return run_script("test.py", *args, timeout=timeout)


def stderr_lines(text: str) -> list[str]:
    """Non-empty lines; tqdm redraws with \\r, so those split lines too."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def assert_user_error(proc: subprocess.CompletedProcess, must_contain: str | Path,
                      allow_noise: tuple[str, ...] = ()) -> str:
    """Exit status 2, no traceback, and one `error: ...` line naming `must_contain` as the whole
    of stderr. `allow_noise` lists prefixes of third-party lines tolerated before it."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = stderr_lines(proc.stderr)
    assert lines, "nothing on stderr"
    error = lines[-1]
    assert error.startswith("error: "), proc.stderr
    assert str(must_contain) in error, (str(must_contain), error)
    others = lines[:-1]
    assert all(any(line.startswith(p) for p in allow_noise) for line in others), proc.stderr
    if not allow_noise:
        assert proc.stderr.strip() == error and proc.stderr.count("\n") == 1, repr(proc.stderr)
    return error


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(the header, the rows) of a CSV report."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def random_enhancer(arch: str = "emnet_tiny", embed_dim: int = 8, seed: int = 0,
                    scale: float = 0.02) -> EMNetEnhancer:
    """An enhancer whose every tensor is random and seed-determined (no parameter keeps its
    default value, so a load that skipped a tensor is visible); `scale` is the noise's std."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = EMNetEnhancer(make_config(arch, embed_dim))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return model.eval()


def write_enhancer_checkpoint(path: Path, model: EMNetEnhancer | None = None, arch: str = "emnet_tiny",
                              dim: int = 8, **extra) -> Path:
    """`model` (default: random_enhancer(arch, dim)) saved as our enhancer checkpoint at `path`;
    `extra` adds entries (epoch) or replaces them (state_dict)."""
    model = random_enhancer(arch, dim) if model is None else model
    save_checkpoint(path, {"format": ENHANCER_FORMAT, "arch": arch, "config": model.config.to_dict(),
                           "state_dict": model.state_dict(), **extra})
    return path


@pytest.fixture
def weights(tmp_path) -> Path:
    """A random-weight emnet_tiny/8 checkpoint in our format (epoch 0)."""
    return write_enhancer_checkpoint(tmp_path / "tiny.pth", epoch=0)


@pytest.fixture
def make_checkpoint(tmp_path):
    """Factory: write a random-weight enhancer checkpoint and return (path, model).

    fmt="ours": utils.checkpoint.save_checkpoint with our dict format.
    fmt="published": {'epoch', 'state_dict'} with the `module.` prefix (module_prefix=False
    drops it); fmt="bare": the state_dict alone. half=True stores the weights as float16.
    """

    def make(name="ckpt.pth", arch="emnet_tiny", embed_dim=8, fmt="ours", module_prefix=True,
             half=False, seed=0, epoch=0, folder=None):
        model = random_enhancer(arch, embed_dim, seed)
        sd = {k: (v.half() if half else v.clone()) for k, v in model.state_dict().items()}
        path = Path(folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "ours":
            write_enhancer_checkpoint(path, model, arch, state_dict=sd, epoch=epoch)
        elif fmt == "published":
            if module_prefix:
                sd = {f"module.{k}": v for k, v in sd.items()}
            torch.save({"epoch": epoch, "state_dict": sd}, path)
        elif fmt == "bare":
            torch.save(sd, path)
        else:
            raise ValueError(fmt)
        return path, model

    return make


def published_memory(path: Path, n: int, width: int, key_dim: int = 512, seed: int = 0) -> Path:
    """The original release's memory file: only epoch and the four banks."""
    g = torch.Generator().manual_seed(seed)
    torch.save({"epoch": 10, "mem_key": F.normalize(torch.randn(n, key_dim, generator=g), dim=1),
                "mem_vale": torch.rand(n, width, generator=g), "mem_age": torch.zeros(n),
                "mem_index": torch.full((n,), -1, dtype=torch.long)}, path)
    return path


def tiny_memory(key_dim=128, mem_size=16, p=1, seed=0) -> ExternalMemory:
    """A memory with random keys, values, ages and sample indices (some slots unwritten)."""
    g = torch.Generator().manual_seed(seed)
    mem = ExternalMemory(MemoryConfig(mem_size=mem_size, key_dim=key_dim, pooling_size=p, threshold=0.01,
                                      age_noise=2.0), g)
    mem.age.copy_(torch.randint(0, 50, (mem_size,), generator=g).float())
    mem.top_index.copy_(torch.randint(-1, 100, (mem_size,), generator=g))
    return mem


def save_memory(path: Path, mem: ExternalMemory, head=None, query_encoder="enhancer", extra=None) -> Path:
    """`mem` saved as train_memory.py saves it (epoch 7), with `extra` entries."""
    save_checkpoint(path, memory_payload(mem, 7, query_encoder, head, extra or {}))
    return path


def filled_memory(keys: torch.Tensor, values: torch.Tensor, mem_size: int = 8) -> ExternalMemory:
    """A memory whose first len(keys) slots were written by samples 0..n-1."""
    mem = ExternalMemory(MemoryConfig(mem_size=mem_size, key_dim=keys.shape[1]), torch.Generator().manual_seed(0))
    mem.update(F.normalize(keys, dim=1), values, torch.arange(len(keys)))
    return mem


def grey(*levels: float) -> torch.Tensor:
    """RGB values with the three channels equal, one row per level."""
    return torch.tensor([[v] * 3 for v in levels], dtype=torch.float32)


def unit(*rows) -> torch.Tensor:
    """The rows, each normalised to unit length."""
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def random_backbone_file(folder: Path, model: str, seed: int) -> Path:
    """A random-weight torchvision `model`() state_dict (the ImageNet file's layout), saved in
    `folder`: the suite's stand-in for the ImageNet weights it never downloads."""
    import torchvision.models

    path = folder / f"{model}_random.pth"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.save(getattr(torchvision.models, model)(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def resnet_file(tmp_path_factory) -> Path:
    return random_backbone_file(tmp_path_factory.mktemp("resnet"), "resnet18", seed=6)


@pytest.fixture(scope="session")
def alexnet_random_file(tmp_path_factory) -> Path:
    return random_backbone_file(tmp_path_factory.mktemp("alexnet"), "alexnet", seed=3)
