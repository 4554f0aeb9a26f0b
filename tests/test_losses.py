"""utils.losses: the differentiable SSIM against scikit-image, EnhancementLoss's weighting, and
the frozen LPIPS(AlexNet) (random AlexNet weights from local files here: the suite never downloads)."""
from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

import utils.losses as losses
from utils.errors import UserError
from utils.losses import EnhancementLoss, ssim_map_mean
from utils.perceptual import ALEXNET_FILE, LPIPS, build_lpips


def to_bchw(img: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(img.transpose(2, 0, 1).copy())[None].to(dtype)


def skimage_ssim(x: np.ndarray, y: np.ndarray) -> float:
    return structural_similarity(x, y, channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def smooth_image(rng, h: int, w: int) -> np.ndarray:
    """Random but spatially correlated RGB in [0, 1] (noise alone makes every SSIM ~0)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=2)
    return np.clip(0.5 + 0.35 * base + 0.1 * rng.random((h, w, 3)), 0, 1)


# ----------------------------------------------------------------------------- SSIM

@pytest.mark.parametrize("kind", ["noise", "related", "smooth"])
@pytest.mark.parametrize("size", [(32, 32), (23, 41)])
def test_ssim_matches_skimage(kind, size):
    """ssim_map_mean equals scikit-image's Gaussian-window SSIM (population covariance, mean over
    the valid positions of every channel) on float images, to 1e-4."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}{size}".encode()))
    h, w = size
    if kind == "noise":
        x, y = rng.random((h, w, 3)), rng.random((h, w, 3))
    elif kind == "related":
        x = rng.random((h, w, 3))
        y = np.clip(0.7 * x + 0.2 + 0.1 * rng.standard_normal((h, w, 3)), 0, 1)
    else:
        x = smooth_image(rng, h, w)
        y = np.clip(x ** 1.8 + 0.05 * rng.standard_normal((h, w, 3)), 0, 1)
    ref = skimage_ssim(x, y)
    got64 = float(ssim_map_mean(to_bchw(x), to_bchw(y)))
    got32 = float(ssim_map_mean(to_bchw(x, torch.float32), to_bchw(y, torch.float32)))
    assert got64 == pytest.approx(ref, abs=1e-4)
    assert got32 == pytest.approx(ref, abs=1e-4)


def test_ssim_batch_is_mean_of_images():
    """A batch's SSIM is the mean over its images (all the same size)."""
    rng = np.random.default_rng(3)
    xs = [smooth_image(rng, 24, 24) for _ in range(3)]
    ys = [np.clip(x * 0.8 + 0.1 * rng.random(x.shape), 0, 1) for x in xs]
    batch = float(ssim_map_mean(torch.cat([to_bchw(x) for x in xs]), torch.cat([to_bchw(y) for y in ys])))
    assert batch == pytest.approx(np.mean([skimage_ssim(x, y) for x, y in zip(xs, ys)]), abs=1e-4)


