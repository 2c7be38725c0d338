"""The exact scan: one matrix product per block of gallery rows, top-k by argpartition.

Order of the results is fixed: score descending, then gallery row ascending, so equal
scores (duplicated faces) come back in the same order as a brute-force stable sort.
Blocking keeps the score matrix small (probes x block) whatever the gallery's size, so a
batch of probes against 10^6 faces never holds a probes x 10^6 float matrix at once.
"""

from __future__ import annotations

import numpy as np

# Scores per block: 2^22 float32 = 16 MiB, small enough to stay near cache and for a batch of
# probes against a million-row gallery to never hold a full probes x N matrix.
BLOCK_SCORES = 1 << 22


def _topk_rows(scores: np.ndarray, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of `scores` (Q, B) as (values, gallery rows + offset), ordered by
    value descending then row ascending. Ties at the k-th value are resolved by row, which
    argpartition alone does not do: rows whose k-th value is shared are redone exactly."""
    q, b = scores.shape
    k = min(k, b)
    if k == b:
        part = np.broadcast_to(np.arange(b), (q, b)).copy()
    else:
        # the k largest at the end, so no negated copy of the block is made (a full pass)
        part = np.argpartition(scores, b - k, axis=1)[:, b - k:]
    vals = np.take_along_axis(scores, part, axis=1)
    kth = vals.min(axis=1)
    # a tie at the boundary: more rows share the k-th value than argpartition kept
    tied = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k) if k < b else []
    for r in tied:
        cand = np.flatnonzero(scores[r] >= kth[r])
        order = np.lexsort((cand, -scores[r, cand]))[:k]
        part[r] = cand[order]
        vals[r] = scores[r, part[r]]
    order = _order(vals, part)
    part = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return vals, part + offset


def _order(vals: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row, the permutation sorting by value descending then row ascending."""
    # sort by row first, then stable by -value: equal values keep row order
    by_row = np.argsort(rows, axis=1, kind="stable")
    v = np.take_along_axis(vals, by_row, axis=1)
    by_val = np.argsort(-v, axis=1, kind="stable")
    return np.take_along_axis(by_row, by_val, axis=1)


def exact_search(gallery: np.ndarray, probes: np.ndarray, k: int,
                 block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` gallery rows of every probe by inner product: (scores (Q, k) float32, rows
    (Q, k) int64), k clipped to the gallery's size. `gallery` (N, D) and `probes` (Q, D) are
    float32 (a memory map of the gallery works: each block is read once per call)."""
    probes = np.ascontiguousarray(np.atleast_2d(probes), dtype=np.float32)
    n = len(gallery)
    q = len(probes)
    k = min(int(k), n)
    if k <= 0 or q == 0:
        return np.zeros((q, max(k, 0)), np.float32), np.zeros((q, max(k, 0)), np.int64)
    if block_rows is None:
        block_rows = max(4096, BLOCK_SCORES // max(q, 1))
    best_v = best_i = None
    for start in range(0, n, block_rows):
        block = gallery[start:start + block_rows]
        scores = probes @ np.asarray(block, np.float32).T   # (Q, B): one product per block
        v, i = _topk_rows(scores, start, k)
        if best_v is None:
            best_v, best_i = v, i
            continue
        # merge: rows of later blocks are larger, so the row tie-break survives concatenation
        v = np.concatenate([best_v, v], axis=1)
        i = np.concatenate([best_i, i], axis=1)
        best_v, best_i = _topk_rows_given(v, i, k)
    return best_v.astype(np.float32), best_i.astype(np.int64)


def _topk_rows_given(vals: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = _order(vals, rows)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(rows, order, axis=1)


def brute_force(gallery: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the full score matrix, sorted per probe (score desc, row asc)."""
    s = np.atleast_2d(probes).astype(np.float32) @ np.asarray(gallery, np.float32).T
    rows = np.stack([np.lexsort((np.arange(s.shape[1]), -r))[:k] for r in s])
    return np.take_along_axis(s, rows, axis=1), rows
