"""Face-recognition metrics: verification (10-fold, TAR@FAR, ROC AUC) and retrieval
(rank-1, CMC, average precision), with gallery matching done in blocks.

Conventions (documented because protocols differ in the details):
- Scores are similarities (higher = more alike); a pair is accepted when score >= threshold.
- 10-fold accuracy: for each fold, the threshold is the one with the best accuracy on the
  other nine folds, taken among the midpoints between consecutive distinct training scores
  (and one below / above all of them); the lowest such threshold wins a tie. The fold's
  accuracy is measured at that threshold. This is the LFW rule written exactly rather than
  on a fixed grid of thresholds.
- TAR@FAR: the largest true-accept rate among thresholds whose false-accept rate is <= far
  (the point sklearn's ROC curve gives at fpr <= far).
- Rank-1: the best-scoring gallery item (ties go to the lowest gallery index) has the
  query's identity. CMC rank of a query: 1 + the number of wrong-identity gallery items
  scoring strictly above its best right-identity item (ties counted in the query's favour).
- Average precision: sklearn's step-wise definition, sum_n (R_n - R_{n-1}) P_n over distinct
  score thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class RowSliceable(Protocol):
    """Anything gallery-like: an ndarray, np.memmap, h5py dataset or a generator object."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


# ---------------------------------------------------------------- verification
def fold_labels(n: int, folds: int = 10) -> np.ndarray:
    """Contiguous folds of (nearly) equal size, the layout of LFW/AgeDB pair lists."""
    if folds < 2 or n < folds:
        raise ValueError(f"need at least {folds} >= 2 pairs for {folds} folds, got {n}")
    return (np.arange(n) * folds) // n


