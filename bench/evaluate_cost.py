"""What `mtmim evaluate` costs beyond the features: one model on an FG-NET cache, timed in
one process against the reference "embed the same photos, then score rank-1".

- reference: `embed_source` (image + mirror features of every usable face into an HDF5
  file, as `mtmim embed`) plus leave-one-out rank-1 scored in numpy from those features;
- evaluate: `mtmim evaluate --protocol fgnet-loo` with its defaults (rank-1, CMC, by-age
  tables, the age probe, paired intervals; no InfoNCE unless --mi-steps), writing results.md.
The two alternate (order flipped each round); the medians give the ratio evaluate / reference
(the issue's target: at most 2). Both extract every face, so the ratio is what the analyses
add to the features; a fresh process per command would add torch's import to both.

    .venv/bin/python bench/evaluate_cost.py --cache fgnet.h5 \\
        [--model ../shared/weights/mobilefacenet-casia-arcface.ckpt] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._reference import load_avg  # noqa: E402
from mtmim_cli.paths import shared_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="fgnet.h5")
    ap.add_argument("--model", default=str(shared_path("weights", "mobilefacenet-casia-arcface.ckpt")))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()
    import h5py

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.eval.trunk_memo import clear
    from mtmim_cli.orchestration.evaluate import evaluate
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    cache = Cache(a.cache)
    ident = cache.identity[np.flatnonzero(cache.usable)]

    def reference() -> float:
        out = tmp / "e.h5"
        out.unlink(missing_ok=True)
        embed_source(a.cache, a.model, out, progress=False)
        with h5py.File(out, "r") as f:
            e = f["embeddings"][:]
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return float(np.mean(ident[s.argmax(1)] == ident))

    def ours() -> float:
        cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("m", Path(a.model))],
                         cache=Path(a.cache), out=tmp / "eval" / "results.md")
        return float(evaluate(cfg, progress=False)["results"][0]["metrics"]["rank1"])

    paths = {"embed + rank-1": reference, "evaluate": ours}
    r1 = {k: fn() for k, fn in paths.items()}          # warm-up (model conversion, imports)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(a.rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            clear()   # no shared trunk between rounds: each path extracts its features
            t0 = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{Path(a.model).name} on {a.cache} ({len(ident)} faces), {a.rounds} alternating "
          f"rounds, load average {load_avg()}")
    for name in paths:
        print(f"  {name:15s} {med[name]:6.1f} s   rank-1 {100 * r1[name]:.2f}%")
    print(f"ratio evaluate / (embed + rank-1): {med['evaluate'] / med['embed + rank-1']:.2f}")


if __name__ == "__main__":
    main()
