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
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from dataset.paired_folder import PairedCrops, WithIndex, read_pair
from dataset.pairing import ImagePair, is_test_set, training_split
from dataset.scene_groups import input_scenes, scene_groups
from models.abstention import fit_abstention, scene_match
from models.calibration import calibrate_strength
from models.fast import budget
from models.frozen_pass import FrozenPass, cache_key, cache_size, cached_passes, describe_passes
from models.inference import check_border_margin
from models.loading import check_memory_flags, enhancer_fingerprint, load_enhancer, load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig, pooled_value
from models.provenance import sources_payload
from models.query import ENHANCER_DESCRIPTORS, QueryHead, build_query_encoder, threshold_triplet_loss
from models.read_settings import ReadSettings
from options import (
    HelpFormatter,
    add_border_arg,
    add_device_arg,
    add_enhancer_args,
    add_max_memory_arg,
    add_memory_args,
    add_memory_build_args,
    add_split_arg,
    set_memory_budget,
)
from utils.allocator import tune_allocator
from utils.bundled import BUNDLED_ENHANCER
from utils.checkpoint import load_checkpoint_file
from utils.device import resolve_device
from utils.errors import UserError, run_cli, writable_dir
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8
from utils.mid_epoch import MidEpoch
from utils.report import mean_scores, score
from utils.resume import parse_with_given, resume_flags
from utils.run_files import Checkpoint, RunFiles
from utils.run_log import RunLog
from utils.seed import seed_everything
from utils.signals import StopSignals, ignore_stop_signals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train EMNet's external memory on a frozen enhancer. The defaults are "
                                "the release's setting (crop entries, 9000 slots, 40 epochs), with the enhancer query "
                                "instead of its ImageNet ResNet-18. "
                                "Recommended, chosen by the K-fold study (README, 'Does the memory help?') and set "
                                "by train_memory_script.sh: --entries images --query_encoder enhancer_levels "
                                "--mem_size 1024 --nepoch 1 --testing_top_k 1 --abstain scene.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--env", default="memory_lolv1", help="run name; outputs go to SAVE_DIR/ENV")
    g.add_argument("--save_dir", default="./log", help="root folder of all runs")
    g.add_argument("--weights", "--pretrain_weights", dest="weights", default=BUNDLED_ENHANCER,
                   help="the frozen enhancer (--pretrain_weights: the original's name)")
    add_enhancer_args(g, defaults_from_checkpoint=True)
    add_border_arg(g)
    add_data_args(p.add_argument_group("data"))
    g = p.add_argument_group("memory")
    add_memory_build_args(g)
    add_memory_args(g, training=True)
    p.set_defaults(query_encoder="resnet18")  # the original's query; test.py takes the memory's
    add_update_args(g)
    g = p.add_argument_group("schedule")
    g.add_argument("--nepoch", type=int, default=40, help="passes over the training pairs")
    g.add_argument("--val_time", type=int, default=5, help="validate every N epochs")
    add_max_memory_arg(g)
    g.add_argument("--resume", action="store_true", help="continue from models/memory_latest.pth")
    add_device_arg(g)
    g.add_argument("--seed", type=int, default=1234, help="seed of crops, ages and the query head")
    return p


def add_data_args(g: argparse._ArgumentGroup) -> None:
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


def add_update_args(g: argparse._ArgumentGroup) -> None:
    """How the memory is written (the update rule, --entries) and the optional query head."""
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
    config = MemoryConfig(mem_size=args.mem_size, key_dim=key_dim, pooling_size=p, threshold=args.thres)
    check_memory_flags(args.mem_size, args.K_feat_dim, args.V_feat_dim, config,
                       f"the {args.query_encoder} query width and p = {p} (--pooling_size)")
    return config


def image_queries(passes: list[FrozenPass], pairs: list[ImagePair], encoder: torch.nn.Module,
                  query_name: str, device: torch.device) -> torch.Tensor:
    """Whole-image queries (N, D) as test.py computes them: enhancer descriptors from the cached
    pass's feature statistics, other encoders on the low image."""
    if query_name in ENHANCER_DESCRIPTORS:
        return describe_passes(passes, query_name).to(device)
    return torch.cat([encoder(image_to_tensor(read_pair(pair)[0]).to(device)) for pair in pairs])


