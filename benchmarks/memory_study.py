"""Does the external memory help on images it has never seen? K-fold cross-validation.

The frozen enhancer's output and features for every pair of --train_dir are computed once and
cached (`models/frozen_pass.py`; an interrupted run resumes). The pairs are split into K folds;
for each fold the memory is filled from the other folds only (the same `ExternalMemory.update`
as `train_memory.py`) and read for the held-out fold's whole images, as `test.py` reads it.
Everything a variant fits (strengths, confidence thresholds, the ridge predictor) is fitted on the
training folds only (`fold_corrections`). Every image is held out exactly once, so each variant is
scored on all pairs, none of which played a part in filling or calibrating the memory that corrected it.

Protocol: scene-grouped folds (`dataset/scene_groups.py`: pairs whose normal-light thumbnails
correlate >= --group_threshold form one scene group, and a group stays inside one fold), so a
held-out scene is new to the memory; a random K-fold, which lets other shots of a held-out scene
fill its memory, is reported beside it. Variants are chosen by the grouped figure only.

Per variant: the mean mem - ori PSNR and SSIM gain over all held-out images with a 95% bootstrap
interval (images resampled), next to bounds that no variant can be read without:
- `oracle`: the memory recalls the held-out target's own pooled colour (best possible recall),
- `constant`: it recalls the training folds' mean target colour (no recall at all),
- `predictor`: a ridge regression of log(target mean / output mean) per channel on everything
  simple an input offers (descriptor, output mean and std), with full gain; its cross-validated
  R^2 is reported too (how predictable the target is at all),
- `none`: no correction (gain 0).

With --test_dir it also reports, as an analysis and never as a result, the gain one would claim
on that set by picking the best of N memory epochs on it, as the original release did.

    python benchmarks/memory_study.py                       # LOL-v1 our485 from ../shared or datasets/
    python benchmarks/memory_study.py --train_dir DIR --folds 5 --test_dir ../shared/data/LOL-v1/eval15
Writes OUT/study.csv and OUT/study.json (with the scene groups and both fold assignments; default
OUT: log/memory_study). The enhancer pass takes
~5 s per 600x400 image on a 2-core CPU; the study itself minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.pairing import find_pairs  # noqa: E402
from dataset.scene_groups import DEFAULT_THRESHOLD, grouped_folds, scene_groups  # noqa: E402
from models.calibration import calibrate_strength  # noqa: E402
from models.frozen_pass import FrozenPass, cache_key, cached_passes, describe_passes  # noqa: E402
from models.inference import BORDER_MARGIN, MULTIPLE  # noqa: E402
from models.loading import load_enhancer  # noqa: E402
from models.memory import ExternalMemory, MemoryConfig, pooled_value  # noqa: E402
from models.options import BUNDLED_ENHANCER  # noqa: E402
from models.read_settings import ReadSettings  # noqa: E402
from utils.allocator import tune_allocator  # noqa: E402
from utils.atomic import atomic_write_text  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.image_io import tensor_to_image, to_uint8  # noqa: E402
from utils.metrics import psnr, ssim  # noqa: E402
from utils.stats import bootstrap_ci  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One memory setting. `strength`: None = the release's softmax correction, a number = a fixed
    gain strength, "auto" = calibrated on the training folds (leave-one-out reads, exact PSNR),
    "fitted" = one strength and "confidence" = a strength that grows with the read's top-1 score,
    both fitted on the training folds with reads that leave out the reader's own scene group
    (`fit_strength`). `value` "ratio" stores the correction itself, the target's pooled colour over
    the enhancer output's, per channel; the read ratio times the held-out output's pooled colour is
    the recalled colour."""

    name: str
    entries: str = "images"  # "crops": 128-px crops, one per image and epoch (the release); "images"
    value: str = "colour"  # "colour": the target's pooled colour (the release); "ratio": target / output
    query: str = "enhancer"
    top_k: int = 1
    temperature: float = 1.0
    pooling_size: int = 1
    pooling_mean: bool = False
    strength: float | str | None = None
    epochs: int = 40  # passes over the training images ("crops" entries only)
    crop: int = 128

    def read(self, strength: float | None) -> ReadSettings:
        """How this variant reads its memory once its strength is resolved to `strength`."""
        return ReadSettings(self.top_k, self.temperature, strength, self.pooling_mean, self.query)


