"""Train the EMNet enhancer (stage 1 of EMNet).

Outputs under SAVE_DIR/ENV/: models/{model_latest,model_best,model_epoch_N}.pth, options.yml,
train.log, tensorboard/ and (with --img_vision) results/. Defaults are the original release's
training step (LPIPS on the [0, 1] images, no gradient clipping, the lr stepped per epoch); our
deviations are flags (--lpips_input_range -11, --grad_clip, --lr_schedule iteration; README,
"Training the enhancer"). `model_best.pth` is chosen on a validation split held out of the
training pairs (or --val_dir), never on a test set. Resume with
--resume: the run's flags not given again come from its checkpoint (RESUMED_FLAGS).

On a GPU the training crops are drawn on the device (--data_on_device) and the loop reads the
loss back only at log steps. --time_budget MINUTES replaces the epoch count: the run times its
first steps and fixes its length so that the warm-up and the cosine end within the budget;
--stop_after_minutes splits a budget over several calls (--resume continues the same schedule).

Several GPUs: torchrun --nproc_per_node N train_enhancer.py ... (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from dataset.batches import Batch, BatchSource, DeviceBatches, LoaderBatches
from dataset.device_crops import DeviceCrops
from dataset.paired_folder import PairedCrops, read_pair
from dataset.pairing import is_test_set, training_split
from models.enhancer import EMNetEnhancer, EnhancerConfig, make_config
from models.evaluate import evaluate_pairs
from models.fast import FastForward, budget
from models.inference import enhance
from models.loading import check_state_dict, describe_config, enhancer_payload, load_enhancer
from options import (
    HelpFormatter,
    add_device_arg,
    add_enhancer_args,
    add_max_memory_arg,
    add_split_arg,
    set_memory_budget,
)
from utils.allocator import tune_allocator
from utils.checkpoint import cpu_copy, load_checkpoint_file
from utils.device import resolve_device
from utils.distributed import DistInfo, barrier, cleanup, init_distributed
from utils.errors import UserError, run_cli, writable_dir
from utils.image_io import image_to_tensor
from utils.losses import EnhancementLoss
from utils.report import mean_scores
from utils.resume import parse_with_given, resume_flags
from utils.run_files import Checkpoint, RunFiles
from utils.run_log import RunLog
from utils.schedule import SchedulePlan, build_schedule, fix_budget, last_iteration, schedule_plan
from utils.seed import capture_rng_state, restore_rng_state, seed_everything
from utils.signals import StopSignals
from utils.training import BUDGET_TIMED_STEPS, DeviceGuard, HostSyncedGuard, StepGuard, StepTimer, time_is_up


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the EMNet enhancer (defaults: published recipe)",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--env", default="enhancer_lolv1", help="run name; outputs go to SAVE_DIR/ENV")
    g.add_argument("--save_dir", default="./log", help="root folder of all runs")
    add_enhancer_args(g)
    add_data_args(p.add_argument_group("data"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_loss_args(p.add_argument_group("loss"))
    add_checkpoint_args(p.add_argument_group("validation and checkpoints"))
    add_runtime_args(p.add_argument_group("runtime"))
    return p


def add_data_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--train_dir", default="./datasets/LOL-v1/our485", help="training pairs (low/, high/)")
    g.add_argument("--val_dir", default=None,
                   help="validation pairs; None: a split held out of --train_dir (--val_percent)")
    add_split_arg(g)
    g.add_argument("--train_ps", type=int, default=128, help="training crop size")
    g.add_argument("--batch_size", type=int, default=4, help="global batch size (all processes)")
    g.add_argument("--train_workers", type=int, default=2,
                   help="DataLoader worker processes; 0 makes --resume bit-exact on the CPU")
    g.add_argument("--data_on_device", choices=["auto", "on", "off"], default="auto",
                   help="keep the training pairs on the training device as uint8 and draw the crops "
                        "there (no DataLoader); auto = on for CUDA, off otherwise")


def add_optimisation_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--nepoch", type=int, default=800, help="epochs (one random crop per pair each)")
    g.add_argument("--time_budget", type=float, default=0.0,
                   help="minutes for the whole run, all --resume calls together, instead of --nepoch: "
                        "the run times its first steps, then fixes its length so that the warm-up and "
                        "the cosine end within the budget (less validation and checkpoint time), stepped "
                        "per iteration (--lr_schedule iteration); 0 = train --nepoch epochs")
    g.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw", help="optimizer")
    g.add_argument("--lr_initial", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    g.add_argument("--weight_decay", type=float, default=0.0, help="the optimizer's weight decay")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="linear warm-up before the cosine decay")
    g.add_argument("--warmup_epochs", type=int, default=3, help="length of the warm-up in epochs")
    g.add_argument("--lr_schedule", choices=["epoch", "iteration"], default=None,
                   help="epoch: the lr moves once per epoch as in the original (epochs 1-3 at lr/3, 2lr/3, "
                        "lr, then a per-epoch cosine, T_max = nepoch - warmup_epochs); iteration: the same "
                        "curve per iteration (our deviation), which --time_budget needs; "
                        "None: epoch, iteration with --time_budget, the resumed run's with --resume")
    g.add_argument("--grad_clip", type=float, default=0.0,
                   help="max gradient norm; 0 = no clipping, as the original (our budgeted GPU recipe: 1.0)")
    g.add_argument("--max_iters", type=int, default=0,
                   help="stop after this many iterations in total (smoke runs, budgets); 0 = no limit")


def add_loss_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--l1_lambda", type=float, default=0.0, help="weight of the L1 loss")
    g.add_argument("--l2_lambda", type=float, default=0.0, help="weight of the squared error")
    g.add_argument("--ssim_lambda", type=float, default=1.0, help="weight of 1 - SSIM")
    g.add_argument("--lpips_lambda", type=float, default=1.0,
                   help="weight of LPIPS(AlexNet); needs local AlexNet weights (see README)")
    g.add_argument("--lpips_alexnet", default=None,
                   help="torchvision alexnet-owt-7be5be79.pth; None: the torch hub cache")
    g.add_argument("--lpips_input_range", choices=["01", "-11"], default="01",
                   help="what LPIPS receives: 01 = the [0, 1] images as they are, as the original's training "
                        "(LPIPS's input normalisation expects [-1, 1]); -11 = rescaled to [-1, 1] as LPIPS "
                        "was made for (our correction; test.py --lpips always scores this way)")
    g.add_argument("--datarange", choices=["01", "-11"], default="01",
                   help="the original's flag, which it parsed and never used; accepted with its values and "
                        "ignored here: images are always in [0, 1] (SSIM data range 1)")


def add_checkpoint_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--val_time", type=int, default=1, help="validate every N epochs")
    g.add_argument("--checkpoint", type=int, default=50, help="keep model_epoch_N.pth every N epochs")
    add_max_memory_arg(g)
    g.add_argument("--img_vision", action="store_true", help="save validation outputs in results/")
    g.add_argument("--torch_vision", action="store_true", help="validation images in tensorboard")
    g.add_argument("--log_every", type=int, default=20, help="iterations between loss log lines")
    g.add_argument("--resume", action="store_true", help="continue from models/model_latest.pth")
    g.add_argument("--stop_after_minutes", type=float, default=0.0,
                   help="end this call after this many minutes of wall time, saving model_latest.pth "
                        "(then validating and saving take their time); --resume continues; 0 = no limit")
    g.add_argument("--pretrain_weights", default=None, help="initial weights (fine-tuning)")


def add_runtime_args(g: argparse._ArgumentGroup) -> None:
    add_device_arg(g)
    g.add_argument("--gpu", default=None, help="CUDA devices to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, crops, shuffling)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision for the forward pass (fp16: CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode with --compile; reduce-overhead replays CUDA graphs (static "
                        "shapes, which --data_on_device gives)")


# What a run is: on --resume these come from the checkpoint unless given again (`resume_flags`).
RESUMED_FLAGS = ("arch", "embed_dim", "train_dir", "val_dir", "val_percent", "train_ps", "batch_size", "nepoch",
                 "max_iters", "optimizer", "lr_initial", "min_lr", "weight_decay", "warmup", "warmup_epochs",
                 "grad_clip", "l1_lambda", "l2_lambda", "ssim_lambda", "lpips_lambda", "lpips_alexnet",
                 "lpips_input_range", "lr_schedule", "datarange", "seed")


def check_args(args: argparse.Namespace, info: DistInfo) -> None:
    if args.batch_size % info.world_size:
        raise UserError(f"--batch_size {args.batch_size} does not split over {info.world_size} "
                        "processes; use a multiple of the process count")
    for flag in ("nepoch", "batch_size", "train_ps", "val_time", "checkpoint", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("time_budget", "stop_after_minutes"):
        if not getattr(args, flag) >= 0:
            raise UserError(f"--{flag} must be 0 (off) or a number of minutes, got {getattr(args, flag)}")
    if args.compile_mode != "default" and not args.compile:
        raise UserError(f"--compile_mode {args.compile_mode} needs --compile")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "none":
        return None
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp none")
    return torch.bfloat16 if args.amp == "bf16" else torch.float16


def payload(model: EMNetEnhancer, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """What every checkpoint of this run holds (`enhancer_payload`): the weights, where training
    stands and the flags."""
    return enhancer_payload(model, args.arch, progress.epoch, progress.iteration, progress.best["psnr"],
                            progress.best["epoch"], vars(args))


def epoch_overhead_seconds(model: EMNetEnhancer, optimizer: torch.optim.Optimizer, val_pairs,
                           device: torch.device, val_time: int) -> float:
    """Seconds of work between two epochs: the CPU copy of the training state (the write itself
    runs in the background) and, every --val_time epochs, a validation (one pass timed, unscored)."""
    start = time.perf_counter()
    cpu_copy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    overhead = time.perf_counter() - start
    if val_pairs:
        start = time.perf_counter()
        model.eval()
        evaluate_pairs(model, val_pairs, device, progress=False)
        model.train()
        overhead += (time.perf_counter() - start) / val_time
    return overhead


def validate(model: EMNetEnhancer, val_pairs, device, args, env_dir: Path, epoch: int,
             log: RunLog, iteration: int) -> dict[str, float]:
    out_dir = None
    if args.img_vision:
        out_dir = writable_dir(env_dir / "results" / f"epoch_{epoch:04d}", "--save_dir")
    start = time.perf_counter()
    model.eval()
    rows = evaluate_pairs(model, val_pairs, device, ori_dir=out_dir, progress=False)
    model.train()
    means = {k[len("ori_"):]: v for k, v in mean_scores(rows, ["ori_psnr", "ori_ssim"]).items()}
    log.line(f"epoch {epoch} iter {iteration}: val PSNR {means['psnr']:.3f} SSIM {means['ssim']:.4f} "
             f"on {len(rows)} pairs ({time.perf_counter() - start:.1f} s)")
    log.scalars(iteration, {"val/psnr": means["psnr"], "val/ssim": means["ssim"]})
    if args.torch_vision and log.tb is not None:
        low, high = read_pair(val_pairs[0])
        x = image_to_tensor(low).to(device)
        strip = torch.cat([x, enhance(model, x), image_to_tensor(high).to(device)], dim=3)
        log.tb.add_image("val/low_out_gt", strip[0].cpu(), iteration)
    return means


@dataclass
class Run:
    """What one call of the script works with, fixed before the first step."""

    args: argparse.Namespace
    device: torch.device
    info: DistInfo
    files: RunFiles  # SAVE_DIR/ENV: options.yml, train.log, the checkpoints
    ckpt: dict[str, Any] | None  # model_latest.pth with --resume
    call_start: float  # --stop_after_minutes and --time_budget count from here
    amp_dtype: torch.dtype | None  # the forward's autocast (--amp)
    on_device: bool  # training crops drawn on the device (--data_on_device)

    def seconds_spent(self, before: float) -> float:
        """Seconds of the whole run: `before` (earlier calls of a budgeted run) and this call's."""
        return before + time.monotonic() - self.call_start