class ValidationSet:
    """Validation pairs through the frozen enhancer (cached passes) with their queries: the
    memory's ori and mem scores on them, read as test.py reads (with `scenes`, their input scene
    vectors, also a read that abstains)."""

    def __init__(self, passes: list[FrozenPass], queries: torch.Tensor, scenes: np.ndarray | None = None):
        self.passes, self.query, self.scenes = passes, queries, scenes
        ori_rows = [{f"ori_{k}": v for k, v in score(to_uint8(tensor_to_image(fp.ori.float())), fp.high).items()}
                    for fp in passes]
        self.ori_means = mean_scores(ori_rows, ["ori_psnr", "ori_ssim"])  # the enhancer is frozen

    @torch.no_grad()
    def evaluate(self, memory: ExternalMemory, head: QueryHead | None, read: ReadSettings,
                 known: np.ndarray | None = None) -> dict[str, float]:
        """Mean ori and mem scores; a read that abstains needs the memory's `known` input scenes."""
        q = self.query.to(memory.key.device)
        q = head(q) if head is not None else q
        recalled = read.recall(memory, q).cpu()
        corrected = [True] * len(self.passes)
        if read.abstains:
            top1 = memory.ranked(q, 1)[0][:, 0].cpu().double().numpy()
            corrected = read.corrects(top1, scene_match(self.scenes, known)).tolist()
        p = memory.config.pooling_size
        mem_rows = [{f"mem_{k}": v for k, v in score(to_uint8(tensor_to_image(
            read.correct(fp.ori[None].float(), r[None], p) if on else fp.ori[None].float())), fp.high).items()}
            for fp, r, on in zip(self.passes, recalled, corrected)]
        means = {**self.ori_means, **mean_scores(mem_rows, ["mem_psnr", "mem_ssim"])}
        return {**means, "mem_corrected": float(sum(corrected))} if read.abstains else means


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


def open_run(args: argparse.Namespace, given: set[str] | None) -> tuple[torch.device, RunFiles, str | None]:
    """The device and the run's files; with --resume the run's flags not given again come from
    memory_latest.pth (returns the line naming flags given with other values)."""
    device = resolve_device(args.device)
    files = RunFiles(args.save_dir, args.env, "memory")
    changed = None
    if args.resume:
        files.require_latest()
        changed = resume_flags(args, given, load_memory(files.latest)[1].get("options", {}), RESUMED_FLAGS)
    check_border_margin(args.border_margin)
    set_memory_budget(args.max_memory)
    return device, files, changed


