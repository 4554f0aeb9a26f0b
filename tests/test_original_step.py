"""The original release's training step is train_enhancer.py's default, pinned from the documented
facts (README, "Training the enhancer"): LPIPS on the [0, 1] images as they are, no gradient
clipping, and the warm-up + cosine stepped once per epoch (epochs 1, 2, 3 at lr/3, 2lr/3, lr, then
a per-epoch cosine with T_max = nepoch - 3, eta_min 1e-6), also across --resume."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import yaml
from skimage.metrics import structural_similarity
from test_losses import lpips_linear_file, random_alexnet_state
from train_runs import load, make_structured_pairs, run_train

import train_enhancer
from conftest import assert_ran
from utils.errors import UserError
from utils.losses import EnhancementLoss
from utils.perceptual import ALEXNET_FILE
from utils.schedule import build_schedule, resolve_lr_schedule, schedule_plan

LR, MIN_LR = 2e-4, 1e-6


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of 2 structured 64x64 (output, target) pairs in [0, 1]."""
    g = torch.Generator().manual_seed(5)
    target = torch.rand(2, 3, 8, 8, generator=g)
    target = torch.nn.functional.interpolate(target, size=64, mode="bilinear", align_corners=False)
    out = (0.8 * target + 0.1 + 0.05 * torch.rand(2, 3, 64, 64, generator=g)).clamp(0, 1)
    return out, target


def reference_lpips(x: torch.Tensor, y: torch.Tensor, normalize: bool) -> float:
    """The lpips package's LPIPS(alex) with the same random AlexNet: normalize=False is what the
    original's training did with [0, 1] images, normalize=True the [-1, 1] rescaling."""
    lpips_pkg = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips_pkg.LPIPS(net="alex", pnet_rand=True, verbose=False)
    alex = random_alexnet_state()
    with torch.no_grad():
        for name, param in ref.net.named_parameters():
            idx, kind = name.split(".")[-2:]
            param.copy_(alex[f"features.{idx}.{kind}"])
        return float(ref.eval()(x, y, normalize=normalize).mean())


def reference_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM of the batch by scikit-image (Gaussian window, sigma 1.5, data range 1)."""
    return float(np.mean([structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                                                channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False)
                          for a, b in zip(x, y)]))


@pytest.fixture
def alexnet_path(tmp_path):
    lpips_linear_file()
    path = tmp_path / ALEXNET_FILE
    torch.save(random_alexnet_state(), path)
    return str(path)


def test_default_loss_is_the_originals_from_the_formulas(alexnet_path):
    """train_enhancer.py's default loss on a fixed batch = (1 - SSIM) + LPIPS of the unscaled
    images; --lpips_input_range -11 gives LPIPS of the [-1, 1] images instead, a different value."""
    args = train_enhancer.get_args_parser().parse_args([])
    assert (args.lpips_input_range, args.ssim_lambda, args.lpips_lambda, args.l1_lambda, args.l2_lambda) == \
        ("01", 1.0, 1.0, 0.0, 0.0)
    out, target = fixed_batch()
    ssim = reference_ssim(out, target)
    original = (1 - ssim) + reference_lpips(out, target, normalize=False)
    scaled = (1 - ssim) + reference_lpips(out, target, normalize=True)
    assert abs(original - scaled) > 1e-3  # the two conventions are told apart by this batch

    loss = EnhancementLoss(args.l1_lambda, args.l2_lambda, args.ssim_lambda, args.lpips_lambda, alexnet_path,
                           args.lpips_input_range == "-11")
    assert float(loss(out, target)[0]) == pytest.approx(original, rel=1e-4)
    corrected = EnhancementLoss(ssim=1, lpips=1, lpips_alexnet=alexnet_path, lpips_scaled=True)
    assert float(corrected(out, target)[0]) == pytest.approx(scaled, rel=1e-4)


def test_datarange_accepts_only_the_originals_strings():
    """--datarange takes "01" and "-11" as strings (the original never read it) and nothing else."""
    parser = train_enhancer.get_args_parser()
    assert parser.parse_args(["--datarange", "-11"]).datarange == "-11"
    assert parser.parse_args(["--datarange", "01"]).datarange == "01"
    with pytest.raises(SystemExit):
        parser.parse_args(["--datarange", "1.0"])


def epoch_lrs(argv: list[str], iters_per_epoch: int, epochs: int) -> list[list[float]]:
    """The lr of every iteration of the first `epochs` epochs, grouped by epoch, as
    train_enhancer.py schedules a fresh run of `argv`."""
    args = train_enhancer.get_args_parser().parse_args(argv)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr_initial)
    sched = build_schedule(opt, schedule_plan(args, None, iters_per_epoch), args.min_lr)
    out = []
    for _ in range(epochs):
        out.append([])
        for _ in range(iters_per_epoch):
            out[-1].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def test_lr_of_the_first_five_epochs_for_nepoch_800_warmup():
    """--nepoch 800 --warmup (the original command): epochs 1-5 run at lr/3, 2lr/3, lr, lr and the
    cosine's first step, constant within each epoch; later epochs follow torch's
    CosineAnnealingLR(T_max=797, eta_min=1e-6) stepped once per epoch."""
    lrs = epoch_lrs(["--nepoch", "800", "--warmup", "--lr_initial", "2e-4"], iters_per_epoch=7, epochs=20)
    assert all(len(set(epoch)) == 1 for epoch in lrs)
    per_epoch = [epoch[0] for epoch in lrs]
    first_cosine = MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 797)) / 2
    assert per_epoch[:5] == pytest.approx([LR / 3, 2 * LR / 3, LR, LR, first_cosine], rel=1e-12)
    assert per_epoch[0] == pytest.approx(6.67e-5, rel=1e-3)

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=797, eta_min=MIN_LR)
    for lr in per_epoch[3:]:
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        cosine.step()


def test_time_budget_steps_per_iteration_and_refuses_the_epoch_schedule():
    """--time_budget takes the per-iteration schedule; asking for the epoch one with it, or a
    resumed run's other schedule, is a UserError naming the flags."""
    assert resolve_lr_schedule(None, 0.0, None) == "epoch"
    assert resolve_lr_schedule(None, 5.0, None) == "iteration"
    assert resolve_lr_schedule(None, 0.0, "iteration") == "iteration"  # a resumed run keeps its own
    with pytest.raises(UserError, match="--time_budget"):
        resolve_lr_schedule("epoch", 5.0, None)
    with pytest.raises(UserError, match="--lr_schedule iteration, not epoch"):
        resolve_lr_schedule("epoch", 0.0, "iteration")
    lrs = epoch_lrs(["--nepoch", "10", "--lr_schedule", "iteration"], iters_per_epoch=4, epochs=1)[0]
    assert lrs == pytest.approx([LR * k / 12 for k in range(1, 5)])


