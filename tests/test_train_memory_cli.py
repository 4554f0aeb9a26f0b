"""train_memory.py end to end, run as users run it (a subprocess in the repo root), and test.py
reading the memories it writes: tiny enhancer (emnet_tiny, embed_dim 8), tiny memories and
synthetic pairs. The two trained runs are built once for the whole file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import (
    assert_ran,
    assert_user_error,
    published_memory,
    read_csv,
    run_script,
    write_enhancer_checkpoint,
    write_png,
)
from models.inference import enhance
from models.loading import load_enhancer, load_memory
from models.memory import MemoryConfig
from models.query import RESNET18_URL
from models.read_settings import ReadSettings
from models.refiner import build_refiner
from utils.errors import UserError
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8

MEM_COLUMNS = ["ori_psnr", "ori_ssim", "ori_gt_mean_psnr", "mem_psnr", "mem_ssim", "mem_gt_mean_psnr"]
EFFECT_COLUMNS = ["gain_r", "gain_g", "gain_b", "ori_brightness", "mem_brightness", "brightness_change_pct",
                  "brightness_effect", "recall_score", "recall_percentile", "memory", "memory_reason"]


def run_py(script: str, *args: str | Path, env_extra: dict[str, str] | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repo root, one thread unless OMP_NUM_THREADS says otherwise."""
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return run_script(script, *args, timeout=timeout, env_extra={**threads, **(env_extra or {})})


# ============================================================================ end to end