VARIANTS = [
    Variant("published: crops, k=1, softmax", entries="crops"),
    Variant("crops, k=16, T=0.01, softmax", entries="crops", top_k=16, temperature=0.01),
    Variant("images, k=1, softmax"),
    Variant("images, k=8, T=0.01, softmax", top_k=8, temperature=0.01),
    Variant("images, levels, k=1, softmax", query="enhancer_levels"),
    Variant("images, levels, k=8, T=0.01, softmax", query="enhancer_levels", top_k=8, temperature=0.01),
    Variant("images, k=8, T=0.01, p=2 mean, softmax", top_k=8, temperature=0.01, pooling_size=2, pooling_mean=True),
    Variant("images, k=1, calibrated", strength="auto"),
    Variant("images, k=8, T=0.01, calibrated", top_k=8, temperature=0.01, strength="auto"),
    Variant("images, levels, k=8, T=0.01, calibrated", query="enhancer_levels", top_k=8, temperature=0.01,
            strength="auto"),
    Variant("crops, k=16, T=0.01, calibrated", entries="crops", top_k=16, temperature=0.01, strength="auto"),
    Variant("images, levels, k=1, ratio value, softmax", query="enhancer_levels", value="ratio"),
    Variant("images, levels, k=1, ratio value, fitted strength", query="enhancer_levels", value="ratio",
            strength="fitted"),
    Variant("images, levels, k=1, ratio value, confidence strength", query="enhancer_levels", value="ratio",
            strength="confidence"),
    Variant("images, levels, k=1, colour value, confidence strength", query="enhancer_levels",
            strength="confidence"),
    Variant("images, levels, k=4, T=0.01, ratio value, confidence strength", query="enhancer_levels",
            value="ratio", top_k=4, temperature=0.01, strength="confidence"),
]


def high_tensor(fp: FrozenPass) -> torch.Tensor:
    return torch.from_numpy(fp.high).permute(2, 0, 1)[None].float() / 255


_PER_PASS: dict[tuple[int, str], tuple[FrozenPass, object]] = {}


def per_pass(fp: FrozenPass, kind: str, compute: Callable[[FrozenPass], object]) -> object:
    """`compute(fp)`, computed once per pass object (the study reads each statistic of a pass in
    every fold and variant). Keyed by the object itself, never by name, so a pass with other
    contents (e.g. another ground truth) is computed afresh."""
    hit = _PER_PASS.get((id(fp), kind))
    if hit is None or hit[0] is not fp:
        hit = _PER_PASS[(id(fp), kind)] = (fp, compute(fp))
    return hit[1]


def pooled_high(fp: FrozenPass, p: int) -> torch.Tensor:
    """(1, 3 p p) pooled ground truth of a pass (memoised)."""
    return per_pass(fp, f"high{p}", lambda f: pooled_value(high_tensor(f), p))


def pooled_ori(fp: FrozenPass, p: int) -> torch.Tensor:
    """(1, 3 p p) pooled enhancer output of a pass (memoised)."""
    return per_pass(fp, f"ori{p}", lambda f: pooled_value(f.ori[None].float(), p))


def target_value(fp: FrozenPass, p: int, kind: str) -> torch.Tensor:
    """(1, 3 p p): the target's pooled colour, or ("ratio") that over the enhancer output's."""
    colour = pooled_high(fp, p)
    if kind == "colour":
        return colour
    return colour / pooled_ori(fp, p).clamp_min(1e-3)