def frozen_query(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The frozen enhancer and the query encoder (--query_encoder) the memory is keyed by."""
    enhancer, _ = load_enhancer(args.weights, args.arch, args.embed_dim)
    enhancer.to(device).requires_grad_(False)
    return enhancer, build_query_encoder(args.query_encoder, enhancer, args.query_weights).to(device)


def training_entries(args: argparse.Namespace, enhancer: torch.nn.Module, encoder: torch.nn.Module,
                     pairs: list[ImagePair], cache: Path, config: MemoryConfig, auto: bool, log: RunLog,
                     device: torch.device) -> tuple[torch.utils.data.Dataset, list[FrozenPass] | None]:
    """What the memory is written from (--entries), and the enhancer passes of the training pairs
    when image entries, --strength auto or --abstain need them."""
    passes = None
    if args.entries == "images" or auto or args.abstain != "off":
        start = time.perf_counter()
        passes = cached_passes(enhancer, pairs, device, cache, args.border_margin, "train pairs")
        log.line(f"enhancer passes of {len(pairs)} training pairs ready in {time.perf_counter() - start:.0f} s "
                 f"(cache {cache})")
    if args.entries == "images":
        return ImageEntries(image_queries(passes, pairs, encoder, args.query_encoder, device), passes,
                            config.pooling_size), passes
    crops = PairedCrops(pairs, args.train_ps)
    if passes is None:  # before the first forward: validation's budget counts from here, less the crops' pairs
        budget.measure_baseline(crops.nbytes)
    return WithIndex(crops), passes


def validation_set(args: argparse.Namespace, enhancer: torch.nn.Module, encoder: torch.nn.Module,
                   pairs: list[ImagePair], cache: Path, files: RunFiles, log: RunLog,
                   device: torch.device) -> ValidationSet | None:
    """The validation pairs through the frozen enhancer (None without any); says in the log
    what validation will and will not do."""
    val = None
    if pairs:
        passes = cached_passes(enhancer, pairs, device, cache, args.border_margin, "validation pairs")
        val = ValidationSet(passes, image_queries(passes, pairs, encoder, args.query_encoder, device),
                            input_scenes(pairs) if args.abstain != "off" else None)
    else:
        log.line("no validation pairs: memory_best.pth will not be written")
    if val is not None and is_test_set(args.val_dir):
        log.line(files.test_set_line(args.val_dir))
    return val


def checkpoint_extra(args: argparse.Namespace, enhancer: torch.nn.Module, pairs: list[ImagePair],
                     passes: list[FrozenPass] | None) -> dict:
    """What every checkpoint of the run stores beside the memory: the enhancer that fills it
    (test.py refuses another), the run's flags and the training images' names, thumbnails and
    input scenes (for the abstention rule)."""
    highs = [fp.high for fp in passes] if passes is not None else [to_uint8(read_pair(pair)[1]) for pair in pairs]
    return {"enhancer_config": enhancer.config.to_dict(), "enhancer_weights": str(args.weights),
            "enhancer_fingerprint": enhancer_fingerprint(enhancer),
            "entries": args.entries, "border_margin": args.border_margin, "options": vars(args),
            "sources": sources_payload([pair.name for pair in pairs], highs, input_scenes(pairs))}


class MemoryTrainer:
    """The epochs of one call: write every batch into the memory (training the query head with
    --learn_query), validate, checkpoint; a stop signal saves after the batch under way."""

    def __init__(self, args: argparse.Namespace, memory: ExternalMemory, head: QueryHead | None,
                 optimizer: torch.optim.Optimizer | None, encoder: torch.nn.Module, read: ReadSettings,
                 data: tuple[DataLoader, torch.Generator], val: ValidationSet | None, extra: dict,
                 files: RunFiles, best: dict, log: RunLog, device: torch.device, signals: StopSignals):
        self.args, self.memory, self.head, self.optimizer, self.encoder = args, memory, head, optimizer, encoder
        self.read, (self.loader, self.generator), self.val, self.extra = read, data, val, extra
        self.files, self.best, self.log, self.device = files, best, log, device
        self.selects = not is_test_set(args.val_dir)
        self.signals = signals  # SIGTERM/SIGINT in the loop: save after the batch under way, then exit 143/130
        self.position = MidEpoch(load_checkpoint_file(self.files.latest).get("in_epoch") if args.resume else None)

    def train(self, epoch: int) -> None:
        """Epochs from `epoch` to --nepoch, or until a stop signal (then exits 143/130)."""
        stopped_at = ""
        with self.signals.deferred():
            while epoch < self.args.nepoch:
                counts, done = self.train_epoch(epoch)
                if self.signals.requested and done < len(self.loader):
                    stopped_at = f"in epoch {epoch + 1} after batch {done} of {len(self.loader)}"
                    self.log.line(f"stopping {stopped_at}: {self.signals.name} received; saving {self.files.latest}")
                    self.save(epoch, in_epoch=self.position.state(done, **counts))
                    break
                epoch += 1
                self.end_epoch(epoch, counts)
                if self.signals.requested:
                    stopped_at = f"after epoch {epoch}"
                    break
        self.signals.raise_if_stopped(f"stopped by {self.signals.name} {stopped_at}; {self.files.latest} holds "
                                      "this step: --resume continues")

    def train_epoch(self, epoch: int) -> tuple[dict, int]:
        """Epoch `epoch + 1` (epochs are numbered from 1, `epoch` counts those completed): one pass
        over the loader (the rest of a resumed epoch); its counts and batches done."""
        counts, done = self.position.start_epoch(self.generator), 0
        for done, batch in enumerate(tqdm(self.loader, desc=f"epoch {epoch + 1}", leave=False), start=1):
            if self.position.used_before(done):  # a resumed epoch: batches trained on before the stop
                continue
            self.update(batch, counts)
            if self.signals.requested:
                break
        return counts, done

    def update(self, batch: tuple, counts: dict) -> None:
        """Write one batch into the memory (the update rule), after a step of the query head."""
        if self.args.entries == "images":
            query, value, index = (t.to(self.device) for t in batch)
        else:
            low, high, index = (t.to(self.device) for t in batch)
            query, value = self.encoder(low), pooled_value(high, self.memory.config.pooling_size)
        if self.head is not None:
            query = self.head(query)
            loss = threshold_triplet_loss(query, self.memory.key, self.memory.value, value, self.args.pos_thres,
                                          self.args.alpha)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            counts["losses"].append(loss.item())
            query = query.detach()
        hits = self.memory.update(query, value, index)
        counts["matched"] += int(hits.sum())
        counts["written"] += len(hits)

    def end_epoch(self, epoch: int, counts: dict) -> None:
        """Log the epoch, validate when due (keeping memory_best.pth), save memory_latest.pth."""
        losses, args = counts["losses"], self.args
        used = int((self.memory.top_index >= 0).sum())
        self.log.line(f"epoch {epoch}: {counts['matched']}/{counts['written']} queries matched a slot, "
                      f"{used}/{self.memory.config.mem_size} slots written"
                      + (f", triplet loss {sum(losses) / len(losses):.4f}" if losses else ""))
        self.log.scalars(epoch, {"memory/slots_used": used, "memory/match_rate": counts["matched"] / max(counts["written"], 1),
                                 **({"train/triplet": sum(losses) / len(losses)} if losses else {})})
        best = False
        if self.val is not None and (epoch % args.val_time == 0 or epoch == args.nepoch):
            m = self.val.evaluate(self.memory, self.head, self.read)
            self.log.line(f"epoch {epoch}: val ori PSNR {m['ori_psnr']:.3f} SSIM {m['ori_ssim']:.4f} | "
                          f"mem PSNR {m['mem_psnr']:.3f} SSIM {m['mem_ssim']:.4f}")
            self.log.scalars(epoch, {f"val/{k}": v for k, v in m.items()})
            best = self.selects and m["mem_psnr"] > self.best["mem_psnr"]
            if best:
                self.best = {**m, "epoch": epoch}
        self.save(epoch, best)

    def save(self, epoch: int, best: bool = False, **more: Any) -> None:
        """memory_latest.pth (with `best` also memory_best.pth): the memory and how it reads; the
        latest file also what --resume needs (`more`: where in the epoch a stop left it)."""
        model = memory_payload(self.memory, epoch, self.args.query_encoder, self.head,
                               {**self.extra, "read": self.read.to_checkpoint(), "best": self.best})
        self.files.save(Checkpoint(model, {
            "rng": torch.get_rng_state(), "sampler_rng": self.generator.get_state(),
            "head_optimizer": self.optimizer.state_dict() if self.optimizer is not None else None, **more}), best)


def main(args: argparse.Namespace, given: set[str] | None = None) -> None:
    """Train; `given` (from `parse_with_given`) lets --resume take the flags not given again from
    memory_latest.pth (RESUMED_FLAGS)."""
    with StopSignals(at_once=True) as signals:  # before any work: a signal stops the start-up at once
        run_training(args, given, signals)


def run_training(args: argparse.Namespace, given: set[str] | None, signals: StopSignals) -> None:
    """`main`'s run, under its stop signals."""
    device, files, changed = open_run(args, given)
    read, auto = read_config(args)
    enhancer, encoder = frozen_query(args, device)
    config = memory_config(args, encoder.dim, read.top_k)
    train_pairs, val_pairs = training_split(args.train_dir, args.val_dir, args.val_percent)
    seed_everything(args.seed)
    log = files.open_log()
    cache = writable_dir(args.cache_dir or Path(args.save_dir) / "cache" / "frozen", "--cache_dir") / cache_key(
        args.weights, args.border_margin)
    dataset, train_passes = training_entries(args, enhancer, encoder, train_pairs, cache, config, auto, log, device)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, batch_size=min(args.batch_size, len(dataset)),
                        sampler=RandomSampler(dataset, generator=generator), num_workers=args.train_workers,
                        worker_init_fn=ignore_stop_signals)

    memory = ExternalMemory(config, torch.Generator().manual_seed(args.seed)).to(device)
    head = QueryHead(encoder.dim).to(device) if args.learn_query else None
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr) if head is not None else None
    epoch, best = 0, {"mem_psnr": -math.inf, "epoch": -1}
    if args.resume:
        epoch, best = restore_run(files.latest, memory, head, optimizer, generator,
                                  args.query_encoder, enhancer_fingerprint(enhancer), args.weights)
    files.write_options(run_options(args, config, read, auto, enhancer, (train_pairs, val_pairs), device))
    log.line(f"{'resuming' if args.resume else 'starting'} at epoch {epoch + 1}: memory {config.mem_size} x "
             f"{config.key_dim} ({args.query_encoder} query{', learned head' if head else ''}, {args.entries} "
             f"entries), p = {config.pooling_size}, {len(train_pairs)} train / {len(val_pairs)} val pairs on {device}")
    if changed:
        log.line(changed)
    val = validation_set(args, enhancer, encoder, val_pairs, cache, files, log, device)

    trainer = MemoryTrainer(args, memory, head, optimizer, encoder, read, (loader, generator), val,
                            checkpoint_extra(args, enhancer, train_pairs, train_passes), files, best, log, device,
                            signals)
    trainer.train(epoch)
    if auto or args.abstain != "off":
        finish_read(args, memory, head, train_passes, train_pairs, encoder, read, files, val, log, device)
    elif val is not None and trainer.selects:
        log.line(f"finished: best val mem PSNR {trainer.best['mem_psnr']:.3f} at epoch {trainer.best['epoch']} "
                 f"(ori {trainer.best.get('ori_psnr', float('nan')):.3f}); memory in {files.models_dir}")
    report_cache(cache, args.clear_cache, log)
    log.close()


