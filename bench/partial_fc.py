"""Partial FC against the full margin head: per-rank head memory at 1 and 2 gloo processes,
and equality with the full head at rate 1.0.

Each setting runs in fresh processes (gloo on the CPU when 2): --classes x --dim class
centres (insightface's init), a global batch of --batch random embeddings split over the
ranks, one forward/backward and one SGD-with-momentum step, then --steps timed steps.
Per rank it reports the bytes of the head's tensors (weights + gradient + momentum; DDP's
gradient bucket too for the full head, which DDP all-reduces densely every step) and the peak
resident-memory growth of the process (ru_maxrss, with glibc returning large freed blocks;
it includes the activations, mostly the normalised centres and the B x C/W logits). The first step's
loss and gradients (class centres, gathered; embeddings) are compared with the full head on
the whole batch computed here in one process, in float64 sums of float32 values.

    .venv/bin/python bench/partial_fc.py [--classes 50000] [--dim 512] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch
from torch import nn


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _data(args):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.dim, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    return x, y


def _child(rank: int, world: int, init: str, kind: str, rate: float, args, out: str) -> None:
    import torch.distributed as dist

    from mtmim_cli.models.margin import CombinedMarginHead
    from mtmim_cli.train import distributed as D
    from mtmim_cli.train.partial_fc import PartialFCHead, init_centres

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    base = _rss_mb()
    x_all, y_all = _data(args)
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    if kind == "full":
        head: nn.Module = CombinedMarginHead(args.dim, args.classes)
        with torch.no_grad():
            head.weight.copy_(init_centres(0, args.dim, 0, args.classes))
        model = nn.parallel.DistributedDataParallel(head) if world > 1 else head

        def loss_fn(x):
            return nn.functional.cross_entropy(model(x, y_all[rows]), y_all[rows])
    else:
        head = PartialFCHead(args.dim, args.classes, rate=rate, seed=0)

        def loss_fn(x):
            return head(x, y_all[rows])
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    x = x_all[rows].clone().requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    # The global batch's loss and gradients: a full head under DDP has local-batch losses and
    # averaged centre gradients; both kinds leave world x dL/dx on each rank's embeddings.
    loss = loss.detach()
    first = {"loss": float(D.all_reduce_sum(loss) / world) if kind == "full" else float(loss),
             "x_grad": torch.cat(D.all_gather_object(x.grad / world)),
             "w_grad": (head.weight.grad.clone() if kind == "full"
                        else D.gather_rows(head.weight.grad.clone(), args.classes))}
    opt.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=False)
        loss_fn(x.detach()).backward()
        opt.step()
    dt = (time.perf_counter() - t0) / args.steps
    tensors = [head.weight, head.weight.grad,
               *[v for v in opt.state[head.weight].values() if torch.is_tensor(v)]]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if kind == "full" and world > 1:   # DDP's bucket holding the gradient it all-reduces
        nbytes += head.weight.numel() * head.weight.element_size()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if rank == 0:
        torch.save({"first": first, "bytes": nbytes, "peak_mb": peak, "step_s": dt}, out)
    if world > 1:
        dist.destroy_process_group()


def run(kind: str, rate: float, world: int, args, tmp: str) -> dict:
    import torch.multiprocessing as mp

    # Fresh processes, so their peak memory is their own; large blocks mmapped, so that freed
    # tensors leave the resident set instead of lingering in glibc's heap.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    tag = f"{kind}-{rate}-{world}"
    out = os.path.join(tmp, tag + ".pt")
    procs = [ctx.Process(target=_child, args=(r, world, f"file://{tmp}/rdv-{tag}", kind, rate,
                                              args, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"{tag}: a process failed ({p.exitcode})")
    return torch.load(out, weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from mtmim_cli.models.margin import CombinedMarginHead
    from mtmim_cli.train.partial_fc import init_centres

    torch.set_num_threads(1)
    x, y = _data(args)
    ref = CombinedMarginHead(args.dim, args.classes)
    with torch.no_grad():
        ref.weight.copy_(init_centres(0, args.dim, 0, args.classes))
    xr = x.clone().requires_grad_(True)
    ref_loss = nn.functional.cross_entropy(ref(xr, y), y)
    ref_loss.backward()
    ref_loss = ref_loss.detach()

    settings = [("full", 1.0, 1), ("full", 1.0, 2), ("pfc", 1.0, 1), ("pfc", 1.0, 2),
                ("pfc", 0.1, 2)]
    with tempfile.TemporaryDirectory() as tmp:
        res = {s: run(*s, args, tmp) for s in settings}

    print(f"{args.classes} classes x {args.dim}, global batch {args.batch}; per rank (rank 0):")
    print(f"{'head':<18}{'world':>6}{'head MiB':>10}{'x world 1':>11}{'peak RSS +MiB':>15}"
          f"{'step s':>8}{'|d loss|':>10}{'max|d grad W|':>15}{'max|d grad x|':>15}")
    for (kind, rate, world), r in res.items():
        name = "full (DDP)" if kind == "full" else f"partial FC {rate}"
        one = res[(kind, 1.0, 1)]["bytes"]
        f = r["first"]
        line = (f"{name:<18}{world:>6}{r['bytes'] / 2**20:>10.1f}{r['bytes'] / one:>11.3f}"
                f"{r['peak_mb']:>15.1f}{r['step_s']:>8.3f}")
        if rate == 1.0:   # the same loss as the full head on the whole batch in one process
            line += (f"{abs(f['loss'] - float(ref_loss)):>10.1e}"
                     f"{float((f['w_grad'] - ref.weight.grad).abs().max()):>15.1e}"
                     f"{float((f['x_grad'] - xr.grad).abs().max()):>15.1e}")
        print(line)
    print("differences: against the full head on the whole batch in this process (|grad W| "
          f"max {float(ref.weight.grad.abs().max()):.1e}, |grad x| max {float(xr.grad.abs().max()):.1e})")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
