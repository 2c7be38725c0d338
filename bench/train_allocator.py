"""The training loop on the CPU with and without `reuse_freed_memory` (mtmim_cli/allocator.py).

The same short pretraining run (synthetic cache, one backbone, constant learning rate, no
checkpoints) goes through `train()` in child processes, alternately with
MTMIM_KEEP_FREED_MEMORY=0 (glibc's default: every block above its mmap threshold is mapped
afresh and returned on free, so each step page-faults its activations in again) and the
default (the loop keeps freed memory, as extraction does). Each child reports the median step
time from metrics.csv (first step dropped) and the user / system CPU seconds and minor page
faults of the training call (getrusage deltas); the medians over rounds give the ratio
(reference = glibc's default).

    .venv/bin/python bench/train_allocator.py [--backbone mobilefacenet] [--batch 64]
        [--steps 6] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402
from bench.train_step import make_cache  # noqa: E402


def child(args: argparse.Namespace) -> None:
    import torch

    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.models.backbones import build_backbone, default_embedding_size, input_width
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.loop import train
    from mtmim_cli.train.objectives import PretrainObjective

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    dim, width = default_embedding_size(args.backbone), input_width(args.backbone)
    ds = CacheDataset([work / "cache.h5"], train=True, crop_width=width)
    torch.manual_seed(0)
    obj = PretrainObjective(build_backbone(args.backbone, dim), ds.num_classes, dim)
    out = work / f"run-{os.getpid()}"
    cfg = TrainConfig(out=str(out), epochs=1, batch_size=args.batch, lr=1e-4,
                      schedule="constant", ckpt_every=0, progress=False, workers=0)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    train(obj, ds, cfg, meta={"kind": "pretrain", "backbone": args.backbone,
                              "input_width": width, "embedding_size": dim})
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    with open(out / "metrics.csv") as fh:
        steps = [args.batch / float(row["images_per_s"]) for row in csv.DictReader(fh)]
    print(json.dumps({"step": statistics.median(steps[1:]), "steps": len(steps), "wall": wall,
                      "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                      "minflt": r1.ru_minflt - r0.ru_minflt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilefacenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="mtmim-bench-") as tmp:
        make_cache(Path(tmp) / "cache.h5", args.batch * args.steps, 100)
        runs: dict[str, list[dict]] = {"0": [], "1": []}
        for r in range(args.rounds):
            for keep in (("0", "1") if r % 2 == 0 else ("1", "0")):
                env = {**os.environ, "MTMIM_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": str(args.threads)}
                cmd = [sys.executable, __file__, "--child", "--work", tmp,
                       *(f"--{k}={v}" for k, v in vars(args).items()
                         if k in ("backbone", "batch", "steps", "threads"))]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[keep].append(json.loads(res.stdout.strip().splitlines()[-1]))

    def med(keep: str, key: str) -> float:
        return statistics.median(m[key] for m in runs[keep])

    n = runs["0"][0]["steps"]
    print(f"{args.backbone}, batch {args.batch}, {n} steps per run, torch threads "
          f"{args.threads}, {args.rounds} interleaved rounds (medians)")
    for keep, name in (("0", "glibc default (MTMIM_KEEP_FREED_MEMORY=0)"),
                       ("1", "reuse_freed_memory (default)")):
        print(f"  {name:42s}: {1e3 * med(keep, 'step'):6.0f} ms/step, user "
              f"{med(keep, 'user'):.2f} s, sys {med(keep, 'sys'):.2f} s, "
              f"{med(keep, 'minflt') / n:8.0f} minor faults/step")
    print(f"ratio step time default/reference: {med('1', 'step') / med('0', 'step'):.3f}; "
          f"CPU time {(med('1', 'user') + med('1', 'sys')) / (med('0', 'user') + med('0', 'sys')):.3f}; "
          f"faults {med('1', 'minflt') / med('0', 'minflt'):.3f} (load average {load_avg()})")


if __name__ == "__main__":
    main()
