"""Baselines (models/baselines.py) and their benchmark CLI (benchmarks/baselines.py)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from models import baselines
from models.baselines import LimeParams, ZeroDCE
from models.loading import memory_payload
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.image_io import read_image, to_uint8
from utils.metrics import psnr


def dark_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, dark float32 RGB image in [0.02, 0.25] with some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.05 + 0.15 * (0.5 + 0.5 * np.sin(6 * xx + 3 * yy))
    img = base[:, :, None] * np.array([1.0, 0.8, 0.6]) + rng.uniform(0, 0.03, (h, w, 3))
    return np.clip(img, 0.02, 0.25).astype(np.float32)


# ----------------------------------------------------------------------------- classic methods

@pytest.mark.parametrize("fn", [baselines.gamma_correction, baselines.clahe, baselines.lime],
                         ids=["gamma", "clahe", "lime"])
def test_classic_methods_brighten_and_keep_format(fn):
    img = dark_image()
    out = fn(img)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.mean() > img.mean() + 0.02, (out.mean(), img.mean())


def test_gamma_is_the_fixed_power():
    img = dark_image()
    np.testing.assert_allclose(baselines.gamma_correction(img), img ** (1 / 2.2), rtol=1e-6)
    assert baselines.gamma_correction(np.zeros((2, 2, 3), np.float32)).max() == 0.0


def test_clahe_keeps_neutral_grey_neutral():
    """Only lightness changes: a grey image stays grey (R = G = B up to LAB rounding)."""
    grey = np.repeat(dark_image()[:, :, :1], 3, axis=2)
    out = to_uint8(baselines.clahe(grey)).astype(int)
    assert np.abs(out[:, :, 0] - out[:, :, 1]).max() <= 2 and np.abs(out[:, :, 1] - out[:, :, 2]).max() <= 2


def test_lime_constant_image():
    """A constant image: the illumination stays constant (= the max channel) and the output is
    the input divided by illumination ** gamma."""
    img = np.empty((20, 30, 3), np.float32)
    img[:] = (0.1, 0.2, 0.15)
    params = LimeParams()
    t_init, t = baselines.lime_illumination(img, params)
    c = float(np.float32(0.2))
    assert (t_init == np.float32(0.2)).all()
    np.testing.assert_allclose(t, c, rtol=1e-9)
    np.testing.assert_allclose(baselines.lime(img, params), img / c ** params.gamma, rtol=1e-6)


def test_lime_refined_illumination_is_a_smoothed_average():
    """The refined map is a weighted average of the initial one: it stays within the initial map's
    range, keeps its mean nearly, and is smoother (smaller total variation)."""
    img = dark_image(seed=1)
    img[10:20, 10:40] *= 3.0  # a bright patch with sharp edges
    t_init, t = baselines.lime_illumination(img)
    assert t.shape == t_init.shape
    assert t.min() >= t_init.min() - 1e-9 and t.max() <= t_init.max() + 1e-9
    assert abs(t.mean() - t_init.mean()) < 0.01

    def tv(a):
        return np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()

    assert tv(t) < 0.8 * tv(t_init)
    assert not np.allclose(t, t.mean())  # structure (the patch) survives


def test_lime_stronger_alpha_smooths_more():
    img = dark_image(seed=2)
    t_init, weak = baselines.lime_illumination(img, LimeParams(alpha=0.01))
    _, strong = baselines.lime_illumination(img, LimeParams(alpha=10.0))
    assert np.abs(strong - t_init).mean() > np.abs(weak - t_init).mean()


def test_lime_handles_black_pixels_and_thin_images():
    img = dark_image(h=1, w=17)
    img[0, :5] = 0.0
    out = baselines.lime(img)
    assert out.shape == img.shape and np.isfinite(out).all() and (out[0, :5] == 0).all()


# ----------------------------------------------------------------------------- Zero-DCE

EXPECTED_SHAPES = {
    "dce_net.conv1.weight": (32, 3, 3, 3), "dce_net.conv1.bias": (32,),
    **{f"dce_net.conv{i}.weight": (32, 32, 3, 3) for i in (2, 3, 4)},
    **{f"dce_net.conv{i}.bias": (32,) for i in (2, 3, 4, 5, 6)},
    "dce_net.conv5.weight": (32, 64, 3, 3), "dce_net.conv6.weight": (32, 64, 3, 3),
    "dce_net.conv7.weight": (24, 64, 3, 3), "dce_net.conv7.bias": (24,),
}


def random_zerodce(seed: int = 0, scale: float = 0.1) -> ZeroDCE:
    torch.manual_seed(seed)
    model = ZeroDCE()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model.eval()


def test_zerodce_state_dict_names_and_shapes():
    """The names and shapes neuro-low-light's model_state_dict has (79,416 parameters)."""
    sd = ZeroDCE().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == EXPECTED_SHAPES
    assert sum(v.numel() for v in sd.values()) == 79416


