"""mtmim_cli.index: IVF-PQ built, tuned and recorded; a recall below the bar falls back to the
exact scan with its reason; the exact scan equals brute force; a gallery keeps its IVF-PQ."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mtmim_cli.index import ann
from mtmim_cli.index.exact import brute_force, exact_search


def grouped(n: int, d: int, per: int, noise: float, seed: int = 0) -> np.ndarray:
    """Unit vectors, `per` around each random centre (faces of one person)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n // per + 1, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.repeat(c, per, axis=0)[:n] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def pairs() -> np.ndarray:
    # two faces a person: each face's nearest other is its mate, well apart from the rest
    return grouped(4000, 32, 2, 0.05)


def test_ivfpq_built_tuned_and_recorded(pairs) -> None:
    index, built = ann.build_index(pairs, "ivfpq", sample_size=400)
    assert index is not None and built.kind == "ivfpq" and not built.fallback
    p = built.params
    assert p["M"] == ann.default_pq_m(32) == 8 and p["nbits"] == 8
    assert p["refine"] == "sq8" and p["k_factor"] == ann.PQ_K_FACTOR
    assert p["nlist"] == ann.ivf_nlist(4000)
    assert p["nprobe"] in ann.search_ladder("ivfpq", p["nlist"])
    assert built.recall_at_1 >= ann.MIN_RECALL and built.recall_sample == 400
    assert built.tried[-1]["param"] == p["nprobe"]
    # PQ codes (8) + SQ8 re-rank codes (32) + id (8) + codebooks: well under float32's 128
    assert 48 <= built.bytes_per_face < 4 * 32
    # the recorded recall is what the index gives on that sample, not a stored number
    sample = ann.recall_sample(4000, 400)
    again = ann.recall_at_1(pairs, lambda q, k: ann.faiss_search(index, q, k), sample)
    assert again == pytest.approx(built.recall_at_1)


def test_refine_codes_counted_in_bytes(pairs) -> None:
    plain = ann.index_bytes(ann.build_faiss("ivfpq", pairs, refine="none"))
    for refine, per_face in (("sq8", 32), ("fp16", 64), ("flat", 128)):
        refined = ann.index_bytes(ann.build_faiss("ivfpq", pairs, refine=refine))
        assert abs((refined - plain) / len(pairs) - per_face) < 1, refine


def test_low_recall_falls_back_to_exact_with_reason() -> None:
    # five faces a person, one 1-byte code per face, no re-rank: the codes cannot tell a
    # face's nearest mate from the other four, whatever the number of cells probed
    feats = grouped(3000, 32, 5, 0.18, seed=1)
    index, built = ann.build_index(feats, "ivfpq", pq_m=1, refine="none", sample_size=300)
    assert index is None and built.kind == "exact" and built.requested == "ivfpq"
    assert built.recall_at_1 < ann.MIN_RECALL
    assert f"< {ann.MIN_RECALL} of the exact scan; using the exact scan" in built.fallback
    assert built.fallback.startswith(f"ivfpq reached recall@1 {built.recall_at_1:.4f}")
    nlist = ann.ivf_nlist(3000)
    assert [t["param"] for t in built.tried][-1] == nlist   # every cell tried before refusing
    assert built.bytes_per_face == 4 * 32


def test_too_few_faces_for_pq_codebooks() -> None:
    index, built = ann.build_index(grouped(200, 32, 2, 0.05), "ivfpq")
    assert index is None and built.kind == "exact"
    assert "ivfpq needs at least 256 faces" in built.fallback


def test_bad_pq_settings_are_one_line_errors(pairs) -> None:
    from mtmim_cli.errors import MtmimError

    with pytest.raises(MtmimError, match="ivfpq M 5: must divide the feature dimension 32"):
        ann.build_faiss("ivfpq", pairs, pq_m=5)
    with pytest.raises(MtmimError, match="ivfpq refine pq4: choose from none, sq8"):
        ann.build_faiss("ivfpq", pairs, refine="pq4")


def test_exact_equals_brute_force_with_duplicates() -> None:
    g = grouped(3000, 16, 3, 0.1, seed=2)
    g[1000:1010] = g[5]                     # ties: the same face enrolled 11 times
    q = np.concatenate([g[[5, 17, 2999]], grouped(20, 16, 1, 0.0, seed=3)])
    for k in (1, 4, 12):
        s, r = exact_search(g, q, k, block_rows=700)
        bs, br = brute_force(g, q, k)
        np.testing.assert_array_equal(r, br)
        np.testing.assert_allclose(s, bs, rtol=0, atol=1e-6)


