"""Train EMNet's external memory (stage 2) on top of a frozen enhancer.

Defaults are the original release's memory: crop entries and the ImageNet ResNet-18 query
(train_memory_script.sh sets ours). Entries (--entries): `crops` (the release) writes one random
crop of every training pair per epoch into the memory (the update rule of docs/METHOD.md);
`images` writes every training pair whole, with the query computed exactly as at test time
(`benchmarks/memory_study.py` compares the two). With --learn_query a small head on the query is
trained meanwhile with the threshold triplet loss. --strength auto calibrates the correction
strength on the training pairs (models/calibration.py). Validation compares ori (enhancer) and
mem (after the memory) on pairs held out of the training set (or --val_dir; a test set there is
only reported, it selects nothing). Resume with --resume: the run's flags not given again come
from its checkpoint. Outputs under SAVE_DIR/ENV/: models/memory_{latest,best}.pth, options.yml,
train.log, tensorboard/. The file keeps the enhancer's fingerprint (test.py refuses another
enhancer) and the name and a thumbnail of every training image (test.py shows which ones an
image recalled).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from dataset.paired_folder import PairedCrops, WithIndex, read_pair
from dataset.pairing import ImagePair, is_test_set, training_split
from models.calibration import calibrate_strength
from models.frozen_pass import FrozenPass, cache_key, cache_size, cached_passes, describe_passes
from models.loading import enhancer_fingerprint, load_enhancer, load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig, pooled_value
from models.options import (
    BUNDLED_ENHANCER,
    HelpFormatter,
    add_border_arg,
    add_device_arg,
    add_enhancer_args,
    add_max_memory_arg,
    add_memory_args,
    add_memory_build_args,
    add_split_arg,
    check_border_margin,
    check_memory_flags,
    parse_with_given,
    resume_flags,
    set_memory_budget,
    writable_dir,
)
from models.provenance import sources_payload
from models.query import ENHANCER_DESCRIPTORS, QueryHead, build_query_encoder, threshold_triplet_loss
from models.read_settings import ReadSettings
from utils.allocator import tune_allocator
from utils.checkpoint import load_checkpoint_file, remove_stale_temp_files, save_checkpoint
from utils.device import resolve_device
from utils.errors import UserError, run_cli
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8
from utils.mid_epoch import MidEpoch
from utils.report import mean_scores, score
from utils.run_log import RunLog
from utils.seed import seed_everything
from utils.signals import StopSignals, ignore_stop_signals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train EMNet's external memory on a frozen enhancer. The defaults are "
                                "the release's setting (crop entries, 9000 slots, 40 epochs), with the enhancer query "
                                "instead of its ImageNet ResNet-18. "
                                "Recommended, chosen by the K-fold study (README, 'Does the memory help?') and set "
                                "by train_memory_script.sh: --entries images --query_encoder enhancer_levels "
                                "--mem_size 1024 --nepoch 1 --testing_top_k 1.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--env", default="memory_lolv1", help="run name; outputs go to SAVE_DIR/ENV")
    g.add_argument("--save_dir", default="./log", help="root folder of all runs")
    g.add_argument("--weights", "--pretrain_weights", dest="weights", default=BUNDLED_ENHANCER,
                   help="the frozen enhancer (--pretrain_weights: the original's name)")
    add_enhancer_args(g, defaults_from_checkpoint=True)
    add_border_arg(g)
    g = p.add_argument_group("data")
    g.add_argument("--train_dir", default="./datasets/LOL-v1/our485", help="training pairs (low/, high/)")
    g.add_argument("--val_dir", default=None, help="default: the split held out of --train_dir")
    add_split_arg(g)
    g.add_argument("--train_ps", type=int, default=128, help="training crop size")
    g.add_argument("--batch_size", type=int, default=128, help="samples per memory update")
    g.add_argument("--train_workers", type=int, default=0, help="DataLoader worker processes for crop entries")
    g.add_argument("--datarange", choices=["01", "-11"], default="01",
                   help="the original's flag, which it parsed and never used; accepted with its values and "
                        "ignored here: images are always in [0, 1]")
    g.add_argument("--cache_dir", default=None,
                   help="where the frozen enhancer's passes over the pairs are cached, one subfolder per enhancer "
                        "file and margin, reused by every later run on that enhancer; the run ends by printing "
                        "its size (default: SAVE_DIR/cache/frozen)")
    g.add_argument("--clear_cache", action="store_true",
                   help="delete this run's cached passes when it ends (the next run recomputes them)")
    g = p.add_argument_group("memory")
    add_memory_build_args(g)
    add_memory_args(g, training=True)
    p.set_defaults(query_encoder="resnet18")  # the original's query; test.py takes the memory's
    g.add_argument("--thres", type=float, default=1e-5, help="match threshold of the update rule")
    g.add_argument("--top_k", type=int, default=None,
                   help="the original's flag, which it parsed and never used; accepted and ignored here "
                        "(the update rule uses each query's top-1 slot, reads --testing_top_k)")
    g.add_argument("--cos_thres", type=float, default=None,
                   help="the original's flag, which it parsed and never used; accepted and ignored here "
                        "(a match is decided on the value, --thres)")
    g.add_argument("--entries", choices=["crops", "images"], default="crops",
                   help="what a slot holds: a --train_ps crop (the release) or a whole training image, "
                        "queried as at test time (recommended: images)")
    g.add_argument("--learn_query", action="store_true", help="train a query head (triplet loss)")
    g.add_argument("--alpha", type=float, default=0.1, help="triplet margin of the query head")
    g.add_argument("--pos_thres", type=float, default=0.02,
                   help="a slot is a triplet positive when its value is this close (mean |diff|)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate of the query head")
    g = p.add_argument_group("schedule")
    g.add_argument("--nepoch", type=int, default=40, help="passes over the training pairs")
    g.add_argument("--val_time", type=int, default=5, help="validate every N epochs")
    add_max_memory_arg(g)
    g.add_argument("--resume", action="store_true", help="continue from models/memory_latest.pth")
    add_device_arg(g)
    g.add_argument("--seed", type=int, default=1234, help="seed of crops, ages and the query head")
    return p


# What a memory run is: on --resume these come from memory_latest.pth unless given again.
RESUMED_FLAGS = ("weights", "arch", "embed_dim", "border_margin", "train_dir", "val_dir", "val_percent",
                 "train_ps", "batch_size", "mem_size", "K_feat_dim", "V_feat_dim", "pooling_size", "pooling_mean", "testing_top_k",
                 "temperature", "strength", "query_encoder", "query_weights", "thres", "entries", "learn_query",
                 "alpha", "pos_thres", "lr", "nepoch", "val_time", "seed")


def read_config(args: argparse.Namespace) -> tuple[ReadSettings, bool]:
    """The read settings the memory is validated with and stores for test.py, and whether
    --strength auto asks for the strength to be calibrated after training (the one place "auto"
    means anything; until then the memory is validated and stored with the release's correction)."""
    auto = args.strength == "auto"
    flags = argparse.Namespace(**{**vars(args), "strength": None}) if auto else args
    return ReadSettings().with_flags(flags), auto


def memory_config(args: argparse.Namespace, key_dim: int, top_k: int) -> MemoryConfig:
    p = args.pooling_size or 1
    if args.mem_size < 1 or not 1 <= top_k <= args.mem_size:
        raise UserError(f"--testing_top_k {top_k} and --mem_size {args.mem_size} must satisfy "
                        "1 <= testing_top_k <= mem_size")
    check_memory_flags(args, args.mem_size, key_dim, p,
                       f"the {args.query_encoder} query width and p = {p} (--pooling_size)")
    return MemoryConfig(mem_size=args.mem_size, key_dim=key_dim, pooling_size=p, threshold=args.thres)


def image_queries(passes: list[FrozenPass], pairs: list[ImagePair], encoder: torch.nn.Module,
                  query_name: str, device: torch.device) -> torch.Tensor:
    """Whole-image queries (N, D) as test.py computes them: enhancer descriptors from the cached
    pass's feature statistics, other encoders on the low image."""
    if query_name in ENHANCER_DESCRIPTORS:
        return describe_passes(passes, query_name).to(device)
    return torch.cat([encoder(image_to_tensor(read_pair(pair)[0]).to(device)) for pair in pairs])


class ValidationSet:
    """Validation pairs through the frozen enhancer (cached passes) with their queries: the
    memory's ori and mem scores on them, read as test.py reads."""

    def __init__(self, passes: list[FrozenPass], queries: torch.Tensor):
        self.passes, self.query = passes, queries
        ori_rows = [{f"ori_{k}": v for k, v in score(to_uint8(tensor_to_image(fp.ori.float())), fp.high).items()}
                    for fp in passes]
        self.ori_means = mean_scores(ori_rows, ["ori_psnr", "ori_ssim"])  # the enhancer is frozen

    @torch.no_grad()
    def evaluate(self, memory: ExternalMemory, head: QueryHead | None, read: ReadSettings) -> dict[str, float]:
        q = self.query.to(memory.key.device)
        recalled = read.recall(memory, head(q) if head is not None else q).cpu()
        p = memory.config.pooling_size
        mem_rows = [{f"mem_{k}": v for k, v in score(to_uint8(tensor_to_image(
            read.correct(fp.ori[None].float(), r[None], p))), fp.high).items()}
            for fp, r in zip(self.passes, recalled)]
        return {**self.ori_means, **mean_scores(mem_rows, ["mem_psnr", "mem_ssim"])}


class ImageEntries(torch.utils.data.Dataset):
    """`--entries images`: each training pair whole, as (query, target value, index)."""

    def __init__(self, queries: torch.Tensor, passes: list[FrozenPass], p: int):
        self.queries = queries.cpu()
        self.values = torch.cat([pooled_value(torch.from_numpy(fp.high).permute(2, 0, 1)[None].float() / 255, p)
                                 for fp in passes])

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> tuple:
        return self.queries[i], self.values[i], i


def restore_run(path: Path, memory: ExternalMemory, head: QueryHead | None,
                optimizer: torch.optim.Optimizer | None, generator: torch.Generator,
                query_name: str, fingerprint: str, weights: str) -> tuple[int, dict]:
    """Load `memory_latest.pth` into the fresh run's objects; returns (epoch, best scores).
    A run started with other memory flags or another enhancer (`fingerprint` of `weights`) is a
    UserError (the file stays untouched)."""
    resumed, ckpt = load_memory(path)
    stored = ckpt.get("enhancer_fingerprint")
    if stored is not None and stored != fingerprint:
        raise UserError(f"--resume: {path} was filled with the features of {ckpt.get('enhancer_weights')} "
                        f"(fingerprint {stored}), not of {weights} (fingerprint {fingerprint}); resume with "
                        f"--pretrain_weights {ckpt.get('enhancer_weights')}, or use a new --env")
    config = memory.config
    was = (resumed.config.mem_size, resumed.config.key_dim, resumed.config.pooling_size,
           ckpt["query_encoder"], ckpt.get("head_state_dict") is not None)
    now = (config.mem_size, config.key_dim, config.pooling_size, query_name, head is not None)
    if was != now:
        raise UserError(f"--resume: {path} holds a memory of {was[0]} x {was[1]}, p = {was[2]}, "
                        f"{was[3]} query, learned head {was[4]}, not {now[0]} x {now[1]}, p = {now[2]}, "
                        f"{now[3]} query, learned head {now[4]}; resume with the same --mem_size, "
                        "--pooling_size, --query_encoder and --learn_query, or use a new --env")
    memory.load_state_dict(resumed.state_dict())
    if head is not None:
        head.load_state_dict(ckpt["head_state_dict"])
        optimizer.load_state_dict(ckpt["head_optimizer"])
    torch.set_rng_state(ckpt["rng"])
    generator.set_state(ckpt["sampler_rng"])
    return ckpt["epoch"], ckpt["best"]


def main(args: argparse.Namespace, given: set[str] | None = None) -> None:
    """Train; `given` (from `parse_with_given`) lets --resume take the flags not given again from
    memory_latest.pth (RESUMED_FLAGS)."""
    device = resolve_device(args.device)
    env_dir = Path(args.save_dir) / args.env
    models_dir = writable_dir(env_dir / "models", "--save_dir")
    latest_path = models_dir / "memory_latest.pth"
    remove_stale_temp_files(models_dir)
    if args.resume and not latest_path.is_file():
        raise UserError(f"--resume: nothing to resume, {latest_path} does not exist; drop --resume")
    changed = (resume_flags(args, given, load_memory(latest_path)[1].get("options", {}), RESUMED_FLAGS)
               if args.resume else None)
    check_border_margin(args.border_margin)
    set_memory_budget(args.max_memory)
    query_name = args.query_encoder
    read, auto = read_config(args)
    enhancer, _ = load_enhancer(args.weights, args.arch, args.embed_dim)
    enhancer.to(device).requires_grad_(False)
    encoder = build_query_encoder(query_name, enhancer, args.query_weights).to(device)
    config = memory_config(args, encoder.dim, read.top_k)
    train_pairs, val_pairs = training_split(args.train_dir, args.val_dir, args.val_percent)
    seed_everything(args.seed)
    log = RunLog(env_dir, True)
    cache = writable_dir(args.cache_dir or Path(args.save_dir) / "cache" / "frozen", "--cache_dir") / cache_key(
        args.weights, args.border_margin)
    train_passes = None
    if args.entries == "images" or auto:
        start = time.perf_counter()
        train_passes = cached_passes(enhancer, train_pairs, device, cache, args.border_margin, "train pairs")
        log.line(f"enhancer passes of {len(train_pairs)} training pairs ready in {time.perf_counter() - start:.0f} s "
                 f"(cache {cache})")
    if args.entries == "images":
        dataset = ImageEntries(image_queries(train_passes, train_pairs, encoder, query_name, device),
                               train_passes, config.pooling_size)
    else:
        dataset = WithIndex(PairedCrops(train_pairs, args.train_ps))
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=min(args.batch_size, len(dataset)),
                        sampler=RandomSampler(dataset, generator=generator), num_workers=args.train_workers,
                        worker_init_fn=ignore_stop_signals)

    memory = ExternalMemory(config, torch.Generator().manual_seed(args.seed)).to(device)
    head = QueryHead(encoder.dim).to(device) if args.learn_query else None
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr) if head is not None else None
    epoch, best = 0, {"mem_psnr": -math.inf, "epoch": -1}
    if args.resume:
        epoch, best = restore_run(latest_path, memory, head, optimizer, generator, query_name,
                                  enhancer_fingerprint(enhancer), args.weights)
    options = {**vars(args), "query_encoder": query_name, "memory": config.to_dict(),
               "read": {**read.to_checkpoint(), "strength": "auto"} if auto else read.to_checkpoint(),
               "enhancer": enhancer.config.to_dict(), "train_pairs": len(train_pairs),
               "val_pairs": [p.name for p in val_pairs], "device": str(device)}
    (env_dir / "options.yml").write_text(yaml.safe_dump(options, sort_keys=False))
    log.line(f"{'resuming at' if args.resume else 'starting'} epoch {epoch}: memory {config.mem_size} x "
             f"{config.key_dim} ({query_name} query{', learned head' if head else ''}, {args.entries} entries), "
             f"p = {config.pooling_size}, {len(train_pairs)} train / {len(val_pairs)} val pairs on {device}")
    if changed:
        log.line(changed)
    val = None
    if val_pairs:
        passes = cached_passes(enhancer, val_pairs, device, cache, args.border_margin, "validation pairs")
        val = ValidationSet(passes, image_queries(passes, val_pairs, encoder, query_name, device))
    else:
        log.line("no validation pairs: memory_best.pth will not be written")
    selects = not is_test_set(args.val_dir)
    if val is not None and not selects:
        log.line(f"--val_dir {args.val_dir} is a test set: validation here only reports its scores and never "
                 "selects a checkpoint (no memory_best.pth); drop --val_dir to select on pairs held out of "
                 "--train_dir")

    extra = {"enhancer_config": enhancer.config.to_dict(), "enhancer_weights": str(args.weights),
             "enhancer_fingerprint": enhancer_fingerprint(enhancer),
             "entries": args.entries, "border_margin": args.border_margin, "options": vars(args),
             "sources": sources_payload([pair.name for pair in train_pairs], [
                 fp.high for fp in train_passes] if train_passes is not None else [
                 to_uint8(read_pair(pair)[1]) for pair in train_pairs])}
    signals = StopSignals()  # SIGTERM/SIGINT: save after the batch under way, then exit 143/130
    position = MidEpoch(load_checkpoint_file(latest_path).get("in_epoch") if args.resume else None)
    stopped_at = ""
    while epoch < args.nepoch:
        counts = position.start_epoch(generator)
        matched, written, losses, done = counts["matched"], counts["written"], counts["losses"], 0
        for done, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False), start=1):
            if position.used_before(done):  # a resumed epoch: batches trained on before the stop
                continue
            if args.entries == "images":
                query, value, index = (t.to(device) for t in batch)
            else:
                low, high, index = (t.to(device) for t in batch)
                query, value = encoder(low), pooled_value(high, config.pooling_size)
            if head is not None:
                query = head(query)
                loss = threshold_triplet_loss(query, memory.key, memory.value, value, args.pos_thres, args.alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                query = query.detach()
            hits = memory.update(query, value, index)
            matched += int(hits.sum())
            written += len(hits)
            if signals.requested:
                break
        if signals.requested and done < len(loader):
            stopped_at = f"in epoch {epoch + 1} after batch {done} of {len(loader)}"
            log.line(f"stopping {stopped_at}: {signals.name} received; saving {latest_path}")
            save_checkpoint(latest_path, memory_payload(memory, epoch, query_name, head, {
                **extra, "read": read.to_checkpoint(), "best": best, "rng": torch.get_rng_state(), "sampler_rng": generator.get_state(),
                "head_optimizer": optimizer.state_dict() if optimizer is not None else None,
                "in_epoch": position.state(done, matched, written, losses)}))
            break
        epoch += 1
        used = int((memory.top_index >= 0).sum())
        log.line(f"epoch {epoch}: {matched}/{written} queries matched a slot, {used}/{config.mem_size} "
                 f"slots written" + (f", triplet loss {sum(losses) / len(losses):.4f}" if losses else ""))
        log.scalars(epoch, {"memory/slots_used": used, "memory/match_rate": matched / max(written, 1),
                            **({"train/triplet": sum(losses) / len(losses)} if losses else {})})
        if val is not None and (epoch % args.val_time == 0 or epoch == args.nepoch):
            m = val.evaluate(memory, head, read)
            log.line(f"epoch {epoch}: val ori PSNR {m['ori_psnr']:.3f} SSIM {m['ori_ssim']:.4f} | "
                     f"mem PSNR {m['mem_psnr']:.3f} SSIM {m['mem_ssim']:.4f}")
            log.scalars(epoch, {f"val/{k}": v for k, v in m.items()})
            if selects and m["mem_psnr"] > best["mem_psnr"]:
                best = {**m, "epoch": epoch}
                save_checkpoint(models_dir / "memory_best.pth", memory_payload(
                    memory, epoch, query_name, head, {**extra, "read": read.to_checkpoint(), "best": best}))
        state = {"best": best, "rng": torch.get_rng_state(), "sampler_rng": generator.get_state(),
                 "head_optimizer": optimizer.state_dict() if optimizer is not None else None}
        save_checkpoint(latest_path, memory_payload(memory, epoch, query_name, head,
                                                    {**extra, "read": read.to_checkpoint(), **state}))
        if signals.requested:
            stopped_at = f"after epoch {epoch}"
            break
    signals.restore()
    signals.raise_if_stopped(f"stopped by {signals.name} {stopped_at}; {latest_path} holds this step: "
                             "--resume continues")
    if auto:
        calibrate_final(memory, head, train_passes, train_pairs, encoder, query_name, read, models_dir,
                        val, log, device)
    elif val is not None and selects:
        log.line(f"finished: best val mem PSNR {best['mem_psnr']:.3f} at epoch {best['epoch']} "
                 f"(ori {best.get('ori_psnr', float('nan')):.3f}); memory in {models_dir}")
    report_cache(cache, args.clear_cache, log)
    log.close()


def report_cache(cache: Path, clear: bool, log: RunLog) -> None:
    """Say how much the cached enhancer passes take on disk, and delete them with --clear_cache."""
    files, size = cache_size(cache)
    if clear:
        shutil.rmtree(cache, ignore_errors=True)
        log.line(f"--clear_cache: removed {files} cached enhancer passes ({size / 2**30:.2f} GB) from {cache}")
    elif files:
        log.line(f"cached enhancer passes: {files} files, {size / 2**30:.2f} GB in {cache} (kept for the next "
                 "run on this enhancer; --clear_cache or deleting the folder removes them)")


def calibrate_final(memory: ExternalMemory, head: QueryHead | None, passes: list[FrozenPass],
                    pairs: list[ImagePair], encoder: torch.nn.Module, query_name: str, read: ReadSettings,
                    models_dir: Path, val: ValidationSet | None, log: RunLog, device: torch.device) -> None:
    """--strength auto: choose the strength on the training pairs (leave-one-out reads) and store
    it in memory_latest.pth, which is then also memory_best.pth (the validation split is only
    reported, it chooses nothing)."""
    queries = image_queries(passes, pairs, encoder, query_name, device)
    if head is not None:
        queries = head(queries).detach()
    strength, curve = calibrate_strength(memory, queries, [fp.ori for fp in passes], [fp.high for fp in passes],
                                         read)
    log.line("calibrated strength on the training pairs (leave-one-out mean PSNR): " +
             ", ".join(f"{s}: {v:.3f}" for s, v in curve.items()) + f" -> {strength}")
    final = dataclasses.replace(read, strength=strength)
    ckpt = torch.load(models_dir / "memory_latest.pth", map_location="cpu", weights_only=False)
    ckpt.update(read=final.to_checkpoint(), calibration={str(s): v for s, v in curve.items()})
    if val is not None:
        m = val.evaluate(memory, head, final)
        ckpt["best"] = {**m, "epoch": ckpt["epoch"]}
        log.line(f"finished: val ori PSNR {m['ori_psnr']:.3f} | mem PSNR {m['mem_psnr']:.3f} SSIM "
                 f"{m['mem_ssim']:.4f} at strength {strength}; memory in {models_dir}")
    for name in ("memory_latest.pth", "memory_best.pth"):
        save_checkpoint(models_dir / name, ckpt)


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(*parse_with_given(get_args_parser())))