def test_zerodce_zero_weights_is_identity():
    model = ZeroDCE()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.rand(2, 3, 17, 23)
    assert torch.equal(model.curves(x), torch.zeros(2, 24, 17, 23))
    assert torch.equal(model(x), x)


def test_zerodce_curve_follows_the_le_formula():
    """With conv7's bias at -c and its weights zero every curve map is tanh(-c): each iteration is
    x + a (x^2 - x) with a < 0, which brightens, 8 times."""
    model = ZeroDCE()
    with torch.no_grad():
        model.dce_net.conv7.weight.zero_()
        model.dce_net.conv7.bias.fill_(-0.5)
    x = torch.rand(1, 3, 8, 8) * 0.3
    a = torch.tanh(torch.tensor(-0.5))
    expected = x.clone()
    for _ in range(8):
        expected = expected + a * (expected ** 2 - expected)
    out = model(x)
    torch.testing.assert_close(out, expected)
    assert (out > x).all() and out.max() <= 1


def test_load_zerodce_neuro_format(tmp_path):
    """neuro-low-light's layout ({'model_state_dict', 'optimizer_state_dict', 'epoch', ...}) loads unchanged."""
    model = random_zerodce()
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, path)
    loaded = baselines.load_zerodce(path)
    x = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def official_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Zero-DCE as the authors' release computes it: skips first in the concatenations."""
    def conv(i, t):
        return F.conv2d(t, sd[f"e_conv{i}.weight"], sd[f"e_conv{i}.bias"], padding=1)

    x1 = torch.relu(conv(1, x))
    x2 = torch.relu(conv(2, x1))
    x3 = torch.relu(conv(3, x2))
    x4 = torch.relu(conv(4, x3))
    x5 = torch.relu(conv(5, torch.cat([x3, x4], 1)))
    x6 = torch.relu(conv(6, torch.cat([x2, x5], 1)))
    for a in torch.tanh(conv(7, torch.cat([x1, x6], 1))).split(3, dim=1):
        x = x + a * (x ** 2 - x)
    return x


def test_load_zerodce_official_layout(tmp_path):
    """The authors' `e_convN` keys (with `module.`) load and compute the authors' forward."""
    g = torch.Generator().manual_seed(1)
    official = {}
    for name, shape in EXPECTED_SHAPES.items():
        official[name.replace("dce_net.conv", "e_conv")] = torch.randn(shape, generator=g) * 0.1
    path = tmp_path / "Epoch99.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    x = torch.rand(1, 3, 10, 14, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(baselines.load_zerodce(path)(x), official_forward(official, x).clamp(0, 1))


def test_load_zerodce_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(UserError) as err:
        baselines.load_zerodce(tmp_path / "nope.pth")
    msg = str(err.value)
    assert "\n" not in msg and "nope.pth" in msg and "neuro-low-light" in msg and "--zerodce_weights" in msg


def test_load_zerodce_wrong_checkpoint(tmp_path, make_checkpoint):
    path, _ = make_checkpoint()
    with pytest.raises(UserError, match="not a Zero-DCE"):
        baselines.load_zerodce(path)