def test_gallery_keeps_and_reloads_ivfpq(pairs, tmp_path) -> None:
    from mtmim_cli.deploy.gallery import Gallery
    from mtmim_cli.deploy.gallery_store import write_generation

    n = len(pairs)
    rec = {"identity": [str(i // 2) for i in range(n)], "path": [f"{i}.jpg" for i in range(n)],
           "age": np.full(n, np.nan, np.float32), "status": ["prealigned"] * n,
           "source": ["x"] * n}
    faces = np.zeros((n, 56, 56, 3), np.uint8)
    built = write_generation(tmp_path / "g", pairs, faces, rec, {"flip": "none"}, index="ivfpq")
    assert built["kind"] == "ivfpq"
    g = Gallery(tmp_path / "g")
    assert g.manifest["index"]["params"] == built["params"]
    assert ann._faiss().extract_index_ivf(g.index).nprobe == built["params"]["nprobe"]
    _, rows = g.search_features(pairs[:50], 2)
    _, exact_rows = exact_search(pairs, pairs[:50], 2)
    assert (rows[:, 1] == exact_rows[:, 1]).mean() >= 0.96


def _steps_ok(values: list[int], top: int) -> None:
    assert values == sorted(set(values)) and values[-1] == top
    ratios = [b / a for a, b in zip(values[:-1], values[1:], strict=True)]
    assert all(1.0 < r <= 1.5 + 1e-9 for r in ratios), ratios


def test_search_ladder_is_fine_up_to_every_cell() -> None:
    # 4,000 cells (a 10^6 gallery): no jump from 256 to every cell, each step at most x1.5
    ivf = ann.search_ladder("ivf", 4000)
    assert ivf[:5] == [8, 12, 16, 24, 32] and {256, 384, 512, 2048, 3072} <= set(ivf)
    _steps_ok(ivf, 4000)
    _steps_ok(ann.search_ladder("ivfpq", 186), 186)
    assert ann.search_ladder("ivf", 5) == [5]   # fewer cells than the first step: all of them
    hnsw = ann.search_ladder("hnsw")
    assert hnsw[0] == 32 and hnsw[-1] == ann.HNSW_EF_MAX >= 1024
    _steps_ok(hnsw, ann.HNSW_EF_MAX)


def test_build_index_tries_the_fine_ladder_before_refusing() -> None:
    # an unreachable bar: every setting is tried, 600 cells reached through 384 and 512
    feats = grouped(5000, 16, 5, 0.3, seed=4)
    index, built = ann.build_index(feats, "ivf", nlist=600, sample_size=100, min_recall=1.01)
    assert index is None and built.kind == "exact"
    tried = [t["param"] for t in built.tried]
    assert tried == ann.search_ladder("ivf", 600) and {384, 512} <= set(tried)
    _steps_ok(tried, 600)
    assert "< 1.01 of the exact scan" in built.fallback


def test_pq_options_built_and_recorded(pairs) -> None:
    index, built = ann.build_index(pairs, "ivfpq", pq_m=4, refine="fp16", sample_size=300)
    assert index is not None and built.kind == "ivfpq"
    assert built.params["M"] == 4 and built.params["refine"] == "fp16"
    assert built.options == {"pq_m": 4, "refine": "fp16"}
    base = ann._faiss().downcast_index(index.base_index)
    assert base.pq.M == 4
    # refine none: no k_factor recorded, and the options kept even when refused
    _, plain = ann.build_index(pairs, "ivfpq", refine="none", sample_size=300)
    assert plain.options == {"refine": "none"}
    if plain.kind == "ivfpq":
        assert plain.params["refine"] == "none" and "k_factor" not in plain.params


@pytest.mark.parametrize("kw,message", [
    ({"kind": "ivf", "pq_m": 8}, "--pq-m: only with --index ivfpq (not --index ivf)"),
    ({"kind": "auto", "refine": "sq8"}, "--pq-refine: only with --index ivfpq"),
    ({"kind": "ivfpq", "pq_m": 0}, "--pq-m 0: a positive number"),
    ({"kind": "ivfpq", "pq_m": 5, "dim": 256}, "--pq-m 5: must divide the feature dimension 256"),
    ({"kind": "ivfpq", "refine": "pq4"}, "--pq-refine pq4: choose from none, sq8, fp16, flat"),
])
def test_pq_options_checked(kw, message) -> None:
    from mtmim_cli.errors import MtmimError

    with pytest.raises(MtmimError, match=re.escape(message)):
        ann.check_pq_options(**kw)
    assert ann.check_pq_options("ivfpq", 16, "none", dim=256) == {"pq_m": 16, "refine": "none"}
    assert ann.check_pq_options("ivf") == {}


def test_gallery_keeps_pq_options_through_unenroll(pairs, tmp_path) -> None:
    from mtmim_cli.deploy.enroll import remove_identities
    from mtmim_cli.deploy.gallery_store import write_generation

    n = len(pairs)
    rec = {"identity": [str(i // 2) for i in range(n)], "path": [f"{i}.jpg" for i in range(n)],
           "age": np.full(n, np.nan, np.float32), "status": ["prealigned"] * n,
           "source": ["x"] * n}
    settings = {k: None for k in ("model", "model_sha256", "backbone", "flip", "pad",
                                  "on_miss", "feature", "threshold")}
    settings["sources"] = []
    faces = np.zeros((n, 56, 56, 3), np.uint8)
    built = write_generation(tmp_path / "g", pairs, faces, rec, settings, index="ivfpq",
                             index_options={"pq_m": 4, "refine": "fp16"})
    assert built["params"]["M"] == 4 and built["options"] == {"pq_m": 4, "refine": "fp16"}
    again = remove_identities(tmp_path / "g", ["0", "1"])["index"]
    assert again["kind"] == "ivfpq" and again["params"]["M"] == 4
    assert again["params"]["refine"] == "fp16" and again["options"] == built["options"]


def test_enroll_refuses_bad_pq_options_before_embedding(tmp_path) -> None:
    from tests.conftest import run_cli, write_cache
    from tests.test_finetune import save_tiny_pretrain

    _, model = save_tiny_pretrain(tmp_path / "pre.pt", seed=1)
    cache = write_cache(tmp_path / "c.h5", [f"id{k}" for k in range(4) for _ in range(2)])
    out = tmp_path / "g"
    for extra, message in (
            (("--index", "ivf", "--pq-m", "8"), "--pq-m: only with --index ivfpq"),
            (("--index", "ivfpq", "--pq-refine", "pq4"), "--pq-refine pq4: choose from"),
            (("--index", "ivfpq", "--pq-m", "7"), "--pq-m 7: must divide the feature dimension"),
    ):
        r = run_cli("enroll", str(cache), "-m", str(model), "-o", str(out), "-q", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, r.stderr)
        assert not (out / ".work").exists() and not (out / "manifest.json").exists()
    # given right, they reach the manifest (8 faces: too few for PQ codebooks, so exact)
    r = run_cli("enroll", str(cache), "-m", str(model), "-o", str(out), "-q", "--index",
                "ivfpq", "--pq-m", "16", "--pq-refine", "fp16")
    assert r.returncode == 0, r.stderr
    import json

    index = json.loads((out / "manifest.json").read_text())["index"]
    assert index["requested"] == "ivfpq" and index["options"] == {"pq_m": 16, "refine": "fp16"}
    # --append without --index keeps the gallery's kind and options; --index given wins
    more = write_cache(tmp_path / "m.h5", [f"new{k}" for k in range(2) for _ in range(2)], seed=3)
    r = run_cli("enroll", str(more), "-m", str(model), "-o", str(out), "-q", "--append")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "manifest.json").read_text())["index"]
    assert index["requested"] == "ivfpq" and index["options"] == {"pq_m": 16, "refine": "fp16"}
    r = run_cli("enroll", str(more), "-m", str(model), "-o", str(out), "-q", "--append",
                "--index", "exact")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "manifest.json").read_text())["index"]
    assert index["requested"] == "exact" and index["options"] == {}


