"""Two models compared over several seeds at once: the outcomes of evaluate runs that differ
only in --seed (each its own folder), pooled into one paired difference whose interval resamples
identities and seeds, beside each seed's own difference.

A and B are two rows of the same runs (e.g. two re-fit modes), so within a run they share its
folds and seed: the pooled interval keeps that pairing (a replicate draws runs, and takes A and
B from the same drawn runs). Each run must be fgnet-loo on the given cache (the sha256 its
results.json records; its outcomes are one per cache record), and no two runs may share a seed.
Each run's outcomes are the <stem>.outcomes.json its results.json lists, with the sha256 it
records: a folder from before manifests, or an outcomes file changed since, is refused.

    .venv/bin/python bench/pool_seeds.py --cache fgnet.h5 --a casia/mtmim --b casia/baseline \\
        eval/refit-full-k10 eval/refit-full-k10-s1 eval/refit-full-k10-s2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pooled(runs: list[dict], a: str, b: str, identity: np.ndarray, resamples: int) -> dict:
    """Per-seed and pooled A - B rank-1 (points) from read_outcomes documents."""
    from mtmim_cli.eval.compare import bootstrap_difference

    A = np.stack([r["models"][a]["hit"].astype(float) for r in runs])
    B = np.stack([r["models"][b]["hit"].astype(float) for r in runs])
    per_seed = [bootstrap_difference(A[k], B[k], clusters=identity, resamples=resamples)
                for k in range(len(runs))]
    both = bootstrap_difference(A, B, clusters=identity, resamples=resamples, paired_seeds=True)
    return {"per_seed": per_seed, "pooled": both}


def check_run(folder: Path, results: dict, cache_sha256: str, cache: str) -> int:
    """The run's seed, once its results.json says it scored fgnet-loo on this cache (one
    outcome per cache record); MtmimError otherwise."""
    from mtmim_cli.errors import MtmimError

    if results.get("protocol") != "fgnet-loo":
        raise MtmimError(f"{folder}: protocol {results.get('protocol')}, not fgnet-loo (whose "
                         "outcomes are one per cache record)")
    inputs = results.get("inputs") or [{}]
    if inputs[0].get("sha256") != cache_sha256:
        raise MtmimError(f"{folder}: evaluated {inputs[0].get('path', 'another cache')} (sha256 "
                         f"{str(inputs[0].get('sha256'))[:12]}), not {cache} (sha256 "
                         f"{cache_sha256[:12]})")
    return int(results["variant"]["seed"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+",
                    help="evaluate outputs: each a results .json (or its folder) listing its outcomes")
    ap.add_argument("--cache", required=True, help="the cache the runs evaluated (identities)")
    ap.add_argument("--a", required=True, help="model label A, as in results.md")
    ap.add_argument("--b", required=True, help="model label B")
    ap.add_argument("--resamples", type=int, default=10000)
    a = ap.parse_args()

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.digest import file_sha256
    from mtmim_cli.errors import MtmimError
    from mtmim_cli.eval.outcomes import read_outcomes
    from mtmim_cli.eval.output_set import listed_file, read_manifest

    identity = Cache(a.cache).identity
    cache_sha = file_sha256(a.cache)
    runs, seeds = [], {}
    for folder in a.runs:
        manifest, results = read_manifest(folder)
        seed = check_run(Path(folder), results, cache_sha, a.cache)
        if seed in seeds:
            raise MtmimError(f"{folder}: seed {seed}, as {seeds[seed]}: pooling would count "
                             "one seed twice")
        seeds[seed] = folder
        # the outcomes this results.json lists, unchanged since (sha256), not any in the folder
        doc = read_outcomes(listed_file(manifest, results, "outcomes"))
        for label in (a.a, a.b):
            if label not in doc["models"]:
                raise MtmimError(f"{folder}: no model {label} (has {', '.join(doc['models'])})")
            if len(doc["models"][label]["hit"]) != len(identity):
                raise MtmimError(f"{folder}: {len(doc['models'][label]['hit'])} probes, but "
                                 f"{a.cache} holds {len(identity)} records")
        runs.append(doc)
    r = pooled(runs, a.a, a.b, identity, a.resamples)
    print(f"{a.a} − {a.b}, rank-1 points (95% interval, {len(np.unique(identity))} identities "
          "resampled; pooled: seeds too, A and B from the same drawn runs):")
    for folder, d in zip(a.runs, r["per_seed"], strict=True):
        print(f"  {folder}: {100 * d.mean_a:.2f} vs {100 * d.mean_b:.2f}: {100 * d.diff:+.2f} "
              f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}], only A / only B right "
              f"{d.a_only} / {d.b_only}, McNemar p {d.p_mcnemar:.3f}")
    p = r["pooled"]
    above = sum(d.diff > 0 for d in r["per_seed"])
    print(f"  pooled over {len(runs)} seeds: {100 * p.mean_a:.2f} vs {100 * p.mean_b:.2f}: "
          f"{100 * p.diff:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]; A above B in "
          f"{above} of {len(runs)} seeds")


if __name__ == "__main__":
    from mtmim_cli.errors import MtmimError

    try:
        main()
    except MtmimError as exc:   # one line for a bench's user, as the CLI does
        sys.exit(f"error: {exc}")
