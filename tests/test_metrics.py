"""Metrics against independent computations: sklearn, brute force, hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from mtmim_cli.eval import metrics as M
from mtmim_cli.eval.pairs import cross_age_pairs


# ------------------------------------------------------------ 10-fold rule, written directly
def _direct_tenfold(scores, same, folds):
    """The fold/threshold rule in its plainest form: try every candidate threshold on the
    other folds with a Python loop, keep the first best one, score the held-out fold."""
    accs = []
    for f in sorted(set(folds)):
        tr = [k for k in range(len(scores)) if folds[k] != f]
        te = [k for k in range(len(scores)) if folds[k] == f]
        vals = sorted(set(scores[k] for k in tr))
        cands = [vals[0] - 1.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:], strict=False)] + [vals[-1] + 1.0]
        best_t, best_c = None, -1
        for t in cands:
            c = sum((scores[k] >= t) == same[k] for k in tr)
            if c > best_c:
                best_t, best_c = t, c
        accs.append(sum((scores[k] >= best_t) == same[k] for k in te) / len(te))
    return float(np.mean(accs)), accs


def test_tenfold_hand_made() -> None:
    # 4 folds x 4 pairs. In every fold the scores split cleanly at 0.5 except fold 3,
    # whose impostor scores 0.9: it alone drops to 3/4.
    scores = np.array([0.9, 0.8, 0.2, 0.1,
                       0.7, 0.6, 0.3, 0.4,
                       0.95, 0.55, 0.45, 0.05,
                       0.85, 0.65, 0.9, 0.35])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0], bool)
    out = M.tenfold_verification(scores, same, folds=4)
    assert out["fold_accuracies"] == [1.0, 1.0, 1.0, 0.75]
    assert out["accuracy"] == pytest.approx(3.75 / 4)
    # Folds 0-2 train on data holding fold 3's 0.9 impostor: it costs one training error at
    # every threshold below 0.9 and so does not move theirs; every fold's threshold is the
    # midpoint of the top other impostor (0.45) and the lowest genuine score (0.55).
    assert out["thresholds"] == pytest.approx([0.5] * 4)
    direct, accs = _direct_tenfold(list(scores), list(same), [k // 4 for k in range(16)])
    assert accs == out["fold_accuracies"] and direct == pytest.approx(out["accuracy"])


@pytest.mark.parametrize("seed", range(5))
def test_tenfold_matches_direct_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 120
    same = rng.random(n) < 0.5
    # Rounded scores make ties common, which is where rules usually differ.
    scores = np.round(np.where(same, 0.6, 0.4) + 0.25 * rng.standard_normal(n), 1)
    folds = rng.integers(0, 10, n)
    out = M.tenfold_verification(scores, same, folds=folds)
    direct, accs = _direct_tenfold(list(scores), list(same), list(folds))
    assert out["accuracy"] == pytest.approx(direct)
    assert out["fold_accuracies"] == pytest.approx(accs)


def test_best_threshold_brute_force() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 8, 50).astype(float)
    same = rng.random(50) < 0.5
    thr, acc = M.best_threshold(scores, same)
    best = max(np.mean((scores >= t) == same) for t in np.arange(-1.5, 9.5, 0.5))
    assert acc == pytest.approx(best)
    assert np.mean((scores >= thr) == same) == pytest.approx(acc)


# ------------------------------------------------------------ ROC
@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_and_tar_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    same = rng.random(n) < 0.5
    scores = np.round(np.where(same, 0.5, 0.2) + 0.2 * rng.standard_normal(n), 2)
    assert M.roc_auc(scores, same) == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    for far in (1e-3, 1e-2, 0.1, 0.5):
        expected = tpr[fpr <= far + 1e-12].max()
        assert M.tar_at_far(scores, same, far) == pytest.approx(expected), far
        thr = M.threshold_at_far(scores, same, far)
        assert np.mean(scores[~same] >= thr) <= far + 1e-12


@pytest.mark.parametrize("far", [1e-3, 0.003, 0.01, 0.05, 0.1, 0.2, 1 / 3, 0.7, 1.0])
def test_min_impostors_is_where_the_threshold_first_rests_on_that_many_false_accepts(far) -> None:
    """Brute force over n: the false accepts threshold_at_far actually lets through on n
    distinct impostor scores; min_impostors(far, k) is the first n where that reaches k."""
    rng = np.random.default_rng(0)
    first: dict[int, int] = {}
    for n in range(1, 1101):
        scores = rng.permutation(n + 1).astype(float)   # n impostors, one genuine pair
        same = np.zeros(n + 1, bool)
        same[0] = True
        thr = M.threshold_at_far(scores, same, far)
        accepted = int((scores[~same] >= thr).sum())
        assert accepted == M.allowed_false_accepts(far, n)
        for k in range(1, accepted + 1):
            first.setdefault(k, n)
    for k in (1, 2, 5, 10):
        if k in first:
            assert M.min_impostors(far, k) == first[k], (far, k)
    assert M.min_impostors(far) == first[1]


def test_tar_at_far_hand_made() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.85, 0.5, 0.4, 0.3])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert M.tar_at_far(scores, same, 0.0) == 0.25     # must reject the 0.85 impostor
    assert M.tar_at_far(scores, same, 0.25) == 1.0     # one impostor may pass
    far, tar, _ = M.roc_curve_points(scores, same)
    assert far[-1] == 1.0 and tar[-1] == 1.0 and far[0] == 0.0


# ------------------------------------------------------------ retrieval
@pytest.mark.parametrize("seed", range(6))
def test_average_precision_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    rel = rng.random(n) < 0.2
    rel[0] = True
    scores = np.round(rng.standard_normal(n) + rel, 1)  # ties on purpose
    assert M.average_precision(scores, rel) == pytest.approx(
        average_precision_score(rel, scores), abs=1e-12)


def test_mean_average_precision_against_sklearn() -> None:
    rng = np.random.default_rng(3)
    q = _unit(rng.standard_normal((30, 16)))
    d = _unit(rng.standard_normal((300, 16)))
    qid, did = rng.integers(0, 12, 30), rng.integers(0, 10, 300)
    m, aps = M.mean_average_precision(q, qid, d, did, query_block=7)
    ref = [average_precision_score(did == qid[k], d @ q[k]) for k in range(30) if (did == qid[k]).any()]
    assert np.isnan(aps).sum() == 30 - len(ref)
    assert m == pytest.approx(np.mean(ref), abs=1e-6)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block,qblock", [(3, 50), (7, 5), (64, 1000), (10_000, 3)])
def test_blocked_rank1_equals_dense(block: int, qblock: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))
    gid = rng.integers(0, 40, 500)
    g = _unit(centres[gid] + 1.3 * rng.standard_normal((500, 32)))
    qid = rng.integers(0, 40, 120)
    q = _unit(centres[qid] + 1.3 * rng.standard_normal((120, 32)))
    dense = M.rank1_dense(q, qid, g, gid)
    blocked = M.rank1(q, qid, g, gid, block=block, query_block=qblock)
    assert blocked == dense
    assert 0.05 < dense < 0.95  # a non-trivial case
    # Leave-one-out form: the query set is the gallery, self-matches excluded.
    loo = M.rank1_dense(g, gid, g, gid, exclude_self=True)
    assert M.rank1(g, gid, g, gid, block=block, query_block=qblock, exclude_self=True) == loo
    assert 0.05 < loo < 0.95


def test_top1_ties_go_to_lowest_index() -> None:
    g = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    idx, _ = M.top1(np.array([[1, 0]], np.float32), g, block=1)
    assert idx[0] == 0
    idx, _ = M.top1(g[:1], g, block=2, query_index=np.array([0]))
    assert idx[0] == 2


def test_cmc_brute_force() -> None:
    rng = np.random.default_rng(11)
    g = _unit(rng.standard_normal((300, 8)))
    gid = rng.integers(0, 30, 300)
    curve = M.cmc(g, gid, g, gid, max_rank=10, block=37, query_block=13, exclude_self=True)
    s = g @ g.T
    np.fill_diagonal(s, -np.inf)
    ranks = []
    for k in range(300):
        right = (gid == gid[k]) & (np.arange(300) != k)
        if not right.any():
            ranks.append(10**9)
            continue
        best = s[k][right].max()
        ranks.append(1 + int(((s[k] > best) & ~right & (np.arange(300) != k)).sum()))
    ranks = np.array(ranks)
    assert curve == pytest.approx([(ranks <= r).mean() for r in range(1, 11)])
    assert curve[0] == pytest.approx(M.rank1(g, gid, g, gid, exclude_self=True))


# ------------------------------------------------------------ pairs
def test_cross_age_pairs_balanced_and_valid() -> None:
    rng = np.random.default_rng(0)
    ident = np.repeat(np.arange(40), 12)
    age = rng.uniform(0, 70, len(ident)).round()
    i, j, same = cross_age_pairs(ident, age, n_pairs=1000, seed=1, min_gap=10)
    assert len(i) == 1000
    assert np.all(np.abs(age[i] - age[j]) >= 10)
    assert np.all((ident[i] == ident[j]) == same)
    assert np.all(i != j)
    for f in range(10):
        assert same[f * 100:(f + 1) * 100].sum() == 50
    assert len({(a, b) for a, b in zip(i, j, strict=True)}) == 1000  # no duplicates
    i2, j2, s2 = cross_age_pairs(ident, age, n_pairs=1000, seed=1, min_gap=10)
    assert np.array_equal(i, i2) and np.array_equal(j, j2) and np.array_equal(same, s2)
    out = M.tenfold_verification(np.where(same, 1.0, 0.0), same, folds=10)
    assert out["accuracy"] == 1.0


def test_cross_age_pairs_shrinks_to_available() -> None:
    ident = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5])
    age = np.arange(len(ident), dtype=float)
    i, j, same = cross_age_pairs(ident, age, n_pairs=1000, seed=0, folds=2)
    assert same.sum() == (~same).sum() == 16  # 16 genuine pairs exist, 8 per fold
    usable = np.ones(len(ident), bool)
    usable[[0, 1]] = False
    i, j, same = cross_age_pairs(ident, age, n_pairs=1000, seed=0, folds=2, usable=usable)
    assert not np.isin(np.r_[i, j], [0, 1]).any()
