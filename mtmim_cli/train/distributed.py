"""Process-group helpers for `torchrun` launches (NCCL on CUDA, gloo on CPU).

Without a process group every helper is the single-process identity, so the same code runs
under `mtmim pretrain` and `torchrun --nproc_per_node K mtmim pretrain`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and pick this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); returns a new tensor."""
    x = x.clone()
    if is_dist():
        dist.all_reduce(x)
    return x


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n)
        sizes_i = [int(s.item()) for s in sizes]
        # all_gather needs equal shapes: pad to the largest batch, trim afterwards.
        pad = max(sizes_i)
        buf = x.new_zeros((pad, *x.shape[1:]))
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in sizes_i]
        dist.all_gather(parts, buf.contiguous())
        ctx.sizes = sizes_i
        ctx.rank = dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes_i, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x` concatenated in rank order; the identity without a process group.

    The backward sums every rank's gradient for this rank's rows, i.e. it differentiates the
    sum of the per-rank losses. DDP then averages parameter gradients over ranks, so a loss
    that every rank computes identically from gathered tensors (e.g. CLUB over the global
    batch) gets exactly the gradient a single process would compute on the whole batch.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` (the counts may differ), in rank order; no gradient. `x`
    itself without a process group."""
    if not is_dist() or world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    buf = x.new_zeros((max(counts), *x.shape[1:]))
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def broadcast_buffers(module: nn.Module, skip: Sequence[str] = ()) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. Without --sync-bn each rank's
    running statistics follow its own batches between DDP's broadcasts."""
    if not is_dist() or world_size() == 1:
        return
    for name, buf in module.named_buffers():
        if name not in skip:
            dist.broadcast(buf, src=0)


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of n that `rank` holds when n rows are split over `world` ranks as
    evenly as possible (the first n % world ranks hold one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor | None:
    """Every rank's `shard_range` rows of an (n, ...) tensor, joined on rank 0 (None on the
    others); `x` itself without a process group. A collective: every rank must call it."""
    if not is_dist() or world_size() == 1:
        return x
    world = world_size()
    sizes = [shard_range(n, world, r) for r in range(world)]
    pad = max(b - a for a, b in sizes)
    buf = x.new_zeros((pad, *x.shape[1:]))
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)] if rank() == 0 else None
    dist.gather(buf.contiguous(), parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, sizes, strict=True)])


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` in the forward pass; its gradient times `factor` in the backward pass."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole global batch, on any device.

    torch's SyncBatchNorm is CUDA-only; this one reduces (sum, sum of squares, count) with a
    differentiable all-reduce, so gloo runs on the CPU normalise exactly as one process would.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        count = x.new_tensor([x.numel() / x.shape[1]])
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c: 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm for a synchronised one (torch's on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            out.weight.requires_grad = module.weight.requires_grad
            out.bias.requires_grad = module.bias.requires_grad
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