@dataclass
class Progress:
    """Where the run stands, saved in every checkpoint and restored by --resume: `epoch` counts the
    epochs completed, `iteration` the steps taken."""

    epoch: int = 0
    iteration: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"psnr": -math.inf, "epoch": -1})


def epoch_number(step: int, per_epoch: int) -> int:
    """The epoch that step `step` (counted from 1) falls in, counted from 1: the one number an
    epoch has in the progress bar, the log, results/ and model_epoch_N.pth (whose N equals the
    epochs completed, stored as `epoch`). Before the first step: epoch 1."""
    return max(1, -(-step // per_epoch))


def open_run(args: argparse.Namespace, given: set[str] | None, call_start: float) -> tuple[Run, str | None]:
    """The device, the processes, the output folders and (--resume) the checkpoint, whose flags
    replace those not given again (returns the line naming flags given with other values)."""
    if args.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    device = resolve_device(args.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    check_args(args, info)
    set_memory_budget(args.max_memory)
    amp_dtype = autocast_dtype(args, device)
    on_device = args.data_on_device == "on" or (args.data_on_device == "auto" and device.type == "cuda")
    run = Run(args, device, info, RunFiles(args.save_dir, args.env, "model", info.is_main), None, call_start,
              amp_dtype, on_device)
    if not args.resume:
        return run, None
    run.files.require_latest()
    run.ckpt = load_checkpoint_file(run.files.latest)
    return run, resume_flags(args, given, run.ckpt.get("options", {}), RESUMED_FLAGS)


def batch_source(args: argparse.Namespace, train_pairs: list, run: Run) -> BatchSource:
    """The training crops: drawn on the device (--data_on_device) or by a DataLoader."""
    info, on_device = run.info, run.on_device
    if on_device:
        crops = DeviceCrops.from_pairs(train_pairs, args.train_ps, run.device, args.seed, (info.rank, info.world_size))
    else:
        dataset = PairedCrops(train_pairs, args.train_ps)
    if len(train_pairs) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_pairs)} training "
                        f"pairs of {args.train_dir}; lower it or add pairs")
    if on_device:
        return DeviceBatches(crops, args.batch_size)
    return LoaderBatches(dataset, args.batch_size, args.train_workers, args.seed, info,
                         pin_memory=run.device.type == "cuda")


