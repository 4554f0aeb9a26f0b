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
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from dataset.device_crops import DeviceCrops
from dataset.paired_folder import PairedCrops, read_pair
from dataset.pairing import is_test_set, training_split
from models.enhancer import EMNetEnhancer, EnhancerConfig, make_config
from models.evaluate import evaluate_pairs
from models.fast import FastForward, budget
from models.inference import enhance
from models.loading import check_state_dict, describe_config, enhancer_payload, load_enhancer
from models.options import (
    HelpFormatter,
    add_device_arg,
    add_enhancer_args,
    add_max_memory_arg,
    add_split_arg,
    parse_with_given,
    resume_flags,
    set_memory_budget,
    writable_dir,
)
from utils.allocator import tune_allocator
from utils.checkpoint import CheckpointWriter, cpu_copy, load_checkpoint_file, remove_stale_temp_files
from utils.device import resolve_device
from utils.distributed import DistInfo, all_ranks_true, barrier, cleanup, init_distributed
from utils.errors import UserError, run_cli
from utils.image_io import image_to_tensor
from utils.losses import EnhancementLoss
from utils.report import mean_scores
from utils.run_log import RunLog
from utils.schedule import build_schedule, fix_budget, last_iteration, schedule_plan
from utils.seed import capture_rng_state, restore_rng_state, seed_everything
from utils.signals import StopSignals, ignore_stop_signals
from utils.training import (
    BUDGET_TIMED_STEPS,
    MAX_BAD_STEPS,
    NonFiniteLosses,
    StepTimer,
    nan_error,
    time_is_up,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the EMNet enhancer (defaults: published recipe)",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--env", default="enhancer_lolv1", help="run name; outputs go to SAVE_DIR/ENV")
    g.add_argument("--save_dir", default="./log", help="root folder of all runs")
    add_enhancer_args(g)
    g = p.add_argument_group("data")
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
    g = p.add_argument_group("optimisation")
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
    g = p.add_argument_group("loss")
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
    g = p.add_argument_group("validation and checkpoints")
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
    g = p.add_argument_group("runtime")
    add_device_arg(g)
    g.add_argument("--gpu", default=None, help="CUDA devices to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, crops, shuffling)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision for the forward pass (fp16: CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode with --compile; reduce-overhead replays CUDA graphs (static "
                        "shapes, which --data_on_device gives)")
    return p


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


