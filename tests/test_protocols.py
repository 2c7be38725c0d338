"""Protocols on small generated caches and features, against brute-force computations."""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mtmim_cli.data.cache import Cache
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import loading as L
from mtmim_cli.eval import metrics as M
from mtmim_cli.eval import protocols as P
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.features import extract_features
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import PoolNet, write_cache


# ---------------------------------------------------------------- a small real model
def _face_cache(path: Path, n_ids: int = 12, per_id: int = 6, noise: float = 90.0,
                seed: int = 0) -> Path:
    """Each identity a common 14x14 pattern plus a small identity-specific change, upsampled;
    each image adds strong noise, so rank-1 lands strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    pats = rng.uniform(60, 195, (1, 14, 14, 3)) + rng.uniform(-6, 6, (n_ids, 14, 14, 3))
    ids, ages, imgs = [], [], []
    for k in range(n_ids):
        for j in range(per_id):
            base = np.kron(pats[k], np.ones((8, 8, 1)))
            img = np.clip(base + noise * rng.standard_normal(base.shape), 0, 255)
            imgs.append(img.astype(np.uint8))
            ids.append(f"s{k:03d}")
            ages.append(float(5 * j + k % 3))
    return write_cache(path, ids, ages, images=np.stack(imgs))


# ---------------------------------------------------------------- FG-NET leave-one-out
def test_fgnet_refit_none_end_to_end(tmp_path: Path, pool_model: Path) -> None:
    cache_path = _face_cache(tmp_path / "faces.h5")
    out = tmp_path / "res" / "results.md"
    cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("pool", pool_model)],
                       cache=cache_path, out=out, command="mtmim evaluate test")
    payload = evaluate(cfg, progress=False)
    m = payload["results"][0]["metrics"]
    cache = Cache(cache_path)
    feats = extract_features(PoolNet(), cache, np.arange(len(cache)), "concat")
    expected = M.rank1_dense(feats, cache.identity, feats, cache.identity, exclude_self=True)
    assert m["rank1"] == expected and 0.2 < expected < 0.95
    assert m["queries"] == 72 and m["cmc"][0] == pytest.approx(m["rank1"], abs=1 / 72 + 1e-9)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"][0]["metrics"]["rank1"] == expected
    assert saved["inputs"][0]["sha256"] == file_sha256(cache_path)
    assert saved["models"][0]["sha256"] == file_sha256(pool_model)
    assert saved["command"] == "mtmim evaluate test" and saved["tool_version"]
    md = out.read_text()
    # Rank-1 over all photos (here every photo has a face), queries, photos without a face.
    assert f"| pool | {100 * expected:.2f} | 72 | 0 |" in md
    # 72 generated faces are not FG-NET: the paper's row only under "not comparable".
    assert md.index("#### Not comparable: not FG-NET's 1002 photos") < md.index(
        "| MT-MIM (reported, paper) | 94.21 |")
    rows = list(csv.DictReader(open(out.parent / "results.cmc.csv")))
    assert len(rows) == 20 and rows[0]["model"] == "pool"


def test_fgnet_flip_modes_differ(tmp_path: Path, pool_model: Path) -> None:
    cache_path = _face_cache(tmp_path / "faces.h5", noise=120)
    res = {}
    for flip in ("concat", "sum", "none"):
        cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("pool", pool_model)],
                           cache=cache_path, flip=flip)
        res[flip] = evaluate(cfg, progress=False)["results"][0]["metrics"]["rank1"]
    cache = Cache(cache_path)
    for flip, r1 in res.items():
        f = extract_features(PoolNet(), cache, None, flip)
        assert r1 == M.rank1_dense(f, cache.identity, f, cache.identity, exclude_self=True)


def test_loo_rounds_partition() -> None:
    exact = P.loo_rounds(10)
    assert [r.tolist() for r in exact] == [[i] for i in range(10)]
    grouped = P.loo_rounds(1002, 10, seed=3)
    assert len(grouped) == 10 and {len(g) for g in grouped} == {100, 101}
    assert np.array_equal(np.sort(np.concatenate(grouped)), np.arange(1002))
    assert all(np.array_equal(a, b) for a, b in zip(grouped, P.loo_rounds(1002, 10, seed=3), strict=True))


def test_rank_held_out_brute_force() -> None:
    rng = np.random.default_rng(0)
    ident = rng.integers(0, 8, 60)
    f = M.__dict__["np"].asarray(rng.standard_normal((60, 5)), np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    held = np.array([3, 17, 59])
    rec = P.rank_held_out(f, ident, held)
    for k, q in enumerate(held):
        s = f @ f[q]
        s[q] = -np.inf
        assert rec["top1"][k] == int(np.argmax(s))
        right = (ident == ident[q]) & (np.arange(60) != q)
        assert rec["rank"][k] == 1 + int(((s > s[right].max()) & ~right).sum())
        assert rec["hit"][k] == (ident[np.argmax(s)] == ident[q])


def _fake_round(calls: list[int]):
    def fn(r: int, held: np.ndarray) -> dict:
        calls.append(r)
        return {"held_out": held.tolist(), "top1": [0] * len(held), "rank": [1 + r % 2] * len(held),
                "hit": [r % 2 == 0] * len(held)}
    return fn


def test_rounds_resume_shard_and_merge(tmp_path: Path) -> None:
    rounds = P.loo_rounds(9)
    cfg = {"protocol": "fgnet-loo", "seed": 0}
    # A run that dies after 4 rounds ...
    calls: list[int] = []

    def dying(r, held):
        if len(calls) == 4:
            raise KeyboardInterrupt
        return _fake_round(calls)(r, held)

    store = P.RoundStore(tmp_path / "a", cfg)
    with pytest.raises(KeyboardInterrupt):
        P.run_rounds(rounds, dying, store, progress=False)
    # ... with a torn half line at the end of its file, then resumes where it stopped.
    (next((tmp_path / "a").glob("rounds-*.jsonl"))).open("a").write('{"round": 7, "hel')
    calls.clear()
    done = P.run_rounds(rounds, _fake_round(calls), P.RoundStore(tmp_path / "a", cfg), progress=False)
    assert calls == [4, 5, 6, 7, 8] and len(done) == 9
    full = P.merge_rounds(done, 9, 9)
    # Shards run separately, then merged, give the same figures.
    for i in range(3):
        P.run_rounds(rounds, _fake_round([]), P.RoundStore(tmp_path / "b", cfg), (i, 3), progress=False)
    merged = P.merge_rounds(P.RoundStore(tmp_path / "b", cfg).done(), 9, 9)
    assert merged["rank1"] == full["rank1"] == pytest.approx(5 / 9)
    assert merged["cmc"][:2] == full["cmc"][:2] == pytest.approx([5 / 9, 1.0])
    with pytest.raises(MtmimError, match="not done"):
        P.merge_rounds({0: done[0]}, 9, 9)
    with pytest.raises(MtmimError, match="different run"):
        P.RoundStore(tmp_path / "b", {"protocol": "fgnet-loo", "seed": 1})


def test_parse_shard() -> None:
    assert P.parse_shard("1/4") == (1, 4) and P.parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(MtmimError):
            P.parse_shard(bad)


# ---------------------------------------------------------------- MORPH
def test_largest_gap_pairs_and_morph_rank1() -> None:
    ident = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    age = np.array([20, 50, 30, 40, 41, 18, np.nan, 60, 33], float)
    probe, gallery, used = P.largest_gap_pairs(ident, age, [0, 1, 2, 3])
    assert probe.tolist() == [1, 4, 7] and gallery.tolist() == [0, 3, 5] and used == [0, 1, 2]
    rng = np.random.default_rng(1)
    f = rng.standard_normal((9, 4)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    out = P.morph_rank1(f, ident, age, [0, 1, 2, 3])
    s = f[probe] @ f[gallery].T
    assert out["rank1"] == np.mean(np.argmax(s, axis=1) == np.arange(3))


def test_morph_split() -> None:
    ident = np.repeat(np.arange(50), 3)
    split = P.morph_split(ident, "morph-s2", seed=4, n_test=15, n_train=30)
    assert len(split["test"]) == 15 and len(split["train"]) == 30
    assert not set(split["test"]) & set(split["train"])
    assert split == P.morph_split(ident, "morph-s2", seed=4, n_test=15, n_train=30)
    s1 = P.morph_split(ident, "morph-s1", seed=4, n_test=20)
    assert len(s1["train"]) == 30
    with pytest.raises(MtmimError, match="needs 13000 subjects"):
        P.morph_split(ident, "morph-s2")


def test_morph_end_to_end_writes_split(tmp_path: Path, pool_model: Path) -> None:
    cache_path = _face_cache(tmp_path / "m.h5", n_ids=20, per_id=3, noise=60)
    out = tmp_path / "results.md"
    cfg = EvalConfig(protocol="morph-s2", models=[ModelArg("a", pool_model),
                                                   ModelArg("b", pool_model)],
                       cache=cache_path, out=out, test_subjects=8, train_subjects=12)
    payload = evaluate(cfg, progress=False)
    split = json.loads(Path(payload["split_file"]).read_text())
    assert len(split["test"]) == 8 and split["test_names"][0].startswith("s")
    # one of the output set: named after --out's stem, its digest in the manifest
    assert payload["split_file"] == str(tmp_path / "results.split.json")
    listed = json.loads(out.with_suffix(".json").read_text())["files"]["split"]
    assert listed == {"name": "results.split.json",
                      "sha256": file_sha256(tmp_path / "results.split.json")}
    a, b = (r["metrics"]["rank1"] for r in payload["results"])
    assert a == b and payload["results"][0]["metrics"]["queries"] == 8
    assert "| a |" in out.read_text() and "| b |" in out.read_text()
    # A reduced split is not Setting-2: the paper's rows go under "not comparable".
    assert payload["benchmark"] == {"comparable": False, "reason": (
        "8 test and 12 training subjects (Setting-2 trains on 10,000 subjects and tests on "
        "3,000 others)")}
    assert "#### Not comparable: 8 test and 12 training subjects" in out.read_text()


# ---------------------------------------------------------------- CACD
def test_cacd_map_against_sklearn() -> None:
    rng = np.random.default_rng(2)
    n = 400
    ident = rng.integers(0, 15, n)
    year = rng.integers(2004, 2014, n)
    test = rng.random(n) < 0.8
    centres = rng.standard_normal((15, 6))
    f = (centres[ident] + 1.5 * rng.standard_normal((n, 6))).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    out = P.cacd_map(f, ident, year, test)
    q = np.flatnonzero(test & (year == 2013))
    for name, (lo, hi) in P.CACD_DATABASES.items():
        d = np.flatnonzero(test & (year >= lo) & (year <= hi))
        aps = [average_precision_score(ident[d] == ident[k], f[d] @ f[k]) for k in q
               if (ident[d] == ident[k]).any()]
        assert out[name]["map"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert out["queries"] == len(q)


def test_cacd_end_to_end_is_not_the_benchmark_with_few_celebrities(tmp_path: Path,
                                                                   pool_model: Path) -> None:
    cache_path = _face_cache(tmp_path / "c.h5", n_ids=6, per_id=4, noise=60)
    cache = Cache(cache_path)
    years = [2013, 2005, 2008, 2011]
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "year", "test"])
        for k, p in enumerate(cache.paths):
            w.writerow([p, years[k % 4], int(cache.identity[k] < 5)])  # 5 test celebrities
    payload = evaluate(EvalConfig(protocol="cacd-map", models=[ModelArg("pool", pool_model)],
                                  cache=cache_path, meta=tmp_path / "meta.csv"), progress=False)
    assert payload["results"][0]["metrics"]["test_identities"] == 5
    assert payload["benchmark"] == {"comparable": False,
                                    "reason": "5 test celebrities (the paper tests on 120)"}


# ---------------------------------------------------------------- verification
def test_pairs_bin_and_csv_end_to_end(tmp_path: Path, pool_model: Path) -> None:
    import io

    from PIL import Image

    cache_path = _face_cache(tmp_path / "v.h5", n_ids=10, per_id=4, noise=110)
    cache = Cache(cache_path)
    i, j, same = __import__("mtmim_cli.eval.pairs", fromlist=["x"]).cross_age_pairs(
        cache.identity, cache.age, 200, seed=0)
    # The same pairs as a CSV on the cache, and as an insightface .bin (PNG, lossless).
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path_a", "path_b", "same"])
        for a, b, s in zip(i, j, same, strict=True):
            w.writerow([cache.paths[a], cache.paths[b], int(s)])
    bins = []
    for a, b in zip(i, j, strict=True):
        for k in (a, b):
            buf = io.BytesIO()
            Image.fromarray(cache.image(k)).save(buf, "PNG")
            bins.append(buf.getvalue())
    (tmp_path / "pairs.bin").write_bytes(pickle.dumps((bins, [bool(s) for s in same])))

    feats = extract_features(PoolNet(), cache, None, "concat")
    scores = np.sum(feats[i] * feats[j], axis=1)
    expected = M.tenfold_verification(scores, same, 10)
    results = {}
    for name, kw in {"csv": {"cache": cache_path, "pairs": tmp_path / "pairs.csv"},
                     "bin": {"pairs": tmp_path / "pairs.bin"},
                     "drawn": {"cache": cache_path, "n_pairs": 200}}.items():
        cfg = EvalConfig(protocol="lfw", models=[ModelArg("pool", pool_model)],
                           out=tmp_path / name / "results.md", **kw)
        results[name] = evaluate(cfg, progress=False)["results"][0]["metrics"]
    for m in results.values():
        assert m["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
        assert m["auc"] == pytest.approx(M.roc_auc(scores, same), abs=1e-6)
        # 60 impostor pairs cannot resolve a FAR of 1e-3: no figure, a note saying why.
        assert m["tar_at_far"] is None and m["impostor_pairs"] == (~same).sum() == 60
        assert m["tar_at_far_note"] == "n/a (needs >= 1000 impostors, have 60)"
    assert 0.55 < expected["accuracy"] < 0.99
    roc = list(csv.DictReader(open(tmp_path / "csv" / "results.roc.csv")))
    assert roc and roc[-1]["far"] == "1" and float(roc[-1]["tar"]) == 1.0
    md = (tmp_path / "csv" / "results.md").read_text()
    assert "| n/a (needs >= 1000 impostors, have 60) |" in md
    # 120 pairs are not LFW's official 6,000: the paper's row sits under "not comparable".
    assert md.index("#### Not comparable: 120 pairs in 10 folds") < md.index("99.25")
    drawn = (tmp_path / "drawn" / "results.md").read_text()
    assert "Not comparable: pairs drawn from a cache" in drawn
    assert f"pairs: drawn from {cache_path} (seed 0, 200 asked; 120 pairs, 60 genuine" in drawn
    sha = hashlib.sha256((tmp_path / "pairs.bin").read_bytes()).hexdigest()[:16]
    assert f"pairs: insightface .bin file {tmp_path / 'pairs.bin'} (sha256 {sha};" in (
        tmp_path / "bin" / "results.md").read_text()


def test_bad_inputs(tmp_path: Path, pool_model: Path) -> None:
    cache_path = _face_cache(tmp_path / "v.h5", n_ids=3, per_id=2)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    cases = [
        ({"protocol": "nope", "cache": cache_path}, "choose from"),
        ({"protocol": "lfw", "cache": cache_path, "pairs": tmp_path / "bad.csv"}, "path_a"),
        ({"protocol": "fgnet-loo"}, "needs --cache"),
        ({"protocol": "morph-s2", "cache": cache_path, "refit": "head"}, "fgnet-loo only"),
        ({"protocol": "cacd-map", "cache": cache_path}, "--meta"),
    ]
    for kw, msg in cases:
        with pytest.raises(MtmimError, match=msg):
            evaluate(EvalConfig(models=[ModelArg("m", pool_model)], **kw), progress=False)


# ---------------------------------------------------------------- the command
@pytest.mark.slow
def test_cli_evaluate_side_by_side_and_errors(tmp_path: Path) -> None:
    from mtmim_cli.models.backbones import build_backbone
    from tests.conftest import run_cli

    cache_path = _face_cache(tmp_path / "c.h5", n_ids=6, per_id=5)
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(build_backbone("tiny").state_dict(), tmp_path / f"tiny{seed}.pt")
    out = tmp_path / "r" / "results.md"
    r = run_cli("evaluate", "--protocol", "pairs", "--cache", str(cache_path), "--n-pairs", "100",
                "--model", f"first={tmp_path / 'tiny0.pt'}", "--model", f"second={tmp_path / 'tiny1.pt'}",
                "--backbone", "tiny", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "| first |" in md and "| second |" in md and "TAR@FAR=1e-3" in md
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["command"].startswith("mtmim evaluate --protocol pairs")
    assert [m["label"] for m in payload["models"]] == ["first", "second"]
    r = run_cli("evaluate", "--protocol", "fgnet-loo", "--cache", str(tmp_path / "missing.h5"),
                "--model", str(tmp_path / "tiny0.pt"))
    assert r.returncode == 2 and "missing.h5" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- FG-NET refit head
@pytest.mark.slow
def test_refit_head_rounds(tmp_path: Path, pool_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mtmim_cli.train.round_heads as H

    cache_path = _face_cache(tmp_path / "h.h5", n_ids=5, per_id=4)
    base = dict(protocol="fgnet-loo", models=[ModelArg("pool", pool_model)], cache=cache_path)
    none = evaluate(EvalConfig(**base), progress=False)["results"][0]["metrics"]

    # With identity maps (x_id = x) every round must reproduce refit none; each round is
    # handed exactly its own held-out image to leave out (tests/test_round_heads.py checks
    # that a round's maps do not depend on the rows it leaves out).
    held_seen: list[list[int]] = []

    def identity_maps(views, labels, ages, held, cfg, seed=0, on_step=None):
        held_seen.extend(sorted(int(i) for i in h) for h in held)
        d = views[0].shape[1]
        assert [len(v) for v in views] == [20, 20]  # image and mirror of every image
        return H.RoundMaps(A=torch.eye(d).expand(len(held), d, d).clone(),
                           b=torch.zeros(len(held), d), last_loss=torch.zeros(len(held)))

    monkeypatch.setattr(H, "fit_rounds", identity_maps)
    zero = evaluate(EvalConfig(**base, refit="head", refit_modes=("baseline",),
                               out=tmp_path / "z" / "r.md"), progress=False)["results"][0]["metrics"]
    assert zero["rank1"] == none["rank1"] and zero["rounds"] == 20
    assert held_seen == [[r] for r in range(20)]
    monkeypatch.undo()
    monkeypatch.setattr(L, "MODEL_LOADER", lambda p, b: PoolNet())

    # The real re-fit: sharded and merged equals one process; a rerun re-uses stored rounds.
    opts = {"epochs": 1, "batch_size": 16, "age_groups": 3, "q_hidden": 32, "rounds_per_chunk": 2}
    one = evaluate(EvalConfig(**base, refit="head", refit_options=opts,
                              rounds_dir=tmp_path / "one"), progress=False)
    assert [r["model"] for r in one["results"]] == ["pool/baseline", "pool/age", "pool/mtmim"]
    parts = [evaluate(EvalConfig(**base, refit="head", refit_options=opts,
                                 rounds_dir=tmp_path / "sh", shard=f"{i}/2"), progress=False)
             for i in range(2)]
    assert parts[0]["results"][0]["metrics"]["partial"] is True  # shard 0 alone: not mergeable
    assert "partial" not in parts[1]["results"][0]["metrics"]   # the last shard merges
    merged = evaluate(EvalConfig(**base, refit="head", refit_options=opts,
                                 rounds_dir=tmp_path / "sh", merge_only=True), progress=False)
    for a, b in zip(one["results"], merged["results"], strict=True):
        a, b = a["metrics"], b["metrics"]
        assert a["rank1"] == b["rank1"] and a["cmc"] == b["cmc"] and a["rounds"] == 20
        assert 0.0 < a["rank1"] <= 1.0


def test_lfw_pairs_txt(tmp_path: Path, pool_model: Path) -> None:
    from mtmim_cli.data.cache import DETECTED, CacheWriter
    from mtmim_cli.data.records import Record

    rng = np.random.default_rng(0)
    names = ["Ann_Lee", "Bo_Du", "Cy_Ng"]
    recs = [Record(path=f"{n}/{n}_{k:04d}.jpg", identity=n, age=float("nan"))
            for n in names for k in (1, 2, 3)]
    w = CacheWriter(tmp_path / "lfw.h5", recs, attrs={"reader": "folder"})
    for k in range(len(recs)):
        w.write(k, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), DETECTED)
    w.commit(len(recs))
    w.finish()
    (tmp_path / "pairs.txt").write_text(
        "2\t2\nAnn_Lee\t1\t2\nBo_Du\t1\t3\nAnn_Lee\t3\tCy_Ng\t1\nBo_Du\t2\tCy_Ng\t3\n"
        "Cy_Ng\t1\t2\nAnn_Lee\t2\t3\nCy_Ng\t2\tBo_Du\t1\nAnn_Lee\t1\tBo_Du\t3\n")
    cfg = EvalConfig(protocol="lfw", models=[ModelArg("pool", pool_model)],
                       cache=tmp_path / "lfw.h5", pairs=tmp_path / "pairs.txt")
    m = evaluate(cfg, progress=False)["results"][0]["metrics"]
    cache = Cache(tmp_path / "lfw.h5")
    f = extract_features(PoolNet(), cache, None, "concat")
    i = np.array([0, 3, 2, 4, 6, 1, 7, 0])
    j = np.array([1, 5, 6, 8, 7, 2, 3, 5])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    expected = M.tenfold_verification(np.sum(f[i] * f[j], axis=1), same, 2)
    assert m["fold_accuracies"] == expected["fold_accuracies"] and m["pairs"] == 8
    (tmp_path / "bad.txt").write_text("2\t1\nAnn_Lee\t1\t9\nAnn_Lee\t1\tBo_Du\t1\n"
                                      "Ann_Lee\t1\t2\nAnn_Lee\t1\tBo_Du\t1\n")
    with pytest.raises(MtmimError, match="Ann_Lee_0009.jpg is not in"):
        evaluate(EvalConfig(protocol="lfw", models=[ModelArg("pool", pool_model)],
                                cache=tmp_path / "lfw.h5", pairs=tmp_path / "bad.txt"), progress=False)
