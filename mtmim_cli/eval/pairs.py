"""Cross-age verification pairs built from a labelled set (AgeDB-style, for FG-NET or any cache).

Layout of the result, as in the LFW/AgeDB pair lists: `folds` contiguous blocks of equal
size, each holding as many genuine as impostor pairs, so `tenfold_verification(scores, same,
folds)` with an integer fold count scores them by the standard rule.
"""

from __future__ import annotations

import numpy as np

from mtmim_cli.errors import MtmimError


def _genuine_candidates(identity: np.ndarray, age: np.ndarray, index: np.ndarray,
                        min_gap: float) -> np.ndarray:
    """All same-identity pairs (i < j, as original indices) whose age gap is >= min_gap."""
    out = []
    order = np.argsort(identity[index], kind="stable")
    idx = index[order]
    ids = identity[idx]
    starts = np.r_[0, np.flatnonzero(np.diff(ids)) + 1, len(ids)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        members = idx[a:b]
        if len(members) < 2:
            continue
        u, v = np.triu_indices(len(members), k=1)
        i, j = members[u], members[v]
        if min_gap > 0:
            keep = np.abs(age[i] - age[j]) >= min_gap  # NaN ages fail the test
            i, j = i[keep], j[keep]
        out.append(np.stack([i, j], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def cross_age_pairs(identity: np.ndarray, age: np.ndarray, n_pairs: int = 3000, seed: int = 0,
                    *, min_gap: float = 0.0, folds: int = 10,
                    usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, same): up to `n_pairs` pairs, half genuine and half impostor, in `folds`
    contiguous balanced folds, seeded.

    Genuine pairs: same identity, |age gap| >= min_gap, drawn without replacement.
    Impostor pairs: different identities, |age gap| >= min_gap, drawn without replacement.
    When fewer genuine pairs exist than asked, the count shrinks to a multiple of `folds`
    that fits (so every fold stays balanced). `usable` masks records that may be used.
    """
    identity = np.asarray(identity)
    age = np.asarray(age, dtype=np.float64)
    n = len(identity)
    index = np.arange(n) if usable is None else np.flatnonzero(np.asarray(usable, bool))
    rng = np.random.default_rng(seed)
    genuine = _genuine_candidates(identity, age, index, min_gap)
    per_fold = min(n_pairs // 2, len(genuine)) // folds
    if per_fold == 0:
        raise MtmimError(f"cross-age pairs: only {len(genuine)} same-identity pairs with an age "
                         f"gap >= {min_gap}; need at least {folds}")
    n_half = per_fold * folds
    gen = genuine[rng.choice(len(genuine), n_half, replace=False)]

    # Impostors by rejection sampling: cheap because almost every random pair qualifies.
    seen: set[tuple[int, int]] = set()
    imp = []
    tries = 0
    while len(imp) < n_half:
        tries += 1
        if tries > 200 * n_half + 10_000:
            raise MtmimError(f"cross-age pairs: could not find {n_half} impostor pairs with an "
                             f"age gap >= {min_gap}")
        a, b = rng.choice(index, 2, replace=False)
        a, b = (a, b) if a < b else (b, a)
        if identity[a] == identity[b] or (a, b) in seen:
            continue
        if min_gap > 0 and not abs(age[a] - age[b]) >= min_gap:
            continue
        seen.add((a, b))
        imp.append((a, b))
    imp_a = np.array(imp, dtype=np.int64)

    # Each fold: per_fold genuine then per_fold impostor pairs, shuffled within the fold.
    i_all, j_all, same_all = [], [], []
    for f in range(folds):
        g = gen[f * per_fold:(f + 1) * per_fold]
        m = imp_a[f * per_fold:(f + 1) * per_fold]
        pairs = np.concatenate([g, m])
        same = np.r_[np.ones(per_fold, bool), np.zeros(per_fold, bool)]
        perm = rng.permutation(len(pairs))
        i_all.append(pairs[perm, 0])
        j_all.append(pairs[perm, 1])
        same_all.append(same[perm])
    return (np.concatenate(i_all).astype(np.int64), np.concatenate(j_all).astype(np.int64),
            np.concatenate(same_all))
