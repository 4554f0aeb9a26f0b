"""The enhancer trainer's batch sources, one interface for two ways to draw training crops:
`DeviceBatches` (crops drawn on the training device, `DeviceCrops`) and `LoaderBatches` (a
DataLoader over `PairedCrops`). Each gives an epoch's batches from a step on and the state that
--resume needs, so the training loop never asks where its crops come from."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dataset.device_crops import DeviceCrops
from dataset.paired_folder import PairedCrops
from utils.distributed import DistInfo
from utils.seed import restore_rng_state
from utils.signals import ignore_stop_signals

Batch = tuple[torch.Tensor, torch.Tensor]  # (low, high) crops, (B, 3, P, P)


class BatchSource(Protocol):
    """What the training loop draws its crops from."""

    on_device: bool  # crops drawn on the training device (no host sync needed to get a batch)
    iters_per_epoch: int
    held_bytes: int  # host memory the decoded training pairs take

    def epoch(self, e: int, skip: int) -> Iterator[Batch]:
        """The batches of epoch `e` from step `skip` on (skip > 0 only when resuming mid-epoch)."""

    def state_dict(self) -> dict[str, Any] | None:
        """The sampler's state for model_latest.pth, or None when it has none to save."""

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue where the checkpoint `ckpt` (model_latest.pth) stopped."""


class DeviceBatches:
    """Crops drawn on the device: the sampler's saved state stands where the run stopped, so a
    resumed epoch just draws its remaining batches."""

    on_device = True

    def __init__(self, crops: DeviceCrops, batch_size: int):
        self.crops, self.batch_size = crops, batch_size
        self.iters_per_epoch = crops.iters_per_epoch(batch_size)
        self.held_bytes = crops.nbytes if crops.device.type == "cpu" else 0

    def epoch(self, e: int, skip: int) -> Iterator[Batch]:
        return (self.crops.sample(self.batch_size) for _ in range(skip, self.iters_per_epoch))

    def state_dict(self) -> dict[str, Any]:
        return self.crops.state_dict()

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if "sampler" in ckpt:  # else a run resumed from the DataLoader path: fresh draws
            self.crops.load_state_dict(ckpt["sampler"])


class LoaderBatches:
    """A DataLoader over `PairedCrops`, reshuffled per epoch from --seed (or by the
    DistributedSampler). It saves no state: a resumed epoch draws the batches trained on before
    the stop again and skips them, then rank 0 goes back to the saved RNG state."""

    on_device = False

    def __init__(self, dataset: PairedCrops, batch_size: int, workers: int, seed: int,
                 info: DistInfo, pin_memory: bool):
        self.seed, self.rank, self.resume_rng = seed, info.rank, None
        self.generator = torch.Generator()
        self.sampler = (DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
                        if info.enabled else RandomSampler(dataset, generator=self.generator))
        self.loader = DataLoader(dataset, batch_size=batch_size // info.world_size, sampler=self.sampler,
                                 num_workers=workers, drop_last=True, pin_memory=pin_memory,
                                 persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)
        self.iters_per_epoch = len(self.loader)
        self.held_bytes = dataset.nbytes

    def epoch(self, e: int, skip: int) -> Iterator[Batch]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(e)
        else:
            self.generator.manual_seed(self.seed + e)
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator[Batch]:
        for step, batch in enumerate(self.loader):
            if step < skip:
                if step == skip - 1 and self.rank == 0 and self.resume_rng is not None:
                    restore_rng_state(self.resume_rng)  # skipped batches drew crops: back to the saved RNG
                continue
            yield batch

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.resume_rng = ckpt["rng"]