def test_ssim_identical_is_one_and_data_range_is_used():
    """SSIM(x, x) == 1; data_range=255 on images scaled by 255 gives the same value as 1 on [0, 1]."""
    rng = np.random.default_rng(1)
    x = to_bchw(rng.random((20, 30, 3)), torch.float32)
    y = to_bchw(rng.random((20, 30, 3)), torch.float32)
    assert float(ssim_map_mean(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(ssim_map_mean(x * 255, y * 255, data_range=255.0)) == pytest.approx(
        float(ssim_map_mean(x, y)), abs=1e-4)


def test_ssim_gradient_flows():
    """1 - SSIM back-propagates finite, non-zero gradients into the prediction."""
    rng = np.random.default_rng(2)
    x = to_bchw(rng.random((24, 24, 3)), torch.float32).requires_grad_(True)
    y = to_bchw(rng.random((24, 24, 3)), torch.float32)
    (1 - ssim_map_mean(x, y)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- LPIPS helpers

def lpips_linear_file() -> Path:
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        pytest.skip("the lpips package is not installed (its linear weights are needed)")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    if not path.is_file():
        pytest.skip(f"lpips is installed but {path} is missing")
    return path


def random_alexnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from torchvision.models import alexnet
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return alexnet(weights=None).state_dict()


@pytest.fixture
def alexnet_file(tmp_path) -> Path:
    """A random-weight torchvision AlexNet state_dict saved under the ImageNet file's name."""
    path = tmp_path / "alex" / ALEXNET_FILE
    path.parent.mkdir()
    torch.save(random_alexnet_state(), path)
    return path


@pytest.fixture
def lpips_model() -> LPIPS:
    lin = torch.load(lpips_linear_file(), map_location="cpu", weights_only=True)
    return LPIPS(random_alexnet_state(), lin)


def rand_batch(seed: int, n: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


# ----------------------------------------------------------------------------- LPIPS

def test_lpips_zero_on_identical_positive_otherwise(lpips_model):
    """LPIPS(x, x) == 0 and LPIPS(x, y) > 0, and it is symmetric."""
    x, y = rand_batch(0), rand_batch(1)
    assert float(lpips_model(x, x)) == 0.0
    d = float(lpips_model(x, y))
    assert d > 0 and np.isfinite(d)
    assert float(lpips_model(y, x)) == pytest.approx(d, rel=1e-5)


def test_lpips_is_frozen_and_stays_in_eval(lpips_model):
    """No trainable parameters, and .train() (as the training loop calls on its parents) leaves
    it and every submodule in eval mode; gradients still reach the input."""
    assert not any(p.requires_grad for p in lpips_model.parameters())
    assert sum(p.numel() for p in lpips_model.parameters()) > 0
    parent = torch.nn.ModuleDict({"lpips": lpips_model}).train()
    assert parent.training
    assert not lpips_model.training
    assert not any(m.training for m in lpips_model.modules())
    lpips_model.train()
    assert not any(m.training for m in lpips_model.modules())
    x = rand_batch(2).requires_grad_(True)
    lpips_model(x, rand_batch(3)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lpips_matches_the_lpips_package(lpips_model):
    """With the same (random) AlexNet weights and the same linear layers, our LPIPS equals the
    lpips package's LPIPS(normalize=True), averaged over the batch."""
    import warnings

    lpips_pkg = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips_pkg.LPIPS(net="alex", pnet_rand=True, verbose=False)  # random backbone, no download
    alex = random_alexnet_state()
    # Copy the AlexNet features into the package's slices (slice modules keep torchvision indices).
    with torch.no_grad():
        for name, param in ref.net.named_parameters():
            idx, kind = name.split(".")[-2:]
            param.copy_(alex[f"features.{idx}.{kind}"])
    ref.eval()
    x, y = rand_batch(4, n=3), rand_batch(5, n=3)
    with torch.no_grad():
        expected = float(ref(x, y, normalize=True).mean())
    assert float(lpips_model(x, y)) == pytest.approx(expected, rel=1e-4)


def test_build_lpips_from_a_local_file(alexnet_file):
    """build_lpips(path) loads a torchvision AlexNet state_dict and the lpips linear weights."""
    lpips_linear_file()
    model = build_lpips(str(alexnet_file), "train without it")
    assert isinstance(model, LPIPS)
    x, y = rand_batch(6), rand_batch(7)
    assert float(model(x, x)) == 0.0 and float(model(x, y)) > 0
    saved = torch.load(alexnet_file, weights_only=True)
    assert torch.equal(model.features[0].weight, saved["features.0.weight"])


# ----------------------------------------------------------------------------- EnhancementLoss

@pytest.mark.parametrize("weights", [
    dict(l1=1.0, l2=0.0, ssim=0.0, lpips=0.0),
    dict(l1=0.0, l2=2.0, ssim=0.0, lpips=0.0),
    dict(l1=0.0, l2=0.0, ssim=1.0, lpips=0.0),
    dict(l1=1.0, l2=0.0, ssim=1.0, lpips=0.0),   # the offline recipe
    dict(l1=0.5, l2=0.25, ssim=3.0, lpips=0.0),
    dict(l1=0.0, l2=0.0, ssim=1.0, lpips=1.0),   # the published recipe
    dict(l1=0.3, l2=0.7, ssim=0.0, lpips=2.0),
])
def test_enhancement_loss_weighted_sum_of_nonzero_terms(weights, alexnet_file, monkeypatch):
    """Only terms with a non-zero weight appear (and are computed: the others' functions are made
    to fail), and the total equals the weighted sum of independently computed terms."""
    if weights["lpips"]:
        lpips_linear_file()
    loss_fn = EnhancementLoss(**weights, lpips_alexnet=str(alexnet_file) if weights["lpips"] else None)
    assert (loss_fn.lpips is not None) == bool(weights["lpips"])

    def boom(*_a, **_k):
        raise AssertionError("a term with weight 0 was computed")

    if not weights["ssim"]:
        monkeypatch.setattr(losses, "ssim_map_mean", boom)
    if not weights["l1"]:
        monkeypatch.setattr(losses.F, "l1_loss", boom)
    if not weights["l2"]:
        monkeypatch.setattr(losses.F, "mse_loss", boom)
    pred, target = rand_batch(10, h=48, w=48), rand_batch(11, h=48, w=48)
    total, terms = loss_fn(pred, target)
    monkeypatch.undo()

    assert set(terms) == {k for k, v in weights.items() if v}
    independent = {"l1": float(F.l1_loss(pred, target)), "l2": float(F.mse_loss(pred, target)),
                   "ssim": 1 - float(ssim_map_mean(pred, target))}
    if weights["lpips"]:
        independent["lpips"] = float(loss_fn.lpips(pred, target))
    for k, v in terms.items():
        assert not v.requires_grad
        assert float(v) == pytest.approx(independent[k], rel=1e-5)
    assert float(total) == pytest.approx(sum(weights[k] * independent[k] for k in terms), rel=1e-5)


def test_enhancement_loss_gradient_and_half_inputs():
    """The total back-propagates into the prediction; bf16 inputs are scored in float32."""
    loss_fn = EnhancementLoss(l1=1, ssim=1, lpips=0)
    pred = rand_batch(12, h=32, w=32).requires_grad_(True)
    target = rand_batch(13, h=32, w=32)
    total, _ = loss_fn(pred, target)
    total.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    total16, _ = loss_fn(pred.detach().bfloat16(), target)
    assert total16.dtype == torch.float32


def test_all_zero_weights_is_a_user_error():
    """All weights 0 is a UserError naming the flags."""
    with pytest.raises(UserError, match="--lpips_lambda"):
        EnhancementLoss(l1=0, l2=0, ssim=0, lpips=0)


def test_lpips_weight_without_alexnet_is_a_user_error(tmp_path, monkeypatch):
    """lpips > 0 with an empty hub cache fails at construction with a UserError (not a download)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(UserError, match="AlexNet"):
        EnhancementLoss(l1=0, ssim=1, lpips=1)