def build_model(args: argparse.Namespace, device: torch.device) -> EMNetEnhancer:
    """The enhancer to train: fresh (seeded), or --pretrain_weights for a new run."""
    model = EMNetEnhancer(make_config(args.arch, args.embed_dim))
    if args.pretrain_weights and not args.resume:
        init, _ = load_enhancer(args.pretrain_weights, args.arch, args.embed_dim)
        model.load_state_dict(init.state_dict())
    return model.to(device)


def build_optimizer(args: argparse.Namespace, model: EMNetEnhancer, fused: bool) -> torch.optim.Optimizer:
    """Adam(W). The fused step can skip an update on the device (`DeviceGuard`); the DataLoader
    path keeps the default implementation, so its results and bit-exact resumes stay as they were."""
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(model.parameters(), lr=args.lr_initial, betas=(0.9, 0.999),
                   weight_decay=args.weight_decay, **({"fused": True} if fused else {}))


def resume(run: Run, model: EMNetEnhancer, optimizer: torch.optim.Optimizer, scheduler, scaler,
           batches: BatchSource) -> Progress:
    """Load model_latest.pth into the fresh run's objects (nothing without --resume)."""
    ckpt, args = run.ckpt, run.args
    if ckpt is None:
        return Progress()
    if ckpt.get("config") != model.config.to_dict():
        raise UserError(f"--resume: {run.files.latest} was trained as "
                        f"{describe_config(EnhancerConfig.from_dict(ckpt['config']))}; "
                        "resume with the same --arch/--embed_dim")
    check_state_dict(model, ckpt["state_dict"], run.files.latest)
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])  # rank 0's state
    if run.info.rank > 0:  # other ranks draw their own crops again
        seed_everything(args.seed + run.info.rank + ckpt["iteration"])
    batches.load_state_dict(ckpt)
    return Progress(ckpt["epoch"], ckpt["iteration"], {"psnr": ckpt["best_psnr"], "epoch": ckpt["best_epoch"]})


