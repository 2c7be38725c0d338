"""`--recipe auto`'s validation: identity-grouped folds of the training side, a model's
criterion on a fold (cross-age AUC with paired bootstrap replicates, or leave-one-out rank-1),
the general-face guard (leave-one-out rank-1 against the init with a paired interval; TAR@FAR
beside it as a diagnostic), and the table and choice over the candidates."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtmim_cli.errors import MtmimError
from mtmim_cli.orchestration.auto_grid import (
    ADULT_MIN,
    GUARD_MAX_IMAGES,
    GUARD_RESAMPLES,
    GUARD_TOLERANCE,
    LEVEL,
    RESAMPLES,
    YOUNG_MAX,
    Setting,
)


@dataclass
class Folds:
    """The training side and its validation folds, as cache records and identity names."""

    records: np.ndarray              # usable, not excluded, listed training records
    names: np.ndarray                # identity name per record
    folds: list[list[str]]           # identity names per fold

    def validation(self, f: int) -> np.ndarray:
        return self.records[np.isin(self.names, self.folds[f])]

    def training_names(self, f: int) -> list[str]:
        held = set(self.folds[f])
        return sorted({str(n) for n in self.names} - held)


def validation_folds(cache_path: str | os.PathLike, train_identities: str | None,
                     exclude: Sequence[int] | None, folds: int, seed: int) -> Folds:
    """Identity-grouped validation folds over the identities the fine-tune trains on (never
    the excluded records: a leave-out round's test photos), dealt by a seeded permutation."""
    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.train.transfer import identity_mask

    if folds < 2:
        raise MtmimError(f"--recipe auto: {folds} validation fold(s); need at least 2")
    base = CacheDataset([cache_path], train=False)
    keep = np.ones(len(base), bool)
    if exclude is not None and len(exclude):
        keep &= ~np.isin(base.record, np.asarray(exclude, np.int64))
    if train_identities:
        keep &= identity_mask(base, range(1), read_identity_list(train_identities),
                              "--train-identities")
    cache = base.caches[0]
    records = base.record[keep]
    names = np.asarray(cache.identity_names, dtype=object)[cache.identity[records]].astype(str)
    ids = np.unique(names)
    if len(ids) < 2 * folds:
        raise MtmimError(f"{cache_path}: {len(ids)} training identities; --recipe auto needs at "
                         f"least {2 * folds} for {folds} validation folds")
    perm = np.random.default_rng([seed, 0xA070]).permutation(ids)
    return Folds(records, names, [sorted(str(n) for n in p) for p in np.array_split(perm, folds)])


def _scores(features: np.ndarray, ident: np.ndarray, age: np.ndarray, criterion: str,
            seed: int) -> dict[str, Any]:
    """A model's criterion on one fold's validation photos: the AUC and its bootstrap
    replicates (identity draws fixed by `seed`, so every model of the fold is paired), or
    the rank-1 hit of each probe that has a mate."""
    from mtmim_cli.eval.cross_age import bootstrap_cross_age_auc, cross_age_auc

    if criterion == "auc":
        value = cross_age_auc(features, ident, age, young_max=YOUNG_MAX, adult_min=ADULT_MIN)
        reps = bootstrap_cross_age_auc({"m": features}, ident, age, young_max=YOUNG_MAX,
                                       adult_min=ADULT_MIN, resamples=RESAMPLES, seed=seed)["m"]
        return {"value": value, "reps": [round(float(r), 8) for r in reps]}
    hits = loo_hits(features, ident)
    return {"value": float(np.mean(hits)), "hits": [int(h) for h in hits]}


def loo_hits(features: np.ndarray, ident: np.ndarray) -> np.ndarray:
    """Rank-1 hit of every photo that has a mate, against all the other photos."""
    s = features @ features.T
    np.fill_diagonal(s, -np.inf)
    probes = _probes(ident)
    return (ident[np.argmax(s[probes], axis=1)] == ident[probes]).astype(np.int64)


def _probes(ident: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(ident, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inv] >= 2)


def choose_criterion(ident: np.ndarray, age: np.ndarray, folds: Folds) -> str:
    """'auc' when every fold's validation people have genuine and impostor young x adult
    pairs, 'rank1' otherwise."""
    from mtmim_cli.eval.cross_age import cross_age_pairs_all

    for f in range(len(folds.folds)):
        rows = np.isin(folds.records, folds.validation(f))
        try:
            cross_age_pairs_all(ident[rows], age[rows], YOUNG_MAX, ADULT_MIN)
        except ValueError:
            return "rank1"
    return "auc"


@dataclass
class GuardRef:
    """The init's guard outcome: the rank-1 hit of each guard probe and the probes'
    identities (the bootstrap's clusters); for the TAR diagnostic (bench/guard_check.py) also
    the accept of each genuine pair at the init's own FAR threshold and the pairs' identities."""

    hits: np.ndarray
    ident: np.ndarray
    accepts: np.ndarray | None = None
    pair_ident: np.ndarray | None = None

    @classmethod
    def of(cls, outcome: dict[str, list[int]], ident: np.ndarray) -> GuardRef:
        """The reference from the init's guard_outcome on photos of identities `ident`."""
        accepts = outcome.get("accepts")
        return cls(np.asarray(outcome["hits"], np.int64), guard_probe_ident(ident),
                   None if accepts is None else np.asarray(accepts, np.int64),
                   None if accepts is None else guard_pair_ident(ident))


def guard_rows(cache, seed: int) -> np.ndarray:
    """The guard cache's photos a search scores: its usable records, or a seeded subset of
    GUARD_MAX_IMAGES of them."""
    rows = np.flatnonzero(cache.usable)
    if len(rows) > GUARD_MAX_IMAGES:
        rows = np.sort(np.random.default_rng([seed, 0x6A7D]).choice(rows, GUARD_MAX_IMAGES,
                                                                     replace=False))
    return rows


def guard_hits(features: np.ndarray, ident: np.ndarray) -> list[int]:
    """The guard's rank-1 outcome for one model: the leave-one-out rank-1 hit of every guard
    photo that has a mate. Rank-1 rather than the all-pairs AUC: on CASIA's retrained auto
    models the AUC fell 0.0015-0.0028 while rank-1 fell 0.37-0.60 points, every interval below
    zero, and those models lost 0.3-0.4 points on CACD-VS (docs/auto-recipe.md)."""
    return [int(h) for h in loo_hits(features, ident)]


def _genuine_pairs(ident: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of photos, and whether it is genuine."""
    i, j = np.triu_indices(len(ident), k=1)
    same = ident[i] == ident[j]
    return i, j, same


def guard_accepts(features: np.ndarray, ident: np.ndarray, far: float) -> list[int]:
    """A diagnostic beside the guard, not part of its rule: over every pair of guard photos,
    the threshold at which at most `far` of the impostor pairs are accepted (the model's own),
    and whether each genuine pair is accepted there (their mean is TAR@FAR). CACD-VS's errors
    after a fine-tune were impostors accepted at a shared threshold (docs/results.md), the tail
    this figure watches; on the guard's people it fell for every fine-tune, for SFace's too,
    which gain on CACD-VS, so it cannot tell the two apart (docs/auto-recipe.md)."""
    from mtmim_cli.eval.metrics import threshold_at_far

    ident = np.asarray(ident)
    i, j, same = _genuine_pairs(ident)
    if not same.any() or same.all():
        raise MtmimError("the guard cache needs photos of at least two people, some with mates")
    s = (features @ features.T)[i, j]   # at most GUARD_MAX_IMAGES photos: n^2 fits
    t = threshold_at_far(s, same, far)
    return [int(x) for x in s[same] >= t]


def guard_outcome(features: np.ndarray, ident: np.ndarray, far: float | None = None
                  ) -> dict[str, list[int]]:
    """One model's guard outcome on the guard photos: its rank-1 hits, and with `far` the
    TAR diagnostic's accepts."""
    out = {"hits": guard_hits(features, ident)}
    if far is not None:
        out["accepts"] = guard_accepts(features, ident, far)
    return out


def guard_probe_ident(ident: np.ndarray) -> np.ndarray:
    """The identities of the photos guard_hits scores, in its order."""
    return np.asarray(ident)[_probes(np.asarray(ident))]


def guard_pair_ident(ident: np.ndarray) -> np.ndarray:
    """The identity of each genuine pair guard_accepts scores, in its order."""
    ident = np.asarray(ident)
    i, _, same = _genuine_pairs(ident)
    return ident[i[same]]


def _guard_figure(models: Sequence[Sequence[int]], ref: np.ndarray, clusters: np.ndarray
                  ) -> dict[str, Any]:
    from mtmim_cli.eval.compare import bootstrap_difference

    k = len(models)
    a = np.concatenate([np.asarray(h, np.float64) for h in models])
    b = np.tile(ref.astype(np.float64), k)
    d = bootstrap_difference(a, b, clusters=np.tile(clusters, k), resamples=GUARD_RESAMPLES,
                             level=LEVEL, seed=0)
    return {"diff": d.diff, "low": d.low, "high": d.high,
            "ok": bool(d.diff >= -GUARD_TOLERANCE and d.high >= 0)}


def guard_difference(models: Sequence[dict[str, Sequence[int]]], ref: GuardRef) -> dict[str, Any]:
    """One candidate's guard against the init: the mean rank-1 of its models (one per fold,
    or the one retrained model) minus the init's, with a paired identity-cluster bootstrap
    interval; `ok` unless it falls by more than GUARD_TOLERANCE or its interval lies wholly
    below zero (validation says it is worse). Where the reference has the TAR diagnostic the
    same figure for it (tar_diff/tar_low/tar_high, and tar_ok under the same rule), which
    does not enter `ok`."""
    out = {**_guard_figure([m["hits"] for m in models], ref.hits, ref.ident),
           "tar_diff": None, "tar_low": None, "tar_high": None, "tar_ok": True}
    if ref.accepts is not None:
        tar = _guard_figure([m["accepts"] for m in models], ref.accepts, ref.pair_ident)
        out.update(tar_diff=tar["diff"], tar_low=tar["low"], tar_high=tar["high"],
                   tar_ok=tar["ok"])
    return out


def summarise(settings: list[Setting], init: list[dict], cand: dict[Setting, list[dict]],
              criterion: str, guard_init: GuardRef | None, fold_ids: list[np.ndarray]
              ) -> list[dict]:
    """Per candidate: its criterion (mean over folds), the paired difference against the
    init with its interval, the guard's difference with its interval, and whether it may be
    chosen."""
    from mtmim_cli.eval.compare import bootstrap_difference

    rows = []
    alpha = (1 - LEVEL) / 2
    for s in settings:
        per = cand[s]
        value = float(np.mean([p["value"] for p in per]))
        if criterion == "auc":
            diffs = np.mean([np.asarray(p["reps"]) - np.asarray(i["reps"])
                             for p, i in zip(per, init, strict=True)], axis=0)
            diff = value - float(np.mean([i["value"] for i in init]))
            low, high = (float(x) for x in np.quantile(diffs, [alpha, 1 - alpha]))
        else:
            a = np.concatenate([p["hits"] for p in per])
            b = np.concatenate([i["hits"] for i in init])
            d = bootstrap_difference(a, b, clusters=np.concatenate(fold_ids), resamples=2000,
                                     level=LEVEL, seed=0)
            value, diff, low, high = d.mean_a, d.diff, d.low, d.high
        guard = None   # no guard, or not scored: the candidate is not above the init anyway
        if guard_init is not None and all(p.get("guard") is not None for p in per):
            guard = guard_difference([p["guard"] for p in per], guard_init)
        ok_guard = guard_init is None or (guard is not None and guard["ok"])
        rows.append({"setting": s.to_dict(), "label": s.label(), "value": value, "diff": diff,
                     "low": low, "high": high,
                     "guard_diff": None if guard is None else guard["diff"],
                     "guard_low": None if guard is None else guard["low"],
                     "guard_high": None if guard is None else guard["high"],
                     "guard_ok": ok_guard, "eligible": bool(low > 0 and ok_guard)})
    return rows


def ranked(rows: list[dict]) -> list[int]:
    """The eligible candidates, highest criterion first (the first listed on a tie)."""
    return sorted((k for k, r in enumerate(rows) if r["eligible"]), key=lambda k: -rows[k]["value"])


def pick(rows: list[dict]) -> int | None:
    """The eligible candidate of highest criterion (the first listed on a tie), or None."""
    order = ranked(rows)
    return order[0] if order else None


def table(rows: list[dict], init_value: float, criterion: str, guard: bool) -> str:
    """The candidates' validation scores as a Markdown table."""
    name = "AUC" if criterion == "auc" else "rank-1"
    head = ["candidate", "trains", "lr", "lambda", "wise", name, "vs init", f"{LEVEL:.0%} interval"]
    if guard:
        head.append("guard rank-1 vs init [interval]")
    head.append("verdict")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    init_row = ["init", "-", "-", "-", "-", f"{init_value:.4f}", "-", "-"]
    lines.append("| " + " | ".join(init_row + (["-"] if guard else []) + ["-"]) + " |")
    for k, r in enumerate(rows):
        s = r["setting"]
        verdict = ("beats init" if r["eligible"] else
                   "not above init" if r["low"] <= 0 else "guard: falls")
        cells = [f"c{k + 1:02d}", s["freeze_through"], f"{s['lr']:g}",
                 "-" if s["lambda_mim"] is None else f"{s['lambda_mim']:g}", f"{s['wise']:g}",
                 f"{r['value']:.4f}", f"{r['diff']:+.4f}", f"[{r['low']:+.4f}, {r['high']:+.4f}]"]
        if guard:
            cells.append("-" if r["guard_diff"] is None else
                         f"{r['guard_diff']:+.4f} [{r['guard_low']:+.4f}, {r['guard_high']:+.4f}]")
        lines.append("| " + " | ".join([*cells, verdict]) + " |")
    return "\n".join(lines)
