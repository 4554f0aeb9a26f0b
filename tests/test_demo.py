"""The bundled demo set (dataset/demo.py) and how test_script.sh uses it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script, write_png
from dataset.demo import SOURCES, LowLightModel, build_demo_set, darken, ensure_demo_set, srgb_to_linear
from dataset.pairing import find_pairs
from utils.image_io import read_image

NAMES = sorted(name for name, _ in SOURCES)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_set(tmp_path_factory.mktemp("demo") / "demo")


def run_demo_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return run_script("-m", "dataset.demo", *args, timeout=120)


def test_demo_set_layout(demo):
    """A LOL-style folder: every photo in high/ and low/, same sizes, longer side <= 512 (some
    not multiples of 8), SOURCES.txt naming the photos and the parameters; no staging leftovers."""
    pairs = find_pairs(demo)
    assert [p.name for p in pairs] == NAMES
    sizes = set()
    for p in pairs:
        low, high = read_image(p.low), read_image(p.high)
        assert low.shape == high.shape and max(low.shape[:2]) <= LowLightModel().max_side
        sizes.add(low.shape[:2])
    assert any(h % 8 or w % 8 for h, w in sizes)
    text = (demo / "SOURCES.txt").read_text()
    assert all(f"skimage.data.{func}()" in text for _, func in SOURCES)
    assert "exposure = (0.04, 0.12)" in text and "photons_at_white" in text
    assert sorted(p.name for p in demo.iterdir()) == ["SOURCES.txt", "high", "low"]


def test_demo_set_is_deterministic(demo, tmp_path):
    """A second creation elsewhere gives the same files, byte for byte."""
    again = build_demo_set(tmp_path / "again")
    first, second = files_of(demo), files_of(again)
    assert sorted(first) == sorted(second) and len(first) == 2 * len(NAMES) + 1
    assert all(first[k] == second[k] for k in first)


def test_low_is_darker_by_the_drawn_exposure(demo):
    """Mean linear brightness low/high is within 15 % of the image's drawn exposure, which lies in
    the documented range; in sRGB the low image is under 40 % as bright."""
    model = LowLightModel()
    for index, (name, _) in enumerate(SOURCES):
        low, high = read_image(demo / "low" / f"{name}.png"), read_image(demo / "high" / f"{name}.png")
        e = darken((high * 255).round().astype(np.uint8)[:4, :4], model, index)[1]["exposure"]
        assert model.exposure[0] <= e <= model.exposure[1]
        ratio = srgb_to_linear(low).mean() / srgb_to_linear(high).mean()
        assert ratio == pytest.approx(e, rel=0.15), name
        assert low.mean() < 0.4 * high.mean(), name


def test_noise_matches_the_model():
    """On a flat grey photo the low image is noisy, with the shot + read noise of the model (the
    linear-light standard deviation within 25 % of sqrt(D / photons + read_noise**2))."""
    model = LowLightModel()
    flat = np.full((128, 128, 3), 180, np.uint8)
    low, drawn = darken(flat, model, 0)
    lin = srgb_to_linear(low / 255.0)
    for c, key in enumerate(("cast_r", "cast_g", "cast_b")):
        d = drawn["exposure"] * srgb_to_linear(np.float64(180 / 255)) * (1 + drawn[key])
        expected = np.sqrt(d / model.photons_at_white + model.read_noise ** 2)
        assert lin[:, :, c].mean() == pytest.approx(d, rel=0.05)
        assert lin[:, :, c].std() == pytest.approx(expected, rel=0.25)
    assert not np.array_equal(darken(flat, model, 1)[0], low)  # each image has its own draws


def test_existing_files_are_not_overwritten(tmp_path):
    """ensure_demo_set keeps a user's file of the same name, creates the rest; once low/ exists
    it writes nothing at all."""
    root = tmp_path / "demo"
    mine = write_png(root / "high" / "coffee.png", np.zeros((8, 8, 3), np.uint8))
    before = mine.read_bytes()
    ensure_demo_set(root)
    assert mine.read_bytes() == before
    assert sorted(p.stem for p in (root / "low").iterdir()) == NAMES
    (root / "high" / "rocket.png").unlink()
    snapshot = files_of(root)
    ensure_demo_set(root)
    assert files_of(root) == snapshot  # low/ exists: rocket.png is not recreated


def test_cli_creates_the_set(demo, tmp_path):
    """`python -m dataset.demo --out DIR` writes the same files as build_demo_set."""
    out = tmp_path / "demo"
    proc = run_demo_cli("--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(NAMES)} low/high pairs" in proc.stdout
    assert files_of(out) == files_of(demo)


@pytest.mark.parametrize("force", [False, True])
def test_cli_existing_set(demo, tmp_path, force):
    """On an existing set the CLI writes nothing and says so; --force rewrites the files."""
    out = shutil.copytree(demo, tmp_path / "demo")
    low = out / "low" / "chelsea.png"
    low.write_bytes(b"edited")
    proc = run_demo_cli("--out", out, *(["--force"] if force else []))
    assert proc.returncode == 0, proc.stderr
    if force:
        assert low.read_bytes() == (demo / "low" / "chelsea.png").read_bytes()
    else:
        assert "already" in proc.stdout and low.read_bytes() == b"edited"


@pytest.mark.parametrize("case", ["file", "below_file"])
def test_cli_bad_out(tmp_path, case):
    """--out that is a file, or lies below one: one `error:` line naming it, exit status 2."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile if case == "file" else afile / "demo"
    proc = run_demo_cli("--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], proc.stderr


# ----------------------------------------------------------------------------- test_script.sh

@pytest.fixture
def script_run(tmp_path):
    """Run a copy of test_script.sh in an empty folder with PYTHON = a stub that logs its
    arguments (one line per call) and creates datasets/demo/low when asked to make the set."""
    shutil.copy(REPO / "test_script.sh", tmp_path / "test_script.sh")
    stub = tmp_path / "python_stub"
    stub.write_text('#!/bin/sh\necho "$*" >> calls.log\n'
                    '[ "$1" = "-m" ] && mkdir -p "$4/low"\nexit 0\n')
    stub.chmod(0o755)

    def run(expect_error: str | None = None, **env_extra: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("INPUT_DIR", "RESULT_DIR", "DATA_ROOT", "AMP")}
        env.update(PYTHON=str(stub), **env_extra)
        proc = subprocess.run(["sh", "test_script.sh"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=30)
        if expect_error is None:
            assert proc.returncode == 0, proc.stderr
        else:  # one line naming `expect_error`, exit 2
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert proc.stderr.startswith("error: ") and expect_error in proc.stderr, proc.stderr
        log = tmp_path / "calls.log"
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return calls

    return run


def test_script_default_runs_the_demo(script_run):
    """No settings: the demo set is created first, then test.py runs on it with --pictures and
    its own default result folder (no --result_dir); a second run does not create the set again."""
    make, test = script_run()
    assert make == "-m dataset.demo --out ./datasets/demo"
    assert test.startswith("test.py --input_dir ./datasets/demo ") and "--result_dir" not in test
    assert "--pictures" in test.split() and "--mem_weights" in test.split()
    (only,) = script_run()
    assert only.startswith("test.py ")


def test_script_defaults_are_the_bundled_files(script_run):
    """test_script.sh runs the weights and memory the Python code calls bundled, and both exist."""
    from utils.bundled import BUNDLED_ENHANCER, BUNDLED_MEMORY

    _, test = script_run()
    args = test.split()
    assert args[args.index("--weights") + 1] == BUNDLED_ENHANCER
    assert args[args.index("--mem_weights") + 1] == BUNDLED_MEMORY
    assert (REPO / BUNDLED_ENHANCER).is_file() and (REPO / BUNDLED_MEMORY).is_file()


def test_script_lol_input(script_run):
    """INPUT_DIR=.../eval15: no demo set; RESULT_DIR, when set, is passed on."""
    (test,) = script_run(INPUT_DIR="/data/LOL-v1/eval15")
    assert test.startswith("test.py --input_dir /data/LOL-v1/eval15 ") and "--result_dir" not in test
    (test,) = script_run(INPUT_DIR="/data/LOL-v1/eval15", RESULT_DIR="/tmp/mine")
    assert "--result_dir /tmp/mine" in test


def test_script_amp(script_run):
    """fp32 by default; AMP=bf16 is passed on as --amp bf16."""
    (test,) = script_run(INPUT_DIR="/data/LOL-v1/eval15")
    assert "--amp none" in test
    (test,) = script_run(INPUT_DIR="/data/LOL-v1/eval15", AMP="bf16")
    assert "--amp bf16" in test


def test_script_data_root_gives_its_eval15(script_run, tmp_path):
    """DATA_ROOT alone makes the input DATA_ROOT/eval15 (the README's CPU section sets only it);
    an INPUT_DIR given as well wins; a DATA_ROOT without eval15/ is one line naming DATA_ROOT,
    and test.py does not start."""
    root = tmp_path / "LOL-v1"
    (root / "eval15" / "low").mkdir(parents=True)
    (test,) = script_run(DATA_ROOT=str(root))
    assert test.startswith(f"test.py --input_dir {root}/eval15 ")
    (test,) = script_run(DATA_ROOT=str(root), INPUT_DIR="/data/photos")
    assert test.startswith("test.py --input_dir /data/photos ")
    assert script_run(expect_error=f"DATA_ROOT={tmp_path}/nodata has no eval15/",
                      DATA_ROOT=str(tmp_path / "nodata")) == []