def _as_fold_array(n: int, folds: int | np.ndarray) -> np.ndarray:
    if isinstance(folds, (int, np.integer)):
        return fold_labels(n, int(folds))
    folds = np.asarray(folds)
    if folds.shape != (n,):
        raise ValueError(f"folds has shape {folds.shape}, expected ({n},)")
    return folds


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score >= threshold` on these pairs.

    Candidates: midpoints between consecutive distinct scores, plus one below the minimum
    and one above the maximum; the lowest best candidate wins a tie. O(n log n)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n = len(scores)
    uniq, inv = np.unique(scores, return_inverse=True)
    pos = np.bincount(inv, weights=same, minlength=len(uniq))
    neg = np.bincount(inv, weights=~same, minlength=len(uniq))
    # Threshold below uniq[k] (k = 0..m): accept uniq[k:], reject uniq[:k].
    # correct = positives at or above + negatives below.
    pos_above = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    neg_below = np.concatenate([[0.0], np.cumsum(neg)])
    correct = pos_above + neg_below
    k = int(np.argmax(correct))
    if k == 0:
        thr = uniq[0] - 1.0
    elif k == len(uniq):
        thr = uniq[-1] + 1.0
    else:
        thr = 0.5 * (uniq[k - 1] + uniq[k])
    return float(thr), float(correct[k] / n)


def tenfold_verification(scores: np.ndarray, same: np.ndarray,
                         folds: int | np.ndarray = 10) -> dict:
    """K-fold verification accuracy: each fold is scored at the threshold that is best on
    the other folds. `folds` is a fold count (contiguous folds) or a fold label per pair.

    Returns accuracy (mean over folds), std (population std over folds, as insightface
    reports it), thresholds and per-fold accuracies."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError("scores and same must be 1-D arrays of equal length")
    labels = _as_fold_array(len(scores), folds)
    accs, thrs = [], []
    for f in np.unique(labels):
        test = labels == f
        thr, _ = best_threshold(scores[~test], same[~test])
        accs.append(float(np.mean((scores[test] >= thr) == same[test])))
        thrs.append(thr)
    accs_a = np.array(accs)
    return {"accuracy": float(accs_a.mean()), "std": float(accs_a.std()),
            "thresholds": thrs, "fold_accuracies": accs}


def threshold_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The lowest threshold (accept: score >= threshold) whose false-accept rate is <= far."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    neg = np.sort(scores[~same])[::-1]
    if len(neg) == 0:
        return -np.inf
    allowed = allowed_false_accepts(far, len(neg))
    if allowed >= len(neg):
        return -np.inf
    # Accepting at most `allowed` negatives: threshold just above the (allowed+1)-th highest.
    return float(np.nextafter(neg[allowed], np.inf))


def allowed_false_accepts(far: float, impostors: int) -> int:
    """How many of `impostors` impostor pairs a threshold at `far` may accept: floor(far x n)
    (the 1e-9 keeps 0.1 x 30 from rounding down to 2)."""
    return math.floor(far * impostors + 1e-9)


def min_impostors(far: float, false_accepts: int = 1) -> int:
    """The fewest impostor pairs that resolve a false-accept rate of `far`: the smallest n
    whose threshold rests on at least `false_accepts` impostors above it
    (`allowed_false_accepts(far, n) >= false_accepts`). With the default 1: over n impostors
    the FAR moves in steps of 1/n, so below n = 1/far the only FAR <= far is 0 and TAR@FAR is
    the TAR at zero false accepts, a different (and noisier) figure. `mtmim calibrate` asks
    for more (its --min-false-accepts): a threshold resting on 2 false accepts is a guess."""
    if not 0 < far <= 1:
        raise ValueError(f"FAR {far}: must be in (0, 1]")
    if false_accepts < 1:
        raise ValueError(f"false accepts {false_accepts}: must be at least 1")
    n = math.ceil(false_accepts / far - 1e-9)
    # ceil's rounding and floor's epsilon can disagree by one at the edge: settle on the rule.
    while allowed_false_accepts(far, n) < false_accepts:
        n += 1
    while n > 1 and allowed_false_accepts(far, n - 1) >= false_accepts:
        n -= 1
    return n


def exact_rate_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate seen as k events in n trials (a measured FAR):
    exact, so it stays honest at the handful of false accepts a small pair set gives."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """True-accept rate at the threshold where the false-accept rate is at most `far`."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if not same.any():
        raise ValueError("no genuine pairs")
    return float(np.mean(scores[same] >= threshold_at_far(scores, same, far)))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve = P(genuine score > impostor score) + 0.5 P(equal)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    uniq_start = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    uniq_end = np.r_[uniq_start[1:], len(s)]
    avg = 0.5 * (uniq_start + uniq_end - 1) + 1.0
    ranks[order] = np.repeat(avg, uniq_end - uniq_start)
    u = ranks[same].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve_points(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, threshold) at every distinct score, thresholds descending (for plotting)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    far = np.r_[0.0, fp / max(1, (~same).sum())]
    tar = np.r_[0.0, tp / max(1, same.sum())]
    return far, tar, np.r_[np.inf, s[last]]


# ---------------------------------------------------------------- retrieval
def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one ranked list (sklearn's average_precision_score, exactly)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    n_rel = int(relevant.sum())
    if n_rel == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], relevant[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each group of equal scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1.0)
    recall_step = np.diff(np.r_[0, tp]) / n_rel
    return float(np.sum(recall_step * precision))


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(n, start + block)


def _get_rows(gallery: RowSliceable, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(gallery[start:stop], dtype=np.float32))


def _exclusion(n_query: int, n_gallery: int, exclude_self: bool,
               query_index: np.ndarray | None) -> np.ndarray | None:
    if query_index is not None:
        q = np.asarray(query_index, dtype=np.int64)
        if q.shape != (n_query,):
            raise ValueError("query_index needs one gallery index per query")
        return q
    if exclude_self:
        if n_query != n_gallery:
            raise ValueError("exclude_self without query_index needs query set == gallery set")
        return np.arange(n_query)
    return None


def _score_blocks(q: np.ndarray, gallery_feats: RowSliceable, excl: np.ndarray | None,
                  block: int, query_block: int):
    """Yield (g0, g1, q0, q1, scores) over gallery blocks, then query blocks, with each query's
    excluded gallery item set to -inf: the score matrix is never held whole."""
    n_q, n_g = len(q), int(gallery_feats.shape[0])
    for g0, g1 in _blocks(n_g, block):
        g = _get_rows(gallery_feats, g0, g1)
        for q0, q1 in _blocks(n_q, query_block):
            s = q[q0:q1] @ g.T
            if excl is not None:
                e = excl[q0:q1]
                hit = (e >= g0) & (e < g1)
                s[np.flatnonzero(hit), e[hit] - g0] = -np.inf
            yield g0, g1, q0, q1, s


def top1(query_feats: np.ndarray, gallery_feats: RowSliceable, *, block: int = 16384,
         query_block: int = 1024, exclude_self: bool = False,
         query_index: np.ndarray | None = None,
         on_block: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index and score of each query's best gallery match, scanning the gallery in blocks
    (memory: query_block x block scores at a time). Ties go to the lowest gallery index.

    `exclude_self` / `query_index`: query k must not match gallery item query_index[k]
    (query_index defaults to k when exclude_self is set)."""
    q = np.ascontiguousarray(np.asarray(query_feats, dtype=np.float32))
    n_q, n_g = len(q), int(gallery_feats.shape[0])
    excl = _exclusion(n_q, n_g, exclude_self, query_index)
    best_score = np.full(n_q, -np.inf, dtype=np.float32)
    best_index = np.full(n_q, -1, dtype=np.int64)
    for g0, g1, q0, q1, s in _score_blocks(q, gallery_feats, excl, block, query_block):
        arg = np.argmax(s, axis=1)
        val = s[np.arange(q1 - q0), arg]
        better = val > best_score[q0:q1]  # strict: earlier blocks win ties
        best_score[q0:q1][better] = val[better]
        best_index[q0:q1][better] = arg[better] + g0
        if on_block is not None and q1 == n_q:
            on_block(g1 - g0)
    return best_index, best_score


def rank1(query_feats: np.ndarray, query_ids: np.ndarray, gallery_feats: RowSliceable,
          gallery_ids: np.ndarray, *, block: int = 16384, query_block: int = 1024,
          exclude_self: bool = False, query_index: np.ndarray | None = None,
          return_hits: bool = False) -> float | tuple[float, np.ndarray]:
    """Rank-1 identification rate (blocked; the score matrix is never held whole)."""
    idx, _ = top1(query_feats, gallery_feats, block=block, query_block=query_block,
                  exclude_self=exclude_self, query_index=query_index)
    gallery_ids = np.asarray(gallery_ids)
    hits = (idx >= 0) & (gallery_ids[np.maximum(idx, 0)] == np.asarray(query_ids))
    rate = float(hits.mean()) if len(hits) else float("nan")
    return (rate, hits) if return_hits else rate


def rank1_dense(query_feats: np.ndarray, query_ids: np.ndarray, gallery_feats: np.ndarray,
                gallery_ids: np.ndarray, exclude_self: bool = False) -> float:
    """The plain reference: the whole score matrix at once (small sets only)."""
    s = np.asarray(query_feats, np.float32) @ np.asarray(gallery_feats, np.float32).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return float(np.mean(np.asarray(gallery_ids)[np.argmax(s, axis=1)] == np.asarray(query_ids)))


def cmc(query_feats: np.ndarray, query_ids: np.ndarray, gallery_feats: RowSliceable,
        gallery_ids: np.ndarray, *, max_rank: int = 20, block: int = 16384,
        query_block: int = 256, exclude_self: bool = False,
        query_index: np.ndarray | None = None) -> np.ndarray:
    """Cumulative match characteristic: cmc[r-1] = share of queries whose first correct
    match is at rank <= r. One pass over the gallery keeping, per query, the best correct
    score and the `max_rank` best wrong scores (memory query x max_rank, not query x gallery).
    Queries with no correct item in the gallery count as misses at every rank."""
    q = np.ascontiguousarray(np.asarray(query_feats, dtype=np.float32))
    qids = np.asarray(query_ids)
    gids = np.asarray(gallery_ids)
    n_q, n_g = len(q), int(gallery_feats.shape[0])
    excl = _exclusion(n_q, n_g, exclude_self, query_index)
    best_right = np.full(n_q, -np.inf, dtype=np.float32)
    top_wrong = np.full((n_q, max_rank), -np.inf, dtype=np.float32)
    for g0, g1, q0, q1, s in _score_blocks(q, gallery_feats, excl, block, query_block):
        right = qids[q0:q1, None] == gids[None, g0:g1]
        best_right[q0:q1] = np.maximum(best_right[q0:q1],
                                       np.where(right, s, -np.inf).max(axis=1))
        wrong = np.where(right, -np.inf, s)
        k = min(max_rank, wrong.shape[1])
        part = -np.partition(-wrong, k - 1, axis=1)[:, :k]
        merged = np.concatenate([top_wrong[q0:q1], part], axis=1)
        top_wrong[q0:q1] = -np.partition(-merged, max_rank - 1, axis=1)[:, :max_rank]
    found = np.isfinite(best_right)
    n_above = (top_wrong > best_right[:, None]).sum(axis=1)  # capped at max_rank
    rank = np.where(found, n_above + 1, max_rank + 1)
    return np.array([(rank <= r).mean() for r in range(1, max_rank + 1)])


def mean_average_precision(query_feats: np.ndarray, query_ids: np.ndarray,
                           db_feats: np.ndarray, db_ids: np.ndarray, *,
                           query_block: int = 256,
                           exclude_self: bool = False) -> tuple[float, np.ndarray]:
    """Mean over queries of the AP of the database ranked by cosine score; queries with no
    relevant item in the database are left out (their AP is NaN in the returned array)."""
    q = np.asarray(query_feats, dtype=np.float32)
    d = np.asarray(db_feats, dtype=np.float32)
    qids, dids = np.asarray(query_ids), np.asarray(db_ids)
    aps = np.full(len(q), np.nan)
    for q0, q1 in _blocks(len(q), query_block):
        s = q[q0:q1] @ d.T
        for r in range(q1 - q0):
            row = s[r]
            rel = dids == qids[q0 + r]
            if exclude_self:
                keep = np.ones(len(d), bool)
                keep[q0 + r] = False
                row, rel = row[keep], rel[keep]
            if rel.any():
                aps[q0 + r] = average_precision(row, rel)
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float("nan")), aps
