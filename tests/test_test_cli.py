"""End-to-end `test.py`, run as users run it (a subprocess in the repo root), with tiny
random-weight checkpoints (emnet_tiny, embed_dim 8: about 1 s per 600x400 image on a CPU)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, assert_user_error, read_csv, run_script, run_test_py, write_png
from models.inference import enhance
from models.loading import load_enhancer
from utils.image_io import image_to_tensor, read_image, tensor_to_image, to_uint8
from utils.metrics import METRIC_CONVENTION, psnr, ssim

EVAL_NAMES = ("1", "111")
METRIC_COLUMNS = ["ori_psnr", "ori_ssim", "ori_gt_mean_psnr"]


def copy_eval_pairs(lol_root: Path, dest: Path, names=EVAL_NAMES) -> Path:
    for side in ("low", "high"):
        (dest / side).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(lol_root / "eval15" / side / f"{n}.png", dest / side / f"{n}.png")
    return dest


@pytest.fixture
def small_input(make_pairs) -> Path:
    """Two synthetic 24x40 pairs: valid input for the cases that fail on weights or flags."""
    return make_pairs(names=("1", "2"), size=(24, 40))


# ----------------------------------------------------------------------------- the main run

@pytest.fixture(scope="module")
def main_run(lol_root, tmp_path_factory):
    """test.py --save_images on 2 real eval15 pairs with our-format emnet_tiny/8 weights, into a
    result folder that already holds a user's files."""
    from conftest import write_enhancer_checkpoint

    tmp = tmp_path_factory.mktemp("main_run")
    data = copy_eval_pairs(lol_root, tmp / "eval")
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", epoch=5)
    result = tmp / "results"
    (result / "ori").mkdir(parents=True)
    (result / "notes.txt").write_text("keep me")
    (result / "ori" / "old.png").write_bytes(b"an earlier result")
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", result, "--save_images")
    return {"proc": proc, "data": data, "result": result, "weights": weights, "tmp": tmp}


