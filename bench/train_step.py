"""Images/s of our training step (the full `train()` loop: cache reads, sampler, flips,
metrics all-reduce, CSV, schedule, optimiser) against a bare-bones reference loop written here
(same encoder, margin head, loss, Adam, batch size; batches preloaded as tensors; no framework),
for each backbone, in one run. Target: our overhead at most 10%.

Rounds alternate ours / reference so load changes on the shared machine hit both; each round
drops its first step (loader start-up), and the figure is the median step time over rounds.

    .venv/bin/python bench/train_step.py [--backbones mobilefacenet iresnet50] [--batch 32]
        [--steps 4] [--rounds 2] [--amp none|bf16] [--threads N]

On a CUDA machine the same script runs on the GPU (e.g. --backbones iresnet50 --batch 128 --amp bf16).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def make_cache(path: Path, n: int, classes: int):
    import numpy as np

    from mtmim_cli.data.cache import DETECTED, CacheWriter
    from mtmim_cli.data.records import Record

    rng = np.random.default_rng(0)
    records = [Record(f"{i}.jpg", f"id{i % classes}") for i in range(n)]
    w = CacheWriter(path, records, attrs={"reader": "bench", "source_root": "."})
    for i in range(n):
        w.write(i, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), DETECTED)
    w.commit(n)
    return w.finish()


def bench(backbone: str, batch: int, steps: int, rounds: int, amp: str, work: Path) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.models.backbones import build_backbone, default_embedding_size, input_width
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.loop import train
    from mtmim_cli.train.objectives import PretrainObjective

    dim, width, classes = default_embedding_size(backbone), input_width(backbone), 100
    n = batch * (steps + 1)
    cache = make_cache(work / f"{backbone}.h5", n, classes)
    ds = CacheDataset([cache], train=True, crop_width=width)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16"
                else nullcontext())

    # The reference: the textbook loop over preloaded batches.
    torch.manual_seed(0)
    ref = PretrainObjective(build_backbone(backbone, dim), ds.num_classes, dim).to(device).train()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-4, weight_decay=5e-4)
    batches = [ds.collate(ds.__getitems__(list(range(k * batch, (k + 1) * batch))))
               for k in range(steps + 1)]
    batches = [(x.to(device), y.to(device)) for x, y, _, _ in batches]

    def ref_round() -> list[float]:
        times = []
        for x, y in batches:
            t0 = time.perf_counter()
            with autocast:
                emb = ref.encoder(x)
                loss = F.cross_entropy(ref.id_head(emb, y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()      # the reference also waits for the step to finish
            times.append(time.perf_counter() - t0)
        return times[1:]

    def our_round(r: int) -> list[float]:
        torch.manual_seed(0)
        obj = PretrainObjective(build_backbone(backbone, dim), ds.num_classes, dim)
        out = work / f"run-{backbone}-{r}"
        cfg = TrainConfig(out=str(out), epochs=1, batch_size=batch, lr=1e-4, weight_decay=5e-4,
                          schedule="constant", amp=amp, ckpt_every=0, progress=False)
        train(obj, ds, cfg, meta={"kind": "pretrain", "backbone": backbone,
                                  "input_width": width, "embedding_size": dim})
        with open(out / "metrics.csv") as fh:
            times = [batch / float(row["images_per_s"]) for row in csv.DictReader(fh)]
        shutil.rmtree(out)
        return times[1:]

    ours, refs = [], []
    for r in range(rounds):
        ours += our_round(r)
        refs += ref_round()
    return statistics.median(ours), statistics.median(refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["mobilefacenet", "iresnet50"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="mtmim-bench-"))
    try:
        for name in args.backbones:
            ours, ref = bench(name, args.batch, args.steps, args.rounds, args.amp, work)
            print(f"{name}: batch {args.batch}, amp {args.amp}, {device}, "
                  f"{torch.get_num_threads()} threads, load {load_avg()}; "
                  f"median of {args.steps * args.rounds} steps")
            print(f"  reference loop: {args.batch / ref:8.1f} img/s ({ref * 1e3:.0f} ms/step)")
            print(f"  mtmim train() : {args.batch / ours:8.1f} img/s ({ours * 1e3:.0f} ms/step)")
            print(f"  ratio ours/reference throughput {ref / ours:.3f}; overhead "
                  f"{100 * (ours / ref - 1):+.1f}% (target <= 10%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