def crop_samples(fp: FrozenPass, crop: int, p: int, margin: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random `crop`-px crop of a pair: its descriptor (from the latent map's window over the
    crop, i.e. the crop seen in the context of its whole image) and its target's pooled value.
    The crop is aligned to the latent grid (stride 8)."""
    h, w = fp.high.shape[:2]
    s = MULTIPLE
    y0 = int(rng.integers(0, (h - crop) // s + 1)) * s
    x0 = int(rng.integers(0, (w - crop) // s + 1)) * s
    ly, lx = (y0 + margin) // s, (x0 + margin) // s
    window = fp.latent[:, ly:ly + crop // s, lx:lx + crop // s].float().flatten(1)
    query = F.normalize(torch.cat([window.mean(1), window.std(1, unbiased=False)]), dim=0)
    patch = torch.from_numpy(fp.high[y0:y0 + crop, x0:x0 + crop]).permute(2, 0, 1)[None].float() / 255
    value = pooled_value(patch, p)[0]
    return query, value


def fill(variant: Variant, passes: list[FrozenPass], margin: int, seed: int,
         after_epoch: Callable[[int, ExternalMemory], None] | None = None) -> ExternalMemory:
    """A memory written from `passes` (sample index = position in the list) with the update rule;
    `after_epoch(epoch, memory)` is called after each pass over them."""
    p = variant.pooling_size
    if variant.entries == "images":
        queries = describe_passes(passes, variant.query)
        values = torch.cat([target_value(fp, p, variant.value) for fp in passes])
        epochs = [(queries, values, torch.arange(len(passes)))]
    elif variant.entries == "crops":
        if variant.query != "enhancer" or variant.value != "colour":
            raise ValueError("crop entries are studied with the enhancer query only")
        rng = np.random.default_rng(seed)
        epochs = []
        for _ in range(variant.epochs):
            order = rng.permutation(len(passes))
            qv = [crop_samples(passes[i], variant.crop, p, margin, rng) for i in order]
            epochs.append((torch.stack([q for q, _ in qv]), torch.stack([v for _, v in qv]),
                           torch.as_tensor(order)))
    else:
        raise ValueError(f"unknown entries {variant.entries!r}")
    config = MemoryConfig(key_dim=epochs[0][0].shape[1], pooling_size=p)
    memory = ExternalMemory(config, torch.Generator().manual_seed(seed))
    for epoch, (queries, values, index) in enumerate(epochs, 1):
        for part in range(0, len(index), 128):  # the release's batch of 128
            sl = slice(part, part + 128)
            memory.update(queries[sl], values[sl], index[sl])
        if after_epoch is not None:
            after_epoch(epoch, memory)
    return memory


def scores(fp: FrozenPass, recalled: torch.Tensor | None, variant: Variant, strength,
           with_ssim: bool) -> tuple[float, float]:
    """(PSNR, SSIM) of the corrected output (the plain output when `recalled` is None)."""
    out = fp.ori[None].float()
    if recalled is not None:
        out = variant.read(strength).correct(out, recalled[None], variant.pooling_size)
    out8 = to_uint8(tensor_to_image(out))
    return psnr(out8, fp.high), (ssim(out8, fp.high) if with_ssim else math.nan)


def fold_of(n: int, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each of n samples: a seeded permutation cut into k near-equal parts."""
    folds = np.empty(n, dtype=int)
    folds[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return folds


def read_scored(memory: ExternalMemory, queries: torch.Tensor, top_k: int, temperature: float,
                hide: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(recalled values (B, V), top-1 scores (B,)) as `ExternalMemory.read`, written slots only;
    `hide` (B, mem_size) masks more slots per query (e.g. those of the reader's own scene)."""
    scores = memory.scores(queries).masked_fill(~(memory.top_index >= 0)[None], -float("inf"))
    if hide is not None:
        scores = scores.masked_fill(hide, -float("inf"))
    best, idx = scores.topk(top_k, dim=1)
    weights = (best / temperature).softmax(dim=1) if top_k > 1 else torch.ones_like(best)
    return (weights[..., None] * memory.value[idx]).sum(dim=1), best[:, 0]


STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25)
CONFIDENCE_QUANTILES = tuple(q / 10 for q in range(10))
CONFIDENCE_WIDTHS = (1e-6, 0.02, 0.05)


def confidence_strength(score: np.ndarray, smax: float, lo: float, width: float) -> np.ndarray:
    """Strength smax * clip((score - lo) / width, 0, 1): none below `lo`, full from lo + width."""
    return smax * np.clip((score - lo) / width, 0, 1)


def gain_moments(fp: FrozenPass) -> np.ndarray:
    """(4, 3): per channel sum y^2, sum y*gt, sum gt^2 and the pixel count, for the surrogate
    PSNR of a per-channel gain g: MSE = (g^2 A - 2 g B + D) / N (no clamp, no 8-bit rounding)."""
    y = fp.ori.float().flatten(1).double()
    gt = torch.from_numpy(fp.high).permute(2, 0, 1).flatten(1).double() / 255
    return np.stack([(y * y).sum(1), (y * gt).sum(1), (gt * gt).sum(1),
                     torch.full((3,), y.shape[1], dtype=torch.float64)]).astype(np.float64)


def surrogate_psnr(moments: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(N,) PSNR of images with moments (N, 4, 3) under per-channel gains (N, 3)."""
    a, b, d, n = moments[:, 0], moments[:, 1], moments[:, 2], moments[:, 3]
    mse = (gain ** 2 * a - 2 * gain * b + d).sum(1) / n.sum(1)
    return 10 * np.log10(1 / np.maximum(mse, 1e-12))


def fit_strength(variant: Variant, memory: ExternalMemory, train: list[FrozenPass],
                 train_groups: np.ndarray) -> dict:
    """The strength of `variant` ("fitted": one s; "confidence": (smax, lo, width)) that maximises
    the mean surrogate PSNR of the training passes, each read from the memory with every slot of
    its own scene group hidden (as a new scene would be read). Sees the training passes only."""
    queries = describe_passes(train, variant.query)
    slot_group = torch.as_tensor(train_groups)[memory.top_index.clamp_min(0)]
    hide = slot_group[None] == torch.as_tensor(train_groups)[:, None]
    recalled, top1 = read_scored(memory, queries, variant.top_k, variant.temperature, hide)
    mu = torch.cat([pooled_ori(fp, 1) for fp in train]).double().numpy()
    ratio = recalled.double().numpy() if variant.value == "ratio" else recalled.double().numpy() / np.maximum(mu, 1e-6)
    moments = np.stack([per_pass(fp, "moments", gain_moments) for fp in train])
    top1 = top1.double().numpy()
    ok = np.isfinite(top1)
    lows = np.quantile(top1[ok], CONFIDENCE_QUANTILES) if variant.strength == "confidence" else [-np.inf]
    widths = CONFIDENCE_WIDTHS if variant.strength == "confidence" else [1.0]
    best = None
    for smax in STRENGTHS:
        for lo in lows:
            for width in widths:
                sv = confidence_strength(np.where(ok, top1, -np.inf), smax, lo, width)
                value = surrogate_psnr(moments, 1 + sv[:, None] * (ratio - 1)).mean()
                if best is None or value > best[0]:
                    best = (value, smax, float(lo), width)
    return {"smax": best[1], "lo": best[2], "width": best[3]}


def fold_corrections(variant: Variant, train: list[FrozenPass], held: list[FrozenPass],
                     train_groups: np.ndarray, margin: int, seed: int, bound: str | None = None
                     ) -> tuple[list[torch.Tensor], list, dict]:
    """What one fold does to its held-out passes: (recalled colour (3 p p,) per held-out pass,
    strength per held-out pass, what was fitted). Everything fitted (the memory, strengths,
    confidence thresholds, the predictor of the `predictor` bound) sees `train` only; of `held`
    only the enhancer's side (output and features) is read, never the ground truth, except by the
    `oracle` bounds, which recall it on purpose."""
    p = variant.pooling_size
    strength = 1.0 if bound in ("oracle_full", "predictor") else variant.strength
    fitted: dict = {}
    if bound in ("oracle", "oracle_full"):
        recalled = [pooled_high(fp, p)[0] for fp in held]
    elif bound == "constant":
        mean = torch.cat([pooled_high(fp, p) for fp in train]).mean(0)
        recalled = [mean] * len(held)
    elif bound == "predictor":
        model = fit_ratio_predictor(train, train_groups, seed)
        fitted = {"ridge_alpha": model["alpha"]}
        recalled = list(torch.exp(torch.from_numpy(predict_log_ratio(model, held))).float()
                        * torch.cat([pooled_ori(fp, 1) for fp in held]))
    else:
        memory = fill(variant, train, margin, seed)
        queries = describe_passes(held, variant.query)
        values, top1 = read_scored(memory, queries, variant.top_k, variant.temperature)
        if variant.value == "ratio":
            values = values * torch.cat([pooled_ori(fp, p) for fp in held])
        recalled = list(values)
        if strength == "auto":
            strength, _ = calibrate_strength(memory, describe_passes(train, variant.query),
                                             [fp.ori for fp in train], [fp.high for fp in train], variant.read(None))
            fitted = {"strength": strength}
        elif strength in ("fitted", "confidence"):
            fitted = fit_strength(variant, memory, train, train_groups)
            return recalled, list(confidence_strength(top1.double().numpy(), fitted["smax"], fitted["lo"],
                                                      fitted["width"]).astype(float)), fitted
    return recalled, [strength] * len(held), fitted


def predictor_features(passes: list[FrozenPass]) -> np.ndarray:
    """Everything simple an input offers: the `enhancer_levels` descriptor, the log of the output's
    mean colour and the output's per-channel std (N, D)."""
    desc = describe_passes(passes, "enhancer_levels").double().numpy()

    def output_stats(fp: FrozenPass) -> np.ndarray:
        y = fp.ori.float().flatten(1).double()
        return np.concatenate([torch.log(y.mean(1).clamp_min(1e-3)).numpy(), y.std(1).numpy()])

    return np.concatenate([desc, np.stack([per_pass(fp, "output_stats", output_stats) for fp in passes])], axis=1)


def log_ratio_target(passes: list[FrozenPass]) -> np.ndarray:
    """(N, 3): log of the target's mean colour over the enhancer output's, per channel."""
    gt = torch.cat([pooled_high(fp, 1) for fp in passes]).double()
    y = torch.cat([pooled_ori(fp, 1) for fp in passes]).double()
    return torch.log(gt.clamp_min(1e-3) / y.clamp_min(1e-3)).numpy()


RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> dict:
    mx, sx, my = x.mean(0), x.std(0) + 1e-8, y.mean(0)
    z = (x - mx) / sx
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - my))
    return {"mx": mx, "sx": sx, "my": my, "w": w, "alpha": alpha}


def fit_ratio_predictor(train: list[FrozenPass], train_groups: np.ndarray, seed: int) -> dict:
    """Ridge regression of the log ratio on `predictor_features`, its alpha chosen by a grouped
    3-fold split inside the training passes (nested: the held-out fold plays no part)."""
    x, y = predictor_features(train), log_ratio_target(train)
    inner = grouped_folds(train_groups, 3, seed)
    errors = []
    for alpha in RIDGE_ALPHAS:
        sse = 0.0
        for f in range(3):
            m = _ridge(x[inner != f], y[inner != f], alpha)
            sse += float(((_predict(m, x[inner == f]) - y[inner == f]) ** 2).sum())
        errors.append(sse)
    return _ridge(x, y, RIDGE_ALPHAS[int(np.argmin(errors))])


def _predict(model: dict, x: np.ndarray) -> np.ndarray:
    return ((x - model["mx"]) / model["sx"]) @ model["w"] + model["my"]


def predict_log_ratio(model: dict, passes: list[FrozenPass]) -> np.ndarray:
    return _predict(model, predictor_features(passes))


def predictability(passes: list[FrozenPass], folds: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    """Cross-validated R^2 (per channel and mean) of the ridge predictor of the log ratio, each
    fold predicted by a model fitted on the others, against each training part's own mean."""
    y = log_ratio_target(passes)
    pred, base = np.zeros_like(y), np.zeros_like(y)
    for f in range(folds.max() + 1):
        train = [fp for fp, g in zip(passes, folds) if g != f]
        held = [fp for fp, g in zip(passes, folds) if g == f]
        model = fit_ratio_predictor(train, groups[folds != f], seed)
        pred[folds == f] = predict_log_ratio(model, held)
        base[folds == f] = log_ratio_target(train).mean(0)
    r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - base) ** 2).sum(0)
    return {"r2_per_channel": r2.round(4).tolist(), "r2_mean": float(r2.mean())}


def run_variant(variant: Variant, passes: list[FrozenPass], folds: np.ndarray, groups: np.ndarray,
                margin: int, seed: int, bound: str | None, ori_scores: np.ndarray, with_ssim: bool) -> dict:
    """K-fold gains of one variant (or of a bound: 'oracle', 'oracle_full', 'constant', 'predictor')."""
    gains = np.zeros((len(passes), 2))
    fitted = []
    for f in range(folds.max() + 1):
        held = [i for i in range(len(passes)) if folds[i] == f]
        train = [i for i in range(len(passes)) if folds[i] != f]
        recalled, strengths, fit = fold_corrections(variant, [passes[i] for i in train], [passes[i] for i in held],
                                                    groups[train], margin, seed + f, bound)
        fitted.append(fit)
        for i, r, st in zip(held, recalled, strengths):
            gains[i] = np.array(scores(passes[i], r, variant, st, with_ssim)) - ori_scores[i]
    row = {"variant": variant.name if bound is None else bound_name(bound), "images": len(passes)}
    for j, metric in enumerate(("psnr", "ssim")):
        if with_ssim or metric == "psnr":
            mean, lo, hi = bootstrap_ci(gains[:, j], seed=seed)
            row.update({f"{metric}_gain": mean, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
    row["images_improved"] = int((gains[:, 0] > 0).sum())
    if any(fitted):
        row["fitted_per_fold"] = fitted
    row["settings"] = asdict(variant) if bound is None else {}
    row["per_image_psnr_gain"] = gains[:, 0].round(4).tolist()
    return row


def bound_name(bound: str) -> str:
    return {"oracle": "bound: oracle recall, softmax", "oracle_full": "bound: oracle recall, full gain",
            "constant": "bound: constant training mean, softmax",
            "predictor": "bound: ridge predictor of the ratio, full gain"}[bound]


def protocol_inflation(variant: Variant, passes: list[FrozenPass], test: list[FrozenPass], margin: int,
                       seed: int) -> dict:
    """Analysis, not a result: the test-set gain after each of the variant's memory epochs (filled
    from all training passes), and the best of them, which the original release would report."""
    queries = describe_passes(test, variant.query)
    ori = [scores(fp, None, variant, None, False)[0] for fp in test]
    gains = []

    def score_epoch(epoch: int, memory: ExternalMemory) -> None:
        recalled = variant.read(None).recall(memory, queries)  # the strength only corrects
        gains.append(float(np.mean([scores(fp, r, variant, variant.strength, False)[0] - o
                                    for fp, r, o in zip(test, recalled, ori)])))

    fill(variant, passes, margin, seed, score_epoch)
    return {"variant": variant.name, "epochs": variant.epochs, "test_gain_per_epoch": gains,
            "best_of_epochs": max(gains), "best_epoch": int(np.argmax(gains)) + 1,
            "last_epoch": gains[-1], "mean_over_epochs": float(np.mean(gains))}


def default_train_dir() -> str:
    for root in (REPO.parent / "shared" / "data" / "LOL-v1", REPO / "datasets" / "LOL-v1"):
        if (root / "our485").is_dir():
            return str(root / "our485")
    return "./datasets/LOL-v1/our485"


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'variant':<62} {'grouped PSNR gain [95% CI]':>26} {'SSIM gain [95% CI]':>30} {'improved':>9} "
             f"{'random PSNR gain [95% CI]':>26}"]
    for r in rows:
        ps = f"{r['psnr_gain']:+.3f} [{r['psnr_ci_low']:+.3f}, {r['psnr_ci_high']:+.3f}]"
        ss = (f"{r['ssim_gain']:+.4f} [{r['ssim_ci_low']:+.4f}, {r['ssim_ci_high']:+.4f}]"
              if "ssim_gain" in r else "-")
        rp = (f"{r['random_psnr_gain']:+.3f} [{r['random_psnr_ci_low']:+.3f}, {r['random_psnr_ci_high']:+.3f}]"
              if "random_psnr_gain" in r else "-")
        lines.append(f"{r['variant']:<62} {ps:>26} {ss:>30} {r['images_improved']:>4}/{r['images']} {rp:>26}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_dir", default=default_train_dir(), help="LOL-style folder of training pairs")
    p.add_argument("--weights", default=str(REPO / BUNDLED_ENHANCER), help="the frozen enhancer")
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold cross-validation")
    p.add_argument("--group_threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="pairs whose normal-light thumbnails correlate at least this much show one scene "
                        "(dataset/scene_groups.py); a scene group stays inside one fold")
    p.add_argument("--border_margin", type=int, default=BORDER_MARGIN, help="as test.py")
    p.add_argument("--variants", nargs="*", default=None, help="names (or substrings) of variants to run")
    p.add_argument("--no_ssim", action="store_true", help="PSNR only (SSIM is most of the study's time)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs (quick trials)")
    p.add_argument("--test_dir", default=None,
                   help="also the best-of-epochs analysis on this set (e.g. eval15); never used to choose")
    p.add_argument("--cache_dir", default="./log/cache/frozen", help="cached enhancer passes")
    p.add_argument("--out", default="./log/memory_study", help="study.csv and study.json go here")
    p.add_argument("--cache_only", action="store_true", help="only compute the enhancer passes")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    enhancer, _ = load_enhancer(args.weights, None, None)
    enhancer.to(device).eval()
    cache = Path(args.cache_dir) / cache_key(args.weights, args.border_margin)
    pairs = find_pairs(args.train_dir)[: args.limit]
    passes = cached_passes(enhancer, pairs, device, cache, args.border_margin)
    test = (cached_passes(enhancer, find_pairs(args.test_dir), device, cache / "test", args.border_margin,
                          desc="test-set pass") if args.test_dir else None)
    if args.cache_only:
        print(f"{len(passes)} enhancer passes cached in {cache}")
        return
    with_ssim = not args.no_ssim
    ori_scores = np.array([scores(fp, None, VARIANTS[0], None, with_ssim) for fp in
                           tqdm(passes, desc="ori scores", leave=False)])
    groups = scene_groups([fp.high for fp in passes], args.group_threshold)
    protocols = {"grouped": grouped_folds(groups, args.folds, args.seed),
                 "random": fold_of(len(passes), args.folds, args.seed)}
    chosen = [v for v in VARIANTS if not args.variants or any(s in v.name for s in args.variants)]
    jobs = [(VARIANTS[2], b) for b in ("oracle", "oracle_full", "constant", "predictor")] + [(v, None) for v in chosen]
    rows = []
    for v, b in tqdm(jobs, desc="variants"):
        row = run_variant(v, passes, protocols["grouped"], groups, args.border_margin, args.seed, b, ori_scores,
                          with_ssim)
        rnd = run_variant(v, passes, protocols["random"], groups, args.border_margin, args.seed, b, ori_scores,
                          False)
        row.update({f"random_{k}": rnd[k] for k in ("psnr_gain", "psnr_ci_low", "psnr_ci_high", "images_improved")})
        rows.append(row)
    studied = [r for r in rows if not r["variant"].startswith("bound")]
    report = {"train_dir": str(args.train_dir), "weights": str(args.weights), "pairs": len(passes),
              "folds": args.folds, "seed": args.seed, "border_margin": args.border_margin,
              "ori_psnr_mean": float(ori_scores[:, 0].mean()), "bootstrap": "10000 resamples of images, seed 0",
              "protocol": "grouped (the figures); random K-fold beside it (random_*)",
              "group_threshold": args.group_threshold, "scene_groups": int(groups.max() + 1),
              "names": [fp.name for fp in passes], "groups_of_names": groups.tolist(),
              "folds_of_names": protocols["grouped"].tolist(), "random_folds_of_names": protocols["random"].tolist(),
              "predictability": {p: predictability(passes, f, groups, args.seed) for p, f in protocols.items()},
              "chosen_by_grouped_psnr_gain": max(studied, key=lambda r: r["psnr_gain"])["variant"] if studied else None,
              "rows": rows}
    if test is not None:
        report["protocol_inflation"] = protocol_inflation(VARIANTS[0], passes, test, args.border_margin, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(report, indent=2) + "\n")
    keys = ["variant", "images", "psnr_gain", "psnr_ci_low", "psnr_ci_high", "ssim_gain", "ssim_ci_low",
            "ssim_ci_high", "images_improved", "random_psnr_gain", "random_psnr_ci_low", "random_psnr_ci_high",
            "random_images_improved"]
    atomic_write_text(out / "study.csv", "\n".join([",".join(keys)] + [
        ",".join(f'"{r[k]}"' if k == "variant" else str(r.get(k, "")) for k in keys) for r in rows]) + "\n")
    print(f"{len(passes)} pairs of {args.train_dir} in {report['scene_groups']} scene groups (threshold "
          f"{args.group_threshold}), {args.folds}-fold; enhancer ori PSNR {report['ori_psnr_mean']:.3f}; gains "
          "mem - ori, 95% bootstrap intervals; scene-grouped folds (the figures), random folds beside them")
    print(format_rows(rows))
    for name, pr in report["predictability"].items():
        print(f"{name} folds: cross-validated R^2 of the ridge predictor of log(GT mean / output mean) per "
              f"channel {pr['r2_per_channel']} (mean {pr['r2_mean']:.3f})")
    print(f"chosen by the grouped PSNR gain: {report['chosen_by_grouped_psnr_gain']}")
    if test is not None:
        inf = report["protocol_inflation"]
        print(f"analysis (not a result): {inf['variant']} on {args.test_dir}: best of {inf['epochs']} epochs "
              f"{inf['best_of_epochs']:+.3f} dB (epoch {inf['best_epoch']}), last epoch {inf['last_epoch']:+.3f}, "
              f"mean over epochs {inf['mean_over_epochs']:+.3f}")
    print(f"written: {out / 'study.csv'}, {out / 'study.json'}")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))
