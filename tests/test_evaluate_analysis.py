"""`evaluate` with several models: per-probe outcomes, paired comparisons, seed groups, age
breakdowns and age leakage, end to end on small real caches and real (tiny) models, each
figure checked against an independent computation from the features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from mtmim_cli.data.cache import DETECTED, MISS, Cache, CacheWriter
from mtmim_cli.data.records import Record
from mtmim_cli.eval import agebins as AB
from mtmim_cli.eval import loading as L
from mtmim_cli.eval.config import EvalConfig, ModelArg
from mtmim_cli.eval.features import extract_features
from mtmim_cli.models.factorize import FactorizationUnit
from mtmim_cli.models.identity import IdentityModel
from mtmim_cli.orchestration.evaluate import evaluate
from tests.conftest import Pool

N_IDS, PER_ID, MISSING = 10, 7, 5


def _load(p: Path, backbone: str | None) -> nn.Module:
    state = torch.load(p, weights_only=True)
    if "factorized" in state:  # a Pool encoder with a factorization unit
        dim = 3 * (112 // int(state["k"])) ** 2
        unit = FactorizationUnit(dim, init_gain=1.0)
        unit.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unit.")})
        return IdentityModel(Pool(int(state["k"])), {"input_width": 112, "embedding_size": dim},
                             factorize=unit)
    m = Pool(int(state["k"]))
    m.load_state_dict(state)
    return m


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    out = {}
    for k in (7, 8, 16):
        out[f"pool{k}"] = tmp_path / f"pool{k}.pt"
        torch.save(Pool(k).state_dict(), out[f"pool{k}"])
    torch.manual_seed(0)
    unit = FactorizationUnit(3 * 14 * 14, init_gain=1.0)
    out["factorized"] = tmp_path / "fact.pt"
    torch.save({"k": torch.tensor(8), "factorized": torch.tensor(1),
                **{f"unit.{k}": v for k, v in unit.state_dict().items()}}, out["factorized"])
    monkeypatch.setattr(L, "MODEL_LOADER", _load)
    return out


def _cache(path: Path, noise: float = 100.0) -> Path:
    """N_IDS people x PER_ID photos at ages 0..58; record MISSING holds no face."""
    rng = np.random.default_rng(0)
    pats = rng.uniform(60, 195, (1, 14, 14, 3)) + rng.uniform(-8, 8, (N_IDS, 14, 14, 3))
    records, images = [], []
    for k in range(N_IDS):
        for j in range(PER_ID):
            base = np.kron(pats[k], np.ones((8, 8, 1)))
            images.append(np.clip(base + noise * rng.standard_normal(base.shape), 0, 255)
                          .astype(np.uint8))
            records.append(Record(path=f"{k:03d}A{j:02d}.jpg", identity=f"s{k:03d}",
                                  age=float(9 * j + k % 4)))
    w = CacheWriter(path, records, attrs={"reader": "test", "source_root": str(path.parent)})
    for i, img in enumerate(images):
        if i == MISSING:
            w.write(i, None, MISS)
        else:
            w.write(i, img, DETECTED, landmarks=np.zeros((5, 2)), det_score=1.0)
    w.commit(len(records))
    return w.finish()


def _hits(cache: Cache, k: int, flip: str = "concat") -> np.ndarray:
    """Independent rank-1 outcome per record: dense scores over the photos with a face."""
    idx = np.flatnonzero(cache.usable)
    f = extract_features(Pool(k), cache, idx, flip)
    s = f @ f.T
    np.fill_diagonal(s, -np.inf)
    hit = np.zeros(len(cache), bool)
    hit[idx] = cache.identity[idx][np.argmax(s, axis=1)] == cache.identity[idx]
    return hit


def test_fgnet_two_models_paired_and_by_age(tmp_path: Path, models: dict) -> None:
    cache_path = _cache(tmp_path / "faces.h5")
    cache = Cache(cache_path)
    out = tmp_path / "res" / "results.md"
    cfg = EvalConfig(protocol="fgnet-loo", cache=cache_path, out=out, resamples=2000,
                     models=[ModelArg("a", models["pool8"]), ModelArg("b", models["pool16"])])
    payload = evaluate(cfg, progress=False)
    ha, hb = _hits(cache, 8), _hits(cache, 16)
    n = len(cache)
    ma, mb = (r["metrics"] for r in payload["results"])
    # Item 3: the figure is over every photo; the faceless one is a failure.
    assert ma["rank1"] == pytest.approx(ha.sum() / n) and mb["rank1"] == pytest.approx(hb.sum() / n)
    assert ma["queries"] == n and ma["images_without_face"] == 1 and ma["ranked"] == n - 1
    assert ma["rank1_faces"] == pytest.approx(ha.sum() / (n - 1))
    assert ma["cmc"][0] == pytest.approx(ma["rank1"])
    # The sidecar holds the per-probe outcomes in record order.
    side = json.loads((out.parent / "results.outcomes.json").read_text())
    assert side["models"]["a"]["hit"] == ha.tolist() and side["models"]["b"]["hit"] == hb.tolist()
    assert side["models"]["a"]["rank"][MISSING] == 0 and side["models"]["a"]["top1"][MISSING] == -1
    # Paired comparison: discordant counts, exact McNemar p, identity cluster bootstrap.
    c = payload["comparisons"]
    pair = c["pairs"][0]
    a_only, b_only = int((ha & ~hb).sum()), int((~ha & hb).sum())
    assert (pair["a"], pair["b"], pair["a_only"], pair["b_only"]) == ("a", "b", a_only, b_only)
    assert a_only + b_only > 0
    assert pair["p_mcnemar"] == pytest.approx(binomtest(min(a_only, b_only), a_only + b_only).pvalue)
    assert pair["diff"] == pytest.approx((ha.sum() - hb.sum()) / n)
    assert pair["low"] <= pair["diff"] <= pair["high"]
    assert c["resampling"] == "identities" and c["clusters"] == N_IDS and c["units"] == n
    # By probe age: each cell's rank-1 and count from the ages directly.
    bins = AB.assign_bins(cache.age, AB.FGNET_AGE_EDGES)
    for k, row in enumerate(ma["by_age"]["by_probe_age"]):
        sel = bins == k
        assert row["n"] == sel.sum()
        if sel.any():
            assert row["rank1"] == pytest.approx(ha[sel].mean())
    assert sum(r["n"] for r in ma["by_age"]["by_gap"]) == n
    assert {r["bin"] for r in c["bin_differences"]["by_gap"]} <= {"0-5", "6-10", "11-20", "21+"}
    # The probe-age x gallery-age map counts every (probe, mate) pair among faces once.
    usable_ids = cache.identity[cache.usable]
    mates = sum(int((usable_ids == i).sum()) * (int((usable_ids == i).sum()) - 1)
                for i in np.unique(usable_ids))
    assert np.sum(ma["age_map"]["n"]) == mates
    # Age leakage columns, with chance levels, and no InfoNCE for unfactorized models.
    leak = ma["age_leakage"]
    assert leak["images"] == n - 1 and leak["identities"] == N_IDS and "infonce_lower" not in leak
    md = out.read_text()
    for text in ("Rank-1 (all photos)", "No face (failures)", "Age group acc. (chance)",
                 "Paired comparisons (rank-1", "Rank-1 by probe age", "Rank-1 by age gap",
                 "Per-bin differences by age gap", "probe age x gallery age"):
        assert text in md, text
    assert f"| a | {100 * ha.sum() / n:.2f} | {n} | 1 |" in md


def test_seed_groups_summarise_and_compare_settings(tmp_path: Path, models: dict) -> None:
    cache_path = _cache(tmp_path / "faces.h5")
    cfg = EvalConfig(protocol="fgnet-loo", cache=cache_path, resamples=500, age_probe=False,
                     models=[ModelArg("x@s0", models["pool8"]), ModelArg("x@s1", models["pool7"]),
                             ModelArg("y@s0", models["pool16"])])
    payload = evaluate(cfg, progress=False)
    c = payload["comparisons"]
    r1 = [r["metrics"]["rank1"] for r in payload["results"]]
    assert c["grouped_by_setting"]
    x = next(s for s in c["settings"] if s["setting"] == "x")
    assert x["mean"] == pytest.approx(np.mean(r1[:2])) and x["sd"] == pytest.approx(np.std(r1[:2], ddof=1))
    (pair,) = c["pairs"]
    assert (pair["a"], pair["b"], pair["seeds_a"], pair["seeds_b"]) == ("x", "y", 2, 1)
    assert pair["diff"] == pytest.approx(np.mean(r1[:2]) - r1[2])
    assert pair["p_mcnemar"] is None and pair["resampling"] == "identities+seeds"
    assert "age_leakage" not in payload["results"][0]["metrics"]


def test_verification_by_pair_gap_and_probe_resampling(tmp_path: Path, models: dict) -> None:
    cache_path = _cache(tmp_path / "faces.h5")
    cfg = EvalConfig(protocol="pairs", cache=cache_path, n_pairs=200, resamples=500,
                     resample="probe", age_probe=False,
                     models=[ModelArg("a", models["pool8"]), ModelArg("b", models["pool16"])])
    payload = evaluate(cfg, progress=False)
    m = payload["results"][0]["metrics"]
    c = payload["comparisons"]
    assert c["figure"] == "accuracy" and c["resampling"] == "pairs"
    # Balanced equal folds: the mean per-pair correctness is the 10-fold accuracy.
    assert c["pairs"][0]["mean_a"] == pytest.approx(m["accuracy"])
    rows = m["by_pair_gap"]["rows"]
    assert sum(r["n"] for r in rows) == m["pairs"]
    # 100 impostors cannot resolve a FAR of 1e-3: every bin says so instead of a TAR.
    assert all(r["tar_at_far"] is None and r["note"] for r in rows)
    assert any("impostors < 1000" in r["note"] for r in rows)


def test_factorized_model_gets_infonce_and_same_features(tmp_path: Path, models: dict) -> None:
    cache_path = _cache(tmp_path / "faces.h5")
    cache = Cache(cache_path)
    model = _load(models["factorized"], None)
    idx = np.flatnonzero(cache.usable)
    from mtmim_cli.eval.runners import FeatureOptions

    feats, parts = FeatureOptions().extract_parts(model, cache, idx)
    x_id, x_age = parts["x_id"], parts["x_age"]
    np.testing.assert_allclose(feats, extract_features(model, cache, idx, "concat"), atol=1e-5)
    np.testing.assert_allclose(x_id + x_age, extract_features(model.encoder, cache, idx, "none")
                               * np.linalg.norm(x_id + x_age, axis=1, keepdims=True), atol=1e-3)
    cfg = EvalConfig(protocol="fgnet-loo", cache=cache_path, mi_steps=30,
                     models=[ModelArg("f", models["factorized"])])
    leak = evaluate(cfg, progress=False)["results"][0]["metrics"]["age_leakage"]
    assert np.isfinite(leak["infonce_lower"]) and leak["infonce_cap"] == pytest.approx(np.log(34))
    # by default no critic trains, and the table says so and how to get it
    out = tmp_path / "default" / "results.md"
    default = evaluate(EvalConfig(protocol="fgnet-loo", cache=cache_path, out=out,
                                  models=[ModelArg("f", models["factorized"])]), progress=False)
    leak = default["results"][0]["metrics"]["age_leakage"]
    assert leak["infonce_skipped"] and "infonce_lower" not in leak
    assert "--mi-steps 2000 adds it" in out.read_text()


def test_refit_rounds_give_the_same_outcomes(tmp_path: Path, models: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A head re-fit whose maps leave x unchanged must reproduce `--refit none` probe by probe,
    mate by mate: the per-round outcomes go through the same analyses, one row per mode, and
    the modes are compared on the same probes."""
    import mtmim_cli.train.round_heads as H

    def identity_maps(views, labels, ages, held, cfg, seed=0, on_step=None):
        d = views[0].shape[1]
        return H.RoundMaps(A=torch.eye(d).expand(len(held), d, d).clone(),
                           b=torch.zeros(len(held), d), last_loss=torch.zeros(len(held)))

    monkeypatch.setattr(H, "fit_rounds", identity_maps)
    cache_path = _cache(tmp_path / "faces.h5")
    base = dict(protocol="fgnet-loo", cache=cache_path, resamples=200,
                models=[ModelArg("a", models["pool8"])])
    none = evaluate(EvalConfig(**base, out=tmp_path / "none" / "results.md"), progress=False)
    head = evaluate(EvalConfig(**base, out=tmp_path / "head" / "results.md", refit="head",
                               refit_modes=("baseline", "mtmim")), progress=False)
    mn = none["results"][0]["metrics"]
    assert [r["model"] for r in head["results"]] == ["a/baseline", "a/mtmim"]
    for row in head["results"]:
        mh = row["metrics"]
        assert mh["rank1"] == mn["rank1"] and mh["by_age"] == mn["by_age"]
        assert mh["age_map"] == mn["age_map"]
        # The age probe reads each photo's features from the round that held it out.
        assert mh["age_leakage"]["age_r2"] == pytest.approx(mn["age_leakage"]["age_r2"], abs=1e-3)
        assert "round that held it out" in mh["age_leakage"]["features"]
    sides = [json.loads((tmp_path / d / "results.outcomes.json").read_text()) for d in ("none", "head")]
    assert sides[1]["models"]["a/baseline"] == sides[0]["models"]["a"]
    (pair,) = head["comparisons"]["pairs"]
    assert (pair["a"], pair["b"], pair["diff"], pair["p_mcnemar"]) == ("a/baseline", "a/mtmim",
                                                                       0.0, 1.0)