def payload(model: EMNetEnhancer, args: argparse.Namespace, epoch: int, iteration: int,
            best: dict[str, Any], training_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """This run's checkpoint (`enhancer_payload`); `training_state` (optimizer, scheduler, RNG)
    only in model_latest."""
    return enhancer_payload(model, args.arch, epoch, iteration, best["psnr"], best["epoch"], vars(args),
                            training_state)


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


def main(args: argparse.Namespace, given: set[str] | None = None) -> None:
    """Train; `given` (from `parse_with_given`) lets --resume take the flags not given again from
    the checkpoint (RESUMED_FLAGS)."""
    call_start = time.monotonic()  # --stop_after_minutes and --time_budget count from here
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
    env_dir = Path(args.save_dir) / args.env
    models_dir = writable_dir(env_dir / "models", "--save_dir")
    latest_path = models_dir / "model_latest.pth"
    if info.is_main:
        remove_stale_temp_files(models_dir)
    if args.resume and not latest_path.is_file():
        raise UserError(f"--resume: nothing to resume, {latest_path} does not exist; "
                        "drop --resume or check --save_dir/--env")
    ckpt = load_checkpoint_file(latest_path) if args.resume else None
    changed = resume_flags(args, given, ckpt.get("options", {}), RESUMED_FLAGS) if ckpt is not None else None
    train_pairs, val_pairs = training_split(args.train_dir, args.val_dir, args.val_percent)  # before any download
    loss_fn = EnhancementLoss(args.l1_lambda, args.l2_lambda, args.ssim_lambda, args.lpips_lambda,
                              args.lpips_alexnet, args.lpips_input_range == "-11").to(device)
    if on_device:
        crops = DeviceCrops.from_pairs(train_pairs, args.train_ps, device, args.seed, (info.rank, info.world_size))
    else:
        dataset = PairedCrops(train_pairs, args.train_ps)
    if len(train_pairs) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_pairs)} training "
                        f"pairs of {args.train_dir}; lower it or add pairs")
    if on_device:
        iters_per_epoch = crops.iters_per_epoch(args.batch_size)
    else:
        generator = torch.Generator()
        sampler = (DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
                   if info.enabled else RandomSampler(dataset, generator=generator))
        loader = DataLoader(dataset, batch_size=args.batch_size // info.world_size, sampler=sampler,
                            num_workers=args.train_workers, drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=args.train_workers > 0,
                            worker_init_fn=ignore_stop_signals)
        iters_per_epoch = len(loader)
    plan = schedule_plan(args, ckpt, iters_per_epoch)
    spent_before = plan["spent_s"]  # by earlier calls of a budgeted run

    seed_everything(args.seed + info.rank)
    model = EMNetEnhancer(make_config(args.arch, args.embed_dim))
    if args.pretrain_weights and not args.resume:
        init, _ = load_enhancer(args.pretrain_weights, args.arch, args.embed_dim)
        model.load_state_dict(init.state_dict())
    model.to(device)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    # The fused step can skip an update on the device (NonFiniteLosses); the DataLoader path keeps
    # the default implementation, so its results and bit-exact resumes stay as they were.
    optimizer = opt_cls(model.parameters(), lr=args.lr_initial, betas=(0.9, 0.999),
                        weight_decay=args.weight_decay, **({"fused": True} if on_device else {}))
    scheduler = build_schedule(optimizer, plan, args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    epoch, iteration, best = 0, 0, {"psnr": -math.inf, "epoch": -1}
    if ckpt is not None:
        if ckpt.get("config") != model.config.to_dict():
            raise UserError(f"--resume: {latest_path} was trained as "
                            f"{describe_config(EnhancerConfig.from_dict(ckpt['config']))}; "
                            "resume with the same --arch/--embed_dim")
        check_state_dict(model, ckpt["state_dict"], latest_path)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, iteration = ckpt["epoch"], ckpt["iteration"]
        best = {"psnr": ckpt["best_psnr"], "epoch": ckpt["best_epoch"]}
        restore_rng_state(ckpt["rng"])  # rank 0's state
        if info.rank > 0:  # other ranks draw their own crops again
            seed_everything(args.seed + info.rank + iteration)
        if on_device and "sampler" in ckpt:  # else a run resumed from the DataLoader path: fresh draws
            crops.load_state_dict(ckpt["sampler"])

    log = RunLog(env_dir, info.is_main)
    options = {**vars(args), "model": model.config.to_dict(), "train_pairs": len(train_pairs),
               "val_pairs": [p.name for p in val_pairs], "iters_per_epoch": iters_per_epoch,
               "total_iters": plan["total_iters"], "warmup_iters": plan["warmup_iters"],
               "lr_schedule": plan["lr_schedule"],
               "batches_on_device": on_device, "world_size": info.world_size, "device": str(device),
               "torch": str(torch.__version__)}
    if info.is_main:
        (env_dir / "options.yml").write_text(yaml.safe_dump(options, sort_keys=False))
    log.line(f"{'resuming at' if args.resume else 'starting'} epoch {epoch} iteration {iteration}: "
             f"{describe_config(model.config)}, {sum(p.numel() for p in model.parameters()):,} params, "
             f"{len(train_pairs)} train / {len(val_pairs)} val pairs, {iters_per_epoch} it/epoch, "
             f"{info.world_size} process(es) on {device}, crops drawn "
             f"{'on the device' if on_device else 'by a DataLoader'}")
    if changed:
        log.line(changed)
    if plan["budget_s"]:
        log.line(f"time budget {plan['budget_s'] / 60:g} min ({plan['spent_s']:.0f} s spent before), "
                 "learning rate stepped per iteration: " +
                 (f"the schedule fixed at {plan['total_iters']} iterations continues" if plan["total_iters"]
                  else f"the length is fixed after timing {BUDGET_TIMED_STEPS} steps"))
    if not val_pairs:
        log.line("no validation pairs: model_best.pth will not be written (pass --val_dir or raise --val_percent)")
    selects = not is_test_set(args.val_dir)
    if val_pairs and not selects:
        log.line(f"--val_dir {args.val_dir} is a test set: validation here only reports its scores and never "
                 "selects a checkpoint (no model_best.pth); drop --val_dir to select on pairs held out of "
                 "--train_dir")

    budget.measure_baseline()  # before the first step: the heap the steps free is validation's to reuse
    net = FastForward(model)  # the fast path, with gradients through its PyTorch ops
    ddp = (DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
           if info.enabled else net)
    forward = torch.compile(ddp, mode=args.compile_mode) if args.compile else ddp

    writer = CheckpointWriter()
    nonfinite = NonFiniteLosses(device, info) if on_device else None
    timer = StepTimer(device)
    bad_steps, stop = 0, False
    last_iter = last_iteration(plan, args.max_iters)  # where this call stops
    if iteration >= last_iter:
        log.line(f"nothing to train: the run is at iteration {iteration} and stops at {last_iter} "
                 "(raise --max_iters or --nepoch); checkpoints left as they are")
        stop = True
    signals = StopSignals()  # SIGTERM/SIGINT: save this step's checkpoint, then exit 143/130
    try:
        while not stop:
            skip = iteration - epoch * iters_per_epoch  # >0 only when resuming mid-epoch
            if on_device:  # the sampler's saved state already stands where the run stopped
                batches = (crops.sample(args.batch_size) for _ in range(skip, iters_per_epoch))
                first = skip
            else:
                if info.enabled:
                    sampler.set_epoch(epoch)
                else:
                    generator.manual_seed(args.seed + epoch)
                batches, first = loader, 0
            model.train()
            tic, done_here = time.perf_counter(), 0
            timer.start_epoch()
            for step, (low, high) in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False,
                                                    total=iters_per_epoch - first, disable=not info.is_main),
                                               start=first):
                if step < skip:
                    if step == skip - 1 and info.rank == 0:  # skipped batches drew crops: back to the saved RNG
                        restore_rng_state(ckpt["rng"])
                    continue
                low, high = low.to(device, non_blocking=True), high.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = forward(low)
                loss, terms = loss_fn(out.float().clamp(0, 1), high)
                optimizer.zero_grad(set_to_none=True)
                step_ok = True
                if on_device:
                    optimizer.found_inf = nonfinite.update(loss)  # read by the fused step: no host sync
                else:  # a host sync every step: skip the step here
                    loss_value = loss.item()
                    step_ok = all_ranks_true(info, math.isfinite(loss_value), device)
                    bad_steps = 0 if step_ok else bad_steps + 1
                    if not step_ok:
                        log.line(f"iteration {iteration + 1}: non-finite loss, step skipped ({bad_steps} in a row)")
                        if bad_steps >= MAX_BAD_STEPS:
                            raise nan_error(bad_steps, iteration + 1)
                if step_ok:
                    scaler.scale(loss).backward()
                    if args.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                iteration += 1
                done_here += 1
                if plan["total_iters"] is None:
                    sec_per_iter = timer.step_done()
                    if sec_per_iter is not None:
                        spent = spent_before + time.monotonic() - call_start
                        overhead = (epoch_overhead_seconds(model, optimizer, val_pairs, device, args.val_time)
                                    if info.is_main else 0.0)  # rank 0 decides the length for all
                        scheduler = fix_budget(plan, sec_per_iter, spent, overhead, iteration, iters_per_epoch,
                                               optimizer, args.min_lr, device, info, log)
                        last_iter = last_iteration(plan, args.max_iters)
                        options["total_iters"] = plan["total_iters"]
                        if info.is_main:
                            (env_dir / "options.yml").write_text(yaml.safe_dump(options, sort_keys=False))
                if iteration % args.log_every == 0:
                    if on_device:
                        nonfinite.check(log, iteration)
                        loss_value = loss.item()  # the only host sync of the step, at log steps
                    lr = optimizer.param_groups[0]["lr"]
                    log.scalars(iteration, {"train/loss": loss_value, "train/lr": lr,
                                            **{f"train/{k}": float(v) for k, v in terms.items()}})
                    rate = done_here / (time.perf_counter() - tic)
                    shown = last_iter if last_iter < math.inf else "?"
                    log.line(f"epoch {epoch} iter {iteration}/{shown} loss {loss_value:.4f} "
                             + " ".join(f"{k} {float(v):.4f}" for k, v in terms.items())
                             + f" lr {lr:.2e} {rate:.2f} it/s")
                if iteration >= last_iter:
                    stop = True
                    break
                if time_is_up(args, call_start, info, device, iteration):
                    log.line(f"stopping at iteration {iteration}: --stop_after_minutes {args.stop_after_minutes:g} "
                             "reached; --resume continues")
                    stop = True
                    break
                if signals.agreed(info, device, iteration, args.log_every):
                    log.line(f"stopping at iteration {iteration}: {signals.name} received; saving {latest_path}")
                    stop = True
                    break
            epoch_complete = iteration == (epoch + 1) * iters_per_epoch
            if epoch_complete:
                epoch += 1
            finished = plan["total_iters"] is not None and iteration >= plan["total_iters"]
            stop = stop or finished or signals.agreed(info, device)
            if on_device:
                nonfinite.check(log, iteration)
            if info.is_main:
                files = []
                due = epoch % args.val_time == 0 or stop
                if signals.requested:  # validate only where an uninterrupted run would: save first
                    due = (epoch_complete and epoch % args.val_time == 0) or finished
                if val_pairs and due:
                    means = validate(model, val_pairs, device, args, env_dir, epoch, log, iteration)
                    if selects and means["psnr"] > best["psnr"]:
                        best = {"psnr": means["psnr"], "epoch": epoch}
                        files.append((models_dir / "model_best.pth", payload(model, args, epoch, iteration, best)))
                plan["spent_s"] = spent_before + time.monotonic() - call_start
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "rng": capture_rng_state(), "schedule": dict(plan)}
                if on_device:
                    state["sampler"] = crops.state_dict()
                files.append((latest_path, payload(model, args, epoch, iteration, best, state)))
                if epoch_complete and epoch % args.checkpoint == 0:
                    files.append((models_dir / f"model_epoch_{epoch}.pth", payload(model, args, epoch, iteration, best)))
                writer.save(files)
            barrier(info)
    finally:
        writer.join()  # never exit with a checkpoint half-way to the disk
        signals.restore()
    best_text = (f"best val PSNR {best['psnr']:.3f} (epoch {best['epoch']})" if val_pairs and selects
                 else "no checkpoint selected")
    log.line(f"finished at epoch {epoch} iteration {iteration}; {best_text}; checkpoints in {models_dir}")
    log.close()
    cleanup(info)
    signals.raise_if_stopped(f"stopped by {signals.name} at epoch {epoch} iteration {iteration}; {latest_path} "
                             "holds this step: --resume continues")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(*parse_with_given(get_args_parser())))
