"""Baseline enhancers that put EMNet's scores in context: gamma correction, CLAHE, LIME and Zero-DCE.

Every function takes and returns a float32 RGB image (H, W, 3) in [0, 1], the convention of
`utils.image_io`. The parameters are fixed, published or library defaults, never tuned on a test set:

- gamma: out = in ** (1 / 2.2), the usual display-gamma exponent.
- CLAHE: OpenCV CLAHE on the L channel of 8-bit CIELAB, clipLimit 2.0 and an 8x8 tile grid (the
  values of OpenCV's CLAHE tutorial; the API's own default clipLimit of 40 barely limits contrast).
- LIME (Guo, Li, Ling, "LIME: Low-Light Image Enhancement via Illumination Map Estimation", TIP 2017):
  the paper's sped-up solver with weighting strategy III, alpha 0.15, sigma 2, illumination gamma 0.8,
  eps 1e-3; no BM3D denoising (the paper's optional post-processing).
- Zero-DCE (Guo et al., "Zero-Reference Deep Curve Estimation for Low-Light Image Enhancement",
  CVPR 2020): the DCE-Net curve estimator and 8 iterations of the LE curve. It needs trained weights
  (`find_zerodce_weights`): by default those bundled in the MIT-licensed PyPI package
  `neuro-low-light` 0.1.0, a third party's Zero-DCE trained on LOL (its epoch 16; which LOL split it
  saw is not documented), not the paper authors' weights. The authors' `Epoch99.pth` loads too.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import spsolve
from torch import nn

from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError
from utils.image_io import to_uint8

GAMMA_EXPONENT = 1 / 2.2
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILE_GRID = (8, 8)


# ----------------------------------------------------------------------------- global curves

def gamma_correction(img: np.ndarray, exponent: float = GAMMA_EXPONENT) -> np.ndarray:
    """img ** exponent; exponents below 1 brighten."""
    return np.power(np.clip(img, 0.0, 1.0), exponent).astype(np.float32)


def clahe(img: np.ndarray, clip_limit: float = CLAHE_CLIP_LIMIT,
          tile_grid: tuple[int, int] = CLAHE_TILE_GRID) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness (L of 8-bit CIELAB);
    the chroma channels are kept."""
    lab = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tile_grid).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- LIME

@dataclass(frozen=True)
class LimeParams:
    """LIME's parameters: `alpha` weighs smoothness against fidelity to the initial map, `sigma`
    is the Gaussian of weighting strategy III, `gamma` is applied to the refined illumination and
    `eps` keeps the weights and the division finite."""

    alpha: float = 0.15
    sigma: float = 2.0
    gamma: float = 0.8
    eps: float = 1e-3