def test_main_run_succeeds(main_run):
    """Exit status 0, no traceback, a mean row printed."""
    proc = main_run["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "mean" in proc.stdout


def test_main_run_images(main_run):
    """ori/<name>.png exists for every input, with the input's size (600x400, no padding left)."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    for n in EVAL_NAMES:
        out = cv2.imread(str(main_run["result"] / "ori" / f"{n}.png"), cv2.IMREAD_UNCHANGED)
        inp = cv2.imread(str(main_run["data"] / "low" / f"{n}.png"), cv2.IMREAD_UNCHANGED)
        assert out is not None and out.dtype == np.uint8
        assert out.shape == inp.shape == (400, 600, 3)


def test_main_run_metrics_csv(main_run):
    """metrics.csv: one row per image, the name and the three ori_* columns, finite numbers that
    are the metrics of the saved image against the ground truth."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    fields, rows = read_csv(main_run["result"] / "metrics.csv")
    assert fields == ["name", *METRIC_COLUMNS]
    assert sorted(r["name"] for r in rows) == sorted(EVAL_NAMES)
    for r in rows:
        assert all(math.isfinite(float(r[c])) for c in METRIC_COLUMNS)
    # The scores belong to the written image (rounded 8-bit RGB) and its ground truth.
    r = rows[0]
    out = to_uint8(read_image(main_run["result"] / "ori" / f"{r['name']}.png"))
    gt = to_uint8(read_image(main_run["data"] / "high" / f"{r['name']}.png"))
    assert float(r["ori_psnr"]) == pytest.approx(psnr(out, gt), rel=1e-9)
    assert float(r["ori_ssim"]) == pytest.approx(ssim(out, gt), rel=1e-9)


def test_main_run_summary(main_run):
    """summary.json: num_images 2, the metric convention, the model, and means equal to the CSV's."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    summary = json.loads((main_run["result"] / "summary.json").read_text())
    _, rows = read_csv(main_run["result"] / "metrics.csv")
    assert summary["num_images"] == 2
    assert summary["convention"] == METRIC_CONVENTION
    assert summary["model"] == "--arch emnet_tiny --embed_dim 8"
    assert summary["checkpoint_epoch"] == 5
    assert set(summary["mean"]) == set(METRIC_COLUMNS)
    assert set(summary["ci95"]) == set(METRIC_COLUMNS) and "bootstrap" in summary["ci95_method"]
    for c in METRIC_COLUMNS:
        lo, hi = summary["ci95"][c]
        assert lo <= summary["mean"][c] <= hi
    for c in METRIC_COLUMNS:
        assert summary["mean"][c] == pytest.approx(np.mean([float(r[c]) for r in rows]), rel=1e-9)
    text = (main_run["result"] / "result.txt").read_text()
    assert "ori_psnr" in text and METRIC_CONVENTION in text


def test_main_run_output_is_the_enhancer_output(main_run):
    """The saved image is the loaded network's output on the low image, rounded to 8 bits."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    model, _ = load_enhancer(main_run["weights"])
    low = read_image(main_run["data"] / "low" / "1.png")
    expect = to_uint8(tensor_to_image(enhance(model, image_to_tensor(low))))
    got = to_uint8(read_image(main_run["result"] / "ori" / "1.png"))
    diff = np.abs(expect.astype(int) - got.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_existing_results_are_never_deleted(main_run):
    """Files the user already had in --result_dir (and in ori/) are still there afterwards, and
    no temporary files are left behind."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    result = main_run["result"]
    assert (result / "notes.txt").read_text() == "keep me"
    assert (result / "ori" / "old.png").read_bytes() == b"an earlier result"
    leftovers = [p for p in result.rglob("*") if p.name.endswith(".tmp") or p.name == ".write_test"]
    assert leftovers == []


def test_published_format_with_flags(main_run, make_checkpoint):
    """The same weights as {'epoch','state_dict'} with `module.` keys, run with --arch emnet_tiny
    --embed_dim 8, give the same scores as our format."""
    assert main_run["proc"].returncode == 0, main_run["proc"].stderr
    weights, _ = make_checkpoint(name="model_lolv1.pth", fmt="published", module_prefix=True, seed=0)
    result = main_run["tmp"] / "published"
    proc = run_test_py("--weights", weights, "--input_dir", main_run["data"], "--result_dir", result,
                       "--arch", "emnet_tiny", "--embed_dim", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    _, ours = read_csv(main_run["result"] / "metrics.csv")
    _, published = read_csv(result / "metrics.csv")
    assert len(published) == 2
    for a, b in zip(ours, published):
        assert a["name"] == b["name"]
        for c in METRIC_COLUMNS:
            assert float(a[c]) == pytest.approx(float(b[c]), abs=1e-4)
    assert not (result / "ori").exists()  # no --save_images, no images


def test_amp_bf16_on_the_cpu(main_run):
    """`--amp bf16 --device cpu` runs (it crashed in the fast path's float32 kernels) and its
    scores stay near the float32 run's on the same weights and pairs."""
    result = main_run["tmp"] / "bf16"
    proc = run_test_py("--weights", main_run["weights"], "--input_dir", main_run["data"], "--result_dir", result,
                       "--device", "cpu", "--amp", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((result / "summary.json").read_text())["amp"] == "bf16"
    _, exact = read_csv(main_run["result"] / "metrics.csv")
    _, low = read_csv(result / "metrics.csv")
    assert [r["name"] for r in low] == [r["name"] for r in exact]
    for a, b in zip(exact, low):
        assert float(b["ori_psnr"]) == pytest.approx(float(a["ori_psnr"]), abs=0.05)


@pytest.mark.parametrize("layout", ["low_only", "flat"])
def test_folder_without_ground_truth(tmp_path, make_checkpoint, layout):
    """Without high/ (low/ alone, or a flat folder) the images are enhanced at their own odd
    sizes, and metrics.csv holds names only."""
    weights, _ = make_checkpoint()
    data = tmp_path / "in"
    sizes = {"a": (30, 45), "b": (17, 9)}
    rng = np.random.default_rng(0)
    for n, hw in sizes.items():
        folder = data / "low" if layout == "low_only" else data
        write_png(folder / f"{n}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    result = tmp_path / "out"
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", result, "--save_images")
    assert proc.returncode == 0, proc.stderr
    for n, hw in sizes.items():
        assert cv2.imread(str(result / "ori" / f"{n}.png")).shape == (*hw, 3)
    fields, rows = read_csv(result / "metrics.csv")
    assert fields == ["name"]
    assert [r["name"] for r in rows] == ["a", "b"]
    summary = json.loads((result / "summary.json").read_text())
    assert summary["num_images"] == 2 and summary["mean"] == {}


# ----------------------------------------------------------------------------- bad input

def test_missing_input_dir(tmp_path, make_checkpoint):
    """--input_dir that does not exist."""
    weights, _ = make_checkpoint()
    missing = tmp_path / "no_such_dir"
    proc = run_test_py("--weights", weights, "--input_dir", missing, "--result_dir", tmp_path / "r")
    assert_user_error(proc, missing)
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_empty_low_dir(tmp_path, make_checkpoint):
    """low/ (and high/) without any image."""
    weights, _ = make_checkpoint()
    (tmp_path / "in" / "low").mkdir(parents=True)
    (tmp_path / "in" / "high").mkdir()
    proc = run_test_py("--weights", weights, "--input_dir", tmp_path / "in", "--result_dir", tmp_path / "r")
    assert_user_error(proc, tmp_path / "in" / "low")


def test_unpaired_names(make_pairs, make_checkpoint, tmp_path):
    """A low image without a ground truth image of the same name."""
    weights, _ = make_checkpoint()
    data = make_pairs(names=("1", "2"), size=(16, 16))
    extra = write_png(data / "low" / "3.png", np.zeros((16, 16, 3), np.uint8))
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", tmp_path / "r")
    assert_user_error(proc, extra)


def test_truncated_image(tmp_path, make_checkpoint):
    """Half of a real 600x400 PNG: an error naming the file, no traceback, no results written.

    tqdm's progress bar and libpng's own "libpng error: ..." message also reach stderr (outside
    our control); the error line must still be one line and the last one."""
    weights, _ = make_checkpoint()
    data = tmp_path / "in"
    rng = np.random.default_rng(0)
    for side in ("low", "high"):
        write_png(data / side / "1.png", rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))
    bad = data / "low" / "1.png"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", tmp_path / "r")
    assert_user_error(proc, bad, allow_noise=("enhance:", "libpng"))
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_bad_images_are_listed_at_once_before_anything_is_written(tmp_path, make_checkpoint):
    """1.png good, 22.png random bytes, a truncated ground truth 5.png and a pair of two sizes: one
    error line names all three files and the pair, and the run leaves no result folder (no
    ori/1.png, no lock) behind."""
    weights, _ = make_checkpoint()
    data = tmp_path / "in"
    rng = np.random.default_rng(0)
    for name, size in (("1", (16, 24)), ("5", (16, 24)), ("22", (16, 24)), ("7", (16, 24))):
        for side in ("low", "high"):
            write_png(data / side / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    (data / "low" / "22.png").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    raw = (data / "high" / "5.png").read_bytes()
    (data / "high" / "5.png").write_bytes(raw[: len(raw) // 2])
    write_png(data / "high" / "7.png", rng.integers(0, 256, (24, 16, 3), dtype=np.uint8))
    result = tmp_path / "log_eval" / "r"
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", result, "--save_images")
    line = assert_user_error(proc, data / "low" / "22.png", allow_noise=("libpng",))
    assert str(data / "high" / "5.png") in line and f"{data / 'low' / '7.png'} is 24x16 but" in line
    assert str(data / "low" / "1.png") not in line
    assert not (tmp_path / "log_eval").exists()


def test_a_run_that_fails_before_its_first_image_leaves_no_folder(small_input, make_checkpoint, tmp_path,
                                                                    monkeypatch):
    """A failure after the result folder was made but before the first image is done (here the
    enhancer pass) removes the folder test.py made and its lock; into a folder that existed, the
    folder and its files stay."""
    import test as test_py
    from utils.errors import UserError
    from utils.folder_lock import LOCK_NAME

    def fail(*args, **kwargs):
        raise UserError("the first image failed")

    monkeypatch.setattr(test_py, "evaluate_pairs", fail)
    weights, _ = make_checkpoint()
    for result, existed in ((tmp_path / "new" / "r", False), (tmp_path / "old", True)):
        if existed:
            (result / "ori").mkdir(parents=True)
            (result / "ori" / "earlier.png").write_bytes(b"x")
        args = test_py.get_args_parser().parse_args(
            ["--weights", str(weights), "--input_dir", str(small_input), "--result_dir", str(result),
             "--save_images", "--device", "cpu"])
        with pytest.raises(UserError, match="the first image failed"):
            test_py.main(args)
        if existed:
            assert sorted(p.name for p in result.rglob("*")) == ["earlier.png", "ori"]
        else:
            assert not (tmp_path / "new").exists()
        assert not (result / LOCK_NAME).exists()


def test_missing_weights(small_input, tmp_path):
    """--weights that does not exist."""
    missing = tmp_path / "nope.pth"
    proc = run_test_py("--weights", missing, "--input_dir", small_input, "--result_dir", tmp_path / "r")
    assert_user_error(proc, missing)


def test_missing_weights_and_memory_are_one_error(small_input, tmp_path):
    """Neither --weights nor --mem_weights exists: one line names both, and nothing is written."""
    weights, memory = tmp_path / "nope.pth", tmp_path / "nomem.pth"
    proc = run_test_py("--weights", weights, "--mem_weights", memory, "--input_dir", small_input,
                       "--result_dir", tmp_path / "r")
    line = assert_user_error(proc, f"--weights {weights}")
    assert f"--mem_weights {memory}" in line
    assert not (tmp_path / "r").exists()


def test_dataset_root_as_input_names_its_folders(make_pairs, make_checkpoint, tmp_path):
    """The LOL root instead of its eval15/: one line suggesting --input_dir ROOT/eval15."""
    weights, _ = make_checkpoint()
    root = tmp_path / "LOL-v1"
    root.mkdir()
    make_pairs(names=("1",)).rename(root / "eval15")
    proc = run_test_py("--weights", weights, "--input_dir", root, "--result_dir", tmp_path / "r")
    assert_user_error(proc, f"--input_dir {root / 'eval15'}")


def test_high_folder_alone_as_input_names_the_missing_low(make_pairs, make_checkpoint, tmp_path):
    """A folder holding high/ only: one line naming the low/ it lacks."""
    weights, _ = make_checkpoint()
    data = make_pairs(names=("1",), low_dir="high", high_dir=None)
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", tmp_path / "r")
    assert "no images" not in assert_user_error(proc, data / "low")


def test_corrupt_weights(small_input, tmp_path):
    """--weights holding random bytes."""
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    proc = run_test_py("--weights", bad, "--input_dir", small_input, "--result_dir", tmp_path / "r")
    assert_user_error(proc, bad)


def test_checkpoint_of_another_architecture(small_input, make_checkpoint, tmp_path):
    """A published-format emnet_tiny/8 file run without flags (so as the published network): the
    error names the file and the flags that fit it."""
    weights, _ = make_checkpoint(fmt="published")
    proc = run_test_py("--weights", weights, "--input_dir", small_input, "--result_dir", tmp_path / "r")
    error = assert_user_error(proc, weights)
    assert "--arch emnet_tiny --embed_dim 8" in error
    assert re.search(r"\d+ missing, \d+ unexpected, \d+ mis-shaped", error)


def test_unwritable_result_dir(small_input, make_checkpoint, tmp_path):
    """--result_dir below a regular file cannot be created (fails even for root)."""
    weights, _ = make_checkpoint()
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    proc = run_test_py("--weights", weights, "--input_dir", small_input, "--result_dir", target)
    assert_user_error(proc, target)


def test_enhancer_file_as_memory_is_refused(small_input, make_checkpoint, tmp_path):
    """An enhancer checkpoint given to --mem_weights is named as not being a memory file."""
    weights, _ = make_checkpoint()
    proc = run_test_py("--weights", weights, "--input_dir", small_input, "--result_dir", tmp_path / "r",
                       "--mem_weights", weights)
    assert_user_error(proc, weights)
    assert "not an external-memory checkpoint" in proc.stderr


# ----------------------------------------------------------------------------- --lpips

def test_lpips_columns(make_pairs, make_checkpoint, alexnet_random_file, resnet_file, tmp_path):
    """--lpips adds ori_lpips and mem_lpips to metrics.csv, summary.json (means, intervals, the
    paired mem - ori interval, the convention) and the printed table; each value is LPIPS of the
    saved 8-bit image against its ground truth."""
    pytest.importorskip("lpips")
    from conftest import published_memory
    from utils.perceptual import LPIPS_CONVENTION, build_lpips

    data = make_pairs(names=("1", "2", "3"), size=(64, 72))
    weights, _ = make_checkpoint()
    memory = published_memory(tmp_path / "memory.pth", 40, 3)
    result = tmp_path / "r"
    proc = run_test_py("--weights", weights, "--input_dir", data, "--result_dir", result, "--save_images",
                       "--mem_weights", memory, "--query_weights", resnet_file,
                       "--lpips", "--lpips_alexnet", alexnet_random_file)
    assert proc.returncode == 0, proc.stderr
    lpips_cols = ["ori_lpips", "mem_lpips"]
    fields, rows = read_csv(result / "metrics.csv")
    assert set(lpips_cols) <= set(fields)
    lpips = build_lpips(str(alexnet_random_file), "")
    for r in rows:
        gt = image_to_tensor(read_image(data / "high" / f"{r['name']}.png"))
        for stage in ("ori", "mem"):
            out = image_to_tensor(read_image(result / stage / f"{r['name']}.png"))
            assert float(r[f"{stage}_lpips"]) == pytest.approx(float(lpips(out, gt)), rel=1e-5, abs=1e-7)
    summary = json.loads((result / "summary.json").read_text())
    assert summary["lpips_convention"] == LPIPS_CONVENTION
    for c in lpips_cols:
        assert summary["mean"][c] == pytest.approx(np.mean([float(r[c]) for r in rows]), rel=1e-9)
        lo, hi = summary["ci95"][c]
        assert lo <= summary["mean"][c] <= hi
    assert "mem_minus_ori_lpips" in summary["ci95"]
    assert "ori_lpips" in proc.stdout and "mem - ori LPIPS" in proc.stdout


def test_lpips_without_weights_offline(small_input, make_checkpoint, tmp_path):
    """--lpips with no AlexNet file and nothing in the torch hub cache, downloads forbidden: one
    line naming the URL, where to save the file and --lpips_alexnet; exit 2, nothing written."""
    weights, _ = make_checkpoint()
    home = tmp_path / "home"
    home.mkdir()
    result = tmp_path / "r"
    proc = run_script("test.py", "--weights", weights, "--input_dir", small_input, "--result_dir", result,
                      "--lpips", env_extra={"TORCH_HOME": str(home), "EMNET_NO_DOWNLOAD": "1"})
    error = assert_user_error(proc, "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    assert str(home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in error
    assert "--lpips_alexnet" in error and "drop --lpips" in error
    assert not result.exists()


def test_default_result_dir_depends_on_input_weights_and_memory(tmp_path):
    """Without --result_dir: log_eval/<input name>/<weights name>[+<memory name>], so the CPU
    model run after the default (or ori-only after ori+mem) never replaces the first results."""
    from utils.report import default_result_dir

    eval15 = tmp_path / "LOL.v1" / "eval15"
    eval15.mkdir(parents=True)
    photo = write_png(tmp_path / "photo.v2.png", np.zeros((8, 8, 3), np.uint8))
    default = default_result_dir(eval15, "pre/big.pth", "mem/levels_memory.pth")
    assert default == Path("log_eval/eval15/big+levels_memory")
    others = {default_result_dir(eval15, "pre/small.pth", "mem/levels_memory.pth"),
              default_result_dir(eval15, "pre/big.pth", None), default_result_dir(eval15.parent, "pre/big.pth", None)}
    assert len(others | {default}) == 4
    assert default_result_dir(photo, "w.pth", None) == Path("log_eval/photo.v2/w")
    assert default_result_dir(f"{eval15}/", "w.pth", None) == Path("log_eval/eval15/w")


def test_trained_runs_with_the_same_file_names_get_their_own_result_folders(tmp_path):
    """Two runs' model_best.pth + memory_best.pth (same names, other weights) land in different
    folders, named by a fingerprint of the bytes; the bundled pair keeps the folder the README
    documents."""
    from utils.bundled import BUNDLED_ENHANCER, BUNDLED_MEMORY
    from utils.report import default_result_dir

    eval15 = tmp_path / "eval15"
    eval15.mkdir()
    dirs = []
    for run, byte in (("run_a", b"a"), ("run_b", b"b")):
        models = tmp_path / "log" / run / "models"
        models.mkdir(parents=True)
        (models / "model_best.pth").write_bytes(byte * 100)
        (models / "memory_best.pth").write_bytes(b"m" * 100)
        dirs.append(default_result_dir(eval15, models / "model_best.pth", models / "memory_best.pth"))
    assert dirs[0] != dirs[1]
    assert all(re.fullmatch(r"model_best-[0-9a-f]{8}\+memory_best-[0-9a-f]{8}", d.name) for d in dirs), dirs
    assert dirs[0].name.split("+")[1] == dirs[1].name.split("+")[1]  # the same memory bytes: the same label
    bundled = default_result_dir(REPO / "datasets" / "demo", REPO / BUNDLED_ENHANCER, REPO / BUNDLED_MEMORY)
    assert bundled == Path("log_eval/demo/emnet_dim32_lolv1_h200_bf16+emnet_dim32_lolv1_levels_memory")
