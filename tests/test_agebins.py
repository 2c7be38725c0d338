"""Age breakdowns: a generated set with known ages and planted failures gives exactly the bins
worked out by hand; empty and single-probe bins; mate success against a brute force."""

from __future__ import annotations

import numpy as np
import pytest

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import agebins as A
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval import protocols as P

NAN = float("nan")
# id0: 2 4 25 40 | id1: 7 8 12 33 | id2: 15 16 19 | id3: 1 (alone) | id4: ? 20
AGES = np.array([2, 4, 25, 40, 7, 8, 12, 33, 15, 16, 19, 1, NAN, 20], float)
IDS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4])
# Planted failures: the three photos at 25 and older.
HIT = ~np.isin(np.arange(len(AGES)), [2, 3, 7])


def _rows(rows):
    return {r["bin"]: (r["n"], r["hits"]) for r in rows}


def test_labels_and_assignment():
    assert A.bin_labels(A.FGNET_AGE_EDGES) == ["0-5", "6-10", "11-15", "16-20", "21-30", "31+"]
    assert A.bin_labels(A.GAP_EDGES) == ["0-5", "6-10", "11-20", "21+"]
    assert A.bin_labels((3, 4, 8)) == ["3", "4-7", "8+"]
    got = A.assign_bins([0, 5.9, 6, 10.99, 11, 30, 31, 69, NAN, -1], A.FGNET_AGE_EDGES)
    assert got.tolist() == [0, 0, 1, 1, 2, 4, 5, 5, -1, -1]


def test_parse_edges():
    assert A.parse_edges("0,6,11,16,21,31") == A.FGNET_AGE_EDGES
    for bad in ("0,6,6", "5,3", "-1,4", "a,b", ""):
        with pytest.raises(MtmimError, match="--age-bins"):
            A.parse_edges(bad)


def test_nearest_mate_leave_one_out_by_hand():
    everyone = np.arange(len(AGES))
    mate, gap = A.nearest_mate(everyone, everyone, IDS, AGES)
    assert mate.tolist() == [1, 0, 3, 2, 5, 4, 5, 6, 9, 8, 9, -1, -1, -1]
    np.testing.assert_array_equal(gap, [2, 2, 15, 15, 1, 1, 4, 21, 1, 1, 3, NAN, NAN, NAN])


def test_nearest_mate_tie_takes_lowest_index_and_disjoint_gallery():
    ages = np.array([10, 8, 12, 30, 50], float)
    ids = np.array([0, 0, 0, 1, 1])
    mate, gap = A.nearest_mate(np.array([0]), np.arange(5), ids, ages)
    assert (mate[0], gap[0]) == (1, 2)
    # MORPH layout: probes are the older photos, the gallery the younger ones.
    mate, gap = A.nearest_mate(np.array([2, 4]), np.array([1, 3]), ids, ages)
    assert mate.tolist() == [1, 3] and gap.tolist() == [4, 20]


def test_identification_breakdown_exact_bins():
    everyone = np.arange(len(AGES))
    bins = A.probe_bins(everyone, everyone, IDS, AGES)
    out = A.identification_breakdown(HIT, bins)
    assert _rows(out["by_probe_age"]) == {
        "0-5": (3, 3), "6-10": (2, 2), "11-15": (2, 2), "16-20": (3, 3), "21-30": (1, 0),
        "31+": (2, 0), "unknown": (1, 1)}
    assert _rows(out["by_gap"]) == {"0-5": (8, 8), "6-10": (0, 0), "11-20": (2, 0),
                                    "21+": (1, 0), "unknown": (3, 3)}
    by_gap = {r["bin"]: r for r in out["by_gap"]}
    assert by_gap["6-10"]["rank1"] is None            # an empty bin has no figure
    assert by_gap["21+"]["rank1"] == 0.0              # a single-probe bin: 0 or 1
    assert by_gap["0-5"]["rank1"] == 1.0
    # Every probe is counted exactly once in each breakdown.
    assert sum(r["n"] for r in out["by_gap"]) == len(AGES)
    assert sum(r["n"] for r in out["by_probe_age"]) == len(AGES)


def test_no_unknown_row_when_everything_is_dated():
    rows = A.rate_rows(np.array([1, 0, 1]), np.array([0, 0, 1]), ["a", "b"])
    assert [r["bin"] for r in rows] == ["a", "b"]
    assert rows[0]["rank1"] == 0.5


def test_outcome_count_mismatch_refused():
    everyone = np.arange(len(AGES))
    bins = A.probe_bins(everyone, everyone, IDS, AGES)
    with pytest.raises(ValueError, match="outcomes"):
        A.identification_breakdown(HIT[:-1], bins)


