"""What `--recipe auto`'s general-face guard says about finished models: every model in the
given run folders (`<setting>-s<seed>/model.pt`, as bench/open_set.py writes them) against
the init, on the guard cache's photos a search would score (the same seeded subset).

Printed per model, each against the init on the same photos:
- the guard's own figure: leave-one-out rank-1 minus the init's, with the paired
  identity-bootstrap interval, and the verdict under the declared rule
  (auto_validation.guard_difference);
- beside it, for comparison: TAR at FAR 1e-3 over all pairs (each model at its own
  threshold) with its paired identity-bootstrap interval and the verdict the same rule would
  give it (tried as a second guard figure in stop 35 and left out), and the all-pairs
  verification AUC (the guard before FORMAT 3).
A brute-force check of the init's rank-1 (a Python loop over photos) is printed first.

    .venv/bin/python bench/guard_check.py --guard celeba-train.h5 \
        --runs runs/casia-auto-v3/runs --settings mtmim,baseline,small-mtmim,small-baseline
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN_RE = re.compile(r"^(?P<setting>.+)-s(?P<seed>\d+)$")
CASIA = "../shared/weights/mobilefacenet-casia-arcface.ckpt"
FAR = 1e-3


def brute_rank1(feats: np.ndarray, ident: np.ndarray) -> float:
    """Leave-one-out rank-1 over the photos that have a mate, by a loop (no eval code)."""
    hits = []
    for i in range(len(feats)):
        if np.sum(ident == ident[i]) < 2:
            continue
        s = feats @ feats[i]
        s[i] = -np.inf
        hits.append(ident[int(np.argmax(s))] == ident[i])
    return float(np.mean(hits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guard", required=True, help="the general-face cache given as --auto-guard")
    ap.add_argument("--runs", required=True, help="folder of <setting>-s<seed> run folders")
    ap.add_argument("--settings", default="", help="comma list of settings (default: all)")
    ap.add_argument("--init", default=CASIA, help="the model the runs started from")
    ap.add_argument("--seed", type=int, default=0, help="the search seed whose subset is scored")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.metrics import roc_auc, tar_at_far
    from mtmim_cli.eval.runners import FeatureOptions
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.orchestration.auto_grid import GUARD_TOLERANCE, LEVEL
    from mtmim_cli.orchestration.auto_validation import (
        GuardRef,
        guard_difference,
        guard_outcome,
        guard_rows,
    )

    if a.threads:
        torch.set_num_threads(a.threads)
    cache = Cache(a.guard)
    rows = guard_rows(cache, a.seed)
    ident = np.asarray(cache.identity)[rows]
    i, j = np.triu_indices(len(rows), k=1)
    same = ident[i] == ident[j]
    feat = FeatureOptions(flip="concat", device="cpu")
    wanted = {s for s in a.settings.split(",") if s}
    runs = sorted(p for p in Path(a.runs).iterdir() if RUN_RE.match(p.name)
                  and (p / "model.pt").exists()
                  and (not wanted or RUN_RE.match(p.name)["setting"] in wanted))
    if not runs:
        raise SystemExit(f"{a.runs}: no finished <setting>-s<seed> runs"
                         + (f" of {sorted(wanted)}" if wanted else ""))

    def figures(model) -> tuple[dict, float, float, np.ndarray]:
        f = feat.extract(model, cache, rows)
        s = np.einsum("nd,nd->n", f[i], f[j])
        return guard_outcome(f, ident, FAR), roc_auc(s, same), tar_at_far(s, same, FAR), f

    o0, auc0, tar0, f0 = figures(load_identity_model(a.init))
    ref = GuardRef.of(o0, ident)
    if abs(np.mean(o0["accepts"]) - tar0) > 1e-12:
        raise SystemExit(f"guard TAR {np.mean(o0['accepts'])} != metrics.tar_at_far {tar0}")
    print(f"guard {a.guard}: {len(rows)} photos of {len(np.unique(ident))} people, "
          f"{len(o0['hits'])} with a mate, {len(o0['accepts'])} genuine pairs "
          f"(search seed {a.seed}'s subset)")
    print(f"init {a.init}: rank-1 {np.mean(o0['hits']):.4f} (brute force "
          f"{brute_rank1(f0, ident):.4f}), all-pairs AUC {auc0:.4f}, TAR@FAR={FAR:g} "
          f"{tar0:.4f} (metrics.tar_at_far)")
    print(f"rule: refused when rank-1 falls by more than {GUARD_TOLERANCE:g} or its paired "
          f"{LEVEL:.0%} interval lies wholly below zero (the TAR verdict: the same rule on TAR)\n")
    print(f"| model | rank-1 Δ points [95%] | verdict | TAR@{FAR:g} Δ points [95%] | "
          "TAR verdict | all-pairs AUC Δ |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        o, auc, _, _ = figures(load_identity_model(run / "model.pt"))
        d = guard_difference([o], ref)
        print(f"| {run.name} | {100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, "
              f"{100 * d['high']:+.2f}] | {'passes' if d['ok'] else 'refused'} | "
              f"{100 * d['tar_diff']:+.2f} [{100 * d['tar_low']:+.2f}, "
              f"{100 * d['tar_high']:+.2f}] | {'passes' if d['tar_ok'] else 'refused'} | "
              f"{auc - auc0:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
