"""Feature extraction (`mtmim embed` / `mtmim evaluate`'s path) against a bare forward loop.

Both compute the same thing on the same faces of an aligned cache: image and mirror through
the model, concatenated and L2-normalised. Ours is `extract_features` reading the cache
batch by batch (h5py, preprocessing, progress bookkeeping, float64-free combination); the
reference is a plain loop over the images already in memory: uint8 -> float tensor, crop,
(v - 127.5) / 128, two forward passes, torch.cat, F.normalize. The two alternate, round by
round (order flipped every round), in one process; the medians give the ratio (ours / plain
speed; 1.0 = no overhead). Each path's user and system CPU seconds and minor page faults
come from getrusage deltas around it, so a path that spends its time in the kernel shows.

glibc's malloc setting (see mtmim_cli/allocator.py) is process-wide; run once with
MTMIM_KEEP_FREED_MEMORY=0 to see both paths without it.

    .venv/bin/python bench/embed.py [--cache fgnet.h5] [--images 256] [--threads 2]

(--cache defaults to fgnet.h5 in the repository root, the README's walk-through cache.)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402
from mtmim_cli.paths import shared_path  # noqa: E402


def plain_features(model, images: np.ndarray, batch_size: int):
    """The bare loop: no cache reader, no progress, torch only."""
    import torch
    import torch.nn.functional as F

    width = int(getattr(model, "input_width", 112))
    off = (112 - width) // 2
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(images[s:s + batch_size]).permute(0, 3, 1, 2).float()
            x = (x[..., off:off + width] - 127.5) / 128
            out.append(F.normalize(torch.cat([model(x), model(torch.flip(x, dims=[3]))], 1)))
    return torch.cat(out).numpy()


def timed(fn):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fn()
    t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return result, {"wall": t, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                    "minflt": r1.ru_minflt - r0.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "fgnet.h5"))
    ap.add_argument("--model", default=str(shared_path("weights",
                                                       "mobilefacenet-casia-arcface.ckpt")))
    ap.add_argument("--images", type=int, default=256, help="Faces per pass (the first usable).")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = ap.parse_args()

    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(args.threads)
    model = load_identity_model(args.model)
    cache = Cache(args.cache)
    idx = np.flatnonzero(cache.usable)[:args.images]
    images = cache.images(idx)

    def ours():
        return extract_features(model, cache, idx, flip="concat", batch_size=args.batch_size)

    def plain():
        return plain_features(model, images, args.batch_size)

    a, b = ours(), plain()  # warm-up, and the two must agree
    diff = float(np.abs(a - b).max())
    assert diff < 1e-4, f"paths disagree: max |diff| {diff}"
    runs: dict[str, list[dict]] = {"ours": [], "plain": []}
    for r in range(args.rounds):
        order = (("ours", ours), ("plain", plain)) if r % 2 == 0 else (("plain", plain), ("ours", ours))
        for name, fn in order:
            runs[name].append(timed(fn)[1])

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in runs[name])

    n = len(idx)
    print(f"{n} faces of {args.cache}, {Path(args.model).name}, batch {args.batch_size}, flip "
          f"concat, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds, "
          f"MTMIM_KEEP_FREED_MEMORY={os.environ.get('MTMIM_KEEP_FREED_MEMORY', '1')}; "
          f"outputs agree to {diff:.1e}")
    for name in ("ours", "plain"):
        print(f"  {name:5s}: {n / med(name, 'wall'):7.1f} img/s (median {med(name, 'wall'):.2f} s), "
              f"user {med(name, 'user'):.2f} s, sys {med(name, 'sys'):.2f} s, "
              f"{med(name, 'minflt') / n:.0f} minor faults/img")
    cpu = {k: med(k, "user") + med(k, "sys") for k in runs}
    print(f"ratio ours/plain speed: {med('plain', 'wall') / med('ours', 'wall'):.3f} wall, "
          f"{cpu['plain'] / cpu['ours']:.3f} CPU time (load average {load_avg()})")


if __name__ == "__main__":
    main()