def log_start(log: RunLog, run: Run, model: EMNetEnhancer, plan: SchedulePlan, progress: Progress,
              pairs: tuple[list, list], batches: BatchSource, changed: str | None) -> None:
    """The run's first log lines: what trains where, from where, for how long."""
    args, (train_pairs, val_pairs) = run.args, pairs
    next_epoch = epoch_number(progress.iteration + 1, batches.iters_per_epoch)
    log.line(f"{'resuming' if args.resume else 'starting'} at epoch {next_epoch} iteration {progress.iteration}: "
             f"{describe_config(model.config)}, {sum(p.numel() for p in model.parameters()):,} params, "
             f"{len(train_pairs)} train / {len(val_pairs)} val pairs, {batches.iters_per_epoch} it/epoch, "
             f"{run.info.world_size} process(es) on {run.device}, crops drawn "
             f"{'on the device' if batches.on_device else 'by a DataLoader'}")
    if changed:
        log.line(changed)
    if plan.budget_s:
        log.line(f"time budget {plan.budget_s / 60:g} min ({plan.spent_s:.0f} s spent before), "
                 "learning rate stepped per iteration: " +
                 (f"the schedule fixed at {plan.total_iters} iterations continues" if plan.total_iters
                  else f"the length is fixed after timing {BUDGET_TIMED_STEPS} steps"))
    if not val_pairs:
        log.line("no validation pairs: model_best.pth will not be written (pass --val_dir or raise --val_percent)")
    if val_pairs and is_test_set(args.val_dir):
        log.line(run.files.test_set_line(args.val_dir))


