"""A torch Dataset over one or more caches: crop, optional flip, (v - 127.5) / 128.

Items are `(image (3,112,W) float32, label int, age float (NaN unknown), index int)`.
Records whose status holds no face are left out. Labels are re-indexed 0..C-1 over
(namespace, identity name) pairs: the caches of one align job (e.g. its shards) share a
namespace, so a person split over shards is one class, while other caches' identities never
share a label (data/identities.py has the rule and the `identities` modes).

The horizontal flip (and the optional augmentation, data/augment.py) is a pure function of
(seed, epoch, index), not of a global RNG, so a resumed run and a run with worker processes
see exactly the same images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mtmim_cli.data.augment import Augment
from mtmim_cli.data.cache import IMAGE_SIZE, Cache
from mtmim_cli.data.identities import namespaces
from mtmim_cli.errors import MtmimError

MEAN, SCALE = 127.5, 128.0
NORMALISATION = "(v-127.5)/128"


def crop_columns(crop_width: int) -> slice:
    """The columns of the 112x112 alignment kept for a crop width (96: 8 off each side)."""
    if crop_width not in (112, 96):
        raise MtmimError(f"crop width {crop_width}: must be 112 or 96")
    off = (IMAGE_SIZE - crop_width) // 2
    return slice(off, off + crop_width)


def preprocess(images: np.ndarray | torch.Tensor, crop_width: int = 112) -> torch.Tensor:
    """uint8 (N,112,112,3) RGB -> float32 (N,3,112,W) normalised as the encoders expect."""
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected (N,112,112,3) images, got {tuple(x.shape)}")
    return preprocess_cropped(x[:, :, crop_columns(crop_width)])


def preprocess_cropped(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N,112,W,3) already cropped, uint8 or float in [0, 255] -> normalised float32 (N,3,112,W)."""
    # numpy, not torch: on a busy machine torch's thread pool makes small ops ~100x slower.
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = (x.astype(np.float32) - np.float32(MEAN)) / np.float32(SCALE)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _flip_bit(seed: int, epoch: int, index: int) -> bool:
    # splitmix64 of the triple: cheap, stateless, well mixed.
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
         + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return bool((z ^ (z >> 31)) & 1)


class CacheDataset(Dataset):
    def __init__(self, caches: Sequence[str | os.PathLike | Cache], train: bool,
                 crop_width: int = 112, seed: int = 0, augment: Augment | None = None,
                 identities: str = "auto") -> None:
        if not caches:
            raise MtmimError("no cache given")
        self.caches = [c if isinstance(c, Cache) else Cache(c) for c in caches]
        self.train = train
        self.augment = augment if augment else None
        self.crop = crop_columns(crop_width)
        self.crop_width = crop_width
        self.seed = seed
        self.epoch = 0
        space_of = namespaces(self.caches, identities)
        space_names = [sorted({n for c, s in zip(self.caches, space_of, strict=True) if s == k
                               for n in c.identity_names}) for k in range(max(space_of) + 1)]
        cache_of, record, keys = [], [], []
        for ci, cache in enumerate(self.caches):
            rows = np.flatnonzero(cache.usable)
            cache_of.append(np.full(len(rows), ci, np.int64))
            record.append(rows)
            names = np.asarray(space_names[space_of[ci]], dtype=object)
            in_space = np.searchsorted(names, np.asarray(cache.identity_names, dtype=object))
            keys.append(space_of[ci] * (1 << 40) + in_space[cache.identity[rows]])
        self.cache_of = np.concatenate(cache_of)
        self.record = np.concatenate(record)
        if len(self.record) == 0:
            raise MtmimError(f"{self.caches[0].path}: no usable image in the given caches")
        uniq, self.labels = np.unique(np.concatenate(keys), return_inverse=True)
        self.labels = self.labels.astype(np.int64)
        self.num_classes = len(uniq)
        first = {s: self.caches[space_of.index(s)].path.name for s in set(space_of)}
        self.class_names = [f"{first[k >> 40]}:{space_names[k >> 40][k & ((1 << 40) - 1)]}"
                            for k in uniq.tolist()]
        self.ages = np.concatenate([c.age[r] for c, r in zip(self.caches, record, strict=True)])

    def __len__(self) -> int:
        return len(self.record)

    def set_epoch(self, epoch: int) -> None:
        """Choose which flips this epoch uses (call before creating the DataLoader iterator)."""
        self.epoch = epoch

    def source(self, i: int) -> tuple[Cache, int]:
        """The cache and record index behind dataset item i."""
        return self.caches[self.cache_of[i]], int(self.record[i])

    def _view(self, i: int, image: np.ndarray) -> np.ndarray:
        """The crop (and this epoch's augmentation and flip) of one 112x112 image, HWC (uint8,
        or float32 when augmented)."""
        if self.train and self.augment is not None:
            image = self.augment(image, self.seed, self.epoch, i)
        img = image[:, self.crop]
        return img[:, ::-1] if self.train and _flip_bit(self.seed, self.epoch, i) else img

    def _meta(self, i: int) -> tuple[int, float, int]:
        return int(self.labels[i]), float(self.ages[i]), int(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, float, int]:
        cache, rec = self.source(i)
        x = preprocess_cropped(self._view(i, cache.image(rec))[None])[0]
        return (x, *self._meta(i))

    def __getitems__(self, indices: Sequence[int]) -> list:
        # DataLoader fetches a whole batch through this: one normalisation for the batch.
        # Images are read one by one: h5py's fancy-index read of a list of rows is ~20x
        # slower than single-row reads of the one-image chunks.
        idx = np.asarray(indices, dtype=np.int64)
        views = np.stack([self._view(int(i), self.caches[self.cache_of[i]].image(self.record[i]))
                          for i in idx])
        x = preprocess_cropped(views)
        items = _Batch((x[k], *self._meta(int(i))) for k, i in enumerate(idx))
        items.stacked = (x, torch.from_numpy(self.labels[idx]),
                         torch.from_numpy(self.ages[idx].astype(np.float32)), torch.from_numpy(idx))
        return items

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DataLoader collate_fn: the batch `__getitems__` already stacked, else the default."""
        if isinstance(items, _Batch):
            return items.stacked
        return default_collate(items)


class _Batch(list):
    """The items of one batch, plus the same batch already stacked (saves a copy)."""

    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