def _forward_differences(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical forward differences of (H, W) `t`; zero on the last column/row."""
    dh = np.zeros_like(t)
    dv = np.zeros_like(t)
    dh[:, :-1] = t[:, 1:] - t[:, :-1]
    dv[:-1, :] = t[1:, :] - t[:-1, :]
    return dh, dv


def lime_weights(t_init: np.ndarray, sigma: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel weights (horizontal, vertical) of the sped-up objective
    sum_d W_d(x) (grad_d T(x))^2 / (|grad_d T_init(x)| + eps), folded into one factor.

    Strategy III: W_d = 1 / (|G_sigma * grad_d T_init| + eps), G_sigma a normalised Gaussian.
    """
    weights = []
    for grad in _forward_differences(t_init):
        smoothed = cv2.GaussianBlur(grad, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        weights.append(1.0 / ((np.abs(smoothed) + eps) * (np.abs(grad) + eps)))
    return weights[0], weights[1]


def _difference_operator(h: int, w: int, step: int) -> sp.csr_matrix:
    """Sparse forward difference on the row-major flattened (h, w) grid: x[p + step] - x[p]
    (`step` 1: horizontal, `w`: vertical). Rows past the border are wrong but get zero weight."""
    n = h * w
    return (sp.eye(n, k=step, format="csr") - sp.eye(n, format="csr")).tocsr()


def refine_illumination(t_init: np.ndarray, alpha: float, sigma: float, eps: float) -> np.ndarray:
    """LIME's refined illumination T: the solution of (I + alpha sum_d D_d^T diag(w_d) D_d) t = t_init.

    The matrix is symmetric, diagonally dominant with unit row sums, so T is a weighted average
    of T_init: it stays within [min T_init, max T_init] and a constant map is left unchanged.
    """
    h, w = t_init.shape
    t64 = t_init.astype(np.float64)
    wh, wv = lime_weights(t64, sigma, eps)
    wh[:, -1] = 0.0  # no right neighbour
    wv[-1, :] = 0.0  # no lower neighbour
    dh, dv = _difference_operator(h, w, 1), _difference_operator(h, w, w)
    smooth = dh.T @ sp.diags(wh.ravel()) @ dh + dv.T @ sp.diags(wv.ravel()) @ dv
    a = (sp.eye(h * w) + alpha * smooth).tocsc()
    # The matrix is symmetric: minimum-degree ordering on A^T + A is ~2.5x faster than COLAMD here.
    t = spsolve(a, t64.ravel(), permc_spec="MMD_AT_PLUS_A")
    return np.asarray(t).reshape(h, w)


def lime_illumination(img: np.ndarray, params: LimeParams = LimeParams()) -> tuple[np.ndarray, np.ndarray]:
    """(initial, refined) illumination maps (H, W): the initial one is the max over R, G, B."""
    t_init = img.max(axis=2)
    return t_init, refine_illumination(t_init, params.alpha, params.sigma, params.eps)


def lime(img: np.ndarray, params: LimeParams = LimeParams()) -> np.ndarray:
    """LIME enhancement: img / T^gamma with T the refined illumination, clamped to [0, 1]."""
    _, t = lime_illumination(img, params)
    t_gamma = np.maximum(t, 0.0) ** params.gamma
    out = img / np.maximum(t_gamma, params.eps)[:, :, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- Zero-DCE

ZERODCE_PACKAGE = "neuro_low_light"
ZERODCE_PACKAGE_WEIGHTS = ("weights", "best_model.pth")
ZERODCE_HOW_TO_GET = ("`pip install --no-deps neuro-low-light` (its weights/best_model.pth is used) "
                      "or pass --zerodce_weights PATH")


class DCENet(nn.Module):
    """Zero-DCE's curve estimator: seven 3x3 convs of `width` channels with ReLU, the last three
    fed by symmetric skip concatenations, and a tanh output of 3 * `iterations` curve maps in [-1, 1].

    The concatenations put the deeper features first ([x4, x3], [x5, x2], [x6, x1]), the order
    the neuro-low-light weights were trained with; the authors' release puts the skip first
    (`zerodce_state_dict` swaps the input halves of their conv5-7 weights).
    """

    def __init__(self, iterations: int = 8, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.conv4 = nn.Conv2d(width, width, 3, padding=1)
        self.conv5 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.conv6 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.conv7 = nn.Conv2d(2 * width, 3 * iterations, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.conv1(x))
        x2 = torch.relu(self.conv2(x1))
        x3 = torch.relu(self.conv3(x2))
        x4 = torch.relu(self.conv4(x3))
        x5 = torch.relu(self.conv5(torch.cat([x4, x3], dim=1)))
        x6 = torch.relu(self.conv6(torch.cat([x5, x2], dim=1)))
        return torch.tanh(self.conv7(torch.cat([x6, x1], dim=1)))  # (B, 3 * iterations, H, W)


class ZeroDCE(nn.Module):
    """Zero-DCE: per-pixel curve maps a_1..a_n from `dce_net`, applied in turn as the LE curve
    x <- x + a * (x^2 - x), which maps [0, 1] into [0, 1] for a in [-1, 1] (a < 0 brightens)."""

    def __init__(self, iterations: int = 8):
        super().__init__()
        self.iterations = iterations
        self.dce_net = DCENet(iterations)

    def curves(self, x: torch.Tensor) -> torch.Tensor:
        """The curve maps (B, 3 * iterations, H, W) of a batch (B, 3, H, W) in [0, 1]."""
        return self.dce_net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a in self.curves(x).chunk(self.iterations, dim=1):
            x = x + a * (x * x - x)
        return x.clamp(0, 1)


def find_zerodce_weights(path: str | Path | None = None) -> Path:
    """`path` if given, else the weights inside the installed `neuro-low-light` package (found
    without importing it); a UserError saying how to get them otherwise."""
    if path:
        found = Path(path)
        if not found.is_file():
            raise UserError(f"--zerodce_weights {found} does not exist; pass a Zero-DCE checkpoint or "
                            "install the default one: pip install --no-deps neuro-low-light")
        return found
    spec = importlib.util.find_spec(ZERODCE_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder).joinpath(*ZERODCE_PACKAGE_WEIGHTS)
        if candidate.is_file():
            return candidate
    raise UserError(f"Zero-DCE needs trained weights and none were found: {ZERODCE_HOW_TO_GET}")


_OFFICIAL_KEY = re.compile(r"e_conv(\d)\.(weight|bias)")


def zerodce_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The `ZeroDCE` state_dict of a checkpoint: neuro-low-light's {'model_state_dict': ...}
    (`dce_net.convN.*`, loaded unchanged), a bare or {'state_dict': ...} dict, or the authors'
    release (`e_convN.*`: renamed, conv5-7 input halves swapped to our concatenation order).
    DataParallel's `module.` prefix is dropped."""
    sd = ckpt.get("model_state_dict", ckpt.get("state_dict", ckpt))
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        official = _OFFICIAL_KEY.fullmatch(key)
        if official:
            index, kind = int(official.group(1)), official.group(2)
            key = f"dce_net.conv{index}.{kind}"
            if index >= 5 and kind == "weight":  # authors: cat([skip, deep]); ours: cat([deep, skip])
                half = value.shape[1] // 2
                value = torch.cat([value[:, half:], value[:, :half]], dim=1)
        elif key.startswith("conv"):
            key = f"dce_net.{key}"
        out[key] = value
    return out


def load_zerodce(path: str | Path, iterations: int = 8) -> ZeroDCE:
    """A `ZeroDCE` in eval mode with the weights of `path`; a missing, unreadable or mismatched
    file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Zero-DCE weights {path} do not exist: {ZERODCE_HOW_TO_GET}")
    sd = zerodce_state_dict(load_checkpoint_file(path))
    model = ZeroDCE(iterations)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise UserError(f"{path} is not a Zero-DCE ({iterations} iterations) checkpoint: {len(missing)} "
                        f"missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys "
                        f"(expected {', '.join(list(expected)[:2])}, ...)")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()
