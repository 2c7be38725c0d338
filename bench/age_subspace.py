"""Age removed in closed form, against the features as they are, on people no fit has seen.

For each model (the pretrained one, and any fine-tuned model.pt, e.g. the runs of
bench/open_set.py): the within-identity age subspace (mtmim_cli/eval/age_subspace.py) is
fitted on the FG-NET training subjects of the fixed open-set split and projected out of every
photo's features (image and mirror alike, then concatenated as `evaluate --flip concat`).
Both versions are then scored on the held-out FG-NET subjects (leave-one-out rank-1 within
them; cross-age verification AUC over every pair of a photo aged <= --young-max with one aged
>= --adult-min; the toolkit's identity-grouped age probe) and on the held-out CelebA
identities (leave-one-out rank-1: what general faces lose). Validation: the same gain measured
on folds of the training subjects (fitted on the others), --val-repeats times 4 folds.

Models named NAME-sK (or NAME@sK) are seeds of one setting: their rows are pooled (mean over
seeds), and intervals resample identities and seeds (each replicate draws identities, and
seeds with replacement: the same seeds for a model as it is and with age removed, each
setting's own when two settings are compared). The pretrained model is the reference for
"every setting against the pretrained model".

    .venv/bin/python bench/age_subspace.py --fgnet fgnet.h5 --celeba celeba.h5 \\
        --runs runs/openset/runs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _setting(name: str) -> str:
    return re.sub(r"[-@]s\d+$", "", name)


def _rank1_hits(f: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Leave-one-out rank-1 per photo (1.0 or 0.0), as evaluate's fgnet-loo scores it."""
    from mtmim_cli.eval.features import l2_normalise
    from mtmim_cli.eval.outcomes import probe_outcomes

    g = l2_normalise(f)
    return probe_outcomes(g, identity, g, identity,
                          query_index=np.arange(len(g)))["hit"].astype(np.float64)


