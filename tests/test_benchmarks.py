"""mtmim_cli.eval.benchmarks: when a run is the benchmark the paper reports on."""

from __future__ import annotations

import hashlib

import numpy as np

from mtmim_cli.eval import benchmarks as B


def _names(n: int) -> list[str]:
    return [f"{s:03d}A{a:02d}.JPG" for s in range(1, 100) for a in range(20)][:n]


def test_names_digest_ignores_folders_order_and_case() -> None:
    names = _names(5)
    want = hashlib.sha256("\n".join(sorted(n.upper() for n in names)).encode()).hexdigest()
    assert B.names_sha256(names) == want
    assert B.names_sha256([f"/data/x/{n.lower()}" for n in reversed(names)]) == want
    assert B.names_sha256([f"sub\\dir\\{n}" for n in names]) == want
    assert B.names_sha256(names[:4]) != want


def test_fgnet_needs_the_full_set_and_one_refit_round_per_photo(monkeypatch) -> None:
    full = _names(1002)
    monkeypatch.setattr(B, "FGNET_NAMES_SHA256", B.names_sha256(full))
    ok = B.fgnet(full, "head", rounds=1000, n_ranked=1000)
    assert ok.comparable and "all 1002 photos" in ok.reason
    assert B.fgnet(full, "full", rounds=1000, n_ranked=1000).comparable
    none = B.fgnet(full, "none", rounds=0, n_ranked=1000)
    assert not none.comparable and "no re-fit" in none.reason
    k10 = B.fgnet(full, "full", rounds=10, n_ranked=1000)
    assert not k10.comparable and "10 grouped rounds" in k10.reason and "90%" in k10.reason
    subset = B.fgnet(full[:230], "head", rounds=230, n_ranked=230)   # e.g. the demo's split
    assert not subset.comparable and "holds 230 records" in subset.reason
    renamed = B.fgnet([n.replace("A", "B") for n in full], "head", 1002, 1002)
    assert not renamed.comparable


def _official_like(seed: int = 0) -> np.ndarray:
    """10 folds, each 300 genuine + 300 impostor in shuffled order (as in lfw.bin)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.r_[np.ones(300, bool), np.zeros(300, bool)])
                           for _ in range(10)])


def test_pairs_official_structure_only_from_a_file() -> None:
    same = _official_like()
    v = B.pairs("agedb30", "file", same, 10)
    assert v.comparable and "AgeDB-30" in v.reason
    assert not B.pairs("lfw", "drawn", same, 10).comparable
    assert "drawn from a cache" in B.pairs("lfw", "drawn", same, 10).reason
    short = B.pairs("calfw", "file", same[:5400], 10)
    assert not short.comparable and "5400 pairs" in short.reason
    skewed = same.copy()
    skewed[:600] = np.r_[np.ones(301, bool), np.zeros(299, bool)]
    assert not B.pairs("lfw", "file", skewed, 10).comparable
    # An explicit fold column: the same structure is recognised.
    assert B.pairs("lfw", "file", same, np.repeat(np.arange(10), 600)).comparable
    assert B.pair_structure(same, 10) == (10, [(300, 300)] * 10)


def test_morph_and_cacd_sizes() -> None:
    assert B.morph("morph-s2", 3000, 10_000).comparable
    small = B.morph("morph-s2", 300, 1000)
    assert not small.comparable and "300 test" in small.reason
    assert B.morph("morph-s1", 10_000, 3000).comparable
    assert not B.morph("morph-s1", 9_999, 0).comparable
    assert B.cacd(120).comparable and not B.cacd(12).comparable


def test_training_overlap_overrides() -> None:
    v = B.Verdict(True, "the benchmark")
    assert B.with_training_overlap(v, {"a": 0}) is v
    bad = B.with_training_overlap(v, {"a": 0, "ft": 1000})
    assert not bad.comparable and "ft (1000)" in bad.reason
