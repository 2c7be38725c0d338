"""Cache image layouts: bytes per image and loader images/s per worker, raw against encoded.

Takes --n aligned faces of a real cache (--cache; default celeba.h5 in the repository root,
the README's walk-through cache), writes
them as a raw, a JPEG (quality 95) and a PNG cache, and reports for each the file's bytes per
image and the rate of one DataLoader worker process delivering training batches through
`CacheDataset` (random order, read + decode + crop + flip + normalise), the way `pretrain
--workers K` runs K of them. Each rate is the best of --repeat passes of --batches batches.
Also the time to write each cache (the encoding cost paid once, at align time).

    .venv/bin/python bench/cache_formats.py [--cache celeba.h5] [--n 3000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write(path: Path, images: np.ndarray, fmt: str) -> float:
    from mtmim_cli.data.cache import DETECTED, CacheWriter
    from mtmim_cli.data.records import Record

    t0 = time.perf_counter()
    recs = [Record(f"{i}.jpg", f"id{i % 100}") for i in range(len(images))]
    w = CacheWriter(path, recs, {"reader": "bench", "source_root": "."}, image_format=fmt)
    for i, img in enumerate(images):
        w.write(i, img, DETECTED)
        if (i + 1) % 256 == 0:
            w.commit(i + 1)
    w.finish()
    return time.perf_counter() - t0


def loader_rate(path: Path, batch: int, batches: int, repeat: int) -> float:
    """Images/s of one DataLoader worker process over random batches (best pass)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from mtmim_cli.data.dataset import CacheDataset

    ds = CacheDataset([path], train=True, seed=0)
    sampler = RandomSampler(ds, num_samples=batch * batches,
                            generator=torch.Generator().manual_seed(0))
    best = 0.0
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=1,
                        collate_fn=ds.collate, persistent_workers=True, prefetch_factor=4)
    for _ in range(repeat):
        it = iter(loader)
        next(it)                       # the worker is up and has its file open
        t0 = time.perf_counter()
        n = 0
        for x, *_ in it:
            n += len(x)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "celeba.h5"))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch

    from mtmim_cli.data.cache import Cache

    torch.set_num_threads(1)
    src = Cache(args.cache)
    idx = np.flatnonzero(src.usable)[: args.n]
    images = src.images(idx)
    print(f"{len(images)} faces from {args.cache}; one loader worker, batches of {args.batch}, "
          f"random order")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("raw", "jpeg", "png"):
            path = Path(tmp) / f"{fmt}.h5"
            secs = write(path, images, fmt)
            size = path.stat().st_size / len(images)
            rate = loader_rate(path, args.batch, args.batches, args.repeat)
            rows.append((fmt, size, rate, len(images) / secs))
    raw_size, raw_rate = rows[0][1], rows[0][2]
    print(f"{'layout':<8}{'bytes/image':>13}{'x smaller':>11}{'img/s/worker':>14}{'x raw rate':>12}"
          f"{'written img/s':>15}")
    for fmt, size, rate, wrate in rows:
        print(f"{fmt:<8}{size:>13,.0f}{raw_size / size:>11.2f}{rate:>14,.0f}{rate / raw_rate:>12.2f}"
              f"{wrate:>15,.0f}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