def write_pairs(root: Path, names, size, seed) -> Path:
    """Dark random low images and their brighter ground truth (3x, clipped)."""
    rng = np.random.default_rng(seed)
    for n in names:
        low = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
        write_png(root / "low" / f"{n}.png", low)
        write_png(root / "high" / f"{n}.png", np.clip(low.astype(int) * 3 + 10, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny enhancer checkpoint, 4 training pairs (64x64) and 2 validation pairs (odd 59x77)."""
    tmp = tmp_path_factory.mktemp("memory_e2e")
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", epoch=3)
    return {"tmp": tmp, "weights": weights, "train": write_pairs(tmp / "train", "abcd", (64, 64), 1),
            "val": write_pairs(tmp / "val", "xy", (59, 77), 2), "save": tmp / "runs"}


RUN_FLAGS = {"plain": (), "learned": ("--learn_query", "--pos_thres", "0.2")}


def train_args(setup: dict, env: str, *extra, mem_size: int = 32) -> list:
    return ["--pretrain_weights", setup["weights"], "--train_dir", setup["train"], "--val_dir", setup["val"],
            "--nepoch", "2", "--val_time", "1", "--mem_size", mem_size, "--batch_size", "2", "--train_ps", "48",
            "--save_dir", setup["save"], "--env", env, "--device", "cpu", "--query_encoder", "enhancer", *extra]


@pytest.fixture(scope="module")
def trained(setup) -> dict:
    """train_memory.py for 2 epochs, without and with --learn_query."""
    return {name: run_py("train_memory.py", *train_args(setup, name, *flags)) for name, flags in RUN_FLAGS.items()}


@pytest.fixture(scope="module")
def tested(setup, trained) -> dict:
    """test.py --save_images on the validation pairs with each run's memory_best.pth."""
    out = {}
    for name in RUN_FLAGS:
        assert_ran(trained[name])
        result = setup["tmp"] / f"result_{name}"
        proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                      "--mem_weights", setup["save"] / name / "models" / "memory_best.pth",
                      "--result_dir", result, "--save_images", "--device", "cpu")
        out[name] = {"proc": proc, "result": result}
    return out


def best_logged(log: str) -> tuple[float, float]:
    """(best val mem PSNR, its ori PSNR) from the 'finished:' line of train.log."""
    m = re.search(r"finished: best val mem PSNR ([\d.]+) at epoch \d+ \(ori ([\d.]+)\)", log)
    assert m, log
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("name", list(RUN_FLAGS))
def test_train_memory_outputs(setup, trained, name):
    """Exit 0; models/memory_latest.pth and memory_best.pth, options.yml and train.log with val
    ori / mem PSNR lines; a learned head is stored (and trained) only with --learn_query."""
    assert_ran(trained[name])
    env = setup["save"] / name
    for f in ("models/memory_latest.pth", "models/memory_best.pth", "options.yml", "train.log"):
        assert (env / f).is_file(), f
    log = (env / "train.log").read_text()
    assert len(re.findall(r"epoch \d: val ori PSNR [\d.]+ SSIM [\d.]+ \| mem PSNR [\d.]+", log)) == 2, log
    options = yaml.safe_load((env / "options.yml").read_text())
    assert options["learn_query"] is (name == "learned") and options["query_encoder"] == "enhancer"
    assert options["memory"]["mem_size"] == 32 and options["memory"]["key_dim"] == 128
    mem, ckpt = load_memory(env / "models" / "memory_latest.pth")
    assert ckpt["epoch"] == 2 and ckpt["query_encoder"] == "enhancer"
    assert int((mem.top_index >= 0).sum()) == 8  # 4 pairs x 2 epochs, no match at threshold 1e-5
    if name == "learned":
        assert ckpt["head_state_dict"]["proj.weight"].abs().max() > 0
    else:
        assert ckpt["head_state_dict"] is None


def test_progress_bar_and_log_number_the_epochs_alike(setup, trained):
    """The 2-epoch run's progress bar and its log lines both call the epochs 1 and 2 (the bar
    counted 0 and 1)."""
    proc = assert_ran(trained["plain"])
    log = (setup["save"] / "plain" / "train.log").read_text()
    assert sorted({int(e) for e in re.findall(r"epoch (\d+):\s+\d+%", proc.stderr)}) == [1, 2]
    assert re.findall(r"epoch (\d+): \d+/\d+ queries matched", log) == ["1", "2"]
    assert re.findall(r"epoch (\d+): val ori PSNR", log) == ["1", "2"]
    assert "starting at epoch 1:" in log


@pytest.mark.parametrize("name", list(RUN_FLAGS))
def test_test_py_with_trained_memory(setup, trained, tested, name):
    """test.py --mem_weights memory_best.pth: ori/ and mem/ PNGs at the input sizes; metrics.csv
    with ori_* and mem_* columns; the mean mem PSNR equals the best val mem PSNR the trainer
    logged for the same pairs (within 0.05 dB: it refines the 8-bit outputs, test.py the float
    ones), and the ori PSNR equals the logged one."""
    proc, result = tested[name]["proc"], tested[name]["result"]
    assert_ran(proc)
    for stage in ("ori", "mem"):
        for n in "xy":
            img = cv2.imread(str(result / stage / f"{n}.png"))
            assert img is not None and img.shape == (59, 77, 3), (stage, n)
    fields, rows = read_csv(result / "metrics.csv")
    assert fields == ["name", *MEM_COLUMNS, *EFFECT_COLUMNS, "recalled"] and [r["name"] for r in rows] == ["x", "y"]
    summary = json.loads((result / "summary.json").read_text())
    _, ckpt = load_memory(setup["save"] / name / "models" / "memory_best.pth")
    for r in rows:  # the recalled entries name training images of this memory, as in summary.json
        entries = summary["recalled"][r["name"]]
        assert r["recalled"] == " ".join(f"{e['name']}:{e['score']:.4f}" for e in entries)
        assert entries and all(e["name"] in ckpt["sources"]["names"] for e in entries)
    mem_psnr, ori_psnr = best_logged((setup["save"] / name / "train.log").read_text())
    assert summary["mean"]["mem_psnr"] == pytest.approx(mem_psnr, abs=0.05)
    assert summary["mean"]["ori_psnr"] == pytest.approx(ori_psnr, abs=1e-3)
    assert summary["query_encoder"] == "enhancer"


def test_mem_image_is_the_refiner_output(setup, tested):
    """The saved mem/ image is the refiner's correction of the enhancer output (in-process)."""
    assert_ran(tested["plain"]["proc"])
    model, _ = load_enhancer(setup["weights"])
    path = setup["save"] / "plain" / "models" / "memory_best.pth"
    mem, ckpt = load_memory(path)
    refiner = build_refiner(mem, ckpt, path, model, ReadSettings(top_k=1))
    x = image_to_tensor(read_image(setup["val"] / "low" / "x.png"))
    expect = to_uint8(tensor_to_image(refiner(x, enhance(model, x))))
    got = to_uint8(read_image(tested["plain"]["result"] / "mem" / "x.png"))
    assert np.abs(expect.astype(int) - got.astype(int)).max() <= 1


def test_resume_continues_exactly(setup, trained):
    """--resume --nepoch 3 after the finished 2-epoch --learn_query run logs 'resuming at epoch 3',
    ends at epoch 3, and gives the same memory and head as an uninterrupted 3-epoch run."""
    assert_ran(trained["learned"])
    shutil.copytree(setup["save"] / "learned", setup["save"] / "resumed")
    flags = (*RUN_FLAGS["learned"], "--nepoch", "3")
    proc = run_py("train_memory.py", *train_args(setup, "resumed", *flags, "--resume"))
    assert_ran(proc)
    log = (setup["save"] / "resumed" / "train.log").read_text()
    assert "resuming at epoch 3" in log and "epoch 3: val ori PSNR" in log
    assert "epoch 4" not in log
    fresh = run_py("train_memory.py", *train_args(setup, "fresh3", *flags))
    assert_ran(fresh)
    a = torch.load(setup["save"] / "resumed" / "models" / "memory_latest.pth", weights_only=True)
    b = torch.load(setup["save"] / "fresh3" / "models" / "memory_latest.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in ("mem_key", "mem_vale", "mem_age", "mem_index"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["head_state_dict"]["proj.weight"], b["head_state_dict"]["proj.weight"])


def test_enhanced_dir_matches_normal_run(setup, tested):
    """test.py --enhanced_dir on a copy of the ori/ outputs: ori metrics identical (same images),
    mem metrics within 0.05 dB of the normal run's."""
    assert_ran(tested["plain"]["proc"])
    enhanced = setup["tmp"] / "enhanced"
    shutil.copytree(tested["plain"]["result"] / "ori", enhanced)
    result = setup["tmp"] / "result_enhanced"
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", setup["save"] / "plain" / "models" / "memory_best.pth",
                  "--enhanced_dir", enhanced, "--result_dir", result, "--device", "cpu")
    assert_ran(proc)
    _, normal = read_csv(tested["plain"]["result"] / "metrics.csv")
    _, other = read_csv(result / "metrics.csv")
    assert [r["name"] for r in other] == [r["name"] for r in normal]
    for a, b in zip(normal, other):
        for c in ("ori_psnr", "ori_ssim", "ori_gt_mean_psnr"):
            assert a[c] == b[c], c
        assert float(a["mem_psnr"]) == pytest.approx(float(b["mem_psnr"]), abs=0.05)
    assert json.loads((result / "summary.json").read_text())["enhanced_dir"] == str(enhanced)


def test_enhanced_dir_missing_image(setup, tested):
    """--enhanced_dir lacking one input's image: exit 2, one error line naming --enhanced_dir."""
    assert_ran(tested["plain"]["proc"])
    partial = setup["tmp"] / "enhanced_partial"
    partial.mkdir()
    shutil.copy(tested["plain"]["result"] / "ori" / "x.png", partial / "x.png")
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", setup["save"] / "plain" / "models" / "memory_best.pth",
                  "--enhanced_dir", partial, "--result_dir", setup["tmp"] / "r_partial", "--device", "cpu")
    error = assert_user_error(proc, partial)
    assert "--enhanced_dir" in error and "y" in error