def test_features_file_reuses_the_scoring_pass(tmp_path: Path, models: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`--features` writes the image view's parts that scoring already computed: every face
    goes through each encoder once per view (image, mirror), and the file holds the plain
    model's output as x_id, and for the factorized one x_id = its output and
    x_id + x_age = the encoder's x, computed here directly."""
    from mtmim_cli.data.dataset import preprocess
    from mtmim_cli.eval.feature_file import read_feature_file

    seen = []
    forward = Pool.forward
    monkeypatch.setattr(Pool, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    cache_path = _cache(tmp_path / "faces.h5")
    cache = Cache(cache_path)
    out = tmp_path / "ev" / "results.md"
    evaluate(EvalConfig(protocol="fgnet-loo", cache=cache_path, out=out, features=True,
                        age_probe=False, resamples=200,
                        models=[ModelArg("plain", models["pool8"]),
                                ModelArg("fact", models["factorized"])]), progress=False)
    idx = np.flatnonzero(cache.usable)
    # two models, image and mirror, nothing more (but the one zero row each that sizes
    # the passes, features.rows_per_pass)
    assert sum(seen) == 2 * 2 * len(idx) + 2 and seen.count(1) == 2
    got = read_feature_file(out.parent / "results.features.npz")
    batch = preprocess(cache.images(idx), 112)
    with torch.no_grad():
        np.testing.assert_allclose(got["plain"]["x_id"], Pool(8)(batch).numpy(), atol=1e-5)
        assert got["plain"]["x_age"] is None
        fact = _load(models["factorized"], None).eval()
        np.testing.assert_allclose(got["fact"]["x_id"], fact(batch).numpy(), atol=1e-5)
        np.testing.assert_allclose(got["fact"]["x_id"] + got["fact"]["x_age"],
                                   fact.encoder(batch).numpy(), atol=1e-4)
    np.testing.assert_array_equal(got["fact"]["paths"], [cache.paths[k] for k in idx])


def test_extracting_parts_leaves_the_model_in_eval_mode(tmp_path: Path, models: dict) -> None:
    from mtmim_cli.eval.runners import FeatureOptions

    cache = Cache(_cache(tmp_path / "faces.h5"))
    model = _load(models["factorized"], None).eval()
    FeatureOptions().extract_parts(model, cache, np.arange(4))
    assert not model.training and not model.encoder.training


def test_morph_units_are_the_oldest_photos_against_the_youngest(tmp_path: Path,
                                                                models: dict) -> None:
    cache_path = _cache(tmp_path / "faces.h5")
    cache = Cache(cache_path)
    cfg = EvalConfig(protocol="morph-s2", cache=cache_path, test_subjects=6, train_subjects=4,
                     resamples=300, age_probe=False, out=tmp_path / "m" / "results.md",
                     models=[ModelArg("a", models["pool8"]), ModelArg("b", models["pool16"])])
    payload = evaluate(cfg, progress=False)
    side = json.loads((tmp_path / "m" / "results.outcomes.json").read_text())
    probes = np.array(side["models"]["a"]["index"])
    assert len(probes) == 6 and len(set(cache.identity[probes])) == 6
    m = payload["results"][0]["metrics"]
    assert np.mean(side["models"]["a"]["hit"]) == pytest.approx(m["rank1"])
    # One gallery photo per subject, the youngest: the gap is oldest minus youngest age.
    by_gap = {r["bin"]: r["n"] for r in m["by_age"]["by_gap"]}
    assert sum(by_gap.values()) == 6 and by_gap["21+"] == 6
    # One mate per probe, so the mate map counts each probe once.
    assert np.sum(m["age_map"]["n"]) == 6
    assert payload["comparisons"]["clusters"] == 6 and payload["comparisons"]["units"] == 6


def test_cacd_compares_rank1_and_average_precision_per_database(tmp_path: Path,
                                                                 models: dict) -> None:
    import csv

    cache_path = _cache(tmp_path / "faces.h5")
    cache = Cache(cache_path)
    years = [2013, 2005, 2008, 2011, 2013, 2006, 2012]
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "year", "test"])
        for k, p in enumerate(cache.paths):
            w.writerow([p, years[k % PER_ID], 1])
    cfg = EvalConfig(protocol="cacd-map", cache=cache_path, meta=tmp_path / "meta.csv",
                     resamples=300, age_probe=False,
                     models=[ModelArg("a", models["pool8"]), ModelArg("b", models["pool16"])])
    payload = evaluate(cfg, progress=False)
    c = payload["comparisons"]
    assert c["figure"] == "rank1" and c["units"] == 2 * N_IDS
    for name in ("2004-2006", "2007-2009", "2010-2012"):
        (row,) = c["other_figures"][f"ap {name}"]
        assert row["mean_a"] == pytest.approx(payload["results"][0]["metrics"][name]["map"])
        assert row["p_mcnemar"] is None


def test_bad_analysis_options_are_refused_on_one_line(tmp_path: Path, models: dict) -> None:
    from mtmim_cli.errors import MtmimError

    base = dict(protocol="fgnet-loo", cache=_cache(tmp_path / "faces.h5"),
                models=[ModelArg("a", models["pool8"])])
    for kw, text in (({"resample": "pair"}, "--resample pair"),
                     ({"resamples": 10}, "--resamples 10"), ({"mi_steps": -1}, "--mi-steps -1")):
        with pytest.raises(MtmimError, match=text):
            evaluate(EvalConfig(**base, **kw), progress=False)
