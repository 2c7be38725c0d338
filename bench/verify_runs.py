"""Verification accuracy of the models the FG-NET recipe made, beside the model they started
from: on CACD-VS as released (adults, cross-age; the default), or on pairs drawn from any
cache (`--protocol pairs`, e.g. the held-out CelebA identities of a validation fold).

Every model in the given run folders (`<setting>-s<seed>/model.pt`, as bench/open_set.py
writes them) and the init are scored by one `evaluate` call, on the same pairs and folds.
Printed:
- the pairs used and, on CACD-VS, the init's accuracy beside an independent brute-force
  k-fold computation over its per-pair scores (pairs, labels and folds from the file names);
- per model: accuracy ± sd over folds, AUC, TAR@FAR=1e-2, and the paired difference to the
  init (per-pair decisions at each model's own fold thresholds; interval resampling pairs;
  exact McNemar on the pairs only one of them gets right);
- per setting: mean ± sd over seeds, and setting − init with an interval that resamples
  pairs and seeds together.

    .venv/bin/python bench/verify_runs.py --cache cacd-vs.h5 --runs runs/openset/runs \
        --settings baseline,age,mtmim
    .venv/bin/python bench/verify_runs.py --protocol pairs --cache runs/val/celeba_test.h5 \
        --runs runs/val/runs --out eval/val-celeba/results.md
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


def brute_force_kfold(scores: np.ndarray, same: np.ndarray, fold: np.ndarray,
                      at_score: bool = False) -> tuple[float, float]:
    """Accuracy (mean, population sd over folds) with each fold's threshold the best on the
    other folds, written without `eval.metrics`: every partition of the training scores is
    tried (accept the k highest, k = 0..n) and of the best the one accepting most wins; the
    threshold sits midway in that gap, or (`at_score`) at the lowest accepted training score."""
    accs = []
    for f in np.unique(fold):
        tr, te = scores[fold != f], fold == f
        order = np.argsort(-tr, kind="mergesort")
        s_desc, y_desc = tr[order], same[fold != f][order]
        best, best_k = -1, 0
        for k in range(len(tr) + 1):
            if 0 < k < len(tr) and s_desc[k] == s_desc[k - 1]:
                continue   # cannot split equal scores
            correct = int(y_desc[:k].sum()) + int((~y_desc[k:]).sum())
            if correct >= best:   # a tie goes to the lower threshold (more accepted)
                best, best_k = correct, k
        if best_k == 0:
            thr = s_desc[0] + 1.0
        elif best_k == len(tr):
            thr = s_desc[-1] - 1.0
        else:
            thr = s_desc[best_k - 1] if at_score else 0.5 * (s_desc[best_k - 1] + s_desc[best_k])
        accs.append(float(np.mean((scores[te] >= thr) == same[te])))
    return float(np.mean(accs)), float(np.std(accs))


def find_runs(folders: list[str], settings: list[str] | None) -> list[tuple[str, int, Path]]:
    """(setting, seed, model.pt) of every finished run, settings in the order asked for."""
    found = []
    for folder in folders:
        for run in sorted(Path(folder).iterdir()):
            m = RUN_RE.match(run.name)
            if m and (run / "model.pt").is_file():
                found.append((m["setting"], int(m["seed"]), run / "model.pt"))
    if settings:
        missing = [s for s in settings if s not in {f[0] for f in found}]
        if missing:
            sys.exit(f"error: no finished run of setting {missing[0]} in {', '.join(folders)}")
        found = sorted((f for f in found if f[0] in settings),
                       key=lambda f: (settings.index(f[0]), f[1]))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from mtmim_cli.paths import shared_dir

    ap.add_argument("--protocol", choices=("cacd-vs", "pairs"), default="cacd-vs")
    ap.add_argument("--cache", default="cacd-vs.h5",
                    help="a --format cacd-vs cache, or any cache for --protocol pairs")
    ap.add_argument("--n-pairs", type=int, default=6000, help="pairs drawn (--protocol pairs)")
    ap.add_argument("--runs", action="append", required=True,
                    help="folder of <setting>-s<seed>/model.pt runs (repeat)")
    ap.add_argument("--settings", default="", help="comma-separated settings (default: all)")
    ap.add_argument("--init", default=str(shared_dir() / "weights/mobilefacenet-casia-arcface.ckpt"))
    ap.add_argument("--out", default="eval/cacd-vs/results.md", help="evaluate's results.md")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--allow-trained-on", action="store_true",
                    help="score models that trained on test images (the tables say so)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()   # as `mtmim` does, before torch loads

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.compare import bootstrap_difference
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.eval.metrics import best_threshold, fold_labels
    from mtmim_cli.eval.outcomes import read_outcomes
    from mtmim_cli.eval.output_set import output_paths
    from mtmim_cli.orchestration.evaluate import evaluate
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(a.threads)
    runs = find_runs(a.runs, [s for s in a.settings.split(",") if s] or None)
    models = [ModelArg("init", Path(a.init))] + [ModelArg(f"{s}@s{k}", p) for s, k, p in runs]
    out = Path(a.out)
    payload = evaluate(EvalConfig(protocol=a.protocol, cache=Path(a.cache), models=models,
                                  out=out, resamples=a.resamples, age_probe=False, mi_steps=0,
                                  n_pairs=a.n_pairs, allow_trained_on=a.allow_trained_on,
                                  command=" ".join(sys.argv)), progress=False)
    outcomes = read_outcomes(output_paths(out)["outcomes"])["models"]
    metrics = {r["model"]: r["metrics"] for r in payload["results"]}
    origin = payload["pairs_origin"]
    print(payload["variant_text"].split("; features")[0])
    for r in payload["results"]:
        if r["test_faces"].get("trained_on"):
            print(f"{r['model']}: trained on {r['test_faces']['trained_on']} of the "
                  f"{r['test_faces']['test_images']} test images (--allow-trained-on)")
    n = len(outcomes["init"]["correct"])
    if a.protocol == "cacd-vs":
        print(f"Published rows beside it: {'yes' if payload['benchmark']['comparable'] else 'no'} "
              f"({payload['benchmark']['reason']})")
        same, fold = check_init(Cache(a.cache), outcomes["init"], metrics["init"], origin)
    else:
        # drawn pairs: 10 contiguous folds (eval.pairs); labels from the per-pair outcomes
        fold = fold_labels(n, 10)
        o = outcomes["init"]
        same = np.asarray(o["correct"], bool) == (np.asarray(o["score"]) >= np.asarray(
            metrics["init"]["thresholds"])[fold])

    init = np.asarray(outcomes["init"]["correct"], np.float64)
    print("\n| Model | Accuracy % (± sd over folds) | AUC | TAR@FAR=1e-2 % | false accepts / "
          "rejects | best within each fold % | − init, points [95%, pairs resampled] | "
          "only it / only init right | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in [m.label for m in models]:
        m, o = metrics[label], outcomes[label]
        tar = next(e["tar_at_far"] for e in m["tar_at_fars"] if e["far"] == 1e-2)
        wrong, scores = ~np.asarray(o["correct"], bool), np.asarray(o["score"], np.float64)
        # the fold's own best threshold: how separable its pairs are, with no threshold
        # carried over from other folds
        within = np.mean([best_threshold(scores[fold == f], same[fold == f])[1]
                          for f in np.unique(fold)])
        cells = [f"{100 * m['accuracy']:.2f} ± {100 * m['std']:.2f}", f"{m['auc']:.4f}",
                 "n/a" if tar is None else f"{100 * tar:.2f}",
                 f"{int(np.sum(wrong & ~same))} / {int(np.sum(wrong & same))}",
                 f"{100 * within:.2f}"]
        if label == "init":
            cells += ["–", "–", "–"]
        else:
            d = bootstrap_difference(np.asarray(outcomes[label]["correct"], np.float64), init,
                                     resamples=a.resamples, unit_name="pairs")
            cells += [f"{100 * d.diff:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]",
                      f"{d.a_only} / {d.b_only}", f"{d.p_mcnemar:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print("\n| Setting | Seeds | Accuracy % (mean ± sd over seeds) | − init, points "
          "[95%, pairs and seeds resampled] | seeds below init |")
    print("|---|---|---|---|---|")
    for setting in dict.fromkeys(s for s, _, _ in runs):
        labels = [f"{s}@s{k}" for s, k, _ in runs if s == setting]
        acc = np.array([metrics[x]["accuracy"] for x in labels]) * 100
        A = np.stack([np.asarray(outcomes[x]["correct"], np.float64) for x in labels])
        d = bootstrap_difference(A, init, resamples=a.resamples, unit_name="pairs")
        below = int(np.sum(acc < 100 * metrics["init"]["accuracy"]))
        sd = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
        print(f"| {setting} | {len(labels)} | {acc.mean():.2f}{sd} | {100 * d.diff:+.2f} "
              f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {below} of {len(labels)} |")


def check_init(cache, outcome: dict, m0: dict, origin: dict) -> tuple[np.ndarray, np.ndarray]:
    """The init's CACD-VS figure against a computation that shares nothing with evaluate's
    scorer but the scores: pairs, labels and folds from the file names by the release's
    rule, written out here again (pair NNNN: fold NNNN // 400 + 1, genuine when NNNN % 400 <
    200), and the threshold search brute force."""
    photos: dict[int, dict[int, int]] = {}
    for k, path in enumerate(cache.paths):
        number, photo = Path(path).stem.split("_")
        photos.setdefault(int(number), {})[int(photo)] = k
    usable = cache.usable
    pair = np.array(sorted(p for p, d in photos.items()
                           if len(d) == 2 and usable[d[0]] and usable[d[1]]))
    same, fold = pair % 400 < 200, pair // 400 + 1
    scores = np.asarray(outcome["score"], np.float64)
    if len(scores) != len(pair):
        sys.exit(f"error: evaluate scored {len(scores)} pairs, the file names give {len(pair)}")
    mid, mid_sd = brute_force_kfold(scores, same, fold)
    low, low_sd = brute_force_kfold(scores, same, fold, at_score=True)
    print(f"init: evaluate {100 * m0['accuracy']:.2f} ± {100 * m0['std']:.2f}; brute-force "
          f"k-fold over its scores {100 * mid:.2f} ± {100 * mid_sd:.2f} (threshold midway in "
          f"the training gap, evaluate's rule; {100 * low:.2f} ± {100 * low_sd:.2f} with it at "
          f"the lowest accepted training score)")
    print(f"{len(pair)} pairs in folds {sorted(set(fold.tolist()))}; "
          f"{len(origin['dropped_pairs'])} left out (a photo without a face)")
    return same, fold


if __name__ == "__main__":
    from mtmim_cli.errors import MtmimError

    try:
        main()
    except MtmimError as exc:   # one line for a bench's user, as the CLI does
        sys.exit(f"error: {exc}")
