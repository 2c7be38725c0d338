"""The training DataLoader: built once per run, its worker processes kept across epochs.

Worker processes hold a copy of the dataset made when they start, so the epoch (which picks
the flips and augmentations) cannot be set on the dataset between epochs; instead the sampler
yields (epoch, index) pairs and the dataset view sets the epoch in whichever process reads
the batch. The images are a function of (seed, epoch, index) as before, so the number of
workers never changes a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mtmim_cli.threads import usable_cores

MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """The loader workers per training process when `--workers` is not given: the cores this
    process may use, shared by the processes on this machine (torchrun's LOCAL_WORLD_SIZE),
    less one for the training process itself, at most 8."""
    cores = usable_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_DEFAULT_WORKERS, cores // local - 1))


class _Tagged(Sampler):
    """The sampler's indices as (epoch, index) pairs."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _EpochView(Dataset):
    """The dataset, addressed by (epoch, index) pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _at(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        self._at(key[0])
        return self.dataset[key[1]]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Any:
        self._at(keys[0][0])          # a batch never spans two epochs
        indices = [i for _, i in keys]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(indices)
        return [self.dataset[i] for i in indices]


class TrainLoader:
    """`epoch(e, start)` iterates this rank's batches of epoch e from sample `start` on, with
    the same worker processes every epoch (`close()` stops them)."""

    def __init__(self, dataset: Dataset, sampler: Any, batch_size: int, workers: int,
                 pin_memory: bool, seed: int) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.tagged = _Tagged(sampler)
        collate = getattr(dataset, "collate", None) or default_collate
        self.loader = DataLoader(_EpochView(dataset), batch_size=batch_size, sampler=self.tagged,
                                 num_workers=workers, drop_last=True, collate_fn=collate,
                                 pin_memory=pin_memory, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None,
                                 generator=torch.Generator().manual_seed(seed))

    def epoch(self, epoch: int, start: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch, start)
        self.tagged.epoch = epoch
        return iter(self.loader)

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
