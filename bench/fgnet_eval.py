"""The real FG-NET leave-one-out figures with the shared CASIA MobileFaceNet.

Needs an aligned FG-NET cache (made by `mtmim align`, outside the repository):

    mtmim align ../shared/data/fgnet/images --format fgnet --out fgnet.h5 --on-miss center
    .venv/bin/python bench/fgnet_eval.py --cache fgnet.h5 [--out eval/fgnet-bench] [--parts none,head,full]

Prints, each with the equivalent `mtmim evaluate` command:
- `--refit none` with the mirror features concatenated, summed, and without the mirror,
  beside a plain reference computed in this process (dense score matrix, argmax);
- `--refit head`: all 1002 rounds (factorization and heads re-fit on cached encoder features
  per round), rank-1 and wall time;
- `--refit full --folds 10`: ten rounds of whole-model fine-tuning, rank-1 and wall time.
Rounds are stored under --out, so a rerun resumes. To spread the head rounds over several
processes, run the printed command with `--shard I/N` in N processes and once more without.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.orchestration.evaluate import evaluate
from mtmim_cli.paths import shared_path


def _cmd(args: list[str]) -> str:
    return "mtmim evaluate " + " ".join(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=shared_path("weights", "mobilefacenet-casia-arcface.ckpt"))
    ap.add_argument("--out", type=Path, default=Path("eval/fgnet-bench"))
    ap.add_argument("--parts", default="none,head,full")
    # The settings the closing-note figures were made with on 2 busy cores: 2 epochs at the
    # paper's FG-NET batch of 1001 per head re-fit; 3 steps of batch 64 per full round.
    ap.add_argument("--head-options", default='{"epochs": 2, "batch_size": 1001}',
                    help="JSON for fit_heads_on_features")
    ap.add_argument("--full-options", default='{"epochs": 1, "max_steps": 3, "batch_size": 64, "lr": 0.0001}',
                    help="JSON for finetune")
    a = ap.parse_args()
    parts = a.parts.split(",")
    model = ModelArg("casia-mobilefacenet", a.model)
    base = ["--protocol fgnet-loo", f"--cache {a.cache}", f"--model casia-mobilefacenet={a.model}"]

    if "none" in parts:
        from mtmim_cli.data.cache import Cache
        from mtmim_cli.eval.features import combine_views, extract_views
        from mtmim_cli.models.identity import load_identity_model

        cache = Cache(a.cache)
        idx = np.flatnonzero(cache.usable)
        ids = cache.identity[idx]
        # Plain reference: one extraction, dense score matrix, argmax without self.
        t0 = time.perf_counter()
        f, ff = extract_views(load_identity_model(a.model), cache, idx)
        ref = {}
        for flip in ("concat", "sum", "none"):
            x = combine_views(f, ff, flip)
            s = x @ x.T
            np.fill_diagonal(s, -np.inf)
            ref[flip] = float(np.mean(ids[np.argmax(s, axis=1)] == ids))
        ref_s = time.perf_counter() - t0
        print(f"FG-NET: {len(cache)} images, {len(idx)} with a face; reference (dense) computed in {ref_s:.1f} s")
        for flip in ("concat", "sum", "none"):
            args = [*base, f"--flip {flip}", f"--out {a.out}/none-{flip}/results.md"]
            cfg = EvalConfig(protocol="fgnet-loo", models=[model], cache=a.cache, flip=flip,
                             out=a.out / f"none-{flip}" / "results.md", command=_cmd(args))
            t0 = time.perf_counter()
            m = evaluate(cfg, progress=False)["results"][0]["metrics"]
            print(f"  refit none, flip {flip:6s}: rank-1 over the photos with a face "
                  f"{m['rank1_faces']:.4f} (all photos, misses as failures: {m['rank1']:.4f}); "
                  f"reference {ref[flip]:.4f}; "
                  f"{time.perf_counter() - t0:.1f} s\n    {_cmd(args)}")

    for refit, folds, opts in (("head", None, a.head_options), ("full", 10, a.full_options)):
        if refit not in parts:
            continue
        args = [*base, f"--refit {refit}", *([f"--folds {folds}"] if folds else []),
                f"--refit-options '{opts}'", f"--out {a.out}/{refit}/results.md"]
        cfg = EvalConfig(protocol="fgnet-loo", models=[model], cache=a.cache, refit=refit,
                         folds=folds, refit_options=json.loads(opts),
                         out=a.out / refit / "results.md", command=_cmd(args))
        t0 = time.perf_counter()
        try:
            m = evaluate(cfg, progress=True)["results"][0]["metrics"]
        except MtmimError as exc:
            print(f"  refit {refit}: not run: {exc}")
            continue
        print(f"  refit {refit}{f' --folds {folds}' if folds else ''}: rank-1 {m['rank1']:.4f} over "
              f"{m['rounds']} rounds; wall {time.perf_counter() - t0:.1f} s (sum of round times "
              f"{m['round_seconds_total']:.1f} s; rounds already stored are not re-run)\n    {_cmd(args)}")


if __name__ == "__main__":
    main()
