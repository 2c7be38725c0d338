"""The frozen-trunk fast path: one epoch of fine-tuning on cached trunk activations against
the same frozen-trunk model trained on images (the reference), through the same loop.

Runs, all from the same init, seed and settings (--recipe small, one epoch):
  - images:  the trunk frozen through --stage, computed on every batch (--activation-cache off);
  - float32: trained on the trunk's activations cached once in float32;
  - float16: the same in float16 (the default storage).
Prints the training images/s of each (median of the loop's per-step figure, first step
dropped), the ratio against the image path, the one-time cost of building each cache, and
how far the resulting identity features (x_id of every cache image and its mirror) lie from
the image path's (max |difference| of L2-normalised features, and 1 - min cosine).

    .venv/bin/python bench/frozen_trunk.py --cache /work/data/fgnet.h5 \\
        --init ../shared/weights/mobilefacenet-casia-arcface.ckpt [--stage conv2] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import load_avg  # noqa: E402


def median_rate(run: Path) -> float:
    with open(run / "metrics.csv") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/data/fgnet.h5"))
    ap.add_argument("--init", type=Path, default=Path("../shared/weights/mobilefacenet-casia-arcface.ckpt"))
    ap.add_argument("--stage", default="conv2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.features import extract_views
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.finetune import finetune

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="frozen_trunk_"))
    settings = {"recipe": "small", "epochs": args.epochs, "batch_size": args.batch_size,
                "progress": False, "freeze_through": args.stage, "mode": "baseline"}
    runs, walls = {}, {}
    for name, extra in (("images", {"activation_cache": "off"}),
                        ("float32", {"activation_dtype": "float32"}),
                        ("float16", {"activation_dtype": "float16"})):
        t0 = time.perf_counter()
        runs[name] = finetune([args.cache], args.init, {**settings, **extra, "out": str(work / name)})
        walls[name] = time.perf_counter() - t0

    cache = Cache(args.cache)
    idx = np.flatnonzero(cache.usable)
    feats = {}
    for name, run in runs.items():
        model = load_identity_model(run / "model.pt")
        a, b = extract_views(model, cache, idx, mirror=True)
        x = np.concatenate([a, b]).astype(np.float64)
        feats[name] = x / np.linalg.norm(x, axis=1, keepdims=True)

    ref = median_rate(runs["images"])
    print(f"FG-NET {len(idx)} images, init {args.init.name}, frozen through {args.stage}, "
          f"{args.epochs} epoch(s), batch {args.batch_size}, {args.threads} threads, "
          f"load average {load_avg()}")
    print(f"{'path':<10}{'train img/s':>12}{'x images':>10}{'run wall s':>12}"
          f"{'max|dx|':>11}{'1-min cos':>11}")
    for name, run in runs.items():
        d = feats[name] - feats["images"]
        cos = np.einsum("nd,nd->n", feats[name], feats["images"])
        rate = median_rate(run)
        print(f"{name:<10}{rate:>12.1f}{rate / ref:>10.2f}{walls[name]:>12.1f}"
              f"{float(np.abs(d).max()):>11.2e}{float(1 - cos.min()):>11.2e}")
    for f in sorted((work / "float32" / "activations").glob("*.npy")) + \
            sorted((work / "float16" / "activations").glob("*.npy")):
        print(f"cache {f.parent.parent.name}: {f.stat().st_size / 2**20:.0f} MiB")
    print("run wall s includes the one-time cache build (float32 / float16 runs) and the "
          "class-centre pass; train img/s is the loop's per-step rate")


if __name__ == "__main__":
    main()
