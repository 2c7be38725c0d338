"""The evaluation protocols on features: FG-NET leave-one-out, MORPH settings 1/2, CACD
retrieval (MAP) and pair verification (CACD-VS, AgeDB-30, LFW, CALFW, any pair list).

Everything here works on L2-normalised feature arrays and label arrays, so each protocol is
tested on small generated data; `mtmim_cli.eval.runners` feeds it real features from models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import metrics as M
from mtmim_cli.sharding import parse_shard as _parse_shard

FAR_LEVEL = 1e-3
# TAR is reported at each of these a pair set's impostors can resolve (metrics.min_impostors)
FAR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4)
# The key of a store's config that holds the package source digest (mtmim_cli.source).
SOURCE_KEY = "source_sha256"
CACD_DATABASES = {"2004-2006": (2004, 2006), "2007-2009": (2007, 2009), "2010-2012": (2010, 2012)}
CACD_QUERY_YEAR = 2013
MORPH_SETTINGS = {
    # Setting-1: 10,000 test subjects, the rest (if any) for training.
    "morph-s1": {"test": 10_000, "train": None},
    # Setting-2: train on 10,000 subjects, test on 3,000 others.
    "morph-s2": {"test": 3_000, "train": 10_000},
}


# ---------------------------------------------------------------- identification
def identification(feats: np.ndarray, identity: np.ndarray, *, max_rank: int = 20) -> dict:
    """Leave-one-out identification within one set: each image against all the others."""
    r1 = M.rank1(feats, identity, feats, identity, exclude_self=True)
    curve = M.cmc(feats, identity, feats, identity, max_rank=max_rank, exclude_self=True)
    return {"rank1": r1, "cmc": curve.tolist(), "queries": int(len(feats))}


def query_ranks(scores: np.ndarray, gallery_ids: np.ndarray, query_id: int) -> tuple[int, int]:
    """(index of the top match, CMC rank of the first correct match; 0 when none exists)
    for one query's scores against its gallery (excluded items at -inf)."""
    top = int(np.argmax(scores))
    right = gallery_ids == query_id
    right &= np.isfinite(scores)
    if not right.any():
        return top, 0
    best = scores[right].max()
    return top, 1 + int(((scores > best) & ~right).sum())