def run_options(args: argparse.Namespace, config: MemoryConfig, read: ReadSettings, auto: bool,
                enhancer: torch.nn.Module, pairs: tuple[list, list], device: torch.device) -> dict[str, Any]:
    """options.yml: the flags and what the run made of them ("auto" strength until calibrated)."""
    train_pairs, val_pairs = pairs
    stored_read = {**read.to_checkpoint(), "strength": "auto"} if auto else read.to_checkpoint()
    options = {**vars(args), "query_encoder": args.query_encoder, "memory": config.to_dict(), "read": stored_read,
               "enhancer": enhancer.config.to_dict(), "train_pairs": len(train_pairs),
               "val_pairs": [p.name for p in val_pairs], "device": str(device)}
    return options


def report_cache(cache: Path, clear: bool, log: RunLog) -> None:
    """Say how much the cached enhancer passes take on disk, and delete them with --clear_cache."""
    files, size = cache_size(cache)
    if clear:
        shutil.rmtree(cache, ignore_errors=True)
        log.line(f"--clear_cache: removed {files} cached enhancer passes ({size / 2**30:.2f} GB) from {cache}")
    elif files:
        log.line(f"cached enhancer passes: {files} files, {size / 2**30:.2f} GB in {cache} (kept for the next "
                 "run on this enhancer; --clear_cache or deleting the folder removes them)")