def test_recall_ties_use_the_true_cosine_not_the_index_estimate(pairs) -> None:
    # an index that returns a wrong face with an over-estimated score: not a hit
    sample = ann.recall_sample(len(pairs), 50)
    _, er = ann.nearest_other(lambda p, k: exact_search(pairs, p, k), pairs[sample], sample)
    wrong = (er + 7) % len(pairs)

    def lying(probes, k):
        rows = np.stack([sample, wrong], axis=1)
        return np.tile(np.array([1.0, 0.999], np.float32), (len(probes), 1)), rows

    assert ann.recall_at_1(pairs, lying, sample) == 0.0


# --------------------------------------------------------------------------- HNSW on SQ8


def test_reranked_shortlist_of_everything_is_the_exact_scan() -> None:
    faiss = ann._faiss()
    f = grouped(600, 16, 3, 0.3)
    f[10] = f[400]                        # a duplicate: equal scores come back by row
    base = faiss.IndexFlatIP(16)
    base.add(np.ascontiguousarray(f[:, ::-1]))   # a wrong ranking: only the rows matter
    r = ann.Reranked(base, f, k_factor=len(f))
    q = f[[3, 400, 599]] + 0.01
    s, rows = r.search(q, 7)
    es, er = exact_search(f, q, 7)
    np.testing.assert_array_equal(rows, er)
    np.testing.assert_allclose(s, es, atol=1e-6)
    assert list(rows[1, :2]) == [10, 400]


