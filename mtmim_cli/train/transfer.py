"""Transfer tools for fine-tuning a pretrained encoder on a small set (issue 10).

- `EncoderPlan`: which part of the encoder trains. A trunk frozen through a named stage
  (always in eval mode, no gradient), frozen BatchNorm, a head warm-up during which the whole
  encoder is out of the optimiser (no gradient, eval mode, and so no optimiser state until
  its release), and the L2-SP anchor (weight decay toward the initial weights).
- `TrainingSet`: the items a fine-tune trains on: a CacheDataset's usable records minus the
  left-out ones (a leave-one-out probe, validation identities), with replay rows from a
  general-face cache (their own classes, ages unknown), served either as images or as the
  frozen trunk's cached activations (`trunk_activations`), mirror view picked by the same
  seeded flip bit as the image path.
- `ReplaySampler`: every global batch holds a fixed share of replay rows.
- `class_mean_centres`: margin-head class centres started at each class's mean embedding.
- `validation_identities`: a seeded split of identities carved out of the training cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset, Sampler

from mtmim_cli.atomic import atomic_write
from mtmim_cli.data.dataset import CacheDataset, _flip_bit, preprocess_cropped
from mtmim_cli.errors import MtmimError
from mtmim_cli.progress import make_progress
from mtmim_cli.train.finetune_options import ACTIVATION_DTYPES, FREEZE_BN


# ---------------------------------------------------------------------------------------
class EncoderPlan:
    """How the encoder trains; the objective calls `begin_step`, `set_modes`, `forward` and
    `penalty`.

    - `freeze_through`: the encoder's stages up to and including this one (its `stages()`)
      form a trunk that never trains and always runs in eval mode; the rest (the tail) trains.
    - `freeze_bn`: "stats" keeps every BatchNorm of the encoder in eval mode (running
      statistics fixed, affine weight and bias still trained); "all" also freezes the affine
      parameters; "off" trains BatchNorm as usual.
    - `warmup_steps`: for the first steps the trainable encoder parameters have
      requires_grad False (no gradient computed, so Adam holds no state for them until
      release: they start with fresh moments) and the whole encoder runs in eval mode
      (BatchNorm statistics do not move); the heads fit meanwhile.
    - `l2sp`: the penalty (alpha/2) * sum ||w - w0||^2 over the trainable encoder parameters,
      w0 their initial values (L2-SP, Li et al. 2018): decay toward the pretrained weights.
    """

    def __init__(self, encoder: nn.Module, *, freeze_through: str | None = None,
                 freeze_bn: str = "off", warmup_steps: int = 0, l2sp: float = 0.0) -> None:
        if freeze_bn not in FREEZE_BN:
            raise MtmimError(f"--freeze-bn {freeze_bn}: choose from {', '.join(FREEZE_BN)}")
        if warmup_steps < 0:
            raise MtmimError(f"--head-warmup-steps {warmup_steps}: must be >= 0")
        if l2sp < 0:
            raise MtmimError(f"--l2sp {l2sp}: must be >= 0")
        self.encoder, self.freeze_through, self.freeze_bn = encoder, freeze_through, freeze_bn
        self.warmup_steps, self.l2sp = int(warmup_steps), float(l2sp)
        trunk, _ = self.split()
        frozen = {id(p) for m in trunk for p in m.parameters()}
        if freeze_bn == "all":
            frozen |= {id(p) for m in encoder.modules() if isinstance(m, _BatchNorm)
                       for p in m.parameters()}
        # Parameters the encoder itself fixes (iresnet's output BN scale) stay fixed. Kept by
        # name, not by object: a module swapped in later (SyncBatchNorm) brings new ones.
        self.names = [n for n, p in encoder.named_parameters() if p.requires_grad and id(p) not in frozen]
        kept = set(self.names)
        for n, p in encoder.named_parameters():
            if n not in kept:
                p.requires_grad_(False)
        self.anchor = ({n: p.detach().clone() for n, p in encoder.named_parameters() if n in kept}
                       if self.l2sp > 0 else {})
        self._released: bool | None = None
        self.begin_step(0)

    @property
    def trainable(self) -> list[nn.Parameter]:
        """The encoder parameters that train (after the warm-up), as the encoder holds them now."""
        params = dict(self.encoder.named_parameters())
        return [params[n] for n in self.names]

    def split(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(trunk, tail) module lists, read from the encoder each time so a module swapped in
        later (SyncBatchNorm conversion) is the one used."""
        if self.freeze_through is None:
            return [], [self.encoder]
        from mtmim_cli.models.backbones import split_stages

        if not hasattr(self.encoder, "stages"):
            raise MtmimError(f"--freeze-through {self.freeze_through}: this encoder has no named stages")
        return split_stages(self.encoder, self.freeze_through)

    @property
    def released(self) -> bool:
        return bool(self._released)

    def begin_step(self, step: int) -> bool:
        """Put the encoder in its state for `step`; True when that changed which parameters
        train (the caller then re-applies train/eval modes and re-wraps DDP)."""
        released = step >= self.warmup_steps
        if released == self._released:
            return False
        self._released = released
        for p in self.trainable:
            p.requires_grad_(released)
        return True

    def set_modes(self) -> None:
        """After Module.train(True): eval mode for what must not update running statistics."""
        if not self.released:
            self.encoder.eval()
            return
        trunk, _ = self.split()
        for m in trunk:
            m.eval()
        if self.freeze_bn != "off":
            for m in self.encoder.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()

    def trunk_forward(self, images: Tensor) -> Tensor:
        trunk, _ = self.split()
        h = images
        with torch.no_grad():
            for m in trunk:
                h = m(h)
        return h

    def forward(self, inputs: Tensor, activations: bool = False) -> Tensor:
        """The encoder's output for images, or for the trunk's activations of them."""
        _, tail = self.split()
        h = inputs if activations else self.trunk_forward(inputs)
        for m in tail:
            h = m(h)
        return h

    def penalty(self) -> Tensor | None:
        """The L2-SP term (None when off); zero, without a graph, during the warm-up."""
        if not self.anchor:
            return None
        params = self.trainable
        if not self.released:
            return params[0].new_zeros(())
        device = params[0].device
        if next(iter(self.anchor.values())).device != device:
            self.anchor = {n: a.to(device) for n, a in self.anchor.items()}
        total = sum(((p.float() - self.anchor[n].float()) ** 2).sum()
                    for n, p in zip(self.names, params, strict=True))
        return 0.5 * self.l2sp * total