def _views(model_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from mtmim_cli.eval.features import extract_views
    from mtmim_cli.models.identity import load_identity_model

    a, b = extract_views(load_identity_model(model_path), images)
    return a.astype(np.float64), b.astype(np.float64)


def _removed(views: tuple[np.ndarray, np.ndarray], basis: np.ndarray) -> np.ndarray:
    from mtmim_cli.eval.age_subspace import remove_subspace

    return _concat(tuple(remove_subspace(v, basis) for v in views))


def _concat(views: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from mtmim_cli.eval.features import combine_views

    return combine_views(views[0], views[1], "concat").astype(np.float64)


def _fit(views: tuple[np.ndarray, np.ndarray], rows: np.ndarray, identity: np.ndarray,
         age: np.ndarray) -> np.ndarray:
    from mtmim_cli.eval.age_subspace import fit_age_subspace
    from mtmim_cli.eval.agebins import FGNET_AGE_EDGES

    x = np.concatenate([views[0][rows], views[1][rows]])
    return fit_age_subspace(x, np.tile(identity[rows], 2), np.tile(age[rows], 2),
                            FGNET_AGE_EDGES)


def _shares(f: np.ndarray, basis: np.ndarray, identity: np.ndarray, age: np.ndarray,
            young_max: float, adult_min: float) -> tuple[float, float]:
    """The share of the squared distance between young and adult photos (concatenated,
    normalised features) that lies in the age subspace (in both halves), over genuine and
    over impostor pairs: a common ageing direction adds to both alike."""
    from mtmim_cli.eval.cross_age import cross_age_pairs_all

    young, adult, same = cross_age_pairs_all(identity, age, young_max, adult_min)
    d = basis.shape[0]
    diff = f[young][:, None, :] - f[adult][None]
    total = (diff ** 2).sum(-1)
    inside = ((diff[..., :d] @ basis) ** 2).sum(-1) + ((diff[..., d:] @ basis) ** 2).sum(-1)
    return float(inside[same].sum() / total[same].sum()), \
        float(inside[~same].sum() / total[~same].sum())


def auc_difference(auc: dict[str, float], reps: dict[str, np.ndarray], a_names: list[str],
                   b_names: list[str], *, paired: bool, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """Cross-age AUC of setting A minus setting B (each the mean over its seeds' models) and
    its percentile interval: replicate r takes every model's AUC in identity draw r
    (`reps`, shared draws) and draws each setting's seeds with replacement, the same draw
    for both when `paired` (a_names[k] and b_names[k] are one model before and after)."""
    from mtmim_cli.eval.compare import seed_resampled_difference

    d = float(np.mean([auc[x] for x in a_names]) - np.mean([auc[x] for x in b_names]))
    r = seed_resampled_difference(np.stack([reps[x] for x in a_names]),
                                  np.stack([reps[x] for x in b_names]), paired=paired, seed=seed)
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return d, float(lo), float(hi)


def _val_cell(val: np.ndarray) -> str:
    if len(val) == 0:
        return "–"
    return (f"{100 * val[:, 0].mean():+.2f}, {np.nanmean(val[:, 1]):+.4f} "
            f"({int((val[:, 0] > 0).sum())}/{len(val)}, {int((val[:, 1] > 0).sum())}/"
            f"{int(np.isfinite(val[:, 1]).sum())})")


def main() -> None:
    from mtmim_cli.paths import shared_dir

    shared = shared_dir()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fgnet", default="fgnet.h5", help="aligned FG-NET cache (all 1002 photos)")
    ap.add_argument("--celeba", default="celeba.h5", help="aligned CelebA-subset cache")
    ap.add_argument("--split", default=str(shared / "data/splits/open-set.json"))
    ap.add_argument("--init", default=str(shared / "weights/mobilefacenet-casia-arcface.ckpt"),
                    help="the pretrained model (reference)")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH (repeat)")
    ap.add_argument("--runs", default=None,
                    help="a folder of runs (each RUN/model.pt, named by its folder)")
    ap.add_argument("--settings", default=None,
                    help="with --runs: only the runs of these settings (comma-separated)")
    ap.add_argument("--reference", default="baseline",
                    help="the setting(s) every other one is also compared with (comma-separated)")
    ap.add_argument("--young-max", type=float, default=10)
    ap.add_argument("--adult-min", type=float, default=18)
    ap.add_argument("--val-repeats", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from mtmim_cli.threads import passive_openmp

    passive_openmp()   # as `mtmim` does, before torch loads

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.identity_lists import listed_labels
    from mtmim_cli.eval.compare import bootstrap_difference
    from mtmim_cli.eval.cross_age import bootstrap_cross_age_auc, cross_age_auc
    from mtmim_cli.eval.leakage import age_probe
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(a.threads)
    t0 = time.perf_counter()
    split = json.loads(Path(a.split).read_text())
    fg, cb = Cache(a.fgnet), Cache(a.celeba)
    subject = np.array([int(n) for n in fg.identity_names])[fg.identity]
    train_subjects = np.array(split["fgnet"]["train_subjects"])
    train = np.isin(subject, train_subjects)
    test = np.isin(subject, split["fgnet"]["test_subjects"])
    cb_rows = np.flatnonzero(listed_labels(cb.identity_names, [
        str(v) for v in split["celeba_subset"]["test_identities"]])[cb.identity])
    fg_images = fg.images(np.arange(len(fg)))
    cb_images = cb.images(cb_rows)
    ident, age, cb_ident = fg.identity, fg.age, cb.identity[cb_rows]

    models = [("pretrained", Path(a.init))]
    models += [(t.partition("=")[0], Path(t.partition("=")[2])) for t in a.model]
    if a.runs:
        only = set(a.settings.split(",")) if a.settings else None
        models += [(p.parent.name, p) for p in sorted(Path(a.runs).glob("*/model.pt"))
                   if only is None or _setting(p.parent.name) in only]
    print(f"{len(models)} models; FG-NET train {int(train.sum())} photos of "
          f"{len(np.unique(subject[train]))} subjects, test {int(test.sum())} photos of "
          f"{len(np.unique(subject[test]))}; CelebA test {len(cb_rows)} photos", flush=True)

    rng = np.random.default_rng(0)
    val_folds = [np.array_split(rng.permutation(train_subjects), 4)
                 for _ in range(a.val_repeats)]
    res: dict[str, dict] = {}
    for name, path in models:
        views = _views(path, fg_images)
        cviews = _views(path, cb_images)
        basis = _fit(views, np.flatnonzero(train), ident, age)
        row: dict = {"k": basis.shape[1]}
        as_is = _concat(views)
        for tag, f, c in (("as_is", as_is, _concat(cviews)),
                          ("removed", _removed(views, basis), _removed(cviews, basis))):
            row[tag] = {"fg": _rank1_hits(f[test], ident[test]),
                        "cb": _rank1_hits(c, cb_ident), "feat": f[test],
                        "r2": age_probe(f[test], age[test], ident[test])["age_r2"]}
        row["share"] = _shares(row["as_is"]["feat"], basis, ident[test], age[test],
                               a.young_max, a.adult_min)
        gains = []
        for folds in val_folds:
            for held in folds:
                v = np.isin(subject, held)
                b = _fit(views, np.flatnonzero(train & ~v), ident, age)
                fv, rv = as_is[v], _removed((views[0][v], views[1][v]), b)
                try:
                    d_auc = (cross_age_auc(rv, ident[v], age[v], young_max=a.young_max,
                                           adult_min=a.adult_min)
                             - cross_age_auc(fv, ident[v], age[v], young_max=a.young_max,
                                             adult_min=a.adult_min))
                except ValueError:   # a fold without a young-adult genuine pair
                    d_auc = np.nan
                gains.append((_rank1_hits(rv, ident[v]).mean() - _rank1_hits(fv, ident[v]).mean(),
                              d_auc))
        row["val"] = np.array(gains).reshape(-1, 2)
        res[name] = row
        print(f"{name}: k {row['k']}, FG-NET rank-1 {100 * row['as_is']['fg'].mean():.2f} -> "
              f"{100 * row['removed']['fg'].mean():.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    feats = {f"{n}|{t}": res[n][t]["feat"] for n in res for t in ("as_is", "removed")}
    reps = bootstrap_cross_age_auc(feats, ident[test], age[test], young_max=a.young_max,
                                   adult_min=a.adult_min, resamples=a.resamples)
    auc = {k: cross_age_auc(f, ident[test], age[test], young_max=a.young_max,
                            adult_min=a.adult_min) for k, f in feats.items()}
    settings: dict[str, list[str]] = {}
    for n in res:
        settings.setdefault(_setting(n), []).append(n)

    def ms(v: list[float], scale: float = 100, d: int = 2) -> str:
        x = np.array(v) * scale
        return f"{x.mean():.{d}f}" + (f" ± {x.std(ddof=1):.{d}f}" if len(x) > 1 else "")

    def iv(lo: float, hi: float, scale: float = 100, d: int = 2) -> str:
        return f"[{scale * lo:+.{d}f}, {scale * hi:+.{d}f}]"

    te_ids = ident[test]
    print(f"\nHeld-out FG-NET subjects {min(split['fgnet']['test_subjects'])}-"
          f"{max(split['fgnet']['test_subjects'])} and CelebA test identities; the age subspace "
          f"fitted on the training subjects; mean ± sd over seeds; Δ intervals resample identities "
          f"and seeds (one draw of seeds for as is and removed). Cross-age AUC: photos aged "
          f"<= {a.young_max:g} against >= {a.adult_min:g} "
          f"({len(np.unique(te_ids[age[test] <= a.young_max]))} and "
          f"{len(np.unique(te_ids[age[test] >= a.adult_min]))} identities).\n")
    print("| Setting | Seeds | dims removed | FG-NET rank-1 % (as is → removed) | Δ [95%] | "
          "cross-age AUC (as is → removed) | Δ [95%] | age R² (as is → removed) | "
          "CelebA rank-1 % (as is → removed) | validation Δ rank-1, Δ AUC (folds > 0) | "
          "subspace share of young–adult distance² (genuine / impostor) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, names in settings.items():
        A = np.stack([res[n]["removed"]["fg"] for n in names])
        B = np.stack([res[n]["as_is"]["fg"] for n in names])
        # the same models with and without the subspace: seed k of both sides together
        d = bootstrap_difference(A, B, clusters=te_ids, resamples=a.resamples, paired_seeds=True)
        da = auc_difference(auc, reps, [f"{n}|removed" for n in names],
                            [f"{n}|as_is" for n in names], paired=True)
        val = np.concatenate([res[n]["val"] for n in names])
        print(f"| {s} | {len(names)} | {res[names[0]]['k']} | "
              f"{ms([B_.mean() for B_ in B])} → {ms([A_.mean() for A_ in A])} | "
              f"{100 * d.diff:+.2f} {iv(d.low, d.high)} | "
              f"{ms([auc[n + '|as_is'] for n in names], 1, 4)} → "
              f"{ms([auc[n + '|removed'] for n in names], 1, 4)} | "
              f"{da[0]:+.4f} {iv(da[1], da[2], 1, 4)} | "
              f"{ms([res[n]['as_is']['r2'] for n in names], 1, 3)} → "
              f"{ms([res[n]['removed']['r2'] for n in names], 1, 3)} | "
              f"{ms([res[n]['as_is']['cb'].mean() for n in names])} → "
              f"{ms([res[n]['removed']['cb'].mean() for n in names])} | "
              f"{_val_cell(val)} | "
              f"{ms([res[n]['share'][0] for n in names], 100, 1)}% / "
              f"{ms([res[n]['share'][1] for n in names], 100, 1)}% |")
    if len(settings) > 1:
        print("\nFeatures as they are, each setting against the pretrained model and against "
              f"the reference setting(s) ({a.reference}); paired, identities and seeds "
              "resampled:\n")
        print("| A | B | FG-NET rank-1 Δ (points) [95%] | cross-age AUC Δ [95%] | "
              "CelebA rank-1 Δ (points) [95%] |")
        print("|---|---|---|---|---|")
        for ref in ("pretrained", *a.reference.split(",")):
            for s, names in settings.items():
                if s in ("pretrained", ref) or ref not in settings:
                    continue
                cells = []
                for key, clusters in (("fg", te_ids), ("cb", cb_ident)):
                    d = bootstrap_difference(
                        np.stack([res[n]["as_is"][key] for n in names]),
                        np.stack([res[n]["as_is"][key] for n in settings[ref]]),
                        clusters=clusters, resamples=a.resamples)
                    cells.append(f"{100 * d.diff:+.2f} {iv(d.low, d.high)}")
                da = auc_difference(auc, reps, [f"{n}|as_is" for n in names],
                                    [f"{n}|as_is" for n in settings[ref]], paired=False)
                print(f"| {s} | {ref} | {cells[0]} | {da[0]:+.4f} {iv(da[1], da[2], 1, 4)} | "
                      f"{cells[1]} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
