"""FG-NET with distractors: N=0 is the plain leave-one-out, every N equals a brute-force CMC
over FG-NET plus the first N distractors, subsets are nested, the index path agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import distractors as D
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval import protocols as P
from tests.conftest import write_cache


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(seed: int = 0, n_dis: int = 3000):
    rng = np.random.default_rng(seed)
    ident = np.repeat(np.arange(30), 5)
    centres = rng.standard_normal((30, 24))
    feats = _unit(centres[ident] + 0.9 * rng.standard_normal((150, 24)))
    dis = _unit(rng.standard_normal((n_dis, 24)))
    return feats, ident, dis


def test_each_n_equals_brute_force_cmc() -> None:
    feats, ident, dis = _data()
    counts = D.parse_counts("10,100,1000,3000", len(dis))
    rows = D.score_with_distractors(feats, ident, dis, counts, max_rank=10, index="exact")
    assert [r["distractors"] for r in rows] == [0, 10, 100, 1000, 3000]
    plain = P.identification(feats, ident, max_rank=10)
    assert rows[0]["rank1"] == pytest.approx(plain["rank1"])
    np.testing.assert_allclose(rows[0]["cmc"], plain["cmc"])
    for r in rows[1:]:
        n = r["distractors"]
        gallery = np.r_[feats, dis[:n]]
        gid = np.r_[ident, np.full(n, -1)]   # distractors: nobody of FG-NET
        ref = M.cmc(feats, ident, gallery, gid, max_rank=10, exclude_self=True,
                    query_index=np.arange(len(feats)))
        np.testing.assert_allclose(r["cmc"], ref, err_msg=f"N={n}")
    r1 = [r["rank1"] for r in rows]
    assert all(a >= b for a, b in zip(r1, r1[1:], strict=False)) and r1[-1] < r1[0]


def test_index_path_agrees_and_says_so() -> None:
    feats, ident, dis = _data(1)
    counts = [0, 3000]
    exact = D.score_with_distractors(feats, ident, dis, counts, max_rank=5, index="exact")
    ivf = D.score_with_distractors(feats, ident, dis, counts, max_rank=5, index="ivf")
    assert ivf[1]["search"] == "ivf" and ivf[1]["recall_at_1"] >= 0.99
    assert abs(ivf[1]["rank1"] - exact[1]["rank1"]) <= 0.02
    assert "recall@1" in D.markdown({"m": ivf}, 150, 150, "d.h5")


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_an_index_can_only_miss_distractors_never_add_one(kind: str) -> None:
    # the faces an index returns are scored by their true cosine, so a probe's rank under
    # an index is at most its exact rank (PQ codes over-estimating a distractor add nothing)
    feats, ident, _ = _data(2)
    rng = np.random.default_rng(7)
    # distractors two a person, as the IVF-PQ index tests build them (PQ codes of unstructured
    # 24-d vectors cannot reach the 0.99 bar, and the index would fall back to exact)
    pairs = np.repeat(rng.standard_normal((1500, 24)), 2, axis=0)
    dis = _unit(pairs + 0.05 * rng.standard_normal((3000, 24)))
    counts = [0, 3000]
    exact = D.score_with_distractors(feats, ident, dis, counts, max_rank=5, index="exact")
    got = D.score_with_distractors(feats, ident, dis, counts, max_rank=5, index=kind)
    assert got[1]["search"] == kind and got[1]["recall_at_1"] >= 0.99
    e, g = exact[1]["rank"], got[1]["rank"]
    assert np.all((g >= 1) == (e >= 1)) and np.all(g[e >= 1] <= e[e >= 1])
    assert got[1]["rank1"] >= exact[1]["rank1"]


def test_index_counts_use_true_cosines_not_the_index_estimate() -> None:
    class Liar:   # an index whose score estimates are wrong: faces right, scores 0.99
        ntotal = 4

        def search(self, q, k):
            rows = np.tile(np.array([2, 0, -1, -1][:k]), (len(q), 1))
            return np.full(rows.shape, 0.99, np.float32), rows

    dis = np.eye(4, 3, dtype=np.float32)          # rows 0..2 unit axes, row 3 zero
    probes = np.array([[1, 0, 0], [0, 0, 1]], np.float32)
    best = np.array([0.5, 0.5], np.float32)
    # probe 0: row 2 (cos 0) below, row 0 (cos 1) above; probe 1: row 2 above, row 0 below;
    # -1 (nothing found) never counts
    np.testing.assert_array_equal(D.index_counts(Liar(), probes, best, dis, 4), [1, 1])


def test_auto_searches_exactly_unless_an_index_pays_for_its_build() -> None:
    # the break-even is in probes: FG-NET's 1,002 probes against 10^6 distractors are scanned
    assert D.distractor_search("auto", 1_000_000, 1002) == "exact"
    assert D.distractor_search("auto", 10**8, D.AUTO_INDEX_FROM_PROBES) == "exact"
    assert D.distractor_search("auto", D.AUTO_EXACT_UP_TO, 10**6) == "exact"
    assert D.distractor_search("auto", D.AUTO_EXACT_UP_TO + 1,
                               D.AUTO_INDEX_FROM_PROBES + 1) == "hnsw"
    assert D.distractor_search("ivf", 10, 1) == "ivf"     # asked for: built at any size
    assert D.distractor_search("ivf", 1, 1) == "exact"    # but not on one face


def test_one_distractor_counts_under_an_asked_for_index() -> None:
    # it used to be dropped (zero above every probe) when an index was asked for
    feats, ident, dis = _data(5, n_dis=50)
    dis[0] = feats[0]          # the first distractor outscores probe 0's correct faces
    exact = D.score_with_distractors(feats, ident, dis, [0, 1, 50], max_rank=5, index="exact")
    got = D.score_with_distractors(feats, ident, dis, [0, 1, 50], max_rank=5, index="hnsw")
    assert exact[1]["rank"][0] > exact[0]["rank"][0]
    np.testing.assert_array_equal(got[1]["rank"], exact[1]["rank"])
    assert got[1]["search"] == "exact"


def test_auto_past_both_thresholds_builds_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    feats, ident, dis = _data(4, n_dis=3000)
    monkeypatch.setattr(D, "AUTO_INDEX_FROM_PROBES", 100)
    monkeypatch.setattr(D, "AUTO_EXACT_UP_TO", 1000)
    rows = D.score_with_distractors(feats, ident, dis, [0, 1000, 3000], max_rank=5,
                                    index="auto")
    assert [r["search"] for r in rows] == ["exact", "exact", "hnsw"]
    monkeypatch.setattr(D, "AUTO_INDEX_FROM_PROBES", len(feats))   # not more probes than it
    rows = D.score_with_distractors(feats, ident, dis, [0, 1000, 3000], max_rank=5,
                                    index="auto")
    assert [r["search"] for r in rows] == ["exact", "exact", "exact"]


def test_distractor_index_kind_is_checked() -> None:
    feats, ident, dis = _data(3, n_dis=50)
    with pytest.raises(MtmimError, match="--distractor-index flat: choose from"):
        D.score_with_distractors(feats, ident, dis, [0, 50], index="flat")


def test_nested_order_and_counts() -> None:
    a, b = D.nested_order(1000, 3), D.nested_order(1000, 3)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(1000))
    assert D.parse_counts(None, 2500) == [0, 10, 100, 1000, 2500]
    with pytest.raises(MtmimError, match="more than the 50"):
        D.parse_counts("10,100", 50)
    with pytest.raises(MtmimError, match="comma-separated"):
        D.parse_counts("ten", 50)


def test_evaluate_with_distractors_writes_table_and_png(tmp_path) -> None:
    from mtmim_cli.eval.config import EvalConfig, parse_model_arg
    from mtmim_cli.orchestration.evaluate import evaluate
    from tests.test_finetune import save_tiny_pretrain

    _, model = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    ids = [f"p{k}" for k in range(6) for _ in range(4)]
    fg = write_cache(tmp_path / "fg.h5", ids, [float(j * 9) for _ in range(6) for j in range(4)])
    dis = write_cache(tmp_path / "dis.h5", [f"d{k}" for k in range(40)], seed=5)
    cfg = EvalConfig(protocol="fgnet-loo", models=[parse_model_arg(f"tiny={model}")], cache=fg,
                     out=tmp_path / "ev" / "results.md", distractors=dis,
                     distractor_counts="10,40")
    payload = evaluate(cfg, progress=False)
    rows = payload["results"]["tiny"]
    assert [r["distractors"] for r in rows] == [0, 10, 40]
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "| 40 |" in md and "exact" in md
    assert (tmp_path / "ev" / "results.distractors.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["counts"] == [0, 10, 40]
    # the manifest, written last, lists the table and the figure under their stem's names
    assert {k: v["name"] for k, v in saved["files"].items()} == {
        "md": "results.md", "png": "results.distractors.png"}
    plain = evaluate(EvalConfig(protocol="fgnet-loo", models=cfg.models, cache=fg,
                                age_probe=False, resamples=100), progress=False)
    assert rows[0]["rank1"] == pytest.approx(plain["results"][0]["metrics"]["rank1"])