def training_forward(model: EMNetEnhancer, run: Run, held_bytes: int) -> torch.nn.Module:
    """The training forward: the fast path (gradients through its PyTorch ops), in DDP with
    several processes, compiled with --compile. Validation's memory budget is counted from here,
    without the `held_bytes` of the decoded training pairs."""
    budget.measure_baseline(held_bytes)  # before the first step: the heap the steps free is validation's to reuse
    net = FastForward(model)
    device = run.device
    ddp = (DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
           if run.info.enabled else net)
    return torch.compile(ddp, mode=run.args.compile_mode) if run.args.compile else ddp


def run_options(run: Run, model: EMNetEnhancer, plan: SchedulePlan, pairs: tuple[list, list],
                batches: BatchSource) -> dict[str, Any]:
    """options.yml: the flags and what the run made of them."""
    train_pairs, val_pairs = pairs
    return {**vars(run.args), "model": model.config.to_dict(), "train_pairs": len(train_pairs),
            "val_pairs": [p.name for p in val_pairs], "iters_per_epoch": batches.iters_per_epoch,
            "total_iters": plan.total_iters, "warmup_iters": plan.warmup_iters, "lr_schedule": plan.lr_schedule,
            "batches_on_device": batches.on_device, "world_size": run.info.world_size, "device": str(run.device),
            "torch": str(torch.__version__)}


class Optimisation:
    """One optimisation step and the state it changes: the training forward (`training_forward`),
    the loss, Adam(W), the lr schedule, the fp16 loss scaler, and the guard that skips the update
    of a step whose loss is not finite."""

    def __init__(self, run: Run, model: EMNetEnhancer, loss_fn: EnhancementLoss, optimizer: torch.optim.Optimizer,
                 scheduler: LambdaLR, scaler: torch.amp.GradScaler, held_bytes: int, log: RunLog):
        self.run, self.model, self.loss_fn = run, model, loss_fn
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.forward = training_forward(model, run, held_bytes)
        self.guard: StepGuard = (DeviceGuard(run.device, run.info, log, optimizer) if run.on_device
                                 else HostSyncedGuard(run.device, run.info, log))

    def step(self, low: torch.Tensor, high: torch.Tensor, iteration: int) -> tuple[torch.Tensor, dict]:
        """Train on one batch (the run's `iteration`-th step); returns the loss and its terms."""
        device, amp_dtype, optimizer = self.run.device, self.run.amp_dtype, self.optimizer
        low, high = low.to(device, non_blocking=True), high.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = self.forward(low)
        loss, terms = self.loss_fn(out.float().clamp(0, 1), high)
        optimizer.zero_grad(set_to_none=True)
        if self.guard.ok(loss, iteration):
            self.scaler.scale(loss).backward()
            if self.run.args.grad_clip > 0:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.args.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
        self.scheduler.step()
        return loss, terms

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}