def finish_read(args: argparse.Namespace, memory: ExternalMemory, head: QueryHead | None,
                passes: list[FrozenPass], pairs: list[ImagePair], encoder: torch.nn.Module, read: ReadSettings,
                files: RunFiles, val: ValidationSet | None, log: RunLog, device: torch.device) -> None:
    """--strength auto and --abstain: fit the read on the training pairs and store it in
    memory_latest.pth, which is then also memory_best.pth (the validation split is only reported,
    it chooses nothing). The strength is calibrated first (leave-one-out reads), then the
    abstention bounds for that strength (reads with the pair's own scene group hidden)."""
    queries = image_queries(passes, pairs, encoder, args.query_encoder, device)
    if head is not None:
        queries = head(queries).detach()
    ori, high = [fp.ori for fp in passes], [fp.high for fp in passes]
    final, ckpt = read, torch.load(files.latest, map_location="cpu", weights_only=False)
    if args.strength == "auto":
        strength, curve = calibrate_strength(memory, queries, ori, high, read)
        log.line("calibrated strength on the training pairs (leave-one-out mean PSNR): " +
                 ", ".join(f"{s}: {v:.3f}" for s, v in curve.items()) + f" -> {strength}")
        final = dataclasses.replace(read, strength=strength)
        ckpt["calibration"] = {str(s): v for s, v in curve.items()}
    if args.abstain != "off":
        groups = scene_groups(high)
        final, fit = fit_abstention(args.abstain, memory, queries.cpu(), groups, ckpt["sources"]["scenes"].numpy(),
                                    ori, high, final)
        log.line(f"abstention ({args.abstain}) fitted on {fit['unseen_reads']} training pairs read as unseen scenes "
                 f"({groups.max() + 1} scene groups): min_score {fit['min_score']}, min_scene {fit['min_scene']}; "
                 f"it corrects {fit['corrected']} of them (mean gain {fit['mean_gain_all']:+.3f} dB correcting all, "
                 f"{fit['mean_gain_with_rule']:+.3f} dB with the rule)")
        ckpt["abstention_fit"] = fit
    ckpt["read"] = final.to_checkpoint()
    if val is not None:
        m = val.evaluate(memory, head, final, ckpt["sources"]["scenes"].numpy())
        ckpt["best"] = {**m, "epoch": ckpt["epoch"]}
        corrected = f", corrected {m['mem_corrected']:.0f}/{len(val.passes)}" if final.abstains else ""
        log.line(f"finished: val ori PSNR {m['ori_psnr']:.3f} | mem PSNR {m['mem_psnr']:.3f} SSIM "
                 f"{m['mem_ssim']:.4f} at strength {final.strength_flag}{corrected}; memory in {files.models_dir}")
    files.save(Checkpoint(ckpt), best=True)


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(*parse_with_given(get_args_parser())))
