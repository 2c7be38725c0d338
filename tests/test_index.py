"""mtmim_cli.index: IVF-PQ built, tuned and recorded; a recall below the bar falls back to the
exact scan with its reason; the exact scan equals brute force; a gallery keeps its IVF-PQ."""

from __future__ import annotations

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
    assert p["nlist"] == ann.ivf_nlist(4000) and p["nprobe"] in ann.SEARCH_LADDER["ivfpq"]
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