class Checkpoints:
    """Validation and checkpoints (main process): model_best.pth on the validation split, never
    on a test set; model_latest.pth with what --resume needs; every --checkpoint epoch's file. The
    files are written in the background (`RunFiles.save`)."""

    def __init__(self, run: Run, model: EMNetEnhancer, val_pairs: list, log: RunLog):
        self.run, self.model, self.val_pairs, self.log = run, model, val_pairs, log
        self.selects = bool(val_pairs) and not is_test_set(run.args.val_dir)

    def validation_due(self, epoch: int, epoch_complete: bool, stop: bool, finished: bool, signalled: bool) -> bool:
        """Every --val_time epochs and when this call stops; after a stop signal only where an
        uninterrupted run would have validated (the checkpoint is saved first)."""
        every = self.run.args.val_time
        if signalled:
            return (epoch_complete and epoch % every == 0) or finished
        return epoch % every == 0 or stop

    def save(self, progress: Progress, epoch: int, validate_now: bool, epoch_complete: bool,
             resume_state: Callable[[], dict[str, Any]]) -> None:
        """Validate epoch `epoch` when `validate_now` (a better score is kept as model_best.pth),
        then write model_latest.pth with `resume_state()` and, for a completed --checkpoint
        epoch, model_epoch_N.pth."""
        run, best = self.run, False
        if self.val_pairs and validate_now:
            means = validate(self.model, self.val_pairs, run.device, run.args, run.files.env_dir, epoch, self.log,
                             progress.iteration)
            best = self.selects and means["psnr"] > progress.best["psnr"]
            if best:
                progress.best = {"psnr": means["psnr"], "epoch": epoch}
        kept = progress.epoch if epoch_complete and progress.epoch % run.args.checkpoint == 0 else None
        run.files.save(Checkpoint(payload(self.model, run.args, progress), resume_state()), best, kept,
                       background=True)

    def summary(self, progress: Progress) -> str:
        return (f"best val PSNR {progress.best['psnr']:.3f} (epoch {progress.best['epoch']})" if self.selects
                else "no checkpoint selected")


class RunLength:
    """How long the run trains and where this call stops: the schedule's plan, whose length
    --time_budget fixes once the first steps are timed (`fix_when_timed`), --max_iters, and the
    time spent by earlier calls of the run."""

    def __init__(self, run: Run, plan: SchedulePlan):
        self.run, self.plan, self.spent_before = run, plan, plan.spent_s
        self.timer = StepTimer(run.device)
        self.last_iter = last_iteration(plan, run.args.max_iters)  # where this call stops

    def fix_when_timed(self, opt: Optimisation, val_pairs: list, iteration: int, log: RunLog) -> bool:
        """--time_budget: once the first steps are timed, fix the run's length and replace the
        schedule (`fix_budget`); whether it did so now."""
        if self.plan.total_iters is not None:
            return False
        sec_per_iter = self.timer.step_done()
        if sec_per_iter is None:
            return False
        run, args = self.run, self.run.args
        spent = run.seconds_spent(self.spent_before)
        overhead = (epoch_overhead_seconds(opt.model, opt.optimizer, val_pairs, run.device, args.val_time)
                    if run.info.is_main else 0.0)  # rank 0 decides the length for all
        self.plan, opt.scheduler = fix_budget(self.plan, sec_per_iter, spent, overhead, iteration, opt.optimizer,
                                              args.min_lr, run.device, run.info, log)
        self.last_iter = last_iteration(self.plan, args.max_iters)
        return True

    def nothing_to_train(self, iteration: int, log: RunLog) -> bool:
        """Whether the run already stands where this call would stop (and says so)."""
        if iteration < self.last_iter:
            return False
        log.line(f"nothing to train: the run is at iteration {iteration} and stops at {self.last_iter} "
                 "(raise --max_iters or --nepoch); checkpoints left as they are")
        return True

    def finished(self, iteration: int) -> bool:
        """Whether the run's schedule has ended at `iteration` (never before the length is fixed)."""
        return self.plan.total_iters is not None and iteration >= self.plan.total_iters

    def schedule_state(self) -> dict[str, Any]:
        """The plan as model_latest.pth stores it, with the time spent until now."""
        self.plan = dataclasses.replace(self.plan, spent_s=self.run.seconds_spent(self.spent_before))
        return self.plan.to_dict()