def test_find_zerodce_weights(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--zerodce_weights"):
        baselines.find_zerodce_weights(tmp_path / "missing.pth")
    given = tmp_path / "w.pth"
    given.write_bytes(b"x")
    assert baselines.find_zerodce_weights(given) == given
    monkeypatch.setattr(baselines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        baselines.find_zerodce_weights(None)
    assert "pip install --no-deps neuro-low-light" in str(err.value) and "\n" not in str(err.value)


def test_neuro_low_light_weights_brighten(lol_root):
    """The weights shipped in neuro-low-light (if installed) load and brighten a LOL image."""
    try:
        path = baselines.find_zerodce_weights(None)
    except UserError:
        pytest.skip("neuro-low-light is not installed (pip install --no-deps neuro-low-light); "
                    "its Zero-DCE weights are needed for this test")
    model = baselines.load_zerodce(path)
    low = read_image(lol_root / "eval15" / "low" / "1.png")[:128, :192]
    x = torch.from_numpy(low.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        curves, out = model.curves(x), model(x)
    assert curves.abs().max() > 0.05 and out.shape == x.shape
    assert out.mean() > x.mean() + 0.1 and out.min() >= 0 and out.max() <= 1


# ----------------------------------------------------------------------------- the CLI

def run_bench(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_script("benchmarks/baselines.py", *args, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, must_contain: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert must_contain in proc.stderr, proc.stderr


def test_cli_classic_methods(make_pairs, tmp_path):
    names = ("1", "22")
    root = make_pairs(names=names, size=(24, 40), high_fn=lambda low: np.clip(low.astype(int) + 40, 0, 255).astype(np.uint8))
    out = tmp_path / "res"
    proc = run_bench("--input_dir", root, "--result_dir", out, "--methods", "input,gamma,clahe,lime")
    assert proc.returncode == 0, proc.stderr
    for method in ("input", "gamma", "clahe", "lime"):
        assert sorted(p.name for p in (out / method).iterdir()) == ["1.png", "22.png"], method
    assert not (out / "zerodce").exists() and not (out / "input_mem").exists()
    # input/ holds the low images themselves
    assert np.array_equal(to_uint8(read_image(out / "input" / "1.png")), to_uint8(read_image(root / "low" / "1.png")))

    expected = np.mean([psnr(to_uint8(read_image(root / "low" / f"{n}.png")),
                             to_uint8(read_image(root / "high" / f"{n}.png"))) for n in names])
    report = json.loads((out / "baselines.json").read_text())
    rows = {m["method"]: m for m in report["methods"]}
    assert list(rows) == ["input", "gamma", "clahe", "lime"]
    assert rows["input"]["psnr"] == pytest.approx(expected, abs=1e-9)
    assert "memory" not in rows["input"]
    assert report["num_images"] == 2 and "baselines.py" in report["command"] and report["mem_weights"] is None

    md = (out / "baselines.md").read_text()
    assert "| method | PSNR | SSIM | GT-mean PSNR | +memory PSNR | +memory SSIM |" in md
    input_row = next(line for line in md.splitlines() if line.startswith("| input |"))
    cells = [c.strip() for c in input_row.strip("|").split("|")]
    assert cells[1] == f"{expected:.2f}" and cells[4:] == ["-", "-"]
    assert "| input |" in proc.stdout and "date:" in md and "machine:" in md


def test_cli_with_memory(make_pairs, make_checkpoint, tmp_path):
    """--mem_weights runs test.py on the method's outputs; the +memory cells are its mem means."""
    from models.memory import ExternalMemory, MemoryConfig

    root = make_pairs(names=("1",), size=(24, 40))
    weights, enhancer = make_checkpoint()
    mem = ExternalMemory(MemoryConfig(mem_size=8, key_dim=16 * 8, pooling_size=1), torch.Generator().manual_seed(0))
    mem_path = tmp_path / "memory.pth"
    save_checkpoint(mem_path, memory_payload(mem, 1, "enhancer", None, {"enhancer_config": enhancer.config.to_dict()}))
    out = tmp_path / "res"
    proc = run_bench("--input_dir", root, "--result_dir", out, "--methods", "input",
                     "--mem_weights", mem_path, "--weights", weights, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "input_mem" / "summary.json").read_text())
    row = json.loads((out / "baselines.json").read_text())["methods"][0]
    assert row["memory"]["psnr"] == summary["mean"]["mem_psnr"]
    assert row["memory"]["ssim"] == summary["mean"]["mem_ssim"]
    assert row["psnr"] == pytest.approx(summary["mean"]["ori_psnr"], abs=1e-12)
    assert (out / "input_mem" / "mem" / "1.png").is_file()
    md_row = next(line for line in (out / "baselines.md").read_text().splitlines() if line.startswith("| input |"))
    assert f"| {summary['mean']['mem_psnr']:.2f} |" in md_row


def test_cli_missing_input_dir(tmp_path):
    assert_one_line_error(run_bench("--input_dir", tmp_path / "none"), str(tmp_path / "none"))


def test_cli_unknown_method(make_pairs):
    root = make_pairs(names=("1",), size=(8, 8))
    assert_one_line_error(run_bench("--input_dir", root, "--methods", "gamma,retinex"), "retinex")


def test_cli_missing_zerodce_weights(make_pairs, tmp_path):
    root = make_pairs(names=("1",), size=(8, 8))
    assert_one_line_error(run_bench("--input_dir", root, "--methods", "zerodce", "--zerodce_weights",
                                    tmp_path / "z.pth", "--result_dir", tmp_path / "r"), "z.pth")
    assert not (tmp_path / "r").exists()  # nothing written before the weights are found
