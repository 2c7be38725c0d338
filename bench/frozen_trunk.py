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

On a shared machine the loop's rates swing with the load, and the three runs happen at
different times; so the step itself is also timed with the two paths interleaved, round by
round, on the same batch (MTMIMObjective forward + backward + Adam + q steps): median wall
and CPU seconds per step, and their ratio.

    .venv/bin/python bench/frozen_trunk.py --cache fgnet.h5 [--stage conv2] [--threads 2]

(--cache defaults to fgnet.h5 in the repository root, the README's walk-through cache;
--init to the shared MobileFaceNet under $MTMIM_SHARED.)
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

from mtmim_cli.paths import shared_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def median_rate(run: Path) -> float:
    with open(run / "metrics.csv") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=REPO / "fgnet.h5")
    ap.add_argument("--init", type=Path,
                    default=shared_path("weights", "mobilefacenet-casia-arcface.ckpt"))
    ap.add_argument("--stage", default="conv2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the interleaved step timing, on the float16 cache of an earlier --work")
    args = ap.parse_args()
    if args.steps_only:
        import torch

        torch.set_num_threads(args.threads)
        interleaved_steps(args, args.work / "float16" / "activations")
        return

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
    interleaved_steps(args, work / "float16" / "activations")


def interleaved_steps(args: argparse.Namespace, acts_dir: Path, rounds: int = 12) -> None:
    """The same step on images and on cached activations, alternating, same batch."""
    import copy

    import numpy as np
    import torch

    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.mtmim_objective import MTMIMObjective
    from mtmim_cli.train.transfer import TrainingSet

    model = load_identity_model(args.init)
    base = CacheDataset([args.cache], train=True, crop_width=model.input_width, seed=0)
    acts = np.load(next(acts_dir.glob("*.npy")), mmap_mode="r")
    images = TrainingSet(base, np.arange(len(base)))
    cached = TrainingSet(base, np.arange(len(base)), activations=acts)
    idx = np.arange(args.batch_size)
    batches = {"images": images.__getitems__(idx), "activations": cached.__getitems__(idx)}
    torch.manual_seed(0)
    ref = MTMIMObjective(model.encoder.train(), images.num_classes, 8, mode="baseline",
                         embedding_size=model.embedding_size, boundaries=list(range(5, 40, 5)),
                         freeze_through=args.stage, freeze_bn="stats", l2sp=1e-2)
    objs = {"images": ref, "activations": copy.deepcopy(ref)}
    objs["activations"].activations = True
    opts = {k: torch.optim.Adam(o.main_parameters(), lr=1e-3) for k, o in objs.items()}
    wall: dict[str, list[float]] = {k: [] for k in objs}
    cpu: dict[str, list[float]] = {k: [] for k in objs}
    for r in range(rounds + 1):
        for k, obj in objs.items():
            x, y, a, _ = batches[k]
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = obj(x, y, a)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            obj.after_step()
            if r:   # round 0 warms up
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"interleaved steps ({rounds} rounds, batch {args.batch_size}, load average {load_avg()}): "
          f"images {w['images']:.3f} s wall / {c['images']:.3f} s CPU, activations "
          f"{w['activations']:.3f} s wall / {c['activations']:.3f} s CPU; speed-up "
          f"x{w['images'] / w['activations']:.1f} wall, x{c['images'] / c['activations']:.1f} CPU")


if __name__ == "__main__":
    main()