# ---------------------------------------------------------------- FG-NET leave-one-out rounds
def loo_rounds(n: int, folds: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Held-out sets for leave-one-out: n rounds of one image (exact), or `folds` rounds of
    about n/folds images each from a seeded permutation (the grouped variant)."""
    if folds is None or folds >= n:
        return [np.array([i]) for i in range(n)]
    if folds < 2:
        raise MtmimError(f"--folds {folds}: need at least 2 rounds")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, folds)]


def rank_held_out(feats: np.ndarray, identity: np.ndarray, held_out: np.ndarray) -> dict:
    """Each held-out image against all other images of the set (the other n-1). Besides its
    top match, rank and hit: its mates (the other images of its identity) and, per mate,
    whether it scores at least as high as the best other-identity image (`mate_ok`: the
    probe would be found at rank 1 were this mate its person's only photo); and its features
    as ranked (`features`, 6 decimals: a model that never saw it, for the age probe)."""
    s = feats[held_out] @ feats.T
    s[np.arange(len(held_out)), held_out] = -np.inf
    top, rank, mates, mate_ok = [], [], [], []
    for k, q in enumerate(held_out):
        t, r = query_ranks(s[k], identity, identity[q])
        top.append(t)
        rank.append(r)
        same = identity == identity[q]
        same[q] = False
        m = np.flatnonzero(same)
        imp = np.max(s[k][identity != identity[q]], initial=-np.inf)
        mates.append(m.tolist())
        mate_ok.append((s[k][m] >= imp).tolist())
    hit = [bool(identity[t] == identity[q]) for t, q in zip(top, held_out, strict=True)]
    return {"held_out": [int(q) for q in held_out], "top1": top, "rank": rank, "hit": hit,
            "mates": mates, "mate_ok": mate_ok,
            "features": np.round(feats[held_out].astype(np.float64), 6).tolist()}


@dataclass
class RoundStore:
    """Round results of one protocol run, appended as JSON lines per shard, so a killed run
    resumes (a torn last line is ignored) and shards run by separate processes merge by
    reading every file of the folder. `config` must match for rounds to be reused. When it
    holds the package's source digest (`SOURCE_KEY`), rounds made by other code are refused,
    or with `reuse_stale` used and counted (`stale_count`); each round records the code that
    made it."""

    folder: Path
    config: dict
    reuse_stale: bool = False

    def __post_init__(self) -> None:
        from mtmim_cli.source import short, source_record

        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.made_by = source_record()
        cfg_path = self.folder / "config.json"
        text = json.dumps(self.config, sort_keys=True, indent=1)
        if cfg_path.exists():
            old, new = json.loads(cfg_path.read_text()), json.loads(text)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff == [SOURCE_KEY] and not self.reuse_stale:
                raise MtmimError(f"{self.folder}: holds rounds made by other code (mtmim_cli "
                                 f"source {short(old.get(SOURCE_KEY))}, this code "
                                 f"{short(new.get(SOURCE_KEY))}); remove the folder to rerun "
                                 "them, or pass --reuse-stale to use them flagged as stale")
            if diff and diff != [SOURCE_KEY]:
                raise MtmimError(f"{self.folder}: holds rounds of a different run "
                                 f"(differs in {', '.join(diff)}); use another --rounds-dir")
        else:
            atomic_write_text(cfg_path, text)

    def stale_count(self, records: dict[int, dict]) -> int:
        """How many of `records` (from `done`) other code made (or no code recorded)."""
        here = self.made_by["sha256"]
        return sum(1 for rec in records.values()
                   if (rec.get("source") or {}).get("sha256") != here)

    def done(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for path in sorted(self.folder.glob("rounds-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn tail of a killed writer
                out[int(rec["round"])] = rec
        return out

    def append(self, shard: str, record: dict) -> None:
        path = self.folder / f"rounds-{shard}.jsonl"
        with open(path, "a") as fh:
            # A torn previous line must not swallow this one.
            if fh.tell() > 0:
                with open(path, "rb") as rd:
                    rd.seek(-1, os.SEEK_END)
                    if rd.read(1) != b"\n":
                        fh.write("\n")
            fh.write(json.dumps({**record, "source": self.made_by}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1): the whole run is one shard."""
    return _parse_shard(text) or (0, 1)


def run_rounds(rounds: list[np.ndarray], round_fn: Callable[[int, np.ndarray], dict],
               store: RoundStore, shard: tuple[int, int] = (0, 1),
               progress: bool = True, description: str = "rounds") -> dict[int, dict]:
    """Run this shard's rounds that the store does not hold yet (round r belongs to shard
    r mod N); return every round the store holds afterwards (all shards)."""
    from mtmim_cli.progress import make_progress

    i, n = shard
    mine = [r for r in range(len(rounds)) if r % n == i]
    have = store.done()
    todo = [r for r in mine if r not in have]
    tag = f"{i}-of-{n}"
    import time

    with make_progress("round", disable=not progress) as bar:
        task = bar.add_task(description, total=len(mine), completed=len(mine) - len(todo))
        for r in todo:
            t0 = time.perf_counter()
            rec = round_fn(r, rounds[r])
            rec = {"round": r, **rec, "seconds": round(time.perf_counter() - t0, 3)}
            store.append(tag, rec)
            bar.advance(task)
    return store.done()


def merge_rounds(records: dict[int, dict], n_rounds: int, n_images: int,
                 max_rank: int = 20) -> dict:
    """Rank-1 and CMC over every held-out query of every round (each image once)."""
    missing = [r for r in range(n_rounds) if r not in records]
    if missing:
        raise MtmimError(f"{len(missing)} of {n_rounds} rounds not done yet (e.g. round "
                         f"{missing[0]}); run the remaining shards, then merge")
    hits, ranks, seen = [], [], set()
    for r in range(n_rounds):
        rec = records[r]
        hits += rec["hit"]
        ranks += rec["rank"]
        seen.update(rec["held_out"])
    if len(seen) != n_images or len(hits) != n_images:
        raise MtmimError(f"rounds cover {len(seen)} distinct images of {n_images}")
    ranks_a = np.array(ranks)
    found = ranks_a > 0
    curve = [float(np.mean(found & (ranks_a <= k))) for k in range(1, max_rank + 1)]
    secs = [records[r].get("seconds", 0.0) for r in range(n_rounds)]
    return {"rank1": float(np.mean(hits)), "cmc": curve, "queries": len(hits),
            "rounds": n_rounds, "round_seconds_total": float(np.sum(secs))}


# ---------------------------------------------------------------- MORPH
def morph_split(identity: np.ndarray, setting: str, seed: int = 0,
                n_test: int | None = None, n_train: int | None = None) -> dict:
    """Seeded subject split for a MORPH setting: {'train': [...], 'test': [...]} of identity
    values. Fails when the cache holds fewer subjects than the setting needs."""
    cfg = MORPH_SETTINGS[setting]
    n_test = cfg["test"] if n_test is None else n_test
    n_train = cfg["train"] if n_train is None else n_train
    subjects = np.unique(identity)
    need = n_test + (n_train or 0)
    if len(subjects) < need:
        raise MtmimError(f"{setting}: needs {need} subjects, the cache has {len(subjects)} "
                         "(use --test-subjects/--train-subjects for a smaller split)")
    perm = np.random.default_rng(seed).permutation(subjects)
    test = np.sort(perm[:n_test])
    rest = perm[n_test:]
    train = np.sort(rest if n_train is None else rest[:n_train])
    return {"setting": setting, "seed": seed, "test": test.tolist(), "train": train.tolist()}


def largest_gap_pairs(identity: np.ndarray, age: np.ndarray,
                      subjects: Iterable[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per subject the two images with the largest age gap: (probe = older, gallery =
    younger, subjects used). Ties: the earliest record index. Subjects with fewer than two
    dated images are skipped."""
    probe, gallery, used = [], [], []
    age = np.asarray(age, dtype=np.float64)
    for s in subjects:
        rows = np.flatnonzero((identity == s) & ~np.isnan(age))
        if len(rows) < 2:
            continue
        young = rows[np.argmin(age[rows])]
        old = rows[np.argmax(age[rows])]
        if young == old:  # every image the same age: take two different records
            young, old = rows[0], rows[1]
        probe.append(old)
        gallery.append(young)
        used.append(int(s))
    return np.array(probe, np.int64), np.array(gallery, np.int64), used


def morph_rank1(feats: np.ndarray, identity: np.ndarray, age: np.ndarray,
                test_subjects: Iterable[int], max_rank: int = 20) -> dict:
    probe, gallery, used = largest_gap_pairs(identity, age, test_subjects)
    if len(used) < 2:
        raise MtmimError("MORPH: fewer than two test subjects with two dated images")
    r1 = M.rank1(feats[probe], identity[probe], feats[gallery], identity[gallery])
    curve = M.cmc(feats[probe], identity[probe], feats[gallery], identity[gallery],
                  max_rank=max_rank)
    return {"rank1": r1, "cmc": curve.tolist(), "queries": len(probe),
            "subjects": len(used)}


# ---------------------------------------------------------------- CACD
def cacd_map(feats: np.ndarray, identity: np.ndarray, year: np.ndarray,
             test_mask: np.ndarray) -> dict:
    """CACD retrieval: queries are the test celebrities' 2013 images; each database holds the
    test celebrities' images of its year range; MAP per database."""
    year = np.asarray(year)
    test_mask = np.asarray(test_mask, bool)
    q = np.flatnonzero(test_mask & (year == CACD_QUERY_YEAR))
    if len(q) == 0:
        raise MtmimError(f"CACD: no test image from {CACD_QUERY_YEAR} to use as a query")
    out: dict = {"queries": int(len(q)), "test_identities": int(len(np.unique(identity[test_mask])))}
    for name, (lo, hi) in CACD_DATABASES.items():
        d = np.flatnonzero(test_mask & (year >= lo) & (year <= hi))
        m, aps = M.mean_average_precision(feats[q], identity[q], feats[d], identity[d])
        out[name] = {"map": m, "database": int(len(d)),
                     "queries_with_matches": int((~np.isnan(aps)).sum())}
    return out


# ---------------------------------------------------------------- verification
def verification(feats_a: np.ndarray, feats_b: np.ndarray, same: np.ndarray,
                 folds: int | np.ndarray = 10, far: float = FAR_LEVEL) -> dict:
    """10-fold accuracy (threshold from the other nine folds), TAR at FAR, ROC AUC."""
    scores = np.sum(np.asarray(feats_a, np.float64) * feats_b, axis=1)
    tf = M.tenfold_verification(scores, same, folds)
    far_pts, tar_pts, _ = M.roc_curve_points(scores, same)
    return {"accuracy": tf["accuracy"], "std": tf["std"],
            "fold_accuracies": tf["fold_accuracies"], "thresholds": tf["thresholds"],
            "folds_used": len(tf["fold_accuracies"]),
            **tar_at_far_entry(scores, same, far),
            "tar_at_fars": [tar_at_far_entry(scores, same, f) for f in FAR_LEVELS],
            "auc": M.roc_auc(scores, same), "pairs": int(len(scores)),
            "roc": _thin_roc(far_pts, tar_pts)}


def tar_at_far_entry(scores: np.ndarray, same: np.ndarray, far: float = FAR_LEVEL) -> dict:
    """TAR@FAR, or None with a note when the impostor pairs are too few to resolve `far`
    (fewer than 1/far): the table then says so instead of printing the TAR at zero false
    accepts under the FAR's name."""
    same = np.asarray(same, bool)
    n_imp, need = int((~same).sum()), M.min_impostors(far)
    entry = {"far": far, "impostor_pairs": n_imp, "tar_at_far": None}
    if n_imp < need:
        entry["tar_at_far_note"] = f"n/a (needs >= {need} impostors, have {n_imp})"
    else:
        entry["tar_at_far"] = M.tar_at_far(scores, same, far)
    return entry


def _thin_roc(far: np.ndarray, tar: np.ndarray, points: int = 400) -> dict:
    """A few hundred ROC points (log-spaced in FAR) are enough to plot; keep the ends."""
    if len(far) <= points:
        return {"far": far.tolist(), "tar": tar.tolist()}
    grid = np.unique(np.r_[0.0, np.logspace(-6, 0, points)])
    idx = np.searchsorted(far, grid, side="right") - 1
    idx = np.unique(np.clip(idx, 0, len(far) - 1))
    return {"far": far[idx].tolist(), "tar": tar[idx].tolist()}