class Trainer:
    """The steps of one call: `epoch_batches` yields an epoch's batches; `after_step` fixes a
    budgeted run's length, logs and says whether to stop; `end_epoch` validates and writes the
    checkpoints (`Checkpoints`)."""

    def __init__(self, run: Run, optimisation: Optimisation, plan: SchedulePlan, batches: BatchSource,
                 progress: Progress, log: RunLog, options: dict[str, Any], val_pairs: list):
        self.run, self.args, self.opt = run, run.args, optimisation
        self.length = RunLength(run, plan)
        self.batches, self.progress, self.log, self.options = batches, progress, log, options
        self.checkpoints = Checkpoints(run, optimisation.model, val_pairs, log)
        self.tic, self.done_here = 0.0, 0
        self.signals = StopSignals()  # SIGTERM/SIGINT: save this step's checkpoint, then exit 143/130

    def epoch_of(self, step: int) -> int:
        """The number of the epoch that step `step` falls in (`epoch_number`)."""
        return epoch_number(step, self.batches.iters_per_epoch)

    def epoch_batches(self) -> Iterable[Batch]:
        """The current epoch's batches still to train on (all but those of a resumed epoch)."""
        p, per_epoch = self.progress, self.batches.iters_per_epoch
        skip = p.iteration - p.epoch * per_epoch  # >0 only when resuming mid-epoch
        batches = self.batches.epoch(p.epoch, skip)
        self.opt.model.train()
        self.tic, self.done_here = time.perf_counter(), 0
        self.length.timer.start_epoch()
        return tqdm(batches, desc=f"epoch {self.epoch_of(p.iteration + 1)}", leave=False, total=per_epoch - skip,
                    disable=not self.run.info.is_main)

    def step(self, low: torch.Tensor, high: torch.Tensor) -> bool:
        """One optimisation step, then `after_step`: whether this call stops here."""
        loss, terms = self.opt.step(low, high, self.progress.iteration)
        self.progress.iteration += 1
        self.done_here += 1
        return self.after_step(loss, terms)

    def after_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> bool:
        """Fix a budgeted run's length once timed, log at log steps; whether this call stops here."""
        args, run, iteration = self.args, self.run, self.progress.iteration
        if self.length.fix_when_timed(self.opt, self.checkpoints.val_pairs, iteration, self.log):
            self.options["total_iters"] = self.length.plan.total_iters
            run.files.write_options(self.options)
        if iteration % args.log_every == 0:
            self.log_step(loss, terms)
        if iteration >= self.length.last_iter:
            return True
        if time_is_up(args, run.call_start, run.info, run.device, iteration):
            self.log.line(f"stopping at iteration {iteration}: --stop_after_minutes {args.stop_after_minutes:g} "
                          "reached; --resume continues")
            return True
        if self.signals.agreed(run.info, run.device, iteration, args.log_every):
            self.log.line(f"stopping at iteration {iteration}: {self.signals.name} received; "
                          f"saving {run.files.latest}")
            return True
        return False

    def log_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        iteration = self.progress.iteration
        self.opt.guard.check(iteration)
        loss_value, lr = loss.item(), self.opt.lr  # item(): the device path's only host sync of the step
        self.log.scalars(iteration, {"train/loss": loss_value, "train/lr": lr,
                                     **{f"train/{k}": float(v) for k, v in terms.items()}})
        rate = self.done_here / (time.perf_counter() - self.tic)
        shown = self.length.last_iter if self.length.last_iter < math.inf else "?"
        self.log.line(f"epoch {self.epoch_of(iteration)} iter {iteration}/{shown} loss {loss_value:.4f} "
                      + " ".join(f"{k} {float(v):.4f}" for k, v in terms.items())
                      + f" lr {lr:.2e} {rate:.2f} it/s")

    def end_epoch(self, stop: bool) -> bool:
        """The end of an epoch or of this call: validation and checkpoints; whether to stop."""
        p, run = self.progress, self.run
        epoch_complete = p.iteration == (p.epoch + 1) * self.batches.iters_per_epoch
        if epoch_complete:
            p.epoch += 1
        finished = self.length.finished(p.iteration)
        stop = stop or finished or self.signals.agreed(run.info, run.device)
        self.opt.guard.check(p.iteration)
        if run.info.is_main:
            due = self.checkpoints.validation_due(p.epoch, epoch_complete, stop, finished, self.signals.requested)
            self.checkpoints.save(p, self.epoch_of(p.iteration), due, epoch_complete, self.resume_state)
        barrier(run.info)
        return stop

    def resume_state(self) -> dict[str, Any]:
        """What model_latest.pth adds for --resume, as things stand after validation: the
        optimisation's state, the RNG, the schedule (time spent so far) and the device crops' sampler."""
        state = {**self.opt.state_dict(), "rng": capture_rng_state(), "schedule": self.length.schedule_state()}
        sampler = self.batches.state_dict()
        return state if sampler is None else {**state, "sampler": sampler}

    def close(self) -> None:
        self.run.files.close()  # never exit with a checkpoint half-way to the disk
        self.signals.restore()

    def finish(self) -> None:
        """The last log line; a stop by a signal ends in its exit status."""
        p, run = self.progress, self.run
        at = f"at epoch {self.epoch_of(p.iteration)} iteration {p.iteration}"
        self.log.line(f"finished {at}; {self.checkpoints.summary(p)}; checkpoints in {run.files.models_dir}")
        self.log.close()
        cleanup(run.info)
        self.signals.raise_if_stopped(f"stopped by {self.signals.name} {at}; "
                                      f"{run.files.latest} holds this step: --resume continues")