def test_reranked_scores_are_true_cosines_and_unfound_rows_last() -> None:
    class Liar:
        ntotal = 3

        def search(self, q, k):
            rows = np.array([[0, -1, 2, 1][:k]] * len(q))
            return np.full(rows.shape, 5.0, np.float32), rows

    f = np.eye(3, dtype=np.float32)
    s, rows = ann.Reranked(Liar(), f, k_factor=2).search(np.array([[0.2, 0.9, 0.1]],
                                                                   np.float32), 2)
    np.testing.assert_array_equal(rows, [[0, 2]])     # the shortlist was rows 0, -1, 2 only
    np.testing.assert_allclose(s, [[0.2, 0.1]], atol=1e-7)
    with pytest.raises(Exception, match="index of 3 faces over 2 features"):
        ann.Reranked(Liar(), f[:2])


def test_hnsw_walks_sq8_codes_rescored_recorded_and_reloaded(tmp_path) -> None:
    from mtmim_cli.deploy.gallery import Gallery
    from mtmim_cli.deploy.gallery_store import write_generation

    f = grouped(3000, 32, 3, 0.3)
    index, built = ann.build_index(f, "hnsw", sample_size=300)
    assert isinstance(index, ann.Reranked) and built.kind == "hnsw"
    assert {"M": 48, "efConstruction": 120, "codes": "sq8", "k_factor": 4}.items() <= \
        built.params.items() and built.recall_at_1 >= 0.99
    # the codes and graph only: SQ8 is a byte a dimension, float32 four
    assert 32 < built.bytes_per_face < 32 * 4 + 48 * 2 * 4
    s, rows = ann.faiss_search(index, f[:40], 5)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", f[:40], f[rows]), atol=1e-6)
    assert ann.choose_kind("auto", ann.AUTO_EXACT_UP_TO + 1) == "hnsw"
    assert ann.choose_kind("auto", ann.AUTO_EXACT_UP_TO) == "exact"
    flat, fb = ann.build_index(f, "hnsw", codes="flat", sample_size=300)
    assert not isinstance(flat, ann.Reranked) and fb.params["codes"] == "flat"
    assert "k_factor" not in fb.params
    n = len(f)
    rec = {"identity": [str(i // 3) for i in range(n)], "path": [f"{i}.jpg" for i in range(n)],
           "age": np.full(n, np.nan, np.float32), "status": ["prealigned"] * n,
           "source": ["x"] * n}
    out = write_generation(tmp_path / "g", f, np.zeros((n, 56, 56, 3), np.uint8), rec,
                           {"flip": "none"}, index="hnsw")
    g = Gallery(tmp_path / "g")
    assert out["params"]["k_factor"] == 4 and out["params"]["codes"] == "sq8"
    assert isinstance(g.index, ann.Reranked) and isinstance(g.index.feats, np.memmap)
    assert g.index.hnsw.efSearch == out["params"]["efSearch"]
    gs, grows = g.search_features(f[:40], 5)
    np.testing.assert_allclose(gs, np.einsum("qd,qkd->qk", f[:40], f[grows]), atol=1e-6)
    _, er = exact_search(f, f[:40], 5)
    assert (grows[:, 1] == er[:, 1]).mean() >= 0.95