def test_enhanced_dir_without_mem_weights(setup, tested):
    """--enhanced_dir without --mem_weights: exit 2, one error line naming --mem_weights."""
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--enhanced_dir", tested["plain"]["result"] / "ori",
                  "--result_dir", setup["tmp"] / "r_nomem", "--device", "cpu")
    assert_user_error(proc, "--mem_weights")


def test_published_memory_with_resnet18_through_test_py(setup, resnet_file, tmp_path):
    """The issue's done-when: a published-format memory (9000 x 512, p = 1) and a torchvision
    resnet18 state_dict passed as --query_weights run through test.py (exit 0, mem/ written);
    without --query_weights and with an empty TORCH_HOME: exit 2 with one error line."""
    mem_file = published_memory(tmp_path / "memory_lolv1.pth", 9000, 3)
    result = tmp_path / "result"
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", mem_file, "--query_weights", resnet_file,
                  "--result_dir", result, "--save_images", "--device", "cpu")
    assert_ran(proc)
    for n in "xy":
        assert cv2.imread(str(result / "mem" / f"{n}.png")).shape == (59, 77, 3)
    assert json.loads((result / "summary.json").read_text())["query_encoder"] == "resnet18"
    home = tmp_path / "empty_home"
    home.mkdir()
    proc = run_py("test.py", "--weights", setup["weights"], "--input_dir", setup["val"],
                  "--mem_weights", mem_file, "--result_dir", tmp_path / "r2", "--device", "cpu",
                  env_extra={"TORCH_HOME": str(home)})
    error = assert_user_error(proc, home / "hub" / "checkpoints" / Path(RESNET18_URL).name)
    assert "--query_weights" in error


