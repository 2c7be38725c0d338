"""Per-probe outcomes agree with the protocol figures computed independently (metrics.rank1,
metrics.cmc, protocols.rank_held_out); faceless photos count as misses; round records and
the sidecar file round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.outcomes import (
    from_rounds,
    on_records,
    probe_outcomes,
    read_outcomes,
    write_outcomes,
)


def _feats(n=80, ids=9, seed=0):
    rng = np.random.default_rng(seed)
    ident = rng.integers(0, ids, n)
    f = rng.normal(size=(n, 12)) + 1.2 * rng.normal(size=(ids, 12))[ident]
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), ident


def test_leave_one_out_matches_rank_held_out_and_metrics():
    f, ident = _feats()
    got = probe_outcomes(f, ident, f, ident, query_index=np.arange(len(f)), block=7)
    ref = P.rank_held_out(f, ident, np.arange(len(f)))
    assert got["top1"].tolist() == ref["top1"]
    assert got["rank"].tolist() == ref["rank"]
    assert got["hit"].tolist() == ref["hit"]
    assert got["hit"].mean() == pytest.approx(M.rank1(f, ident, f, ident, exclude_self=True))
    curve = M.cmc(f, ident, f, ident, max_rank=5, exclude_self=True)
    for r in range(1, 6):
        assert np.mean((got["rank"] > 0) & (got["rank"] <= r)) == pytest.approx(curve[r - 1])


def test_disjoint_gallery_and_a_probe_without_mate():
    f, ident = _feats(seed=1)
    q, g = np.arange(0, 30), np.arange(30, 80)
    qid = ident[q].copy()
    qid[0] = 99  # nobody in the gallery
    got = probe_outcomes(f[q], qid, f[g], ident[g], block=4)
    assert got["rank"][0] == 0 and not got["hit"][0]
    assert got["hit"].mean() == pytest.approx(M.rank1(f[q], qid, f[g], ident[g]))
    curve = M.cmc(f[q], qid, f[g], ident[g], max_rank=3)
    assert np.mean((got["rank"] > 0) & (got["rank"] == 1)) == pytest.approx(curve[0])


def test_faceless_photos_are_misses_over_all_records():
    per_row = {"hit": np.array([True, False, True]), "rank": np.array([1, 3, 1]),
               "top1": np.array([1, 0, 2])}
    rows = np.array([0, 2, 3])  # record 1 and 4 hold no face
    out = on_records(5, rows, per_row, top_rows=rows)
    assert out["hit"].tolist() == [True, False, False, True, False]
    assert out["rank"].tolist() == [1, 0, 3, 1, 0]
    assert out["top1"].tolist() == [2, -1, 0, 3, -1]
    assert out["hit"].mean() == 2 / 5


def test_from_rounds_and_a_doubled_image_refused():
    recs = {0: {"held_out": [0, 2], "hit": [True, False], "rank": [1, 2], "top1": [1, 0]},
            1: {"held_out": [1], "hit": [True], "rank": [1], "top1": [0]}}
    out = from_rounds(recs, 3)
    assert out["hit"].tolist() == [True, True, False] and out["rank"].tolist() == [1, 1, 2]
    recs[1]["held_out"] = [2]
    with pytest.raises(MtmimError, match="rounds hold image"):
        from_rounds(recs, 3)


def test_sidecar_round_trip(tmp_path: Path):
    path = write_outcomes(tmp_path / "outcomes.json", "fgnet-loo", "probe",
                          {"a": {"hit": np.array([True, False]), "rank": np.array([1, 0])}})
    doc = read_outcomes(path)
    assert doc["protocol"] == "fgnet-loo" and doc["models"]["a"]["hit"].tolist() == [True, False]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MtmimError, match="not an outcomes file"):
        read_outcomes(tmp_path / "bad.json")


def test_features_from_rounds_in_position_order():
    from mtmim_cli.eval.outcomes import features_from_rounds

    recs = {0: {"held_out": [2, 0], "features": [[1.0, 0.0], [0.0, 1.0]]},
            1: {"held_out": [1], "features": [[0.5, 0.5]]}}
    np.testing.assert_array_equal(features_from_rounds(recs, 3), [[0, 1], [0.5, 0.5], [1, 0]])
    del recs[1]["features"]  # a round stored before rounds kept their features
    assert features_from_rounds(recs, 3) is None
