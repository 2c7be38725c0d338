"""The head re-fit's cost per mode (`evaluate --refit head`): mode mtmim against mode age.

Times `train.round_heads.fit_rounds`, the part of `--refit head` that differs by mode, on one
chunk of leave-one-out rounds, in every mode of --modes, in one process. Modes alternate
(order rotated each repeat) so that load changes on a shared machine hit each of them; a
mode's figure is the median over repeats, as wall seconds and as this process's CPU seconds
(user + system), each also per round and epoch. The ratio against mode age (the reference)
is the figure: mode mtmim trains the same heads plus CLUB's q, 5 q steps per step.

Features: the encoder's own (image and mirror) on an aligned FG-NET cache (--cache, --model;
extracted once, not timed), or --synthetic features of the same shape (1002 images, 82
identities, 128-d) when no cache is at hand.

    .venv/bin/python bench/refit_head_modes.py --cache fgnet.h5 \\
        --model ../shared/weights/mobilefacenet-casia-arcface.ckpt [--rounds 250] [--epochs 2]
        [--repeat 3] [--threads 1] [--options '{"q_steps": 1}']
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402


def real_views(cache_path: str, model_path: str):
    """(views, labels, ages) of the usable images of a cache, as `--refit head` takes them."""
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.features import extract_views
    from mtmim_cli.eval.loading import load_model
    from mtmim_cli.orchestration.refit import encoder_of

    cache = Cache(cache_path)
    idx = np.flatnonzero(cache.usable)
    encoder = encoder_of(load_model(Path(model_path), None, "cpu"))
    f, ff = extract_views(encoder, cache, idx, mirror=True)
    return [f, ff], cache.identity[idx], cache.age[idx]


def synthetic_views(n: int = 1002, d: int = 128, classes: int = 82, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.sort(np.r_[np.arange(classes), rng.integers(0, classes, n - classes)])
    f = (2 * rng.normal(size=(classes, d))[labels] + rng.normal(size=(n, d))).astype(np.float32)
    ff = (f + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    return [f, ff], labels, rng.uniform(0, 69, n).round()


def timed(fn) -> dict[str, float]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": t, "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="aligned FG-NET cache (mtmim align ... --format fgnet)")
    ap.add_argument("--model", help="checkpoint whose encoder features the heads re-fit on")
    ap.add_argument("--synthetic", action="store_true", help="features of FG-NET's shape")
    ap.add_argument("--rounds", type=int, help="rounds trained together (default: the run's "
                                               "ROUNDS_PER_CHUNK)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fit (the run's: 20)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="baseline,age,mtmim")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--options", default="{}", help="JSON dict of --refit-options for every "
                                                   "mode, e.g. '{\"q_steps\": 1}'")
    a = ap.parse_args()
    if a.synthetic == bool(a.cache and a.model):
        sys.exit("error: give --cache and --model, or --synthetic")

    import torch

    from mtmim_cli.eval import protocols as P
    from mtmim_cli.orchestration.refit import ROUNDS_PER_CHUNK
    from mtmim_cli.train.round_heads import RoundHeadConfig, fit_rounds

    if a.threads:
        torch.set_num_threads(a.threads)
    views, labels, ages = synthetic_views() if a.synthetic else real_views(a.cache, a.model)
    rounds = P.loo_rounds(len(labels), None, 0)[:a.rounds or ROUNDS_PER_CHUNK]
    modes = a.modes.split(",")
    if "age" not in modes:
        sys.exit("error: --modes must hold age (the reference)")
    print(f"{'synthetic' if a.synthetic else a.cache}: {len(labels)} images x {len(views)} "
          f"views, {views[0].shape[1]}-d; {len(rounds)} rounds x {a.epochs} epochs; options "
          f"{a.options}; torch "
          f"threads {torch.get_num_threads()}; load average {load_avg()}", flush=True)

    options = {"epochs": a.epochs, **json.loads(a.options)}

    def fit(mode: str):
        return fit_rounds(views, labels, ages, rounds, RoundHeadConfig.from_options(
            {**options, "mode": mode}))

    fit("age")   # warm-up: allocator, thread pool
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for k in range(a.repeat):
        for m in modes[k % len(modes):] + modes[:k % len(modes)]:
            runs[m].append(timed(lambda m=m: fit(m)))
    med = {m: {key: statistics.median(r[key] for r in rs) for key in ("wall", "cpu")}
           for m, rs in runs.items()}
    per = len(rounds) * a.epochs / 1000
    for m in modes:
        print(f"  {m}: {med[m]['wall']:.2f} s wall, {med[m]['cpu']:.2f} s CPU "
              f"({med[m]['wall'] / per:.2f} / {med[m]['cpu'] / per:.2f} ms per round-epoch); "
              f"vs age: {med[m]['wall'] / med['age']['wall']:.2f}x wall, "
              f"{med[m]['cpu'] / med['age']['cpu']:.2f}x CPU")
    print(f"load average {load_avg()}")


if __name__ == "__main__":
    main()