# ---------------------------------------------------------------------------------------
class TrainingSet(Dataset):
    """The fine-tuning items over a CacheDataset `base` (whose caches are the training caches
    followed by the replay caches): the base items `keep` (training rows first, then replay
    rows), labels renumbered 0..C-1 over the kept items (training identities first), ages of
    replay rows unknown (NaN: no age loss). With `activations` (an array (len(base), 2, ...)
    of the frozen trunk's outputs for each base item and its mirror) items are those
    activations instead of images; the view is the flip bit the image path would use.

    Items are `(input, label, age, base index)` like CacheDataset's."""

    def __init__(self, base: CacheDataset, keep: np.ndarray, replay: np.ndarray | None = None,
                 replay_ratio: float = 0.0, activations: np.ndarray | None = None) -> None:
        self.base = base
        keep = np.asarray(keep, np.int64)
        is_replay = np.zeros(len(keep), bool) if replay is None else np.asarray(replay, bool)[keep]
        order = np.argsort(is_replay, kind="stable")     # training rows first, then replay
        self.keep = keep[order]
        self.n_replay = int(is_replay.sum())
        self.n_target = len(self.keep) - self.n_replay
        if self.n_target == 0:
            raise MtmimError(f"{base.caches[0].path}: no training image left")
        if replay_ratio and not self.n_replay:
            raise MtmimError("--replay-ratio: the replay cache holds no usable image")
        self.replay_ratio = float(replay_ratio)
        old = base.labels[self.keep]
        uniq, self.labels = np.unique(old, return_inverse=True)   # base labels sort by cache
        self.labels = self.labels.astype(np.int64)
        self.num_classes = len(uniq)
        # Base labels order identities by cache, so the replay identities come last.
        self.replay_classes_from = len(np.unique(self.labels[: self.n_target]))
        self.ages = base.ages[self.keep].astype(np.float64)
        self.ages[self.n_target:] = np.nan
        self.activations: np.ndarray | None = None
        if activations is not None:
            self.use_activations(activations)

    def use_activations(self, activations: np.ndarray) -> None:
        """Serve the frozen trunk's activations (len(base), 2, ...) instead of images."""
        if len(activations) != len(self.base):
            raise MtmimError(f"activations for {len(activations)} images, not {len(self.base)}")
        self.activations = activations

    def __len__(self) -> int:
        return len(self.keep)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def _inputs(self, idx: np.ndarray) -> Tensor:
        base_idx = self.keep[idx]
        if self.activations is None:
            return self.base.collate(self.base.__getitems__(base_idx.tolist()))[0]
        views = [int(self.base.train and _flip_bit(self.base.seed, self.base.epoch, int(b)))
                 for b in base_idx]
        rows = np.stack([self.activations[b, v] for b, v in zip(base_idx, views, strict=True)])
        return torch.from_numpy(rows).float()   # torch widens float16 faster than numpy

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx = np.asarray(indices, np.int64)
        return (self._inputs(idx), torch.from_numpy(self.labels[idx]),
                torch.from_numpy(self.ages[idx].astype(np.float32)), torch.from_numpy(self.keep[idx]))

    def __getitem__(self, i: int):
        x, y, a, b = self.__getitems__([i])
        return x[0], int(y[0]), float(a[0]), int(b[0])

    @staticmethod
    def collate(batch):
        """`__getitems__` returns the batch stacked already."""
        return batch

    def views(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Items `idx` and their mirrors, never augmented (for class centres)."""
        base_idx = self.keep[np.asarray(idx, np.int64)]
        if self.activations is not None:
            a = torch.from_numpy(np.asarray(self.activations[base_idx])).float()
            return a[:, 0], a[:, 1]
        x = _plain_images(self.base, base_idx)
        return x, torch.flip(x, dims=[3])

    def make_sampler(self, global_batch: int, world: int, rank: int, seed: int) -> Sampler | None:
        """The loop's sampler when replay rows are mixed in (None: the loop's own)."""
        if not self.n_replay or not self.replay_ratio:
            return None
        return ReplaySampler(self.n_target, self.n_replay, global_batch, self.replay_ratio,
                             world, rank, seed)


def _plain_images(base: CacheDataset, base_idx: np.ndarray) -> Tensor:
    """Crops of the base items as the encoder takes them, no flip, no augmentation."""
    crops = np.stack([base.caches[base.cache_of[b]].image(int(base.record[b]))[:, base.crop]
                      for b in base_idx])
    return preprocess_cropped(crops)


class ReplaySampler(Sampler[int]):
    """Global batches of `global_batch` items of which round(ratio * batch) are replay items
    (positions n_target .. n_target + n_replay - 1) and the rest training items: the training
    items in a seeded permutation per epoch (an epoch = one pass over them), the replay items
    in a seeded endless stream of permutations that continues across epochs. Each batch is
    shuffled (seeded) and dealt to the ranks like the loop's EpochSampler, so every rank
    holds about the same share of replay rows and a resumed run sees the same batches."""

    def __init__(self, n_target: int, n_replay: int, global_batch: int, ratio: float,
                 world: int, rank: int, seed: int) -> None:
        if not 0 < ratio < 1:
            raise MtmimError(f"--replay-ratio {ratio}: must be between 0 and 1")
        self.n_target, self.n_replay = n_target, n_replay
        self.global_batch, self.world, self.rank, self.seed = global_batch, world, rank, seed
        self.per_replay = max(1, round(ratio * global_batch))
        self.per_target = global_batch - self.per_replay
        if self.per_target < 1:
            raise MtmimError(f"--replay-ratio {ratio}: leaves no training image in a batch of {global_batch}")
        self.steps = n_target // self.per_target
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _replay_stream(self, first: int, count: int) -> np.ndarray:
        """Items first .. first+count-1 of the endless replay stream."""
        out, k = [], first // self.n_replay
        skip = first - k * self.n_replay
        while sum(len(o) for o in out) < count + skip:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (k + 1))
            out.append(torch.randperm(self.n_replay, generator=g).numpy())
            k += 1
        return np.concatenate(out)[skip: skip + count] + self.n_target

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        target = torch.randperm(self.n_target, generator=g).numpy()[: self.steps * self.per_target]
        replay = self._replay_stream(self.epoch * self.steps * self.per_replay, self.steps * self.per_replay)
        batches = []
        for b in range(self.steps):
            batch = np.r_[target[b * self.per_target:(b + 1) * self.per_target],
                          replay[b * self.per_replay:(b + 1) * self.per_replay]]
            batches.append(batch[torch.randperm(len(batch), generator=g).numpy()])
        flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        return flat[self.rank:: self.world].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.steps * (self.global_batch // self.world) - self.start


# ---------------------------------------------------------------------------------------
def identity_mask(base: CacheDataset, caches: range, names: Sequence[str], what: str) -> np.ndarray:
    """Items of `base` from the caches in `caches` whose identity is in `names`; a name
    matches as written or, when both are whole numbers, by value ('001' is 1)."""
    from mtmim_cli.data.identity_lists import listed_labels

    mask = np.zeros(len(base), bool)
    for k in caches:
        cache = base.caches[k]
        hit = listed_labels(cache.identity_names, names)
        rows = base.cache_of == k
        mask[rows] = hit[cache.identity[base.record[rows]]]
    if not mask.any():
        raise MtmimError(f"{what}: none of the {len(names)} listed identities is in "
                         f"{', '.join(base.caches[k].path.name for k in caches)}")
    return mask


def validation_identities(base: CacheDataset, count: float, seed: int,
                          allowed: np.ndarray | None = None) -> np.ndarray:
    """Base labels of the identities carved out for validation: a seeded choice among the
    identities of the first (training) cache (of its `allowed` items). `count` >= 1 is a
    number of identities, below 1 a fraction of them."""
    pool = base.cache_of == 0 if allowed is None else (base.cache_of == 0) & allowed
    first = np.unique(base.labels[pool])
    n = int(round(count * len(first))) if count < 1 else int(count)
    if n < 2 or n >= len(first):
        raise MtmimError(f"--val-identities {count:g}: need at least 2 and fewer than the "
                         f"{len(first)} identities of {base.caches[0].path.name}")
    rng = np.random.default_rng([seed, 0x7A1])
    return np.sort(rng.choice(first, n, replace=False))


# ---------------------------------------------------------------------------------------
@torch.no_grad()
def class_mean_centres(embed, data: TrainingSet, mirror: bool, device: torch.device | str = "cpu",
                       batch_size: int = 128, progress: bool = False) -> tuple[Tensor, np.ndarray]:
    """(C, d) unit vectors: per class the mean of its items' L2-normalised embeddings
    (`embed(inputs) -> (B, d)`, the identity features the margin head sees, in eval mode),
    averaging each item with its mirror when `mirror`; and the mask of classes that have
    items (the others keep their initial centres)."""
    sums: Tensor | None = None
    counts = np.bincount(data.labels, minlength=data.num_classes)
    with make_progress("img", transient=True, disable=not progress) as bar:
        task = bar.add_task("class centres", total=len(data))
        for lo in range(0, len(data), batch_size):
            idx = np.arange(lo, min(len(data), lo + batch_size))
            x, x_flip = data.views(idx)
            e = nn.functional.normalize(embed(x.to(device)).float(), dim=1)
            if mirror:
                e = (e + nn.functional.normalize(embed(x_flip.to(device)).float(), dim=1)) / 2
            if sums is None:
                sums = torch.zeros(data.num_classes, e.shape[1], dtype=torch.float64, device=e.device)
            sums.index_add_(0, torch.from_numpy(data.labels[idx]).to(e.device), e.double())
            bar.advance(task, len(idx))
    return nn.functional.normalize(sums, dim=1).float().cpu(), counts > 0


# ---------------------------------------------------------------------------------------
def activation_key(plan: EncoderPlan, base: CacheDataset, dtype: str) -> str:
    """What the cached activations are a pure function of: the trunk's weights, the images
    (per-record pixel digests of every base item, in order), the stage, the crop and dtype."""
    from mtmim_cli.data.provenance import cache_digests
    from mtmim_cli.models.backbones import state_digest

    trunk, _ = plan.split()
    h = hashlib.sha256()
    h.update(json.dumps({"format": 1, "stage": plan.freeze_through, "crop": base.crop_width,
                         "dtype": dtype, "weights": state_digest(trunk)}).encode())
    for k, cache in enumerate(base.caches):
        rows = base.record[base.cache_of == k]
        h.update(np.asarray(cache_digests(cache)[rows], "<u8").tobytes())
    return h.hexdigest()[:20]


def trunk_activations(plan: EncoderPlan, base: CacheDataset, folder: str | os.PathLike,
                      dtype: str = "float16", device: torch.device | str = "cpu",
                      batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, Path]:
    """The frozen trunk's output for every item of `base` and its mirror, (N, 2, ...),
    read-only memory map of `<folder>/trunk-<stage>-<key>.npy`; computed once (trunk in eval
    mode) and reused by every run whose key matches. Under torchrun rank 0 computes, the
    others wait and read."""
    from mtmim_cli.train import distributed as D

    if dtype not in ACTIVATION_DTYPES:
        raise MtmimError(f"--activation-dtype {dtype}: choose from {', '.join(ACTIVATION_DTYPES)}")
    key = activation_key(plan, base, dtype)
    path = Path(folder) / f"trunk-{plan.freeze_through}-{key}.npy"
    if D.is_main() and not path.exists():
        _write_activations(plan, base, path, dtype, device, batch_size, progress)
    D.barrier()
    try:
        acts = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise MtmimError(f"{path}: unreadable activation cache ({exc})") from None
    if acts.shape[:2] != (len(base), 2):
        raise MtmimError(f"{path}: holds {acts.shape[:2]} activations, not ({len(base)}, 2)")
    return acts, path


def _write_activations(plan: EncoderPlan, base: CacheDataset, path: Path, dtype: str,
                       device: torch.device | str, batch_size: int, progress: bool) -> None:
    trunk, _ = plan.split()
    modes = [m.training for m in trunk]
    for m in trunk:
        m.eval()
    try:
        with atomic_write(path) as tmp, make_progress("img", disable=not progress) as bar:
            out = None
            task = bar.add_task(f"trunk activations through {plan.freeze_through}", total=len(base))
            for lo in range(0, len(base), batch_size):
                idx = np.arange(lo, min(len(base), lo + batch_size))
                x = _plain_images(base, idx).to(device)
                h = torch.stack([plan.trunk_forward(x), plan.trunk_forward(torch.flip(x, dims=[3]))], 1)
                h = h.float().cpu().numpy().astype(dtype)
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                    shape=(len(base), *h.shape[1:]))
                out[idx] = h
                bar.advance(task, len(idx))
            if out is None:
                raise MtmimError(f"{path}: no items to compute trunk activations of")
            out.flush()
            del out
    finally:
        for m, t in zip(trunk, modes, strict=True):
            m.train(t)
