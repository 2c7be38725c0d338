"""Partial FC: the combined-margin head with its class centres split over the ranks and, per
step, only a sample of them in the softmax (An et al., "Killing Two Birds with One Stone:
Efficient and Robust Training of Face Recognition CNNs by Partial FC", CVPR 2022; insightface's
arcface_torch `PartialFC_V2` is the reference implementation).

Rank r holds the rows `shard_range(C, W, r)` of the (C, d) class weights, so the head's
weights, gradients and optimiser state per rank are C/W x d, and no dense C x d gradient is
all-reduced. Each step every rank gathers the global batch's embeddings and labels, scores
them against its own (sampled) centres, and the softmax cross-entropy is assembled from
per-row all-reduces of the maximum, the sum of exponentials and the target logit.

Sampling (rate < 1): a class set of max(round(rate x C), #positives) classes is drawn per
forward pass: every class that labels a row of the global batch, plus the negatives with the
smallest keys u_j, u = uniform(C) from a generator seeded by (seed, draw counter). Every rank
draws the same u and keeps its own rows of the set, so the sampled set does not depend on how
many ranks there are and a run on W processes equals one on a single process. At rate 1 every
class is kept and the head equals `CombinedMarginHead` on the whole batch (tested in
tests/test_partial_fc.py under two gloo processes).

Gradients: the cross-entropy's backward is local (softmax - one-hot on this rank's columns,
over the global batch size), which is the exact gradient of the global-batch loss for this
rank's centres. The gathered embeddings' gradient is summed over ranks (`gather_with_grad`)
and multiplied by W, because DDP then averages the encoder's gradients over the W ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mtmim_cli.models.margin import margin_target, margin_values
from mtmim_cli.train import distributed as D

_INIT_BLOCK = 8192   # rows initialised per seeded block: the same weights for any world size


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over a batch whose classes are split over the ranks.

    `logits` (B, S_r) holds this rank's columns; `rows`/`cols` the (row, column) positions of
    the targets that live on this rank (every row's target lives on exactly one rank)."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, cols: Tensor) -> Tensor:  # noqa: D102
        n = logits.shape[0]
        top = logits.max(1).values if logits.shape[1] else logits.new_full((n,), -torch.inf)
        if D.is_dist():
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        e = torch.exp(logits - top[:, None])
        total = e.sum(1)
        target = logits.new_zeros(n)
        target[rows] = logits[rows, cols] - top[rows]
        if D.is_dist():
            both = torch.stack([total, target])
            dist.all_reduce(both)
            total, target = both[0], both[1]
        ctx.save_for_backward(e / total[:, None], rows, cols)
        return (torch.log(total) - target).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        prob, rows, cols = ctx.saved_tensors
        g = prob.clone()
        g[rows, cols] -= 1.0
        return g * (grad / prob.shape[0]), None, None


class PartialFCHead(nn.Module):
    """The combined-margin head (models/margin.py) with sharded, sampled class centres.

    `forward`/`loss_and_accuracy(embeddings, labels)` take this rank's batch and return the
    mean loss over the global batch (the same value on every rank) and its top-1 accuracy
    among the sampled classes. `weight` holds rows [start, stop) of the (C, d) weights; its
    `row_shard` attribute tells the training loop to keep it out of DDP and to gather and
    split it (and its optimiser state) around checkpoints.
    """

    ddp_ignore = ("weight", "draws")

    def __init__(self, embedding_size: int, num_classes: int, rate: float = 1.0,
                 s: float = 64.0, m1: float = 1.0, m2: float = 0.35, m3: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"partial FC rate {rate}: must be in (0, 1]")
        self.rate, self.seed = float(rate), int(seed)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.world, self.rank = D.world_size(), D.rank()
        self.start, self.stop = D.shard_range(self.num_classes, self.world, self.rank)
        self.weight = nn.Parameter(self._init_rows(self.start, self.stop))
        self.weight.row_shard = (self.start, self.stop, self.num_classes)
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    @classmethod
    def preset(cls, name: str, embedding_size: int, num_classes: int, rate: float,
               s: float = 64.0, margin: float | None = None, seed: int = 0) -> PartialFCHead:
        return cls(embedding_size, num_classes, rate, s=s, seed=seed, **margin_values(name, margin))

    def _init_rows(self, start: int, stop: int) -> Tensor:
        return init_centres(self.seed, self.embedding_size, start, stop)

    def _sampled(self, labels: Tensor) -> Tensor | None:
        """This rank's sampled rows (sorted local indices), or None when every class is kept."""
        k = max(1, round(self.rate * self.num_classes))
        if k >= self.num_classes:
            return None
        dev = self.weight.device
        g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + int(self.draws))
        u = torch.rand(self.num_classes, generator=g, device=dev)
        u[labels] = -1.0                                    # positives always in
        cut = torch.kthvalue(u, k).values
        keep = u[self.start: self.stop] <= cut
        return keep.nonzero().squeeze(1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_and_accuracy(embeddings, labels)[0]

    def loss_and_accuracy(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        world = D.world_size()
        if world != self.world:
            raise RuntimeError(f"partial FC built for {self.world} ranks, running on {world}")
        with torch.autocast(embeddings.device.type, enabled=False):
            x = D.scale_grad(D.gather_with_grad(embeddings.float()), float(world))
            y = _gather_labels(labels)
            index = self._sampled(y) if self.training else None
            if self.training and self.rate < 1:
                self.draws += 1
            w = self.weight if index is None else self.weight[index]
            cos = F.linear(F.normalize(x), F.normalize(w.float()))
            local = (y >= self.start) & (y < self.stop)
            rows = local.nonzero().squeeze(1)
            cols = y[rows] - self.start
            if index is not None:
                cols = torch.searchsorted(index, cols)
            target = margin_target(cos[rows, cols], self.m1, self.m2, self.m3)
            logits = cos.index_put((rows, cols), target) * self.s
            loss = _DistCrossEntropy.apply(logits, rows, cols)
            with torch.no_grad():
                accuracy = _accuracy(cos.detach(), rows, cols)
        return loss, accuracy

    def extra_repr(self) -> str:
        return (f"d={self.embedding_size}, classes={self.num_classes} (rows {self.start}:"
                f"{self.stop} here), rate={self.rate}, s={self.s}, m1={self.m1}, m2={self.m2}, "
                f"m3={self.m3}")


def init_centres(seed: int, dim: int, start: int, stop: int) -> Tensor:
    """Rows start..stop-1 of N(0, 0.01) (C, dim) class centres; each block of rows comes from
    its own seeded generator, so a rank builds only its rows and any split gives one tensor."""
    out = torch.empty(stop - start, dim)
    for b in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1 if stop > start else 0):
        lo = b * _INIT_BLOCK
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        block = torch.randn(_INIT_BLOCK, dim, generator=g) * 0.01
        a, z = max(start, lo), min(stop, lo + _INIT_BLOCK)
        out[a - start: z - start] = block[a - lo: z - lo]
    return out


def _gather_labels(x: Tensor) -> Tensor:
    """All ranks' labels, in rank order (local batches may differ in size)."""
    return D.all_gather_rows(x)


def _accuracy(cos: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Share of rows whose target cosine is the largest of the sampled classes on any rank."""
    n = cos.shape[0]
    top = cos.max(1).values if cos.shape[1] else cos.new_full((n,), -2.0)
    target = cos.new_full((n,), -2.0)
    target[rows] = cos[rows, cols]
    if D.is_dist():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(target, op=dist.ReduceOp.MAX)
    return (target >= top).float().mean()