def test_bin_differences_small_bins_say_so():
    everyone = np.arange(len(AGES))
    bins = A.probe_bins(everyone, everyone, IDS, AGES)
    other = np.ones(len(AGES), bool)
    rows = A.bin_differences(["x", "y"], [HIT, other], bins["gap_bin"],
                             A.bin_labels(A.GAP_EDGES), resamples=200)
    by = {r["bin"]: r for r in rows}
    assert "too few" in by["6-10"]["note"] and by["6-10"]["n"] == 0
    assert by["21+"]["note"].startswith("1 probe:")
    assert by["11-20"]["diff"] == -1.0 and by["11-20"]["n"] == 2
    assert by["0-5"]["diff"] == 0.0 and by["0-5"]["p_mcnemar"] == 1.0


def _brute_mate_success(feats, ids, probe, gallery):
    out = []
    for p in probe:
        imp = max(float(feats[p] @ feats[g]) for g in gallery if ids[g] != ids[p])
        for g in gallery:
            if g != p and ids[g] == ids[p]:
                out.append((p, g, float(feats[p] @ feats[g]) >= imp))
    return out


def test_mate_success_against_brute_force_and_rank():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, 60)
    feats = rng.normal(size=(60, 8)) + 1.5 * rng.normal(size=(6, 8))[ids]
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    everyone = np.arange(60)
    got = A.mate_success(feats, ids, everyone, everyone, block=7)
    ref = _brute_mate_success(feats, ids, everyone, everyone)
    assert list(zip(got["probe"].tolist(), got["mate"].tolist(), got["success"].tolist(),
                    strict=True)) == ref
    # Some mate succeeds exactly when the probe's CMC rank is 1.
    s = feats @ feats.T
    np.fill_diagonal(s, -np.inf)
    for p in everyone:
        _, rank = P.query_ranks(s[p], ids, ids[p])
        assert got["success"][got["probe"] == p].any() == (rank == 1)


def test_age_map_counts_by_hand():
    probe_age = np.array([3, 3, 3, 25, 25, NAN])
    mate_age = np.array([4, 20, 20, 3, 40, 5])
    success = np.array([1, 0, 1, 0, 1, 1], bool)
    m = A.age_map(probe_age, mate_age, success, edges=(0, 10, 30))
    assert m["labels"] == ["0-9", "10-29", "30+"]
    assert m["n"] == [[1, 2, 0], [1, 0, 1], [0, 0, 0]]
    assert m["success"] == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert m["rate"] == [[1.0, 0.5, None], [0.0, None, 1.0], [None, None, None]]


def test_pair_correctness_matches_fold_accuracies():
    rng = np.random.default_rng(1)
    same = rng.random(200) < 0.5
    scores = rng.normal(size=200) + 1.2 * same
    tf = M.tenfold_verification(scores, same, 10)
    correct = A.pair_correctness(scores, same, 10, tf["thresholds"])
    folds = M.fold_labels(200, 10)
    per_fold = [correct[folds == f].mean() for f in range(10)]
    np.testing.assert_allclose(per_fold, tf["fold_accuracies"])


def test_verification_breakdown_by_hand():
    # Bin 0-5: 10 impostors at 0.0..0.9 and 3 genuine at 0.85, 0.95, 0.5; bin 21+: 2 pairs.
    imp = np.arange(10) / 10
    scores = np.r_[imp, 0.85, 0.95, 0.5, 0.9, 0.1]
    same = np.r_[np.zeros(10, bool), True, True, True, True, False]
    gap = np.r_[np.full(13, 2.0), 30, 30]
    correct = np.r_[np.ones(12, bool), False, True, True]
    rows = A.verification_breakdown(scores, same, correct, gap, far=0.1, min_pairs=5)
    by = {r["bin"]: r for r in rows}
    # FAR 0.1 on 10 impostors allows one (0.9): threshold just above 0.8; genuine 0.85 and
    # 0.95 pass, 0.5 fails.
    assert by["0-5"]["tar_at_far"] == pytest.approx(2 / 3)
    assert by["0-5"]["accuracy"] == pytest.approx(12 / 13)
    assert (by["0-5"]["genuine"], by["0-5"]["impostor"]) == (3, 10)
    assert by["21+"]["accuracy"] is None and by["21+"]["tar_at_far"] is None
    assert "2 pairs < 5" in by["21+"]["note"] and "1 impostors < 10" in by["21+"]["note"]
    assert by["6-10"]["n"] == 0 and "no genuine" in by["6-10"]["note"]
    assert "unknown" not in by