# ============================================================================ bad input

@pytest.mark.parametrize("flags,must_contain", [
    (("--resume",), "nothing to resume"),
    (("--K_feat_dim", "64"), "--K_feat_dim 64 does not match the enhancer query width and p = 1 (--pooling_size), which has 128"),
    (("--V_feat_dim", "6"), "--V_feat_dim 6"),
], ids=["resume_nothing", "K_feat_dim", "V_feat_dim"])
def test_train_memory_bad_flags(setup, tmp_path, flags, must_contain):
    """Flags train_memory.py cannot honour: exit 2, one 'error:' line, no traceback."""
    args = train_args(setup, "bad", *flags)
    args[args.index("--save_dir") + 1] = tmp_path / "runs"
    assert_user_error(run_py("train_memory.py", *args), must_contain)


@pytest.mark.parametrize("flags", [("--testing_top_k", "0"), ("--testing_top_k", "33"), ("--mem_size", "0")])
def test_train_memory_bad_top_k_or_mem_size(flags):
    """--testing_top_k outside [1, mem_size] (0 would silently recall zeros, 33 > 32 crash at the
    first validation) and --mem_size 0 are refused up front (checked in-process: memory_config)."""
    from train_memory import get_args_parser, memory_config, read_config

    args = get_args_parser().parse_args(["--mem_size", "32", *flags])
    with pytest.raises(UserError, match="--testing_top_k"):
        memory_config(args, 128, read_config(args)[0].top_k)
    ok = get_args_parser().parse_args(["--mem_size", "32", "--testing_top_k", "32", "--pooling_size", "2"])
    assert memory_config(ok, 128, read_config(ok)[0].top_k) == MemoryConfig(
        mem_size=32, key_dim=128, pooling_size=2, threshold=1e-5)


@pytest.mark.parametrize("flags,mem_size", [(RUN_FLAGS["learned"], 64)], ids=["mem_size"])
def test_resume_with_other_flags_is_user_error(setup, trained, flags, mem_size):
    """--resume with another --mem_size (it crashed in load_state_dict): exit 2, one error line
    naming the checkpoint, which is left untouched."""
    assert_ran(trained["learned"])
    env = f"resume_mismatch_{mem_size}"
    shutil.copytree(setup["save"] / "learned", setup["save"] / env)
    latest = setup["save"] / env / "models" / "memory_latest.pth"
    before = latest.read_bytes()
    proc = run_py("train_memory.py", *train_args(setup, env, *flags, "--nepoch", "3", "--resume", mem_size=mem_size))
    assert_user_error(proc, latest)
    assert latest.read_bytes() == before


def test_resume_takes_the_run_flags_and_clear_cache_removes_the_passes(setup, trained, tmp_path):
    """--resume of the --learn_query run without --learn_query continues with the head (the flag
    comes from the checkpoint; before, it was dropped or refused); a flag given again with another
    value is named in one log line. The run ends by saying how large its pass cache is, and
    --clear_cache removes it."""
    assert_ran(trained["learned"])
    env = "resume_restores"
    shutil.copytree(setup["save"] / "learned", setup["save"] / env)
    cache = tmp_path / "cache"
    args = train_args(setup, env, "--nepoch", "3", "--resume", "--val_time", "2", "--cache_dir", cache)
    assert_ran(run_py("train_memory.py", *args))
    latest = torch.load(setup["save"] / env / "models" / "memory_latest.pth", map_location="cpu", weights_only=False)
    assert latest["epoch"] == 3 and latest["head_state_dict"] is not None
    log = (setup["save"] / env / "train.log").read_text()
    changed = [line for line in log.splitlines() if "given again" in line]
    assert len(changed) == 1 and "--nepoch 2 -> 3" in changed[0] and "--val_time 1 -> 2" in changed[0], changed
    assert re.search(r"cached enhancer passes: 2 files, [\d.]+ GB in " + re.escape(str(cache)), log), log
    assert_ran(run_py("train_memory.py", *args[:-2], "--cache_dir", cache, "--nepoch", "4", "--clear_cache"))
    assert "--clear_cache: removed 2 cached enhancer passes" in (setup["save"] / env / "train.log").read_text()
    assert not any(cache.rglob("*.pt"))
