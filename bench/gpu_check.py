"""One table for a CUDA machine, within --budget seconds (default 480, 8 minutes):

1. pretraining images/s: iresnet50, bf16 autocast, SGD, the arcface head over --classes
   (MS1M's 85,742) classes, through our `train()` loop (schedule, metrics all-reduce, CSV,
   checkpoints off) on synthetic batches held in memory (so the loader is not measured);
2. the MT-MIM step against the baseline step: the same loop and encoder with
   MTMIMObjective in mode mtmim (factorization, age head, CLUB, 5 q steps) and in mode
   baseline (identity loss only), as a time ratio;
3. the loader's images/s: `TrainLoader` (persistent workers, --workers or the default)
   delivering training batches from a raw and a JPEG cache of synthetic faces, to the
   device, without training.

Rates are from the steps after a calibration run (which also warms up cuDNN and the
allocator); each measure gets a share of the budget and as many steps as fit.
Targets (issue 12): iresnet50 bf16 >= 5,000 img/s on one H200.

    python bench/gpu_check.py [--device cuda:0] [--budget 480] [--batch 512]
    python bench/gpu_check.py --dry-run        # CPU, tiny sizes, a few steps (the tests)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Synthetic(Dataset):
    """Random normalised images (a pool reused in a cycle), labels, ages: batches come out of
    memory, stacked, so the training loop's rate is the model's."""

    def __init__(self, n: int, classes: int, width: int, pool: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.n, self.num_classes = n, classes
        self.pool = torch.randn(pool, 3, 112, width, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.ages = torch.rand(n, generator=g) * 70

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, idx):
        i = torch.as_tensor(idx)
        return self.pool[i % len(self.pool)], self.labels[i], self.ages[i], i

    @staticmethod
    def collate(batch):
        return batch


def run_loop(objective, dataset, device_batch: int, steps: int, amp: str, work: Path,
             tag: str) -> list[float]:
    """Seconds per step of `steps` steps of our loop (first step dropped)."""
    import contextlib
    import io

    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.loop import train

    out = work / tag
    cfg = TrainConfig(out=str(out), epochs=10**6, batch_size=device_batch, optimizer="sgd",
                      lr=1e-3, schedule="constant", amp=amp, ckpt_every=0, max_steps=steps,
                      workers=0, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):    # the loop's "done" line
        train(objective, dataset, cfg, meta={"kind": "pretrain", "backbone": "bench",
                                             "input_width": 112, "embedding_size": 512})
    with open(out / "metrics.csv") as fh:
        return [device_batch / float(r["images_per_s"]) for r in csv.DictReader(fh)][1:]


def timed(build, dataset, batch: int, amp: str, seconds: float, work: Path, tag: str,
          max_steps: int) -> tuple[float, int]:
    """img/s of the loop: a 4-step calibration (warm-up), then as many steps as fit."""
    cal = run_loop(build(), dataset, batch, 4, amp, work, tag + "-cal")
    per = statistics.median(cal) if cal else 1.0
    steps = int(max(3, min(max_steps, seconds / max(per, 1e-6))))
    times = run_loop(build(), dataset, batch, steps, amp, work, tag)
    return batch / statistics.median(times), len(times)


def bare_rate(objective, dataset: Synthetic, batch: int, seconds: float, device,
              max_steps: int) -> tuple[float, int]:
    """img/s of a bare step written here (forward under bf16 autocast, backward, SGD) on one
    batch already on the device: what the GPU does without any loop around it."""
    obj = objective.to(device).train()
    opt = torch.optim.SGD(obj.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x, y, a, _ = dataset.__getitems__(list(range(batch)))
    x, y, a = x.to(device), y.to(device), a.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = obj(x, y, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.after_step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):           # warm-up
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    per = time.perf_counter() - t0
    steps = int(max(3, min(max_steps, seconds / max(per, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0), steps


def loader_rate(cache: Path, batch: int, workers: int, batches: int, device) -> float:
    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.train.loader import TrainLoader
    from mtmim_cli.train.loop import EpochSampler

    ds = CacheDataset([cache], train=True, seed=0)
    sampler = EpochSampler(len(ds), batch, 1, 0, seed=0)
    loader = TrainLoader(ds, sampler, batch, workers, device.type == "cuda", seed=0)
    try:
        n, epoch, t0 = 0, 0, None
        while n < batches:
            for x, *_ in loader.epoch(epoch):
                x = x.to(device, non_blocking=True)
                if t0 is None:          # the first batch waits for the workers to start
                    t0, count = time.perf_counter(), 0
                    continue
                count += len(x)
                n += 1
                if n >= batches:
                    break
            epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - t0)
    finally:
        loader.close()


def faces(n: int, seed: int = 0) -> np.ndarray:
    """Smooth synthetic faces-sized images (JPEG sizes near real faces'), with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32)
    out = np.empty((n, 112, 112, 3), np.uint8)
    for k in range(n):
        a, b, c = rng.uniform(0.5, 2.0, 3)
        img = np.stack([xx * a, yy * b, (xx + yy) * c / 2], -1) + rng.normal(0, 6, (112, 112, 3))
        out[k] = np.clip(img, 0, 255)
    return out


def write_cache(path: Path, images: np.ndarray, fmt: str) -> Path:
    from mtmim_cli.data.cache import DETECTED, CacheWriter
    from mtmim_cli.data.records import Record

    recs = [Record(f"{i}.jpg", f"id{i % 100}") for i in range(len(images))]
    w = CacheWriter(path, recs, {"reader": "bench", "source_root": "."}, image_format=fmt)
    for i, img in enumerate(images):
        w.write(i, img, DETECTED)
    return w.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda:0 by default (the CPU with --dry-run)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    ap.add_argument("--batch", type=int, default=512, help="pretraining batch")
    ap.add_argument("--mtmim-batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=85742)
    ap.add_argument("--workers", type=int, default=-1, help="loader workers (-1: the default)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny backbone and sizes")
    args = ap.parse_args()

    from mtmim_cli.data.groups import equal_frequency_groups
    from mtmim_cli.models.backbones import build_backbone
    from mtmim_cli.train.loader import default_workers
    from mtmim_cli.train.mtmim_objective import MTMIMObjective
    from mtmim_cli.train.objectives import PretrainObjective

    t_start = time.perf_counter()
    if args.dry_run:
        backbone, batch, mbatch, classes, amp, device = "tiny", 8, 8, 50, "bf16", "cpu"
        loader_images, max_steps, shares = 64, 3, (1.0, 1.0, 1.0)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run on the CPU)")
        backbone, batch, mbatch, classes, amp = "iresnet50", args.batch, args.mtmim_batch, args.classes, "bf16"
        device, loader_images, max_steps = args.device or "cuda:0", 4096, 400
        shares = (0.35 * args.budget, 0.2 * args.budget, 0.15 * args.budget)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.setdefault("LOCAL_RANK", str(dev.index or 0))
    workers = args.workers if args.workers >= 0 else default_workers()
    rows: list[tuple[str, str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def elapsed() -> float:
        return time.perf_counter() - t_start

    try:
        # 1. pretraining
        data = Synthetic(batch * 64, classes, 112)

        def pretrain_objective():
            torch.manual_seed(0)
            return PretrainObjective(build_backbone(backbone, 512), classes, 512)

        rate, n = timed(pretrain_objective, data, batch, amp, shares[0] * 0.7, work, "pretrain",
                        max_steps)
        bare, nb = bare_rate(pretrain_objective(), data, batch, shares[0] * 0.3, dev, max_steps)
        rows.append((f"pretrain {backbone} {amp}, train() loop", f"{rate:,.0f}", "img/s",
                     f"batch {batch}, {classes} classes, SGD, median of {n} steps"))
        rows.append((f"pretrain {backbone} {amp}, bare step", f"{bare:,.0f}", "img/s",
                     f"the same step written plainly, batch on the device, {nb} steps; "
                     f"loop / bare {rate / bare:.3f}"))

        # 2. MT-MIM against the baseline step
        mdata = Synthetic(mbatch * 64, classes, 112)
        bounds = equal_frequency_groups(mdata.ages.numpy(), 8)
        rates = {}
        for mode in ("baseline", "mtmim"):
            def mt_objective(mode=mode):
                torch.manual_seed(0)
                return MTMIMObjective(build_backbone(backbone, 512), classes, 8, mode=mode,
                                      embedding_size=512, boundaries=bounds, warn_negative_after=0)
            rates[mode] = timed(mt_objective, mdata, mbatch, amp, shares[1] / 2, work, mode,
                                max_steps)
        (base, nb), (mt, nm) = rates["baseline"], rates["mtmim"]
        rows.append(("MT-MIM step / baseline step", f"{base / mt:.3f}", "x time",
                     f"mtmim {mt:,.0f} img/s ({nm} steps), baseline {base:,.0f} img/s "
                     f"({nb} steps), batch {mbatch}"))

        # 3. the loader
        imgs = faces(loader_images)
        for fmt in ("raw", "jpeg"):
            cache = write_cache(work / f"{fmt}.h5", imgs, fmt)
            per_batch = min(batch, 256)
            batches = max(4, int(min(200, shares[2] / 2 * 20000 / per_batch))) if not args.dry_run else 4
            rate = loader_rate(cache, per_batch, workers, batches, dev)
            rows.append((f"loader, {fmt} cache", f"{rate:,.0f}", "img/s",
                         f"{workers} workers, batches of {per_batch} to {device}, {batches} batches"))
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{elapsed():.0f} s" + (" [dry run: tiny sizes, not a measurement]" if args.dry_run else ""))
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>10}  {'unit':<7} note")
    for m, v, u, note in rows:
        print(f"{m:<{w}}  {v:>10}  {u:<7} {note}")


if __name__ == "__main__":
    main()
