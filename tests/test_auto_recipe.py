"""`--recipe auto` (issue 28): validation folds carved from the training identities only, the
criterion against brute force, the safe fallback to the init, resume after a kill, the
record in config.json / model.pt / report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mtmim_cli.errors import MtmimError
from mtmim_cli.orchestration import auto_recipe as A

from .conftest import run_cli, write_cache
from .test_finetune import save_tiny_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

AGES = (3.0, 7.0, 20.0, 30.0, 45.0, 60.0)   # every person young (<= 10) and adult (>= 18)


def _cache(path: Path, n_ids: int = 8, noise: float = 255.0, seed: int = 0) -> Path:
    """n_ids people x 6 photos; each photo its person's base image plus uniform noise of
    this amplitude (small: a person's photos nearly alike, so any encoder verifies them)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n_ids, 112, 112, 3)).astype(np.float64)
    imgs = np.stack([np.clip(base[k] + rng.uniform(-noise, noise, base[k].shape), 0, 255)
                     for k in range(n_ids) for _ in AGES]).astype(np.uint8)
    ids = [f"id{k}" for k in range(n_ids) for _ in AGES]
    return write_cache(path, ids, [a for _ in range(n_ids) for a in AGES], seed=seed, images=imgs)


@pytest.fixture
def init(tmp_path: Path) -> Path:
    return save_tiny_pretrain(tmp_path / "pre.pt", seed=1)[1]


# Small fixed axes keep a search at 2 depths x 2 folds = 4 tiny fine-tunes.
FAST = {"mode": "mtmim", "age_groups": 2, "batch_size": 8, "epochs": 1, "lr": 1e-2,
        "lambda_mim": 0.1, "progress": False}


# ----------------------------------------------------------------------- folds
def test_validation_folds_are_training_identities_only(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c.h5", n_ids=10)
    exclude = [0, 7, 13]    # e.g. a leave-out round's test photos
    train = ",".join(f"id{k}" for k in range(8))   # id8, id9: the test side
    f = A.validation_folds(cache, train, exclude, 2, seed=3)
    names = set(f.names)
    assert names == {f"id{k}" for k in range(8)}
    assert len(f.folds) == 2 and all(len(x) >= 2 for x in f.folds)
    assert set(f.folds[0]).isdisjoint(f.folds[1]) and set(f.folds[0]) | set(f.folds[1]) == names
    for k in range(2):
        val = f.validation(k)
        assert not set(val.tolist()) & set(exclude)
        assert set(f.training_names(k)) == names - set(f.folds[k])
        assert not {"id8", "id9"} & set(f.folds[k])
    again = A.validation_folds(cache, train, exclude, 2, seed=3)
    assert again.folds == f.folds
    assert any(A.validation_folds(cache, train, exclude, 2, seed=s).folds != f.folds
               for s in range(4, 9))
    with pytest.raises(MtmimError, match="at least 2"):
        A.validation_folds(cache, train, exclude, 1, seed=0)
    with pytest.raises(MtmimError, match="training identities"):
        A.validation_folds(cache, "id0,id1,id2", None, 2, seed=0)


# ----------------------------------------------------------------------- criterion
def test_auc_scores_and_rank1_hits_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    ident = np.repeat(np.arange(5).astype(str), 6)
    age = np.tile(np.asarray(AGES), 5)
    feats = rng.normal(size=(30, 8)) + np.repeat(rng.normal(size=(5, 8)), 6, axis=0)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    s = A._scores(feats, ident, age, "auc", seed=4)
    ys, ss = [], []
    for i in range(30):
        for j in range(30):
            if age[i] <= A.YOUNG_MAX and age[j] >= A.ADULT_MIN:
                ys.append(ident[i] == ident[j])
                ss.append(float(feats[i] @ feats[j]))
    assert s["value"] == pytest.approx(roc_auc_score(ys, ss), abs=1e-12)
    assert len(s["reps"]) == A.RESAMPLES
    # the same draws for another model of the fold: paired replicates
    assert A._scores(feats, ident, age, "auc", seed=4)["reps"] == s["reps"]
    hits = A._scores(feats, ident, age, "rank1", seed=0)["hits"]
    brute = []
    for i in range(30):
        sims = [(float(feats[i] @ feats[j]), j) for j in range(30) if j != i]
        brute.append(int(ident[max(sims)[1]] == ident[i]))
    assert hits == brute
    assert A.guard_hits(feats, ident) == brute   # every photo here has a mate
    lone = np.concatenate([ident, ["solo"]])     # one without a mate is not a guard probe
    f2 = np.vstack([feats, feats[:1]])
    assert len(A.guard_hits(f2, lone)) == 30 and list(A.guard_probe_ident(lone)) == list(ident)


def test_guard_tar_against_a_brute_force_pair_loop_and_tar_at_far() -> None:
    """guard_accepts (the TAR diagnostic beside the guard): every genuine pair's accept at the
    model's own threshold over all pairs (at most FAR of the impostors above it); their mean
    is TAR@FAR as sklearn's ROC gives it, and guard_pair_ident names each pair's person."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(7)
    ident = np.repeat([f"p{k}" for k in range(40)], 5)
    base = rng.normal(size=(40, 16))
    feats = np.repeat(base, 5, axis=0) + rng.normal(0, 0.9, (200, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    far = 0.01
    acc = A.guard_accepts(feats, ident, far=far)
    pairs, scores, same = [], [], []
    for i in range(200):
        for j in range(i + 1, 200):
            scores.append(float(feats[i] @ feats[j]))
            same.append(ident[i] == ident[j])
            if ident[i] == ident[j]:
                pairs.append((i, j))
    scores, same = np.asarray(scores), np.asarray(same)
    imp = np.sort(scores[~same])[::-1]
    allowed = int(np.floor(far * len(imp) + 1e-9))
    brute = [int(feats[i] @ feats[j] > imp[allowed]) for i, j in pairs]
    assert acc == brute and len(acc) == 40 * 10
    assert 0 < np.mean(acc) < 1                       # an operating point that tells models apart
    fpr, tpr, _ = roc_curve(same, scores)
    assert np.mean(acc) == pytest.approx(tpr[fpr <= far].max())
    assert list(A.guard_pair_ident(ident)) == [ident[i] for i, _ in pairs]
    assert A.guard_outcome(feats, ident) == {"hits": A.guard_hits(feats, ident)}
    assert A.guard_outcome(feats, ident, far)["accepts"] == acc
    with pytest.raises(MtmimError, match="two people"):
        A.guard_accepts(feats[:5], ident[:5], far)


def test_guard_difference_refuses_a_large_fall_and_a_small_consistent_one() -> None:
    """The guard against bootstrap_difference and the stated rule: refused when the fall is
    above GUARD_TOLERANCE, or when its paired interval lies wholly below zero; a model equal
    to the init passes, and so does a small fall the interval cannot tell from noise."""
    from mtmim_cli.eval.compare import bootstrap_difference

    rng = np.random.default_rng(3)
    ident = np.repeat(np.arange(1000), 5)
    init = (rng.random(5000) < 0.9).astype(np.int64)
    ref = A.GuardRef(init, ident)

    def guard(models: list[np.ndarray]) -> dict:
        return A.guard_difference([{"hits": m} for m in models], ref)

    def lose(n: int, spread: bool) -> np.ndarray:
        h = init.copy()
        ones = np.flatnonzero(h == 1)
        pick = ones[np.unique(ident[ones], return_index=True)[1][:n]] if spread else ones[:n]
        h[pick] = 0
        return h

    same = guard([init, init])
    assert (same["diff"], same["low"], same["high"], same["ok"]) == (0.0, 0.0, 0.0, True)
    big = guard([lose(50, True)])          # -0.01
    assert big["diff"] == pytest.approx(-0.01) and not big["ok"]
    small = lose(9, True)                                    # -0.0018, 9 people each lose one
    d = guard([small])
    b = bootstrap_difference(small, init, clusters=ident, resamples=A.GUARD_RESAMPLES, seed=0)
    assert (d["diff"], d["low"], d["high"]) == (pytest.approx(b.diff), pytest.approx(b.low),
                                                pytest.approx(b.high))
    assert d["diff"] >= -A.GUARD_TOLERANCE and d["high"] < 0 and not d["ok"]
    noisy = lose(9, True)
    gains = np.flatnonzero(noisy == 0)
    noisy[gains[np.unique(ident[gains], return_index=True)[1][:9]]] = 1   # 9 others gain one
    assert guard([noisy])["ok"]
    # two fold models: pooled over both, each probe's identity one cluster for both
    two = guard([init, lose(50, True)])
    assert two["diff"] == pytest.approx(-0.005) and not two["ok"]
    assert same["tar_diff"] is None and same["tar_ok"]    # a reference without pairs: rank-1 only
    # the TAR diagnostic: its own paired interval over the genuine pairs, clustered by
    # person, and the rule's verdict on it; it does not refuse a model whose rank-1 holds
    pid = np.repeat(np.arange(1000), 10)
    acc0 = (rng.random(10000) < 0.8).astype(np.int64)
    ref2 = A.GuardRef(init, ident, acc0, pid)
    acc = acc0.copy()
    acc[np.flatnonzero(acc0)[::40]] = 0                  # -0.02
    t = A.guard_difference([{"hits": init, "accepts": acc}], ref2)
    bt = bootstrap_difference(acc, acc0, clusters=pid, resamples=A.GUARD_RESAMPLES, seed=0)
    assert (t["tar_diff"], t["tar_low"], t["tar_high"]) == (
        pytest.approx(bt.diff), pytest.approx(bt.low), pytest.approx(bt.high))
    assert t["diff"] == 0 and not t["tar_ok"] and t["ok"]
    assert A.guard_difference([{"hits": init, "accepts": acc0}], ref2)["ok"]


def test_choice_is_the_best_eligible_candidate_of_a_brute_force_table() -> None:
    """summarise + pick against the table recomputed by hand: the chosen candidate has the
    highest criterion among those whose interval clears zero and which pass the guard."""
    rng = np.random.default_rng(1)
    settings = A.candidates({"depth": ("last:1", "last:2"), "lr": (1e-3,), "lambda_mim": (None,),
                             "wise": (0.5, 1.0)})
    n = 200
    init = [{"value": 0.80, "reps": list(0.80 + rng.normal(0, 0.01, n))} for _ in range(2)]
    shift = {settings[0]: 0.002, settings[1]: 0.03, settings[2]: 0.05, settings[3]: 0.04}
    gid = np.repeat(np.arange(100), 4)
    g0 = np.ones(400, np.int64)
    g0[::10] = 0                                  # the init: rank-1 0.9 on the guard
    a0 = np.ones(600, np.int64)
    a0[::5] = 0                                   # the init: TAR 0.8 over its genuine pairs
    pid = np.repeat(np.arange(100), 6)
    drop = {settings[0]: 0, settings[1]: 0, settings[2]: 40, settings[3]: 0}
    tar_drop = {settings[0]: 0, settings[1]: 60, settings[2]: 0, settings[3]: 0}
    guard = {}
    for st, k in drop.items():
        h = g0.copy()
        h[np.flatnonzero(h)[:k * 4:4]] = 0        # k people lose one hit each
        acc = a0.copy()
        acc[np.flatnonzero(acc)[:tar_drop[st] * 6:6]] = 0   # people lose one genuine pair
        guard[st] = {"hits": [int(x) for x in h], "accepts": [int(x) for x in acc]}
    cand = {s: [{"value": i["value"] + shift[s],
                 "reps": list(np.asarray(i["reps"]) + shift[s] + rng.normal(0, 0.004, n)),
                 "guard": guard[s]} for i in init] for s in settings}
    ref = A.GuardRef(g0, gid, a0, pid)
    rows = A.summarise(settings, init, cand, "auc", guard_init=ref, fold_ids=[])
    for s, r in zip(settings, rows, strict=True):
        d = np.mean([np.asarray(c["reps"]) - np.asarray(i["reps"])
                     for c, i in zip(cand[s], init, strict=True)], axis=0)
        lo, hi = np.percentile(d, [2.5, 97.5])
        assert r["diff"] == pytest.approx(shift[s])
        assert (r["low"], r["high"]) == (pytest.approx(lo), pytest.approx(hi))
        gd = A.guard_difference([guard[s], guard[s]], ref)
        assert r["guard_diff"] == pytest.approx(np.mean(guard[s]["hits"]) - g0.mean())
        assert (r["guard_low"], r["guard_high"]) == (gd["low"], gd["high"])
        assert r["eligible"] == (lo > 0 and gd["ok"])
    # c03 has the highest AUC but fails the guard; c04 is the best that may be chosen; c02's
    # TAR diagnostic falls (rank-1 unchanged), which does not refuse it
    eligible = [k for k, r in enumerate(rows) if r["eligible"]]
    assert A.pick(rows) == max(eligible, key=lambda k: rows[k]["value"]) == 3
    assert not rows[2]["eligible"] and not rows[0]["eligible"] and rows[1]["eligible"]
    assert A.guard_difference([c["guard"] for c in cand[settings[1]]], ref)["tar_diff"] == pytest.approx(-0.1)
    assert "guard_tar_diff" not in rows[1]
    text = A.table(rows, 0.8, "auc", guard=True)
    assert text.count("\n") == len(rows) + 2 and "guard: falls" in text and "beats init" in text
    assert A.pick([{**r, "eligible": False} for r in rows]) is None


def test_rank1_criterion_pools_the_folds_probes_with_identity_clusters() -> None:
    """Without ages: the difference is the pooled rank-1 of the candidate's fold models
    minus the init's, its interval the identity-cluster bootstrap over both folds' probes."""
    from mtmim_cli.eval.compare import bootstrap_difference

    rng = np.random.default_rng(2)
    s = A.candidates({"depth": ("last:1",), "lr": (1e-3,), "lambda_mim": (None,), "wise": (1.0,)})
    ids = [np.repeat([f"a{k}" for k in range(6)], 4), np.repeat([f"b{k}" for k in range(6)], 4)]
    init = [{"value": 0.0, "hits": list(rng.integers(0, 2, 24))} for _ in ids]
    cand = {s[0]: [{"value": 0.0, "hits": list(rng.integers(0, 2, 24)), "guard": None} for _ in ids]}
    row = A.summarise(s, init, cand, "rank1", None, ids)[0]
    a = np.concatenate([c["hits"] for c in cand[s[0]]])
    b = np.concatenate([i["hits"] for i in init])
    ref = bootstrap_difference(a, b, clusters=np.concatenate(ids), resamples=2000, seed=0)
    assert row["diff"] == pytest.approx(a.mean() - b.mean())
    assert (row["low"], row["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert row["eligible"] == (ref.low > 0)


def test_declared_grid_follows_the_options_and_the_encoder() -> None:
    g = A.declared_grid("mtmim", {}, n_stages=7)
    assert g == {"depth": ("last:1", "last:2"), "lr": A.GRID["lr"],
                 "lambda_mim": A.GRID["lambda_mim"], "wise": A.GRID["wise"]}
    assert len(A.candidates(g)) == 2 * 2 * 2 * 3
    g = A.declared_grid("baseline", {"lr": 0.01, "wise": 1.0}, n_stages=2)
    assert g == {"depth": ("last:1",), "lr": (0.01,), "lambda_mim": (None,), "wise": (1.0,)}
    with pytest.raises(MtmimError, match="stage"):
        A.declared_grid("mtmim", {}, n_stages=1)


# ----------------------------------------------------------------------- whole searches
@pytest.mark.slow
def test_no_winner_writes_a_model_equal_to_the_init(tmp_path: Path, init: Path) -> None:
    """Each person's photos nearly alike: the init verifies them perfectly (AUC 1), so no
    candidate can beat it; the CLI says so in one line, exits 0, and model.pt's features
    are the init's exactly."""
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.models.identity import load_identity_model

    cache = _cache(tmp_path / "c.h5", noise=4.0)
    guard = _cache(tmp_path / "g.h5", n_ids=4, noise=4.0, seed=5)
    out = tmp_path / "run"
    r = run_cli("finetune", str(cache), "--init", str(init), "--recipe", "auto", "--mode", "mtmim",
                "--age-groups", "2", "--batch-size", "8", "--epochs", "1", "--lr", "0.01",
                "--lambda-mim", "0.1", "--auto-guard", str(guard), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| candidate | trains | lr | lambda | wise | AUC |" in r.stdout
    assert "| init |" in r.stdout and "guard rank-1 vs init" in r.stdout
    assert "no candidate beats the init" in r.stdout
    assert "done:" not in r.stdout   # the candidates' own lines stay quiet under the table
    cfg = json.loads((out / "config.json").read_text())
    auto = cfg["extra"]["auto"]
    assert auto["chosen"] is None and auto["criterion"] == "auc" and len(auto["candidates"]) == 6
    assert auto["init_value"] == pytest.approx(1.0)
    # nothing clears the init, so the guard scores nobody (not even the init)
    assert all(c["guard_diff"] is None for c in auto["candidates"]) and auto["guard_init"] is None
    model = load_identity_model(out / "model.pt")
    assert model.meta["equals_init"] and model.meta["auto"]["chosen"] is None
    assert "trained_on" not in model.meta
    from mtmim_cli.data.cache import Cache

    ref = load_identity_model(init)
    np.testing.assert_array_equal(extract_features(model, Cache(cache), np.arange(12)),
                                  extract_features(ref, Cache(cache), np.arange(12)))
    rep = run_cli("report", str(out), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "`--recipe auto`" in text and "equals the init" in text and "| c01 |" in text


@pytest.mark.slow
def test_a_killed_search_resumes_without_retraining_finished_candidates(
        tmp_path: Path, init: Path, monkeypatch) -> None:
    import mtmim_cli.train.finetune as F

    cache = _cache(tmp_path / "c.h5")
    calls: list[str] = []
    real = F.finetune

    def counting(caches, init_, config=None, **kw):
        calls.append(str((config or {}).get("out")))
        return real(caches, init_, config, **kw)

    monkeypatch.setattr(F, "finetune", counting)

    def kill(n: int) -> None:
        raise KeyboardInterrupt("simulated kill after candidate 1")

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        A.auto_finetune([cache], init, {**FAST, "out": str(out)}, echo=None, on_candidate=kill)
    assert len(calls) == 1
    first = calls[0]
    stored = list((out / "auto" / "candidates").glob("*.json"))
    assert len(stored) == 1              # one candidate (the init is scored after a depth)
    calls.clear()
    lines: list[str] = []
    A.auto_finetune([cache], init, {**FAST, "out": str(out)}, echo=lines.append)
    candidates = [c for c in calls if "/auto/runs/" in c]
    assert len(candidates) == 3 and first not in candidates
    assert "3 fine-tunes to run" in lines[0]
    runs = sorted((out / "auto" / "runs").iterdir())
    assert len(runs) == 4 and not list((out / "auto" / "runs").rglob("last.pt"))
    assert [r.name for r in runs if (r / "model.pt").exists()] == ["fold0-last1-lr0.01-lam0.1"]
    # a third run trains nothing; another lr is another key: nothing is reused for it
    calls.clear()
    A.auto_finetune([cache], init, {**FAST, "out": str(out)}, echo=None)
    assert not [c for c in calls if "/auto/runs/" in c]
    calls.clear()
    A.auto_finetune([cache], init, {**FAST, "lr": 2e-2, "out": str(out)}, echo=None)
    assert len([c for c in calls if "/auto/runs/" in c]) == 4


def test_wise_models_interpolate_the_trained_weights(tmp_path: Path, init: Path) -> None:
    """One training gives every alpha: model.pt is alpha 0.5, last.pt alpha 1, and the
    derived alpha 0.25 is (0.75 w0 + 0.25 w) on the trained parameters, the trunk untouched."""
    from mtmim_cli.train.checkpoint import load_checkpoint
    from mtmim_cli.train.finetune import finetune

    cache = _cache(tmp_path / "c.h5")
    run = finetune([cache], init, {**FAST, "recipe": "small", "freeze_through": "last:1",
                                   "wise": 0.25, "out": str(tmp_path / "r25")})
    run05 = finetune([cache], init, {**FAST, "recipe": "small", "freeze_through": "last:1",
                                     "wise": 0.5, "out": str(tmp_path / "r05")})
    models = A.wise_models(run05, [0.5, 0.25, 1.0])   # the run's own alpha first
    assert set(models) == {0.25, 0.5, 1.0}
    trained = load_checkpoint(run05 / "checkpoints" / "last.pt")["objective"]
    at25 = load_checkpoint(run / "model.pt")["objective"]
    trunk = [k for k in trained if k.startswith("encoder.body.")]
    assert trunk
    for k, v in models[1.0].encoder.state_dict().items():
        assert torch.equal(v, trained[f"encoder.{k}"]), k
    for k, v in models[0.25].encoder.state_dict().items():
        if f"encoder.{k}" in trunk:   # frozen: bit for bit the init's
            assert torch.equal(v, trained[f"encoder.{k}"]), k
        # the same training with --wise 0.25 wrote this interpolation itself
        torch.testing.assert_close(v, at25[f"encoder.{k}"], atol=1e-6, rtol=1e-5)
    for k, v in models[0.25].factorize.state_dict().items():
        torch.testing.assert_close(v, at25[f"factorize.{k}"], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_winner_is_retrained_on_all_training_identities_and_recorded(
        tmp_path: Path, init: Path, monkeypatch, capsys) -> None:
    """The retrain path, with the table's verdicts forced (a tiny random encoder gives no
    real winner): the chosen setting trains on every training identity into --out, and
    config.json and model.pt record the grid, the scores and the choice."""
    from mtmim_cli.train.checkpoint import load_checkpoint

    cache = _cache(tmp_path / "c.h5")
    real = A.summarise

    def forced(*args, **kw):
        rows = real(*args, **kw)
        for k, r in enumerate(rows):
            r["eligible"], r["value"] = k in (1, 4), [0.1, 0.5, 0.2, 0.3, 0.7, 0.9][k]
        return rows

    monkeypatch.setattr(A, "summarise", forced)
    out = tmp_path / "run"
    lines: list[str] = []
    run = A.auto_finetune([cache], init, {**FAST, "out": str(out)}, echo=lines.append)
    assert run == out
    assert any("chose c05 (last:2, lr 0.01, lambda 0.1, wise 0.5)" in s for s in lines)
    # four candidates trained quietly; only the final retrain says it is done
    assert capsys.readouterr().out.count("done:") == 1
    cfg = json.loads((out / "config.json").read_text())
    e = cfg["extra"]   # last:2 of the tiny encoder: trained after its pool stage
    assert (e["recipe"], e["freeze_through"], e["wise"], e["lambda_mim"]) == ("auto", "pool", 0.5, 0.1)
    assert cfg["lr"] == 0.01 and e["train_identities"] is None
    assert e["auto"]["chosen"] == {"freeze_through": "last:2", "lr": 0.01, "lambda_mim": 0.1,
                                   "wise": 0.5}
    assert len(e["auto"]["candidates"]) == 6 and e["auto"]["grid"]["depth"] == ["last:1", "last:2"]
    meta = load_checkpoint(out / "model.pt")["meta"]
    assert meta["auto"]["chosen_label"] == "c05" and meta["wise"] == 0.5
    assert meta["num_classes"] == 8     # every training identity, no fold held out
    assert "trained_on" in meta


@pytest.mark.slow
def test_the_guard_scores_only_candidates_above_the_init(tmp_path: Path, init: Path,
                                                         monkeypatch) -> None:
    """With the criterion's lower bound forced above zero for last:2 at wise 0.5 only, the
    guard extracts features for that setting's two fold models and the init, nothing else;
    the table shows '-' for the others, and every candidate run is pruned afterwards."""
    cache = _cache(tmp_path / "c.h5")
    guard = _cache(tmp_path / "g.h5", n_ids=4, seed=5)
    real = A.summarise

    def forced(settings, *args, **kw):
        rows = real(settings, *args, **kw)
        for s, r in zip(settings, rows, strict=True):
            r["low"] = 0.01 if (s.depth, s.wise) == ("last:2", 0.5) else -0.01
            r["eligible"] = r["low"] > 0 and r["guard_ok"]
        return rows

    monkeypatch.setattr(A, "summarise", forced)
    scored: list[int] = []
    real_guard = A.guard_outcome
    monkeypatch.setattr(A, "guard_outcome", lambda f, i: scored.append(len(f)) or real_guard(f, i))
    out = tmp_path / "run"
    lines: list[str] = []
    A.auto_finetune([cache], init, {**FAST, "auto_guard": str(guard), "out": str(out)},
                    echo=lines.append)
    # the chosen setting's fold models, the init, then the retrained choice
    assert len(scored) == A.FOLDS + 2
    rec = json.loads((out / "config.json").read_text())["extra"]["auto"]
    by = {(c["setting"]["freeze_through"], c["setting"]["wise"]): c for c in rec["candidates"]}
    assert by[("last:2", 0.5)]["guard_diff"] is not None and rec["guard_init"] is not None
    assert [k for k, c in by.items() if c["guard_diff"] is not None] == [("last:2", 0.5)]
    table = next(t for t in lines if t.startswith("| candidate"))
    assert table.count("| - | not above init |") == 5
    assert not list((out / "auto" / "runs").rglob("last.pt"))


@pytest.mark.slow
def test_a_retrained_choice_the_guard_refuses_gives_way_to_the_next(
        tmp_path: Path, init: Path, monkeypatch) -> None:
    """The guard scores the retrained model itself. With three candidates forced eligible and
    the retrained best (wise 1) refused: it is removed from --out, and the best of a lower
    alpha (not the next wise-1 one) is retrained and recorded with both checks; a rerun
    retrains neither; when that one is refused too, model.pt equals the init."""
    import mtmim_cli.train.finetune as F
    from mtmim_cli.train.checkpoint import load_checkpoint

    cache = _cache(tmp_path / "c.h5")
    guard = _cache(tmp_path / "g.h5", n_ids=4, seed=5)
    real = A.summarise

    value = {("last:1", 1.0): 0.8, ("last:2", 0.5): 0.7, ("last:2", 1.0): 0.9}   # c03, c05, c06

    def forced(settings, *args, **kw):
        rows = real(settings, *args, **kw)
        for st, r in zip(settings, rows, strict=True):
            v = value.get((st.depth, st.wise))
            r["low"], r["value"] = (0.01, v) if v else (-0.01, 0.1)
            r["eligible"] = bool(v) and r["guard_ok"]
        return rows

    monkeypatch.setattr(A, "summarise", forced)
    refuse: set[str] = {"c06"}
    real_diff = A.guard_difference

    def judged(models_hits, ref):
        d = real_diff(models_hits, ref)
        if len(models_hits) == 1 and judged.label in refuse:   # a retrained model
            d["ok"] = False
        return d

    monkeypatch.setattr(A, "guard_difference", judged)
    finals: list[dict] = []
    real_ft = F.finetune

    def counting(caches, init_, config=None, **kw):
        if "/auto/" not in str((config or {}).get("out")):
            finals.append(dict(config))
            judged.label = config["auto"]["chosen_label"]
        return real_ft(caches, init_, config, **kw)

    monkeypatch.setattr(F, "finetune", counting)
    judged.label = None
    out = tmp_path / "run"
    lines: list[str] = []
    A.auto_finetune([cache], init, {**FAST, "auto_guard": str(guard), "out": str(out)},
                    echo=lines.append)
    assert [f["auto"]["chosen_label"] for f in finals] == ["c06", "c05"]   # c03 is wise 1 too
    assert any("the retrained c06 fails the guard" in x for x in lines)
    assert any("next c05" in x for x in lines) and any("c05 passes the guard" in x for x in lines)
    cfg = json.loads((out / "config.json").read_text())
    checks = cfg["extra"]["auto"]["final_checks"]
    assert [(c["candidate"], c["ok"]) for c in checks] == [("c06", False), ("c05", True)]
    assert cfg["extra"]["auto"]["chosen_label"] == "c05" and cfg["extra"]["wise"] == 0.5
    search = json.loads((out / "auto" / "search.json").read_text())
    assert search["final_checks"] == checks
    meta = load_checkpoint(out / "model.pt")["meta"]
    assert meta["wise"] == 0.5 and [c["candidate"] for c in meta["auto"]["final_checks"]] == ["c06"]
    # a rerun: both checks stored, c05's model in place, nothing trains
    finals.clear()
    A.auto_finetune([cache], init, {**FAST, "auto_guard": str(guard), "out": str(out)}, echo=None)
    assert finals == []
    # every retrained candidate refused: the init is written
    refuse.add("c05")
    out2 = tmp_path / "run2"
    finals.clear()
    lines.clear()
    A.auto_finetune([cache], init, {**FAST, "auto_guard": str(guard), "out": str(out2)},
                    echo=lines.append)
    assert len(finals) == 2 and any("no retrained candidate passes the guard" in x for x in lines)
    meta = load_checkpoint(out2 / "model.pt")["meta"]
    assert meta["equals_init"] and meta["auto"]["chosen"] is None
    assert [c["ok"] for c in meta["auto"]["final_checks"]] == [False, False]
    assert not (out2 / "checkpoints").exists()


def test_refusals(tmp_path: Path, init: Path) -> None:
    from mtmim_cli.train.finetune import finetune

    cache = _cache(tmp_path / "c.h5")
    with pytest.raises(MtmimError, match="--recipe auto: a search"):
        finetune([cache], init, {"recipe": "auto", "out": str(tmp_path / "x")})
    with pytest.raises(MtmimError, match="give --init"):
        A.auto_finetune([cache], None, {"out": str(tmp_path / "y")}, echo=None)
    with pytest.raises(MtmimError, match="--val-identities"):
        A.auto_finetune([cache], init, {"val_identities": 2, "out": str(tmp_path / "z")}, echo=None)
    r = run_cli("finetune", str(cache), "--init", str(init), "--auto-guard", str(cache),
                "--out", str(tmp_path / "w"))
    assert r.returncode == 2 and "--auto-guard" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", str(cache), "--init", str(init), "--recipe", "big", "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and "auto" in r.stderr


@pytest.mark.slow
def test_evaluate_refit_full_runs_the_search_per_round(tmp_path: Path, init: Path) -> None:
    """`evaluate --refit full --recipe auto`: each round searches on its own training side
    (its held-out photos excluded from training and from validation)."""
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.orchestration.evaluate import evaluate

    cache = _cache(tmp_path / "c.h5")
    cfg = EvalConfig(protocol="fgnet-loo", models=[ModelArg("tiny", init)], cache=cache,
                     out=tmp_path / "eval" / "results.md", refit="full", folds=2,
                     refit_modes=("mtmim",), mi_steps=10,
                     refit_options={"recipe": "auto", "age_groups": 2, "batch_size": 8,
                                    "epochs": 1, "lr": 1e-2, "lambda_mim": 0.1, "wise": 1.0})
    payload = evaluate(cfg, progress=False)
    assert payload
    rounds = sorted((tmp_path / "eval" / "rounds").rglob("round-*/auto/search.json"))
    assert len(rounds) == 2
    from mtmim_cli.eval import protocols as P

    held = P.loo_rounds(48, 2, 0)
    for r, path in enumerate(rounds):
        search = json.loads(path.read_text())
        assert sum(f["images"] for f in search["folds"]) == 48 - len(held[r])