def main(args: argparse.Namespace, given: set[str] | None = None) -> None:
    """Train; `given` (from `parse_with_given`) lets --resume take the flags not given again from
    the checkpoint (RESUMED_FLAGS)."""
    run, changed = open_run(args, given, time.monotonic())
    device, info = run.device, run.info
    train_pairs, val_pairs = training_split(args.train_dir, args.val_dir, args.val_percent)  # before any download
    loss_fn = EnhancementLoss(args.l1_lambda, args.l2_lambda, args.ssim_lambda, args.lpips_lambda,
                              args.lpips_alexnet, args.lpips_input_range == "-11").to(device)
    batches = batch_source(args, train_pairs, run)
    plan = schedule_plan(args, run.ckpt, batches.iters_per_epoch)

    seed_everything(args.seed + info.rank)
    model = build_model(args, device)
    optimizer = build_optimizer(args, model, fused=batches.on_device)
    scheduler = build_schedule(optimizer, plan, args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    progress = resume(run, model, optimizer, scheduler, scaler, batches)

    log = run.files.open_log()
    options = run_options(run, model, plan, (train_pairs, val_pairs), batches)
    run.files.write_options(options)
    log_start(log, run, model, plan, progress, (train_pairs, val_pairs), batches, changed)
    optimisation = Optimisation(run, model, loss_fn, optimizer, scheduler, scaler, batches.held_bytes, log)
    trainer = Trainer(run, optimisation, plan, batches, progress, log, options, val_pairs)
    try:
        stop = trainer.length.nothing_to_train(progress.iteration, log)
        while not stop:
            for low, high in trainer.epoch_batches():
                stop = trainer.step(low, high)
                if stop:
                    break
            stop = trainer.end_epoch(stop)  # validation, model_latest.pth (this call's last when stopping)
    finally:
        trainer.close()
    trainer.finish()


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(*parse_with_given(get_args_parser())))