def test_no_gradient_clipping_by_default(tmp_path, monkeypatch):
    """A default run never clips the gradient; --grad_clip 1 clips every step at norm 1."""
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        calls.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train = make_structured_pairs(tmp_path / "train", ["c1", "c2", "c3", "c4"], size=(40, 40))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for env, extra in (("plain", []), ("clipped", ["--grad_clip", "1"])):
            args = train_enhancer.get_args_parser().parse_args(
                ["--train_dir", str(train), "--save_dir", str(tmp_path / "runs"), "--env", env, "--arch", "emnet_tiny",
                 "--embed_dim", "8", "--train_workers", "0", "--lpips_lambda", "0", "--l1_lambda", "1",
                 "--device", "cpu", "--val_percent", "0", "--train_ps", "32", "--batch_size", "2",
                 "--max_iters", "2", *extra])
            train_enhancer.main(args)
            options = yaml.safe_load((tmp_path / "runs" / env / "options.yml").read_text())
            assert (options["grad_clip"], options["lpips_input_range"], options["lr_schedule"]) == \
                (1.0 if extra else 0.0, "01", "epoch")
            if not extra:
                assert calls == [], "a default run clipped the gradient"
    finally:
        torch.set_num_threads(threads)
    assert calls == [1.0, 1.0]


LR_IN_LOG = re.compile(r"iter (\d+)/\d+ loss \S+ .* lr (\S+) ")


def test_resume_mid_warmup_continues_the_same_sequence(tmp_path):
    """A run stopped in the middle of the warm-up's second epoch and resumed steps the same
    per-epoch lr sequence (and weights) as the straight run: lr/3, 2lr/3, lr, then the cosine."""
    train = make_structured_pairs(tmp_path / "train", ["w1", "w2", "w3", "w4"], size=(40, 40), seed=3)
    save = tmp_path / "runs"
    common = ("--val_percent", 0, "--train_ps", 32, "--batch_size", 2, "--log_every", 1, "--nepoch", 6,
              "--lr_initial", 1e-3, "--checkpoint", 1000)
    assert_ran(run_train(train, save, "A", *common, "--max_iters", 10))
    assert_ran(run_train(train, save, "B", *common, "--max_iters", 3))
    assert load(save / "B" / "models" / "model_latest.pth")["iteration"] == 3
    assert_ran(run_train(train, save, "B", *common, "--max_iters", 10, "--resume"))

    logged = {name: [(int(it), float(lr)) for it, lr in LR_IN_LOG.findall((save / name / "train.log").read_text())]
              for name in "AB"}
    assert logged["A"] == logged["B"] and [it for it, _ in logged["A"]] == list(range(1, 11))
    # The lr logged after iteration i is the one of iteration i + 1 (2 iterations per epoch).
    epoch_lr = [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3] + [MIN_LR + (1e-3 - MIN_LR) * (1 + math.cos(math.pi * t / 3)) / 2
                                                   for t in (1, 2)]
    expected = [epoch_lr[i // 2] for i in range(1, 11)]
    assert [lr for _, lr in logged["A"]] == pytest.approx(expected, rel=5e-3)  # the log prints 3 digits
    a, b = load(save / "A" / "models" / "model_latest.pth"), load(save / "B" / "models" / "model_latest.pth")
    assert a["scheduler"]["_last_lr"] == pytest.approx(b["scheduler"]["_last_lr"], rel=1e-12)
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6), k


def test_model_card_names_the_recipe_the_bundled_enhancers_were_trained_with():
    """pre_trained_logs/model_card.json says which recipe trained each bundled enhancer, and that
    agrees with the options.yml recorded by its run."""
    import json

    from conftest import REPO

    card = json.loads((REPO / "pre_trained_logs" / "model_card.json").read_text())["enhancer_recipe"]
    bundled = {str(p.relative_to(REPO)) for p in (REPO / "pre_trained_logs" / "enhancer").glob("*.pth")}
    assert set(card) == bundled
    for weights, recipe in card.items():
        options = yaml.safe_load((REPO / weights.replace(".pth", ".options.yml")).read_text())
        assert recipe["grad_clip"] == options["grad_clip"] and recipe["amp"] == options["amp"]
        assert (options["l1_lambda"], options["ssim_lambda"], options["lpips_lambda"]) == (1.0, 1.0, 0.0)
        assert recipe["loss"] == "(1 - SSIM) + L1"
        assert "lr_schedule" not in options and recipe["lr_schedule"] == "iteration"  # the only one then
